//! Names of `CUresult` codes as metric label values (`CUDA_ERROR_OUT_OF_MEMORY` →
//! `out_of_memory`). Codes this table does not know become `code_<n>`, never an error.

use std::borrow::Cow;

const NAMES: &[(u32, &str)] = &[
    (0, "success"),
    (1, "invalid_value"),
    (2, "out_of_memory"),
    (3, "not_initialized"),
    (4, "deinitialized"),
    (5, "profiler_disabled"),
    (34, "stub_library"),
    (46, "device_unavailable"),
    (100, "no_device"),
    (101, "invalid_device"),
    (102, "device_not_licensed"),
    (200, "invalid_image"),
    (201, "invalid_context"),
    (202, "context_already_current"),
    (205, "map_failed"),
    (206, "unmap_failed"),
    (208, "already_mapped"),
    (214, "ecc_uncorrectable"),
    (216, "context_already_in_use"),
    (400, "invalid_handle"),
    (401, "illegal_state"),
    (500, "not_found"),
    (600, "not_ready"),
    (700, "illegal_address"),
    (709, "context_is_destroyed"),
    (719, "launch_failed"),
    (800, "not_permitted"),
    (801, "not_supported"),
    (802, "system_not_ready"),
    (803, "system_driver_mismatch"),
    (999, "unknown"),
];

pub fn name(code: u32) -> Cow<'static, str> {
    match NAMES.binary_search_by_key(&code, |(c, _)| *c) {
        Ok(i) => Cow::Borrowed(NAMES[i].1),
        Err(_) => Cow::Owned(format!("code_{code}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_codes() {
        assert_eq!(name(2), "out_of_memory");
        assert_eq!(name(1), "invalid_value");
        assert_eq!(name(999), "unknown");
        assert_eq!(name(12345), "code_12345");
    }

    #[test]
    fn table_is_sorted_for_binary_search() {
        assert!(NAMES.windows(2).all(|w| w[0].0 < w[1].0));
    }
}

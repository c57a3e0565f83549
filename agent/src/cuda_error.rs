//! `CUresult` codes as metric label values (`CUDA_ERROR_OUT_OF_MEMORY` → `out_of_memory`).
//!
//! The code comes from the return register of a library a process chose to load, so it is
//! outside input: a label takes only the names below and everything else becomes [`OTHER`]
//! ([`label`]), which keeps the `error` label bounded whatever a library returns. Log lines
//! and forensic reports, which are not labels, keep unknown codes apart as `code_<n>`
//! ([`name`]).

use std::borrow::Cow;

/// The label value of codes the table does not know.
pub const OTHER: &str = "other";

/// Every `CUresult` of the CUDA driver API header (`cuda.h`, CUDA 11.4 to 13.x, as cudarc's
/// bindings of each release list them), named without `CUDA_ERROR_`, lowercased. 35 and
/// 706/707 are runtime API codes (`cudaError_t`) that the driver API does not return.
const NAMES: &[(u32, &str)] = &[
    (0, "success"),
    (1, "invalid_value"),
    (2, "out_of_memory"),
    (3, "not_initialized"),
    (4, "deinitialized"),
    (5, "profiler_disabled"),
    (6, "profiler_not_initialized"),
    (7, "profiler_already_started"),
    (8, "profiler_already_stopped"),
    (34, "stub_library"),
    (36, "call_requires_newer_driver"),
    (46, "device_unavailable"),
    (47, "multicast_resource_full"),
    (100, "no_device"),
    (101, "invalid_device"),
    (102, "device_not_licensed"),
    (200, "invalid_image"),
    (201, "invalid_context"),
    (202, "context_already_current"),
    (205, "map_failed"),
    (206, "unmap_failed"),
    (207, "array_is_mapped"),
    (208, "already_mapped"),
    (209, "no_binary_for_gpu"),
    (210, "already_acquired"),
    (211, "not_mapped"),
    (212, "not_mapped_as_array"),
    (213, "not_mapped_as_pointer"),
    (214, "ecc_uncorrectable"),
    (215, "unsupported_limit"),
    (216, "context_already_in_use"),
    (217, "peer_access_unsupported"),
    (218, "invalid_ptx"),
    (219, "invalid_graphics_context"),
    (220, "nvlink_uncorrectable"),
    (221, "jit_compiler_not_found"),
    (222, "unsupported_ptx_version"),
    (223, "jit_compilation_disabled"),
    (224, "unsupported_exec_affinity"),
    (225, "unsupported_devside_sync"),
    (226, "contained"),
    (227, "insufficient_loader_version"),
    (300, "invalid_source"),
    (301, "file_not_found"),
    (302, "shared_object_symbol_not_found"),
    (303, "shared_object_init_failed"),
    (304, "operating_system"),
    (400, "invalid_handle"),
    (401, "illegal_state"),
    (402, "lossy_query"),
    (500, "not_found"),
    (600, "not_ready"),
    (700, "illegal_address"),
    (701, "launch_out_of_resources"),
    (702, "launch_timeout"),
    (703, "launch_incompatible_texturing"),
    (704, "peer_access_already_enabled"),
    (705, "peer_access_not_enabled"),
    (708, "primary_context_active"),
    (709, "context_is_destroyed"),
    (710, "assert"),
    (711, "too_many_peers"),
    (712, "host_memory_already_registered"),
    (713, "host_memory_not_registered"),
    (714, "hardware_stack_error"),
    (715, "illegal_instruction"),
    (716, "misaligned_address"),
    (717, "invalid_address_space"),
    (718, "invalid_pc"),
    (719, "launch_failed"),
    (720, "cooperative_launch_too_large"),
    (721, "tensor_memory_leak"),
    (800, "not_permitted"),
    (801, "not_supported"),
    (802, "system_not_ready"),
    (803, "system_driver_mismatch"),
    (804, "compat_not_supported_on_device"),
    (805, "mps_connection_failed"),
    (806, "mps_rpc_failure"),
    (807, "mps_server_not_ready"),
    (808, "mps_max_clients_reached"),
    (809, "mps_max_connections_reached"),
    (810, "mps_client_terminated"),
    (811, "cdp_not_supported"),
    (812, "cdp_version_mismatch"),
    (900, "stream_capture_unsupported"),
    (901, "stream_capture_invalidated"),
    (902, "stream_capture_merge"),
    (903, "stream_capture_unmatched"),
    (904, "stream_capture_unjoined"),
    (905, "stream_capture_isolation"),
    (906, "stream_capture_implicit"),
    (907, "captured_event"),
    (908, "stream_capture_wrong_thread"),
    (909, "timeout"),
    (910, "graph_exec_update_failure"),
    (911, "external_device"),
    (912, "invalid_cluster_size"),
    (913, "function_not_loaded"),
    (914, "invalid_resource_type"),
    (915, "invalid_resource_configuration"),
    (916, "key_rotation"),
    (917, "stream_detached"),
    (918, "graph_recapture_failure"),
    (919, "fabric_not_ready"),
    (999, "unknown"),
];

/// The label value of `code`: its name, or [`OTHER`] for a code the driver does not define.
pub fn label(code: u32) -> &'static str {
    match NAMES.binary_search_by_key(&code, |(c, _)| *c) {
        Ok(i) => NAMES[i].1,
        Err(_) => OTHER,
    }
}

/// The name of `code` for a log line or a report: its name, or `code_<n>`.
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
    fn known_codes_are_their_names() {
        assert_eq!(label(2), "out_of_memory");
        assert_eq!(label(1), "invalid_value");
        assert_eq!(label(36), "call_requires_newer_driver");
        assert_eq!(label(225), "unsupported_devside_sync");
        assert_eq!(label(720), "cooperative_launch_too_large");
        assert_eq!(label(812), "cdp_version_mismatch");
        assert_eq!(label(915), "invalid_resource_configuration");
        assert_eq!(label(999), "unknown");
        assert_eq!(name(2), "out_of_memory");
    }

    #[test]
    fn unknown_codes_are_other_as_labels_and_numbered_in_reports() {
        for code in [35, 706, 707, 998, 1000, 12345, u32::MAX] {
            assert_eq!(label(code), OTHER, "{code}");
        }
        assert_eq!(name(12345), "code_12345");
        // Whatever a library returns, the label takes at most the table's values and `other`.
        let values: std::collections::HashSet<&str> = (0..=100_000).map(label).collect();
        assert_eq!(values.len(), NAMES.len() + 1);
    }

    #[test]
    fn the_table_holds_the_driver_api_codes() {
        let codes: Vec<u32> = NAMES.iter().map(|(c, _)| *c).collect();
        let mut want: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 34, 36, 46, 47, 100, 101, 102];
        want.extend([200, 201, 202]);
        want.extend(205..=227);
        want.extend(300..=304);
        want.extend(400..=402);
        want.extend([500, 600]);
        want.extend((700..=721).filter(|c| *c != 706 && *c != 707));
        want.extend(800..=812);
        want.extend(900..=919);
        want.push(999);
        assert_eq!(codes, want);
    }

    #[test]
    fn table_is_sorted_and_names_are_label_safe() {
        assert!(NAMES.windows(2).all(|w| w[0].0 < w[1].0));
        for (_, n) in NAMES {
            assert!(n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            assert_ne!(*n, OTHER);
        }
    }
}

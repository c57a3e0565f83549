//! NVML clock event ("throttle") reasons: the bit mask decoded into named reasons.

/// Every reason NVML defines, with the label value it is exported under.
pub const REASONS: &[(u64, &str)] = &[
    (0x1, "idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// Names of the reasons active in `mask` (unknown bits are ignored).
pub fn active(mask: u64) -> impl Iterator<Item = &'static str> {
    REASONS
        .iter()
        .filter(move |(bit, _)| mask & bit != 0)
        .map(|(_, name)| *name)
}

/// The active reasons as one comma-separated string ("none" when there are none).
pub fn describe(mask: u64) -> String {
    let names: Vec<&str> = active(mask).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bit_decodes_to_its_own_reason() {
        for (i, (bit, name)) in REASONS.iter().enumerate() {
            assert_eq!(*bit, 1 << i, "bits are contiguous from 0x1");
            assert_eq!(active(*bit).collect::<Vec<_>>(), vec![*name]);
        }
        assert_eq!(active(0x1ff).count(), REASONS.len());
        assert_eq!(describe(0), "none");
        assert_eq!(describe(0x28), "hw_slowdown,sw_thermal_slowdown");
        // Bits NVML may add later are ignored, not misnamed.
        assert_eq!(describe(1 << 40), "none");
    }
}

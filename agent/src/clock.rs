//! The one clock every part stamps with: CLOCK_MONOTONIC in nanoseconds, which is also the
//! clock of `bpf_ktime_get_ns()` in the probes' records.

pub fn monotonic_ns() -> u64 {
    read_ns(libc::CLOCK_MONOTONIC).unwrap_or(0)
}

/// Clock `clock` in nanoseconds; `None` where the kernel refuses to read it (the CPU clock of
/// a process that is gone).
pub fn read_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

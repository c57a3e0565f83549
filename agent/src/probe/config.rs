//! The `[probes]` section: what is attached, what it may cost, how often discovery runs.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// Kill switch: probe families (`cuda`, `sched`) or single CUDA symbols (`cuMemHostAlloc`,
    /// or `cuda:cuMemHostAlloc`) that are never attached.
    pub disabled: Vec<String>,
    /// Successful allocations of at least this many bytes all record their user call stack
    /// (0: none by size), so that the allocations a forensic report lists first have theirs.
    pub stack_threshold_bytes: u64,
    /// Below the threshold, stacks are sampled by bytes, as heap profilers do: one allocation
    /// per this many bytes allocated on average, so an allocation of `n` bytes has its stack
    /// with a probability of about `n` / this (0: none below the threshold; failures always
    /// have theirs).
    pub stack_sample_bytes: u64,
    /// Share of one CPU core the probes may cost before the agent sheds them (0: no budget).
    pub budget_core_share: f64,
    /// Share of one CPU core the `http` family may cost before the agent detaches it until
    /// its cool-down ends (0: no budget). Its programs run on the socket syscalls of every
    /// process on the node, so the cost follows the node's syscall rate.
    pub http_budget_core_share: f64,
    /// Turn on the kernel's BPF run-time statistics (`kernel.bpf_stats_enabled`) while the
    /// agent runs, to measure what the `http` family costs. They cost every BPF program on
    /// the node two clock reads per run, so they are off unless asked for (a node running a
    /// BPF datapath pays them on every packet); off (or without CAP_SYS_ADMIN), the cost is
    /// estimated from the runs and bytes the programs count.
    pub run_time_stats: bool,
    /// The `http` family's program on `sys_exit` as a raw tracepoint, even where the BTF
    /// tracepoint (plain loads of the saved registers, a little cheaper on every syscall)
    /// would load; the agent falls back to it by itself where that one cannot.
    pub http_raw_tracepoint: bool,
    /// OpenSSL's `SSL_read`/`SSL_write` (and `_ex`) of a watched server probed on the internal
    /// read and write functions they call, where the library's code shows that every call
    /// goes through them (one emulated trap a call, against a single-stepped one on OpenSSL
    /// 3's exported calls); false: on the exported calls themselves.
    pub tls_internal: bool,
    /// How long a probe the budget shed stays off before it is re-attached and measured
    /// again, in seconds; doubled each time the same probe is shed again soon after, up to
    /// 30 minutes.
    pub shed_cooldown_secs: u64,
    /// How often the probe budget runs, in milliseconds; also how often discovery polls
    /// `/proc` where the kernel's discovery events are unavailable.
    pub discovery_interval_ms: u64,
    /// Stop a process that maps a CUDA driver file the agent has not probed yet (SIGSTOP, sent
    /// by the kernel hook as the mapping is made) until the probes are attached (SIGCONT,
    /// milliseconds later), so that its first allocation is counted. Off: that process's
    /// calls are counted from the attach on.
    pub hold_openers: bool,
    /// Ring buffer size in bytes (a power of two, at least one page).
    pub ring_buffer_bytes: u32,
    /// Longest time an event may wait in the ring buffer before userspace reads it, in ms.
    pub poll_interval_ms: u64,
    /// The same for the `http` family's ring. Its records carry their own kernel timestamps,
    /// so reading them later changes no measured time, only how fresh `/metrics` is (a
    /// forensic report asks for a read at once). Each read costs the agent more than its
    /// records: its code and the connections' state are cold again after the server ran. At
    /// 200 streamed requests/s the agent used 12 % of a core per 1,000 requests/s at 5 ms,
    /// 5–6.5 % at 50 ms and about 4 % at 200 ms (`docs/architecture.md`).
    pub http_poll_interval_ms: u64,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        Self {
            disabled: Vec::new(),
            stack_threshold_bytes: 64 << 20,
            stack_sample_bytes: 32 << 20,
            budget_core_share: 0.05,
            http_budget_core_share: 0.05,
            run_time_stats: false,
            http_raw_tracepoint: false,
            tls_internal: true,
            shed_cooldown_secs: 60,
            discovery_interval_ms: 1000,
            hold_openers: true,
            ring_buffer_bytes: 8 * 1024 * 1024,
            poll_interval_ms: 5,
            http_poll_interval_ms: 200,
        }
    }
}

impl ProbesConfig {
    pub fn validate(&self) -> Result<(), String> {
        let rb = self.ring_buffer_bytes;
        if rb < 4096 || !rb.is_power_of_two() {
            return Err(format!(
                "probes.ring_buffer_bytes = {rb}: must be a power of two of at least 4096"
            ));
        }
        for (key, share) in [
            ("budget_core_share", self.budget_core_share),
            ("http_budget_core_share", self.http_budget_core_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(format!("probes.{key} = {share}: must be between 0 and 1"));
            }
        }
        if self.shed_cooldown_secs == 0 {
            return Err(
                "probes.shed_cooldown_secs must be above 0: a shed probe comes back after it"
                    .into(),
            );
        }
        for (key, ms) in [
            ("poll_interval_ms", self.poll_interval_ms),
            ("http_poll_interval_ms", self.http_poll_interval_ms),
            ("discovery_interval_ms", self.discovery_interval_ms),
        ] {
            if ms == 0 {
                return Err(format!("probes.{key} must be above 0"));
            }
        }
        for name in &self.disabled {
            if !super::is_known_probe(name) {
                return Err(format!(
                    "probes.disabled: unknown probe {name:?} (families: cuda, sched, oom, http, discovery; or a CUDA symbol)"
                ));
            }
        }
        Ok(())
    }
}

//! GPU telemetry from NVML: a sampler thread (`sampler`) reads every GPU at an interval into
//! the metrics and into a per-GPU ring of recent samples (`history`) that the tracker queries
//! by time; an event thread (`xid`) turns XID critical errors into counters and log records.
//! `throttle` decodes clock event reasons, `pids` maps NVML's pids to the agent's.

mod config;
pub mod history;
pub mod metrics;
pub mod nvml;
pub mod pids;
pub mod throttle;
pub mod xid;

pub use config::{CostConfig, NvmlConfig};

/// What the GPU side tells whoever correlates it (the tracker): NVML's view of the processes
/// at each sample, and each XID critical error.
#[derive(Debug)]
pub enum GpuReport {
    Processes(GpuProcesses),
    /// Each GPU's use over the last sampling interval, for the `http` stage to split between
    /// the models served on it.
    Usage(Vec<GpuUsage>),
    /// CLOCK_MONOTONIC ns.
    Xid {
        gpu: u32,
        xid: u64,
        ts_ns: u64,
    },
}

/// Where reports go. It never blocks: a sampler or watcher stuck in NVML must not hold up,
/// nor keep alive, the stage that reads them (the wiring hands a sink over a weak sender).
pub type ReportSink = std::sync::Arc<dyn Fn(GpuReport) + Send + Sync>;

/// One GPU at one instant. `None`: the GPU does not support the reading (or it failed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSample {
    pub gpu: u32,
    /// CLOCK_MONOTONIC, the clock of the probes' events.
    pub ts_ns: u64,
    /// Percent of time a kernel was running.
    pub utilization: Option<u32>,
    pub memory_utilization: Option<u32>,
    pub memory_used: Option<u64>,
    pub memory_free: Option<u64>,
    pub memory_total: Option<u64>,
    pub power_mw: Option<u32>,
    pub power_limit_mw: Option<u32>,
    pub energy_mj: Option<u64>,
    pub temperature_c: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// Clock event reasons bit mask (`throttle::REASONS`).
    pub throttle: Option<u64>,
    pub pcie_tx_kbs: Option<u32>,
    pub pcie_rx_kbs: Option<u32>,
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
}

impl GpuSample {
    /// A compact description for log lines: memory, utilization, temperature, throttling.
    pub fn describe(&self) -> String {
        let gib = |b: Option<u64>| {
            b.map_or("?".into(), |b| {
                format!("{:.2}", b as f64 / (1u64 << 30) as f64)
            })
        };
        let num = |v: Option<u32>| v.map_or("?".into(), |v| v.to_string());
        format!(
            "memory {}/{} GiB, utilization {}%, temperature {} C, throttle {}",
            gib(self.memory_used),
            gib(self.memory_total),
            num(self.utilization),
            num(self.temperature_c),
            self.throttle.map_or("?".into(), throttle::describe),
        )
    }
}

/// NVML's view of one process on one GPU, with the pid mapped to the agent's `/proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    pub gpu: u32,
    pub used_bytes: Option<u64>,
    /// SM utilization percent from NVML's per-process samples, when the GPU gives them.
    pub sm_util: Option<u32>,
}

/// One GPU's use over one sampling interval (from the previous sample to this one).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuUsage {
    pub gpu: u32,
    /// CLOCK_MONOTONIC ns at the interval's end.
    pub ts_ns: u64,
    /// Joules the GPU consumed over the interval (the growth of NVML's energy counter).
    pub energy_j: Option<f64>,
    /// Seconds a kernel was running over the interval: NVML's utilization × the interval.
    pub busy_s: Option<f64>,
    /// The processes on the GPU at the interval's end, with their SM utilization averaged over
    /// NVML's samples in the interval.
    pub processes: Vec<GpuProcess>,
}

/// Every process on every GPU at one sampling instant (for the tracker).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuProcesses {
    pub ts_ns: u64,
    pub entries: Vec<GpuProcess>,
}

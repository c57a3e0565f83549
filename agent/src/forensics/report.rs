//! The forensic report: one JSON document per event, schema versioned. Everything an
//! operator needs to answer "why did it run out of memory" without the process.

use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A CUDA allocation failed with CUDA_ERROR_OUT_OF_MEMORY.
    Cuda,
    /// The kernel's OOM killer chose a victim.
    HostOomKill,
    /// A process holding GPU memory exited on a fatal signal or a non-zero status.
    GpuProcessCrash,
    /// NVML reported an XID critical error.
    Xid,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Cuda,
        Kind::HostOomKill,
        Kind::GpuProcessCrash,
        Kind::Xid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cuda => "cuda",
            Kind::HostOomKill => "host_oom_kill",
            Kind::GpuProcessCrash => "gpu_process_crash",
            Kind::Xid => "xid",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub id: String,
    pub kind: Kind,
    /// Wall-clock time of the event, RFC 3339.
    pub time: String,
    /// Milliseconds since the Unix epoch (for sorting and charts).
    pub time_unix_ms: u64,
    pub summary: String,
    pub process: ProcessInfo,
    pub gpu: Option<GpuInfo>,
    pub cuda: Option<CudaFailure>,
    pub exit: Option<ExitInfo>,
    pub host_oom: Option<HostOom>,
    pub xid: Option<u64>,
    /// The process's live GPU allocations at the instant.
    pub allocations: Option<Allocations>,
    /// Every process on the same GPU.
    pub gpu_processes: Vec<GpuProcessRow>,
    pub timeline: Timeline,
    /// Reports of the same kind and process suppressed in the window before this one.
    pub suppressed_before: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    /// The process's cgroup path (v2, or the v1 memory controller's).
    pub cgroup: String,
    /// Container id from the cgroup path, when it has one.
    pub container_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub utilization: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_watts: Option<f64>,
    pub throttle_reasons: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CudaFailure {
    pub api: String,
    pub requested_bytes: u64,
    pub error: String,
    pub code: u32,
    pub thread: u32,
    pub stack: Vec<Frame>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub signal_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostOom {
    pub total_vm_bytes: u64,
    pub anon_rss_bytes: u64,
    pub file_rss_bytes: u64,
    pub shmem_rss_bytes: u64,
    pub pgtables_bytes: u64,
    pub oom_score_adj: i32,
    pub uid: u32,
    pub cgroup_limit_bytes: Option<u64>,
    pub cgroup_usage_bytes: Option<u64>,
    pub node_memory_total_bytes: Option<u64>,
    pub node_memory_available_bytes: Option<u64>,
    /// The largest processes on the node by resident memory.
    pub largest_processes: Vec<RssRow>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RssRow {
    pub pid: u32,
    pub comm: String,
    pub rss_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Allocations {
    pub count: u64,
    pub bytes: u64,
    pub by_size_class: Vec<SizeClass>,
    pub largest: Vec<AllocationRow>,
    /// Allocations and frees per second over the last minute.
    pub alloc_rate_per_s: f64,
    pub free_rate_per_s: f64,
    /// Bytes in allocations older than 10 minutes (long-lived: weights, pools).
    pub old_bytes: u64,
    pub old_count: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SizeClass {
    pub class: String,
    pub count: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocationRow {
    pub bytes: u64,
    pub api: String,
    pub gpu: i32,
    pub age_seconds: f64,
    pub stack: Vec<Frame>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    pub address: u64,
    pub function: Option<String>,
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub offset: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuProcessRow {
    pub pid: u32,
    pub comm: String,
    pub ledger_bytes: u64,
    pub nvml_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// Seconds covered before the event.
    pub window_seconds: u64,
    pub gpu: Vec<GpuPoint>,
    pub processes: Vec<ProcessSeries>,
    pub failures: Vec<FailurePoint>,
    /// Requests in flight on each watched inference server (from the wire), once a second.
    #[serde(default)]
    pub requests: Vec<RequestSeries>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestSeries {
    pub pid: u32,
    pub comm: String,
    /// (t, requests in flight, their request body bytes).
    pub points: Vec<(f64, u32, u64)>,
}

/// Times are seconds relative to the event (negative: before).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuPoint {
    pub t: f64,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub utilization: Option<u32>,
    pub power_watts: Option<f64>,
    pub temperature_c: Option<u32>,
    pub throttle_reasons: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessSeries {
    pub pid: u32,
    pub comm: String,
    /// (t, ledger bytes on the report's GPU).
    pub points: Vec<(f64, u64)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailurePoint {
    pub t: f64,
    pub pid: u32,
    pub api: String,
    pub requested_bytes: u64,
    pub error: String,
}

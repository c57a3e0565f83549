//! The snapshot the tracker takes at a trigger, and its vocabulary. It is the tracker's
//! (only the tracker knows the ledger, its timeline and the recent failures at that instant);
//! the forensics writer, a layer above, turns it into a report, so the kinds and the process
//! rows that reach the report are defined here and serialized as they are.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use agent_common::{cuda::CudaMemEvent, oom::OomKillEvent};
use serde::{Deserialize, Serialize};

use super::{ledger::Allocation, metrics::TrackMetrics};
use crate::{labels::KindLabels, proc::ExecMapping};

/// What triggered a report. Its snake-case name is the report's `kind` and the `kind` label
/// of the trigger counters.
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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    /// The process's cgroup path (v2, or the v1 memory controller's).
    pub cgroup: String,
    /// Container id from the cgroup path, when it has one.
    pub container_id: Option<String>,
    /// The pod the process runs in, as the agent's series label it (empty outside a pod, or
    /// where attribution has no source): what `kubectl` needs to find it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuProcessRow {
    pub pid: u32,
    pub comm: String,
    pub ledger_bytes: u64,
    pub nvml_bytes: Option<u64>,
}

/// Ledger bytes of one process on one GPU over time (absolute CLOCK_MONOTONIC ns).
#[derive(Clone, Debug, Default)]
pub struct LedgerSeries {
    pub pid: u32,
    pub comm: String,
    pub points: Vec<(u64, u64)>,
}

/// What the tracker knows at the instant of a trigger.
#[derive(Clone, Debug)]
pub struct Draft {
    pub kind: Kind,
    pub ts_ns: u64,
    pub wall: SystemTime,
    pub process: ProcessInfo,
    pub gpu: Option<u32>,
    pub cuda: Option<CudaMemEvent>,
    pub exit: Option<(Option<i32>, i32)>,
    pub host_oom: Option<OomKillEvent>,
    pub xid: Option<u64>,
    /// The process's live device allocations.
    pub allocations: Vec<Allocation>,
    /// Allocations and frees per second over the last minute.
    pub rates: (f64, f64),
    pub gpu_processes: Vec<GpuProcessRow>,
    pub ledger: Vec<LedgerSeries>,
    /// (ts_ns, pid, api, requested, error) of recent failures on the GPU.
    pub failures: Vec<(u64, u32, String, u64, String)>,
    pub suppressed_before: u64,
    /// The process's executable mappings at the instant, to symbolize its stacks later.
    pub maps: Vec<ExecMapping>,
}

/// Bytes of drafts waiting for the writer. A draft carries its process's live allocations
/// (up to `limits.max_allocations_per_process`, 10 MiB at the default), so a count of drafts
/// bounded nothing: 64 of them could hold 640 MiB. Past this a draft is dropped and counted.
pub const QUEUE_BYTES: usize = 32 * 1024 * 1024;

impl crate::queue::Weigh for Draft {
    fn weight(&self) -> usize {
        let text = |s: &String| s.capacity();
        let p = &self.process;
        size_of::<Draft>()
            + text(&p.comm)
            + text(&p.cmdline)
            + text(&p.cgroup)
            + p.container_id.as_ref().map_or(0, text)
            + self.allocations.capacity() * size_of::<Allocation>()
            + self.gpu_processes.capacity() * size_of::<GpuProcessRow>()
            + self
                .gpu_processes
                .iter()
                .map(|r| text(&r.comm))
                .sum::<usize>()
            + self.ledger.capacity() * size_of::<LedgerSeries>()
            + self
                .ledger
                .iter()
                .map(|l| text(&l.comm) + l.points.capacity() * size_of::<(u64, u64)>())
                .sum::<usize>()
            + self.failures.capacity() * size_of::<(u64, u32, String, u64, String)>()
            + self
                .failures
                .iter()
                .map(|f| text(&f.2) + text(&f.4))
                .sum::<usize>()
            + self.maps.capacity() * size_of::<ExecMapping>()
            + self.maps.iter().map(|m| text(&m.map.path)).sum::<usize>()
    }
}

/// What the tracker takes from the `[forensics]` section; the wiring fills it in, so the
/// tracker does not depend on the writer's config.
#[derive(Clone, Copy, Debug)]
pub struct TriggerSettings {
    /// One report per process and kind per window, in seconds; further triggers are counted.
    pub window_secs: u64,
    /// How far back the ledger timeline a draft carries reaches, in seconds.
    pub timeline_secs: u64,
}

/// Decides which triggers become reports: one per (process, kind) per window.
pub struct Limiter {
    window_ns: u64,
    last: HashMap<(u32, Kind), (u64, u64)>,
}

impl Limiter {
    pub fn new(window_secs: u64) -> Self {
        Self {
            window_ns: window_secs.saturating_mul(1_000_000_000),
            last: HashMap::new(),
        }
    }

    /// `Some(suppressed since the last report)` when this trigger gets a report.
    pub fn admit(&mut self, pid: u32, kind: Kind, ts_ns: u64) -> Option<u64> {
        if self.last.len() > 10_000 {
            let horizon = ts_ns.saturating_sub(self.window_ns);
            self.last.retain(|_, (t, _)| *t >= horizon);
        }
        match self.last.get_mut(&(pid, kind)) {
            Some((t, suppressed)) if ts_ns.saturating_sub(*t) < self.window_ns => {
                *suppressed += 1;
                None
            }
            entry => {
                let before = entry.map_or(0, |(_, s)| *s);
                self.last.insert((pid, kind), (ts_ns, 0));
                Some(before)
            }
        }
    }
}

/// Where the tracker sends its drafts: the forensics writer's queue.
#[derive(Clone)]
pub struct DraftSink {
    tx: crate::queue::Sender<Draft>,
    metrics: Arc<TrackMetrics>,
}

impl DraftSink {
    pub fn new(tx: crate::queue::Sender<Draft>, metrics: Arc<TrackMetrics>) -> Self {
        Self { tx, metrics }
    }

    pub fn submit(&self, draft: Draft) {
        let kind = draft.kind.as_str();
        if !self.tx.offer(draft) {
            // The writer is behind (a storm across many processes): counted here by kind and
            // by the queue (`what="forensics_queue"`), never blocking.
            self.metrics
                .forensics_dropped
                .get_or_create(&KindLabels { kind })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_report_per_process_and_kind_per_window() {
        let mut l = Limiter::new(60);
        let s = 1_000_000_000;
        assert_eq!(l.admit(1, Kind::Cuda, 0), Some(0));
        for i in 1..1000 {
            assert_eq!(l.admit(1, Kind::Cuda, i * s / 1000), None);
        }
        assert_eq!(l.admit(2, Kind::Cuda, s), Some(0), "another process");
        assert_eq!(
            l.admit(1, Kind::GpuProcessCrash, s),
            Some(0),
            "another kind"
        );
        assert_eq!(
            l.admit(1, Kind::Cuda, 61 * s),
            Some(999),
            "next window says what it skipped"
        );
    }
}

//! The allocation ledger's series (CUDA calls, bytes and latency; what each process holds),
//! its join with NVML's per-process figures, and the forensics triggers it counts (and the
//! drafts it could not hand to the writer).

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

use crate::{
    labels::{KindLabels, SharedWorkload},
    metrics::{GaugeF, Metrics},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiErrorLabels {
    pub api: &'static str,
    /// A `CUresult` name the agent knows, else `other` (`crate::cuda_error::label`).
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessGpuLabels {
    pub pid: u32,
    pub comm: String,
    pub gpu: i32,
    /// node, namespace, pod, container (attribution); empty ones are left out.
    #[prometheus(flatten)]
    pub workload: SharedWorkload,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessLabels {
    pub pid: u32,
    pub comm: String,
    /// node, namespace, pod, container (attribution); empty ones are left out.
    #[prometheus(flatten)]
    pub workload: SharedWorkload,
}

/// NVML's per-process series: pid labels only (comm is on the ledger's series).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PidGpuLabels {
    pub pid: u32,
    pub gpu: u32,
    /// node, namespace, pod, container (attribution); empty ones are left out.
    #[prometheus(flatten)]
    pub workload: SharedWorkload,
}

fn latency_histogram() -> Histogram {
    // 1 µs … ~4 s: pool hits take microseconds, a driver that must reclaim memory seconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-6, 4.0, 12,
    ))
}

pub struct TrackMetrics {
    /// The shared counters (events by source, outside input dropped).
    pub core: Arc<Metrics>,
    pub cuda_alloc_calls: Family<ApiLabels, Counter>,
    pub cuda_alloc_bytes: Family<ApiLabels, Counter>,
    pub cuda_alloc_failures: Family<ApiErrorLabels, Counter>,
    pub cuda_alloc_latency: Family<ApiLabels, Histogram, fn() -> Histogram>,
    pub cuda_frees: Family<ApiLabels, Counter>,
    pub cuda_free_failures: Family<ApiErrorLabels, Counter>,
    pub cuda_unknown_frees: Family<ApiLabels, Counter>,
    pub process_memory_allocated: Family<ProcessGpuLabels, Gauge>,
    pub process_allocations: Family<ProcessGpuLabels, Gauge>,
    pub process_host_pinned: Family<ProcessLabels, Gauge>,
    pub tracked_processes: Gauge,
    pub gpu_process_memory_used: Family<PidGpuLabels, Gauge>,
    pub gpu_process_sm_utilization: Family<PidGpuLabels, GaugeF>,
    pub gpu_process_memory_overhead: Family<ProcessGpuLabels, Gauge>,
    /// Triggers by kind, every kind at 0 from the start.
    pub oom_events: Family<KindLabels, Counter>,
    /// Triggers that got no report of their own (the limiter's window).
    pub forensics_suppressed: Family<KindLabels, Counter>,
    /// Drafts dropped because the writer's queue was full.
    pub forensics_dropped: Family<KindLabels, Counter>,
}

impl TrackMetrics {
    pub fn new(core: &Arc<Metrics>) -> Arc<Self> {
        let m = Self {
            core: core.clone(),
            cuda_alloc_calls: Family::default(),
            cuda_alloc_bytes: Family::default(),
            cuda_alloc_failures: Family::default(),
            cuda_alloc_latency: Family::new_with_constructor(latency_histogram),
            cuda_frees: Family::default(),
            cuda_free_failures: Family::default(),
            cuda_unknown_frees: Family::default(),
            process_memory_allocated: Family::default(),
            process_allocations: Family::default(),
            process_host_pinned: Family::default(),
            tracked_processes: Gauge::default(),
            gpu_process_memory_used: Family::default(),
            gpu_process_sm_utilization: Family::default(),
            gpu_process_memory_overhead: Family::default(),
            oom_events: Family::default(),
            forensics_suppressed: Family::default(),
            forensics_dropped: Family::default(),
        };
        // Every kind from the start, at 0: `increase()` in the alerting rules then sees the
        // first event of a kind as a step from 0 instead of a new series with no history.
        for kind in super::draft::Kind::ALL {
            let _ = m.oom_events.get_or_create(&KindLabels {
                kind: kind.as_str(),
            });
        }
        core.register_with(|r| {
            r.register(
                "gpu_cuda_alloc_calls",
                "CUDA driver allocation calls (successful or not), by API",
                m.cuda_alloc_calls.clone(),
            );
            r.register(
                "gpu_cuda_alloc_bytes",
                "Bytes of successful CUDA driver allocations, by API",
                m.cuda_alloc_bytes.clone(),
            );
            r.register(
                "gpu_cuda_alloc_failures",
                "CUDA driver allocation calls that failed, by API and CUDA error",
                m.cuda_alloc_failures.clone(),
            );
            r.register(
                "gpu_cuda_alloc_latency_seconds",
                "Duration of CUDA driver allocation calls, entry to return",
                m.cuda_alloc_latency.clone(),
            );
            r.register(
                "gpu_cuda_frees",
                "CUDA driver release calls (successful or not), by API",
                m.cuda_frees.clone(),
            );
            r.register(
                "gpu_cuda_free_failures",
                "CUDA driver release calls that failed, by API and CUDA error",
                m.cuda_free_failures.clone(),
            );
            r.register(
                "gpu_cuda_unknown_frees",
                "Successful releases of pointers or handles the ledger never saw allocated \
                 (allocated before the agent started)",
                m.cuda_unknown_frees.clone(),
            );
            r.register(
                "gpu_process_memory_allocated_bytes",
                "Device memory a process holds through the CUDA driver, from the allocation ledger",
                m.process_memory_allocated.clone(),
            );
            r.register(
                "gpu_process_allocations",
                "Live device allocations of a process, from the allocation ledger",
                m.process_allocations.clone(),
            );
            r.register(
                "gpu_process_host_pinned_bytes",
                "Pinned host memory a process holds through the CUDA driver",
                m.process_host_pinned.clone(),
            );
            r.register(
                "inferscope_tracked_processes",
                "Processes with a live allocation ledger",
                m.tracked_processes.clone(),
            );
            r.register(
                "gpu_process_memory_used_bytes",
                "Device memory the driver charges a process (NVML running compute processes)",
                m.gpu_process_memory_used.clone(),
            );
            r.register(
                "gpu_process_sm_utilization",
                "SM utilization of a process over the last sample (NVML process samples), 0-1",
                m.gpu_process_sm_utilization.clone(),
            );
            r.register(
                "gpu_process_memory_overhead_bytes",
                "NVML's bytes for a process minus its allocation ledger: context, library workspaces, \
                 allocations made before the agent started",
                m.gpu_process_memory_overhead.clone(),
            );
            r.register(
                "llm_oom_events",
                "Out-of-memory events: cuda (allocation failed), host_oom_kill, gpu_process_crash, xid",
                m.oom_events.clone(),
            );
            r.register(
                "inferscope_forensics_suppressed",
                "Events that got no report of their own (one per process and kind per window)",
                m.forensics_suppressed.clone(),
            );
            r.register(
                "inferscope_forensics_dropped",
                "Reports dropped because the writer was behind",
                m.forensics_dropped.clone(),
            );
        });
        Arc::new(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_workload_labels_are_left_out() {
        let m = TrackMetrics::new(&Arc::new(Metrics::new()));
        m.process_host_pinned
            .get_or_create(&ProcessLabels {
                pid: 1,
                comm: "a".into(),
                workload: crate::labels::WorkloadLabels::default().into(),
            })
            .set(5);
        m.process_host_pinned
            .get_or_create(&ProcessLabels {
                pid: 2,
                comm: "b".into(),
                workload: crate::labels::WorkloadLabels {
                    node: "n".into(),
                    pod: "p".into(),
                    ..Default::default()
                }
                .into(),
            })
            .set(6);
        let text = m.core.encode();
        assert!(
            text.contains("gpu_process_host_pinned_bytes{pid=\"1\",comm=\"a\"} 5"),
            "{text}"
        );
        assert!(
            text.contains(
                "gpu_process_host_pinned_bytes{pid=\"2\",comm=\"b\",node=\"n\",pod=\"p\"} 6"
            ),
            "{text}"
        );
    }
}

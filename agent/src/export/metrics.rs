//! The catalogue of metrics the agent exports, in one place (names as in docs/metrics.md).
//! Counters are registered without `_total`: the OpenMetrics encoder appends it.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::ingest::DecodeError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiErrorLabels {
    pub api: &'static str,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessGpuLabels {
    pub pid: u32,
    pub comm: String,
    pub gpu: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessLabels {
    pub pid: u32,
    pub comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 µs … ~4 s: pool hits take microseconds, a driver that must reclaim memory seconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-6, 4.0, 12,
    ))
}

pub struct Metrics {
    pub registry: Registry,
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
    pub events: Family<SourceLabels, Counter>,
    pub events_lost: Family<SourceLabels, Counter>,
    pub events_dropped: Family<ReasonLabels, Counter>,
    pub probe_attached: Family<ProbeLabels, Gauge>,
    pub probe_shed: Family<ProbeLabels, Gauge>,
    pub cuda_libraries: Gauge,
    pub tracked_processes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
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
            events: Family::default(),
            events_lost: Family::default(),
            events_dropped: Family::default(),
            probe_attached: Family::default(),
            probe_shed: Family::default(),
            cuda_libraries: Gauge::default(),
            tracked_processes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "gpu_cuda_alloc_calls",
            "CUDA driver allocation calls (successful or not), by API",
            m.cuda_alloc_calls.clone(),
        );
        registry.register(
            "gpu_cuda_alloc_bytes",
            "Bytes of successful CUDA driver allocations, by API",
            m.cuda_alloc_bytes.clone(),
        );
        registry.register(
            "gpu_cuda_alloc_failures",
            "CUDA driver allocation calls that failed, by API and CUDA error",
            m.cuda_alloc_failures.clone(),
        );
        registry.register(
            "gpu_cuda_alloc_latency_seconds",
            "Duration of CUDA driver allocation calls, entry to return",
            m.cuda_alloc_latency.clone(),
        );
        registry.register(
            "gpu_cuda_frees",
            "CUDA driver release calls (successful or not), by API",
            m.cuda_frees.clone(),
        );
        registry.register(
            "gpu_cuda_free_failures",
            "CUDA driver release calls that failed, by API and CUDA error",
            m.cuda_free_failures.clone(),
        );
        registry.register(
            "gpu_cuda_unknown_frees",
            "Successful releases of pointers or handles the ledger never saw allocated \
             (allocated before the agent started)",
            m.cuda_unknown_frees.clone(),
        );
        registry.register(
            "gpu_process_memory_allocated_bytes",
            "Device memory a process holds through the CUDA driver, from the allocation ledger",
            m.process_memory_allocated.clone(),
        );
        registry.register(
            "gpu_process_allocations",
            "Live device allocations of a process, from the allocation ledger",
            m.process_allocations.clone(),
        );
        registry.register(
            "gpu_process_host_pinned_bytes",
            "Pinned host memory a process holds through the CUDA driver",
            m.process_host_pinned.clone(),
        );
        registry.register(
            "inferscope_events",
            "Events received from the probes, by source",
            m.events.clone(),
        );
        registry.register(
            "inferscope_events_lost",
            "Events the probes could not deliver (ring buffer full), by source",
            m.events_lost.clone(),
        );
        registry.register(
            "inferscope_events_dropped",
            "Events received but not used, by reason",
            m.events_dropped.clone(),
        );
        registry.register(
            "inferscope_probe_attached",
            "Library files a probe is attached to",
            m.probe_attached.clone(),
        );
        registry.register(
            "inferscope_probe_shed",
            "1 when the probe budget has shed this probe",
            m.probe_shed.clone(),
        );
        registry.register(
            "inferscope_cuda_libraries",
            "CUDA driver library files being probed",
            m.cuda_libraries.clone(),
        );
        registry.register(
            "inferscope_tracked_processes",
            "Processes with a live allocation ledger",
            m.tracked_processes.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn record_dropped(&self, e: &DecodeError) {
        self.events_dropped
            .get_or_create(&ReasonLabels { reason: e.reason() })
            .inc();
    }

    pub fn drop_reason(&self, reason: &'static str) {
        self.events_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

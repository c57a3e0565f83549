//! The catalogue of metrics the agent exports, in one place (names as in docs/metrics.md).
//! Counters are registered without `_total`: the OpenMetrics encoder appends it.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub type GaugeF = Gauge<f64, AtomicU64>;
pub type CounterF = Counter<f64, AtomicU64>;

pub use crate::labels::{KindLabels, ReasonLabels, SourceLabels};

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
    pub workload: crate::labels::SharedWorkload,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessLabels {
    pub pid: u32,
    pub comm: String,
    /// node, namespace, pod, container (attribution); empty ones are left out.
    #[prometheus(flatten)]
    pub workload: crate::labels::SharedWorkload,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabels {
    /// `metrics`, `traces` or `logs`.
    pub signal: &'static str,
}

/// `inferscope_dropped_total`: what outside input would have made the agent store or open,
/// and why it did not.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    pub what: &'static str,
    pub reason: &'static str,
}

/// Kinds of [`Metrics::dropped`] exported from the start, at 0: label values folded into
/// `other` (or `-1`) because they came from outside.
pub const LABELS_DROPPED: &[(&str, &str)] = &[
    ("model_label", "unserved"),
    ("model_label", "limit"),
    ("error_label", "unknown_code"),
    ("gpu_label", "unknown_device"),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: &'static str,
}

/// Labels of every per-GPU series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub gpu: u32,
    pub gpu_uuid: String,
    pub gpu_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuInfoLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub driver_version: String,
    pub cuda_version: String,
    pub mig_mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuReasonLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuDirectionLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuEccLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    /// `corrected` or `uncorrected`.
    pub severity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuXidLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub xid: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuCallLabels {
    pub gpu: u32,
    pub call: &'static str,
}

/// NVML's per-process series: pid labels only (comm is on the ledger's series).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PidGpuLabels {
    pub pid: u32,
    pub gpu: u32,
    /// node, namespace, pod, container (attribution); empty ones are left out.
    #[prometheus(flatten)]
    pub workload: crate::labels::SharedWorkload,
}

/// A scraped inference server: `inferscope_scrape_up`, `inferscope_scrape_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeTargetLabels {
    pub server: String,
    pub pid: u32,
    pub port: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeErrorLabels {
    pub server: String,
    pub reason: &'static str,
}

/// Series derived from the inference servers' own metrics (`crate::scrape::derive` says from
/// which), encoded by the scrape collector (`crate::scrape::board`) from its latest snapshot,
/// with labels `model` and the target's (`server`, `pid`, `port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServerSeries {
    BatchSize,
    QueueDepth,
    KvCacheUsage,
    KvCacheHitRatio,
    Preemptions,
}

impl ServerSeries {
    pub const ALL: [ServerSeries; 5] = [
        Self::BatchSize,
        Self::QueueDepth,
        Self::KvCacheUsage,
        Self::KvCacheHitRatio,
        Self::Preemptions,
    ];

    /// The family name (a counter's without `_total`, which the encoder appends).
    pub fn name(self) -> &'static str {
        match self {
            Self::BatchSize => "llm_batch_size",
            Self::QueueDepth => "llm_queue_depth",
            Self::KvCacheUsage => "llm_kv_cache_usage_ratio",
            Self::KvCacheHitRatio => "llm_kv_cache_hit_ratio",
            Self::Preemptions => "llm_preemptions",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Self::BatchSize => {
                "Requests the server is running (in its batch), from its own metrics"
            }
            Self::QueueDepth => "Requests waiting in the server's queue, from its own metrics",
            Self::KvCacheUsage => {
                "Fraction of the server's KV cache in use, 0-1, from its own metrics"
            }
            Self::KvCacheHitRatio => {
                "Prefix-cache hits over queries since the server started, 0-1, from its own metrics"
            }
            Self::Preemptions => "Requests the server preempted, from its own metrics",
        }
    }

    pub fn is_counter(self) -> bool {
        self == Self::Preemptions
    }
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
    pub probe_sheds: Family<ProbeLabels, Counter>,
    pub probe_cost: Family<FamilyLabels, GaugeF>,
    pub probe_family_up: Family<FamilyLabels, Gauge>,
    pub dropped: Family<DroppedLabels, Counter>,
    pub cuda_libraries: Gauge,
    pub tracked_processes: Gauge,
    pub source_up: Family<SourceLabels, Gauge>,
    pub oom_events: Family<KindLabels, Counter>,
    pub forensics_reports: Family<KindLabels, Counter>,
    pub forensics_suppressed: Family<KindLabels, Counter>,
    pub forensics_dropped: Family<KindLabels, Counter>,
    pub forensics_errors: Family<KindLabels, Counter>,
    pub gpu_info: Family<GpuInfoLabels, Gauge>,
    pub gpu_hour_price: Family<GpuLabels, GaugeF>,
    pub gpu_utilization: Family<GpuLabels, GaugeF>,
    pub gpu_memory_utilization: Family<GpuLabels, GaugeF>,
    pub gpu_memory_used: Family<GpuLabels, Gauge>,
    pub gpu_memory_free: Family<GpuLabels, Gauge>,
    pub gpu_memory_total: Family<GpuLabels, Gauge>,
    pub gpu_power: Family<GpuLabels, GaugeF>,
    pub gpu_power_limit: Family<GpuLabels, GaugeF>,
    pub gpu_energy: Family<GpuLabels, CounterF>,
    pub gpu_temperature: Family<GpuLabels, Gauge>,
    pub gpu_sm_clock: Family<GpuLabels, Gauge>,
    pub gpu_memory_clock: Family<GpuLabels, Gauge>,
    pub gpu_throttle_active: Family<GpuReasonLabels, Gauge>,
    pub gpu_pcie_throughput: Family<GpuDirectionLabels, Gauge>,
    pub gpu_ecc_errors: Family<GpuEccLabels, Counter>,
    pub gpu_xid_errors: Family<GpuXidLabels, Counter>,
    pub gpu_idle_seconds: Family<GpuLabels, CounterF>,
    pub gpu_lost: Family<GpuLabels, Gauge>,
    pub nvml_unsupported: Family<GpuCallLabels, Gauge>,
    pub nvml_errors: Family<GpuCallLabels, Counter>,
    pub nvml_samples: Counter,
    pub gpu_process_memory_used: Family<PidGpuLabels, Gauge>,
    pub gpu_process_sm_utilization: Family<PidGpuLabels, GaugeF>,
    pub gpu_process_memory_overhead: Family<ProcessGpuLabels, Gauge>,
    /// Family `http`: requests timed on the wire (`crate::http::metrics`).
    pub http: crate::http::metrics::HttpMetrics,
    pub scrape_up: Family<ScrapeTargetLabels, Gauge>,
    pub scrape_duration: Family<ScrapeTargetLabels, GaugeF>,
    pub scrape_errors: Family<ScrapeErrorLabels, Counter>,
    /// The servers' own metrics, re-exported, and the [`ServerSeries`] derived from them.
    pub scraped: std::sync::Arc<crate::scrape::board::ScrapeBoard>,
    /// Attribution: `llm_server_info`, `inferscope_pod_gpu_assigned` (`crate::attrib::metrics`).
    pub attrib: crate::attrib::metrics::AttribMetrics,
    /// OTLP: spans and log records dropped (queue full, rate limit, export failed), and failed
    /// metric pushes.
    pub export_dropped: Family<SignalLabels, Counter>,
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
            probe_sheds: Family::default(),
            probe_cost: Family::default(),
            probe_family_up: Family::default(),
            dropped: Family::default(),
            cuda_libraries: Gauge::default(),
            tracked_processes: Gauge::default(),
            source_up: Family::default(),
            oom_events: Family::default(),
            forensics_reports: Family::default(),
            forensics_suppressed: Family::default(),
            forensics_dropped: Family::default(),
            forensics_errors: Family::default(),
            gpu_info: Family::default(),
            gpu_hour_price: Family::default(),
            gpu_utilization: Family::default(),
            gpu_memory_utilization: Family::default(),
            gpu_memory_used: Family::default(),
            gpu_memory_free: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_power: Family::default(),
            gpu_power_limit: Family::default(),
            gpu_energy: Family::default(),
            gpu_temperature: Family::default(),
            gpu_sm_clock: Family::default(),
            gpu_memory_clock: Family::default(),
            gpu_throttle_active: Family::default(),
            gpu_pcie_throughput: Family::default(),
            gpu_ecc_errors: Family::default(),
            gpu_xid_errors: Family::default(),
            gpu_idle_seconds: Family::default(),
            gpu_lost: Family::default(),
            nvml_unsupported: Family::default(),
            nvml_errors: Family::default(),
            nvml_samples: Counter::default(),
            gpu_process_memory_used: Family::default(),
            gpu_process_sm_utilization: Family::default(),
            gpu_process_memory_overhead: Family::default(),
            http: Default::default(),
            scrape_up: Family::default(),
            scrape_duration: Family::default(),
            scrape_errors: Family::default(),
            scraped: Default::default(),
            attrib: Default::default(),
            export_dropped: Family::default(),
            registry: Registry::default(),
        };
        m.register_scrape(&mut registry);
        m.register_gpu(&mut registry);
        m.http.register(&mut registry);
        m.attrib.register(&mut registry);
        m.register_forensics(&mut registry);
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
            "Library files the probe budget has shed this CUDA probe on now (stack_sampling: 1 while shed)",
            m.probe_shed.clone(),
        );
        registry.register(
            "inferscope_probe_sheds",
            "Times the probe budget shed a probe (a CUDA symbol on one library, stack_sampling, the http family)",
            m.probe_sheds.clone(),
        );
        registry.register(
            "inferscope_probe_cost_core_share",
            "What the family's probes cost over the last budget tick, as a share of one core",
            m.probe_cost.clone(),
        );
        registry.register(
            "inferscope_probe_family_up",
            "1 when the probe family is loaded and attached, 0 when it is disabled or could not start",
            m.probe_family_up.clone(),
        );
        registry.register(
            "inferscope_dropped",
            "Outside input the agent refused to store or open (what, reason): a tenant's file that is not the mapped one, state past its budget, a label value folded into `other`",
            m.dropped.clone(),
        );
        // Every label kind from the start, at 0 (see `register_forensics`).
        for &(what, reason) in LABELS_DROPPED {
            let _ = m.dropped.get_or_create(&DroppedLabels { what, reason });
        }
        registry.register(
            "inferscope_cuda_libraries",
            "CUDA driver library files being probed",
            m.cuda_libraries.clone(),
        );
        registry.register(
            "inferscope_export_dropped",
            "OTLP: spans and log records dropped (queue full, over the rate, collector \
             unreachable after retries) and metric pushes that failed, by signal",
            m.export_dropped.clone(),
        );
        registry.register(
            "inferscope_tracked_processes",
            "Processes with a live allocation ledger",
            m.tracked_processes.clone(),
        );
        Metrics { registry, ..m }
    }

    fn register_scrape(&self, r: &mut Registry) {
        r.register(
            "inferscope_scrape_up",
            "1 when the last scrape of the server's own /metrics succeeded, else 0",
            self.scrape_up.clone(),
        );
        r.register(
            "inferscope_scrape_duration_seconds",
            "Duration of the last scrape of the server's own /metrics",
            self.scrape_duration.clone(),
        );
        r.register(
            "inferscope_scrape_errors",
            "Failed or partial scrapes of servers' own /metrics, by reason",
            self.scrape_errors.clone(),
        );
        r.register_collector(Box::new(self.scraped.clone()));
    }

    fn register_forensics(&self, r: &mut Registry) {
        // Every kind from the start, at 0: `increase()` in the alerting rules then sees the
        // first event of a kind as a step from 0 instead of a new series with no history.
        for kind in crate::forensics::report::Kind::ALL {
            let labels = KindLabels {
                kind: kind.as_str(),
            };
            let _ = self.oom_events.get_or_create(&labels);
            let _ = self.forensics_reports.get_or_create(&labels);
        }
        r.register(
            "llm_oom_events",
            "Out-of-memory events: cuda (allocation failed), host_oom_kill, gpu_process_crash, xid",
            self.oom_events.clone(),
        );
        r.register(
            "inferscope_forensics_reports",
            "Forensic reports produced, by kind",
            self.forensics_reports.clone(),
        );
        r.register(
            "inferscope_forensics_suppressed",
            "Events that got no report of their own (one per process and kind per window)",
            self.forensics_suppressed.clone(),
        );
        r.register(
            "inferscope_forensics_dropped",
            "Reports dropped because the writer was behind",
            self.forensics_dropped.clone(),
        );
        r.register(
            "inferscope_forensics_errors",
            "Forensic reports that could not be written to disk (kept in memory)",
            self.forensics_errors.clone(),
        );
    }

    fn register_gpu(&self, r: &mut Registry) {
        r.register(
            "inferscope_source_up",
            "1 when a telemetry source works (nvml), 0 when it is unavailable",
            self.source_up.clone(),
        );
        r.register(
            "gpu_info",
            "GPU identity: driver and CUDA versions, MIG mode (value 1)",
            self.gpu_info.clone(),
        );
        r.register(
            "inferscope_gpu_hour_price",
            "Configured price of one hour of this GPU (cost.gpu_hour_price*), for the cost rules",
            self.gpu_hour_price.clone(),
        );
        r.register(
            "gpu_utilization",
            "Fraction of the last sample period a kernel was running (NVML), 0-1",
            self.gpu_utilization.clone(),
        );
        r.register(
            "gpu_memory_utilization",
            "Fraction of the last sample period device memory was read or written (NVML), 0-1",
            self.gpu_memory_utilization.clone(),
        );
        r.register(
            "gpu_memory_used_bytes",
            "Device memory in use (NVML)",
            self.gpu_memory_used.clone(),
        );
        r.register(
            "gpu_memory_free_bytes",
            "Device memory free (NVML)",
            self.gpu_memory_free.clone(),
        );
        r.register(
            "gpu_memory_total_bytes",
            "Device memory installed (NVML)",
            self.gpu_memory_total.clone(),
        );
        r.register(
            "gpu_power_watts",
            "Power draw (NVML)",
            self.gpu_power.clone(),
        );
        r.register(
            "gpu_power_limit_watts",
            "Enforced power limit (NVML)",
            self.gpu_power_limit.clone(),
        );
        r.register(
            "gpu_energy_joules",
            "Energy consumed since the driver was loaded (NVML)",
            self.gpu_energy.clone(),
        );
        r.register(
            "gpu_temperature_celsius",
            "GPU die temperature (NVML)",
            self.gpu_temperature.clone(),
        );
        r.register(
            "gpu_sm_clock_hertz",
            "SM clock (NVML)",
            self.gpu_sm_clock.clone(),
        );
        r.register(
            "gpu_memory_clock_hertz",
            "Memory clock (NVML)",
            self.gpu_memory_clock.clone(),
        );
        r.register(
            "gpu_throttle_active",
            "1 while a clock event (throttle) reason is active (NVML), per reason",
            self.gpu_throttle_active.clone(),
        );
        r.register(
            "gpu_pcie_throughput_bytes_per_second",
            "PCIe throughput over the last 20 ms (NVML), per direction",
            self.gpu_pcie_throughput.clone(),
        );
        r.register(
            "gpu_ecc_errors",
            "ECC errors since the driver was loaded (NVML), corrected and uncorrected",
            self.gpu_ecc_errors.clone(),
        );
        r.register(
            "gpu_xid_errors",
            "XID critical errors (NVML events), per XID code",
            self.gpu_xid_errors.clone(),
        );
        r.register(
            "gpu_idle_seconds",
            "Time the GPU spent at 0 % utilization, from the samples (idle-cost accounting)",
            self.gpu_idle_seconds.clone(),
        );
        r.register(
            "inferscope_gpu_lost",
            "1 once NVML reports the GPU lost (fallen off the bus)",
            self.gpu_lost.clone(),
        );
        r.register(
            "inferscope_nvml_unsupported",
            "1 for NVML calls the GPU or library does not support; they are no longer made",
            self.nvml_unsupported.clone(),
        );
        r.register(
            "inferscope_nvml_errors",
            "NVML calls that failed, per call",
            self.nvml_errors.clone(),
        );
        r.register(
            "inferscope_nvml_samples",
            "Sampling rounds over all GPUs",
            self.nvml_samples.clone(),
        );
        r.register(
            "gpu_process_memory_used_bytes",
            "Device memory the driver charges a process (NVML running compute processes)",
            self.gpu_process_memory_used.clone(),
        );
        r.register(
            "gpu_process_sm_utilization",
            "SM utilization of a process over the last sample (NVML process samples), 0-1",
            self.gpu_process_sm_utilization.clone(),
        );
        r.register(
            "gpu_process_memory_overhead_bytes",
            "NVML's bytes for a process minus its allocation ledger: context, library workspaces, \
             allocations made before the agent started",
            self.gpu_process_memory_overhead.clone(),
        );
    }

    /// Counts outside input not kept as it came (a label value folded into `other`, ...).
    pub fn dropped(&self, what: &'static str, reason: &'static str) {
        self.dropped
            .get_or_create(&DroppedLabels { what, reason })
            .inc();
    }

    /// Counts an event given up before it reached its stage (an undecodable record, one
    /// no stage takes), by why.
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

//! The registry every stage's metric families go into, the agent's own health counters that
//! every stage shares (events, drops, sources up, export drops), and the exposition.
//!
//! Each stage owns its families in its own `metrics` module: a struct of families that holds
//! this core for the shared counters, made and registered by `new(&core)`. The wiring
//! (`crate::agent`) makes them all before any stage starts, so `/metrics` lists every family from the
//! start, whether or not its stage runs. Names as in docs/metrics.md. Counters are registered
//! without `_total`: the OpenMetrics encoder appends it.

use std::sync::{atomic::AtomicU64, Mutex, MutexGuard, PoisonError};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub type GaugeF = Gauge<f64, AtomicU64>;
pub type CounterF = Counter<f64, AtomicU64>;

pub use crate::labels::{KindLabels, ReasonLabels, SourceLabels};

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

/// `inferscope_discovery_proc_reads_total`: which of a process's `/proc` files discovery read.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcFileLabels {
    /// `maps`, `cmdline`, `net_tcp` or `net_unix`.
    pub file: &'static str,
}

/// Kinds of [`Metrics::dropped`] exported from the start, at 0: label values folded into
/// `other` (or `-1`) because they came from outside.
pub const LABELS_DROPPED: &[(&str, &str)] = &[
    ("model_label", "unserved"),
    ("model_label", "limit"),
    ("error_label", "unknown_code"),
    ("gpu_label", "unknown_device"),
];

pub struct Metrics {
    /// Behind a lock so that stages can add their families to a core that is already
    /// shared; registration happens at start, encoding per scrape.
    registry: Mutex<Registry>,
    pub events: Family<SourceLabels, Counter>,
    pub events_lost: Family<SourceLabels, Counter>,
    pub events_dropped: Family<ReasonLabels, Counter>,
    pub dropped: Family<DroppedLabels, Counter>,
    pub source_up: Family<SourceLabels, Gauge>,
    /// OTLP: spans and log records dropped (queue full, rate limit, export failed), and failed
    /// metric pushes.
    pub export_dropped: Family<SignalLabels, Counter>,
    /// `/proc` files of other processes read to discover drivers and servers: a cost that
    /// must follow what changes on the node, not how much runs on it.
    pub proc_reads: Family<ProcFileLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            events: Family::default(),
            events_lost: Family::default(),
            events_dropped: Family::default(),
            dropped: Family::default(),
            source_up: Family::default(),
            export_dropped: Family::default(),
            proc_reads: Family::default(),
        };
        let mut r = m.registry();
        r.register(
            "inferscope_events",
            "Events received from the probes, by source",
            m.events.clone(),
        );
        r.register(
            "inferscope_events_lost",
            "Events the probes could not deliver (ring buffer full), by source",
            m.events_lost.clone(),
        );
        r.register(
            "inferscope_events_dropped",
            "Events received but not used, by reason",
            m.events_dropped.clone(),
        );
        r.register(
            "inferscope_dropped",
            "Outside input the agent refused to store or open (what, reason): a tenant's file that is not the mapped one, state past its budget, a label value folded into `other`",
            m.dropped.clone(),
        );
        // Every label kind from the start, at 0: `increase()` then sees the first drop of a
        // kind as a step from 0 instead of a new series with no history.
        for &(what, reason) in LABELS_DROPPED {
            let _ = m.dropped.get_or_create(&DroppedLabels { what, reason });
        }
        r.register(
            "inferscope_source_up",
            "1 when a telemetry source works (nvml), 0 when it is unavailable",
            m.source_up.clone(),
        );
        r.register(
            "inferscope_export_dropped",
            "OTLP: spans and log records dropped (queue full, over the rate, collector \
             unreachable after retries) and metric pushes that failed, by signal",
            m.export_dropped.clone(),
        );
        r.register(
            "inferscope_discovery_proc_reads",
            "Files of other processes discovery read (maps for CUDA drivers, cmdline, net_tcp and \
             net_unix for servers), by file: once per process at start, then only for the processes \
             the kernel's events name",
            m.proc_reads.clone(),
        );
        for file in ["maps", "cmdline", "net_tcp", "net_unix"] {
            let _ = m.proc_reads.get_or_create(&ProcFileLabels { file });
        }
        drop(r);
        m
    }

    /// Counts a read of another process's `/proc/<pid>/<file>` by discovery.
    pub fn proc_read(&self, file: &'static str) {
        self.proc_reads
            .get_or_create(&ProcFileLabels { file })
            .inc();
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a stage's families (its `metrics::…Metrics::new`), or a benchmark's.
    pub fn register_with(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry());
    }

    /// Runs `f` over the registry (the OTLP push reads a snapshot of it).
    pub fn read<R>(&self, f: impl FnOnce(&Registry) -> R) -> R {
        f(&self.registry())
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
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

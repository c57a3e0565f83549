//! The probe families' own series: what is attached, what the budget shed, what they cost.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
};

use crate::metrics::{GaugeF, Metrics};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StackLabels {
    pub why: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrapLabels {
    pub trap: &'static str,
}

pub struct ProbeMetrics {
    /// The shared counters (events lost, outside input dropped).
    pub core: Arc<Metrics>,
    pub probe_attached: Family<ProbeLabels, Gauge>,
    pub probe_shed: Family<ProbeLabels, Gauge>,
    pub probe_sheds: Family<ProbeLabels, Counter>,
    pub probe_cost: Family<FamilyLabels, GaugeF>,
    pub probe_family_up: Family<FamilyLabels, Gauge>,
    pub cuda_libraries: Gauge,
    /// User stack walks of CUDA calls, by why each was taken.
    pub cuda_stacks: Family<StackLabels, Counter>,
    /// Watched processes whose OpenSSL is probed.
    pub tls_processes: Gauge,
    /// OpenSSL calls the TLS uprobes trapped, by the kind of their entry trap.
    pub tls_calls: Family<TrapLabels, Counter>,
    /// Processes stopped at their mapping of an unprobed driver until it was attached.
    pub openers_held: Counter,
    pub opener_hold_seconds: Histogram,
}

impl ProbeMetrics {
    pub fn new(core: &Arc<Metrics>) -> Arc<Self> {
        let m = Self {
            core: core.clone(),
            probe_attached: Family::default(),
            probe_shed: Family::default(),
            probe_sheds: Family::default(),
            probe_cost: Family::default(),
            probe_family_up: Family::default(),
            cuda_libraries: Gauge::default(),
            cuda_stacks: Family::default(),
            tls_processes: Gauge::default(),
            tls_calls: Family::default(),
            openers_held: Counter::default(),
            // 0.5 ms .. ~4 s.
            opener_hold_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        };
        core.register_with(|r| {
            r.register(
                "inferscope_probe_attached",
                "Library files a probe is attached to",
                m.probe_attached.clone(),
            );
            r.register(
                "inferscope_probe_shed",
                "Library files the probe budget has shed this CUDA probe on now (stack_sampling: 1 while shed)",
                m.probe_shed.clone(),
            );
            r.register(
                "inferscope_probe_sheds",
                "Times the probe budget shed a probe (a CUDA symbol on one library, stack_sampling, the http family)",
                m.probe_sheds.clone(),
            );
            r.register(
                "inferscope_probe_cost_core_share",
                "What the family's probes cost over the last budget tick, as a share of one core",
                m.probe_cost.clone(),
            );
            r.register(
                "inferscope_probe_family_up",
                "1 when the probe family is loaded and attached, 0 when it is disabled or could not start",
                m.probe_family_up.clone(),
            );
            r.register(
                "inferscope_cuda_libraries",
                "CUDA driver library files being probed",
                m.cuda_libraries.clone(),
            );
            r.register(
                "inferscope_cuda_stacks",
                "User stack walks of CUDA calls, by why each was taken: sampled (below probes.stack_threshold_bytes, by the byte sampler), threshold (every allocation at or above it), failure (a failing call; at most one per process per ms), missed (walks of any kind that stored no stack: the stack table full or the walk failed)",
                m.cuda_stacks.clone(),
            );
            r.register(
                "inferscope_http_tls_processes",
                "Watched processes whose OpenSSL is probed: the TLS they terminate is read as plaintext",
                m.tls_processes.clone(),
            );
            r.register(
                "inferscope_http_tls_calls",
                "OpenSSL calls of watched processes the TLS uprobes trapped, by the kind of their entry probe's trap (what the http family's budget prices them at)",
                m.tls_calls.clone(),
            );
            r.register(
                "inferscope_probe_openers_held",
                "Processes stopped (SIGSTOP) as they mapped a CUDA driver the agent had not probed, until its probes were attached (probes.hold_openers)",
                m.openers_held.clone(),
            );
            r.register(
                "inferscope_probe_opener_hold_seconds",
                "How long each held opener was stopped",
                m.opener_hold_seconds.clone(),
            );
        });
        Arc::new(m)
    }
}

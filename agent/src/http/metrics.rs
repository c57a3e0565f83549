//! The `http` family's metrics (names as in docs/metrics.md), registered into the agent's
//! registry by [`HttpMetrics::register`].

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::metrics::Metrics;

pub use crate::labels::KindLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelStatusLabels {
    pub model: String,
    pub status_code: String,
    /// `http1`, `h2` or `grpc`.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelErrorLabels {
    pub model: String,
    pub error_type: &'static str,
    pub protocol: &'static str,
}

/// A call from a server's front end to its model workers (`super::engine`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineCallLabels {
    pub model: String,
    pub method: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineMethodLabels {
    pub model: String,
    pub method: &'static str,
}

type Hist = Family<ModelLabels, Histogram, fn() -> Histogram>;

/// End-to-end latency: 5 ms … 10 min.
const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];
/// Time to first token: 1 ms … 1 min.
const TTFT: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Gaps between tokens: 1 ms … 2.5 s.
const TPOT: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 1.0, 2.5,
];

/// A worker's batch step: 0.5 ms … 5 min (a `Decode` takes milliseconds, a `Warmup` minutes).
const ENGINE: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

fn engine() -> Histogram {
    Histogram::new(ENGINE.iter().copied())
}
/// Requests per batch step: 1, 2, 4 … 1024.
fn batch() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 2.0, 11,
    ))
}
fn latency() -> Histogram {
    Histogram::new(LATENCY.iter().copied())
}
fn ttft() -> Histogram {
    Histogram::new(TTFT.iter().copied())
}
fn tpot() -> Histogram {
    Histogram::new(TPOT.iter().copied())
}
/// Tokens per request: 1, 4, 16 … 262144.
fn tokens() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 4.0, 10,
    ))
}

pub struct HttpMetrics {
    /// The shared counters (events by source, outside input dropped).
    pub core: Arc<Metrics>,
    pub requests: Family<ModelStatusLabels, Counter>,
    pub errors: Family<ModelErrorLabels, Counter>,
    pub latency: Hist,
    pub ttft: Hist,
    pub tpot: Hist,
    pub tokens_input: Family<ModelLabels, Counter>,
    pub tokens_output: Family<ModelLabels, Counter>,
    pub request_input_tokens: Hist,
    pub request_output_tokens: Hist,
    pub in_flight: Family<ModelLabels, Gauge>,
    /// Calls to model workers (TGI's shards) by method and status, and their durations.
    pub engine_calls: Family<EngineCallLabels, Counter>,
    pub engine_duration: Family<EngineMethodLabels, Histogram, fn() -> Histogram>,
    pub engine_decode_batch: Hist,
    /// Bad input on watched connections, by kind.
    pub bad_input: Family<KindLabels, Counter>,
    pub connections: Gauge,
    /// Bytes of parser state all connections hold (charged to `http.state_budget_bytes`).
    pub state_bytes: Gauge,
    pub watched_processes: Gauge,
    /// GPU energy and time per model (`super::gpu_cost`).
    pub cost: super::gpu_cost::CostMetrics,
}

impl HttpMetrics {
    pub fn new(core: &Arc<Metrics>) -> Arc<Self> {
        let m = Self {
            core: core.clone(),
            requests: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(latency),
            ttft: Family::new_with_constructor(ttft),
            tpot: Family::new_with_constructor(tpot),
            tokens_input: Family::default(),
            tokens_output: Family::default(),
            request_input_tokens: Family::new_with_constructor(tokens),
            request_output_tokens: Family::new_with_constructor(tokens),
            in_flight: Family::default(),
            engine_calls: Family::default(),
            engine_duration: Family::new_with_constructor(engine),
            engine_decode_batch: Family::new_with_constructor(batch),
            bad_input: Family::default(),
            connections: Gauge::default(),
            state_bytes: Gauge::default(),
            watched_processes: Gauge::default(),
            cost: Default::default(),
        };
        core.register_with(|r| m.register(r));
        Arc::new(m)
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "llm_gpu_energy_joules",
            "GPU energy attributed to each model: each GPU's energy per sampling interval split \
             between the processes on it, then between a server's models by the output tokens \
             each produced (docs/metrics.md)",
            self.cost.energy.clone(),
        );
        r.register(
            "llm_gpu_seconds",
            "GPU busy seconds (utilization × interval) attributed to each model, split as \
             llm_gpu_energy_joules",
            self.cost.seconds.clone(),
        );
        r.register(
            "inferscope_gpu_unattributed_energy_joules",
            "GPU energy of processes that belong to no watched inference server, and of \
             intervals with no process on the GPU",
            self.cost.unattributed_energy.clone(),
        );
        r.register(
            "inferscope_gpu_unattributed_seconds",
            "GPU busy seconds not attributed to a model, as inferscope_gpu_unattributed_energy_joules",
            self.cost.unattributed_seconds.clone(),
        );
        r.register(
            "inferscope_gpu_cost_splits",
            "GPU sampling intervals split between the processes on the GPU, by method: \
             process_utilization, memory, equal, alone, no_process",
            self.cost.splits.clone(),
        );
        r.register(
            "llm_requests",
            "Requests answered by inference servers (on the wire), by model and status code",
            self.requests.clone(),
        );
        r.register(
            "llm_request_errors",
            "Failed requests by model and error type (http_4xx, http_5xx, rate_limited, \
             context_length, timeout, connection_reset, untracked)",
            self.errors.clone(),
        );
        r.register(
            "llm_latency_seconds",
            "Request start (first byte in) to the end of the response (last byte out)",
            self.latency.clone(),
        );
        r.register(
            "llm_time_to_first_token_seconds",
            "Request start to the first token event of a streamed response",
            self.ttft.clone(),
        );
        r.register(
            "llm_time_per_output_token_seconds",
            "Gaps between consecutive token events of streamed responses",
            self.tpot.clone(),
        );
        r.register(
            "llm_tokens_input",
            "Prompt tokens from the responses' usage",
            self.tokens_input.clone(),
        );
        r.register(
            "llm_tokens_output",
            "Output tokens: the responses' usage, else counted stream events",
            self.tokens_output.clone(),
        );
        r.register(
            "llm_request_input_tokens",
            "Prompt tokens per request (from usage)",
            self.request_input_tokens.clone(),
        );
        r.register(
            "llm_request_output_tokens",
            "Output tokens per request",
            self.request_output_tokens.clone(),
        );
        r.register(
            "llm_requests_in_flight",
            "Requests read in full and not yet answered in full",
            self.in_flight.clone(),
        );
        r.register(
            "llm_engine_calls",
            "Calls from a server's front end to its model workers (TGI's router to its shards), \
             by method (Prefill, Decode, ...) and status; not counted in llm_requests",
            self.engine_calls.clone(),
        );
        r.register(
            "llm_engine_call_duration_seconds",
            "Time of each call to a model worker, from its request's first byte to its \
             response's end: the time of a Prefill or Decode step of a batch",
            self.engine_duration.clone(),
        );
        r.register(
            "llm_engine_decode_batch_size",
            "Requests in each Decode step a server's front end sent its model workers (TGI's \
             router to its shards), from the call's request",
            self.engine_decode_batch.clone(),
        );
        r.register(
            "inferscope_http_bad_input",
            "Bytes on watched connections the HTTP parser could not follow, by kind",
            self.bad_input.clone(),
        );
        r.register(
            "inferscope_http_connections",
            "Watched connections with parser state",
            self.connections.clone(),
        );
        r.register(
            "inferscope_http_state_bytes",
            "Bytes of parser state the watched connections hold (bounded by http.state_budget_bytes)",
            self.state_bytes.clone(),
        );
        r.register(
            "inferscope_http_watched_processes",
            "Processes whose sockets the http probes watch",
            self.watched_processes.clone(),
        );
    }
}

//! Traces: one server span per inference request seen on the wire, built from the finished
//! exchange (its CLOCK_MONOTONIC instants turned into wall-clock time), with an event at the
//! first token and the GPUs' state at the request's start and end (from the NVML ring).

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::KeyValue,
    resource::v1::Resource,
    trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status},
};

use super::kv;
use crate::{
    gpu::{history::GpuHistory, GpuSample},
    http::traceparent::TraceParent,
};

/// What the HTTP tracker hands over for one finished request (owned, no prompt text).
#[derive(Clone, Debug)]
pub struct RequestSpan {
    pub model: String,
    /// `vllm`, `tgi`, ... (from discovery), when known.
    pub server: Option<&'static str>,
    /// The server's listening port, when discovery found it.
    pub port: Option<u16>,
    pub method: String,
    pub route: String,
    pub status: Option<u16>,
    pub error: Option<&'static str>,
    pub pid: u32,
    pub start_ns: u64,
    pub first_token_ns: Option<u64>,
    pub end_ns: u64,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub stream: bool,
    pub parent: Option<TraceParent>,
    /// The server's pod (attribution); empty outside Kubernetes.
    pub workload: crate::attrib::WorkloadLabels,
}

/// `gen_ai.operation.name` from the route (the OpenAI and TGI routes the parser knows).
pub fn operation(route: &str) -> &'static str {
    if route.ends_with("/chat/completions") {
        "chat"
    } else if route.ends_with("/completions") || route.starts_with("/generate") {
        "text_completion"
    } else if route.ends_with("/embeddings") || route == "/embed" {
        "embeddings"
    } else {
        "inference"
    }
}

/// Converts CLOCK_MONOTONIC instants to Unix nanoseconds by the offset between the two
/// clocks now (both are read back to back; NTP slews are not followed within a batch).
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    offset_ns: i128,
}

impl WallClock {
    pub fn now() -> Self {
        let mono = crate::clock::monotonic_ns() as i128;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Self {
            offset_ns: wall - mono,
        }
    }

    pub fn fixed(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    pub fn unix_nano(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).max(0) as u64
    }
}

/// Ids for spans without a parent: random, never zero.
pub fn new_ids(parent: Option<&TraceParent>) -> ([u8; 16], [u8; 8]) {
    let trace = parent.map_or_else(
        || loop {
            let t: [u8; 16] = rand::random();
            if t != [0; 16] {
                break t;
            }
        },
        |p| p.trace_id,
    );
    let span = loop {
        let s: [u8; 8] = rand::random();
        if s != [0; 8] {
            break s;
        }
    };
    (trace, span)
}

/// The GPUs a span is annotated with: every GPU the ring knows, at most this many.
const MAX_GPUS: u32 = 16;

fn gpu_event(s: &GpuSample, phase: &'static str, time: u64) -> span::Event {
    let mut attributes = vec![
        kv("inferscope.phase", phase),
        kv("hw.id", s.gpu.to_string()),
    ];
    if let Some(u) = s.utilization {
        attributes.push(kv("hw.gpu.utilization", u as f64 / 100.0));
    }
    if let Some(m) = s.memory_used {
        attributes.push(kv("hw.gpu.memory.usage", m as i64));
    }
    if let Some(t) = s.temperature_c {
        attributes.push(kv("hw.temperature", t as i64));
    }
    if let Some(p) = s.power_mw {
        attributes.push(kv("hw.power", p as f64 / 1000.0));
    }
    span::Event {
        time_unix_nano: time,
        name: "inferscope.gpu.state".into(),
        attributes,
        ..Default::default()
    }
}

pub fn span(r: &RequestSpan, clock: WallClock, history: Option<&GpuHistory>) -> Span {
    let op = operation(&r.route);
    let (trace_id, span_id) = new_ids(r.parent.as_ref());
    let mut attributes: Vec<KeyValue> = vec![
        kv("gen_ai.operation.name", op),
        kv("gen_ai.request.model", r.model.as_str()),
        kv("http.request.method", r.method.as_str()),
        kv("url.path", r.route.as_str()),
        kv("process.pid", r.pid as i64),
        kv("inferscope.stream", r.stream),
    ];
    if let Some(s) = r.server {
        attributes.push(kv("inferscope.server", s));
    }
    if let Some(p) = r.port {
        attributes.push(kv("server.port", i64::from(p)));
    }
    if let Some(s) = r.status {
        attributes.push(kv("http.response.status_code", s as i64));
    }
    if let Some(t) = r.input_tokens {
        attributes.push(kv("gen_ai.usage.input_tokens", t as i64));
    }
    if let Some(t) = r.output_tokens {
        attributes.push(kv("gen_ai.usage.output_tokens", t as i64));
    }
    if let Some(e) = r.error {
        attributes.push(kv("error.type", e));
    }
    let w = &r.workload;
    for (key, value) in [
        ("k8s.node.name", &w.node),
        ("k8s.namespace.name", &w.namespace),
        ("k8s.pod.name", &w.pod),
        ("k8s.container.name", &w.container),
    ] {
        if !value.is_empty() {
            attributes.push(kv(key, value.as_str()));
        }
    }
    let mut events = Vec::new();
    if let Some(first) = r.first_token_ns {
        events.push(span::Event {
            time_unix_nano: clock.unix_nano(first),
            name: "gen_ai.first_token".into(),
            attributes: vec![kv(
                "gen_ai.server.time_to_first_token",
                first.saturating_sub(r.start_ns) as f64 / 1e9,
            )],
            ..Default::default()
        });
    }
    if let Some(h) = history {
        for (phase, at) in [("start", r.start_ns), ("end", r.end_ns)] {
            for gpu in 0..MAX_GPUS {
                match h.at(gpu, at) {
                    Some(s) => events.push(gpu_event(&s, phase, clock.unix_nano(at))),
                    None if h.identity(gpu).is_none() => break,
                    None => {}
                }
            }
        }
    }
    let failed = r.error.is_some() || r.status.is_some_and(|s| s >= 500);
    Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        parent_span_id: r.parent.map(|p| p.parent_id.to_vec()).unwrap_or_default(),
        flags: r.parent.map_or(1, |p| u32::from(p.flags)) | 0x100,
        name: format!("{op} {}", r.model),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: clock.unix_nano(r.start_ns),
        end_time_unix_nano: clock.unix_nano(r.end_ns.max(r.start_ns)),
        attributes,
        events,
        status: failed.then(|| Status {
            code: status::StatusCode::Error as i32,
            message: r.error.unwrap_or("").to_string(),
        }),
        ..Default::default()
    }
}

pub fn request(spans: Vec<Span>, resource: &[(String, String)]) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| kv(k, v.as_str())).collect(),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(super::metrics::scope()),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> RequestSpan {
        RequestSpan {
            model: "llama".into(),
            server: Some("vllm"),
            port: Some(8000),
            method: "POST".into(),
            route: "/v1/chat/completions".into(),
            status: Some(200),
            error: None,
            pid: 42,
            start_ns: 1_000,
            first_token_ns: Some(5_000),
            end_ns: 9_000,
            input_tokens: Some(12),
            output_tokens: Some(3),
            stream: true,
            parent: None,
            workload: crate::attrib::WorkloadLabels {
                node: "n1".into(),
                namespace: "llm".into(),
                pod: "vllm-0".into(),
                container: String::new(),
            },
        }
    }

    fn string(s: &Span, k: &str) -> Option<String> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        s.attributes.iter().find(|a| a.key == k).and_then(|a| {
            match a.value.as_ref()?.value.as_ref()? {
                Value::StringValue(v) => Some(v.clone()),
                _ => None,
            }
        })
    }

    fn int(s: &Span, k: &str) -> Option<i64> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        s.attributes.iter().find(|a| a.key == k).and_then(|a| {
            match a.value.as_ref()?.value.as_ref()? {
                Value::IntValue(i) => Some(*i),
                _ => None,
            }
        })
    }

    #[test]
    fn a_span_per_request() {
        let history = GpuHistory::new(60);
        history.set_identity(0, "GPU-0".into(), "H100".into());
        history.push(GpuSample {
            gpu: 0,
            ts_ns: 500,
            utilization: Some(40),
            memory_used: Some(1 << 30),
            temperature_c: Some(55),
            ..Default::default()
        });
        let s = span(&req(), WallClock::fixed(1_000_000), Some(&history));
        assert_eq!(s.name, "chat llama");
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        assert_eq!(s.start_time_unix_nano, 1_001_000);
        assert_eq!(s.end_time_unix_nano, 1_009_000);
        assert_eq!(int(&s, "gen_ai.usage.input_tokens"), Some(12));
        assert_eq!(int(&s, "gen_ai.usage.output_tokens"), Some(3));
        assert_eq!(int(&s, "http.response.status_code"), Some(200));
        assert_eq!(int(&s, "server.port"), Some(8000));
        assert_eq!(string(&s, "k8s.pod.name").as_deref(), Some("vllm-0"));
        assert_eq!(string(&s, "k8s.namespace.name").as_deref(), Some("llm"));
        assert_eq!(string(&s, "k8s.container.name"), None, "empty: left out");
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.trace_id.len(), 16);
        assert_eq!(s.events[0].name, "gen_ai.first_token");
        assert_eq!(s.events[0].time_unix_nano, 1_005_000);
        let gpu: Vec<_> = s.events[1..].iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            gpu,
            vec!["inferscope.gpu.state"; 2],
            "GPU 0 at start and end"
        );
        assert!(s.status.is_none());
    }

    #[test]
    fn a_traceparent_becomes_the_parent() {
        let p =
            TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let mut r = req();
        r.parent = Some(p);
        r.error = Some("http_5xx");
        r.status = Some(503);
        let s = span(&r, WallClock::fixed(0), None);
        assert_eq!(s.trace_id, p.trace_id.to_vec());
        assert_eq!(s.parent_span_id, p.parent_id.to_vec());
        assert_ne!(s.span_id, p.parent_id.to_vec());
        assert_eq!(s.status.unwrap().code, status::StatusCode::Error as i32);
        assert_eq!(operation("/generate_stream"), "text_completion");
        assert_eq!(operation("/v1/completions"), "text_completion");
    }
}

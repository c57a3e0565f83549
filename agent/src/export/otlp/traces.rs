//! Traces: one server span per inference request seen on the wire, built from the finished
//! exchange (its CLOCK_MONOTONIC instants turned into wall-clock time), with an event at the
//! first token and the GPUs' state at the request's start and end (from the NVML ring).

use std::{borrow::Cow, time::SystemTime};

use opentelemetry::{
    trace::{Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    KeyValue,
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::{
    gpu::{history::GpuHistory, GpuSample},
    http::{finished::RequestFinished, traceparent::TraceParent},
};

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
    pub fn system_time(&self, mono_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(self.unix_nano(mono_ns))
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

fn gpu_event(s: &GpuSample, phase: &'static str, time: SystemTime) -> Event {
    let mut attributes = vec![
        KeyValue::new("inferscope.phase", phase),
        KeyValue::new("hw.id", s.gpu.to_string()),
    ];
    if let Some(u) = s.utilization {
        attributes.push(KeyValue::new("hw.gpu.utilization", u as f64 / 100.0));
    }
    if let Some(m) = s.memory_used {
        attributes.push(KeyValue::new("hw.gpu.memory.usage", m as i64));
    }
    if let Some(t) = s.temperature_c {
        attributes.push(KeyValue::new("hw.temperature", t as i64));
    }
    if let Some(p) = s.power_mw {
        attributes.push(KeyValue::new("hw.power", p as f64 / 1000.0));
    }
    Event::new("inferscope.gpu.state", time, attributes, 0)
}

/// The span of one finished request, with its own ids (a child of the caller's
/// `traceparent` when there was one) and the times seen on the wire.
pub fn span(r: &RequestFinished, clock: WallClock, history: Option<&GpuHistory>) -> SpanData {
    let op = operation(&r.route);
    let (trace_id, span_id) = new_ids(r.parent.as_ref());
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", op),
        KeyValue::new("gen_ai.request.model", r.model.clone()),
        KeyValue::new("http.request.method", r.method.clone()),
        KeyValue::new("url.path", r.route.clone()),
        KeyValue::new("process.pid", i64::from(r.pid)),
        KeyValue::new("inferscope.stream", r.stream),
    ];
    if let Some(s) = r.server {
        attributes.push(KeyValue::new("inferscope.server", s));
    }
    if let Some(p) = r.port {
        attributes.push(KeyValue::new("server.port", i64::from(p)));
    }
    if let Some(s) = r.status {
        attributes.push(KeyValue::new("http.response.status_code", i64::from(s)));
    }
    // The semantic conventions' names: `network.protocol.*` for HTTP, `rpc.*` for gRPC.
    match r.protocol {
        "grpc" => {
            attributes.push(KeyValue::new("rpc.system", "grpc"));
            if let Some((service, method)) = r.route.trim_start_matches('/').split_once('/') {
                attributes.push(KeyValue::new("rpc.service", service.to_string()));
                attributes.push(KeyValue::new("rpc.method", method.to_string()));
            }
            if let Some(code) = r.grpc_status {
                attributes.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
            }
        }
        "h2" => {
            attributes.push(KeyValue::new("network.protocol.name", "http"));
            attributes.push(KeyValue::new("network.protocol.version", "2"));
        }
        _ => {
            attributes.push(KeyValue::new("network.protocol.name", "http"));
            attributes.push(KeyValue::new("network.protocol.version", "1.1"));
        }
    }
    if let Some(t) = r.input_tokens {
        attributes.push(KeyValue::new("gen_ai.usage.input_tokens", t as i64));
    }
    if let Some(t) = r.output_tokens {
        attributes.push(KeyValue::new("gen_ai.usage.output_tokens", t as i64));
    }
    if let Some(e) = r.error {
        attributes.push(KeyValue::new("error.type", e));
    }
    let w = &r.workload;
    for (key, value) in [
        ("k8s.node.name", &w.node),
        ("k8s.namespace.name", &w.namespace),
        ("k8s.pod.name", &w.pod),
        ("k8s.container.name", &w.container),
    ] {
        if !value.is_empty() {
            attributes.push(KeyValue::new(key, value.clone()));
        }
    }
    let mut events = Vec::new();
    if let Some(first) = r.first_token_ns {
        events.push(Event::new(
            "gen_ai.first_token",
            clock.system_time(first),
            vec![KeyValue::new(
                "gen_ai.server.time_to_first_token",
                first.saturating_sub(r.start_ns) as f64 / 1e9,
            )],
            0,
        ));
    }
    if let Some(h) = history {
        for (phase, at) in [("start", r.start_ns), ("end", r.end_ns)] {
            for gpu in 0..MAX_GPUS {
                match h.at(gpu, at) {
                    Some(s) => events.push(gpu_event(&s, phase, clock.system_time(at))),
                    None if h.identity(gpu).is_none() => break,
                    None => {}
                }
            }
        }
    }
    let failed = r.error.is_some() || r.status.is_some_and(|s| s >= 500);
    let flags = r
        .parent
        .map_or(TraceFlags::SAMPLED, |p| TraceFlags::new(p.flags));
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(trace_id),
            SpanId::from_bytes(span_id),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: r
            .parent
            .map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.parent_id)),
        parent_span_is_remote: r.parent.is_some(),
        span_kind: SpanKind::Server,
        name: Cow::Owned(format!("{op} {}", r.model)),
        start_time: clock.system_time(r.start_ns),
        end_time: clock.system_time(r.end_ns.max(r.start_ns)),
        attributes,
        dropped_attributes_count: 0,
        events: {
            // Non-exhaustive: filled in, not built.
            let mut e = SpanEvents::default();
            e.events = events;
            e
        },
        links: SpanLinks::default(),
        status: if failed {
            Status::error(r.error.unwrap_or(""))
        } else {
            Status::Unset
        },
        instrumentation_scope: super::transport::scope(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> RequestFinished {
        RequestFinished {
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
            protocol: "http1",
            grpc_status: None,
            parent: None,
            workload: crate::labels::WorkloadLabels {
                node: "n1".into(),
                namespace: "llm".into(),
                pod: "vllm-0".into(),
                container: String::new(),
            },
        }
    }

    use opentelemetry_proto::tonic::trace::v1::{span, status, Span};

    /// The span as it goes on the wire.
    fn wire(r: &RequestFinished, clock: WallClock, history: Option<&GpuHistory>) -> Span {
        Span::from(span(r, clock, history))
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
        let s = wire(&req(), WallClock::fixed(1_000_000), Some(&history));
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
        assert_eq!(
            s.status.map(|st| st.code),
            Some(status::StatusCode::Unset as i32)
        );
        assert_eq!(s.flags, 0x101, "sampled; parent known not to be remote");
    }

    #[test]
    fn a_traceparent_becomes_the_parent() {
        let p =
            TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let mut r = req();
        r.parent = Some(p);
        r.error = Some("http_5xx");
        r.status = Some(503);
        let s = wire(&r, WallClock::fixed(0), None);
        assert_eq!(s.trace_id, p.trace_id.to_vec());
        assert_eq!(s.parent_span_id, p.parent_id.to_vec());
        assert_ne!(s.span_id, p.parent_id.to_vec());
        assert_eq!(s.status.unwrap().code, status::StatusCode::Error as i32);
        assert_eq!(s.flags, 0x301, "the caller's flags; the parent is remote");
        assert_eq!(operation("/generate_stream"), "text_completion");
        assert_eq!(operation("/v1/completions"), "text_completion");
    }
}

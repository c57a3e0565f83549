//! Root tier of OTLP export: a real collector (`rotel-agent`, installed from PyPI by
//! `cargo xtask setup`) receives the agent's metrics, spans and log records over gRPC and
//! HTTP/protobuf and prints every item it receives (its debug log, detailed); the tests parse
//! that and compare it with the agent's `/metrics` and the scenario. Over TLS, a terminator in
//! the test (`integration::tls_proxy`) stands in front of the collector.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use cuda_workload::nvml_double_path;
use integration::{
    tls_proxy::{ClientAuth, TestPki, TlsProxy},
    *,
};

/// `rotel-agent` from the `rotel` wheel.
fn rotel_bin() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import rotel, os; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .expect("python3");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && path.exists(),
        "rotel-agent not found (run `cargo xtask setup`, which installs the `rotel` wheel): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// A collector listening on OTLP gRPC and HTTP, printing what it receives.
struct Rotel {
    child: Option<Child>,
    grpc: u16,
    http: u16,
    dir: tempfile::TempDir,
}

impl Rotel {
    fn ports() -> (u16, u16) {
        (free_port(), free_port())
    }

    fn start() -> Rotel {
        let (grpc, http) = Self::ports();
        Self::start_on(grpc, http)
    }

    fn start_on(grpc: u16, http: u16) -> Rotel {
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("out.log")).unwrap();
        let child = Command::new(rotel_bin())
            .arg("start")
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
            .args(["--exporter", "blackhole"])
            .args(["--debug-log", "metrics", "--debug-log", "traces"])
            .args(["--debug-log", "logs", "--debug-log-verbosity", "detailed"])
            .arg("--pid-file")
            .arg(dir.path().join("rotel.pid"))
            .arg("--log-file")
            .arg(dir.path().join("rotel.log"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn rotel-agent");
        let r = Rotel {
            child: Some(child),
            grpc,
            http,
            dir,
        };
        eventually("rotel to listen", Duration::from_secs(20), || {
            (std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", http)).is_ok())
            .then_some(())
        });
        r
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("out.log")).unwrap_or_default()
    }

    fn received(&self) -> Received {
        Received::parse(&self.output())
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One metric point as the collector printed it.
#[derive(Clone, Debug, Default)]
struct Point {
    metric: String,
    unit: String,
    data_type: String,
    attrs: BTreeMap<String, String>,
    value: Option<f64>,
    count: Option<u64>,
    sum: Option<f64>,
}

#[derive(Clone, Debug, Default)]
struct SpanSeen {
    trace_id: String,
    parent_id: String,
    name: String,
    kind: String,
    attrs: BTreeMap<String, String>,
    /// (name, attributes) of each event.
    events: Vec<(String, BTreeMap<String, String>)>,
}

#[derive(Clone, Debug, Default)]
struct LogSeen {
    event_name: String,
    severity: String,
    body: String,
    attrs: BTreeMap<String, String>,
}

/// Everything the collector printed, in order.
#[derive(Debug, Default)]
struct Received {
    points: Vec<Point>,
    spans: Vec<SpanSeen>,
    logs: Vec<LogSeen>,
    resources: Vec<BTreeMap<String, String>>,
}

/// `Str(x)`, `Int(3)`, `Double(0.5)`, `Bool(true)` → `x`, `3`, `0.5`, `true`.
fn unwrap_value(v: &str) -> String {
    match (v.find('('), v.ends_with(')')) {
        (Some(i), true) => v[i + 1..v.len() - 1].to_string(),
        _ => v.to_string(),
    }
}

/// `     -> key: Value` → (key, value).
fn arrow(line: &str) -> Option<(String, String)> {
    let rest = line.trim_start().strip_prefix("-> ")?;
    let (k, v) = rest.split_once(": ")?;
    Some((k.to_string(), unwrap_value(v.trim())))
}

impl Received {
    fn parse(text: &str) -> Received {
        #[derive(PartialEq)]
        enum At {
            None,
            Resource,
            Descriptor,
            PointAttrs,
            SpanAttrs,
            SpanEvent,
            LogAttrs,
        }
        let mut r = Received::default();
        let mut at = At::None;
        let (mut metric, mut unit, mut data_type) = (String::new(), String::new(), String::new());
        // Span and log records both print `Attributes:` and `Trace ID`.
        let mut in_log = false;
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with("ResourceMetrics #")
                || t.starts_with("ResourceSpans #")
                || t.starts_with("ResourceLog")
            {
                r.resources.push(BTreeMap::new());
                in_log = t.starts_with("ResourceLog");
                at = At::None;
            } else if t == "Resource attributes:" {
                at = At::Resource;
            } else if t.starts_with("Metric #") {
                at = At::None;
            } else if t == "Descriptor:" {
                at = At::Descriptor;
            } else if t.starts_with("NumberDataPoints #") || t.starts_with("HistogramDataPoints #")
            {
                r.points.push(Point {
                    metric: metric.clone(),
                    unit: unit.clone(),
                    data_type: data_type.clone(),
                    ..Default::default()
                });
                at = At::None;
            } else if t == "Data point attributes:" {
                at = At::PointAttrs;
            } else if t.starts_with("Span #") {
                r.spans.push(SpanSeen::default());
                in_log = false;
                at = At::None;
            } else if t.starts_with("SpanEvent #") {
                at = At::SpanEvent;
            } else if t.starts_with("LogRecord #") {
                r.logs.push(LogSeen::default());
                in_log = true;
                at = At::None;
            } else if t == "Attributes:" {
                at = if in_log { At::LogAttrs } else { At::SpanAttrs };
            } else if let Some((k, v)) = arrow(line) {
                match at {
                    At::Resource => {
                        if let Some(res) = r.resources.last_mut() {
                            res.insert(k, v);
                        }
                    }
                    At::Descriptor => match k.as_str() {
                        "Name" => metric = v,
                        "Unit" => unit = v,
                        "DataType" => data_type = v,
                        _ => {}
                    },
                    At::PointAttrs => {
                        if let Some(p) = r.points.last_mut() {
                            p.attrs.insert(k, v);
                        }
                    }
                    At::SpanAttrs => {
                        if let Some(s) = r.spans.last_mut() {
                            s.attrs.insert(k, v);
                        }
                    }
                    At::SpanEvent => {
                        if let Some(s) = r.spans.last_mut() {
                            if k == "Name" {
                                s.events.push((v, BTreeMap::new()));
                            } else if let Some(e) = s.events.last_mut() {
                                e.1.insert(k, v);
                            }
                        }
                    }
                    At::LogAttrs => {
                        if let Some(l) = r.logs.last_mut() {
                            l.attrs.insert(k, v);
                        }
                    }
                    At::None => {}
                }
            } else if let Some((k, v)) = t.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                match k {
                    "Value" => {
                        if let Some(p) = r.points.last_mut() {
                            p.value = v.parse().ok();
                        }
                    }
                    "Count" => {
                        if let Some(p) = r.points.last_mut() {
                            p.count = v.parse().ok();
                        }
                    }
                    "Sum" => {
                        if let Some(p) = r.points.last_mut() {
                            p.sum = v.parse().ok();
                        }
                    }
                    "Trace ID" if !in_log => {
                        if let Some(s) = r.spans.last_mut() {
                            s.trace_id = v.to_string();
                        }
                    }
                    "Parent ID" if !in_log => {
                        if let Some(s) = r.spans.last_mut() {
                            s.parent_id = v.to_string();
                        }
                    }
                    "Name" if !in_log => {
                        if let Some(s) = r.spans.last_mut() {
                            s.name = v.to_string();
                        }
                    }
                    "Kind" if !in_log => {
                        if let Some(s) = r.spans.last_mut() {
                            s.kind = v.to_string();
                        }
                    }
                    "EventName" => {
                        if let Some(l) = r.logs.last_mut() {
                            l.event_name = v.to_string();
                        }
                    }
                    "SeverityText" => {
                        if let Some(l) = r.logs.last_mut() {
                            l.severity = v.to_string();
                        }
                    }
                    "Body" => {
                        if let Some(l) = r.logs.last_mut() {
                            l.body = unwrap_value(v);
                        }
                    }
                    _ => {}
                }
            }
        }
        r
    }

    /// The last point of `metric` whose attributes include `want`.
    fn last(&self, metric: &str, want: &[(&str, &str)]) -> Option<&Point> {
        self.points.iter().rev().find(|p| {
            p.metric == metric
                && want
                    .iter()
                    .all(|(k, v)| p.attrs.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

/// One chat completion over a fresh connection; returns the response.
fn chat(
    port: u16,
    model: &str,
    stream: bool,
    max_tokens: u32,
    traceparent: Option<&str>,
) -> String {
    let body = format!(
        r#"{{"model":"{model}","stream":{stream},"max_tokens":{max_tokens},"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"one two three"}}]}}"#
    );
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let tp = traceparent
        .map(|t| format!("traceparent: {t}\r\n"))
        .unwrap_or_default();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-token-ms: 2\r\n{tp}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// One simulated GPU of 1 GiB, warm and busy.
fn sim_gpu() -> SimGpus {
    let gpu = SimGpus::new(1, 1 << 30);
    gpu.control.set_gpu(0, "temperature", 66).unwrap();
    gpu.control.set_gpu(0, "utilization", 42).unwrap();
    gpu.control.set_gpu(0, "power_mw", 123_500).unwrap();
    gpu
}

fn start_agent(args: &[&str], env: &[(String, String)]) -> Agent {
    Agent::start_with_env(args, &str_pairs(env))
}

#[root_test]
fn metrics_over_grpc_equal_the_prometheus_endpoint() {
    let rotel = Rotel::start();
    let server = OpenAiServer::start("stand-in");
    let gpu = sim_gpu();
    let mut env = gpu.agent_env();
    env.extend([
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
            "grpc".to_string(),
        ),
        ("OTEL_METRIC_EXPORT_INTERVAL".to_string(), "300".to_string()),
        (
            "OTEL_RESOURCE_ATTRIBUTES".to_string(),
            "deployment.environment=test".to_string(),
        ),
        ("NODE_NAME".to_string(), "gpu-node-3".to_string()),
    ]);
    let nvml = nvml_double_path().display().to_string();
    let endpoint = format!("http://127.0.0.1:{}", rotel.grpc);
    let agent = start_agent(
        &[
            "--watch-port",
            &server.port.to_string(),
            "--nvml-lib",
            &nvml,
            "--disable-probe",
            "cuda",
            "--otlp-endpoint",
            &endpoint,
        ],
        &env,
    );
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    for i in 0..5 {
        chat(server.port, "llama", i % 2 == 0, 3 + i, None);
    }
    // Other servers on the machine may be discovered too: only model `llama` is ours.
    let llama = [("model", "llama")];
    let s = agent.wait_for("the requests and NVML", |s| {
        s.sum("llm_requests_total", &llama) == 5.0
            && s.sum("llm_requests_in_flight", &llama) == 0.0
            && s.sum("gpu_temperature_celsius", &[("gpu", "0")]) == 66.0
    });
    let want_requests = s.sum(
        "llm_requests_total",
        &[("model", "llama"), ("status_code", "200")],
    );
    let want_count = s.sum("llm_latency_seconds_count", &[("model", "llama")]);
    let want_sum = s.sum("llm_latency_seconds_sum", &[("model", "llama")]);
    let want_out = s.sum("llm_tokens_output_total", &[("model", "llama")]);
    assert_eq!(want_requests, 5.0, "{}", s.text);
    assert_eq!(want_out, (3 + 4 + 5 + 6 + 7) as f64, "{}", s.text);

    // The next pushes carry the same values under the OpenTelemetry names.
    let r = eventually(
        "the collector to receive the values of /metrics",
        Duration::from_secs(20),
        || {
            let r = rotel.received();
            let ok = r
                .last(
                    "inferscope.gen_ai.requests",
                    &[
                        ("gen_ai.request.model", "llama"),
                        ("http.response.status_code", "200"),
                    ],
                )
                .and_then(|p| p.value)
                == Some(want_requests);
            ok.then_some(r)
        },
    );
    let hist = r
        .last(
            "gen_ai.server.request.duration",
            &[("gen_ai.request.model", "llama")],
        )
        .expect("gen_ai.server.request.duration");
    assert_eq!(hist.data_type, "Histogram");
    assert_eq!(hist.unit, "s");
    assert_eq!(hist.count, Some(want_count as u64));
    assert!(
        (hist.sum.unwrap() - want_sum).abs() < 1e-9,
        "{hist:?} vs {want_sum}"
    );
    let out = r
        .last(
            "inferscope.gen_ai.tokens",
            &[
                ("gen_ai.request.model", "llama"),
                ("gen_ai.token.type", "output"),
            ],
        )
        .expect("inferscope.gen_ai.tokens");
    assert_eq!(out.value, Some(want_out));
    assert_eq!(out.data_type, "Sum");
    let temp = r
        .last("hw.temperature", &[("hw.id", "0")])
        .expect("hw.temperature");
    assert_eq!(temp.value, Some(66.0));
    assert_eq!(temp.unit, "Cel");
    assert_eq!(
        r.last("hw.gpu.utilization", &[("hw.id", "0")])
            .and_then(|p| p.value),
        Some(0.42)
    );
    assert_eq!(
        r.last("hw.power", &[("hw.id", "0")]).and_then(|p| p.value),
        Some(123.5)
    );
    // Series without a convention keep their name under inferscope.*.
    assert!(
        r.last("inferscope.http_watched_processes", &[]).is_some(),
        "{:?}",
        r.points.iter().map(|p| &p.metric).collect::<Vec<_>>()
    );
    let res = r.resources.last().expect("a resource");
    assert_eq!(
        res.get("service.name").map(String::as_str),
        Some("inferscope")
    );
    assert!(res.contains_key("service.version"), "{res:?}");
    assert!(res.contains_key("host.name"), "{res:?}");
    assert_eq!(
        res.get("k8s.node.name").map(String::as_str),
        Some("gpu-node-3")
    );
    assert_eq!(
        res.get("deployment.environment").map(String::as_str),
        Some("test")
    );
    assert_eq!(
        agent
            .scrape()
            .sum("inferscope_export_dropped_total", &[("signal", "metrics")]),
        0.0
    );
    assert!(agent.stop().success());
}

#[root_test]
fn one_span_per_request_over_http_with_the_callers_trace() {
    let rotel = Rotel::start();
    let server = OpenAiServer::start("stand-in");
    let endpoint = format!("http://127.0.0.1:{}", rotel.http);
    let gpu = sim_gpu();
    let mut env = gpu.agent_env();
    env.extend([
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
            "http/protobuf".to_string(),
        ),
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), endpoint),
        (
            "INFERSCOPE_OTLP__BATCH_TIMEOUT_MS".to_string(),
            "200".to_string(),
        ),
    ]);
    let nvml = nvml_double_path().display().to_string();
    let agent = start_agent(
        &[
            "--watch-port",
            &server.port.to_string(),
            "--disable-probe",
            "cuda",
            "--nvml-lib",
            &nvml,
        ],
        &env,
    );
    agent.wait_for("NVML", |s| s.sum("gpu_temperature_celsius", &[]) == 66.0);
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let tp = format!("00-{trace}-{parent}-01");
    chat(server.port, "traced", true, 4, Some(&tp));
    for i in 0..3 {
        chat(server.port, "plain", i != 1, 5, None);
    }
    // A bad header is ignored (and counted), the request still gets its span.
    chat(server.port, "plain", true, 5, Some("00-nothex-zz-01"));
    // Other servers on the machine may be discovered too: models `traced` and `plain` are ours.
    let ours = |s: &Scrape, name: &str| {
        s.sum(name, &[("model", "traced")]) + s.sum(name, &[("model", "plain")])
    };
    let s = agent.wait_for("every request", |s| {
        ours(s, "llm_requests_total") == 5.0 && ours(s, "llm_requests_in_flight") == 0.0
    });
    assert_eq!(
        s.sum(
            "inferscope_http_bad_input_total",
            &[("kind", "bad_traceparent")]
        ),
        1.0,
        "{}",
        s.text
    );
    let port = server.port.to_string();
    let r = eventually("five spans", Duration::from_secs(20), || {
        let mut r = rotel.received();
        r.spans
            .retain(|s| s.attrs.get("server.port") == Some(&port));
        (r.spans.len() >= 5).then_some(r)
    });
    assert_eq!(r.spans.len(), 5, "one span per request: {:?}", r.spans);
    let traced: Vec<_> = r.spans.iter().filter(|s| s.name == "chat traced").collect();
    assert_eq!(traced.len(), 1, "{:?}", r.spans);
    let t = traced[0];
    assert_eq!(t.trace_id, trace);
    assert_eq!(t.parent_id, parent);
    assert_eq!(t.kind, "SPAN_KIND_SERVER");
    assert_eq!(t.attrs["gen_ai.request.model"], "traced");
    assert_eq!(t.attrs["http.response.status_code"], "200");
    assert_eq!(t.attrs["server.port"], server.port.to_string());
    assert_eq!(t.attrs["gen_ai.usage.output_tokens"], "4");
    assert_eq!(t.attrs["gen_ai.usage.input_tokens"], "3");
    assert!(
        t.events.iter().any(|e| e.0 == "gen_ai.first_token"),
        "{t:?}"
    );
    // The one simulated GPU's state at the request's start and at its end.
    let gpu: Vec<_> = t
        .events
        .iter()
        .filter(|e| e.0 == "inferscope.gpu.state")
        .map(|e| &e.1)
        .collect();
    assert_eq!(gpu.len(), 2, "{t:?}");
    for (e, phase) in gpu.iter().zip(["start", "end"]) {
        assert_eq!(e["inferscope.phase"], phase);
        assert_eq!(e["hw.id"], "0");
        assert_eq!(e["hw.temperature"], "66");
        assert_eq!(e["hw.gpu.utilization"], "0.42");
    }
    let plain: Vec<_> = r.spans.iter().filter(|s| s.name == "chat plain").collect();
    assert_eq!(plain.len(), 4);
    for p in &plain {
        assert_ne!(p.trace_id, trace);
        assert_eq!(p.parent_id, "", "no parent without a valid traceparent");
        assert_eq!(p.attrs["gen_ai.usage.output_tokens"], "5");
    }
    // The non-streamed request has no token events, the streamed ones have their first.
    assert_eq!(
        plain
            .iter()
            .filter(|p| p.events.iter().any(|e| e.0 == "gen_ai.first_token"))
            .count(),
        3
    );
    let ids: std::collections::HashSet<_> = r.spans.iter().map(|s| &s.trace_id).collect();
    assert_eq!(
        ids.len(),
        5,
        "each request without a parent starts its own trace"
    );
    assert_eq!(
        agent
            .scrape()
            .sum("inferscope_export_dropped_total", &[("signal", "traces")]),
        0.0
    );
    assert!(agent.stop().success());
}

#[root_test]
fn a_cuda_oom_becomes_a_log_record_with_the_report_id() {
    oom_log_record("grpc");
}

#[root_test]
fn a_cuda_oom_becomes_a_log_record_over_http() {
    oom_log_record("http/protobuf");
}

fn oom_log_record(protocol: &str) {
    let rotel = Rotel::start();
    let gpu = sim_gpu();
    let mut env = gpu.agent_env();
    let endpoint = match protocol {
        "grpc" => format!("http://127.0.0.1:{}", rotel.grpc),
        _ => format!("http://127.0.0.1:{}/v1/logs", rotel.http),
    };
    env.extend([
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
            protocol.to_string(),
        ),
        ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT".to_string(), endpoint),
        (
            "INFERSCOPE_OTLP__BATCH_TIMEOUT_MS".to_string(),
            "200".to_string(),
        ),
    ]);
    let lib = Variant::Push.lib_path().display().to_string();
    let nvml = nvml_double_path().display().to_string();
    let agent = start_agent(&["--cuda-lib", &lib, "--nvml-lib", &nvml], &env);
    agent.wait_for("NVML", |s| s.sum("gpu_temperature_celsius", &[]) == 66.0);
    let mut w = gpu.workload(
        "alloc dev=0 size=104857600 count=2; exhaust dev=0 size=134217728; checkpoint name=oom",
    );
    w.proceed();
    let truth = w.truth();
    // Other processes on the machine may use a CUDA double too: only this pid is ours.
    let pid = truth.pid.to_string();
    let forensics = agent.dir.path().join("forensics");
    let id = eventually("the report", Duration::from_secs(20), || {
        let out = Command::new(bin("inferscope"))
            .args(["forensics", "list", "--format", "json", "--forensics-dir"])
            .arg(&forensics)
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.iter().find(|r| r["pid"] == truth.pid)?["id"]
            .as_str()
            .map(str::to_string)
    });
    let ours = |r: &Received, event: &str| -> Vec<LogSeen> {
        r.logs
            .iter()
            .filter(|l| l.event_name == event && l.attrs.get("process.pid") == Some(&pid))
            .cloned()
            .collect()
    };
    let r = eventually("the OOM log record", Duration::from_secs(20), || {
        let r = rotel.received();
        (!ours(&r, "inferscope.oom").is_empty()).then_some(r)
    });
    let oom = ours(&r, "inferscope.oom");
    assert_eq!(oom.len(), 1, "{:?}", r.logs);
    let l = &oom[0];
    assert_eq!(l.attrs["inferscope.report.id"], id);
    assert_eq!(l.attrs["inferscope.report.kind"], "cuda");
    assert_eq!(l.attrs["hw.id"], "0");
    assert_eq!(l.severity, "ERROR");
    assert!(l.body.contains(&pid), "{}", l.body);
    // The failed allocations themselves, rate-limited, as warnings.
    let failures = ours(&r, "inferscope.cuda.alloc.failure");
    assert!(!failures.is_empty(), "{:?}", r.logs);
    assert!(failures.len() <= 10, "rate limit: {}", failures.len());
    assert_eq!(failures[0].severity, "WARN");
    // Only logs were configured: no metrics or spans went out.
    assert!(r.points.is_empty() && r.spans.is_empty());
    drop(w);
    assert!(agent.stop().success());
}

#[root_test]
fn a_collector_down_at_start_then_up_gets_the_data() {
    let (grpc, http) = Rotel::ports();
    let server = OpenAiServer::start("stand-in");
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
            "grpc".to_string(),
        ),
        ("OTEL_METRIC_EXPORT_INTERVAL".to_string(), "300".to_string()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT".to_string(), "500".to_string()),
        (
            "INFERSCOPE_OTLP__BATCH_TIMEOUT_MS".to_string(),
            "200".to_string(),
        ),
    ];
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let agent = start_agent(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--watch-port",
            &server.port.to_string(),
            "--disable-probe",
            "cuda",
        ],
        &env,
    );
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    // While the collector is down: spans are retried, then dropped and counted.
    for _ in 0..2 {
        chat(server.port, "early", true, 3, None);
    }
    let s = agent.wait_for("failed pushes and dropped spans to be counted", |s| {
        s.sum("inferscope_export_dropped_total", &[("signal", "metrics")]) >= 2.0
            && s.sum("inferscope_export_dropped_total", &[("signal", "traces")]) >= 2.0
    });
    // /metrics and /healthz keep serving meanwhile.
    assert_eq!(s.sum("llm_requests_total", &[("model", "early")]), 2.0);
    assert_eq!(http_get(agent.port, "/healthz").map(|r| r.0), Some(200));

    let rotel = Rotel::start_on(grpc, http);
    for _ in 0..3 {
        chat(server.port, "late", true, 3, None);
    }
    let port = server.port.to_string();
    let r = eventually(
        "metrics and spans after the collector came up",
        Duration::from_secs(30),
        || {
            let r = rotel.received();
            let pushed = r
                .last("inferscope.export_dropped", &[("signal", "metrics")])
                .and_then(|p| p.value)
                .is_some_and(|v| v >= 2.0);
            let late = r
                .spans
                .iter()
                .filter(|s| s.name == "chat late" && s.attrs.get("server.port") == Some(&port))
                .count();
            (pushed && late == 3).then_some(r)
        },
    );
    assert_eq!(
        r.resources
            .last()
            .and_then(|res| res.get("service.name"))
            .map(String::as_str),
        Some("inferscope")
    );
    // The cumulative counter carries what happened while the collector was down.
    assert_eq!(
        r.last(
            "inferscope.gen_ai.requests",
            &[("gen_ai.request.model", "early")]
        )
        .and_then(|p| p.value),
        Some(2.0)
    );
    // Once delivered, pushes stop failing: the count stays where it was.
    let dropped = agent
        .scrape()
        .sum("inferscope_export_dropped_total", &[("signal", "metrics")]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        agent
            .scrape()
            .sum("inferscope_export_dropped_total", &[("signal", "metrics")]),
        dropped
    );
    assert!(agent.stop().success());
}

#[root_test]
fn sigterm_flushes_queued_spans_and_a_last_metrics_push() {
    let rotel = Rotel::start();
    let server = OpenAiServer::start("stand-in");
    // Nothing would go out on its own within the test: batches wait 60 s, metrics 60 s.
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
            format!("http://127.0.0.1:{}", rotel.http),
        ),
        (
            "INFERSCOPE_OTLP__BATCH_TIMEOUT_MS".to_string(),
            "60000".to_string(),
        ),
    ];
    let agent = start_agent(
        &[
            "--watch-port",
            &server.port.to_string(),
            "--disable-probe",
            "cuda",
        ],
        &env,
    );
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    for _ in 0..2 {
        chat(server.port, "flushed", true, 3, None);
    }
    agent.wait_for("the requests", |s| {
        s.sum("llm_requests_total", &[("model", "flushed")]) == 2.0
    });
    std::thread::sleep(Duration::from_millis(1500));
    let port = server.port.to_string();
    let ours = |r: &Received| {
        r.spans
            .iter()
            .filter(|s| s.name == "chat flushed" && s.attrs.get("server.port") == Some(&port))
            .count()
    };
    let before = rotel.received();
    assert_eq!(ours(&before), 0, "nothing is sent before the batch is due");
    assert!(before.points.is_empty());
    assert!(agent.stop().success());
    // The collector prints what it received a moment after answering.
    let r = eventually("the flushed data", Duration::from_secs(10), || {
        let r = rotel.received();
        (ours(&r) >= 2 && !r.points.is_empty()).then_some(r)
    });
    assert_eq!(ours(&r), 2, "queued spans are flushed at SIGTERM");
    assert_eq!(
        r.last(
            "inferscope.gen_ai.requests",
            &[("gen_ai.request.model", "flushed")]
        )
        .and_then(|p| p.value),
        Some(2.0),
        "a last metrics push at SIGTERM"
    );
}

/// How the agent is given the TLS files: the `OTEL_*` variables or the config file.
#[derive(Clone, Copy)]
enum TlsFrom {
    Env,
    ConfigFile,
}

/// TLS settings for the agent: the CA (`ca`) and the client certificate (`client`), each
/// given or left out; returns the environment and the `run` arguments.
fn tls_settings(
    pki: &TestPki,
    from: TlsFrom,
    ca: bool,
    client: bool,
    dir: &std::path::Path,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut files = Vec::new();
    if ca {
        files.push(("CERTIFICATE", "ca_file", &pki.ca));
    }
    if client {
        files.push(("CLIENT_CERTIFICATE", "cert_file", &pki.client_cert));
        files.push(("CLIENT_KEY", "key_file", &pki.client_key));
    }
    match from {
        TlsFrom::Env => (
            files
                .iter()
                .map(|(var, _, path)| {
                    (
                        format!("OTEL_EXPORTER_OTLP_{var}"),
                        path.display().to_string(),
                    )
                })
                .collect(),
            Vec::new(),
        ),
        TlsFrom::ConfigFile => {
            let mut toml = String::from("[otlp.tls]\n");
            for (_, key, path) in &files {
                toml.push_str(&format!("{key} = {:?}\n", path.display().to_string()));
            }
            let config = dir.join("inferscope.toml");
            std::fs::write(&config, toml).unwrap();
            (
                Vec::new(),
                vec!["--config".to_string(), config.display().to_string()],
            )
        }
    }
}

/// The collector's port behind the terminator for `protocol`.
fn plaintext_port(rotel: &Rotel, protocol: &str) -> u16 {
    if protocol == "grpc" {
        rotel.grpc
    } else {
        rotel.http
    }
}

/// Export over `protocol` to the terminator at `https://localhost:port` (the name the server
/// certificate is for), metrics every 300 ms.
fn through_terminator(protocol: &str, port: u16) -> [(String, String); 3] {
    [
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
            protocol.to_string(),
        ),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
            format!("https://localhost:{port}"),
        ),
        ("OTEL_METRIC_EXPORT_INTERVAL".to_string(), "300".to_string()),
    ]
}

/// Requests through a watched server, with metrics and spans exported over mutual TLS to
/// `https://localhost` (the name the server certificate is for): the collector gets both,
/// and the terminator saw only verified handshakes.
fn exports_over_mutual_tls(protocol: &str, from: TlsFrom) {
    let rotel = Rotel::start();
    let pki = TestPki::generate();
    let proxy = TlsProxy::start(&pki, plaintext_port(&rotel, protocol), ClientAuth::Required);
    let server = OpenAiServer::start("stand-in");
    let dir = tempfile::tempdir().unwrap();
    let (mut env, args) = tls_settings(&pki, from, true, true, dir.path());
    env.extend(through_terminator(protocol, proxy.port));
    env.extend([
        (
            "INFERSCOPE_OTLP__BATCH_TIMEOUT_MS".to_string(),
            "200".to_string(),
        ),
        (
            "OTEL_RESOURCE_ATTRIBUTES".to_string(),
            format!("deployment.environment=tls-{protocol}"),
        ),
    ]);
    let watch = server.port.to_string();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--watch-port", &watch, "--disable-probe", "cuda"]);
    let agent = start_agent(&args, &env);
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    for _ in 0..3 {
        chat(server.port, "mtls", true, 3, None);
    }
    agent.wait_for("the requests", |s| {
        s.sum("llm_requests_total", &[("model", "mtls")]) == 3.0
    });
    let ours = |r: &Received| {
        r.spans
            .iter()
            .filter(|s| s.name == "chat mtls" && s.attrs.get("server.port") == Some(&watch))
            .count()
    };
    let r = eventually(
        "metrics and spans through the TLS terminator",
        Duration::from_secs(20),
        || {
            let r = rotel.received();
            let requests = r
                .last(
                    "inferscope.gen_ai.requests",
                    &[("gen_ai.request.model", "mtls")],
                )
                .and_then(|p| p.value);
            (requests == Some(3.0) && ours(&r) >= 3).then_some(r)
        },
    );
    assert_eq!(ours(&r), 3, "one span per request: {:?}", r.spans);
    assert!(!r.resources.is_empty());
    let env_attr = format!("tls-{protocol}");
    for res in &r.resources {
        assert_eq!(
            res.get("service.name").map(String::as_str),
            Some("inferscope")
        );
        assert_eq!(
            res.get("deployment.environment"),
            Some(&env_attr),
            "{res:?}"
        );
    }
    assert!(proxy.handshakes_ok() >= 1);
    assert_eq!(proxy.handshake_errors(), Vec::<String>::new());
    let s = agent.scrape();
    for signal in ["metrics", "traces"] {
        assert_eq!(
            s.sum("inferscope_export_dropped_total", &[("signal", signal)]),
            0.0,
            "{signal}"
        );
    }
    assert!(agent.stop().success());
}

#[root_test]
fn metrics_and_spans_over_grpc_with_mutual_tls() {
    exports_over_mutual_tls("grpc", TlsFrom::Env);
}

#[root_test]
fn metrics_and_spans_over_http_with_mutual_tls_from_the_config_file() {
    exports_over_mutual_tls("http/protobuf", TlsFrom::ConfigFile);
}

/// One agent per protocol whose handshake with the terminator fails: its metric pushes are
/// dropped and counted, nothing reaches the collector, and it keeps serving. Returns the
/// handshake errors the terminators saw.
fn tls_handshake_refused(auth: ClientAuth, ca: bool, client: bool) -> Vec<String> {
    let rotel = Rotel::start();
    let pki = TestPki::generate();
    let dir = tempfile::tempdir().unwrap();
    let (tls_env, _) = tls_settings(&pki, TlsFrom::Env, ca, client, dir.path());
    // Both at once: each needs a few failed attempts before a push counts as dropped.
    let agents: Vec<(TlsProxy, Agent)> = ["grpc", "http/protobuf"]
        .into_iter()
        .map(|protocol| {
            let proxy = TlsProxy::start(&pki, plaintext_port(&rotel, protocol), auth);
            let mut env = tls_env.clone();
            env.extend(through_terminator(protocol, proxy.port));
            let agent = start_agent(&["--disable-probe", "cuda"], &env);
            (proxy, agent)
        })
        .collect();
    let mut errors = Vec::new();
    for (proxy, agent) in agents {
        agent.wait_for("a failed push to be counted", |s| {
            s.sum("inferscope_export_dropped_total", &[("signal", "metrics")]) >= 1.0
        });
        assert_eq!(http_get(agent.port, "/healthz").map(|r| r.0), Some(200));
        assert_eq!(proxy.handshakes_ok(), 0);
        let seen = proxy.handshake_errors();
        assert!(!seen.is_empty(), "the agent never reached the terminator");
        errors.extend(seen);
        assert!(agent.stop().success());
    }
    let r = rotel.received();
    assert!(
        r.points.is_empty() && r.resources.is_empty(),
        "{}",
        rotel.output()
    );
    errors
}

#[root_test]
fn an_untrusted_collector_certificate_gets_nothing_and_pushes_are_counted() {
    // Plain TLS, no CA file: the system roots alone cannot verify the server.
    let errors = tls_handshake_refused(ClientAuth::None, false, false);
    // The agent, not the terminator, ended each handshake: it did not trust the server.
    assert!(errors.iter().all(|e| e.contains("UnknownCA")), "{errors:?}");
}

#[root_test]
fn mutual_tls_without_a_client_certificate_gets_nothing_and_pushes_are_counted() {
    let errors = tls_handshake_refused(ClientAuth::Required, true, false);
    // The agent trusted the server and went on; the terminator refused it.
    assert!(
        errors.iter().all(|e| e.contains("no certificates")),
        "{errors:?}"
    );
}

//! What OTLP export costs: building and encoding 1,000 spans and a 10,000-point metrics
//! snapshot, and sending them over HTTP/protobuf to a local sink that answers 200 (in process,
//! the agent's own code); then the agent binary with its collector down under a steady
//! 200 requests/s, its memory sampled over the run.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use inferscope::{
    export::otlp::{
        config::{Protocol, Signal, Target},
        metrics as om, traces,
        transport::{Client, Payload},
    },
    metrics::Metrics,
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use prost::Message;
use tgi_stand_in::{Client as TgiClient, Request};

use crate::agentproc::{metric_sum, AgentProcess};

pub struct OtlpCost {
    pub rounds: usize,
    /// Per 1,000 spans: build + protobuf encode, in process CPU µs (median over rounds).
    pub spans_build_us: f64,
    /// Per 1,000 spans: build, encode and send to the sink, wall µs (median).
    pub spans_send_us: f64,
    pub spans_bytes: usize,
    /// Per 10,000 points: registry snapshot, mapping and encode, thread CPU ms (median).
    pub points_build_ms: f64,
    /// Per 10,000 points: the same and the send, wall ms (median).
    pub points_send_ms: f64,
    pub points_bytes: usize,
    pub down: DownRun,
}

/// The agent with its collector down.
pub struct DownRun {
    /// False for the comparison run without OTLP (`BENCH_OTLP_OFF`).
    pub otlp_on: bool,
    pub seconds: f64,
    pub target_rps: f64,
    pub requests: u64,
    /// Agent RSS: after the warm-up, the highest sample, the last sample (KiB).
    pub rss_start_kib: u64,
    pub rss_max_kib: u64,
    pub rss_end_kib: u64,
    pub hwm_kib: u64,
    /// RSS at each tenth of the run after the warm-up (KiB): flat once the queue is full.
    pub rss_tenths_kib: Vec<u64>,
    pub dropped_traces: u64,
    pub dropped_metrics: u64,
    pub counted: u64,
    /// The agent's CPU over the load, as a share of one core.
    pub agent_share: f64,
    /// Forensic reports the agent wrote meanwhile (about other processes on the machine:
    /// symbolizing their stacks costs memory of its own).
    pub reports: u64,
    /// The collector back (a sink on the same port): seconds until its first metrics push
    /// and its first spans (of requests sent after it came up), and what it then received.
    pub back_metrics_s: Option<f64>,
    pub back_spans_s: Option<f64>,
    pub back_requests: Received,
}

/// Requests a sink answered, by OTLP path.
#[derive(Default, Debug)]
pub struct Received {
    pub metrics: std::sync::atomic::AtomicU64,
    pub traces: std::sync::atomic::AtomicU64,
    pub logs: std::sync::atomic::AtomicU64,
}

fn thread_cpu() -> Duration {
    Duration::from_nanos(crate::agentproc::thread_cpu_ns())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// An OTLP/HTTP receiver that reads each request, counts it by path and answers `200` with an
/// empty body; on `port`, or a free one when 0.
fn sink(port: u16) -> anyhow::Result<(u16, Arc<AtomicBool>, Arc<Received>)> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let port = listener.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(Received::default());
    let (s, r) = (stop.clone(), received.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if s.load(Ordering::Relaxed) {
                return;
            }
            let Ok(conn) = conn else { continue };
            let r = r.clone();
            std::thread::spawn(move || serve(conn, &r));
        }
    });
    Ok((port, stop, received))
}

fn serve(conn: TcpStream, received: &Received) {
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(conn);
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if std::mem::take(&mut first) {
                let counter = match l.split(' ').nth(1) {
                    Some("/v1/metrics") => &received.metrics,
                    Some("/v1/traces") => &received.traces,
                    Some("/v1/logs") => &received.logs,
                    _ => continue,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        if w.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        )
        .is_err()
        {
            return;
        }
    }
}

fn spans(n: usize) -> Vec<inferscope::http::finished::RequestFinished> {
    (0..n)
        .map(|i| inferscope::http::finished::RequestFinished {
            model: format!("model-{}", i % 4),
            server: Some("vllm"),
            port: Some(8000),
            method: "POST".into(),
            route: "/v1/chat/completions".into(),
            status: Some(200),
            error: None,
            pid: 4242,
            start_ns: 1_000_000 + i as u64 * 1000,
            first_token_ns: Some(2_000_000 + i as u64 * 1000),
            end_ns: 9_000_000 + i as u64 * 1000,
            input_tokens: Some(120),
            output_tokens: Some(64),
            stream: true,
            protocol: "http1",
            grpc_status: None,
            parent: None,
            workload: Default::default(),
        })
        .collect()
}

/// 10,000 points: 5,000 counter series and 5,000 gauge series, labels like the catalogue's.
fn registry() -> Metrics {
    let m = Metrics::new();
    let counters: Family<Vec<(String, String)>, Counter> = Family::default();
    let gauges: Family<Vec<(String, String)>, inferscope::metrics::GaugeF> = Family::default();
    for i in 0..5000u32 {
        let labels = vec![
            ("model".to_string(), format!("model-{}", i % 50)),
            ("pid".to_string(), (1000 + i).to_string()),
            ("gpu".to_string(), (i % 8).to_string()),
        ];
        counters.get_or_create(&labels).inc_by(u64::from(i));
        gauges.get_or_create(&labels).set(f64::from(i) * 0.5);
    }
    m.register_with(|r| {
        r.register("bench_requests", "bench counter", counters);
        r.register("bench_level", "bench gauge", gauges);
    });
    m
}

pub fn measure(rounds: usize, down_secs: u64, lib: &std::path::Path) -> anyhow::Result<OtlpCost> {
    let (port, stop, _) = sink(0)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let target = |path: &str| Target {
        url: format!("http://127.0.0.1:{port}{path}"),
        protocol: Protocol::HttpProtobuf,
        headers: vec![],
        timeout: Duration::from_secs(10),
        tls: Default::default(),
    };
    let resource = vec![
        ("service.name".to_string(), "inferscope".to_string()),
        ("host.name".to_string(), "bench".to_string()),
    ];
    let sdk_resource = opentelemetry_sdk::Resource::builder_empty()
        .with_attributes(
            resource
                .iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    let spans_client =
        rt.block_on(async { Client::new(&target("/v1/traces"), Signal::Traces, &sdk_resource) })?;
    let metrics_client =
        rt.block_on(async { Client::new(&target("/v1/metrics"), Signal::Metrics, &sdk_resource) })?;
    let input = spans(1000);
    let clock = traces::WallClock::now();
    let build_spans = || -> Vec<opentelemetry_sdk::trace::SpanData> {
        input.iter().map(|r| traces::span(r, clock, None)).collect()
    };
    // What the exporter does with a batch before it sends it.
    let wire = opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema::from(
        &sdk_resource,
    );
    let encode_spans =
        |spans| opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
            resource_spans:
                opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope(
                    spans, &wire,
                ),
        };
    let metrics = registry();
    let times = om::Times {
        start_unix_nano: 1,
        now_unix_nano: 2,
    };
    let build_points = || metrics.read(|r| om::snapshot(r, &resource, times));
    // Warm-up (connections, allocator).
    let spans_bytes = encode_spans(build_spans()).encoded_len();
    let first = build_points().context("snapshot")?;
    let points: usize = first.resource_metrics[0].scope_metrics[0]
        .metrics
        .iter()
        .filter(|m| m.name.starts_with("inferscope.bench"))
        .map(|m| match &m.data {
            Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(s)) => {
                s.data_points.len()
            }
            Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Gauge(g)) => {
                g.data_points.len()
            }
            _ => 0,
        })
        .sum();
    anyhow::ensure!(points == 10_000, "the bench registry has {points} points");
    let points_bytes = first.encoded_len();
    rt.block_on(spans_client.send(Payload::Traces(build_spans())))?;
    rt.block_on(metrics_client.send(Payload::Metrics(first)))?;

    let (mut sb, mut ss, mut pb, mut ps) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let c = thread_cpu();
        let bytes = encode_spans(build_spans()).encode_to_vec();
        std::hint::black_box(bytes);
        sb.push((thread_cpu() - c).as_secs_f64() * 1e6);
        let t = Instant::now();
        rt.block_on(spans_client.send(Payload::Traces(build_spans())))?;
        ss.push(t.elapsed().as_secs_f64() * 1e6);

        let c = thread_cpu();
        let bytes = build_points()?.encode_to_vec();
        std::hint::black_box(bytes);
        pb.push((thread_cpu() - c).as_secs_f64() * 1e3);
        let t = Instant::now();
        rt.block_on(metrics_client.send(Payload::Metrics(build_points()?)))?;
        ps.push(t.elapsed().as_secs_f64() * 1e3);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(("127.0.0.1", port));
    drop(rt);
    let down = collector_down(down_secs, lib)?;
    Ok(OtlpCost {
        rounds,
        spans_build_us: median(sb),
        spans_send_us: median(ss),
        spans_bytes,
        points_build_ms: median(pb),
        points_send_ms: median(ps),
        points_bytes,
        down,
    })
}

/// The agent exporting to a port where nothing listens, the TGI stand-in under 200
/// requests/s for `secs`; RSS sampled every second.
fn collector_down(secs: u64, lib: &std::path::Path) -> anyhow::Result<DownRun> {
    let rps = 200.0;
    let server = crate::http::Server::start(5.0, 1.0)?;
    let closed = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let endpoint = format!("http://127.0.0.1:{closed}");
    // BENCH_OTLP_OFF=1: the same run without OTLP, for comparison.
    // Only the http family: forensic reports about other processes on the machine (their
    // stacks symbolized) would otherwise show in the memory figure.
    let only_http = ("INFERSCOPE_PROBES__DISABLED", r#"["cuda", "sched", "oom"]"#);
    let otlp_on = std::env::var_os("BENCH_OTLP_OFF").is_none();
    let env: &[(&str, &str)] = if !otlp_on {
        &[only_http]
    } else {
        &[
            only_http,
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "5000"),
        ]
    };
    let agent = AgentProcess::start(lib, env)?;
    agent
        .wait_for(
            "the TGI stand-in to be watched",
            Duration::from_secs(30),
            |t| metric_sum(t, "inferscope_http_watched_processes") >= 1.0,
        )
        .with_context(|| agent.log())?;
    let conns = 16;
    let period = Duration::from_secs_f64(conns as f64 / rps);
    let stop = AtomicBool::new(false);
    let sent = std::sync::atomic::AtomicU64::new(0);
    let cpu0 = agent.cpu_ns()?;
    let start = Instant::now();
    let warm = Duration::from_secs(5.min(secs / 4).max(1));
    let mut samples = Vec::new();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..conns)
            .map(|i| {
                let (stop, sent) = (&stop, &sent);
                let port = server.port;
                s.spawn(move || -> anyhow::Result<()> {
                    let mut c = TgiClient::connect(port)?;
                    let req = Request::new(true, 8);
                    // Staggered so the connections do not fire together.
                    let mut next = Instant::now() + period.mul_f64(i as f64 / conns as f64);
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        next += period;
                        c.send(&req)?;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        while start.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_secs(1));
            if start.elapsed() >= warm {
                samples.push(agent.rss_kib()?);
            }
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(())
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let agent_share = (agent.cpu_ns()? - cpu0) as f64 / 1e9 / seconds;
    let requests = sent.load(Ordering::Relaxed);
    let text = agent
        .wait_for("every request counted", Duration::from_secs(30), |t| {
            metric_sum(t, "llm_requests_total") >= requests as f64
        })
        .or_else(|_| agent.metrics())?;
    let dropped = |signal: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("inferscope_export_dropped_total")
                    && l.contains(&format!("signal=\"{signal}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    // The collector comes back on the same port: pushes resume by themselves; spans of
    // requests sent from then on arrive.
    let (back_metrics_s, back_spans_s, back_requests) = if otlp_on {
        let (_, stop_sink, received) = sink(closed)?;
        let up = Instant::now();
        let mut c = TgiClient::connect(server.port)?;
        let req = Request::new(true, 8);
        let (mut metrics_s, mut spans_s) = (None, None);
        while up.elapsed() < Duration::from_secs(60) && (metrics_s.is_none() || spans_s.is_none()) {
            c.send(&req)?;
            if metrics_s.is_none() && received.metrics.load(Ordering::Relaxed) > 0 {
                metrics_s = Some(up.elapsed().as_secs_f64());
            }
            if spans_s.is_none() && received.traces.load(Ordering::Relaxed) > 0 {
                spans_s = Some(up.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stop_sink.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", closed));
        let r = Arc::try_unwrap(received).unwrap_or_default();
        (metrics_s, spans_s, r)
    } else {
        (None, None, Received::default())
    };
    let out = DownRun {
        otlp_on,
        seconds,
        target_rps: rps,
        requests,
        rss_start_kib: samples.first().map_or(0, |s| s.0),
        rss_max_kib: samples.iter().map(|s| s.0).max().unwrap_or(0),
        rss_end_kib: samples.last().map_or(0, |s| s.0),
        hwm_kib: samples.last().map_or(0, |s| s.1),
        rss_tenths_kib: (1..=10)
            .filter_map(|i| {
                let at = (samples.len() * i / 10).checked_sub(1)?;
                samples.get(at).map(|s| s.0)
            })
            .collect(),
        dropped_traces: dropped("traces"),
        dropped_metrics: dropped("metrics"),
        counted: metric_sum(&text, "llm_requests_total") as u64,
        agent_share,
        reports: metric_sum(&text, "inferscope_forensics_reports_total") as u64,
        back_metrics_s,
        back_spans_s,
        back_requests,
    };
    agent.stop()?;
    Ok(out)
}

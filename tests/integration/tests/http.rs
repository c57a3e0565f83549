//! Root tier of the `http` family: the real agent watches a real uvicorn + FastAPI server
//! (tests/servers/openai_server.py) and is compared with what its clients saw.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
};

use integration::*;

use integration::OpenAiServer as Server;

fn client(args: &[&str]) -> serde_json::Value {
    python_client("client.py", args)
}

fn start_agent(server: &Server) -> Agent {
    start_agent_with(server, &[])
}

/// With `env` in the agent's environment.
fn start_agent_with(server: &Server, env: &[(&str, &str)]) -> Agent {
    let agent = Agent::start_with_env(&["--watch-port", &server.port.to_string()], env);
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    agent
}

#[root_test]
fn counts_status_codes_models_and_tokens_are_exact() {
    let server = Server::start("stand-in");
    let agent = start_agent(&server);
    let truth = client(&["openai", &server.port.to_string(), "stand-in"]);
    let s = assert_counted_as_the_client(&agent, &truth);
    assert_eq!(
        s.sum("inferscope_http_bad_input_total", &[]),
        0.0,
        "{}",
        s.text
    );
    assert!(agent.stop().success());
}

/// Where the kernel refuses BTF tracepoints the family's program is the raw tracepoint: it
/// counts the same.
#[root_test]
fn the_raw_tracepoint_fallback_counts_the_same() {
    let server = Server::start("stand-in");
    let agent = start_agent_with(
        &server,
        &[("INFERSCOPE_PROBES__HTTP_RAW_TRACEPOINT", "true")],
    );
    let ids = program_ids(agent.pid());
    let names: Vec<String> = aya::programs::loaded_programs()
        .flatten()
        .filter(|p| ids.contains(&p.id()))
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .filter(|n| n.starts_with("http_sys"))
        .collect();
    // The kernel keeps 15 bytes of a program's name.
    assert_eq!(names, ["http_sys_exit_r"]);
    let truth = client(&["openai", &server.port.to_string(), "stand-in"]);
    assert_counted_as_the_client(&agent, &truth);
    assert!(agent.stop().success());
}

/// The openai scenario's requests by model and status, its errors by type and its tokens, as
/// the agent counted them, against what the client saw (`truth`); returns the scrape.
fn assert_counted_as_the_client(agent: &Agent, truth: &serde_json::Value) -> Scrape {
    let requests: HashMap<String, u64> = serde_json::from_value(truth["requests"].clone()).unwrap();
    let total: u64 = requests.values().sum();
    let s = agent.wait_for("every request", |s| {
        s.sum("llm_requests_total", &[]) >= total as f64
            && s.sum("llm_requests_in_flight", &[]) == 0.0
    });
    for (key, n) in &requests {
        let (model, status) = key.split_once('|').unwrap();
        let got = s.sum(
            "llm_requests_total",
            &[("model", model), ("status_code", status)],
        );
        assert_eq!(got, *n as f64, "{key}\n{}", s.text);
    }
    assert_eq!(s.sum("llm_requests_total", &[]), total as f64, "{}", s.text);
    let errors: HashMap<String, u64> = serde_json::from_value(truth["errors"].clone()).unwrap();
    for (key, n) in &errors {
        let (model, error) = key.split_once('|').unwrap();
        let got = s.sum(
            "llm_request_errors_total",
            &[("model", model), ("error_type", error)],
        );
        assert_eq!(got, *n as f64, "{key}\n{}", s.text);
    }
    let want_in = truth["input"].as_u64().unwrap() as f64;
    let want_out = truth["output"].as_u64().unwrap() as f64;
    assert_eq!(s.sum("llm_tokens_input_total", &[]), want_in, "{}", s.text);
    assert_eq!(
        s.sum("llm_tokens_output_total", &[]),
        want_out,
        "{}",
        s.text
    );
    s
}

/// `http request finished` debug lines of the agent, in order: (ttft, gaps, latency) in µs.
#[root_test]
fn ttft_token_gaps_and_latency_match_the_client() {
    let server = Server::start("stand-in");
    let agent = start_agent(&server);
    let n = 8;
    let truth = client(&["timing", &server.port.to_string(), &n.to_string()]);
    let truth = truth.as_array().unwrap().clone();
    agent.wait_for("the timed requests", |s| {
        s.sum("llm_requests_total", &[("model", "timed")]) >= n as f64
    });
    let seen = assert_timed_as_the_client(&agent, &truth, |l| is_model(l, "timed"));
    // The histograms agree with the lines.
    let s = agent.scrape();
    let ttft_sum: f64 = seen.iter().map(|x| x.0 as f64 / 1e6).sum();
    let got = s.sum("llm_time_to_first_token_seconds_sum", &[("model", "timed")]);
    assert!((got - ttft_sum).abs() < 1e-3, "{got} vs {ttft_sum}");
    assert!(agent.stop().success());
}

#[root_test]
fn sixty_four_keep_alive_connections_at_once() {
    let server = Server::start("stand-in");
    let agent = start_agent(&server);
    let truth = client(&["concurrent", &server.port.to_string(), "64", "3"]);
    let want = truth["requests"].as_u64().unwrap() as f64;
    assert_eq!(want, 192.0);
    let s = agent.wait_for("192 requests", |s| {
        s.sum("llm_requests_total", &[]) >= want && s.sum("llm_requests_in_flight", &[]) == 0.0
    });
    assert_eq!(
        s.sum("llm_requests_total", &[("status_code", "200")]),
        want,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum("llm_tokens_output_total", &[]),
        truth["tokens"].as_u64().unwrap() as f64
    );
    assert_eq!(s.sum("llm_time_to_first_token_seconds_count", &[]), want);
    assert_eq!(
        s.sum("inferscope_events_lost_total", &[("source", "http")]),
        0.0
    );
    assert!(agent.stop().success());
}

#[root_test]
fn a_connection_open_before_the_agent_recovers_on_its_next_request() {
    let server = Server::start("stand-in");
    // A keep-alive connection that already carried a request, then waits.
    let mut py = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sys; sys.path.insert(0, {dir:?}); import client, json\n\
             c = client.Conn({port}); c.stream('before', 2, 1, 1)\n\
             print('ready', flush=True); sys.stdin.readline()\n\
             print(json.dumps(c.stream('after', 3, 1, 1)), flush=True)",
            dir = servers_dir().display().to_string(),
            port = server.port
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let agent = start_agent(&server);
    std::io::Write::write_all(py.stdin.as_mut().unwrap(), b"\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(py.wait().unwrap().success());
    let s = agent.wait_for("the request on the old connection", |s| {
        s.sum("llm_requests_total", &[("model", "after")]) >= 1.0
    });
    assert_eq!(s.sum("llm_tokens_output_total", &[("model", "after")]), 3.0);
    assert_eq!(s.sum("llm_requests_total", &[("model", "before")]), 0.0);
    assert!(agent.stop().success());
}

#[root_test]
fn bad_input_is_counted_and_the_agent_goes_on() {
    let server = Server::start("stand-in");
    let agent = start_agent(&server);
    let truth = client(&["bad", &server.port.to_string()]);
    assert_eq!(truth["good_tokens"].as_u64(), Some(2));
    let s = agent.wait_for("the good request after the bad input", |s| {
        s.sum("llm_requests_total", &[("model", "after")]) >= 1.0
    });
    // The garbage and the SSH banner; the TLS hello is TLS.
    assert!(
        s.sum("inferscope_http_bad_input_total", &[("kind", "not_http")]) >= 2.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum(
            "inferscope_http_bad_input_total",
            &[("kind", "tls_unsupported")]
        ),
        1.0,
        "{}",
        s.text
    );
    assert!(
        s.sum(
            "inferscope_http_bad_input_total",
            &[("kind", "header_truncated")]
        ) >= 1.0,
        "{}",
        s.text
    );
    let s = agent.wait_for("the reset request", |s| {
        s.sum(
            "llm_request_errors_total",
            &[("model", "reset"), ("error_type", "connection_reset")],
        ) >= 1.0
    });
    assert_eq!(s.sum("llm_requests_in_flight", &[]), 0.0, "{}", s.text);
    assert!(agent.stop().success());
}

#[root_test]
fn a_server_named_by_a_config_matcher_is_watched() {
    use std::io::{Read, Write};
    let server = Server::start("matched");
    // No --watch-port: the command line matcher alone must find it.
    let agent = Agent::start_with_env(
        &[],
        &[("INFERSCOPE_HTTP__MATCH_COMMANDS", "[\"openai_server.py\"]")],
    );
    agent.wait_for("the matched server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    let body = r#"{"model":"matched","max_tokens":3,"messages":[{"role":"user","content":"a b"}]}"#;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    c.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let s = agent.wait_for("the request", |s| {
        s.sum(
            "llm_requests_total",
            &[("model", "matched"), ("status_code", "200")],
        ) == 1.0
    });
    assert_eq!(
        s.sum("llm_tokens_output_total", &[("model", "matched")]),
        3.0
    );
    assert!(agent.stop().success());
}

#[root_test]
fn a_server_killed_mid_stream_ends_its_requests_as_connection_resets() {
    let mut server = Server::start("doomed");
    let agent = start_agent(&server);
    // Two slow streams in flight (100 tokens at 100 ms each).
    let (_conns, _) = server.slow_streams("doomed", 2);
    agent.wait_for("the streams in flight", |s| {
        s.sum("llm_requests_in_flight", &[("model", "doomed")]) == 2.0
    });
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let s = agent.wait_for("the requests to end as connection resets", |s| {
        s.sum("llm_requests_in_flight", &[("model", "doomed")]) == 0.0
            && s.sum(
                "llm_request_errors_total",
                &[("model", "doomed"), ("error_type", "connection_reset")],
            ) == 2.0
    });
    assert!(
        s.sum("llm_requests_total", &[("model", "doomed")]) >= 2.0,
        "{}",
        s.text
    );
    assert!(agent.stop().success());
}

/// The http family has a ring of its own: a flood of a server's bytes that overflows it loses
/// http records (counted), never a CUDA allocation or free of the ledger.
#[root_test]
fn an_http_flood_cannot_make_the_ledger_lose_events() {
    let server = Server::start("stand-in");
    // One page per ring and a reader that polls once a second: the flood must overflow.
    let agent = Agent::start_with_env(
        &[
            "--watch-port",
            &server.port.to_string(),
            "--cuda-lib",
            &Variant::Push.lib_path().display().to_string(),
        ],
        &[
            ("INFERSCOPE_PROBES__RING_BUFFER_BYTES", "4096"),
            ("INFERSCOPE_PROBES__POLL_INTERVAL_MS", "1000"),
        ],
    );
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = format!(
        r#"{{"model":"stand-in","messages":[{{"role":"user","content":"{}"}}],"max_tokens":4}}"#,
        "x".repeat(3000)
    );
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let (stop, body, port) = (stop.clone(), body.clone(), server.port);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    flood_once(port, &body);
                }
            })
        })
        .collect();
    agent.wait_for("the flood to overflow the http ring", |s| {
        s.sum("inferscope_events_lost_total", &[("source", "http")]) > 0.0
    });
    let mut w = Workload::start(
        "alloc dev=0 size=1048576 count=8; free count=4; checkpoint name=held",
        &WorkloadOptions::default(),
    );
    w.proceed();
    let truth = w.truth();
    let s = assert_agent_sees(&agent, &truth);
    assert_eq!(
        s.sum("inferscope_events_lost_total", &[("source", "cuda")]),
        0.0,
        "{}",
        s.text
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in flood {
        t.join().unwrap();
    }
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

/// One request on a fresh connection; the answer is read and ignored.
fn flood_once(port: u16, body: &str) {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = c.read_to_end(&mut Vec::new());
}

/// POSTs a chat completion naming `model` on a fresh connection; returns the status code.
fn chat_status(port: u16, model: &str) -> u16 {
    use std::io::{Read, Write};
    let body = format!(
        r#"{{"model":"{model}","max_tokens":2,"messages":[{{"role":"user","content":"a b"}}]}}"#
    );
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    c.read_to_string(&mut response).unwrap();
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

/// The distinct `model` values of every `llm_*` series.
fn model_values(s: &Scrape) -> std::collections::BTreeSet<String> {
    s.text
        .lines()
        .filter(|l| l.starts_with("llm_"))
        .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
        .map(str::to_string)
        .collect()
}

#[root_test]
fn model_names_the_server_does_not_serve_are_other() {
    // Like vLLM: names other than its own (and `alias`) are answered 404.
    let server = Server::start_with("real", &["--strict-models", "--also-serve", "alias"]);
    let agent = start_agent(&server);
    // Once a first request is seen, the server's traffic is.
    assert_eq!(chat_status(server.port, "real"), 200);
    agent.wait_for("the first request", |s| {
        s.sum("llm_requests_total", &[("model", "real")]) == 1.0
    });
    let n = 300;
    for i in 0..n {
        assert_eq!(chat_status(server.port, &format!("probe-{i}")), 404);
    }
    // `real` is the command line's model; `alias` becomes a label when it is answered 200.
    assert_eq!(chat_status(server.port, "real"), 200);
    assert_eq!(chat_status(server.port, "alias"), 200);
    assert_eq!(chat_status(server.port, "alias"), 200);
    let s = agent.wait_for("every request", |s| {
        s.sum("llm_requests_total", &[("model", "real")]) == 2.0
            && s.sum("llm_requests_total", &[("model", "alias")]) == 2.0
            && s.sum("llm_requests_total", &[("status_code", "404")]) >= n as f64
    });
    let models = model_values(&s);
    assert!(models.len() <= 5, "model values {models:?}\n{}", s.text);
    assert!(
        !models.iter().any(|m| m.starts_with("probe-")),
        "{models:?}"
    );
    assert_eq!(
        s.sum(
            "llm_requests_total",
            &[("model", "other"), ("status_code", "404")]
        ),
        n as f64,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum(
            "inferscope_dropped_total",
            &[("what", "model_label"), ("reason", "unserved")]
        ),
        n as f64,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum(
            "llm_requests_total",
            &[("model", "real"), ("status_code", "200")]
        ),
        2.0
    );
    assert_eq!(s.sum("llm_requests_in_flight", &[]), 0.0, "{}", s.text);
    assert!(agent.stop().success());
}

/// Writes of one byte to `/dev/null` on `threads` threads until `stop`. The family's
/// programs run on the socket syscalls of every process, watched or not (the check is
/// theirs), so a loop of writes anywhere on the node costs the family as a flood of a watched
/// server's calls does, at a rate no test server reaches.
fn syscall_flood(
    threads: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let mut null = std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/null")
                    .unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..1000 {
                        let _ = null.write(b"x");
                    }
                }
            })
        })
        .collect()
}

fn healthz(agent: &Agent) -> String {
    http_get(agent.port, "/healthz")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// Past its budget the http family is detached: counted, named by `/healthz`; the streams it
/// was following end as `untracked` with no latency, and what it sees of them after it is back
/// is not taken for requests. After the cool-down it is attached again and times a new
/// request as its client did.
#[root_test]
fn the_http_family_is_shed_past_its_budget_and_comes_back() {
    let server = Server::start("stand-in");
    let agent = start_agent_with(
        &server,
        &[
            ("INFERSCOPE_PROBES__HTTP_BUDGET_CORE_SHARE", "0.05"),
            ("INFERSCOPE_PROBES__SHED_COOLDOWN_SECS", "2"),
        ],
    );
    let (streams, _) = server.slow_streams("stand-in", 2);
    agent.wait_for("two streams in flight", |s| {
        s.sum("llm_requests_in_flight", &[("model", "stand-in")]) == 2.0
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = syscall_flood(2, &stop);
    let http = [("probe", "http")];
    let s = agent.wait_for("the http family to be shed", |s| {
        s.sum("inferscope_probe_sheds_total", &http) >= 1.0
            && s.sum("inferscope_probe_shed", &http) == 1.0
            && s.sum("inferscope_probe_family_up", &[("family", "http")]) == 0.0
            && healthz(&agent).contains("degraded: http (shed by the probe budget")
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in flood {
        t.join().unwrap();
    }
    let shed = s.sum("inferscope_probe_sheds_total", &http);
    let stand_in = [("model", "stand-in")];
    // The tracker ends the streams it was following when it learns of the shed, a moment
    // after the manager has published it.
    let s = agent.wait_for("the streams ended by the shed", |s| {
        s.sum("llm_requests_in_flight", &stand_in) == 0.0
    });
    assert_eq!(
        s.sum(
            "llm_request_errors_total",
            &[("model", "stand-in"), ("error_type", "untracked")]
        ),
        2.0,
        "{}",
        s.text
    );
    assert!(
        s.sum(
            "inferscope_dropped_total",
            &[("what", "http_connection"), ("reason", "shed")]
        ) >= 2.0,
        "{}",
        s.text
    );
    agent.wait_for("the http family to be attached again", |s| {
        s.sum("inferscope_probe_shed", &http) == 0.0
            && s.sum("inferscope_probe_family_up", &[("family", "http")]) == 1.0
            && healthz(&agent) == "ok\n"
    });
    let truth = client(&["timing", &server.port.to_string(), "2"]);
    let truth = truth.as_array().unwrap().clone();
    let s = agent.wait_for("the timed requests", |s| {
        s.sum("llm_requests_total", &[("model", "timed")]) >= 2.0
    });
    assert_timed_as_the_client(&agent, &truth, |l| is_model(l, "timed"));
    // The streams went on writing tokens all along: none of it became a request, a latency
    // or bad input.
    let after_gap = (
        s.sum("llm_requests_total", &stand_in),
        s.sum("llm_latency_seconds_count", &stand_in),
        s.sum("inferscope_http_bad_input_total", &[]),
    );
    assert_eq!(after_gap, (2.0, 0.0, 0.0), "{}", s.text);
    assert_eq!(
        s.sum("inferscope_probe_sheds_total", &http),
        shed,
        "shed again after the flood ended:\n{}",
        agent.log()
    );
    drop(streams);
    assert!(agent.stop().success());
}

/// TLS terminated in the watched process by a library the agent does not probe (rustls,
/// statically linked: the test's own terminator in front of the stand-in) is counted as
/// `tls_unsupported`, once per connection, and not as garbage.
#[root_test]
fn tls_the_agent_cannot_read_is_counted_as_such() {
    use integration::tls_proxy::{ClientAuth, TestPki, TlsProxy};
    let server = Server::start("stand-in");
    let pki = TestPki::generate();
    let proxy = TlsProxy::start(&pki, server.port, ClientAuth::None);
    let agent = Agent::start(&["--watch-port", &proxy.port.to_string()]);
    agent.wait_for("the terminator to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    let script = format!(
        "import ssl, http.client\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         for _ in range(2):\n\
         \x20   c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ctx)\n\
         \x20   body = '{{\"model\":\"stand-in\",\"max_tokens\":2,\"messages\":[{{\"role\":\"user\",\"content\":\"x\"}}]}}'\n\
         \x20   c.request('POST', '/v1/chat/completions', body, {{'Content-Type': 'application/json'}})\n\
         \x20   r = c.getresponse(); r.read()\n\
         \x20   assert r.status == 200, r.status\n\
         \x20   c.close()\n",
        ca = pki.ca.display().to_string(),
        port = proxy.port
    );
    run_ok(Command::new("python3").arg("-c").arg(&script));
    let s = agent.wait_for("two TLS connections", |s| {
        s.sum(
            "inferscope_http_bad_input_total",
            &[("kind", "tls_unsupported")],
        ) >= 2.0
    });
    assert_eq!(
        s.sum(
            "inferscope_http_bad_input_total",
            &[("kind", "tls_unsupported")]
        ),
        2.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum("inferscope_http_bad_input_total", &[("kind", "not_http")]),
        0.0
    );
    assert_eq!(s.sum("llm_requests_total", &[]), 0.0);
    assert!(agent.stop().success());
}

/// The same FastAPI app on hypercorn, which speaks HTTP/2 in clear text: streamed chat
/// completions from curl with HTTP/2 prior knowledge are counted, with their model and tokens,
/// as `protocol="h2"`.
#[root_test]
fn streamed_chat_over_http2_is_counted_like_http1() {
    let server = Server::start_with("stand-in", &["--server", "hypercorn"]);
    let agent = start_agent(&server);
    let body = r#"{"model":"h2-model","stream":true,"max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#;
    for _ in 0..3 {
        let out = run_ok(
            Command::new("curl")
                .args(["-s", "-N", "--fail", "--http2-prior-knowledge"])
                .args(["-H", "content-type: application/json", "-d", body])
                .arg(format!(
                    "http://127.0.0.1:{}/v1/chat/completions",
                    server.port
                )),
        );
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("\"content\": \"tok").count(), 5, "{text}");
    }
    let s = agent.wait_for("three h2 requests", |s| {
        s.sum("llm_requests_total", &[("protocol", "h2")]) >= 3.0
    });
    assert_eq!(
        s.sum(
            "llm_requests_total",
            &[
                ("model", "h2-model"),
                ("protocol", "h2"),
                ("status_code", "200")
            ]
        ),
        3.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum("llm_tokens_output_total", &[("model", "h2-model")]),
        15.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum(
            "llm_time_to_first_token_seconds_count",
            &[("model", "h2-model")]
        ),
        3.0
    );
    assert_eq!(
        s.sum(
            "llm_time_per_output_token_seconds_count",
            &[("model", "h2-model")]
        ),
        12.0
    );
    assert_eq!(
        s.sum("inferscope_http_bad_input_total", &[]),
        0.0,
        "{}",
        s.text
    );
    assert!(agent.stop().success());
}

/// Requests timed through the server's own TLS, as the client saw them, and nothing counted as
/// unreadable: `n` streamed requests on one TLS keep-alive connection to `port`.
/// `internal`: the agent probes OpenSSL's internal functions (`probes.tls_internal`, the
/// default), else its exported calls.
fn timed_through_tls(
    agent: &Agent,
    port: u16,
    pki: &integration::tls_proxy::TestPki,
    n: usize,
    internal: bool,
) {
    let truth = client(&[
        "timing",
        &port.to_string(),
        &n.to_string(),
        &pki.ca.display().to_string(),
    ]);
    let truth = truth.as_array().unwrap().clone();
    let tokens: u64 = truth.iter().map(|t| t["tokens"].as_u64().unwrap()).sum();
    let s = agent.wait_for("the requests inside TLS", |s| {
        s.sum("llm_requests_total", &[("model", "timed")]) >= n as f64
    });
    assert_timed_as_the_client(agent, &truth, |l| is_model(l, "timed"));
    assert_eq!(
        s.sum(
            "llm_requests_total",
            &[
                ("model", "timed"),
                ("protocol", "http1"),
                ("status_code", "200")
            ]
        ),
        n as f64,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum("llm_tokens_output_total", &[("model", "timed")]),
        tokens as f64,
        "{}",
        s.text
    );
    // Neither the handshake nor the ciphertext around the plaintext is taken for bad input.
    // The agent's log names each connection's requests: which one was not read, if any.
    assert_eq!(
        s.sum("inferscope_http_bad_input_total", &[]),
        0.0,
        "{}\nagent log:\n{}",
        s.text,
        agent.log()
    );
    assert_eq!(
        s.sum(
            "inferscope_dropped_total",
            &[("what", "tls_call"), ("reason", "untied")]
        ),
        0.0,
        "{}",
        s.text
    );
    // Every request took an `SSL_read` and an `SSL_write` per token event at least, each
    // trapped by the uprobes and counted for the budget under its kind of trap.
    let calls = (n as u64 + tokens) as f64;
    let s = agent.wait_for("the OpenSSL calls counted by their traps", |s| {
        s.sum("inferscope_http_tls_calls_total", &[]) >= calls
    });
    let kinds = ["nop5", "emulated", "single_step"]
        .iter()
        .map(|k| s.sum("inferscope_http_tls_calls_total", &[("trap", k)]))
        .sum::<f64>();
    assert_eq!(
        kinds,
        s.sum("inferscope_http_tls_calls_total", &[]),
        "{}",
        s.text
    );
    // The system's OpenSSL 3 begins its exported calls with `sub $n, %rsp` (single-stepped)
    // and its internal read and write functions with `push` (emulated): probed on the internal
    // ones no call is single-stepped, on the exported ones every call is.
    let (cheap, single) = if internal {
        ("emulated", "single_step")
    } else {
        ("single_step", "emulated")
    };
    assert_eq!(
        s.sum("inferscope_http_tls_calls_total", &[("trap", single)]),
        0.0,
        "{}",
        s.text
    );
    assert!(
        s.sum("inferscope_http_tls_calls_total", &[("trap", cheap)]) >= calls,
        "{}",
        s.text
    );
}

/// uvicorn terminating TLS itself (`--ssl-keyfile`, as vLLM and SGLang pass it): Python's ssl
/// under asyncio works through memory BIOs, so no syscall happens inside `SSL_read` and
/// `SSL_write`; the agent ties each `SSL*` to its socket by the thread's reads and reads the
/// plaintext through the server's OpenSSL. Requests are timed as the client saw them.
#[root_test]
fn tls_terminated_by_uvicorn_is_read_through_its_openssl() {
    use integration::tls_proxy::TestPki;
    let pki = TestPki::generate();
    let server = Server::start_with(
        "stand-in",
        &[
            "--ssl-keyfile",
            &pki.server_key_pem.display().to_string(),
            "--ssl-certfile",
            &pki.server_cert_pem.display().to_string(),
        ],
    );
    let agent = start_agent(&server);
    agent.wait_for("the server's OpenSSL to be probed", |s| {
        s.sum("inferscope_http_tls_processes", &[]) >= 1.0
    });
    // The official client, trusting the test CA: every request, error and token counted.
    let truth = client(&[
        "openai",
        &server.port.to_string(),
        "stand-in",
        &pki.ca.display().to_string(),
    ]);
    assert_counted_as_the_client(&agent, &truth);
    timed_through_tls(&agent, server.port, &pki, 6, true);
    assert!(agent.stop().success());
}

/// The standard library's `http.server` wrapped in blocking `ssl` (OpenSSL's socket BIO: the
/// socket calls happen inside `SSL_read`/`SSL_write`), a thread per connection, which loads
/// OpenSSL only after the agent watches it: the library is found through the loader's record,
/// then read as above.
#[root_test]
fn tls_of_blocking_sockets_loaded_late_is_read_too() {
    use integration::tls_proxy::TestPki;
    let pki = TestPki::generate();
    let (mut server, mut out) = blocking_tls_server(&pki);
    let agent = Agent::start(&["--watch-port", &server.port.to_string()]);
    let s = agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    assert_eq!(s.sum("inferscope_http_tls_processes", &[]), 0.0);
    go_tls(&mut server, &mut out);
    agent.wait_for("the late OpenSSL to be probed", |s| {
        s.sum("inferscope_http_tls_processes", &[]) >= 1.0
    });
    timed_through_tls(&agent, server.port, &pki, 4, true);
    assert!(agent.stop().success());
}

/// The same server with `probes.tls_internal` off: OpenSSL's exported calls are probed
/// themselves (as on a library whose wrappers cannot be followed), each single-stepped, and
/// read as accurately.
#[root_test]
fn tls_read_on_the_exported_calls_is_timed_the_same() {
    let pki = integration::tls_proxy::TestPki::generate();
    let (server, _out, agent) =
        agent_on_a_tls_server(&pki, &[("INFERSCOPE_PROBES__TLS_INTERNAL", "false")], 0);
    timed_through_tls(&agent, server.port, &pki, 4, false);
    assert!(agent.stop().success());
}

/// A thread-per-connection server waits in a blocking `accept` that it entered before the agent
/// started: the connection that call returns is followed all the same (its arguments are read
/// from the registers at its exit), and its TLS with it.
#[root_test]
fn a_connection_accepted_by_a_call_older_than_the_agent_is_followed() {
    let pki = integration::tls_proxy::TestPki::generate();
    // 300 ms: its accept loop enters `accept` and waits there before the agent starts.
    let (server, _out, agent) = agent_on_a_tls_server(&pki, &[], 300);
    timed_through_tls(&agent, server.port, &pki, 2, true);
    assert!(agent.stop().success());
}

/// The TLS probes belong to the http family: shed with it (their traps are most of what
/// reading TLS costs the server, so a shed that left them would relieve nothing while no
/// request is timed), the server's OpenSSL is left as its file has it; back with the family,
/// it is probed again and a new request inside TLS is timed as its client timed it.
#[root_test]
fn the_tls_probes_are_shed_with_the_http_family_and_come_back_with_it() {
    let pki = integration::tls_proxy::TestPki::generate();
    let (server, _out, agent) = agent_on_a_tls_server(
        &pki,
        &[
            ("INFERSCOPE_PROBES__HTTP_BUDGET_CORE_SHARE", "0.05"),
            ("INFERSCOPE_PROBES__SHED_COOLDOWN_SECS", "3"),
        ],
        0,
    );
    let pid = server.child.id();
    assert!(libssl_patched(pid), "no probe in the server's OpenSSL");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = syscall_flood(2, &stop);
    let http = [("probe", "http")];
    agent.wait_for("the http family and the TLS probes to be shed", |s| {
        s.sum("inferscope_probe_shed", &http) == 1.0
            && s.sum("inferscope_http_tls_processes", &[]) == 0.0
    });
    // Unregistered: the kernel has put OpenSSL's own instructions back.
    assert!(!libssl_patched(pid), "a probe left in the server's OpenSSL");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in flood {
        t.join().unwrap();
    }
    agent.wait_for("the family and the TLS probes to be back", |s| {
        s.sum("inferscope_probe_shed", &http) == 0.0
            && s.sum("inferscope_http_tls_processes", &[]) == 1.0
    });
    assert!(libssl_patched(pid), "OpenSSL not probed again");
    timed_through_tls(&agent, server.port, &pki, 2, true);
    assert!(agent.stop().success());
}

/// Whether a uprobe is in the code of the `libssl` that process `pid` maps: its executable
/// mapping differs from the file's bytes (a probe writes a breakpoint into the process's copy
/// of the page).
fn libssl_patched(pid: u32) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| l.contains("libssl.so") && l.split_whitespace().nth(1) == Some("r-xp"))
        .unwrap_or_else(|| panic!("no libssl code in {pid}'s maps:\n{maps}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let (start, end) = f[0].split_once('-').unwrap();
    let start = u64::from_str_radix(start, 16).unwrap();
    let len = (u64::from_str_radix(end, 16).unwrap() - start) as usize;
    let offset = u64::from_str_radix(f[2], 16).unwrap();
    let mut file = std::fs::File::open(f[5]).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut want = Vec::new();
    file.take(len as u64).read_to_end(&mut want).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    mem.seek(SeekFrom::Start(start)).unwrap();
    let mut have = vec![0u8; want.len()];
    mem.read_exact(&mut have).unwrap();
    have != want
}

/// [`blocking_tls_server`] serving with OpenSSL loaded, then, `settle_ms` later, an agent
/// (with `env`) watching it that has probed its OpenSSL; the server's stdout is kept open.
fn agent_on_a_tls_server(
    pki: &integration::tls_proxy::TestPki,
    env: &[(&str, &str)],
    settle_ms: u64,
) -> (Server, std::io::BufReader<std::process::ChildStdout>, Agent) {
    let (mut server, mut out) = blocking_tls_server(pki);
    go_tls(&mut server, &mut out);
    std::thread::sleep(std::time::Duration::from_millis(settle_ms));
    let agent = Agent::start_with_env(&["--watch-port", &server.port.to_string()], env);
    agent.wait_for("the server's OpenSSL to be probed", |s| {
        s.sum("inferscope_http_tls_processes", &[]) >= 1.0
    });
    (server, out, agent)
}

/// `tls_blocking_server.py`, listening, OpenSSL not loaded yet; its stdout.
fn blocking_tls_server(
    pki: &integration::tls_proxy::TestPki,
) -> (Server, std::io::BufReader<std::process::ChildStdout>) {
    use std::io::BufRead;
    let port = free_port();
    // Killed and reaped when dropped, as the stand-in is.
    let mut server = Server {
        child: Command::new("python3")
            .arg(servers_dir().join("tls_blocking_server.py"))
            .arg(port.to_string())
            .arg(&pki.server_cert_pem)
            .arg(&pki.server_key_pem)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
        port,
    };
    let mut out = std::io::BufReader::new(server.child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    (server, out)
}

/// Has the server load OpenSSL and serve.
fn go_tls(server: &mut Server, out: &mut std::io::BufReader<std::process::ChildStdout>) {
    use std::io::{BufRead, Write};
    server
        .child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "tls");
}

//! Root tier of the `http` family on gRPC: the real agent watches a real grpcio server
//! (tests/servers/grpc_server.py: C-core HTTP/2, generic handlers) driven by grpcio clients
//! (tests/servers/grpc_client.py), and is compared with what the clients saw.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    time::Duration,
};

use integration::*;

struct GrpcServer {
    child: Child,
    port: u16,
}

impl GrpcServer {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .arg(servers_dir().join("grpc_server.py"))
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 (run `cargo xtask setup` for grpcio)");
        eventually("the gRPC server", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Self { child, port }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(args: &[&str]) -> serde_json::Value {
    python_client("grpc_client.py", args)
}

fn start_agent(server: &GrpcServer) -> Agent {
    let agent = Agent::start(&["--watch-port", &server.port.to_string()]);
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    agent
}

fn is_grpc(line: &str) -> bool {
    line.contains("protocol=\"grpc\"") || line.contains("protocol=grpc ")
}

#[root_test]
fn streamed_calls_are_timed_as_their_client_saw_them() {
    let server = GrpcServer::start();
    let agent = start_agent(&server);
    let port = server.port.to_string();
    let n = 6;
    let truth = client(&["timing", &port, &n.to_string()]);
    let truth = truth.as_array().unwrap().clone();
    let s = agent.wait_for("the timed calls", |s| {
        s.sum("llm_requests_total", &[("protocol", "grpc")]) >= n as f64
    });
    assert_timed_as_the_client(&agent, &truth, |l| {
        is_grpc(l) && l.contains("/llm.Generator/Generate")
    });
    assert_eq!(
        s.sum(
            "llm_requests_total",
            &[("protocol", "grpc"), ("status_code", "200")]
        ),
        n as f64,
        "{}",
        s.text
    );
    // Six messages each: the output tokens of a stream are its messages.
    assert_eq!(s.sum("llm_tokens_output_total", &[]), (6 * n) as f64);
    assert_eq!(
        s.sum("llm_time_per_output_token_seconds_count", &[]),
        (5 * n) as f64
    );
    assert_eq!(s.sum("llm_request_errors_total", &[]), 0.0, "{}", s.text);
    assert_eq!(s.sum("llm_requests_in_flight", &[]), 0.0);
    assert!(agent.stop().success());
}

#[root_test]
fn thirty_two_streams_on_one_connection_are_counted_apart() {
    let server = GrpcServer::start();
    let agent = start_agent(&server);
    let truth = client(&["concurrent", &server.port.to_string(), "32", "4"]);
    assert_eq!(truth["messages"], 128);
    let s = agent.wait_for("32 calls", |s| {
        s.sum("llm_requests_total", &[("protocol", "grpc")]) >= 32.0
            && s.sum("llm_requests_in_flight", &[]) == 0.0
    });
    assert_eq!(s.sum("llm_requests_total", &[]), 32.0, "{}", s.text);
    assert_eq!(s.sum("llm_tokens_output_total", &[]), 128.0, "{}", s.text);
    assert_eq!(s.sum("llm_time_to_first_token_seconds_count", &[]), 32.0);
    assert_eq!(
        s.sum("inferscope_http_bad_input_total", &[]),
        0.0,
        "{}",
        s.text
    );
    assert!(agent.stop().success());
}

#[root_test]
fn kserve_calls_name_their_model_and_grpc_errors_are_typed() {
    let server = GrpcServer::start();
    let agent = start_agent(&server);
    let port = server.port.to_string();
    client(&["infer", &port, "llama-7b", "5"]);
    let code = client(&["status", &port, "8"]);
    assert_eq!(code["code"], 8);
    let s = agent.wait_for("the calls", |s| s.sum("llm_requests_total", &[]) >= 6.0);
    assert_eq!(
        s.sum(
            "llm_requests_total",
            &[("model", "llama-7b"), ("protocol", "grpc")]
        ),
        5.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum(
            "llm_request_errors_total",
            &[
                ("error_type", "grpc_resource_exhausted"),
                ("protocol", "grpc")
            ]
        ),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(s.sum("llm_request_errors_total", &[]), 1.0);
    assert!(agent.stop().success());
}

#[root_test]
fn a_channel_opened_before_the_agent_is_still_timed() {
    let server = GrpcServer::start();
    let mut py = timing_client("python3")
        .arg(servers_dir().join("grpc_client.py"))
        .args(["preopen", &server.port.to_string(), "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "open");
    let agent = start_agent(&server);
    py.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(py.wait().unwrap().success());
    let truth: serde_json::Value = serde_json::from_str(&line).unwrap();
    let truth = truth.as_array().unwrap().clone();
    let s = agent.wait_for("the calls on the old channel", |s| {
        s.sum("llm_requests_total", &[("protocol", "grpc")]) >= 4.0
    });
    assert_timed_as_the_client(&agent, &truth, is_grpc);
    assert_eq!(
        s.sum(
            "llm_requests_total",
            &[("protocol", "grpc"), ("status_code", "200")]
        ),
        4.0,
        "{}",
        s.text
    );
    assert_eq!(s.sum("llm_tokens_output_total", &[]), 24.0, "{}", s.text);
    assert!(agent.stop().success());
}

/// tests/servers/tonic-llm: the same service on tonic (hyper's HTTP/2 and HPACK), timed by
/// tonic's own client.
#[root_test]
fn a_tonic_service_is_timed_as_its_client_saw_it() {
    let port = free_port();
    let mut server = Command::new(bin("tonic-llm"))
        .args(["serve", &port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("tonic-llm (built by `cargo xtask test`)");
    eventually("the tonic server", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let agent = Agent::start(&["--watch-port", &port.to_string()]);
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    let out = run_ok(timing_client(bin("tonic-llm")).args(["timing", &port.to_string(), "4"]));
    let truth: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let truth = truth.as_array().unwrap().clone();
    let s = agent.wait_for("the tonic calls", |s| {
        s.sum("llm_requests_total", &[("protocol", "grpc")]) >= 4.0
    });
    assert_timed_as_the_client(&agent, &truth, |l| {
        is_grpc(l) && l.contains("/llm.Generator/Generate")
    });
    assert_eq!(
        s.sum(
            "llm_requests_total",
            &[("protocol", "grpc"), ("status_code", "200")]
        ),
        4.0,
        "{}",
        s.text
    );
    assert_eq!(s.sum("llm_tokens_output_total", &[]), 24.0, "{}", s.text);
    assert_eq!(s.sum("llm_request_errors_total", &[]), 0.0, "{}", s.text);
    assert!(agent.stop().success());
    let _ = server.kill();
    let _ = server.wait();
}

/// SGLang's scheduler service carries its token counts in its messages (its
/// `GenerateResponse` layout): they are the call's input and output tokens, not the count of
/// messages (which has one more, the completion).
#[root_test]
fn sglang_generate_calls_count_the_tokens_their_messages_carry() {
    let server = GrpcServer::start();
    let agent = start_agent(&server);
    let got = client(&["sglang", &server.port.to_string(), "37", "20"]);
    assert_eq!(got["messages"], 21);
    let s = agent.wait_for("the call", |s| {
        s.sum("llm_requests_total", &[("protocol", "grpc")]) >= 1.0
    });
    assert_eq!(s.sum("llm_tokens_input_total", &[]), 37.0, "{}", s.text);
    assert_eq!(s.sum("llm_tokens_output_total", &[]), 20.0, "{}", s.text);
    assert!(agent.stop().success());
}

const SHARD_MODEL: &str = "test-org/shard-model";

struct Shard(TgiShard);

impl std::ops::Deref for Shard {
    type Target = TgiShard;
    fn deref(&self) -> &TgiShard {
        &self.0
    }
}

impl Shard {
    fn start() -> Self {
        Self(TgiShard::start(SHARD_MODEL))
    }

    fn agent(&self) -> Agent {
        let agent = Agent::start(&[]);
        agent.wait_for("the shard to be watched", |s| {
            s.sum("inferscope_http_watched_processes", &[]) >= 1.0
        });
        agent
    }
}

/// The agent's `engine call finished` lines: (method, status, latency µs, batch) each.
fn engine_lines(log: &str) -> Vec<(String, String, u64, Option<u64>)> {
    let field = |line: &str, name: &str| -> Option<String> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        let value = line[at..].split(' ').next().unwrap_or("");
        Some(value.trim_matches('"').to_string())
    };
    log.lines()
        .filter(|l| l.contains("engine call finished"))
        .map(|l| {
            (
                field(l, "method").unwrap_or_default(),
                field(l, "status").unwrap_or_default(),
                field(l, "latency_us")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u64::MAX),
                field(l, "batch").and_then(|v| v.parse().ok()),
            )
        })
        .collect()
}

/// Each call the router made, as the agent timed it: the same method, within 1 ms above and
/// 2 ms (plus 10 %) below what the client measured (`assert_timed_as_the_client`'s bound),
/// and a `Decode`'s batch as the client sent it.
fn assert_calls_timed_as_the_router(
    agent: &Agent,
    truth: &[serde_json::Value],
    methods: &[&str],
    want_status: &str,
) {
    let seen = engine_lines(&agent.log());
    assert_eq!(seen.len(), truth.len(), "agent log:\n{}", agent.log());
    for (i, ((method, status, us, batch), t)) in seen.iter().zip(truth).enumerate() {
        assert_eq!(method, methods[i], "call {i}");
        assert_eq!(status, want_status, "call {i}");
        let want_batch = t["batch"].as_u64().filter(|_| method == "Decode");
        assert_eq!(*batch, want_batch, "call {i} ({method}) batch");
        let Some(client_ms) = t["ms"].as_f64() else {
            continue; // not timed by the client
        };
        let agent_ms = *us as f64 / 1000.0;
        assert!(
            agent_ms <= client_ms + 1.0 && agent_ms >= client_ms - (2.0 + 0.10 * client_ms),
            "call {i} ({method}): agent {agent_ms} ms, client {client_ms:.3} ms"
        );
    }
}

/// TGI's router → shard link: gRPC over a Unix socket, each batch step a call. Counted as
/// engine calls by method (not as users' requests), each timed as the router saw it.
#[root_test]
fn tgi_shard_calls_over_a_unix_socket_are_engine_steps_timed_as_the_router_saw_them() {
    let shard = Shard::start();
    let agent = shard.agent();
    let socket = shard.socket.to_str().unwrap();
    let out = run_ok(&mut tgi_router(&["shard", socket, "6"]));
    let truth: Vec<serde_json::Value> = serde_json::from_slice(&out).unwrap();
    let s = agent.wait_for("the shard's calls", |s| {
        s.sum("llm_engine_calls_total", &[]) >= 15.0
    });
    let calls = |method: &str| {
        s.sum(
            "llm_engine_calls_total",
            &[("method", method), ("status", "ok"), ("model", SHARD_MODEL)],
        )
    };
    assert_eq!(
        ["ServiceDiscovery", "Info", "Health", "Prefill", "Decode"].map(calls),
        [2.0, 2.0, 2.0, 2.0, 7.0],
        "{}",
        s.text
    );
    assert_eq!(s.sum("llm_engine_calls_total", &[]), 15.0, "{}", s.text);
    assert_eq!(
        s.sum(
            "llm_engine_call_duration_seconds_count",
            &[("method", "Decode"), ("model", SHARD_MODEL)]
        ),
        7.0,
        "{}",
        s.text
    );
    // Each Decode's batch, as the router sent it (one of 300 requests).
    let batch = |series: &str| {
        s.sum(
            &format!("llm_engine_decode_batch_size_{series}"),
            &[("model", SHARD_MODEL)],
        )
    };
    assert_eq!(
        [batch("count"), batch("sum")],
        [7.0, (1 + 1 + 2 + 3 + 300 + 5 + 6) as f64],
        "{}",
        s.text
    );
    // Not users' requests: nothing in the request series, nothing left in flight.
    assert_eq!(s.sum("llm_requests_total", &[]), 0.0, "{}", s.text);
    assert_eq!(s.sum("llm_requests_in_flight", &[]), 0.0, "{}", s.text);
    let mut methods = vec!["Health", "ServiceDiscovery", "Info", "Prefill", "Decode"];
    methods.extend(["ServiceDiscovery", "Info", "Health", "Prefill"]);
    methods.extend(["Decode"; 6]);
    assert_calls_timed_as_the_router(&agent, &truth, &methods, "ok");
    assert!(agent.stop().success());
}

/// The router's channels to its shards are opened at its start, long before an agent that
/// restarts: the connection is seeded from the shard's Unix sockets and its calls counted and
/// timed. A `:path` the router's HPACK encoder inserted before the agent started is named by
/// an index the agent never saw: those calls are `unknown`, never guessed; a method first
/// sent since is named. So is the shard's `grpc-status`, inserted at its first answer.
#[root_test]
fn a_router_channel_opened_before_the_agent_is_followed() {
    let shard = Shard::start();
    let socket = shard.socket.to_str().unwrap();
    let mut py = tgi_router(&["shard-preopen", socket, "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "open");
    let agent = shard.agent();
    py.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(py.wait().unwrap().success());
    let truth: Vec<serde_json::Value> = serde_json::from_str(&line).unwrap();
    let s = agent.wait_for("the calls on the old channel", |s| {
        s.sum("llm_engine_calls_total", &[]) >= 6.0
    });
    // The shard's `grpc-status: 0` was inserted into its table before the agent too: the
    // calls ended with a status, which is unknown.
    let calls = |method: &str| {
        s.sum(
            "llm_engine_calls_total",
            &[
                ("method", method),
                ("status", "unknown"),
                ("model", SHARD_MODEL),
            ],
        )
    };
    assert_eq!(
        ["unknown", "ClearCache", "Decode"].map(calls),
        [4.0, 2.0, 0.0],
        "{}",
        s.text
    );
    assert_eq!(s.sum("llm_requests_total", &[]), 0.0, "{}", s.text);
    let mut methods = vec!["ClearCache"];
    methods.extend(["unknown"; 4]);
    methods.push("ClearCache");
    assert_calls_timed_as_the_router(&agent, &truth, &methods, "unknown");
    assert!(agent.stop().success());
}

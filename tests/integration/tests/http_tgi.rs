//! Root tier of the `http` family against TGI's API: the real agent watches the axum TGI
//! stand-in (`tests/servers/tgi`, a binary named `text-generation-router` like TGI's router,
//! so the agent finds it by its command line, with no `--watch-port`) and is compared with
//! what a raw-socket client saw. Each test serves its own model id, so its assertions only
//! count its own server.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::Duration,
};

use integration::*;
use tgi_stand_in::{Client, Request, Timed};

struct Tgi {
    child: Child,
    port: u16,
}

impl Tgi {
    fn start(model_id: &str, extra: &[&str]) -> Tgi {
        let port = free_port();
        let child = Command::new(bin("text-generation-router"))
            .args(["--port", &port.to_string(), "--model-id", model_id])
            .args(["--ttft-ms", "20", "--token-ms", "5"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("text-generation-router (the TGI stand-in)");
        eventually("the TGI stand-in", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Tgi { child, port }
    }

    fn client(&self) -> Client {
        Client::connect(self.port).expect("connect to the TGI stand-in")
    }
}

impl Drop for Tgi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent with no port to watch: it must find the server as TGI by its command line.
fn start_agent() -> Agent {
    let agent = Agent::start(&[]);
    agent.wait_for("the TGI stand-in to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    // The requests' `model` label (the server's `--model-id`, TGI's requests name none)
    // then shows that it is this test's server that is watched.
    agent
}

fn model_of(s: &Scrape, model: &str, name: &str) -> f64 {
    s.sum(name, &[("model", model)])
}

#[root_test]
fn tgi_counts_status_codes_errors_and_tokens_are_exact() {
    let model = format!("tgi-org/counts-{}", std::process::id());
    let tgi = Tgi::start(&model, &[]);
    let agent = start_agent();
    let mut c = tgi.client();
    let mut requests: HashMap<u16, u64> = HashMap::new();
    let mut errors: HashMap<&str, u64> = HashMap::new();
    let mut output = 0;
    let check = |t: Timed, want_status: u16, requests: &mut HashMap<u16, u64>| {
        assert_eq!(
            t.status,
            want_status,
            "{}",
            String::from_utf8_lossy(&t.body)
        );
        *requests.entry(t.status).or_default() += 1;
        t
    };
    // Streamed without details: output tokens = token events.
    for n in [3, 5, 1] {
        let t = check(c.send(&Request::new(true, n)).unwrap(), 200, &mut requests);
        assert_eq!(t.token_events, n);
        output += t.token_events;
    }
    // Streamed with details: the last event's generated_tokens.
    let t = check(
        c.send(&Request::new(true, 4).details()).unwrap(),
        200,
        &mut requests,
    );
    assert_eq!(t.generated_tokens, Some(4));
    output += 4;
    // Non-streamed with details: details.generated_tokens.
    let t = check(
        c.send(&Request::new(false, 6).details()).unwrap(),
        200,
        &mut requests,
    );
    assert_eq!(t.generated_tokens, Some(6));
    output += 6;
    // Non-streamed without details: TGI says nothing of the tokens; none are counted.
    check(c.send(&Request::new(false, 2)).unwrap(), 200, &mut requests);
    // Errors, on both routes.
    for (stream, kind, status, err) in [
        (false, "429", 429, "rate_limited"),
        (true, "500", 500, "http_5xx"),
        (true, "context", 422, "context_length"),
        (false, "context", 422, "context_length"),
    ] {
        check(
            c.send(&Request::new(stream, 2).header("x-error", kind))
                .unwrap(),
            status,
            &mut requests,
        );
        *errors.entry(err).or_default() += 1;
    }
    // A validation error that is not about the context length.
    let mut empty = Request::new(false, 2);
    empty.inputs = "";
    check(c.send(&empty).unwrap(), 422, &mut requests);
    *errors.entry("http_4xx").or_default() += 1;

    let total: u64 = requests.values().sum();
    let s = agent.wait_for("every request", |s| {
        model_of(s, &model, "llm_requests_total") >= total as f64
            && model_of(s, &model, "llm_requests_in_flight") == 0.0
    });
    for (status, n) in &requests {
        let got = s.sum(
            "llm_requests_total",
            &[("model", &model), ("status_code", &status.to_string())],
        );
        assert_eq!(got, *n as f64, "status {status}\n{}", s.text);
    }
    assert_eq!(
        model_of(&s, &model, "llm_requests_total"),
        total as f64,
        "{}",
        s.text
    );
    for (err, n) in &errors {
        let got = s.sum(
            "llm_request_errors_total",
            &[("model", &model), ("error_type", err)],
        );
        assert_eq!(got, *n as f64, "{err}\n{}", s.text);
    }
    assert_eq!(
        model_of(&s, &model, "llm_tokens_output_total"),
        output as f64,
        "{}",
        s.text
    );
    // TGI reports no prompt token count.
    assert_eq!(model_of(&s, &model, "llm_tokens_input_total"), 0.0);
    // Every streamed 200 has a TTFT; the four without details and with it.
    assert_eq!(
        model_of(&s, &model, "llm_time_to_first_token_seconds_count"),
        4.0,
        "{}",
        s.text
    );
    // 3+5+1+4 token events: (2+4+0+3) gaps.
    assert_eq!(
        model_of(&s, &model, "llm_time_per_output_token_seconds_count"),
        9.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum("inferscope_http_bad_input_total", &[]),
        0.0,
        "{}",
        s.text
    );
    assert!(agent.stop().success());
}

/// `http request finished` debug lines of the agent for `model`, in order:
/// (ttft, gaps, latency, output tokens) in µs.
fn finished_lines(log: &str, model: &str) -> Vec<(u64, Vec<u64>, u64, u64)> {
    let field = |line: &str, name: &str| -> Option<String> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        let rest = &line[at..];
        let end = if rest.starts_with('[') {
            rest.find(']')? + 1
        } else if let Some(quoted) = rest.strip_prefix('"') {
            quoted.find('"')? + 2
        } else {
            rest.find(' ').unwrap_or(rest.len())
        };
        Some(rest[..end].trim_matches('"').to_string())
    };
    let num = |l: &str, name: &str| field(l, name).and_then(|v| v.parse().ok()).unwrap_or(0);
    log.lines()
        .filter(|l| {
            l.contains("http request finished") && field(l, "model").as_deref() == Some(model)
        })
        .map(|l| {
            let gaps = field(l, "gaps_us")
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .split(',')
                .filter_map(|g| g.trim().parse().ok())
                .collect();
            (
                num(l, "ttft_us"),
                gaps,
                num(l, "latency_us"),
                num(l, "output_tokens"),
            )
        })
        .collect()
}

#[root_test]
fn tgi_ttft_token_gaps_and_latency_match_the_client_within_2ms() {
    let model = format!("tgi-org/timed-{}", std::process::id());
    // The agent times the server's writes; with Nagle on (axum's default, TGI's too) the
    // kernel may hold a token until the client acknowledges the previous one, which the
    // client would see as a late token that the server did not cause.
    let tgi = Tgi::start(&model, &["--tcp-nodelay"]);
    let agent = start_agent();
    let mut c = tgi.client();
    let n = 8;
    let truth: Vec<Timed> = (0..n)
        .map(|i| {
            let req = Request::new(true, 5 + i % 3)
                .header("x-ttft-ms", 30 + 5 * i)
                .header("x-token-ms", 10);
            let t = c.send(&req).unwrap();
            assert_eq!(t.status, 200);
            t
        })
        .collect();
    agent.wait_for("the timed requests", |s| {
        model_of(s, &model, "llm_requests_total") >= n as f64
    });
    let seen = finished_lines(&agent.log(), &model);
    assert_eq!(seen.len(), n as usize, "agent lines:\n{}", agent.log());
    // A gap is read by the client between two of its own wakeups: either may be late by its
    // scheduling on a busy 2-core VM, so the bound is 2 ms plus 10 % of the client's gap, either
    // way (as `integration::assert_timed_as_the_client` has it for the other servers).
    let close = |what: &str, agent_us: u64, client: Duration| {
        let agent_ms = agent_us as f64 / 1000.0;
        let client_ms = client.as_secs_f64() * 1000.0;
        assert!(
            (agent_ms - client_ms).abs() <= 2.0 + 0.10 * client_ms,
            "{what}: agent {agent_ms:.3} ms, client {client_ms:.3} ms"
        );
    };
    // TTFT and latency start when the client sends and end when it reads: the server's socket
    // sees the request after the send and the answer before the read, so the agent's figure
    // is at most the client's (1 ms for the two clocks' reads). The client's clock also counts
    // its own scheduling (and, for the first request, the connection's setup), which a busy
    // 2-core VM stretches by a few ms: the bound below is 2 ms plus 10 % of the client's.
    let inside = |what: &str, agent_us: u64, client: Duration| {
        let agent_ms = agent_us as f64 / 1000.0;
        let client_ms = client.as_secs_f64() * 1000.0;
        assert!(
            agent_ms <= client_ms + 1.0 && agent_ms >= client_ms - (2.0 + 0.10 * client_ms),
            "{what}: agent {agent_ms:.3} ms, client {client_ms:.3} ms"
        );
    };
    for (i, (t, (ttft, gaps, latency, tokens))) in truth.iter().zip(&seen).enumerate() {
        assert_eq!(*tokens, t.token_events, "request {i} output tokens");
        inside(&format!("request {i} TTFT"), *ttft, t.ttft.unwrap());
        inside(&format!("request {i} latency"), *latency, t.latency);
        assert_eq!(gaps.len(), t.gaps.len(), "request {i} token gaps");
        for (j, (g, w)) in gaps.iter().zip(&t.gaps).enumerate() {
            close(&format!("request {i} gap {j}"), *g, *w);
        }
    }
    let s = agent.scrape();
    let ttft_sum: f64 = seen.iter().map(|x| x.0 as f64 / 1e6).sum();
    let got = model_of(&s, &model, "llm_time_to_first_token_seconds_sum");
    assert!((got - ttft_sum).abs() < 1e-3, "{got} vs {ttft_sum}");
    let tokens: u64 = truth.iter().map(|t| t.token_events).sum();
    assert_eq!(
        model_of(&s, &model, "llm_tokens_output_total"),
        tokens as f64
    );
    assert!(agent.stop().success());
}

#[root_test]
fn tgi_thirty_two_streaming_connections_at_once() {
    let model = format!("tgi-org/concurrent-{}", std::process::id());
    let tgi = Tgi::start(&model, &[]);
    let agent = start_agent();
    let (conns, per_conn, tokens) = (32, 4, 16);
    let results: Vec<Timed> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..conns)
            .map(|_| {
                s.spawn(|| {
                    let mut c = tgi.client();
                    (0..per_conn)
                        .map(|_| {
                            let req = Request::new(true, tokens)
                                .header("x-ttft-ms", 5)
                                .header("x-token-ms", 1);
                            c.send(&req).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let want = (conns * per_conn) as f64;
    assert!(results
        .iter()
        .all(|t| t.status == 200 && t.token_events == tokens));
    let s = agent.wait_for("every request", |s| {
        model_of(s, &model, "llm_requests_total") >= want
            && model_of(s, &model, "llm_requests_in_flight") == 0.0
    });
    assert_eq!(
        s.sum(
            "llm_requests_total",
            &[("model", &model), ("status_code", "200")]
        ),
        want,
        "{}",
        s.text
    );
    assert_eq!(
        model_of(&s, &model, "llm_tokens_output_total"),
        want * tokens as f64,
        "{}",
        s.text
    );
    assert_eq!(
        model_of(&s, &model, "llm_time_to_first_token_seconds_count"),
        want
    );
    assert_eq!(
        model_of(&s, &model, "llm_time_per_output_token_seconds_count"),
        want * (tokens - 1) as f64
    );
    assert_eq!(
        s.sum("inferscope_events_lost_total", &[("source", "http")]),
        0.0
    );
    assert!(agent.stop().success());
}

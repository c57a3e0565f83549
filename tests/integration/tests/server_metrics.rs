//! Root tier of server metrics: the real agent scrapes a real uvicorn + FastAPI server whose
//! own `/metrics` is written by the official `prometheus_client` with vLLM's, TGI's and
//! SGLang's metric families (tests/servers/server_metrics.py), re-exports them with the
//! target's labels and derives the `llm_*` series; `promtool` checks the whole exposition.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use integration::*;

/// A short interval so the test does not wait; a body limit the `oversized` body exceeds.
const SCRAPE_ENV: &[(&str, &str)] = &[
    ("INFERSCOPE_SCRAPE__INTERVAL_MS", "200"),
    ("INFERSCOPE_SCRAPE__TIMEOUT_MS", "3000"),
    ("INFERSCOPE_SCRAPE__MAX_BYTES", "1048576"),
];

fn start_agent(servers: &[&OpenAiServer]) -> Agent {
    let mut args = Vec::new();
    for s in servers {
        args.push("--watch-port".to_string());
        args.push(s.port.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start_with_env(&args, SCRAPE_ENV)
}

/// `promtool check metrics` on the agent's exposition: a failure names promtool's complaint.
fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (run `cargo xtask setup`: Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lint remarks about the servers' own naming are theirs; a parse error is ours.
    assert!(
        !said.contains("error while linting") && !said.contains("parsing error"),
        "promtool rejects the exposition: {said}\n{text}"
    );
}

#[test]
fn vllm_metrics_are_reexported_and_derived_and_go_with_the_server() {
    if !root_tier() {
        return;
    }
    let server = OpenAiServer::start_with("llama-3-8b", &["--metrics", "vllm"]);
    server.post(
        "/control/metrics",
        r#"{"running": 3, "waiting": 2, "kv": 0.25, "preemptions": 7, "queries": 200,
            "hits": 50, "prompt_tokens": 1234, "generation_tokens": 567,
            "ttft": [0.05, 0.2], "itl": [0.02], "e2e": [1.5]}"#,
    );
    let agent = start_agent(&[&server]);
    let (pid, port) = (server.pid().to_string(), server.port.to_string());
    let t = [("pid", pid.as_str()), ("port", port.as_str())];
    let s = agent.wait_for("the server's metrics", |s| {
        s.has("vllm:num_requests_running", &t) && s.has("llm_batch_size", &t)
    });
    let model = [("model_name", "llama-3-8b"), ("engine", "0")];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
        let mut l: Vec<(&str, &str)> = t.to_vec();
        l.push(("server", "vllm"));
        l.extend_from_slice(&model);
        l.extend_from_slice(extra);
        l
    };
    let exact = |name: &str, labels: &[(&str, &str)], want: f64| {
        assert!(s.has(name, labels), "{name} {labels:?} missing\n{}", s.text);
        assert_eq!(s.sum(name, labels), want, "{name} {labels:?}\n{}", s.text);
    };
    // Re-exported with their names, types and labels, plus the target's.
    exact("vllm:num_requests_running", &with(&[]), 3.0);
    exact("vllm:num_requests_waiting", &with(&[]), 2.0);
    exact("vllm:kv_cache_usage_perc", &with(&[]), 0.25);
    exact("vllm:prompt_tokens_total", &with(&[]), 1234.0);
    exact("vllm:generation_tokens_total", &with(&[]), 567.0);
    exact("vllm:num_preemptions_total", &with(&[]), 7.0);
    exact("vllm:time_to_first_token_seconds_count", &with(&[]), 2.0);
    exact("vllm:time_to_first_token_seconds_sum", &with(&[]), 0.25);
    exact(
        "vllm:time_to_first_token_seconds_bucket",
        &with(&[("le", "0.1")]),
        1.0,
    );
    exact(
        "vllm:time_to_first_token_seconds_bucket",
        &with(&[("le", "+Inf")]),
        2.0,
    );
    exact("vllm:inter_token_latency_seconds_count", &with(&[]), 1.0);
    exact(
        "vllm:e2e_request_latency_seconds_bucket",
        &with(&[("le", "1.0")]),
        0.0,
    );
    exact(
        "vllm:e2e_request_latency_seconds_bucket",
        &with(&[("le", "2.5")]),
        1.0,
    );
    assert!(
        s.text.contains("# TYPE vllm:prompt_tokens counter\n"),
        "{}",
        s.text
    );
    assert!(
        s.text
            .contains("# TYPE vllm:time_to_first_token_seconds histogram\n"),
        "{}",
        s.text
    );
    assert!(
        s.text.contains(
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        ),
        "{}",
        s.text
    );
    // prometheus_client's start-time gauges are not carried over.
    assert!(!s.text.contains("_created"), "{}", s.text);
    // Derived.
    let d = || -> Vec<(&str, &str)> {
        let mut l: Vec<(&str, &str)> = t.to_vec();
        l.extend([("model", "llama-3-8b"), ("server", "vllm")]);
        l
    };
    exact("llm_batch_size", &d(), 3.0);
    exact("llm_queue_depth", &d(), 2.0);
    exact("llm_kv_cache_usage_ratio", &d(), 0.25);
    exact("llm_kv_cache_hit_ratio", &d(), 0.25);
    exact("llm_preemptions_total", &d(), 7.0);
    exact(
        "inferscope_scrape_up",
        &[("server", "vllm"), ("pid", &pid), ("port", &port)],
        1.0,
    );
    promtool_accepts(&s.text);

    // The values follow the server.
    server.post("/control/metrics", r#"{"running": 5, "hits": 150}"#);
    let s = agent.wait_for("the new values", |s| {
        s.sum("llm_batch_size", &t) == 5.0 && s.sum("llm_kv_cache_hit_ratio", &t) == 0.75
    });
    assert_eq!(s.sum("vllm:num_requests_running", &t), 5.0, "{}", s.text);

    // A stopped server's series disappear.
    drop(server);
    let s = agent.wait_for("the series to go", |s| {
        !s.has("vllm:num_requests_running", &t)
            && !s.has("llm_batch_size", &t)
            && !s.has("inferscope_scrape_up", &t)
    });
    assert!(!s.text.contains("vllm:"), "{}", s.text);
    promtool_accepts(&s.text);
    assert!(agent.stop().success());
}

#[test]
fn older_vllm_names_tgi_and_sglang_map_onto_the_same_derived_series() {
    if !root_tier() {
        return;
    }
    let old = OpenAiServer::start_with("old-model", &["--metrics", "vllm-old"]);
    old.post(
        "/control/metrics",
        r#"{"running": 4, "waiting": 1, "kv": 0.9, "preemptions": 2, "itl": [0.03]}"#,
    );
    let tgi = OpenAiServer::start_with("bigscience/bloom", &["--metrics", "tgi"]);
    tgi.post(
        "/control/metrics",
        r#"{"running": 6, "waiting": 11, "tgi_request_count": 9, "e2e": [0.5, 3.0],
            "prefill": [0.04]}"#,
    );
    let sglang = OpenAiServer::start_with("qwen", &["--metrics", "sglang"]);
    sglang.post(
        "/control/metrics",
        r#"{"running": 2, "waiting": 8, "kv": 0.4, "cache_hit_rate": 0.6}"#,
    );
    let agent = start_agent(&[&old, &tgi, &sglang]);
    let pids = [old.pid(), tgi.pid(), sglang.pid()].map(|p| p.to_string());
    let s = agent.wait_for("three servers' derived series", |s| {
        pids.iter()
            .all(|p| s.has("llm_batch_size", &[("pid", p.as_str())]))
    });
    let derived = |pid: &str, model: &str, server: &str, name: &str| -> f64 {
        let l = [("pid", pid), ("model", model), ("server", server)];
        assert!(s.has(name, &l), "{name} {l:?} missing\n{}", s.text);
        s.sum(name, &l)
    };
    let (o, t, g) = (pids[0].as_str(), pids[1].as_str(), pids[2].as_str());
    assert_eq!(derived(o, "old-model", "vllm", "llm_batch_size"), 4.0);
    assert_eq!(derived(o, "old-model", "vllm", "llm_queue_depth"), 1.0);
    assert_eq!(
        derived(o, "old-model", "vllm", "llm_kv_cache_usage_ratio"),
        0.9
    );
    assert_eq!(
        derived(o, "old-model", "vllm", "llm_preemptions_total"),
        2.0
    );
    assert!(
        !s.has("llm_kv_cache_hit_ratio", &[("pid", o)]),
        "no queries yet\n{}",
        s.text
    );
    assert_eq!(
        s.sum("vllm:time_per_output_token_seconds_count", &[("pid", o)]),
        1.0,
        "{}",
        s.text
    );
    // TGI's model comes from its command line.
    assert_eq!(derived(t, "bigscience/bloom", "tgi", "llm_batch_size"), 6.0);
    assert_eq!(
        derived(t, "bigscience/bloom", "tgi", "llm_queue_depth"),
        11.0
    );
    assert_eq!(
        s.sum("tgi_queue_size", &[("pid", t), ("server", "tgi")]),
        11.0
    );
    assert_eq!(s.sum("tgi_request_duration_count", &[("pid", t)]), 2.0);
    assert_eq!(
        s.sum("tgi_request_duration_bucket", &[("pid", t), ("le", "1.0")]),
        1.0
    );
    assert_eq!(
        s.sum(
            "tgi_batch_inference_duration_count",
            &[("pid", t), ("method", "prefill")]
        ),
        1.0
    );
    // TGI writes its counters without `_total`; OpenMetrics names the sample with it.
    assert_eq!(
        s.sum("tgi_request_count_total", &[("pid", t)]),
        9.0,
        "{}",
        s.text
    );
    assert_eq!(derived(g, "qwen", "sglang", "llm_batch_size"), 2.0);
    assert_eq!(derived(g, "qwen", "sglang", "llm_queue_depth"), 8.0);
    assert_eq!(
        derived(g, "qwen", "sglang", "llm_kv_cache_usage_ratio"),
        0.4
    );
    assert_eq!(derived(g, "qwen", "sglang", "llm_kv_cache_hit_ratio"), 0.6);
    promtool_accepts(&s.text);
}

#[test]
fn garbage_and_oversized_bodies_are_counted_and_metrics_stay_valid() {
    if !root_tier() {
        return;
    }
    let server = OpenAiServer::start_with("m", &["--metrics", "vllm"]);
    server.post("/control/metrics", r#"{"running": 1}"#);
    let agent = start_agent(&[&server]);
    let pid = server.pid().to_string();
    let t = [("pid", pid.as_str())];
    agent.wait_for("the first scrape", |s| s.has("llm_batch_size", &t));
    let errors = |s: &Scrape, reason: &str| {
        s.sum(
            "inferscope_scrape_errors_total",
            &[("server", "vllm"), ("reason", reason)],
        )
    };
    for (mode, reason) in [("garbage", "parse"), ("oversized", "oversized")] {
        server.post("/control/metrics", &format!(r#"{{"break": "{mode}"}}"#));
        let s = agent.wait_for(&format!("a {mode} body to be counted"), |s| {
            errors(s, reason) >= 1.0 && s.sum("inferscope_scrape_up", &t) == 0.0
        });
        assert!(!s.has("vllm:num_requests_running", &t), "{}", s.text);
        assert!(!s.has("llm_batch_size", &t), "{}", s.text);
        assert!(s.has("inferscope_scrape_up", &t), "{}", s.text);
        promtool_accepts(&s.text);
    }
    server.post("/control/metrics", r#"{"break": null, "running": 4}"#);
    let s = agent.wait_for("the server back", |s| {
        s.sum("inferscope_scrape_up", &t) == 1.0 && s.sum("llm_batch_size", &t) == 4.0
    });
    promtool_accepts(&s.text);
    assert!(agent.stop().success());
}

/// With the `http` probe family off (no watcher), the scraper finds the servers itself.
#[test]
fn servers_are_scraped_with_the_http_family_disabled() {
    if !root_tier() {
        return;
    }
    let server = OpenAiServer::start_with("solo", &["--metrics", "vllm"]);
    server.post("/control/metrics", r#"{"waiting": 9}"#);
    let port = server.port.to_string();
    let agent = Agent::start_with_env(
        &["--disable-probe", "http", "--watch-port", &port],
        SCRAPE_ENV,
    );
    let pid = server.pid().to_string();
    let t = [("pid", pid.as_str()), ("model", "solo"), ("server", "vllm")];
    let s = agent.wait_for("the server's queue depth", |s| s.has("llm_queue_depth", &t));
    assert_eq!(s.sum("llm_queue_depth", &t), 9.0, "{}", s.text);
    assert_eq!(
        s.sum("inferscope_http_watched_processes", &[]),
        0.0,
        "{}",
        s.text
    );
    assert!(agent.stop().success());
}

/// A pod's server listens in the pod's network namespace, which the agent (host network) does
/// not share: the agent connects from inside it. The server here is in a namespace of its
/// own (`unshare --net`), unreachable from the test's; it is found by its command line.
#[test]
fn a_server_in_another_network_namespace_is_scraped_inside_it() {
    if !root_tier() {
        return;
    }
    let port = free_port().to_string();
    // Unique on this machine: other tests' servers must not match.
    let model = format!("netns-{}-{port}", std::process::id());
    let script = servers_dir().join("openai_server.py");
    let mut child = Command::new("unshare")
        .args(["--net", "--", "sh", "-c"])
        .arg(r#"ip link set lo up && exec python3 "$0" "$@""#)
        .arg(&script)
        .args(["--port", &port, "--model", &model, "--metrics", "vllm"])
        .args(["--metrics-values", r#"{"running": 6, "waiting": 3}"#])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare (util-linux) and ip (iproute2)");
    let pid = child.id().to_string();
    let matcher = format!(r#"["{model}"]"#);
    let mut env = SCRAPE_ENV.to_vec();
    env.push(("INFERSCOPE_HTTP__MATCH_COMMANDS", &matcher));
    let agent = Agent::start_with_env(&[], &env);
    let t = [("pid", pid.as_str()), ("port", port.as_str())];
    let s = agent.wait_for("the namespaced server's metrics", |s| {
        s.has("llm_batch_size", &t)
    });
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err(),
        "the server is reachable from the test's namespace: the test proves nothing"
    );
    assert_eq!(
        s.sum("llm_batch_size", &[("pid", &pid), ("model", &model)]),
        6.0,
        "{}",
        s.text
    );
    assert_eq!(s.sum("vllm:num_requests_waiting", &t), 3.0, "{}", s.text);
    assert_eq!(s.sum("inferscope_scrape_up", &t), 1.0, "{}", s.text);
    let _ = child.kill();
    let _ = child.wait();
    agent.wait_for("the series to go", |s| !s.has("llm_batch_size", &t));
    assert!(agent.stop().success());
}

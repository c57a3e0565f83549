//! Root tier of server metrics: the real agent scrapes a real uvicorn + FastAPI server whose
//! own `/metrics` is written by the official `prometheus_client` with vLLM's, TGI's and
//! SGLang's metric families (tests/servers/server_metrics.py), re-exports them with the
//! target's labels and derives the `llm_*` series; `promtool` checks the whole exposition.
//! A server in a network namespace of its own, joined by a veth pair as a pod's, is scraped
//! by an agent holding only the shipped DaemonSet's capabilities.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
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

#[root_test]
fn vllm_metrics_are_reexported_and_derived_and_go_with_the_server() {
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

#[root_test]
fn older_vllm_names_tgi_and_sglang_map_onto_the_same_derived_series() {
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

#[root_test]
fn garbage_and_oversized_bodies_are_counted_and_metrics_stay_valid() {
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
#[root_test]
fn servers_are_scraped_with_the_http_family_disabled() {
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

/// A pod's server listens in the pod's network namespace, which the agent (its own pod's) does
/// not share: the agent connects from inside it. The server here is in a namespace of its
/// own (`unshare --net`), unreachable from the test's; it is found by its command line.
#[root_test]
fn a_server_in_another_network_namespace_is_scraped_inside_it() {
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

/// The capabilities the shipped DaemonSet adds (deploy/manifests/inferscope.yaml, rendered
/// from the chart; the deploy tests keep the two equal), by the names of `capabilities(7)`
/// without `CAP_`.
fn daemonset_capabilities() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/manifests/inferscope.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/manifests/inferscope.yaml");
    let mut lines = text.lines().map(str::trim);
    lines
        .find(|l| *l == "capabilities:")
        .expect("the DaemonSet adds capabilities");
    lines.find(|l| *l == "add:").expect("capabilities.add");
    lines
        .filter(|l| !l.starts_with('#'))
        .map_while(|l| l.strip_prefix("- "))
        .map(str::to_string)
        .collect()
}

/// A capability set of `/proc/<pid>/status` (`CapEff`, `CapBnd`, ...).
fn capability_set(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(":"))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// The soft and hard RLIMIT_MEMLOCK of a process, as `/proc/<pid>/limits` writes them.
fn memlock_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max locked memory"))
        .expect("Max locked memory in /proc/<pid>/limits");
    let mut words = line.split_whitespace();
    let mut next = || words.next().unwrap_or_default().to_string();
    (next(), next())
}

/// `setpriv` arguments that exec the agent as root holding `caps` only, as a container of
/// the DaemonSet does: bounding set = permitted = effective = `caps`, nothing inheritable or
/// ambient, no_new_privs (`allowPrivilegeEscalation: false`).
fn setpriv_with(caps: &[String]) -> Vec<String> {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect();
    vec![
        "setpriv".into(),
        "--no-new-privs".into(),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
        format!("--bounding-set=-all{list}"),
        "--".into(),
    ]
}

/// A network namespace joined to the test's by a veth pair, as a pod's is to its node: the
/// pod side has an address of a /30 of 10.213.0.0/16 that no interface here uses. Dropping
/// it stops the processes started in it, then deletes the veth pair and the namespace.
struct PodNet {
    name: String,
    host_if: String,
    host_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
    servers: Vec<Child>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2; `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PodNet {
    fn new(tag: u32) -> PodNet {
        let id = std::process::id();
        let used = String::from_utf8(
            Command::new("ip")
                .args(["-o", "-4", "addr"])
                .output()
                .expect("ip (iproute2; `cargo xtask setup`)")
                .stdout,
        )
        .unwrap();
        let slot = (0..16384u32)
            .map(|i| id.wrapping_mul(4).wrapping_add(tag).wrapping_add(i) % 16384)
            .find(|s| {
                let (c, d) = (s / 64, (s % 64) * 4);
                (1..=2).all(|n| !used.contains(&format!("inet 10.213.{c}.{}/", d + n)))
            })
            .expect("a free /30 in 10.213.0.0/16");
        let base = Ipv4Addr::new(10, 213, (slot / 64) as u8, ((slot % 64) * 4) as u8);
        let at = |n: u32| Ipv4Addr::from(u32::from(base) + n);
        // Interface names: at most 15 bytes.
        let name = format!("isc{id}{tag}");
        let net = PodNet {
            host_if: format!("{name}h"),
            name,
            host_ip: at(1),
            pod_ip: at(2),
            servers: Vec::new(),
        };
        let (ns, host_if, pod_if) = (&net.name, &net.host_if, format!("{}p", net.name));
        ip(&["netns", "add", ns]);
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", &pod_if, "netns", ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", net.host_ip),
            "dev",
            host_if,
        ]);
        ip(&["link", "set", host_if, "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", net.pod_ip),
            "dev",
            &pod_if,
        ]);
        ip(&["-n", ns, "link", "set", &pod_if, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        net
    }

    /// The OpenAI stand-in with vLLM's metrics, in the namespace (`ip netns exec` execs it:
    /// the child is the server). Returns its pid.
    fn server(&mut self, args: &[&str]) -> u32 {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "python3"])
            .arg(servers_dir().join("openai_server.py"))
            .args(["--metrics", "vllm"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ip (iproute2) and python3 (`cargo xtask setup`)");
        let pid = child.id();
        self.servers.push(child);
        pid
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Either end's deletion takes the pair.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A GET over plain HTTP/1.1; the body of a 200 answer.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "GET {path}: {answer}");
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The addresses the stand-in's /metrics was fetched from.
fn metrics_clients(server: SocketAddr) -> Vec<String> {
    let body = get(server, "/control/metrics-clients");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// The DaemonSet without CAP_SYS_ADMIN (`uprobeSysAdmin=false`, for kernels that still let
/// CAP_PERFMON attach uprobes): the agent cannot enter a pod's network namespace, so a server
/// listening on every address is scraped at its pod's address (from the server's
/// `/proc/<pid>/net/fib_trie`), one listening on loopback only is counted as a connect
/// failure; with the shipped set, CAP_SYS_ADMIN included, the agent enters the namespace and
/// scrapes both on loopback.
#[root_test]
fn without_cap_sys_admin_a_pod_server_is_scraped_at_the_pod_address() {
    let shipped = daemonset_capabilities();
    assert!(
        shipped.iter().any(|c| c == "BPF") && shipped.iter().any(|c| c == "SYS_ADMIN"),
        "{shipped:?}"
    );
    let shipped: Vec<String> = shipped.into_iter().filter(|c| c != "SYS_ADMIN").collect();
    // A capability this process does not hold cannot be handed on. The ones the agent uses
    // here must be held; CAP_SYS_RESOURCE only raises RLIMIT_MEMLOCK, which BPF maps do not
    // count against since Linux 5.11, so an agent without it proves the same.
    let own = capability_set(std::process::id(), "CapBnd");
    let missing: Vec<&String> = shipped
        .iter()
        .filter(|c| own & (1 << capability_bit(c)) == 0)
        .collect();
    if let Some(c) = missing.iter().find(|c| c.as_str() != "SYS_RESOURCE") {
        let why = format!("this process does not hold CAP_{c}");
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("skipping: {why}");
        return;
    }
    let granted: Vec<String> = shipped
        .iter()
        .filter(|c| !missing.contains(c))
        .cloned()
        .collect();
    if !missing.is_empty() {
        eprintln!("the agent runs without {missing:?}, which this process does not hold");
    }

    let mut net = PodNet::new(0);
    let run = std::process::id();
    let (port, lo_port) = (free_port(), free_port());
    // Unique on this machine: other tests' servers must not match.
    let (model, lo_model) = (
        format!("podnet-{run}-{port}"),
        format!("podlo-{run}-{lo_port}"),
    );
    let pid = net
        .server(&[
            "--host",
            "0.0.0.0",
            "--port",
            &port.to_string(),
            "--model",
            &model,
            "--metrics-values",
            r#"{"running": 6, "waiting": 3, "kv": 0.5, "preemptions": 4}"#,
        ])
        .to_string();
    let lo_pid = net
        .server(&[
            "--port",
            &lo_port.to_string(),
            "--model",
            &lo_model,
            "--metrics-values",
            r#"{"running": 2}"#,
        ])
        .to_string();
    let at_pod = SocketAddr::from((net.pod_ip, port));
    eventually("the pod's server", Duration::from_secs(30), || {
        TcpStream::connect_timeout(&at_pod, Duration::from_secs(1)).ok()
    });
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server is reachable on the test's loopback: the test proves nothing"
    );

    let matcher = format!(r#"["{model}", "{lo_model}"]"#);
    let mut env = SCRAPE_ENV.to_vec();
    env.push(("INFERSCOPE_HTTP__MATCH_COMMANDS", &matcher));
    // A soft RLIMIT_MEMLOCK far below the ring buffer, which kernels before 5.11 charge to it.
    let mut wrapper = vec!["prlimit".to_string(), "--memlock=4096:".into()];
    wrapper.extend(setpriv_with(&granted));
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    ensure_host_tracefs();
    let agent = Agent::start_under(&wrapper, &[], &env);

    // It holds exactly what was granted: no CAP_SYS_ADMIN, so setns(CLONE_NEWNET) fails.
    let eff = capability_set(agent.pid(), "CapEff");
    let want = granted.iter().fold(0u64, |m, c| m | 1 << capability_bit(c));
    assert_eq!(eff, want, "CapEff {eff:#x}, granted {granted:?}");
    assert_eq!(eff & (1 << capability_bit("SYS_ADMIN")), 0);
    assert_eq!(capability_set(agent.pid(), "CapBnd"), want);
    // With them it loaded and attached its probes, and lifted its memlock limit (only as far
    // as the hard limit without CAP_SYS_RESOURCE).
    assert!(!program_ids(agent.pid()).is_empty(), "{}", agent.log());
    let (soft, hard) = memlock_limit(agent.pid());
    if granted.iter().any(|c| c == "SYS_RESOURCE") {
        assert_eq!((soft.as_str(), hard.as_str()), ("unlimited", "unlimited"));
    } else {
        assert_eq!(soft, hard);
        assert_ne!(soft, "4096");
    }

    let (port_s, lo_port_s) = (port.to_string(), lo_port.to_string());
    let t = [("pid", pid.as_str()), ("port", port_s.as_str())];
    let s = agent.wait_for("the pod server's metrics", |s| {
        s.has("vllm:num_requests_running", &t) && s.has("llm_batch_size", &t)
    });
    let exact = |name: &str, extra: &[(&str, &str)], want: f64| {
        let mut l = t.to_vec();
        l.extend_from_slice(extra);
        assert!(s.has(name, &l), "{name} {l:?} missing\n{}", s.text);
        assert_eq!(s.sum(name, &l), want, "{name} {l:?}\n{}", s.text);
    };
    let scraped = [("server", "vllm"), ("model_name", model.as_str())];
    exact("vllm:num_requests_running", &scraped, 6.0);
    exact("vllm:num_requests_waiting", &scraped, 3.0);
    exact("vllm:kv_cache_usage_perc", &scraped, 0.5);
    exact("vllm:num_preemptions_total", &scraped, 4.0);
    let derived = [("server", "vllm"), ("model", model.as_str())];
    exact("llm_batch_size", &derived, 6.0);
    exact("llm_queue_depth", &derived, 3.0);
    exact("llm_kv_cache_usage_ratio", &derived, 0.5);
    exact("llm_preemptions_total", &derived, 4.0);
    exact("inferscope_scrape_up", &[("server", "vllm")], 1.0);
    // The connection came from the node's end of the veth pair, to the pod's address.
    assert_eq!(metrics_clients(at_pod), [net.host_ip.to_string()]);

    // Loopback only: out of reach without CAP_SYS_ADMIN. Port = the listening socket's (it
    // was found, so the failure is the connection's); never told apart as vLLM.
    let lo = [("pid", lo_pid.as_str()), ("port", lo_port_s.as_str())];
    let connect_errors = |s: &Scrape| {
        s.sum(
            "inferscope_scrape_errors_total",
            &[("server", "openai-compatible"), ("reason", "connect")],
        )
    };
    let s = agent.wait_for("the loopback server's connect failure", |s| {
        s.has("inferscope_scrape_up", &lo) && connect_errors(s) >= 1.0
    });
    assert_eq!(s.sum("inferscope_scrape_up", &lo), 0.0, "{}", s.text);
    assert!(!s.has("llm_batch_size", &[("pid", &lo_pid)]), "{}", s.text);
    assert!(
        !s.has("vllm:num_requests_running", &[("pid", &lo_pid)]),
        "{}",
        s.text
    );
    let log = agent.log();
    let said = format!(
        "scrape connect failed pid={lo_pid} addr=127.0.0.1:{lo_port} error=cannot enter the \
         network namespace of pid {lo_pid} (no CAP_SYS_ADMIN) nor connect to its pod address \
         {}:{lo_port}",
        net.pod_ip
    );
    assert!(log.contains(&said), "{log}");

    // The shipped set, CAP_SYS_ADMIN included: the agent enters the namespace and reaches
    // both on loopback.
    let mut with_admin = granted.clone();
    with_admin.push("SYS_ADMIN".into());
    let wrapper = setpriv_with(&with_admin);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let admin = Agent::start_under(&wrapper, &[], &env);
    assert_ne!(
        capability_set(admin.pid(), "CapEff") & (1 << capability_bit("SYS_ADMIN")),
        0
    );
    let s = admin.wait_for("the loopback server's metrics", |s| {
        s.has("llm_batch_size", &lo) && s.has("llm_batch_size", &t)
    });
    let lo_derived = [
        ("pid", lo_pid.as_str()),
        ("port", lo_port_s.as_str()),
        ("model", lo_model.as_str()),
        ("server", "vllm"),
    ];
    assert_eq!(s.sum("llm_batch_size", &lo_derived), 2.0, "{}", s.text);
    assert_eq!(s.sum("llm_batch_size", &t), 6.0, "{}", s.text);
    assert_eq!(s.sum("inferscope_scrape_up", &lo), 1.0, "{}", s.text);
    let mut clients = metrics_clients(at_pod);
    clients.sort();
    let mut want = vec![net.host_ip.to_string(), "127.0.0.1".to_string()];
    want.sort();
    assert_eq!(clients, want);

    // The loopback server answers now, and the agent without CAP_SYS_ADMIN still fails.
    let before = connect_errors(&agent.scrape());
    let s = agent.wait_for("another connect failure", |s| connect_errors(s) > before);
    assert_eq!(s.sum("inferscope_scrape_up", &lo), 0.0, "{}", s.text);
    assert!(!s.has("llm_batch_size", &[("pid", &lo_pid)]), "{}", s.text);
    // Failing on: one warning, with the cause, once 4 scrapes in a row have failed.
    agent.wait_for("4 connect failures", |s| connect_errors(s) >= 4.0);
    let log = agent.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("cannot scrape the server's /metrics"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains(&format!("pid={lo_pid}"))
            && warned[0].contains("reason=\"connect\"")
            && warned[0].contains("no CAP_SYS_ADMIN"),
        "{}",
        warned[0]
    );

    assert!(admin.stop().success());
    assert!(agent.stop().success());
    drop(net);
}

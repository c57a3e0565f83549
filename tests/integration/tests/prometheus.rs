//! Root tier: a real Prometheus (Debian's `prometheus`) scrapes a live agent whose scenario
//! produces every metric family the rules and dashboards read, with deploy/prometheus/'s
//! rule files loaded. Every rule evaluates without error, every recorded series exists,
//! every series an alert reads exists, the alerts the scenario should trip are firing (and
//! the agent-down alert is not), and every query of every deploy/grafana dashboard (panels,
//! annotations, template variables) returns data through Prometheus's HTTP API. A
//! dashboard query that returns nothing fails the test.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration::*;
use prom_scrape::http_get;
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(deploy().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no *.{ext} in deploy/{dir}");
    v
}

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(agent_port: u16, rule_files: &[PathBuf]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - {:?}", p.canonicalize().unwrap().display().to_string()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\n\
             scrape_configs:\n  - job_name: inferscope\n    static_configs:\n      \
             - targets: [\"127.0.0.1:{agent_port}\"]\n        labels:\n          node: node-a\n",
            rules.join("\n")
        );
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's `prometheus`, installed by `cargo xtask setup`)");
        let p = Prometheus {
            child,
            port,
            _dir: dir,
        };
        eventually("Prometheus ready", Duration::from_secs(60), || {
            http_get(p.port, "/-/ready").filter(|(s, _)| *s == 200)
        });
        p
    }

    fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.port, path).expect("Prometheus API");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(status, 200, "{path}: {body}");
        v
    }

    /// Instant query; `Err` carries Prometheus's error.
    fn query(&self, q: &str) -> Result<Vec<Value>, String> {
        let enc: String = form_urlencoded::byte_serialize(q.as_bytes()).collect();
        let (_, body) = http_get(self.port, &format!("/api/v1/query?query={enc}"))
            .expect("Prometheus query API");
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    fn series(&self, selector: &str) -> Vec<Value> {
        let enc: String = form_urlencoded::byte_serialize(selector.as_bytes()).collect();
        self.api(&format!("/api/v1/series?match[]={enc}"))["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The metric selectors an expression reads: names (recorded ones included) with their
/// matchers. Grouping clauses, range durations and function names are not selectors.
fn selectors(expr: &str) -> Vec<String> {
    let grouping =
        regex::Regex::new(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
            .unwrap();
    let ranges = regex::Regex::new(r"\[[^\]]*\]").unwrap();
    let selector = regex::Regex::new(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\(?)").unwrap();
    let keywords = ["and", "or", "unless", "bool", "offset", "inf", "nan"];
    let ungrouped = grouping.replace_all(expr, " ");
    let text = ranges.replace_all(&ungrouped, " ");
    let mut out = Vec::new();
    for c in selector.captures_iter(&text) {
        let name = &c[1];
        let start = c.get(1).unwrap().start();
        // Skip functions, keywords, and identifiers glued to a number (1e-3).
        let prev = text[..start].chars().last();
        if !c[3].is_empty()
            || keywords.contains(&name.to_ascii_lowercase().as_str())
            || prev.is_some_and(|p| p.is_ascii_digit() || p == '.')
        {
            continue;
        }
        out.push(format!("{name}{}", c.get(2).map_or("", |m| m.as_str())));
    }
    out
}

#[test]
fn selectors_are_read_from_expressions() {
    assert_eq!(
        selectors(
            "sum by (job, model) (rate(llm_queue_depth{job=\"x\", a=~\"b|c\"}[5m])) > 10 \
             and on (job) node:gpu_count:sum / ignoring (le) up == 0 and 1e-3 < bool foo"
        ),
        vec![
            "llm_queue_depth{job=\"x\", a=~\"b|c\"}",
            "node:gpu_count:sum",
            "up",
            "foo"
        ]
    );
}

struct Rules {
    records: Vec<String>,
    alerts: Vec<(String, String)>,
    groups: usize,
}

/// Every rule of every file, read with promtool's format (YAML) through Prometheus's own
/// view: the rules API lists what it loaded, so nothing is parsed here but expressions.
fn loaded_rules(p: &Prometheus) -> Rules {
    let v = p.api("/api/v1/rules");
    let mut r = Rules {
        records: Vec::new(),
        alerts: Vec::new(),
        groups: 0,
    };
    for g in v["data"]["groups"].as_array().unwrap() {
        r.groups += 1;
        for rule in g["rules"].as_array().unwrap() {
            let name = rule["name"].as_str().unwrap().to_string();
            let query = rule["query"].as_str().unwrap().to_string();
            match rule["type"].as_str().unwrap() {
                "recording" => r.records.push(name),
                _ => r.alerts.push((name, query)),
            }
        }
    }
    r
}

fn rule_errors(p: &Prometheus) -> Vec<String> {
    let v = p.api("/api/v1/rules");
    let mut errs = Vec::new();
    for g in v["data"]["groups"].as_array().unwrap() {
        for rule in g["rules"].as_array().unwrap() {
            if rule["health"] != "ok" {
                errs.push(format!(
                    "{} ({}): {}",
                    rule["name"], rule["health"], rule["lastError"]
                ));
            }
        }
    }
    errs
}

/// A dashboard query with Grafana's variables set as "All" would: every value.
fn grafana_expr(expr: &str) -> String {
    let mut e = expr
        .replace("$__rate_interval", "1m")
        .replace("$__range_s", "600")
        .replace("$__range", "10m")
        .replace("$__interval", "15s");
    for var in ["node", "namespace", "model", "gpu"] {
        e = e
            .replace(&format!("${{{var}}}"), ".*")
            .replace(&format!("${var}"), ".*");
    }
    assert!(!e.contains('$'), "unhandled variable in {expr}");
    e
}

struct Dashboards {
    /// (dashboard title / panel title, PromQL)
    queries: Vec<(String, String)>,
    /// (variable, metric selector, label)
    variables: Vec<(String, String, String)>,
}

fn dashboards() -> Dashboards {
    let mut d = Dashboards {
        queries: Vec::new(),
        variables: Vec::new(),
    };
    let label_values = regex::Regex::new(r"^label_values\((.*),\s*([A-Za-z_]+)\)$").unwrap();
    for file in files("grafana", "json") {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let title = v["title"].as_str().unwrap();
        for p in v["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                d.queries.push((
                    format!("{title} / {}", p["title"].as_str().unwrap()),
                    grafana_expr(t["expr"].as_str().unwrap()),
                ));
            }
        }
        for a in v["annotations"]["list"].as_array().unwrap() {
            if let Some(e) = a["expr"].as_str() {
                d.queries.push((
                    format!("{title} / annotation {}", a["name"].as_str().unwrap()),
                    grafana_expr(e),
                ));
            }
        }
        for var in v["templating"]["list"].as_array().unwrap() {
            if var["type"] != "query" {
                continue;
            }
            let q = var["query"]["query"].as_str().unwrap();
            let c = label_values
                .captures(q)
                .unwrap_or_else(|| panic!("{title}: variable query {q} is not label_values"));
            d.variables.push((
                format!("{title} / ${}", var["name"].as_str().unwrap()),
                grafana_expr(&c[1]),
                c[2].to_string(),
            ));
        }
    }
    d
}

/// What is still missing; empty when every check passes.
fn missing(p: &Prometheus, rules: &Rules, dash: &Dashboards) -> Vec<String> {
    let mut out: Vec<String> = rule_errors(p);
    for record in &rules.records {
        if p.query(record).map_or(true, |r| r.is_empty()) {
            out.push(format!("recording rule {record}: no data"));
        }
    }
    let mut seen = BTreeSet::new();
    for (alert, expr) in &rules.alerts {
        for s in selectors(expr) {
            if seen.insert(s.clone()) && p.query(&s).map_or(true, |r| r.is_empty()) {
                out.push(format!("alert {alert}: {s} has no data"));
            }
        }
    }
    for (what, expr) in &dash.queries {
        match p.query(expr) {
            Ok(r) if r.is_empty() => out.push(format!("{what}: no data for {expr}")),
            Err(e) => out.push(format!("{what}: {e} in {expr}")),
            Ok(_) => {}
        }
    }
    for (what, selector, label) in &dash.variables {
        let series = p.series(selector);
        // Outside Kubernetes no series has a namespace: the variable then offers "All".
        let has_label = label == "namespace" || series.iter().any(|s| s.get(label).is_some());
        if series.is_empty() || !has_label {
            out.push(format!("{what}: no {label} values in {selector}"));
        }
    }
    out
}

fn firing(p: &Prometheus) -> BTreeSet<String> {
    p.query("ALERTS{alertstate=\"firing\"}")
        .unwrap()
        .iter()
        .map(|a| a["metric"]["alertname"].as_str().unwrap().to_string())
        .collect()
}

#[root_test]
fn every_rule_and_dashboard_query_returns_data() {
    let gpus = SimGpus::new(2, 1 << 30);
    let control = &gpus.control;
    // GPU 0 busy, hot and power-capped, with ECC errors; GPU 1 idle (idle cost).
    for (key, value) in [
        ("utilization", "85"),
        ("memory_utilization", "40"),
        ("temperature", "81"),
        ("throttle", "0x4"),
        ("ecc_corrected", "3"),
    ] {
        control.set_gpu(0, key, value).unwrap();
    }
    control.set_gpu(1, "utilization", "0").unwrap();

    // A vLLM-like server: its own /metrics (scheduler, KV cache, prefix cache) is scraped
    // and re-exported by the agent.
    // and it holds 256 MiB of GPU 0 through the driver, as a server holds its weights.
    let lib = Variant::Push.lib_path().display().to_string();
    let server = OpenAiServer::start_with_env(
        "prom-model",
        &[
            "--metrics",
            "vllm",
            "--metrics-values",
            r#"{"running": 4, "waiting": 3, "kv": 0.5, "queries": 200, "hits": 50, "preemptions": 1}"#,
            "--cuda-lib",
            &lib,
            "--cuda-mem",
            "268435456",
        ],
        &str_pairs(&gpus.cuda_env()),
    );
    let agent = gpus.agent(
        &["--cuda-lib", &lib, "--watch-port", &server.port.to_string()],
        &[
            ("INFERSCOPE_NVML__INTERVAL_MS", "200"),
            ("INFERSCOPE_SCRAPE__INTERVAL_MS", "500"),
            // The double's GPUs are H100s: the by-type price wins over the default.
            ("INFERSCOPE_COST__GPU_HOUR_PRICE", "2.5"),
            (
                "INFERSCOPE_COST__GPU_HOUR_PRICE_BY_TYPE",
                r#"{ "NVIDIA H100 80GB HBM3" = 3.0 }"#,
            ),
        ],
    );
    // One of TGI's shards (found by its command line), called as its router calls it: one
    // Decode when it starts (its warm-up), then five a round (one untimed).
    let shard = TgiShard::start("prom-shard");
    let prometheus = Prometheus::start(agent.port, &files("prometheus", "yaml"));
    // Counters must be seen before they move: a series whose first sample already holds
    // the scenario's events has no increase to rate.
    eventually("the first scrape", Duration::from_secs(30), || {
        prometheus
            .query("llm_oom_events_total{kind=\"cuda\"}")
            .ok()
            .filter(|r| !r.is_empty())
    });

    // CUDA activity ending in an out-of-memory on GPU 0 (allocation failures, a report).
    let mut w = gpus.workload(
        "alloc dev=0 size=104857600 count=3; async dev=0 size=1048576 count=4; \
         exhaust dev=0 size=134217728; checkpoint name=oom",
    );
    w.proceed();
    // Requests: streamed and not, with usage, and errors; twice, scrapes apart, so that
    // the request series exist before they grow.
    for round in 0..2 {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(3));
        }
        run_ok(
            Command::new("python3")
                .arg(servers_dir().join("client.py"))
                .args(["openai", &server.port.to_string(), "prom-model"]),
        );
        run_ok(&mut tgi_router(&[
            "shard",
            shard.socket.to_str().unwrap(),
            "4",
        ]));
    }
    control.inject_xid(0, 79).unwrap();
    agent.wait_for("the scenario in the agent", |s| {
        s.sum("llm_oom_events_total", &[("kind", "cuda")]) == 1.0
            && s.sum("gpu_xid_errors_total", &[]) >= 1.0
            && s.sum("llm_requests_total", &[]) > 0.0
            && s.sum("llm_engine_decode_batch_size_count", &[]) == 11.0
            && s.sum("gpu_process_memory_overhead_bytes", &[]) != 0.0
            && s.sum("llm_kv_cache_hit_ratio", &[]) == 0.25
            && s.has(
                "llm_server_info",
                &[
                    ("model", "prom-model"),
                    ("gpu", "0"),
                    ("gpu_type", "NVIDIA H100 80GB HBM3"),
                ],
            )
            && s.has(
                "gpu_process_memory_used_bytes",
                &[("pid", &server.pid().to_string())],
            )
            // The server's own series name the GPU it holds memory on (GPU 0 only).
            && s.has(
                "llm_batch_size",
                &[("pid", &server.pid().to_string()), ("gpu", "0")],
            )
            && s.has("vllm:num_requests_running", &[("gpu", "0")])
    });
    let s = agent.scrape();
    assert_eq!(s.label_values("llm_batch_size", "gpu"), ["0"], "not GPU 1");
    assert_eq!(
        s.sum("inferscope_gpu_hour_price", &[]),
        6.0,
        "2 GPUs at 3.0"
    );
    // Busy GPU 0's idle counter exists at 0, so its idle cost is 0 rather than absent.
    assert!(s.has("gpu_idle_seconds_total", &[("gpu", "0")]));
    assert_eq!(s.sum("gpu_idle_seconds_total", &[("gpu", "0")]), 0.0);
    // Every OOM kind exists from the start, at 0 until it happens.
    assert_eq!(
        s.sum("llm_oom_events_total", &[("kind", "host_oom_kill")]),
        0.0
    );
    assert!(s.has("llm_oom_events_total", &[("kind", "host_oom_kill")]));

    let dash = dashboards();
    assert!(dash.queries.len() >= 40, "{} queries", dash.queries.len());
    let started = Instant::now();
    let (rules, left) = loop {
        let rules = loaded_rules(&prometheus);
        let left = missing(&prometheus, &rules, &dash);
        if left.is_empty() || started.elapsed() > Duration::from_secs(90) {
            break (rules, left);
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        left.is_empty(),
        "{} queries without data:\n{}",
        left.len(),
        left.join("\n")
    );
    let groups: usize = files("prometheus", "yaml")
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter(|l| l.trim_start().starts_with("- name: "))
                .count()
        })
        .sum();
    assert_eq!(rules.groups, groups, "Prometheus did not load every group");
    // The cost rules price the node at the configured 2 × 3.0 per hour.
    let cost = prometheus.query("node:gpu_cost:rate1h").unwrap();
    assert_eq!(cost[0]["value"][1], "6", "{cost:?}");
    assert!(rules.records.len() >= 40 && rules.alerts.len() >= 20);

    // The scenario's events trip their alerts (no `for`), and a healthy agent trips none
    // of its own.
    let fired = eventually("alerts firing", Duration::from_secs(30), || {
        let f = firing(&prometheus);
        (f.contains("CudaOutOfMemory") && f.contains("GpuXidError")).then_some(f)
    });
    assert!(!fired.contains("InferscopeAgentDown"), "{fired:?}");
    assert!(!fired.contains("InferscopeNvmlDown"), "{fired:?}");

    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

/// What Grafana needs to import and template the dashboards: a uid and title, the
/// `datasource` variable used by every panel and query, unique panel ids, panels inside the
/// 24-column grid, and node/model/GPU variables where their labels are queried.
#[test]
fn dashboards_are_well_formed() {
    let mut uids = BTreeSet::new();
    for file in files("grafana", "json") {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let title = v["title"].as_str().unwrap();
        assert!(
            uids.insert(v["uid"].as_str().unwrap().to_string()),
            "{title}"
        );
        let vars: BTreeSet<&str> = v["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert!(
            vars.contains("datasource") && vars.contains("node"),
            "{title}: {vars:?}"
        );
        let mut ids = BTreeSet::new();
        for p in v["panels"].as_array().unwrap() {
            let what = format!("{title} / {}", p["title"]);
            assert!(
                ids.insert(p["id"].as_u64().unwrap()),
                "{what}: duplicate id"
            );
            let g = &p["gridPos"];
            assert!(
                g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
                "{what}: off the grid"
            );
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{what}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{what}: no query");
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{what}");
                let expr = t["expr"].as_str().unwrap();
                for (label, var) in [("node", "$node"), ("model", "$model"), ("gpu", "$gpu")] {
                    if expr.contains(&format!("{label}=~")) {
                        assert!(
                            expr.contains(&format!("{label}=~\"{var}\""))
                                && vars.contains(&var[1..]),
                            "{what}: {label} not templated in {expr}"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(uids.len(), 4);
}

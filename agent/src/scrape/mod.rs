//! Server metrics: the inference servers' own Prometheus `/metrics`, scraped at an interval
//! and re-exported on the agent's `/metrics` with the target's labels, plus the `llm_*`
//! series derived from them. Servers come from the `http` family's discovery (its
//! [`ServerBoard`]; a scan of our own when that family is off); [`target`] finds the port and
//! connects inside the server's network namespace, [`fetch`] GETs the body, [`parse`] reads
//! and relabels it, [`derive`] computes the `llm_*` series, [`board`] holds the latest
//! snapshot per target and encodes it into the registry's output.

pub mod board;
pub mod derive;
pub mod fetch;
pub mod metrics;
pub mod parse;
pub mod target;
pub mod text;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use metrics::{ScrapeErrorLabels, ScrapeMetrics, ScrapeTargetLabels};

use crate::{
    error_chain as chain,
    health::Heartbeat,
    proc::ProcFs,
    servers::{self as discover, Server, ServerBoard},
};

/// The `[scrape]` section of the config file.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeConfig {
    /// Scrape the discovered inference servers' own `/metrics`.
    pub enabled: bool,
    /// How often, in milliseconds.
    pub interval_ms: u64,
    /// Longest time one scrape (connect, request, body) may take, in milliseconds.
    pub timeout_ms: u64,
    /// Series kept per target (whole families, in name order); further ones are counted.
    pub max_series: usize,
    /// Series kept for all targets together (scraped and derived, whole families); a target
    /// scraped when the others hold the rest keeps what is left, the rest is counted in
    /// `inferscope_dropped_total{what="scraped_series",reason="budget"}`.
    pub max_series_total: usize,
    /// Sample lines a body may have; a larger body is counted and dropped unparsed.
    pub max_samples: usize,
    /// Largest body read per scrape; a larger one is counted and dropped.
    pub max_bytes: usize,
    /// The servers' metrics path.
    pub path: String,
}

impl ScrapeConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms < 100
            || self.timeout_ms == 0
            || self.max_bytes == 0
            || self.max_samples == 0
            || !self.path.starts_with('/')
        {
            return Err(format!(
                "scrape: interval_ms = {} (at least 100), timeout_ms = {}, max_bytes = {} and max_samples = {} (above 0), path = {:?} (starting with /)",
                self.interval_ms, self.timeout_ms, self.max_bytes, self.max_samples, self.path
            ));
        }
        Ok(())
    }
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 15_000,
            timeout_ms: 5_000,
            max_series: 20_000,
            max_series_total: 100_000,
            max_samples: 20_000,
            max_bytes: 8 * 1024 * 1024,
            path: "/metrics".into(),
        }
    }
}

/// Ports tried for a server whose `/metrics` port is not known yet (API servers also listen
/// on internal ports: ZMQ, NCCL, the TGI shards' gRPC).
const MAX_CANDIDATES: usize = 3;

/// Where the list of servers comes from.
pub enum Servers {
    /// The `http` watcher's list.
    Board(Arc<ServerBoard>),
    /// A scan of our own, for when the `http` family is off.
    Scan {
        ports: Vec<u16>,
        matchers: Vec<String>,
        seen: HashMap<u32, Option<Server>>,
    },
}

struct Target {
    /// The server kind, once told by its metric names when discovery found it by port.
    kind: &'static str,
    argv: Vec<String>,
    model: Option<String>,
    /// The address that answered last.
    addr: Option<SocketAddr>,
    /// Labels of its `inferscope_scrape_up` series, to remove when they change.
    up: Option<ScrapeTargetLabels>,
    /// Scrapes failed in a row (logged once, at [`WARN_AFTER`]).
    failures: u32,
    /// Its listening sockets as last read, and when: a server without a `/metrics` that
    /// answers has them read again every [`LISTENING_FRESH`], not every round.
    listening: Option<(Instant, Vec<SocketAddr>)>,
}

/// How long the listening sockets of a server that has not answered yet are used before
/// they are read again.
const LISTENING_FRESH: Duration = Duration::from_secs(30);

/// Failed scrapes in a row before a warning: a server loading its model does not listen yet.
const WARN_AFTER: u32 = 4;

pub struct Scraper {
    config: ScrapeConfig,
    procfs: ProcFs,
    metrics: Arc<ScrapeMetrics>,
    servers: Servers,
    targets: HashMap<u32, Target>,
    own: u32,
    attrib: Option<Arc<crate::attrib::Attributor>>,
}

/// What one target's scrape gave: the body read, relabelled, and the server kind it told.
struct Outcome {
    pid: u32,
    addr: Option<SocketAddr>,
    kind: &'static str,
    result: Result<parse::Ingested, &'static str>,
    /// Why the first address failed, in words, when it did.
    detail: Option<String>,
    took: Duration,
    workload: crate::labels::WorkloadLabels,
    gpus: Vec<u32>,
    /// The server's listening sockets, when this scrape read them.
    listening: Option<Vec<SocketAddr>>,
}

impl Scraper {
    pub fn new(
        config: ScrapeConfig,
        procfs: ProcFs,
        metrics: Arc<ScrapeMetrics>,
        servers: Servers,
    ) -> Self {
        Self {
            config,
            procfs,
            metrics,
            servers,
            targets: HashMap::new(),
            own: std::process::id(),
            attrib: None,
        }
    }

    /// Names the workload (pod, container) of each target on its series.
    pub fn with_attribution(mut self, attrib: Option<Arc<crate::attrib::Attributor>>) -> Self {
        self.attrib = attrib;
        self
    }

    fn workload(&self, pid: u32) -> crate::labels::WorkloadLabels {
        self.attrib
            .as_ref()
            .map(|a| a.labels(pid))
            .unwrap_or_default()
    }

    fn gpus(&self, pid: u32) -> Vec<u32> {
        self.attrib
            .as_ref()
            .map(|a| a.server_gpus(pid))
            .unwrap_or_default()
    }

    /// Scrapes every interval until `stop` turns true, beating `heartbeat` after each round.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>, heartbeat: Heartbeat) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            heartbeat.beat();
            tokio::select! {
                _ = tick.tick() => self.round().await,
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
            }
        }
        heartbeat.done();
        // The agent is stopping: its last exposition shows no stale server series.
        self.metrics.scraped.retain(|_| false);
    }

    fn current(&mut self) -> HashMap<u32, Server> {
        let mut now = match &mut self.servers {
            Servers::Board(b) => b.snapshot(),
            Servers::Scan {
                ports,
                matchers,
                seen,
            } => discover::scan(&self.procfs, ports, matchers, seen).0,
        };
        now.remove(&self.own);
        now
    }

    /// One scrape of every target, concurrently.
    pub async fn round(&mut self) {
        let now = self.current();
        let gone: Vec<u32> = self
            .targets
            .keys()
            .filter(|p| !now.contains_key(p))
            .copied()
            .collect();
        for pid in gone {
            if let Some(t) = self.targets.remove(&pid) {
                self.forget_up(&t);
            }
            self.metrics.scraped.remove(pid);
        }
        let mut jobs = tokio::task::JoinSet::new();
        for (pid, server) in now {
            let target = self.targets.entry(pid).or_insert_with(|| {
                let argv = discover::argv(&self.procfs, pid).unwrap_or_default();
                Target {
                    model: target::model(&server, &argv),
                    kind: server.kind,
                    argv,
                    addr: None,
                    up: None,
                    failures: 0,
                    listening: None,
                }
            });
            let job = Job {
                procfs: self.procfs.clone(),
                pid,
                kind: target.kind,
                known: target.addr,
                argv: target.argv.clone(),
                listening: target
                    .listening
                    .as_ref()
                    .filter(|(at, _)| at.elapsed() < LISTENING_FRESH)
                    .map(|(_, l)| l.clone()),
                config: self.config.clone(),
                workload: self.workload(pid),
                gpus: self.gpus(pid),
            };
            jobs.spawn(job.run());
        }
        while let Some(done) = jobs.join_next().await {
            match done {
                Ok(outcome) => self.record(outcome),
                Err(e) => tracing::error!(error = %e, "scrape task failed"),
            }
        }
    }

    fn record(&mut self, o: Outcome) {
        let Some(t) = self.targets.get_mut(&o.pid) else {
            return;
        };
        if let Some(l) = &o.listening {
            t.listening = Some((Instant::now(), l.clone()));
        }
        let m = &self.metrics;
        let count = |server: &str, reason: &'static str| {
            m.scrape_errors
                .get_or_create(&ScrapeErrorLabels {
                    server: server.to_string(),
                    reason,
                })
                .inc();
        };
        let port = o.addr.map_or(0, |a| a.port());
        let pid = o.pid;
        let kind = o.kind;
        t.kind = kind;
        let up = ScrapeTargetLabels {
            server: kind.to_string(),
            pid,
            port,
        };
        if let Some(old) = t.up.take_if(|old| *old != up) {
            m.scrape_up.remove(&old);
            m.scrape_duration.remove(&old);
        }
        m.scrape_duration
            .get_or_create(&up)
            .set(o.took.as_secs_f64());
        match o.result {
            Ok(got) => {
                if !got.skipped.is_empty() {
                    count(kind, "skipped_family");
                }
                if got.truncated > 0 {
                    count(kind, "max_series");
                }
                t.addr = o.addr;
                let view = board::TargetView {
                    derived: derive::derive(&got.original, t.model.as_deref()),
                    families: got.families,
                    labels: target::target_labels(kind, pid, port, &o.gpus, &o.workload),
                };
                let dropped = m
                    .scraped
                    .set_within(pid, view, self.config.max_series_total);
                if dropped > 0 {
                    count(kind, "max_series_total");
                    m.core
                        .dropped
                        .get_or_create(&crate::metrics::DroppedLabels {
                            what: "scraped_series",
                            reason: "budget",
                        })
                        .inc_by(dropped as u64);
                }
                m.scrape_up.get_or_create(&up).set(1);
                if t.failures >= WARN_AFTER {
                    tracing::info!(pid, server = kind, port, "server metrics scraped again");
                }
                t.failures = 0;
            }
            Err(reason) => {
                count(kind, reason);
                t.failures = t.failures.saturating_add(1);
                if t.failures == WARN_AFTER {
                    tracing::warn!(
                        pid,
                        server = kind,
                        port,
                        reason,
                        error = o.detail.as_deref().unwrap_or(""),
                        failures = t.failures,
                        "cannot scrape the server's /metrics; still trying every interval \
                         (inferscope_scrape_up 0, inferscope_scrape_errors_total)"
                    );
                }
                // A failed scrape leaves no stale series behind.
                m.scraped.remove(pid);
                m.scrape_up.get_or_create(&up).set(0);
            }
        }
        t.up = Some(up);
    }

    fn forget_up(&self, t: &Target) {
        if let Some(up) = &t.up {
            self.metrics.scrape_up.remove(up);
            self.metrics.scrape_duration.remove(up);
        }
    }
}

/// A server found by port only is named after the metrics it writes.
fn refine(kind: &'static str, families: &[parse::Family]) -> &'static str {
    if kind != "openai-compatible" {
        return kind;
    }
    let has = |prefix: &str| families.iter().any(|f| f.name.starts_with(prefix));
    if has("vllm:") {
        "vllm"
    } else if has("tgi_") {
        "tgi"
    } else if has("sglang:") {
        "sglang"
    } else {
        kind
    }
}

/// One target's scrape, on its own task.
struct Job {
    procfs: ProcFs,
    pid: u32,
    kind: &'static str,
    /// Where it answered last: tried first, alone while it answers. The server's listening
    /// sockets are read only when it does not (reading them walks the node's whole TCP table,
    /// every round before).
    known: Option<SocketAddr>,
    /// Its command line (the `--port` preferred among its listening sockets).
    argv: Vec<String>,
    /// Its listening sockets from a recent look, used while it has not answered anywhere.
    listening: Option<Vec<SocketAddr>>,
    config: ScrapeConfig,
    workload: crate::labels::WorkloadLabels,
    gpus: Vec<u32>,
}

impl Job {
    async fn run(self) -> Outcome {
        let start = Instant::now();
        let Fetched {
            addr,
            body,
            detail,
            listening,
        } = self.fetch().await;
        let (pid, mut kind) = (self.pid, self.kind);
        let workload = self.workload.clone();
        let gpus = self.gpus.clone();
        let port = addr.map_or(0, |a| a.port());
        let limits = parse::Limits {
            max_samples: self.config.max_samples,
            max_series: self.config.max_series,
        };
        let result = match body {
            // Parsing costs CPU time: off the runtime's threads.
            Ok(body) => tokio::task::spawn_blocking(move || {
                let got = parse::ingest(
                    &body,
                    |families| {
                        kind = refine(kind, families);
                        target::target_labels(kind, pid, port, &gpus, &workload)
                    },
                    limits,
                );
                (got, kind)
            })
            .await
            .map_err(|_| "parse")
            .and_then(|(got, k)| {
                kind = k;
                got.map_err(|e| {
                    tracing::debug!(pid, error = %e, "server metrics unreadable");
                    e.reason()
                })
            }),
            Err(reason) => Err(reason),
        };
        Outcome {
            pid,
            addr,
            kind,
            result,
            detail,
            took: start.elapsed(),
            workload: self.workload,
            gpus: self.gpus,
            listening,
        }
    }

    /// The body from the first address that answers; else the first address's failure.
    async fn fetch(&self) -> Fetched {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let mut first: Option<(SocketAddr, &'static str, String)> = None;
        let mut addrs: Vec<SocketAddr> = self.known.into_iter().collect();
        let mut listening = None;
        let mut looked = false;
        let mut next = 0;
        loop {
            if next == addrs.len() {
                if looked {
                    break;
                }
                looked = true;
                // A server that has not answered yet keeps its sockets of a recent look; one
                // that stopped answering where it did may have restarted elsewhere.
                let found = match (&self.listening, self.known) {
                    (Some(recent), None) => recent.clone(),
                    _ => {
                        let (p, pid, argv) = (self.procfs.clone(), self.pid, self.argv.clone());
                        let found =
                            tokio::task::spawn_blocking(move || target::candidates(&p, pid, &argv))
                                .await
                                .unwrap_or_default();
                        listening = Some(found.clone());
                        found
                    }
                };
                for a in found {
                    if addrs.len() >= MAX_CANDIDATES {
                        break;
                    }
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
                if next == addrs.len() {
                    break;
                }
            }
            let addr = addrs[next];
            next += 1;
            let (p, pid) = (self.procfs.clone(), self.pid);
            let stream =
                tokio::task::spawn_blocking(move || target::connect(&p, pid, addr, timeout)).await;
            let body = match stream {
                Ok(Ok(s)) => fetch::get(s, addr, &self.config.path, timeout, self.config.max_bytes)
                    .await
                    .map_err(|e| {
                        tracing::debug!(pid, %addr, error = %e, "scrape failed");
                        (e.reason(), chain(&e))
                    }),
                Ok(Err(e)) => {
                    tracing::debug!(pid, %addr, error = %e, "scrape connect failed");
                    Err(("connect", chain(&e)))
                }
                Err(e) => Err(("connect", chain(&e))),
            };
            match body {
                Ok(body) => {
                    return Fetched {
                        addr: Some(addr),
                        body: Ok(body),
                        detail: None,
                        listening,
                    }
                }
                Err((reason, detail)) => {
                    first.get_or_insert((addr, reason, detail));
                }
            }
        }
        let (addr, reason, detail) = match first {
            Some((addr, reason, detail)) => (Some(addr), reason, detail),
            None => (
                None,
                "no_port",
                "no listening TCP port found for the server".into(),
            ),
        };
        Fetched {
            addr,
            body: Err(reason),
            detail: Some(detail),
            listening,
        }
    }
}

/// What [`Job::fetch`] got: the body from the first address that answered (else the first
/// address's failure), and the server's listening sockets when it read them.
struct Fetched {
    addr: Option<SocketAddr>,
    body: Result<String, &'static str>,
    detail: Option<String>,
    listening: Option<Vec<SocketAddr>>,
}

/// The running scraper task.
pub struct Stage {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Stage {
    /// Starts the scraper (nothing when `scrape.enabled` is off), with its heartbeat in
    /// `health`; it ends when `stop` turns true.
    pub fn start(
        config: &ScrapeConfig,
        procfs: ProcFs,
        metrics: Arc<ScrapeMetrics>,
        servers: Servers,
        attrib: Option<Arc<crate::attrib::Attributor>>,
        stop: watch::Receiver<bool>,
        health: &crate::health::Health,
    ) -> Stage {
        if !config.enabled {
            return Stage { task: None };
        }
        let scraper =
            Scraper::new(config.clone(), procfs, metrics, servers).with_attribution(attrib);
        // A round takes at most, per target, a connect and a GET on each candidate port.
        let c = config;
        let round = Duration::from_millis(c.timeout_ms) * 2 * MAX_CANDIDATES as u32;
        let deadline = (Duration::from_millis(c.interval_ms) * 3 + round).max(crate::health::SLOW);
        let heartbeat = health.heartbeat("scraper", deadline);
        Stage {
            task: Some(tokio::spawn(scraper.run(stop, heartbeat))),
        }
    }

    /// Waits for the scraper to end (it was told by `stop`), within `share` and the
    /// shutdown's deadline: a round in progress is cut short.
    pub async fn stop(mut self, deadline: &mut crate::deadline::Deadline, share: Duration) {
        if let Some(task) = self.task.take() {
            if let Some(Err(e)) = deadline.task("scraper", share, task).await {
                tracing::error!(error = %e, "scraper panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server of this process answering `/metrics` on a port of its own, once per connection.
    fn metrics_server() -> SocketAddr {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let body = "# TYPE up gauge\nup 1\n";
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        addr
    }

    /// A scrape of this process; its command line names `port` (other tests of the process
    /// may listen too: the named port is tried first).
    fn job(known: Option<SocketAddr>, port: u16) -> Job {
        Job {
            procfs: ProcFs::new("/proc"),
            pid: std::process::id(),
            kind: "vllm",
            known,
            argv: vec!["--port".into(), port.to_string()],
            listening: None,
            config: ScrapeConfig {
                timeout_ms: 2000,
                ..ScrapeConfig::default()
            },
            workload: Default::default(),
            gpus: Vec::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn where_it_answered_last_is_tried_alone_then_its_sockets_are_read_again() {
        let server = metrics_server();
        let port = server.port();
        // Unknown: found among the process's listening sockets, which it says it read.
        let got = job(None, port).fetch().await;
        assert_eq!(got.addr, Some(server));
        assert!(got.body.unwrap().contains("up 1"));
        assert_eq!(
            got.listening.as_deref().and_then(|l| l.first()),
            Some(&server)
        );
        // Known and answering: the only address tried, no socket read.
        let got = job(Some(server), port).fetch().await;
        assert_eq!((got.addr, got.body.is_ok()), (Some(server), true));
        assert_eq!(got.listening, None);
        // Known but gone (a restart on another port): the sockets are read again.
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone_addr = gone.local_addr().unwrap();
        drop(gone);
        let got = job(Some(gone_addr), port).fetch().await;
        assert_eq!(got.addr, Some(server));
        assert!(got.body.unwrap().contains("up 1"));
        assert!(got.listening.is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_not_answered_yet_is_tried_on_its_recently_read_sockets() {
        let (named, other) = (metrics_server(), metrics_server());
        // Sockets read a moment ago hold `other` only; a fresh read would try `named` first.
        let mut j = job(None, named.port());
        j.listening = Some(vec![other]);
        let got = j.fetch().await;
        assert_eq!((got.addr, got.listening), (Some(other), None));
    }
}

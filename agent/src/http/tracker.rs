//! The http stage: owns every watched connection's parser state and the servers' identity,
//! and turns finished exchanges into metrics. State is bounded: at most `max_connections`
//! connections, each expired after `idle_timeout` without traffic (its open requests end as
//! `timeout`), and released when its process stops being watched (open requests end as
//! `connection_reset`: the server died mid-request). Their bytes are bounded too: each
//! connection's buffers have caps, a connection past `max_connection_bytes` is shed (its open
//! exchanges end as `untracked`), and all connections together stay within
//! `state_budget_bytes`: past it the connection that grew is shed and new connections are not
//! tracked, each counted in `inferscope_dropped_total{what,reason}`.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use super::{
    conn::{Bad, ErrorType, Exchange, Output},
    gap::Gap,
    metrics::{
        EngineCallLabels, EngineMethodLabels, HttpMetrics, KindLabels, ModelErrorLabels,
        ModelLabels, ModelStatusLabels,
    },
    models::{Answer, Models, OTHER, UNKNOWN},
    wire::Wire,
    Batch, Record,
};
use crate::{
    clock::monotonic_ns,
    metrics::{Metrics, SourceLabels},
    servers::Server,
};

/// What reaches the stage.
#[derive(Debug)]
pub enum Input {
    Records(Batch),
    /// The watched servers now (tgid → identity), from discovery.
    Servers(HashMap<u32, Server>),
    /// The probes were detached at `at_ns` (shed by the probe budget).
    Paused {
        at_ns: u64,
    },
    /// They were attached again, in full by `at_ns`.
    Resumed {
        at_ns: u64,
    },
    /// Each GPU's use over NVML's last sampling interval, to split between the models.
    GpuUsage(Vec<crate::gpu::GpuUsage>),
    /// The ring was drained up to then: the records before have all come.
    Drained(crate::ingest::Drained),
}

impl From<crate::ingest::Drained> for Input {
    fn from(d: crate::ingest::Drained) -> Self {
        Input::Drained(d)
    }
}

impl From<Batch> for Input {
    fn from(batch: Batch) -> Self {
        Input::Records(batch)
    }
}

impl crate::queue::Weigh for Input {
    fn weight(&self) -> usize {
        size_of::<Input>()
            + match self {
                Input::Records(batch) => {
                    batch.capacity() * size_of::<Record>()
                        + batch
                            .iter()
                            .map(|r| match r {
                                Record::Data { bytes, .. } => bytes.len(),
                                _ => 0,
                            })
                            .sum::<usize>()
                }
                Input::Servers(servers) => {
                    servers.capacity() * size_of::<(u32, Server)>()
                        + servers
                            .values()
                            .flat_map(|s| [&s.model, &s.model_version])
                            .map(|name| name.as_ref().map_or(0, String::capacity))
                            .sum::<usize>()
                }
                Input::Paused { .. } | Input::Resumed { .. } | Input::Drained(_) => 0,
                Input::GpuUsage(usage) => usage
                    .iter()
                    .map(|u| {
                        size_of::<crate::gpu::GpuUsage>()
                            + u.processes.capacity() * size_of::<crate::gpu::GpuProcess>()
                    })
                    .sum::<usize>(),
            }
    }
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// Model names admitted as `model` label values at once (`models`).
    pub max_models: usize,
    /// An admitted model name no request has named for this long is forgotten (0: never).
    pub model_expiry: Duration,
    /// Bytes of parser state one connection may hold before it is shed.
    pub max_connection_bytes: usize,
    /// Bytes of parser state all connections together may hold.
    pub state_budget_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16384,
            idle_timeout: Duration::from_secs(600),
            max_models: 256,
            model_expiry: Duration::from_secs(3600),
            max_connection_bytes: 256 * 1024,
            state_budget_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Bytes a connection's map entry costs beyond its [`Wire::state_bytes`] (key, bookkeeping).
const ENTRY_BYTES: usize = size_of::<((u32, u32), usize)>() + 8;

/// A connection: its process and fd.
type Key = (u32, u32);

/// A connection's parser and the bytes it was last charged (its `state_bytes` then).
struct Tracked {
    wire: Wire,
    charged: usize,
    /// The client, from the accept.
    peer: Option<std::net::SocketAddr>,
}

pub struct HttpTracker {
    /// Looked up on every record: foldhash, seeded per process, costs a fraction of SipHash on
    /// these small keys, and a process that picks its fd numbers still cannot aim at buckets it
    /// does not know.
    conns: HashMap<Key, Tracked, foldhash::fast::RandomState>,
    /// The sum of the connections' charges: the http state's bytes.
    state_bytes: usize,
    /// `inferscope_events_total{source="http"}`, counted per record without a label lookup.
    events: prometheus_client::metrics::counter::Counter,
    servers: HashMap<u32, Server>,
    metrics: Arc<Metrics>,
    http: Arc<HttpMetrics>,
    limits: Limits,
    /// Which model names are `model` label values.
    models: Models,
    /// The series of each admitted name beyond `{model}` alone, removed with the name.
    series: HashMap<String, ModelSeries>,
    out: Vec<Output>,
    load: Option<Arc<super::load::LoadBoard>>,
    /// OTLP: one span per finished request.
    spans: Option<crate::queue::Sender<super::finished::RequestFinished>>,
    /// Names the pod of each span's server.
    attrib: Option<Arc<crate::attrib::Attributor>>,
    /// Whether records are used, around a stretch with the probes off.
    gap: Gap,
    /// Output token events of finished requests per (server, model label), for the GPU cost.
    finished_tokens: HashMap<(u32, String), u64>,
    gpu_cost: super::gpu_cost::GpuCost,
    /// Process parents, for the GPU cost's server groups.
    procfs: Option<crate::proc::ProcFs>,
    /// Requests in flight and lately finished, for forensic reports.
    requests: Option<Arc<super::requests::RequestLog>>,
    /// The client of the connection whose output is flushed next.
    client: Option<std::net::SocketAddr>,
    /// Every record committed before this (CLOCK_MONOTONIC ns) has been read: what the
    /// requests in flight are published as of.
    through_ns: u64,
    /// Someone waits for the requests in flight as of a drain just done (a forensic report).
    publish_now: bool,
}

impl HttpTracker {
    pub fn new(http: Arc<HttpMetrics>, limits: Limits) -> Self {
        let metrics = http.core.clone();
        let events = metrics
            .events
            .get_or_create(&SourceLabels { source: "http" })
            .clone();
        Self {
            conns: HashMap::default(),
            state_bytes: 0,
            events,
            servers: HashMap::new(),
            metrics,
            http,
            models: Models::new(limits.max_models, limits.model_expiry),
            series: HashMap::new(),
            limits,
            out: Vec::new(),
            load: None,
            spans: None,
            attrib: None,
            gap: Gap::default(),
            finished_tokens: HashMap::new(),
            gpu_cost: Default::default(),
            procfs: None,
            requests: None,
            client: None,
            through_ns: 0,
            publish_now: false,
        }
    }

    /// Keeps `requests` up to date: those in flight and those that finish.
    pub fn with_requests(mut self, requests: Arc<super::requests::RequestLog>) -> Self {
        self.requests = Some(requests);
        self
    }

    /// Publishes the requests in flight, as of the last drain of the ring.
    pub fn publish_live(&mut self) {
        self.publish_now = false;
        let Some(log) = &self.requests else {
            return;
        };
        let mut live = Vec::new();
        for ((tgid, _), t) in &self.conns {
            t.wire.each_in_flight(&mut |x| {
                // A scrape of the server's own metrics is no inference request.
                if x.is_monitoring() {
                    return;
                }
                let name = self.named(*tgid, x.model.as_deref());
                live.push(self.record_of(*tgid, x, self.models.label(&name), t.peer, false));
            });
        }
        log.set_live(self.through_ns, live);
    }

    /// A request as the request log keeps it.
    fn record_of(
        &self,
        tgid: u32,
        x: &Exchange,
        model: &str,
        client: Option<std::net::SocketAddr>,
        ended: bool,
    ) -> super::requests::RequestRecord {
        super::requests::RequestRecord {
            server: tgid,
            model: model.to_string(),
            start_ns: x.start_ns,
            first_token_ns: x.first_token_ns,
            last_token_ns: x.last_token_ns,
            token_events: x.token_events,
            end_ns: ended.then_some(x.end_ns),
            status: x.status,
            error: x.error.map(ErrorType::label),
            request_bytes: x.request_bytes,
            prompt_tokens: x.usage.prompt,
            output_tokens: if ended { x.output_tokens() } else { None },
            max_tokens: x.max_tokens,
            client,
        }
    }

    /// Reads process parents from `procfs` (GPU processes belong to the servers above them).
    pub fn with_procfs(mut self, procfs: crate::proc::ProcFs) -> Self {
        self.procfs = Some(procfs);
        self
    }

    /// Hands every finished request to OTLP trace export.
    pub fn with_spans(
        mut self,
        spans: Option<crate::queue::Sender<super::finished::RequestFinished>>,
    ) -> Self {
        self.spans = spans;
        self
    }

    /// Spans name their server's pod (namespace, pod, container).
    pub fn with_attribution(mut self, attrib: Option<Arc<crate::attrib::Attributor>>) -> Self {
        self.attrib = attrib;
        self
    }

    /// Records requests in flight per server every sweep, for forensics.
    pub fn with_load(mut self, load: Arc<super::load::LoadBoard>) -> Self {
        self.load = Some(load);
        self
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Bytes of parser state held by all connections (as charged to the budget).
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }

    /// Removes a connection and its charge.
    fn remove(&mut self, key: &Key) -> Option<Wire> {
        let t = self.conns.remove(key)?;
        self.state_bytes -= t.charged;
        self.client = t.peer;
        Some(t.wire)
    }

    /// Follows a connection of client `peer` (`None`: older than the agent, or not told).
    fn insert(&mut self, key: Key, wire: Wire, peer: Option<std::net::SocketAddr>) {
        let entry = self.conns.entry(key);
        if let std::collections::hash_map::Entry::Occupied(old) = &entry {
            self.state_bytes -= old.get().charged;
        }
        let t = entry
            .insert_entry(Tracked {
                wire,
                charged: 0,
                peer,
            })
            .into_mut();
        charge(
            t,
            &mut self.state_bytes,
            &self.limits,
            &self.metrics,
            &mut self.out,
        );
    }

    pub fn input(&mut self, input: Input) {
        match input {
            Input::Records(batch) => {
                for r in &batch {
                    self.record(r);
                }
            }
            Input::Servers(servers) => self.servers(servers),
            Input::Paused { at_ns } => self.pause(at_ns),
            Input::Resumed { at_ns } => self.gap.resume(at_ns),
            Input::GpuUsage(usage) => self.gpu_usage(&usage),
            Input::Drained(d) => {
                self.through_ns = self.through_ns.max(d.at_ns);
                self.publish_now |= d.asked;
            }
        }
        self.http.connections.set(self.conns.len() as i64);
        self.http.state_bytes.set(self.state_bytes as i64);
    }

    pub fn record(&mut self, r: &Record) {
        self.events.inc();
        let tgid = r.header().tgid;
        let ts = r.header().ts_ns;
        if !self.gap.admits(ts) {
            self.metrics.drop_reason("http_shed");
            return;
        }
        match r {
            Record::Accept { fd, peer, .. } => {
                // A new connection on this fd: whatever was there is over.
                if let Some(mut old) = self.remove(&(tgid, *fd)) {
                    old.close(ts, &mut self.out);
                }
                if self.room() {
                    self.insert((tgid, *fd), Wire::new(ts), *peer);
                }
            }
            Record::Close { fd, .. } => {
                if let Some(mut c) = self.remove(&(tgid, *fd)) {
                    c.close(ts, &mut self.out);
                }
            }
            Record::Data {
                fd,
                inbound,
                len,
                bytes,
                plain,
                ..
            } => {
                let key = (tgid, *fd);
                if !self.conns.contains_key(&key) {
                    // Seeded by discovery (older than the agent) or its accept was lost.
                    if !self.room() {
                        self.flush(tgid, ts);
                        return;
                    }
                    self.insert(key, Wire::joined(ts), None);
                }
                let Some(t) = self.conns.get_mut(&key) else {
                    return;
                };
                self.client = t.peer;
                t.wire
                    .record(ts, *inbound, bytes, *len, *plain, &mut self.out);
                charge(
                    t,
                    &mut self.state_bytes,
                    &self.limits,
                    &self.metrics,
                    &mut self.out,
                );
            }
        }
        self.flush(tgid, ts);
    }

    fn room(&mut self) -> bool {
        if self.conns.len() >= self.limits.max_connections {
            self.http
                .bad_input
                .get_or_create(&KindLabels {
                    kind: "connection_limit",
                })
                .inc();
            return false;
        }
        // A new connection costs at least its empty state; past the budget it is not tracked.
        let fresh = size_of::<Wire>() + ENTRY_BYTES;
        if self.state_bytes + fresh > self.limits.state_budget_bytes {
            self.metrics.dropped("http_connection", "budget");
            return false;
        }
        true
    }

    /// Output token events so far per (server, model label): finished requests', and those
    /// of the requests still streaming, under the label their name has now.
    fn tokens_so_far(&self) -> HashMap<(u32, String), u64> {
        let mut tokens = self.finished_tokens.clone();
        for ((tgid, _), t) in &self.conns {
            t.wire.tokens_in_flight(&mut |model, n| {
                let name = self.named(*tgid, model);
                let label = self.models.label(&name).to_string();
                *tokens.entry((*tgid, label)).or_default() += n;
            });
        }
        tokens
    }

    fn gpu_usage(&mut self, usage: &[crate::gpu::GpuUsage]) {
        let tokens = self.tokens_so_far();
        let procfs = self.procfs.clone();
        let parent = move |pid: u32| procfs.as_ref().and_then(|p| p.ppid(pid));
        let cmdline = |tgid: u32| {
            let model = self.servers.get(&tgid)?.model.as_deref()?;
            Some(self.models.label(model).to_string())
        };
        let attrib = self.attrib.clone();
        let workload = move |pid: u32| attrib.as_ref().map(|a| a.labels(pid)).unwrap_or_default();
        let view = super::gpu_cost::View {
            tokens: &tokens,
            servers: &self.servers,
            cmdline_label: &cmdline,
            parent: &parent,
            workload: &workload,
        };
        self.gpu_cost.attribute(usage, &view, &self.http.cost);
    }

    fn servers(&mut self, servers: HashMap<u32, Server>) {
        self.servers = servers;
        self.finished_tokens
            .retain(|(tgid, _), _| self.servers.contains_key(tgid));
        self.gpu_cost
            .retain_groups(|g| self.servers.contains_key(&g));
        self.http.watched_processes.set(self.servers.len() as i64);
        // The models the servers' command lines name are label values from the start.
        let declared = self.models.declare(
            self.servers.values().filter_map(|s| s.model.as_deref()),
            monotonic_ns(),
        );
        for (name, in_flight) in declared.admitted {
            self.move_in_flight(&name, in_flight);
        }
        for name in declared.evicted {
            self.forget(&name);
        }
        // Connections of processes no longer watched (exited): open requests were cut.
        let gone: Vec<(u32, u32)> = self
            .conns
            .keys()
            .filter(|(tgid, _)| !self.servers.contains_key(tgid))
            .copied()
            .collect();
        let now = monotonic_ns();
        for key in gone {
            if let Some(mut c) = self.remove(&key) {
                c.close(now, &mut self.out);
            }
            self.flush(key.0, now);
        }
    }

    /// The probes went off at `at_ns`: every connection is dropped (counted), its open
    /// requests ended as `untracked` then (see [`Gap`]).
    fn pause(&mut self, at_ns: u64) {
        self.gap.pause();
        let keys: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        for key in keys {
            if let Some(mut c) = self.remove(&key) {
                c.abandon(at_ns, ErrorType::Untracked, &mut self.out);
                self.metrics.dropped("http_connection", "shed");
            }
            self.flush(key.0, at_ns);
        }
    }

    /// Expires idle connections; their open requests end as `timeout`.
    pub fn sweep(&mut self, now_ns: u64) {
        let idle = self.limits.idle_timeout.as_nanos() as u64;
        let stale: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.wire.last_ns()) > idle)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            if let Some(mut c) = self.remove(&key) {
                c.abandon(now_ns, ErrorType::Timeout, &mut self.out);
            }
            self.flush(key.0, now_ns);
        }
        for name in self.models.expire(now_ns) {
            self.forget(&name);
        }
        self.http.connections.set(self.conns.len() as i64);
        self.http.state_bytes.set(self.state_bytes as i64);
        if let Some(load) = &self.load {
            let mut counts: HashMap<u32, (u32, u64)> =
                self.servers.keys().map(|t| (*t, (0, 0))).collect();
            for ((tgid, _), c) in &self.conns {
                let e = counts.entry(*tgid).or_default();
                e.0 += c.wire.in_flight() as u32;
                e.1 += c.wire.in_flight_bytes();
            }
            load.record(now_ns, &counts);
        }
    }

    /// The model a request names: its body's, else the one its server's command line
    /// names, else `unknown`. Whether it becomes the label is for [`Models`] to say.
    fn named(&self, tgid: u32, model: Option<&str>) -> String {
        model
            .map(str::to_string)
            .or_else(|| self.servers.get(&tgid).and_then(|s| s.model.clone()))
            .unwrap_or_else(|| UNKNOWN.to_string())
    }

    /// Moves `n` requests in flight counted under `other` to `name`, just admitted.
    fn move_in_flight(&self, name: &str, n: u32) {
        if n == 0 {
            return;
        }
        self.http
            .in_flight
            .get_or_create(&ModelLabels {
                model: OTHER.to_string(),
            })
            .dec_by(i64::from(n));
        self.http
            .in_flight
            .get_or_create(&ModelLabels {
                model: name.to_string(),
            })
            .inc_by(i64::from(n));
    }

    /// Removes the series of a model name that is no longer a label value.
    fn forget(&mut self, name: &str) {
        let h = &self.http;
        let labels = ModelLabels {
            model: name.to_string(),
        };
        for family in [
            &h.latency,
            &h.ttft,
            &h.tpot,
            &h.request_input_tokens,
            &h.request_output_tokens,
        ] {
            family.remove(&labels);
        }
        for family in [&h.tokens_input, &h.tokens_output] {
            family.remove(&labels);
        }
        h.in_flight.remove(&labels);
        self.gpu_cost.forget_model(name, &h.cost);
        self.finished_tokens.retain(|(_, l), _| l != name);
        let Some(used) = self.series.remove(name) else {
            return;
        };
        for (status_code, protocol) in used.statuses {
            h.requests.remove(&ModelStatusLabels {
                model: name.to_string(),
                status_code,
                protocol,
            });
        }
        for (error_type, protocol) in used.errors {
            h.errors.remove(&ModelErrorLabels {
                model: name.to_string(),
                error_type,
                protocol,
            });
        }
    }

    fn flush(&mut self, tgid: u32, now_ns: u64) {
        if self.out.is_empty() {
            return;
        }
        let out = std::mem::take(&mut self.out);
        for o in &out {
            match o {
                Output::Received { .. } if self.is_engine(tgid) => {}
                Output::Received { model } => {
                    let name = self.named(tgid, model.as_deref());
                    self.models.received(&name, now_ns);
                    let model = self.models.label(&name).to_string();
                    self.http
                        .in_flight
                        .get_or_create(&ModelLabels { model })
                        .inc();
                }
                Output::Finished(x) => self.finished(tgid, x),
                Output::Bad(b) => self.bad(*b),
            }
        }
        self.out = out;
        self.out.clear();
    }

    fn bad(&self, b: Bad) {
        self.http
            .bad_input
            .get_or_create(&KindLabels { kind: b.label() })
            .inc();
    }

    /// Whether `tgid` is a model worker whose calls come from its server's front end.
    fn is_engine(&self, tgid: u32) -> bool {
        self.servers.get(&tgid).is_some_and(|s| s.engine)
    }

    /// A call a model worker answered (`super::engine`).
    fn engine_call(&mut self, tgid: u32, x: &Exchange) {
        let name = self.named(tgid, x.model.as_deref());
        let model = self.models.label(&name).to_string();
        let method = super::engine::method(&x.route);
        let status = super::engine::status(x);
        self.http
            .engine_calls
            .get_or_create(&EngineCallLabels {
                model: model.clone(),
                method,
                status,
            })
            .inc();
        let timed = x.error != Some(ErrorType::Untracked)
            && (x.grpc_status.is_some() || x.status.is_some());
        let took_ns = x.end_ns.saturating_sub(x.start_ns);
        if let Some(n) = x.engine_batch {
            self.http
                .engine_decode_batch
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .observe(n as f64);
        }
        if timed {
            self.http
                .engine_duration
                .get_or_create(&EngineMethodLabels { model, method })
                .observe(took_ns as f64 / 1e9);
        }
        tracing::debug!(
            pid = tgid,
            method,
            route = x.route,
            status,
            latency_us = took_ns / 1000,
            batch = x.engine_batch,
            "engine call finished"
        );
    }

    fn finished(&mut self, tgid: u32, x: &Exchange) {
        if x.is_monitoring() {
            return;
        }
        if self.is_engine(tgid) {
            self.engine_call(tgid, x);
            return;
        }
        let name = self.named(tgid, x.model.as_deref());
        // Exchanges whose request was never read in full were not counted in flight; the
        // others are counted under the label their name has until now.
        if x.received {
            self.http
                .in_flight
                .get_or_create(&ModelLabels {
                    model: self.models.label(&name).to_string(),
                })
                .dec();
            self.models.left(&name);
        }
        // The label is decided now, with the status: a name becomes one when the server
        // answers it with success.
        let model = match self.models.answered(&name, x.status, x.end_ns) {
            Answer::Kept => name,
            Answer::Admitted { in_flight } => {
                self.move_in_flight(&name, in_flight);
                name
            }
            Answer::Folded(f) => {
                self.metrics.dropped("model_label", f.reason());
                OTHER.to_string()
            }
        };
        let h = &self.http;
        let labels = ModelLabels {
            model: model.clone(),
        };
        let status = x
            .status
            .map_or_else(|| "none".to_string(), |s| s.to_string());
        let protocol = x.protocol.label();
        if model != OTHER {
            let used = self.series.entry(model.clone()).or_default();
            used.statuses.insert((status.clone(), protocol));
            used.errors
                .extend(x.error.map(|e| (ErrorType::label(e), protocol)));
        }
        h.requests
            .get_or_create(&ModelStatusLabels {
                model: model.clone(),
                status_code: status,
                protocol,
            })
            .inc();
        if let Some(e) = x.error {
            h.errors
                .get_or_create(&ModelErrorLabels {
                    model: model.clone(),
                    error_type: e.label(),
                    protocol,
                })
                .inc();
        }
        let secs = |ns: u64| ns as f64 / 1e9;
        // An exchange the agent stopped following did not end when it was cut: its latency
        // and its size are unknown (its first token and gaps are not).
        let whole = x.error != Some(ErrorType::Untracked);
        if whole && (x.error.is_none() || x.status.is_some()) {
            h.latency
                .get_or_create(&labels)
                .observe(secs(x.end_ns.saturating_sub(x.start_ns)));
        }
        if let Some(first) = x.first_token_ns {
            h.ttft
                .get_or_create(&labels)
                .observe(secs(first.saturating_sub(x.start_ns)));
        }
        if !x.token_gaps_ns.is_empty() {
            let tpot = h.tpot.get_or_create(&labels);
            for g in &x.token_gaps_ns {
                tpot.observe(secs(*g));
            }
        }
        if x.token_gaps_dropped > 0 {
            self.metrics
                .dropped
                .get_or_create(&crate::metrics::DroppedLabels {
                    what: "token_gap",
                    reason: "too_large",
                })
                .inc_by(x.token_gaps_dropped);
        }
        if let Some(p) = x.usage.prompt {
            h.tokens_input.get_or_create(&labels).inc_by(p);
            h.request_input_tokens
                .get_or_create(&labels)
                .observe(p as f64);
        }
        // What the GPU cost splits by: the output events counted while it streamed, else
        // (a response not streamed) its usage.
        let produced = if x.token_events > 0 {
            x.token_events
        } else {
            x.output_tokens().unwrap_or(0)
        };
        if produced > 0 {
            *self
                .finished_tokens
                .entry((tgid, model.clone()))
                .or_default() += produced;
        }
        if let Some(log) = &self.requests {
            log.finished(self.record_of(tgid, x, &model, self.client, true));
        }
        let h = &self.http;
        if let Some(c) = x.output_tokens() {
            h.tokens_output.get_or_create(&labels).inc_by(c);
            if whole {
                h.request_output_tokens
                    .get_or_create(&labels)
                    .observe(c as f64);
            }
        }
        if let Some(spans) = &self.spans {
            spans.offer(super::finished::RequestFinished {
                model: model.clone(),
                server: self.servers.get(&tgid).map(|s| s.kind),
                port: self.servers.get(&tgid).and_then(|s| s.port),
                method: x.method.clone(),
                route: x.route.clone(),
                status: x.status,
                error: x.error.map(ErrorType::label),
                pid: tgid,
                start_ns: x.start_ns,
                first_token_ns: x.first_token_ns,
                end_ns: x.end_ns,
                input_tokens: x.usage.prompt,
                output_tokens: x.output_tokens(),
                stream: x.stream,
                protocol,
                grpc_status: x.grpc_status,
                parent: x.traceparent.as_deref().copied(),
                workload: self
                    .attrib
                    .as_ref()
                    .map(|a| a.labels(tgid))
                    .unwrap_or_default(),
            });
        }
        tracing::debug!(
            pid = tgid,
            model,
            method = x.method,
            route = x.route,
            protocol,
            status = x.status,
            stream = x.stream,
            start_ns = x.start_ns,
            latency_us = x.end_ns.saturating_sub(x.start_ns) / 1000,
            ttft_us = x
                .first_token_ns
                .map(|f| f.saturating_sub(x.start_ns) / 1000),
            token_events = x.token_events,
            // At most MAX_TOKEN_GAPS of them; the root tier reads this field.
            gaps_us = ?x.token_gaps_ns.iter().map(|g| g / 1000).collect::<Vec<_>>(),
            gaps_dropped = x.token_gaps_dropped,
            prompt_tokens = x.usage.prompt,
            output_tokens = x.output_tokens(),
            error = x.error.map(ErrorType::label),
            "http request finished"
        );
    }
}

/// The `status_code` and `error_type` values (with their `protocol`) a model's series have.
#[derive(Debug, Default)]
struct ModelSeries {
    statuses: HashSet<(String, &'static str)>,
    errors: HashSet<(&'static str, &'static str)>,
}

/// Charges a connection's bytes now to the budget: one past its cap, or one that grew while
/// the whole is past the budget, is shed (its buffers freed, counted).
fn charge(
    t: &mut Tracked,
    state_bytes: &mut usize,
    limits: &Limits,
    metrics: &Metrics,
    out: &mut Vec<Output>,
) {
    let old = t.charged;
    let mut now = t.wire.state_bytes() + ENTRY_BYTES;
    let reason = if now > limits.max_connection_bytes {
        Some("too_large")
    } else if now > old && *state_bytes - old + now > limits.state_budget_bytes {
        Some("budget")
    } else {
        None
    };
    if let Some(reason) = reason {
        t.wire.shed(t.wire.last_ns(), out);
        now = t.wire.state_bytes() + ENTRY_BYTES;
        metrics.dropped("http_exchange", reason);
    }
    *state_bytes = *state_bytes - old + now;
    t.charged = now;
}

/// Runs until the reader closes the channel. Beats `heartbeat` at least once a second.
pub async fn run(
    mut t: HttpTracker,
    mut rx: crate::queue::Receiver<Input>,
    heartbeat: crate::health::Heartbeat,
) -> HttpTracker {
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The requests in flight change only with input or a sweep: they are published at most
    // every LIVE_EVERY after a change, and an idle tracker keeps no timer for them.
    let mut published = tokio::time::Instant::now();
    let mut changed = false;
    loop {
        heartbeat.beat();
        tokio::select! {
            input = rx.recv() => match input {
                Some(input) => t.input(input),
                None => {
                    heartbeat.done();
                    return t;
                }
            },
            _ = sweep.tick() => t.sweep(monotonic_ns()),
            _ = tokio::time::sleep_until(published + super::requests::LIVE_EVERY), if changed => {}
        }
        changed = true;
        if t.publish_now || published.elapsed() >= super::requests::LIVE_EVERY {
            t.publish_live();
            published = tokio::time::Instant::now();
            changed = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn tracker(limits: Limits) -> (HttpTracker, Arc<HttpMetrics>) {
        let metrics = HttpMetrics::new(&Arc::new(crate::metrics::Metrics::new()));
        let t = HttpTracker::new(metrics.clone(), limits);
        (t, metrics)
    }

    /// A request naming `model` read in full at `ts`.
    fn received(t: &mut HttpTracker, model: &str, ts: u64) {
        t.out.push(Output::Received {
            model: Some(model.to_string()),
        });
        t.flush(1, ts);
    }

    /// Its answer, ending at `ts`.
    fn finished(t: &mut HttpTracker, model: &str, status: u16, ts: u64) {
        t.out.push(Output::Finished(Box::new(Exchange {
            method: "POST".into(),
            route: "/v1/chat/completions".into(),
            model: Some(model.to_string()),
            status: Some(status),
            error: (status >= 400).then_some(ErrorType::Http4xx),
            start_ns: ts.saturating_sub(1000),
            end_ns: ts,
            received: true,
            ..Default::default()
        })));
        t.flush(1, ts);
    }

    /// The distinct `model` values of a family, in the exposition.
    fn models(text: &str, family: &str) -> HashSet<String> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
            .map(str::to_string)
            .collect()
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn names_answered_404_are_other_and_a_served_name_keeps_its_label() {
        let (mut t, metrics) = tracker(Limits::default());
        for i in 0..300 {
            let name = format!("probe-{i}");
            received(&mut t, &name, S);
            finished(&mut t, &name, 404, S + 10);
        }
        received(&mut t, "llama", 2 * S);
        let text = metrics.core.encode();
        assert_eq!(
            value(&text, "llm_requests_in_flight{model=\"other\"}"),
            1.0,
            "{text}"
        );
        finished(&mut t, "llama", 200, 3 * S);
        // An admitted name keeps its label on errors too.
        received(&mut t, "llama", 4 * S);
        finished(&mut t, "llama", 404, 4 * S);
        let text = metrics.core.encode();
        let want: HashSet<String> = ["other".into(), "llama".into()].into();
        assert_eq!(models(&text, "llm_requests_total"), want, "{text}");
        assert_eq!(models(&text, "llm_latency_seconds_count"), want);
        assert_eq!(
            value(
                &text,
                "llm_requests_total{model=\"other\",status_code=\"404\",protocol=\"http1\"}"
            ),
            300.0
        );
        assert_eq!(
            value(
                &text,
                "llm_requests_total{model=\"llama\",status_code=\"200\",protocol=\"http1\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "inferscope_dropped_total{what=\"model_label\",reason=\"unserved\"}"
            ),
            300.0
        );
        for model in ["other", "llama"] {
            assert_eq!(
                value(
                    &text,
                    &format!("llm_requests_in_flight{{model=\"{model}\"}}")
                ),
                0.0,
                "{text}"
            );
        }
    }

    #[test]
    fn requests_in_flight_follow_their_name_when_it_is_admitted() {
        let (mut t, metrics) = tracker(Limits::default());
        for _ in 0..3 {
            received(&mut t, "new", S);
        }
        let in_flight = |m: &str| {
            value(
                &metrics.core.encode(),
                &format!("llm_requests_in_flight{{model=\"{m}\"}}"),
            )
        };
        assert_eq!((in_flight("other"), in_flight("new")), (3.0, 0.0));
        finished(&mut t, "new", 200, 2 * S);
        assert_eq!((in_flight("other"), in_flight("new")), (0.0, 2.0));
        finished(&mut t, "new", 200, 3 * S);
        finished(&mut t, "new", 500, 3 * S);
        assert_eq!((in_flight("other"), in_flight("new")), (0.0, 0.0));
        // The command line's model is a label value before any answer.
        received(&mut t, "cli", 4 * S);
        t.input(Input::Servers(
            [(
                1,
                Server {
                    kind: "vllm",
                    model: Some("cli".into()),
                    ..Default::default()
                },
            )]
            .into(),
        ));
        assert_eq!((in_flight("other"), in_flight("cli")), (0.0, 1.0));
        finished(&mut t, "cli", 503, 5 * S);
        assert_eq!(in_flight("cli"), 0.0);
        assert_eq!(
            value(
                &metrics.core.encode(),
                "llm_requests_total{model=\"cli\",status_code=\"503\",protocol=\"http1\"}"
            ),
            1.0
        );
    }

    #[test]
    fn a_name_not_seen_for_the_expiry_loses_its_series_and_its_label() {
        let (mut t, metrics) = tracker(Limits {
            model_expiry: Duration::from_secs(60),
            ..Limits::default()
        });
        received(&mut t, "old", S);
        finished(&mut t, "old", 200, S);
        received(&mut t, "old", 2 * S);
        finished(&mut t, "old", 429, 2 * S);
        t.sweep(61 * S);
        assert!(metrics.core.encode().contains("model=\"old\""));
        t.sweep(63 * S);
        let text = metrics.core.encode();
        assert!(!text.contains("model=\"old\""), "{text}");
        // Until it is answered with success again, it is `other`.
        received(&mut t, "old", 64 * S);
        finished(&mut t, "old", 404, 64 * S);
        let text = metrics.core.encode();
        assert!(!text.contains("model=\"old\""), "{text}");
        received(&mut t, "old", 65 * S);
        finished(&mut t, "old", 200, 65 * S);
        assert_eq!(
            value(
                &metrics.core.encode(),
                "llm_requests_total{model=\"old\",status_code=\"200\",protocol=\"http1\"}"
            ),
            1.0
        );
    }

    #[test]
    fn the_cap_still_bounds_the_label() {
        let (mut t, metrics) = tracker(Limits {
            max_models: 4,
            ..Limits::default()
        });
        for i in 0..50 {
            let name = format!("served-{i}");
            received(&mut t, &name, S);
            finished(&mut t, &name, 200, S);
        }
        let text = metrics.core.encode();
        assert_eq!(models(&text, "llm_requests_total").len(), 5, "{text}");
        assert_eq!(
            value(
                &text,
                "llm_requests_total{model=\"other\",status_code=\"200\",protocol=\"http1\"}"
            ),
            46.0
        );
        assert_eq!(
            value(
                &text,
                "inferscope_dropped_total{what=\"model_label\",reason=\"limit\"}"
            ),
            46.0
        );
    }

    fn data(tgid: u32, fd: u32, ts: u64, inbound: bool, bytes: &[u8]) -> Record {
        Record::Data {
            header: agent_common::EventHeader {
                tgid,
                ts_ns: ts,
                ..Default::default()
            },
            fd,
            inbound,
            len: bytes.len() as u64,
            bytes: bytes::Bytes::copy_from_slice(bytes),
            plain: false,
        }
    }

    fn accept(tgid: u32, fd: u32, ts: u64) -> Record {
        Record::Accept {
            header: agent_common::EventHeader {
                tgid,
                ts_ns: ts,
                ..Default::default()
            },
            fd,
            peer: None,
        }
    }

    #[test]
    fn connections_past_the_budget_are_not_tracked() {
        let budget = 256 * 1024;
        let (mut t, metrics) = tracker(Limits {
            state_budget_bytes: budget,
            ..Limits::default()
        });
        // Each connection holds a partial request that grows a little at a time.
        for fd in 0..2000 {
            t.record(&accept(7, fd, S));
            t.record(&data(
                7,
                fd,
                S,
                true,
                b"POST /v1/completions HTTP/1.1\r\nX-Pad: ",
            ));
            assert!(t.state_bytes() <= budget, "{} > {budget}", t.state_bytes());
        }
        for round in 0..20 {
            for fd in 0..2000 {
                t.record(&data(7, fd, S + round, true, &[b'a'; 700]));
                assert!(t.state_bytes() <= budget, "{} > {budget}", t.state_bytes());
            }
        }
        assert!(t.connections() < 2000);
        let text = metrics.core.encode();
        assert!(
            value(
                &text,
                "inferscope_dropped_total{what=\"http_connection\",reason=\"budget\"}"
            ) > 0.0,
            "{text}"
        );
        assert!(
            value(
                &text,
                "inferscope_dropped_total{what=\"http_exchange\",reason=\"budget\"}"
            ) > 0.0,
            "{text}"
        );
        // Closing gives the bytes back.
        for fd in 0..2000 {
            t.record(&Record::Close {
                header: agent_common::EventHeader {
                    tgid: 7,
                    ts_ns: 2 * S,
                    ..Default::default()
                },
                fd,
            });
        }
        assert_eq!((t.connections(), t.state_bytes()), (0, 0));
    }

    #[test]
    fn an_endless_event_is_shed_at_the_connection_cap() {
        let cap = 96 * 1024;
        let (mut t, metrics) = tracker(Limits {
            max_connection_bytes: cap,
            ..Limits::default()
        });
        t.record(&accept(7, 3, S));
        t.record(&data(
            7,
            3,
            S,
            true,
            b"POST /v1/completions HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
        ));
        t.record(&data(
            7,
            3,
            S,
            false,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n",
        ));
        // One event of 1e6 `data:` lines, a thousand lines a write, plus one line that
        // never ends.
        let lines = b"data: {\"choices\":[{\"text\":\"x\"}]}\n".repeat(1000);
        for i in 0..1000 {
            t.record(&data(7, 3, S + i, false, &lines));
            assert!(t.state_bytes() <= cap, "{} > {cap}", t.state_bytes());
        }
        for i in 0..200 {
            t.record(&data(7, 3, 2 * S + i, false, &[b'y'; 4096]));
            assert!(t.state_bytes() <= cap, "{} > {cap}", t.state_bytes());
        }
        let text = metrics.core.encode();
        assert_eq!(
            value(
                &text,
                "inferscope_dropped_total{what=\"http_exchange\",reason=\"too_large\"}"
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "llm_request_errors_total{model=\"unknown\",error_type=\"untracked\",protocol=\"http1\"}"
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            value(&text, "llm_requests_in_flight{model=\"unknown\"}"),
            0.0
        );
    }

    /// A streamed request cut by the probes going off, pieces of it seen after they came
    /// back, then a request made after: the cut one ends as `untracked` with no latency, the
    /// pieces are not taken for a response, the later one is timed from its own calls.
    #[test]
    fn connections_across_a_gap_are_dropped_not_misreported() {
        let (mut t, metrics) = tracker(Limits::default());
        let request = b"POST /v1/completions HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}";
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";
        let event = b"data: {\"choices\":[{\"text\":\"x\"}]}\n\n";
        t.record(&accept(7, 3, S));
        t.record(&data(7, 3, S, true, request));
        t.record(&data(7, 3, S + 1000, false, head));
        t.record(&data(7, 3, S + 2000, false, event));
        t.input(Input::Paused { at_ns: 2 * S });
        // Left in the ring when the probes went off, then stamped during the re-attach.
        t.record(&data(7, 3, 2 * S - 1, false, event));
        t.record(&data(7, 3, 3 * S, false, event));
        t.input(Input::Resumed { at_ns: 4 * S });
        // The rest of the stream and its end, as the server writes them after the gap.
        t.record(&data(7, 3, 5 * S, false, event));
        t.record(&data(7, 3, 5 * S + 10, false, b"data: [DONE]\n\n"));
        // A whole request on a connection accepted after the gap.
        t.record(&accept(7, 4, 6 * S));
        t.record(&data(7, 4, 6 * S, true, request));
        t.record(&data(
            7,
            4,
            6 * S + 250_000_000,
            false,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
        ));
        let text = metrics.core.encode();
        let v = |series: &str| value(&text, series);
        assert_eq!(
            v("llm_request_errors_total{model=\"unknown\",error_type=\"untracked\",protocol=\"http1\"}"),
            1.0,
            "{text}"
        );
        assert_eq!(
            v("inferscope_dropped_total{what=\"http_connection\",reason=\"shed\"}"),
            1.0
        );
        assert_eq!(
            v("inferscope_events_dropped_total{reason=\"http_shed\"}"),
            2.0
        );
        assert_eq!(
            v("llm_requests_total{model=\"unknown\",status_code=\"200\",protocol=\"http1\"}"),
            2.0
        );
        // One latency, the later request's: 250 ms.
        assert_eq!(v("llm_latency_seconds_count{model=\"unknown\"}"), 1.0);
        assert_eq!(v("llm_latency_seconds_sum{model=\"unknown\"}"), 0.25);
        assert_eq!(v("llm_requests_in_flight{model=\"unknown\"}"), 0.0);
        assert_eq!(v("inferscope_http_bad_input_total{kind=\"not_http\"}"), 0.0);
    }

    /// The queue to the tracker is bounded by what its batches carry, payloads included: a
    /// batch of 256 full captures weighs over 1 MiB, one of 256 closes a few KiB.
    #[test]
    fn a_batch_weighs_its_payloads() {
        use crate::queue::Weigh;
        let full: Vec<Record> = (0..256)
            .map(|fd| data(7, fd, S, true, &[b'x'; 4096]))
            .collect();
        let closes: Vec<Record> = (0..256)
            .map(|fd| Record::Close {
                header: Default::default(),
                fd,
            })
            .collect();
        let full = Input::Records(full).weight();
        let closes = Input::Records(closes).weight();
        assert!(full >= 256 * 4096, "{full}");
        assert!(closes < 64 * 1024, "{closes}");
        let (tx, rx) = crate::queue::channel(2 * 1024 * 1024, Default::default());
        let batch = |n| Input::Records((0..n).map(|fd| data(7, fd, S, true, &[0; 4096])).collect());
        assert!(tx.offer(batch(256)));
        assert!(
            !tx.offer(batch(256)),
            "two such batches do not fit in 2 MiB"
        );
        assert!(tx.offer(batch(64)));
        assert!(rx.bytes() <= 2 * 1024 * 1024);
    }

    /// The requests in flight are published as of the reader's drain, at once when someone
    /// asked for the drain, else no sooner than `LIVE_EVERY` after the last publication (the
    /// clock is paused: it never gets there here).
    #[tokio::test(start_paused = true)]
    async fn the_requests_in_flight_are_published_as_of_a_drain_at_once_when_asked() {
        let log = Arc::new(super::super::requests::RequestLog::new(
            Duration::from_secs(60),
            100,
            Default::default(),
        ));
        let (t, _) = tracker(Limits::default());
        let mut t = t.with_requests(log.clone());
        t.servers(HashMap::from([(7, Server::default())]));
        let (tx, rx) = crate::queue::channel(1 << 20, Default::default());
        let health = crate::health::Health::new();
        let task = tokio::spawn(run(t, rx, health.heartbeat("t", Duration::from_secs(60))));
        let settle = || async {
            for _ in 0..1000 {
                tokio::task::yield_now().await;
            }
        };
        let head = b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let drained = |at_ns, asked| Input::Drained(crate::ingest::Drained { at_ns, asked });
        tx.send(Input::Records(vec![
            accept(7, 3, S),
            data(7, 3, 2 * S, true, head),
        ]))
        .await
        .unwrap();
        tx.send(drained(3 * S, false)).await.unwrap();
        settle().await;
        assert_eq!(log.live_ns(), 0, "published before LIVE_EVERY, unasked");
        tx.send(drained(4 * S, true)).await.unwrap();
        settle().await;
        assert_eq!(log.live_ns(), 4 * S);
        let live = log.in_flight_at(&HashSet::from([7]), 4 * S);
        assert_eq!(live.len(), 1, "{live:?}");
        assert_eq!(live[0].start_ns, 2 * S);
        // An older drain (another reader's late marker) never moves it back.
        tx.send(drained(S, true)).await.unwrap();
        settle().await;
        assert_eq!(log.live_ns(), 4 * S);
        drop(tx);
        task.await.unwrap();
    }
}

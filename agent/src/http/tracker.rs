//! The http stage: owns every watched connection's parser state and the servers' identity,
//! and turns finished exchanges into metrics. State is bounded: at most `max_connections`
//! connections, each expired after `idle_timeout` without traffic (its open requests end as
//! `timeout`), and released when its process stops being watched (open requests end as
//! `connection_reset`: the server died mid-request).

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::mpsc;

use super::{
    conn::{Bad, Conn, ErrorType, Exchange, Output},
    discover::Server,
    metrics::{HttpMetrics, KindLabels, ModelErrorLabels, ModelLabels, ModelStatusLabels},
    Batch, Record,
};
use crate::{
    clock::monotonic_ns,
    export::metrics::{Metrics, SourceLabels},
};

/// What reaches the stage.
#[derive(Debug)]
pub enum Input {
    Records(Batch),
    /// The watched servers now (tgid → identity), from discovery.
    Servers(HashMap<u32, Server>),
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// Distinct `model` label values; requests naming further models count as `other`.
    pub max_models: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16384,
            idle_timeout: Duration::from_secs(600),
            max_models: 256,
        }
    }
}

pub struct HttpTracker {
    conns: HashMap<(u32, u32), Conn>,
    servers: HashMap<u32, Server>,
    metrics: Arc<Metrics>,
    http: HttpMetrics,
    limits: Limits,
    models: std::collections::HashSet<String>,
    out: Vec<Output>,
    load: Option<Arc<super::load::LoadBoard>>,
    /// OTLP: one span per finished request.
    spans: Option<crate::export::otlp::queue::Sink<crate::export::otlp::traces::RequestSpan>>,
    /// Names the pod of each span's server.
    attrib: Option<Arc<crate::attrib::Attributor>>,
}

impl HttpTracker {
    pub fn new(metrics: Arc<Metrics>, http: HttpMetrics, limits: Limits) -> Self {
        Self {
            conns: HashMap::new(),
            servers: HashMap::new(),
            metrics,
            http,
            limits,
            models: Default::default(),
            out: Vec::new(),
            load: None,
            spans: None,
            attrib: None,
        }
    }

    /// Hands every finished request to OTLP trace export.
    pub fn with_spans(
        mut self,
        spans: Option<crate::export::otlp::queue::Sink<crate::export::otlp::traces::RequestSpan>>,
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

    pub fn input(&mut self, input: Input) {
        match input {
            Input::Records(batch) => {
                for r in &batch {
                    self.record(r);
                }
            }
            Input::Servers(servers) => self.servers(servers),
        }
        self.http.connections.set(self.conns.len() as i64);
    }

    pub fn record(&mut self, r: &Record) {
        self.metrics
            .events
            .get_or_create(&SourceLabels { source: "http" })
            .inc();
        let tgid = r.header().tgid;
        let ts = r.header().ts_ns;
        match r {
            Record::Accept { fd, .. } => {
                // A new connection on this fd: whatever was there is over.
                if let Some(mut old) = self.conns.remove(&(tgid, *fd)) {
                    old.close(ts, &mut self.out);
                }
                if self.room() {
                    self.conns.insert((tgid, *fd), Conn::new(ts));
                }
            }
            Record::Close { fd, .. } => {
                if let Some(mut c) = self.conns.remove(&(tgid, *fd)) {
                    c.close(ts, &mut self.out);
                }
            }
            Record::Data {
                fd,
                inbound,
                len,
                bytes,
                ..
            } => {
                if !self.conns.contains_key(&(tgid, *fd)) {
                    // Seeded by discovery (older than the agent) or its accept was lost.
                    if !self.room() {
                        self.flush(tgid);
                        return;
                    }
                    self.conns.insert((tgid, *fd), Conn::joined(ts));
                }
                let Some(c) = self.conns.get_mut(&(tgid, *fd)) else {
                    return;
                };
                let hole = len.saturating_sub(bytes.len() as u64);
                if *inbound {
                    c.read(ts, bytes, &mut self.out);
                    c.read_hole(ts, hole, &mut self.out);
                } else {
                    c.write(ts, bytes, &mut self.out);
                    c.write_hole(ts, hole, &mut self.out);
                }
            }
        }
        self.flush(tgid);
    }

    fn room(&mut self) -> bool {
        if self.conns.len() < self.limits.max_connections {
            return true;
        }
        self.http
            .bad_input
            .get_or_create(&KindLabels {
                kind: "connection_limit",
            })
            .inc();
        false
    }

    fn servers(&mut self, servers: HashMap<u32, Server>) {
        self.servers = servers;
        self.http.watched_processes.set(self.servers.len() as i64);
        // Connections of processes no longer watched (exited): open requests were cut.
        let gone: Vec<(u32, u32)> = self
            .conns
            .keys()
            .filter(|(tgid, _)| !self.servers.contains_key(tgid))
            .copied()
            .collect();
        let now = monotonic_ns();
        for key in gone {
            if let Some(mut c) = self.conns.remove(&key) {
                c.close(now, &mut self.out);
            }
            self.flush(key.0);
        }
    }

    /// Expires idle connections; their open requests end as `timeout`.
    pub fn sweep(&mut self, now_ns: u64) {
        let idle = self.limits.idle_timeout.as_nanos() as u64;
        let stale: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.last_ns) > idle)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            if let Some(mut c) = self.conns.remove(&key) {
                c.abandon(now_ns, ErrorType::Timeout, &mut self.out);
            }
            self.flush(key.0);
        }
        self.http.connections.set(self.conns.len() as i64);
        if let Some(load) = &self.load {
            let mut counts: HashMap<u32, (u32, u64)> =
                self.servers.keys().map(|t| (*t, (0, 0))).collect();
            for ((tgid, _), c) in &self.conns {
                let e = counts.entry(*tgid).or_default();
                e.0 += c.in_flight() as u32;
                e.1 += c.in_flight_bytes();
            }
            load.record(now_ns, &counts);
        }
    }

    fn model(&mut self, tgid: u32, model: Option<&str>) -> String {
        let m = model
            .map(str::to_string)
            .or_else(|| self.servers.get(&tgid).and_then(|s| s.model.clone()))
            .unwrap_or_else(|| "unknown".to_string());
        if self.models.contains(&m) {
            return m;
        }
        if self.models.len() >= self.limits.max_models {
            return "other".to_string();
        }
        self.models.insert(m.clone());
        m
    }

    fn flush(&mut self, tgid: u32) {
        let out = std::mem::take(&mut self.out);
        for o in &out {
            match o {
                Output::Received { model } => {
                    let model = self.model(tgid, model.as_deref());
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

    fn finished(&mut self, tgid: u32, x: &Exchange) {
        if x.is_monitoring() {
            return;
        }
        let model = self.model(tgid, x.model.as_deref());
        let h = &self.http;
        let labels = ModelLabels {
            model: model.clone(),
        };
        // Exchanges whose request was never read in full were not counted in flight.
        if x.received {
            h.in_flight.get_or_create(&labels).dec();
        }
        let status = x
            .status
            .map_or_else(|| "none".to_string(), |s| s.to_string());
        h.requests
            .get_or_create(&ModelStatusLabels {
                model: model.clone(),
                status_code: status,
            })
            .inc();
        if let Some(e) = x.error {
            h.errors
                .get_or_create(&ModelErrorLabels {
                    model: model.clone(),
                    error_type: e.label(),
                })
                .inc();
        }
        let secs = |ns: u64| ns as f64 / 1e9;
        if x.error.is_none() || x.status.is_some() {
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
        if let Some(p) = x.usage.prompt {
            h.tokens_input.get_or_create(&labels).inc_by(p);
            h.request_input_tokens
                .get_or_create(&labels)
                .observe(p as f64);
        }
        if let Some(c) = x.output_tokens() {
            h.tokens_output.get_or_create(&labels).inc_by(c);
            h.request_output_tokens
                .get_or_create(&labels)
                .observe(c as f64);
        }
        if let Some(spans) = &self.spans {
            spans.offer(crate::export::otlp::traces::RequestSpan {
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
            status = x.status,
            stream = x.stream,
            start_ns = x.start_ns,
            latency_us = x.end_ns.saturating_sub(x.start_ns) / 1000,
            ttft_us = x.first_token_ns.map(|f| f.saturating_sub(x.start_ns) / 1000),
            token_events = x.token_events,
            gaps_us = ?x.token_gaps_ns.iter().map(|g| g / 1000).collect::<Vec<_>>(),
            prompt_tokens = x.usage.prompt,
            output_tokens = x.output_tokens(),
            error = x.error.map(ErrorType::label),
            "http request finished"
        );
    }
}

/// Runs until the reader closes the channel. Beats `heartbeat` at least once a second.
pub async fn run(
    mut t: HttpTracker,
    mut rx: mpsc::Receiver<Input>,
    heartbeat: crate::health::Heartbeat,
) -> HttpTracker {
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        }
    }
}

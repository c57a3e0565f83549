//! The requests behind a CUDA failure in an inference server: those its server had in flight
//! at the failing call, with the one(s) that most likely pushed memory over the edge, and,
//! after a window, those that then failed (server errors, resets, timeouts).

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use super::report::{ClientProcess, RequestRow, Requests};
use crate::{
    http::requests::{RequestLog, RequestRecord},
    proc::ProcFs,
    servers::ServerBoard,
};

/// Longest a report waits for the request log to be refreshed past the failure.
const FRESH_WAIT: Duration = Duration::from_millis(600);

pub struct RequestSource {
    pub log: Arc<RequestLog>,
    pub servers: Arc<ServerBoard>,
    pub procfs: ProcFs,
    /// A request that arrived or got its first token this long before a failure is a likely
    /// trigger.
    pub trigger_window: Duration,
    /// How long after a failure the server's requests are followed.
    pub after: Duration,
    /// Names the pod of a client process on this node.
    pub attrib: Option<Arc<crate::attrib::Attributor>>,
}

impl RequestSource {
    /// The servers whose requests belong to a failure of `pid`: the outermost watched server
    /// above it (or itself) and every watched server under that one.
    pub fn servers_of(&self, pid: u32) -> HashSet<u32> {
        let watched = self.servers.snapshot();
        let parent = |p: u32| self.procfs.ppid(p);
        let is = |p: u32| watched.contains_key(&p);
        let Some(top) = crate::servers::outermost(pid, &is, &parent) else {
            return HashSet::new();
        };
        watched
            .keys()
            .copied()
            .filter(|s| crate::servers::outermost(*s, &is, &parent) == Some(top))
            .collect()
    }

    /// The requests in flight on `pid`'s servers at `t_ns`, as a report lists them and as the
    /// log had them (for [`Self::after_failure`]); `None` when `pid` belongs to no server.
    pub fn at_failure(&self, pid: u32, t_ns: u64) -> Option<(Requests, Vec<RequestRecord>)> {
        let servers = self.servers_of(pid);
        if servers.is_empty() {
            return None;
        }
        // Requests that arrived just before the failure are in the log once it was
        // refreshed after it.
        self.fresh(t_ns);
        let window = self.trigger_window.as_nanos() as u64;
        let records = self.log.in_flight_at(&servers, t_ns);
        let mut in_flight: Vec<RequestRow> = records.iter().map(|r| row(r, t_ns)).collect();
        self.name_clients(&mut in_flight, &records);
        let mut triggers = 0;
        for (row, r) in in_flight.iter_mut().zip(&records) {
            let arrived = t_ns.saturating_sub(r.start_ns);
            let first = r.first_token_ns.filter(|f| *f <= t_ns);
            let reason = if arrived <= window {
                Some(match first {
                    None => format!(
                        "arrived {} ms before the failure and had no token yet: its prompt \
                         ({} bytes) was being processed",
                        arrived / 1_000_000,
                        r.request_bytes
                    ),
                    Some(f) => format!(
                        "arrived {} ms before the failure and got its first token {} ms \
                         before it",
                        arrived / 1_000_000,
                        t_ns.saturating_sub(f) / 1_000_000
                    ),
                })
            } else {
                first
                    .filter(|f| t_ns.saturating_sub(*f) <= window)
                    .map(|f| {
                        format!(
                            "got its first token {} ms before the failure: its prompt was \
                             processed and its generation began",
                            t_ns.saturating_sub(f) / 1_000_000
                        )
                    })
            };
            if let Some(reason) = reason {
                row.likely_trigger = true;
                row.trigger_reason = Some(reason);
                triggers += 1;
            }
        }
        let mut servers: Vec<u32> = servers.into_iter().collect();
        servers.sort_unstable();
        let requests = Requests {
            servers,
            trigger_window_ms: self.trigger_window.as_millis() as u64,
            no_trigger: (triggers == 0).then(|| {
                format!(
                    "no request arrived or got its first token in the {} ms before the failure",
                    self.trigger_window.as_millis()
                )
            }),
            in_flight,
            after_window_secs: self.after.as_secs(),
            after_complete: false,
            failed_after: Vec::new(),
        };
        Some((requests, records))
    }

    /// The processes on this node at the client end of `records`' connections (one walk of
    /// the node's sockets for them all), and their pods.
    fn name_clients(&self, rows: &mut [RequestRow], records: &[RequestRecord]) {
        let refs: Vec<&RequestRecord> = records.iter().collect();
        self.name_clients_of(rows, &refs);
    }

    fn name_clients_of(&self, rows: &mut [RequestRow], records: &[&RequestRecord]) {
        let mut by_server: std::collections::HashMap<u32, Vec<std::net::SocketAddr>> =
            std::collections::HashMap::new();
        for r in records {
            if let Some(c) = r.client {
                by_server.entry(r.server).or_default().push(c);
            }
        }
        let mut found = std::collections::HashMap::new();
        for (server, peers) in by_server {
            for (peer, pid) in crate::servers::clients(&self.procfs, server, &peers) {
                found.insert((server, peer), pid);
            }
        }
        for (row, r) in rows.iter_mut().zip(records) {
            let Some(&pid) = r.client.and_then(|c| found.get(&(r.server, c))) else {
                continue;
            };
            let w = self
                .attrib
                .as_ref()
                .map(|a| a.labels(pid))
                .unwrap_or_default();
            row.client_process = Some(ClientProcess {
                pid,
                comm: self.procfs.comm(pid).unwrap_or_default(),
                namespace: w.namespace,
                pod: w.pod,
                container: w.container,
            });
        }
    }

    /// Waits until the log holds every request the probes saw before `t_ns` (CLOCK_MONOTONIC),
    /// asking for it rather than waiting for the reader's poll, at most [`FRESH_WAIT`].
    fn fresh(&self, t_ns: u64) {
        let waited = Instant::now();
        while self.log.live_ns() < t_ns && waited.elapsed() < FRESH_WAIT {
            self.log.ask_fresh();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Once the window after the failure at `t_ns` has passed: how each request in flight
    /// ended, and every request of the servers that failed in the window. Returns how many
    /// failed.
    pub fn after_failure(&self, r: &mut Requests, records: &[RequestRecord], t_ns: u64) -> usize {
        let servers: HashSet<u32> = r.servers.iter().copied().collect();
        let end = t_ns.saturating_add(self.after.as_nanos() as u64);
        self.fresh(end.min(crate::clock::monotonic_ns()));
        let ended = self.log.ended_between(&servers, t_ns, end);
        for (row, was) in r.in_flight.iter_mut().zip(records) {
            let same = |x: &&RequestRecord| {
                (x.server, x.start_ns, x.client) == (was.server, was.start_ns, was.client)
            };
            if let Some(x) = ended.iter().find(same) {
                row.outcome = Some(outcome(x));
                row.ended_seconds_after = x.end_ns.map(|e| secs(e.saturating_sub(t_ns)));
            } else {
                row.outcome
                    .get_or_insert_with(|| "not ended in the window".into());
            }
        }
        r.failed_after = ended
            .iter()
            .filter(|x| failed(x))
            .map(|x| {
                let mut row = row(x, t_ns);
                row.outcome = Some(outcome(x));
                row.ended_seconds_after = x.end_ns.map(|e| secs(e.saturating_sub(t_ns)));
                row
            })
            .collect();
        // A keep-alive client may still hold its connection; a closed one is not found.
        let failed: Vec<&RequestRecord> = ended.iter().filter(|x| failed(x)).collect();
        let mut rows = std::mem::take(&mut r.failed_after);
        self.name_clients_of(&mut rows, &failed);
        r.failed_after = rows;
        r.after_complete = true;
        r.failed_after.len()
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A server error, a reset or a timeout.
fn failed(r: &RequestRecord) -> bool {
    r.status.is_some_and(|s| s >= 500) || matches!(r.error, Some("connection_reset" | "timeout"))
}

fn outcome(r: &RequestRecord) -> String {
    match (r.status, r.error) {
        (Some(s), _) if s >= 500 => format!("HTTP {s}"),
        (_, Some(e)) => e.to_string(),
        (Some(s), None) => format!("HTTP {s}"),
        (None, None) => "ended without a status".into(),
    }
}

/// A request as it stood at `t_ns`.
fn row(r: &RequestRecord, t_ns: u64) -> RequestRow {
    let tokens = r.tokens_at(t_ns);
    RequestRow {
        server_pid: r.server,
        model: r.model.clone(),
        arrived_seconds_before: secs(t_ns.saturating_sub(r.start_ns)),
        state: if tokens > 0 {
            "streaming"
        } else {
            "waiting_first_token"
        }
        .into(),
        tokens_so_far: tokens,
        prompt_bytes: r.request_bytes,
        prompt_tokens: r.prompt_tokens,
        max_tokens: r.max_tokens,
        client: r.client.map(|c| c.to_string()),
        client_process: None,
        likely_trigger: false,
        trigger_reason: None,
        outcome: None,
        ended_seconds_after: None,
    }
}

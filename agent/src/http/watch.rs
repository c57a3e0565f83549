//! The `http` family's watcher thread: decides which processes are watched (inference servers
//! by command line, `--watch-port` listeners), keeps the kernel's watched set and connection
//! map in step with it, seeds connections older than the agent, and tells the tracker.

use std::{
    collections::{HashMap, HashSet},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use agent_common::http::ConnKey;

use super::tracker::Input;
use crate::{
    probe::http::{Control, HttpMaps},
    proc::ProcFs,
    servers::{self as discover, Server, ServerBoard},
};

/// The watcher: rescans servers every interval, keeps the kernel's watched set and the
/// tracker's view of servers in step, seeds connections of newly watched processes.
pub struct Watcher {
    maps: HttpMaps,
    procfs: ProcFs,
    ports: Vec<u16>,
    matchers: Vec<String>,
    seen: HashMap<u32, Option<Server>>,
    current: HashMap<u32, Server>,
    tracker: crate::queue::Sender<Input>,
    /// Where the list is published for other stages.
    board: Option<std::sync::Arc<ServerBoard>>,
    /// The agent's own pid is never watched.
    own: u32,
    /// Told the watched servers (for `llm_server_info`).
    attrib: Option<std::sync::Arc<crate::attrib::Attributor>>,
}

impl Watcher {
    pub fn new(
        maps: HttpMaps,
        procfs: ProcFs,
        ports: Vec<u16>,
        matchers: Vec<String>,
        tracker: crate::queue::Sender<Input>,
    ) -> Self {
        Self {
            maps,
            procfs,
            ports,
            matchers,
            seen: HashMap::new(),
            current: HashMap::new(),
            tracker,
            board: None,
            own: std::process::id(),
            attrib: None,
        }
    }

    /// Publishes every change of the server list on `board`.
    pub fn with_board(mut self, board: std::sync::Arc<ServerBoard>) -> Self {
        self.board = Some(board);
        self
    }

    pub fn with_attribution(
        mut self,
        a: Option<std::sync::Arc<crate::attrib::Attributor>>,
    ) -> Self {
        self.attrib = a;
        self
    }

    pub fn tick(&mut self) {
        let mut now = discover::scan(&self.procfs, &self.ports, &self.matchers, &mut self.seen);
        now.remove(&self.own);
        for (pid, s) in now.iter_mut() {
            s.port = match self.current.get(pid) {
                Some(known) if known.port.is_some() => known.port,
                _ => discover::listening_port(&self.procfs, *pid),
            };
        }
        if now == self.current {
            return;
        }
        let added: Vec<u32> = now
            .keys()
            .filter(|p| !self.current.contains_key(p))
            .copied()
            .collect();
        let gone: HashSet<u32> = self
            .current
            .keys()
            .filter(|p| !now.contains_key(p))
            .copied()
            .collect();
        for pid in &added {
            // Watch first, then seed: a connection accepted in between is seen by the probe.
            if let Err(e) = self.maps.watched.insert(pid, 1, 0) {
                tracing::warn!(pid, error = %e, "cannot watch process (watched map full?)");
                continue;
            }
            let seeded = self.seed(*pid);
            let s = &now[pid];
            tracing::info!(
                pid,
                server = s.kind,
                model = s.model.as_deref().unwrap_or(""),
                open_connections = seeded,
                "watching inference server"
            );
        }
        for pid in &gone {
            let _ = self.maps.watched.remove(pid);
            tracing::info!(pid, "inference server gone");
        }
        if !gone.is_empty() {
            let stale: Vec<ConnKey> = self
                .maps
                .conns
                .keys()
                .filter_map(Result::ok)
                .filter(|k| gone.contains(&k.tgid))
                .collect();
            for k in stale {
                let _ = self.maps.conns.remove(&k);
            }
        }
        self.current = now;
        if let Some(board) = &self.board {
            board.publish(&self.current);
        }
        if let Some(a) = &self.attrib {
            a.set_servers(&self.current);
        }
        self.send(Input::Servers(self.current.clone()));
    }

    /// Marks the process's accepted sockets as connections to follow; returns how many.
    fn seed(&mut self, pid: u32) -> usize {
        let fds = discover::accepted_fds(&self.procfs, pid);
        for fd in &fds {
            let _ = self.maps.conns.insert(ConnKey { tgid: pid, fd: *fd }, 1, 0);
        }
        fds.len()
    }

    /// After the programs come back: closes and accepts while they were off left the map of
    /// connections stale (a closed fd reused for a file would be followed, a connection
    /// accepted meanwhile would not), so it is rebuilt from the processes' sockets now. A
    /// connection accepted since the re-attach is in both and kept.
    fn reseed(&mut self) {
        let keys: Vec<ConnKey> = self.maps.conns.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.maps.conns.remove(&k);
        }
        let pids: Vec<u32> = self.current.keys().copied().collect();
        let seeded: usize = pids.into_iter().map(|pid| self.seed(pid)).sum();
        tracing::debug!(connections = seeded, "http connections seeded again");
    }

    fn send(&self, input: Input) {
        if self.tracker.blocking_send(input).is_err() {
            tracing::debug!("http tracker gone");
        }
    }

    /// Runs until told to stop, rescanning every `interval` and beating `heartbeat` as
    /// often; a pause or resume of the probes is handled as soon as it comes.
    pub fn run(
        mut self,
        interval: Duration,
        control: std_mpsc::Receiver<Control>,
        heartbeat: crate::health::Heartbeat,
    ) {
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                self.tick();
                next = Instant::now() + interval;
            }
            heartbeat.beat();
            match control.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(Control::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(Control::Paused { at_ns }) => self.send(Input::Paused { at_ns }),
                Ok(Control::Resumed { at_ns }) => {
                    self.reseed();
                    self.send(Input::Resumed { at_ns });
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        heartbeat.done();
    }
}

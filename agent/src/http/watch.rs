//! The `http` family's watcher thread: decides which processes are watched (inference servers
//! by command line, `--watch-port` listeners), keeps the kernel's watched set and connection
//! map in step with it, seeds connections older than the agent, and tells the tracker.
//!
//! It looks at every process once, at start. With the kernel's discovery records (`by_events`)
//! it then reads only what they name: the command line of a process that exec'd, the port a
//! process started listening on; its tick only notices watched servers that are gone. Without
//! them it rescans every interval.

use std::{
    collections::{HashMap, HashSet},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use agent_common::http::{ConnKey, ConnState};

use super::tracker::Input;
use crate::{
    probe::http::{Control, HttpMaps},
    proc::ProcFs,
    servers::{self as discover, Server, ServerBoard},
};

/// How often, at most, a gone server is noticed when discovery runs on records.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

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
    /// Execs and listeners come as records: no rescans after the first.
    by_events: bool,
    scanned: bool,
    /// Where the reads of other processes' files are counted.
    core: Option<std::sync::Arc<crate::metrics::Metrics>>,
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
            by_events: false,
            scanned: false,
            core: None,
        }
    }

    /// Runs on the kernel's discovery records instead of rescans.
    pub fn by_events(mut self, by_events: bool) -> Self {
        self.by_events = by_events;
        self
    }

    /// Counts what it reads of other processes in `inferscope_discovery_proc_reads_total`.
    pub fn counting_reads(mut self, core: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.core = Some(core);
        self
    }

    fn count(&self, file: &'static str, n: u64) {
        if let Some(core) = &self.core {
            core.proc_reads
                .get_or_create(&crate::metrics::ProcFileLabels { file })
                .inc_by(n);
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

    /// A full scan (every tick when polling; at start and after lost records otherwise), or,
    /// on records, only the watched servers that are gone.
    pub fn tick(&mut self) {
        if self.by_events && self.scanned {
            let procfs = &self.procfs;
            let mut now = self.current.clone();
            now.retain(|pid, _| procfs.alive(*pid));
            self.apply(now);
            return;
        }
        self.scan();
    }

    fn scan(&mut self) {
        let (mut now, reads) =
            discover::scan(&self.procfs, &self.ports, &self.matchers, &mut self.seen);
        self.count("cmdline", reads.cmdline);
        self.count("net_tcp", reads.net_tcp);
        if self.by_events {
            // Verdicts are kept only to spare rereads between polls.
            self.seen = HashMap::new();
        }
        self.scanned = true;
        now.remove(&self.own);
        for (pid, s) in now.iter_mut() {
            s.port = match self.current.get(pid) {
                Some(known) if known.port.is_some() => known.port,
                _ => {
                    self.count("net_tcp", 1);
                    discover::listening_port(&self.procfs, *pid)
                }
            };
        }
        self.apply(now);
    }

    /// Processes that exec'd: each command line read once, the process watched, or no longer
    /// watched, as it now says.
    fn execs(&mut self, pids: &[u32]) {
        let mut now = self.current.clone();
        for &pid in pids.iter().filter(|p| **p != self.own) {
            self.count("cmdline", 1);
            match discover::verdict(&self.procfs, pid, &self.matchers) {
                Some(s) => {
                    now.insert(pid, s);
                }
                None => {
                    now.remove(&pid);
                }
            }
        }
        self.apply(now);
    }

    /// Processes that started listening: a watched server's port is its lowest; a process
    /// listening on a `--watch-port` is watched, in whatever network namespace.
    fn listening(&mut self, listens: &[(u32, u16)]) {
        let mut now = self.current.clone();
        for &(pid, port) in listens.iter().filter(|(p, _)| *p != self.own) {
            match now.get_mut(&pid) {
                Some(s) if s.port.is_none_or(|p| port < p) => s.port = Some(port),
                Some(_) => {}
                None if self.ports.contains(&port) => {
                    self.count("cmdline", 1);
                    let argv = discover::argv(&self.procfs, pid).unwrap_or_default();
                    let mut s = discover::by_port(&argv);
                    s.port = Some(port);
                    now.insert(pid, s);
                }
                None => {}
            }
        }
        self.apply(now);
    }

    /// Makes `now` the watched set: new servers watched (and their open connections seeded),
    /// gone ones forgotten, and the list published.
    fn apply(&mut self, now: HashMap<u32, Server>) {
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
        self.count("net_tcp", 1);
        let mut fds = discover::accepted_fds(&self.procfs, pid);
        self.count("net_unix", 1);
        fds.extend(discover::accepted_unix_fds(&self.procfs, pid));
        for fd in &fds {
            let _ = self
                .maps
                .conns
                .insert(ConnKey { tgid: pid, fd: *fd }, ConnState::plain(0), 0);
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
        // On records a tick only looks at whether the watched servers still run (a `stat`
        // each), so it can come often whatever the polling interval.
        let interval = if self.by_events {
            interval.min(PRUNE_EVERY)
        } else {
            interval
        };
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                self.tick();
                next = Instant::now() + interval;
            }
            heartbeat.beat();
            match control.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(Control::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(Control::Execs(pids)) => self.execs(&pids),
                Ok(Control::Listening(listens)) => self.listening(&listens),
                Ok(Control::Rescan) => self.scan(),
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

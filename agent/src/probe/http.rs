//! The `http` family: tracepoints on the socket syscalls of watched processes, and the
//! watcher thread that decides which processes are watched (inference servers by command
//! line, `--watch-port` listeners) and seeds their connections older than the agent.

use std::{
    collections::{HashMap, HashSet},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use super::{links::Links, ProbeError};
use crate::{
    http::{
        discover::{self, Server},
        tracker::Input,
    },
    proc::ProcFs,
};
use agent_common::http::{config as knob, ConnKey, CAPTURE_MAX};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::TracePoint,
    Ebpf,
};

/// (program, syscall tracepoints it serves). Exit probes first: a call seen entering is then
/// always seen returning.
const PROGRAMS: &[(&str, &[&str])] = &[
    (
        "http_exit",
        &[
            "sys_exit_accept",
            "sys_exit_accept4",
            "sys_exit_read",
            "sys_exit_recvfrom",
            "sys_exit_readv",
            "sys_exit_recvmsg",
            "sys_exit_write",
            "sys_exit_sendto",
            "sys_exit_writev",
            "sys_exit_sendmsg",
        ],
    ),
    (
        "http_enter_accept",
        &["sys_enter_accept", "sys_enter_accept4"],
    ),
    ("http_enter_read", &["sys_enter_read", "sys_enter_recvfrom"]),
    ("http_enter_write", &["sys_enter_write", "sys_enter_sendto"]),
    ("http_enter_readv", &["sys_enter_readv"]),
    ("http_enter_writev", &["sys_enter_writev"]),
    ("http_enter_recvmsg", &["sys_enter_recvmsg"]),
    ("http_enter_sendmsg", &["sys_enter_sendmsg"]),
    ("http_close", &["sys_enter_close"]),
];

/// Names of the family's programs (tests check none is left loaded).
pub fn program_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS.iter().map(|(p, _)| *p)
}

/// The maps userspace writes, taken out of the object.
pub struct HttpMaps {
    watched: BpfHashMap<MapData, u32, u32>,
    conns: BpfHashMap<MapData, ConnKey, u32>,
}

/// What the probe manager keeps of the family: the programs' links, held apart from the other
/// families' so that the budget can detach and re-attach them alone, the argument stash it
/// empties while they are off, and the counters that estimate their cost.
pub struct HttpProbes {
    links: Option<Links>,
    /// Arguments from syscall entry to exit, per thread (the programs' `Stash`: 24 bytes).
    stash: BpfHashMap<MapData, u64, [u64; 3]>,
    pub cost: PerCpuArray<MapData, u64>,
}

/// Loads and attaches the family's programs, sets the capture size and takes its maps.
pub fn attach(ebpf: &mut Ebpf, capture_bytes: u32) -> Result<(HttpMaps, HttpProbes), ProbeError> {
    let mut config: Array<MapData, u64> = super::take(ebpf, "HTTP_CONFIG")?;
    let capture = u64::from(capture_bytes.min(CAPTURE_MAX as u32));
    if let Err(e) = config.set(knob::CAPTURE_BYTES, capture, 0) {
        tracing::warn!(error = %e, "cannot set the http capture size");
    }
    let watched = super::take(ebpf, "HTTP_WATCHED")?;
    let conns = super::take(ebpf, "HTTP_CONNS")?;
    let stash = super::take(ebpf, "HTTP_STASH")?;
    let cost = super::take(ebpf, "HTTP_COST")?;
    for (name, _) in PROGRAMS {
        program(ebpf, name)?
            .load()
            .map_err(|source| ProbeError::Program { name, source })?;
    }
    let links = attach_programs(ebpf)?;
    Ok((
        HttpMaps { watched, conns },
        HttpProbes {
            links: Some(links),
            stash,
            cost,
        },
    ))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut TracePoint, ProbeError> {
    ebpf.program_mut(name)
        .ok_or(ProbeError::MissingProgram { name })?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })
}

/// Attaches the loaded programs to their tracepoints, in [`PROGRAMS`] order.
fn attach_programs(ebpf: &mut Ebpf) -> Result<Links, ProbeError> {
    let mut links = Links::default();
    for (name, tracepoints) in PROGRAMS {
        let prog = program(ebpf, name)?;
        let attach_error = |source| ProbeError::Attach { name, source };
        for tp in *tracepoints {
            let id = prog.attach("syscalls", tp).map_err(attach_error)?;
            links.hold(prog.take_link(id).map_err(attach_error)?);
        }
    }
    Ok(links)
}

impl HttpProbes {
    pub fn is_attached(&self) -> bool {
        self.links.is_some()
    }

    /// Detaches every program, then, none running, empties the stash: a call that entered
    /// before and returned while detached left its arguments there, and another call's exit
    /// after the re-attach would take them for its own.
    pub fn detach(&mut self) {
        if let Some(links) = self.links.take() {
            links.release();
        }
        let keys: Vec<u64> = self.stash.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.stash.remove(&k);
        }
    }

    /// Attaches the programs again (exits first, as at start). On an error what was attached
    /// is released and the family stays off.
    pub fn reattach(&mut self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        if self.links.is_none() {
            self.links = Some(attach_programs(ebpf)?);
        }
        Ok(())
    }

    /// The links, for the shutdown to release with the others.
    pub fn take_links(&mut self) -> Links {
        self.links.take().unwrap_or_default()
    }
}

/// What the watcher is told between its rescans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Stop,
    /// The family's programs were detached at `at_ns` (CLOCK_MONOTONIC, the probes' clock).
    Paused {
        at_ns: u64,
    },
    /// They were attached again, completely by `at_ns`: records from then on are whole.
    Resumed {
        at_ns: u64,
    },
}

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
    board: Option<std::sync::Arc<discover::ServerBoard>>,
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
    pub fn with_board(mut self, board: std::sync::Arc<discover::ServerBoard>) -> Self {
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

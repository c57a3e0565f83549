//! The `http` family: tracepoints on the socket syscalls of watched processes, and the
//! watcher thread that decides which processes are watched (inference servers by command
//! line, `--watch-port` listeners) and seeds their connections older than the agent.

use std::{
    collections::{HashMap, HashSet},
    sync::mpsc as std_mpsc,
    time::Duration,
};

use agent_common::http::{config as knob, ConnKey, CAPTURE_MAX};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData},
    programs::TracePoint,
    Ebpf,
};
use tokio::sync::mpsc;

use super::{links::Links, ProbeError};
use crate::{
    http::{
        discover::{self, Server},
        tracker::Input,
    },
    proc::ProcFs,
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

/// Loads and attaches the family's programs, sets the capture size and takes its maps.
pub fn attach(ebpf: &mut Ebpf, capture_bytes: u32) -> Result<(HttpMaps, Links), ProbeError> {
    let mut links = Links::default();
    let mut config: Array<MapData, u64> = super::take(ebpf, "HTTP_CONFIG")?;
    let capture = u64::from(capture_bytes.min(CAPTURE_MAX as u32));
    if let Err(e) = config.set(knob::CAPTURE_BYTES, capture, 0) {
        tracing::warn!(error = %e, "cannot set the http capture size");
    }
    let watched = super::take(ebpf, "HTTP_WATCHED")?;
    let conns = super::take(ebpf, "HTTP_CONNS")?;
    for (name, tracepoints) in PROGRAMS {
        let program_error = |source| ProbeError::Program { name, source };
        let prog: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(ProbeError::MissingProgram { name })?
            .try_into()
            .map_err(program_error)?;
        prog.load().map_err(program_error)?;
        let attach_error = |source| ProbeError::Attach { name, source };
        for tp in *tracepoints {
            let id = prog.attach("syscalls", tp).map_err(attach_error)?;
            links.hold(prog.take_link(id).map_err(attach_error)?);
        }
    }
    Ok((HttpMaps { watched, conns }, links))
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
    tracker: mpsc::Sender<Input>,
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
        tracker: mpsc::Sender<Input>,
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
            let fds = discover::accepted_fds(&self.procfs, *pid);
            for fd in &fds {
                let _ = self.maps.conns.insert(
                    ConnKey {
                        tgid: *pid,
                        fd: *fd,
                    },
                    1,
                    0,
                );
            }
            let s = &now[pid];
            tracing::info!(
                pid,
                server = s.kind,
                model = s.model.as_deref().unwrap_or(""),
                open_connections = fds.len(),
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
        if self
            .tracker
            .blocking_send(Input::Servers(self.current.clone()))
            .is_err()
        {
            tracing::debug!("http tracker gone");
        }
    }

    /// Runs until told to stop, beating `heartbeat` every tick.
    pub fn run(
        mut self,
        interval: Duration,
        stop: std_mpsc::Receiver<()>,
        heartbeat: crate::health::Heartbeat,
    ) {
        loop {
            self.tick();
            heartbeat.beat();
            match stop.recv_timeout(interval) {
                Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        heartbeat.done();
    }
}

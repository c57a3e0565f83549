//! The `http` family's probes: a raw tracepoint on syscall exit that follows the socket
//! syscalls of watched processes, the
//! maps that say which processes and connections are watched (kept by `crate::http::watch`),
//! and the links the budget detaches and re-attaches.

use super::{links::Links, ProbeError};
use agent_common::http::{config as knob, ConnKey, ConnState, FdLayout, CAPTURE_MAX};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{BtfTracePoint, RawTracePoint},
    Ebpf,
};

/// The family's program on `sys_exit` as a BTF tracepoint (plain loads of the saved
/// registers), and the same as a raw tracepoint where the kernel refuses the first.
const BTF_PROGRAM: &str = "http_sys_exit";
const RAW_PROGRAM: &str = "http_sys_exit_raw";
const TRACEPOINT: &str = "sys_exit";

/// Names of the family's programs, the TLS probes' included (the budget adds up their run
/// time; tests check none is left loaded).
pub fn program_names() -> impl Iterator<Item = &'static str> {
    [BTF_PROGRAM, RAW_PROGRAM]
        .into_iter()
        .chain(super::tls::PROGRAMS.iter().copied())
}

/// Which of the two programs is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Btf,
    Raw,
}

/// The maps userspace writes, taken out of the object.
pub struct HttpMaps {
    /// Processes whose syscalls the programs follow.
    pub watched: BpfHashMap<MapData, u32, u32>,
    /// Their connections, accepted or seeded.
    pub conns: BpfHashMap<MapData, ConnKey, ConnState>,
}

/// What the probe manager keeps of the family: the programs' links, held apart from the other
/// families' so that the budget can detach and re-attach them alone, and the counters that
/// estimate their cost.
pub struct HttpProbes {
    links: Option<Links>,
    hook: Hook,
    pub cost: PerCpuArray<MapData, u64>,
    /// OpenSSL's calls in watched servers, loaded with the family, attached per process by
    /// the manager (`None` where they could not be loaded: TLS stays unread).
    pub tls: Option<super::tls::TlsProbes>,
    /// The family's knobs: `PAUSED` stops the TLS probes, which stay attached, while it is
    /// shed.
    config: Array<MapData, u64>,
}

/// Loads and attaches the family's programs, sets the capture size and takes its maps.
pub fn attach(
    ebpf: &mut Ebpf,
    capture_bytes: u32,
    raw_tracepoint: bool,
    tls_internal: bool,
) -> Result<(HttpMaps, HttpProbes), ProbeError> {
    let mut config: Array<MapData, u64> = super::take(ebpf, "HTTP_CONFIG")?;
    let capture = u64::from(capture_bytes.min(CAPTURE_MAX as u32));
    if let Err(e) = config.set(knob::CAPTURE_BYTES, capture, 0) {
        tracing::warn!(error = %e, "cannot set the http capture size");
    }
    let watched = super::take(ebpf, "HTTP_WATCHED")?;
    let conns = super::take(ebpf, "HTTP_CONNS")?;
    let cost = super::take(ebpf, "HTTP_COST")?;
    let hook = load_hook(ebpf, raw_tracepoint)?;
    let links = attach_programs(ebpf, hook)?;
    let tls = super::tls::TlsProbes::load(ebpf, tls_internal)
        .inspect_err(|e| {
            tracing::warn!(
                error = crate::error_chain(e),
                "the TLS probes cannot be loaded: TLS inside servers is not read"
            )
        })
        .ok();
    Ok((
        HttpMaps { watched, conns },
        HttpProbes {
            links: Some(links),
            hook,
            cost,
            config,
            tls,
        },
    ))
}

/// The offsets from a task to its open files, from the kernel's BTF. Without them a `close`
/// racing another thread's `accept` of the same fd number may end the new connection's
/// following (said once).
pub fn fd_layout() -> FdLayout {
    let read = || -> Result<FdLayout, String> {
        let btf = super::btf::Btf::kernel().map_err(|e| e.to_string())?;
        let at = |s: &str, f: &str| btf.offset(s, f).map_err(|e| e.to_string());
        Ok(FdLayout {
            known: 1,
            task_files: at("task_struct", "files")?,
            files_fdt: at("files_struct", "fdt")?,
            fdt_fd: at("fdtable", "fd")?,
            fdt_max_fds: at("fdtable", "max_fds")?,
        })
    };
    read().unwrap_or_else(|e| {
        tracing::warn!(error = e, "no fd table layout in the kernel's BTF: a connection accepted while another closes the same fd number may go unfollowed");
        FdLayout::default()
    })
}

/// Loads the BTF tracepoint, or where the kernel refuses it (no BTF, an older kernel) or
/// `raw` asks for it (`probes.http_raw_tracepoint`), the raw one.
fn load_hook(ebpf: &mut Ebpf, raw: bool) -> Result<Hook, ProbeError> {
    let btf = if raw {
        Err("probes.http_raw_tracepoint is set".to_string())
    } else {
        aya::Btf::from_sys_fs().map_err(|e| e.to_string())
    };
    let btf_error = match btf {
        Ok(btf) => match btf_program(ebpf)?.load(TRACEPOINT, &btf) {
            Ok(()) => return Ok(Hook::Btf),
            Err(e) => e.to_string(),
        },
        Err(e) => e,
    };
    tracing::info!(
        error = btf_error,
        "the http family's BTF tracepoint cannot be loaded: using a raw tracepoint"
    );
    raw_program(ebpf)?
        .load()
        .map_err(|source| ProbeError::Program {
            name: RAW_PROGRAM,
            source,
        })?;
    Ok(Hook::Raw)
}

fn btf_program(ebpf: &mut Ebpf) -> Result<&mut BtfTracePoint, ProbeError> {
    super::program(ebpf, BTF_PROGRAM)
}

fn raw_program(ebpf: &mut Ebpf) -> Result<&mut RawTracePoint, ProbeError> {
    super::program(ebpf, RAW_PROGRAM)
}

/// Attaches the loaded program to `sys_exit`.
fn attach_programs(ebpf: &mut Ebpf, hook: Hook) -> Result<Links, ProbeError> {
    let mut links = Links::default();
    match hook {
        Hook::Btf => {
            let prog = btf_program(ebpf)?;
            let attach_error = |source| ProbeError::Attach {
                name: BTF_PROGRAM,
                source,
            };
            let id = prog.attach().map_err(attach_error)?;
            links.hold(prog.take_link(id).map_err(attach_error)?);
        }
        Hook::Raw => {
            let prog = raw_program(ebpf)?;
            let attach_error = |source| ProbeError::Attach {
                name: RAW_PROGRAM,
                source,
            };
            let id = prog.attach(TRACEPOINT).map_err(attach_error)?;
            links.hold(prog.take_link(id).map_err(attach_error)?);
        }
    }
    Ok(links)
}

impl HttpProbes {
    pub fn is_attached(&self) -> bool {
        self.links.is_some()
    }

    /// Detaches every program (the TLS probes stay attached, paused).
    pub fn detach(&mut self) {
        self.set_paused(true);
        if let Some(links) = self.links.take() {
            links.release();
        }
    }

    /// Attaches the programs again. On an error what was attached is released and the family
    /// stays off.
    pub fn reattach(&mut self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        if self.links.is_none() {
            self.links = Some(attach_programs(ebpf, self.hook)?);
        }
        self.set_paused(false);
        Ok(())
    }

    fn set_paused(&mut self, paused: bool) {
        if let Err(e) = self.config.set(knob::PAUSED, u64::from(paused), 0) {
            tracing::warn!(error = %e, "cannot pause or resume the TLS probes");
        }
    }

    /// The links, for the shutdown to release with the others.
    pub fn take_links(&mut self) -> Links {
        self.links.take().unwrap_or_default()
    }
}

/// What the watcher is told between its rescans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// These processes exec'd: their command lines are new.
    Execs(Vec<u32>),
    /// These processes started listening on these TCP ports.
    Listening(Vec<(u32, u16)>),
    /// Discovery records were lost: look at every process again.
    Rescan,
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

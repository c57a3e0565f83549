//! The `discovery` family: the kernel names driver loads, execs and listening sockets
//! (programs in the eBPF object's `discovery` module), so the agent reads `/proc` once at
//! start and afterwards only for the processes these records name. Where the family cannot
//! run (`probes.disabled = ["discovery"]`, tracefs missing) the probe manager and the `http`
//! watcher poll `/proc` instead, every `probes.discovery_interval_ms`.
//!
//! Driver loads are seen in each dynamic loader (`ld.so`) the node's processes use: a uprobe
//! on `_dl_debug_state`, attached per loader file as discovery meets it (every process's
//! loader at start, an exec'd process's loader at its exec).

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
};

use agent_common::discovery::LoaderCookie;
use aya::{
    maps::{MapData, RingBuf},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
        UProbe,
    },
    Ebpf,
};

use super::{discover::Library, elf, links::Links, sched::attach_tracepoint, ProbeError};
use crate::tenant_file::FileId;

const LOADER_PROGRAM: &str = "discovery_loader";
/// The loader's hook for debuggers, and the list it describes.
const DEBUG_STATE: &str = "_dl_debug_state";
const R_DEBUG: &str = "_r_debug";
/// Loader files probed at most: one per distinct `ld.so` (a container image brings its own).
pub const MAX_LOADERS: usize = 256;

/// Whether a mapped file is a dynamic loader (glibc's `ld-linux-<arch>.so.<n>`, or the older
/// `ld-<version>.so`).
pub fn is_loader(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("ld-linux") || (name.starts_with("ld-2.") && name.ends_with(".so"))
}

/// Why a loader is not probed.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{0}")]
    Elf(#[from] elf::ElfError),
    #[error("no {DEBUG_STATE} or {R_DEBUG} (not glibc's loader)")]
    NotGlibc,
    #[error("{MAX_LOADERS} loader files are probed already")]
    Limit,
    #[error(transparent)]
    Probe(#[from] ProbeError),
}

impl LoaderError {
    /// Label value for `inferscope_dropped_total{what="loader"}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Elf(_) => "unreadable",
            Self::NotGlibc => "not_glibc",
            Self::Limit => "limit",
            Self::Probe(_) => "attach_failed",
        }
    }
}

/// The running family: its ring, the loaders probed, its links.
pub struct DiscoveryHooks {
    pub ring: RingBuf<MapData>,
    loaders: HashMap<FileId, UProbeLink>,
    links: Links,
}

impl DiscoveryHooks {
    /// Attaches `sched_process_exec` and the listen tracepoint and loads the loader probe.
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        let ring = super::take(ebpf, "DISCOVERY_EVENTS")?;
        let mut links = Links::default();
        links.hold(attach_tracepoint(
            ebpf,
            "discovery_exec",
            "sched",
            "sched_process_exec",
        )?);
        links.hold(attach_tracepoint(
            ebpf,
            "discovery_listen",
            "sock",
            "inet_sock_set_state",
        )?);
        loader_program(ebpf)?
            .load()
            .map_err(|source| ProbeError::Program {
                name: LOADER_PROGRAM,
                source,
            })?;
        Ok(Self {
            ring,
            loaders: HashMap::new(),
            links,
        })
    }

    pub fn knows_loader(&self, id: FileId) -> bool {
        self.loaders.contains_key(&id)
    }

    pub fn loaders(&self) -> usize {
        self.loaders.len()
    }

    /// Probes one loader file (through its descriptor, as the CUDA libraries are).
    pub fn attach_loader(&mut self, ebpf: &mut Ebpf, lib: &Library) -> Result<(), LoaderError> {
        if self.loaders.len() >= MAX_LOADERS {
            return Err(LoaderError::Limit);
        }
        let file = &lib.file;
        let at = elf::read_symbols(&file.file, file.size, &lib.display, &[DEBUG_STATE])?;
        let addresses =
            elf::read_addresses(&file.file, file.size, &lib.display, &[DEBUG_STATE, R_DEBUG])?;
        let (Some(found), Some(&state), Some(&r_debug)) = (
            at.found.get(DEBUG_STATE),
            addresses.get(DEBUG_STATE),
            addresses.get(R_DEBUG),
        ) else {
            return Err(LoaderError::NotGlibc);
        };
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(found.offset),
            cookie: Some(LoaderCookie::new(state, r_debug).0),
        };
        let attach_error = |source| ProbeError::Attach {
            name: LOADER_PROGRAM,
            source,
        };
        let prog = loader_program(ebpf)?;
        let id = prog
            .attach(point, file.fd_path(), UProbeScope::AllProcesses)
            .map_err(attach_error)?;
        let link = prog.take_link(id).map_err(attach_error)?;
        self.loaders.insert(lib.id, link);
        Ok(())
    }

    pub fn take_links(&mut self) -> Links {
        let mut links = std::mem::take(&mut self.links);
        for (_, link) in self.loaders.drain() {
            links.hold(link);
        }
        links
    }

    /// Waits up to `timeout` for records (the ring's descriptor becoming readable) or for
    /// `wake` to be rung; returns whether there are records.
    pub fn wait(&self, timeout: std::time::Duration, wake: Option<&crate::wake::Wake>) -> bool {
        let pfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            pfd(self.ring.as_fd().as_raw_fd()),
            pfd(wake.map_or(-1, |w| w.as_raw_fd())),
        ];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: two pollfds, valid for the call; a negative fd is ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        n > 0 && fds[0].revents & libc::POLLIN != 0
    }
}

fn loader_program(ebpf: &mut Ebpf) -> Result<&mut UProbe, ProbeError> {
    ebpf.program_mut(LOADER_PROGRAM)
        .ok_or(ProbeError::MissingProgram {
            name: LOADER_PROGRAM,
        })?
        .try_into()
        .map_err(|source| ProbeError::Program {
            name: LOADER_PROGRAM,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_loaders() {
        for path in [
            "/lib64/ld-linux-x86-64.so.2",
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "/lib/ld-linux-aarch64.so.1",
            "/lib/x86_64-linux-gnu/ld-2.31.so",
        ] {
            assert!(is_loader(path), "{path}");
        }
        for path in [
            "/usr/lib/libld.so",
            "/lib/ld-musl-x86_64.so.1",
            "/x/lld",
            "/x/ld-2.31.so.bak",
        ] {
            assert!(!is_loader(path), "{path}");
        }
    }

    /// This machine's own loader has what the probe needs, at distances the cookie carries.
    #[test]
    fn the_hosts_loader_has_the_debugger_interface() {
        let path = std::path::Path::new("/lib64/ld-linux-x86-64.so.2");
        let lib = super::super::discover::library_at(path, "ld.so").unwrap();
        let at = elf::read_symbols(&lib.file.file, lib.file.size, "ld.so", &[DEBUG_STATE]).unwrap();
        assert!(at.found.contains_key(DEBUG_STATE));
        let addresses = elf::read_addresses(
            &lib.file.file,
            lib.file.size,
            "ld.so",
            &[DEBUG_STATE, R_DEBUG],
        )
        .unwrap();
        assert_eq!(addresses.len(), 2, "{addresses:?}");
        assert_ne!(addresses[DEBUG_STATE], addresses[R_DEBUG]);
    }
}

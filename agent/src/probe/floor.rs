//! The floor programs (`floor_enter`/`floor_return`, `agent-ebpf/src/probes/floor.rs`): the
//! least a probe can do to deliver one call to userspace (stash the arguments at entry, emit
//! one ring-buffer record at return). Only the benchmark (`cargo xtask bench`) attaches them,
//! to measure the `cuda` family against; the agent never does.

use std::path::Path;

use aya::{
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
        UProbe,
    },
    Ebpf,
};

use super::{program, ProbeError};

const ENTER: &str = "floor_enter";
const RETURN: &str = "floor_return";

/// The floor programs, loaded, with the links of the symbols they are attached to.
pub struct FloorProbes {
    links: Vec<(&'static str, UProbeLinkId)>,
}

impl FloorProbes {
    /// Loads both programs into the kernel (attaching nothing yet).
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        for name in [ENTER, RETURN] {
            program::<UProbe>(ebpf, name)?
                .load()
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(Self { links: Vec::new() })
    }

    /// Attaches the entry and return program at file offset `offset` of the library at `path`
    /// (where the `cuda` family would put its probe on that symbol: `elf::read_symbols`), for
    /// every process, so that the floor pays the same trap as the agent.
    pub fn attach(&mut self, ebpf: &mut Ebpf, path: &Path, offset: u64) -> Result<(), ProbeError> {
        // Return probe first, as the `cuda` family does.
        for name in [RETURN, ENTER] {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: None,
            };
            let link = program::<UProbe>(ebpf, name)?
                .attach(point, path, UProbeScope::AllProcesses)
                .map_err(|source| ProbeError::Program { name, source })?;
            self.links.push((name, link));
        }
        Ok(())
    }

    /// Detaches every link (dropping the object would too).
    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        for (name, link) in self.links.drain(..) {
            match program::<UProbe>(ebpf, name) {
                Ok(p) => {
                    if let Err(e) = p.detach(link) {
                        tracing::warn!(program = name, error = %e, "detach failed");
                    }
                }
                Err(e) => tracing::warn!(program = name, error = %e, "detach failed"),
            }
        }
    }
}

/// The `http` family's former hook: the per-syscall tracepoints it attached, where
/// `tax_per_syscall` goes to measure what they cost an unwatched process.
pub const PER_SYSCALL_TRACEPOINTS: &[&str] = &[
    "sys_enter_accept",
    "sys_enter_accept4",
    "sys_enter_read",
    "sys_enter_recvfrom",
    "sys_enter_write",
    "sys_enter_sendto",
    "sys_enter_readv",
    "sys_enter_writev",
    "sys_enter_recvmsg",
    "sys_enter_sendmsg",
    "sys_enter_close",
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
];

/// Attaches `tax_per_syscall` to [`PER_SYSCALL_TRACEPOINTS`]; the links detach on drop.
pub fn attach_per_syscall_tax(ebpf: &mut Ebpf) -> Result<super::links::Links, ProbeError> {
    let name = "tax_per_syscall";
    let prog: &mut aya::programs::TracePoint = ebpf
        .program_mut(name)
        .ok_or(ProbeError::MissingProgram { name })?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })?;
    prog.load()
        .map_err(|source| ProbeError::Program { name, source })?;
    let mut links = super::links::Links::default();
    for tp in PER_SYSCALL_TRACEPOINTS {
        let attach_error = |source| ProbeError::Attach { name, source };
        let id = prog.attach("syscalls", tp).map_err(attach_error)?;
        links.hold(prog.take_link(id).map_err(attach_error)?);
    }
    Ok(links)
}

/// Attaches `tax_raw_floor` to `sys_exit`, where the `http` family's one program is: the
/// tracing path with nothing on it.
pub fn attach_raw_floor(ebpf: &mut Ebpf) -> Result<super::links::Links, ProbeError> {
    let name = "tax_raw_floor";
    let prog: &mut aya::programs::RawTracePoint = ebpf
        .program_mut(name)
        .ok_or(ProbeError::MissingProgram { name })?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })?;
    prog.load()
        .map_err(|source| ProbeError::Program { name, source })?;
    let mut links = super::links::Links::default();
    let attach_error = |source| ProbeError::Attach { name, source };
    let id = prog.attach("sys_exit").map_err(attach_error)?;
    links.hold(prog.take_link(id).map_err(attach_error)?);
    Ok(links)
}

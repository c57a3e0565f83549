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

use super::ProbeError;

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
            program(ebpf, name)?
                .load()
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(Self { links: Vec::new() })
    }

    /// Attaches the entry and return program to `symbol` of the library at `path`, for every
    /// process.
    pub fn attach(&mut self, ebpf: &mut Ebpf, path: &Path, symbol: &str) -> Result<(), ProbeError> {
        // Return probe first, as the `cuda` family does.
        for name in [RETURN, ENTER] {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::Symbol(symbol),
                cookie: None,
            };
            let link = program(ebpf, name)?
                .attach(point, path, UProbeScope::AllProcesses)
                .map_err(|source| ProbeError::Program { name, source })?;
            self.links.push((name, link));
        }
        Ok(())
    }

    /// Detaches every link (dropping the object would too).
    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        for (name, link) in self.links.drain(..) {
            match program(ebpf, name) {
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

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, ProbeError> {
    ebpf.program_mut(name)
        .ok_or(ProbeError::MissingProgram { name })?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })
}

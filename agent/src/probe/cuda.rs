//! Attaching the `cuda` family: one entry uprobe and one return uprobe per exported symbol of
//! `agent_common::cuda::APIS`, per library file, with the api id as the attach cookie.

use std::collections::{BTreeMap, HashMap, HashSet};

use agent_common::cuda::{CudaApi, APIS};
use aya::{
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
        UProbe,
    },
    Ebpf,
};

use super::{
    discover::{FileId, Library},
    elf::{self, FirstInstruction},
    links::Links,
    ProbeError,
};

const ENTER: &str = "cuda_enter";
const RETURN: &str = "cuda_return";

/// Owned links: dropping them detaches.
struct Attached {
    api: CudaApi,
    enter: UProbeLink,
    ret: UProbeLink,
}

struct AttachedLibrary {
    display: String,
    links: Vec<Attached>,
    first: HashMap<CudaApi, FirstInstruction>,
}

/// What attaching one library did.
#[derive(Debug, Default)]
pub struct AttachReport {
    pub attached: Vec<CudaApi>,
    /// Symbols of the table the library does not export.
    pub missing: Vec<&'static str>,
    /// Symbols it exports whose attach failed, with the reason.
    pub failed: Vec<(&'static str, String)>,
    /// Attaches the kernel refused for want of privilege (EACCES, EPERM).
    pub denied: usize,
}

pub struct CudaProbes {
    libs: BTreeMap<FileId, AttachedLibrary>,
    /// Symbols never attached: the kill switch, and probes the budget shed.
    off: HashSet<CudaApi>,
}

impl CudaProbes {
    /// Loads the family's programs. `disabled` holds kill-switch names from the config.
    pub fn load(ebpf: &mut Ebpf, disabled: &[String]) -> Result<Self, ProbeError> {
        for name in [ENTER, RETURN] {
            program(ebpf, name)?
                .load()
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        let off = APIS
            .iter()
            .filter(|(_, sym, _)| {
                disabled
                    .iter()
                    .any(|d| d.strip_prefix("cuda:").unwrap_or(d) == *sym)
            })
            .map(|(api, _, _)| *api)
            .collect();
        Ok(Self {
            libs: BTreeMap::new(),
            off,
        })
    }

    pub fn is_attached(&self, id: FileId) -> bool {
        self.libs.contains_key(&id)
    }

    pub fn libraries(&self) -> impl Iterator<Item = &str> {
        self.libs.values().map(|l| l.display.as_str())
    }

    pub fn attach_library(&mut self, ebpf: &mut Ebpf, lib: &Library) -> AttachReport {
        let mut report = AttachReport::default();
        let wanted: Vec<&str> = APIS.iter().map(|(_, s, _)| *s).collect();
        let symbols = match elf::read_symbols(&lib.file.file, lib.file.size, &lib.display, &wanted)
        {
            Ok(s) => s,
            Err(e) => {
                report.failed.push(("*", e.to_string()));
                return report;
            }
        };
        let mut attached = AttachedLibrary {
            display: lib.display.clone(),
            links: Vec::new(),
            first: HashMap::new(),
        };
        for &(api, sym, _) in APIS {
            let Some(found) = symbols.found.get(sym) else {
                report.missing.push(sym);
                continue;
            };
            attached.first.insert(api, found.first);
            if self.off.contains(&api) {
                continue;
            }
            match attach_symbol(ebpf, lib, api, found.offset) {
                Ok(link) => {
                    attached.links.push(link);
                    report.attached.push(api);
                }
                Err(e) => {
                    if permission_denied(&e) {
                        report.denied += 1;
                    }
                    report.failed.push((sym, crate::error_chain(&e)));
                }
            }
        }
        self.libs.insert(lib.id, attached);
        report
    }

    /// Detaches `api` from every library and keeps it off for libraries found later.
    pub fn shed(&mut self, api: CudaApi) {
        self.off.insert(api);
        let mut gone = Links::default();
        for lib in self.libs.values_mut() {
            let (off, kept): (Vec<_>, Vec<_>) = lib.links.drain(..).partition(|l| l.api == api);
            lib.links = kept;
            for link in off {
                gone.hold(link.enter);
                gone.hold(link.ret);
            }
        }
        gone.release();
    }

    /// Every link, for the shutdown to release with the others.
    pub fn take_links(&mut self) -> Links {
        let mut out = Links::default();
        for (_, lib) in std::mem::take(&mut self.libs) {
            for link in lib.links {
                out.hold(link.enter);
                out.hold(link.ret);
            }
        }
        out
    }

    /// Per attached api: the costliest first instruction among the libraries it is on.
    pub fn attached_costs(&self) -> HashMap<CudaApi, FirstInstruction> {
        let mut out: HashMap<CudaApi, FirstInstruction> = HashMap::new();
        for lib in self.libs.values() {
            for link in &lib.links {
                let first = lib.first[&link.api];
                out.entry(link.api)
                    .and_modify(|f| {
                        if first.entry_cost_ns() > f.entry_cost_ns() {
                            *f = first
                        }
                    })
                    .or_insert(first);
            }
        }
        out
    }

    /// Number of libraries each api is attached to.
    pub fn attach_counts(&self) -> HashMap<CudaApi, usize> {
        let mut out = HashMap::new();
        for lib in self.libs.values() {
            for link in &lib.links {
                *out.entry(link.api).or_insert(0) += 1;
            }
        }
        out
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, ProbeError> {
    ebpf.program_mut(name)
        .ok_or(ProbeError::MissingProgram { name })?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })
}

/// Whether the kernel refused an attach for want of privilege: since Linux 6.16 (and the
/// stable kernels patched in mid-2025) a uprobe takes CAP_SYS_ADMIN, CAP_PERFMON no longer
/// suffices.
pub fn permission_denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Attaches at the offset the agent's own bounded reader found, through the checked
/// descriptor: aya's symbol lookup would map the whole file by path (and follow its debug
/// link to another file).
fn attach_symbol(
    ebpf: &mut Ebpf,
    lib: &Library,
    api: CudaApi,
    offset: u64,
) -> Result<Attached, ProbeError> {
    let point = || UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(offset),
        cookie: Some(api as u64),
    };
    let path = lib.file.fd_path();
    let attach_error = |name| move |source| ProbeError::Attach { name, source };
    let attach = |ebpf: &mut Ebpf, name| -> Result<UProbeLink, ProbeError> {
        let prog = program(ebpf, name)?;
        let id = prog
            .attach(point(), &path, UProbeScope::AllProcesses)
            .map_err(attach_error(name))?;
        prog.take_link(id).map_err(attach_error(name))
    };
    // Return probe first: a call that enters between the two attaches leaves no stash behind.
    // On failure the return probe's link drops, which detaches it.
    let ret = attach(ebpf, RETURN)?;
    let enter = attach(ebpf, ENTER)?;
    Ok(Attached { api, enter, ret })
}

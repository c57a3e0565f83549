//! Attaching the `cuda` family: one entry uprobe and one return uprobe per exported symbol of
//! `agent_common::cuda::APIS`, per library file, with the library's slot and the api id as the
//! attach cookie. At most `LIBRARY_SLOTS` files are probed; the budget sheds and re-attaches
//! probes per library.

use std::collections::{BTreeMap, HashMap, HashSet};

use agent_common::cuda::{self as common, CudaApi, APIS, LIBRARY_SLOTS};
use aya::{
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
        UProbe,
    },
    Ebpf,
};

use super::{
    budget::Probe,
    discover::{FileId, Library},
    elf::{self, FirstInstruction},
    links::Links,
    program, ProbeError,
};
use crate::tenant_file::TenantFile;

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
    /// Index of the library's hit counters, carried in its attach cookies.
    slot: u32,
    /// A descriptor of the checked file, kept open: shed probes are re-attached through it,
    /// never through a path that may lead elsewhere by then.
    file: TenantFile,
    links: Vec<Attached>,
    /// Every table symbol the library exports: offset and first instruction.
    symbols: HashMap<CudaApi, (u64, FirstInstruction)>,
    /// Apis the budget has detached from this library for now.
    shed: HashSet<CudaApi>,
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
    /// Every library slot is taken: the library is not probed.
    pub over_limit: bool,
    /// Attached probes placed past a flags-only first instruction (`probe::prologue`).
    pub past_first_instruction: usize,
}

pub struct CudaProbes {
    libs: BTreeMap<FileId, AttachedLibrary>,
    /// Symbols never attached: the kill switch.
    off: HashSet<CudaApi>,
    /// Libraries refused because every slot was taken (not tried again).
    over_limit: HashSet<FileId>,
}

impl CudaProbes {
    /// Loads the family's programs. `disabled` holds kill-switch names from the config.
    pub fn load(ebpf: &mut Ebpf, disabled: &[String]) -> Result<Self, ProbeError> {
        for name in [ENTER, RETURN] {
            program::<UProbe>(ebpf, name)?
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
            over_limit: HashSet::new(),
        })
    }

    /// Whether the library was attached, or refused for want of a slot.
    pub fn is_attached(&self, id: FileId) -> bool {
        self.libs.contains_key(&id) || self.over_limit.contains(&id)
    }

    pub fn libraries(&self) -> impl Iterator<Item = &str> {
        self.libs.values().map(|l| l.display.as_str())
    }

    pub fn attach_library(&mut self, ebpf: &mut Ebpf, lib: &Library) -> AttachReport {
        let mut report = AttachReport::default();
        let used: HashSet<u32> = self.libs.values().map(|l| l.slot).collect();
        let Some(slot) = (0..LIBRARY_SLOTS).find(|s| !used.contains(s)) else {
            self.over_limit.insert(lib.id);
            report.over_limit = true;
            return report;
        };
        // Kept for re-attaching; the caller's `Library` may be dropped.
        let file = match lib.file.file.try_clone() {
            Ok(file) => TenantFile {
                file,
                id: lib.file.id,
                size: lib.file.size,
            },
            Err(e) => {
                report.failed.push(("*", e.to_string()));
                return report;
            }
        };
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
            slot,
            file,
            links: Vec::new(),
            symbols: HashMap::new(),
            shed: HashSet::new(),
        };
        for &(api, sym, _) in APIS {
            let Some(found) = symbols.found.get(sym) else {
                report.missing.push(sym);
                continue;
            };
            attached.symbols.insert(api, (found.offset, found.first));
            if self.off.contains(&api) {
                continue;
            }
            match attach_symbol(ebpf, &attached.file, slot, api, found.offset) {
                Ok(link) => {
                    attached.links.push(link);
                    report.attached.push(api);
                    report.past_first_instruction += usize::from(found.skip > 0);
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

    /// Detaches one api from one library until [`CudaProbes::reattach`]. Returns the library's
    /// name when something was detached.
    pub fn shed(&mut self, probe: Probe) -> Option<String> {
        let lib = self.libs.values_mut().find(|l| l.slot == probe.slot)?;
        let (off, kept): (Vec<_>, Vec<_>) = lib.links.drain(..).partition(|l| l.api == probe.api);
        lib.links = kept;
        if off.is_empty() {
            return None;
        }
        lib.shed.insert(probe.api);
        let mut gone = Links::default();
        for link in off {
            gone.hold(link.enter);
            gone.hold(link.ret);
        }
        gone.release();
        Some(lib.display.clone())
    }

    /// Attaches a shed api again, through the library's open descriptor. Returns the
    /// library's name; `Ok(None)` when the probe was not shed (or the library is gone).
    pub fn reattach(
        &mut self,
        ebpf: &mut Ebpf,
        probe: Probe,
    ) -> Result<Option<String>, ProbeError> {
        let Some(lib) = self.libs.values_mut().find(|l| l.slot == probe.slot) else {
            return Ok(None);
        };
        if !lib.shed.contains(&probe.api) {
            return Ok(None);
        }
        let Some(&(offset, _)) = lib.symbols.get(&probe.api) else {
            return Ok(None);
        };
        let link = attach_symbol(ebpf, &lib.file, lib.slot, probe.api, offset)?;
        lib.links.push(link);
        lib.shed.remove(&probe.api);
        Ok(Some(lib.display.clone()))
    }

    /// The library in `slot`, for logs.
    pub fn library_name(&self, slot: u32) -> Option<&str> {
        self.libs
            .values()
            .find(|l| l.slot == slot)
            .map(|l| l.display.as_str())
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

    /// Every attached probe with the first instruction of its symbol in its library.
    pub fn attached_costs(&self) -> HashMap<Probe, FirstInstruction> {
        let mut out = HashMap::new();
        for lib in self.libs.values() {
            for link in &lib.links {
                let probe = Probe {
                    slot: lib.slot,
                    api: link.api,
                };
                out.insert(probe, lib.symbols[&link.api].1);
            }
        }
        out
    }

    /// Number of libraries each api is shed on.
    pub fn shed_counts(&self) -> HashMap<CudaApi, usize> {
        let mut out = HashMap::new();
        for lib in self.libs.values() {
            for api in &lib.shed {
                *out.entry(*api).or_insert(0) += 1;
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
    file: &TenantFile,
    slot: u32,
    api: CudaApi,
    offset: u64,
) -> Result<Attached, ProbeError> {
    let point = || UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(offset),
        cookie: Some(common::cookie(slot, api as u32)),
    };
    let path = file.fd_path();
    let attach_error = |name| move |source| ProbeError::Attach { name, source };
    let attach = |ebpf: &mut Ebpf, name| -> Result<UProbeLink, ProbeError> {
        let prog = program::<UProbe>(ebpf, name)?;
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

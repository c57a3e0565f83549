//! Attaching OpenSSL's read and write calls in watched processes (`probes/tls.rs` in
//! agent-ebpf): for each watched server that maps a `libssl.so*`, an entry and a return probe on
//! the internal read and write functions behind `SSL_read`, `SSL_read_ex`, `SSL_write` and
//! `SSL_write_ex` ([`inner_calls`]), or on those four, scoped to that process, so the
//! `http` family reads the plaintext of TLS the server terminates itself. A process is looked
//! at when it becomes watched (one read of its maps) and again when its loader reports a
//! `libssl` (the `discovery` family); its probes go when it is no longer watched.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
};

use agent_common::http::tls::{self, SslKey, CALL_EX, CALL_INNER, CALL_OUT_ARG4, CALL_WRITE};
use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
        UProbe,
    },
    Ebpf,
};

use super::{discover, elf, links::Links, program, ProbeError};
use crate::proc::ProcFs;

const ENTER: &str = "tls_enter";
const RETURN: &str = "tls_return";

/// Names of the programs (tests check none is left loaded).
pub const PROGRAMS: [&str; 2] = [ENTER, RETURN];

/// The calls probed, with the attach cookie that tells the programs which one fired.
const SYMBOLS: &[(&str, u64)] = &[
    ("SSL_read", 0),
    ("SSL_read_ex", CALL_EX),
    ("SSL_write", CALL_WRITE),
    ("SSL_write_ex", CALL_WRITE | CALL_EX),
];

/// Processes whose OpenSSL is probed at most (each costs four to eight links).
pub const MAX_PROCESSES: usize = 256;

/// Whether a mapped file is OpenSSL's TLS library (`libssl.so`, `libssl.so.3`, `libssl.so.1.1`).
pub fn is_libssl(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == "libssl.so" || name.starts_with("libssl.so.")
}

struct Probed {
    library: String,
    links: Vec<UProbeLink>,
}

/// Why a watched process's TLS is not read.
#[derive(Debug, thiserror::Error)]
pub enum TlsAttachError {
    #[error("its maps cannot be read")]
    Maps,
    #[error("{MAX_PROCESSES} processes are probed already")]
    Limit,
    #[error("its libssl cannot be opened")]
    Open(#[source] crate::tenant_file::OpenError),
    #[error("its libssl's symbols cannot be read")]
    Symbols(#[source] elf::ElfError),
    #[error("its libssl exports none of SSL_read, SSL_write")]
    NoSymbols,
    #[error("a probe cannot be attached")]
    Attach(#[source] ProbeError),
}

impl TlsAttachError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Maps => "maps_unreadable",
            Self::Limit => "process_limit",
            Self::Open(e) => e.reason(),
            Self::Symbols(_) => "bad_elf",
            Self::NoSymbols => "no_symbols",
            Self::Attach(_) => "attach_failed",
        }
    }
}

/// What a look at one process did.
#[derive(Debug)]
pub enum Looked {
    /// Its libssl is probed now: the library's path as the process names it, and whether on
    /// the internal functions ([`inner_calls`]) or on the exported calls.
    Attached { library: String, internal: bool },
    /// It maps no libssl (yet).
    NoLibrary,
    /// It was probed already.
    Known,
    /// It is not (or no longer) watched.
    NotWatched,
    /// The `http` family is shed: looked at again when it comes back.
    Paused,
}

pub struct TlsProbes {
    probed: HashMap<u32, Probed>,
    /// The watched processes, as last told.
    watched: HashSet<u32>,
    /// Watched processes looked at without a libssl: looked at again only when their loader
    /// reports one.
    without: HashSet<u32>,
    /// The programs' `SSL*` ties, emptied of a process's entries when it goes.
    ties: BpfHashMap<MapData, SslKey, u32>,
    internal: bool,
    /// The `http` family is shed: nothing is probed until it comes back. Most of what reading
    /// TLS costs a server is these probes' traps, so a shed that left them would relieve
    /// nothing while no request is timed.
    paused: bool,
}

impl TlsProbes {
    /// `internal`: probe the internal functions where shown safe (`probes.tls_internal`).
    pub fn load(ebpf: &mut Ebpf, internal: bool) -> Result<Self, ProbeError> {
        for name in PROGRAMS {
            program::<UProbe>(ebpf, name)?
                .load()
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(Self {
            probed: HashMap::new(),
            watched: HashSet::new(),
            without: HashSet::new(),
            ties: super::take(ebpf, "TLS_SSL_FD")?,
            internal,
            paused: false,
        })
    }

    /// Processes whose OpenSSL is probed now.
    pub fn processes(&self) -> usize {
        self.probed.len()
    }

    /// The watched set is now `watched`: processes that left it lose their probes; new ones
    /// are returned, to be looked at.
    pub fn watched(&mut self, watched: &HashSet<u32>) -> Vec<u32> {
        let gone: Vec<u32> = self
            .probed
            .keys()
            .filter(|p| !watched.contains(p))
            .copied()
            .collect();
        for pid in gone {
            self.forget(pid);
        }
        self.without.retain(|p| watched.contains(p));
        self.watched = watched.clone();
        watched
            .iter()
            .filter(|p| !self.probed.contains_key(p) && !self.without.contains(p))
            .copied()
            .collect()
    }

    /// Detaches every process's probes while the `http` family is shed; the ties go too (a
    /// connection's `SSL*` is tied again by its next calls once the probes are back).
    pub fn pause(&mut self) {
        self.paused = true;
        let probed: Vec<u32> = self.probed.keys().copied().collect();
        for pid in probed {
            self.forget(pid);
        }
    }

    /// The family is back: the watched processes are looked at again (by the caller).
    pub fn resume(&mut self) {
        self.paused = false;
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Processes found without a libssl are read again at their next look.
    pub fn retry_without(&mut self) {
        self.without.clear();
    }

    /// Detaches a process's probes and removes its ties.
    fn forget(&mut self, pid: u32) {
        if let Some(p) = self.probed.remove(&pid) {
            let mut links = Links::default();
            for l in p.links {
                links.hold(l);
            }
            links.release();
            tracing::debug!(pid, library = p.library, "TLS probes detached");
        }
        let stale: Vec<SslKey> = self
            .ties
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for k in stale {
            let _ = self.ties.remove(&k);
        }
    }

    /// Reads one watched process's maps and probes the first `libssl` it maps. `again`: its
    /// loader reported a libssl, so a process looked at before without one is read again.
    pub fn look(
        &mut self,
        ebpf: &mut Ebpf,
        procfs: &ProcFs,
        pid: u32,
        again: bool,
    ) -> Result<Looked, TlsAttachError> {
        if !self.watched.contains(&pid) {
            return Ok(Looked::NotWatched);
        }
        if self.paused {
            return Ok(Looked::Paused);
        }
        if self.probed.contains_key(&pid) {
            return Ok(Looked::Known);
        }
        if self.without.contains(&pid) && !again {
            return Ok(Looked::NoLibrary);
        }
        let maps = procfs.maps(pid).ok_or(TlsAttachError::Maps)?;
        let Some(mapped) = libssl_in(pid, &maps) else {
            self.without.insert(pid);
            return Ok(Looked::NoLibrary);
        };
        self.without.remove(&pid);
        if self.probed.len() >= MAX_PROCESSES {
            return Err(TlsAttachError::Limit);
        }
        let lib = discover::open_mapped(procfs, &mapped).map_err(TlsAttachError::Open)?;
        let wanted: Vec<&str> = SYMBOLS.iter().map(|(s, _)| *s).collect();
        let symbols = elf::read_symbols(&lib.file.file, lib.file.size, &lib.display, &wanted)
            .map_err(TlsAttachError::Symbols)?;
        let Some(pid_nz) = NonZeroU32::new(pid) else {
            return Err(TlsAttachError::Maps);
        };
        let path = lib.file.fd_path();
        let points = probe_points(&symbols.found, self.internal);
        let mut links = Vec::new();
        for &(offset, cookie) in &points {
            let point = || UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: Some(cookie),
            };
            // Return probe first: a call entering between the two leaves no stash behind.
            for name in [RETURN, ENTER] {
                let attach_error = |source| ProbeError::Attach { name, source };
                let prog = program::<UProbe>(ebpf, name).map_err(TlsAttachError::Attach)?;
                let id = prog
                    .attach(point(), &path, UProbeScope::OneProcess(pid_nz))
                    .map_err(attach_error)
                    .map_err(TlsAttachError::Attach)?;
                links.push(
                    prog.take_link(id)
                        .map_err(attach_error)
                        .map_err(TlsAttachError::Attach)?,
                );
            }
        }
        if links.is_empty() {
            return Err(TlsAttachError::NoSymbols);
        }
        self.probed.insert(
            pid,
            Probed {
                library: lib.display.clone(),
                links,
            },
        );
        Ok(Looked::Attached {
            library: lib.display,
            internal: points.iter().any(|(_, c)| c & CALL_INNER != 0),
        })
    }

    /// Every link, for the shutdown to release with the others.
    pub fn take_links(&mut self) -> Links {
        let mut out = Links::default();
        for (_, p) in std::mem::take(&mut self.probed) {
            for l in p.links {
                out.hold(l);
            }
        }
        out
    }
}

/// Where the probes go (file offset, attach cookie): on the two internal functions when
/// `internal` allows it and [`inner_calls`] shows every call goes through them, else on each
/// exported call.
fn probe_points(found: &HashMap<String, elf::FoundSymbol>, internal: bool) -> Vec<(u64, u64)> {
    if let Some(inner) = inner_calls(found).filter(|_| internal) {
        return inner.to_vec();
    }
    SYMBOLS
        .iter()
        .filter_map(|&(sym, cookie)| {
            let f = found.get(sym)?;
            Some((f.offset, cookie | (trap_kind(f.first) << tls::TRAP_SHIFT)))
        })
        .collect()
}

/// OpenSSL's `SSL_write` and `SSL_write_ex` are wrappers around one internal function
/// (`ssl_write_internal(s, buf, num, [flags,] &written)`), and the reads around another. The
/// wrappers begin with `sub $n, %rsp`, which a probe single-steps (a second trap: about 15 µs
/// a call on a VM); the internal functions begin with `push`, which the kernel emulates. Both
/// are probed there instead when the code shows it safe: `SSL_read` and `SSL_write` call a
/// function first (past their argument checks) with `&written`/`&readbytes` of their own frame
/// as the fourth or fifth argument, the `_ex` call of the same direction (where exported) calls
/// the same function, the two directions' functions differ, and a probe on them is cheaper.
fn inner_calls(found: &HashMap<String, elf::FoundSymbol>) -> Option<[(u64, u64); 2]> {
    let one = |plain: &str, ex: &str, write: u64| {
        let wrapper = found.get(plain)?;
        let inner = wrapper.call?;
        let out = match inner.frame_arg? {
            3 => 0,
            4 => CALL_OUT_ARG4,
            _ => return None,
        };
        if let Some(ex) = found.get(ex) {
            if ex.call.map(|c| c.offset) != Some(inner.offset) {
                return None;
            }
        }
        if inner.first == elf::FirstInstruction::SingleStep {
            return None;
        }
        Some((
            inner.offset,
            write | CALL_INNER | out | (trap_kind(inner.first) << tls::TRAP_SHIFT),
        ))
    };
    let read = one("SSL_read", "SSL_read_ex", 0)?;
    let write = one("SSL_write", "SSL_write_ex", CALL_WRITE)?;
    (read.0 != write.0).then_some([read, write])
}

/// The attach cookie's code for how a probe on `first` is hit.
fn trap_kind(first: elf::FirstInstruction) -> u64 {
    match first {
        elf::FirstInstruction::Nop5 => tls::TRAP_NOP5,
        elf::FirstInstruction::Emulated => tls::TRAP_EMULATED,
        elf::FirstInstruction::SingleStep => tls::TRAP_SINGLE_STEP,
    }
}

/// The first `libssl.so*` mapping in one process's maps text.
pub fn libssl_in(pid: u32, maps: &[u8]) -> Option<discover::Mapped> {
    if !maps.windows(6).any(|w| w == b"libssl") {
        return None;
    }
    String::from_utf8_lossy(maps)
        .lines()
        .filter(|l| l.contains("libssl"))
        .filter_map(crate::proc::file_mapping)
        .find(|m| is_libssl(&m.path))
        .map(|m| discover::Mapped {
            pid,
            range: m.range(),
            id: m.id,
            path: m.path,
            deleted: m.deleted,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbol(offset: u64, call: Option<(u64, Option<u8>)>) -> elf::FoundSymbol {
        elf::FoundSymbol {
            offset,
            first: elf::FirstInstruction::SingleStep,
            skip: 0,
            call: call.map(|(offset, frame_arg)| elf::Callee {
                offset,
                first: elf::FirstInstruction::Emulated,
                frame_arg,
            }),
        }
    }

    fn table(entries: &[(&str, elf::FoundSymbol)]) -> HashMap<String, elf::FoundSymbol> {
        entries.iter().map(|(n, f)| (n.to_string(), *f)).collect()
    }

    #[test]
    fn probes_the_internal_functions_only_when_every_call_goes_through_them() {
        let emulated = tls::TRAP_EMULATED << tls::TRAP_SHIFT;
        let wrappers = [
            ("SSL_read", symbol(0x100, Some((0x900, Some(3))))),
            ("SSL_read_ex", symbol(0x180, Some((0x900, None)))),
            ("SSL_write", symbol(0x200, Some((0xa00, Some(4))))),
            ("SSL_write_ex", symbol(0x280, Some((0xa00, None)))),
        ];
        assert_eq!(
            probe_points(&table(&wrappers), false).len(),
            4,
            "probes.tls_internal off"
        );
        assert_eq!(
            probe_points(&table(&wrappers), true),
            vec![
                (0x900, CALL_INNER | emulated),
                (0xa00, CALL_WRITE | CALL_INNER | CALL_OUT_ARG4 | emulated),
            ]
        );
        let single = tls::TRAP_SINGLE_STEP << tls::TRAP_SHIFT;
        let exported = vec![
            (0x100, single),
            (0x180, CALL_EX | single),
            (0x200, CALL_WRITE | single),
            (0x280, CALL_WRITE | CALL_EX | single),
        ];
        // SSL_write_ex going elsewhere (a tail call, another function): the four are probed.
        let mut t = table(&wrappers);
        t.insert("SSL_write_ex".into(), symbol(0x280, Some((0xb00, None))));
        assert_eq!(probe_points(&t, true), exported);
        t.insert("SSL_write_ex".into(), symbol(0x280, None));
        assert_eq!(probe_points(&t, true), exported);
        // No out parameter of the wrapper's frame, or one in an unexpected argument.
        let mut t = table(&wrappers);
        t.insert("SSL_read".into(), symbol(0x100, Some((0x900, None))));
        assert_eq!(probe_points(&t, true), exported);
        t.insert("SSL_read".into(), symbol(0x100, Some((0x900, Some(1)))));
        assert_eq!(probe_points(&t, true), exported);
        // Both directions through one function: not a read/write split.
        let mut t = table(&wrappers);
        t.insert("SSL_write".into(), symbol(0x200, Some((0x900, Some(3)))));
        t.insert("SSL_write_ex".into(), symbol(0x280, Some((0x900, None))));
        assert_eq!(probe_points(&t, true).len(), 4);
        // An internal function whose own probe would be single-stepped: no gain.
        let mut t = table(&wrappers);
        let mut read = symbol(0x100, Some((0x900, Some(3))));
        read.call.as_mut().unwrap().first = elf::FirstInstruction::SingleStep;
        t.insert("SSL_read".into(), read);
        assert_eq!(probe_points(&t, true), exported);
    }

    /// The system's own OpenSSL 3, as the servers of the tests map it.
    #[test]
    fn the_systems_openssl_is_probed_on_its_internal_functions() {
        let path = [
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            "/usr/lib64/libssl.so.3",
            "/lib64/libssl.so.3",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("no libssl.so.3 found (cargo xtask setup installs it)");
        let file = std::fs::File::open(path).unwrap();
        let size = file.metadata().unwrap().len();
        let wanted: Vec<&str> = SYMBOLS.iter().map(|(s, _)| *s).collect();
        let symbols = elf::read_symbols(&file, size, path, &wanted).unwrap();
        let points = probe_points(&symbols.found, true);
        assert_eq!(points.len(), 2, "{:#x?}", symbols.found);
        for (i, (offset, cookie)) in points.iter().enumerate() {
            assert_ne!(cookie & CALL_INNER, 0);
            assert_eq!(cookie & CALL_WRITE, i as u64);
            assert_ne!(
                (cookie >> tls::TRAP_SHIFT) & 3,
                tls::TRAP_SINGLE_STEP,
                "{offset:#x}"
            );
            assert!(!symbols.found.values().any(|f| f.offset == *offset));
        }
    }

    #[test]
    fn finds_openssl_by_name_only() {
        assert!(is_libssl("/usr/lib/x86_64-linux-gnu/libssl.so.3"));
        assert!(is_libssl("/opt/conda/lib/libssl.so.1.1"));
        assert!(is_libssl("libssl.so"));
        assert!(!is_libssl("/usr/lib/libssl3.so"));
        assert!(!is_libssl("/usr/lib/libssl_helper.so"));
        let maps = b"7f00-7f10 r--p 00000000 fd:01 42 /usr/lib/libcrypto.so.3\n\
                     7f10-7f20 r--p 00000000 fd:01 43 /usr/lib/x86_64-linux-gnu/libssl.so.3\n\
                     7f20-7f30 r-xp 00010000 fd:01 43 /usr/lib/x86_64-linux-gnu/libssl.so.3\n";
        let m = libssl_in(9, maps).unwrap();
        assert_eq!(m.path, "/usr/lib/x86_64-linux-gnu/libssl.so.3");
        assert_eq!(m.range, "7f10-7f20");
        assert_eq!(m.id.ino, 43);
        assert!(libssl_in(
            9,
            b"7f00-7f10 r--p 00000000 fd:01 42 /usr/lib/libcrypto.so.3\n"
        )
        .is_none());
    }
}

//! Finding CUDA driver libraries: files named `libcuda.so*` mapped by running processes (seen
//! through `/proc/<pid>/root`, so libraries inside containers are found too), in the standard
//! driver locations, and given explicitly. Files are identified by (device, inode): a uprobe
//! on a file covers every process that maps it, whatever path it was reached by. A process's
//! files are opened as [`crate::tenant_file`] says, never by following its paths from here.

use std::{collections::HashSet, path::Path};

pub use crate::tenant_file::FileId;
use crate::{
    proc::ProcFs,
    tenant_file::{self, OpenError, TenantFile},
};

/// Where drivers are installed on hosts, in NVIDIA's container images and by the GPU operator.
pub const STANDARD_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/nvidia/lib64",
    "/usr/local/nvidia/lib",
    "/run/nvidia/driver/usr/lib/x86_64-linux-gnu",
    "/run/nvidia/driver/usr/lib64",
];

/// A library opened for attaching: the descriptor the symbols are read from and the probes
/// attached through.
#[derive(Debug)]
pub struct Library {
    pub id: FileId,
    pub file: TenantFile,
    /// The path as the mapping process (or the operator) names it, for logs and labels.
    pub display: String,
}

/// A `libcuda.so*` mapping of a process, as its maps line has it (nothing opened yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub pid: u32,
    /// `start-end`, the name of its `map_files` entry (hex without leading zeros).
    pub range: String,
    pub id: FileId,
    /// The path as the process sees it.
    pub path: String,
    pub deleted: bool,
}

pub fn is_cuda_driver(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == "libcuda.so" || name.starts_with("libcuda.so.")
}

/// A library of the agent's own file tree (an explicit `--cuda-lib`, a standard directory).
pub fn library_at(path: &Path, display: impl Into<String>) -> Result<Library, OpenError> {
    let file = tenant_file::open_in_root(Path::new("/"), &path.to_string_lossy(), None)?;
    Ok(Library {
        id: file.id,
        file,
        display: display.into(),
    })
}

/// The file a path of the agent's own tree leads to now, by a `stat`: no descriptor opened.
pub fn id_at(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// `libcuda.so*` files in the standard driver directories, except those `known` (already
/// attached: a `stat` tells, so they are not reopened and reread every discovery round).
pub fn standard_libraries(known: impl Fn(FileId) -> bool) -> Vec<Library> {
    let mut out = Vec::new();
    for dir in STANDARD_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.to_str().is_some_and(is_cuda_driver) {
                if id_at(&path).is_some_and(&known) {
                    continue;
                }
                if let Ok(lib) = library_at(&path, path.display().to_string()) {
                    out.push(lib);
                }
            }
        }
    }
    dedup(out)
}

/// Opens a process's mapping of a driver: by its path inside the process's root, else (a
/// deleted file, a process that changed its root after mapping, a path that no longer leads
/// to the mapped file) through `map_files`.
pub fn open_mapped(procfs: &ProcFs, m: &Mapped) -> Result<Library, OpenError> {
    let base = procfs.root().join(m.pid.to_string());
    let by_path = if m.deleted {
        None
    } else {
        Some(tenant_file::open_in_root(
            &base.join("root"),
            &m.path,
            Some(m.id),
        ))
    };
    let file = match by_path {
        Some(Ok(f)) => f,
        Some(Err(first)) => {
            tenant_file::open_mapping(&base, &m.range, Some(m.id)).map_err(|_| first)?
        }
        None => tenant_file::open_mapping(&base, &m.range, Some(m.id))?,
    };
    Ok(Library {
        id: file.id,
        file,
        display: m.path.clone(),
    })
}

/// What one look at processes' maps found: their driver mappings (one per file and process)
/// and their dynamic loaders (one per file).
#[derive(Debug, Default)]
pub struct Found {
    pub drivers: Vec<Mapped>,
    pub loaders: Vec<Mapped>,
    /// Each process read and the loader it runs under (its first, where it maps several).
    pub loader_of: Vec<(u32, FileId)>,
    /// Maps texts read.
    pub read: u64,
}

/// Scans the memory maps of running processes for CUDA driver mappings and loaders. `skip`
/// holds pids already known to map an attached library (their maps need not be read again).
pub fn mapped_libraries(procfs: &ProcFs, skip: &HashSet<u32>) -> Found {
    let mut out = Found::default();
    for pid in procfs.pids() {
        if skip.contains(&pid) {
            continue;
        }
        out.add(procfs, pid);
    }
    out.drivers.sort_by_key(|m| (m.id, m.pid));
    out.drivers.dedup_by_key(|m| (m.id, m.pid));
    out
}

impl Found {
    /// Reads one process's maps into what was found.
    pub fn add(&mut self, procfs: &ProcFs, pid: u32) {
        let Some(maps) = procfs.maps(pid) else {
            return;
        };
        self.read += 1;
        self.drivers.extend(mappings_in(pid, &maps));
        let loaders = loaders_in(pid, &maps);
        if let Some(first) = loaders.first() {
            self.loader_of.push((pid, first.id));
        }
        for loader in loaders {
            if !self.loaders.iter().any(|l| l.id == loader.id) {
                self.loaders.push(loader);
            }
        }
    }
}

/// The driver mappings in one process's maps text.
pub fn mappings_in(pid: u32, maps: &[u8]) -> Vec<Mapped> {
    if memchr_libcuda(maps).is_none() {
        return Vec::new();
    }
    // Only a line naming `libcuda` can name a driver: the others are not parsed at all.
    String::from_utf8_lossy(maps)
        .lines()
        .filter(|l| l.contains("libcuda"))
        .filter_map(|line| parse_maps_line(pid, line))
        .collect()
}

/// The dynamic loader mappings in one process's maps text (its executable one).
pub fn loaders_in(pid: u32, maps: &[u8]) -> Vec<Mapped> {
    let mut out: Vec<Mapped> = Vec::new();
    for line in String::from_utf8_lossy(maps)
        .lines()
        .filter(|l| l.contains("/ld-") && l.contains(" r-xp "))
    {
        let Some(m) = crate::proc::file_mapping(line) else {
            continue;
        };
        if super::discovery_hooks::is_loader(&m.path) && !out.iter().any(|o| o.id == m.id) {
            out.push(Mapped {
                pid,
                range: m.range(),
                id: m.id,
                path: m.path,
                deleted: m.deleted,
            });
        }
    }
    out
}

fn memchr_libcuda(haystack: &[u8]) -> Option<usize> {
    haystack.windows(7).position(|w| w == b"libcuda")
}

/// One `/proc/<pid>/maps` line → the CUDA driver mapping it describes, if it is one.
pub fn parse_maps_line(pid: u32, line: &str) -> Option<Mapped> {
    let m = crate::proc::file_mapping(line)?;
    is_cuda_driver(&m.path).then(|| Mapped {
        pid,
        range: m.range(),
        id: m.id,
        path: m.path,
        deleted: m.deleted,
    })
}

pub fn dedup(mut libs: Vec<Library>) -> Vec<Library> {
    libs.sort_by_key(|l| l.id);
    libs.dedup_by_key(|l| l.id);
    libs
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn recognises_driver_names_only() {
        assert!(is_cuda_driver("/usr/lib/x86_64-linux-gnu/libcuda.so.1"));
        assert!(is_cuda_driver("/x/libcuda.so.550.54.15"));
        assert!(is_cuda_driver("libcuda.so"));
        assert!(!is_cuda_driver("/usr/lib/libcudart.so.12"));
        assert!(!is_cuda_driver("/usr/lib/libcuda_stub.so"));
    }

    /// The `stat` that spares reopening an attached library names the file as the opened
    /// descriptor does, and a replaced file (a driver upgrade) by its new identity.
    #[test]
    fn a_stat_names_the_file_the_open_finds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libcuda.so.1");
        std::fs::write(&path, b"old").unwrap();
        let opened = library_at(&path, "x").unwrap();
        assert_eq!(id_at(&path), Some(opened.id));
        let replacement = dir.path().join("new");
        std::fs::write(&replacement, b"new").unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        assert_ne!(id_at(&path), Some(opened.id));
        assert_eq!(id_at(&dir.path().join("absent")), None);
    }

    #[test]
    fn parses_maps_lines() {
        let m =
            parse_maps_line(7, "7f00-7f10 r-xp 00000000 fd:01 42 /opt/drv/libcuda.so.1").unwrap();
        assert_eq!(
            m,
            Mapped {
                pid: 7,
                range: "7f00-7f10".into(),
                id: FileId {
                    dev: libc::makedev(0xfd, 1),
                    ino: 42
                },
                path: "/opt/drv/libcuda.so.1".into(),
                deleted: false,
            }
        );
        let d = parse_maps_line(
            7,
            "7f00-7f10 r-xp 00000000 08:10 9 /x/libcuda.so.1 (deleted)",
        )
        .unwrap();
        assert!(d.deleted && d.path == "/x/libcuda.so.1");
        // As map_files names it: without the leading zeros of the maps line.
        let low = parse_maps_line(
            7,
            "00400000-00452000 r-xp 00000000 08:10 9               /x/libcuda.so",
        )
        .unwrap();
        assert_eq!(low.range, "400000-452000");
        for bad in [
            "7f00-7f10 r-xp 00000000 fd:01 42 /usr/lib/libc.so.6",
            "7f00-7f10 r-xp 00000000 fd:01 x /a/libcuda.so.1",
            "7f00-7f10 r-xp 00000000 zz:01 42 /a/libcuda.so.1",
            "7f00 r-xp 00000000 fd:01 42 /a/libcuda.so.1",
            "7f00-7f10 r-xp 00000000 fd:01 42 libcuda.so.1",
            "garbage",
            "",
        ] {
            assert_eq!(parse_maps_line(1, bad), None, "{bad}");
        }
    }

    #[test]
    fn scans_a_captured_proc_tree_and_opens_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let lib_dir = dir.path().join("1234/root/opt/drv");
        std::fs::create_dir_all(&lib_dir).unwrap();
        std::fs::write(lib_dir.join("libcuda.so.1"), b"\x7fELF").unwrap();
        let meta = std::fs::metadata(lib_dir.join("libcuda.so.1")).unwrap();
        let dev = format!(
            "{:x}:{:x}",
            libc::major(meta.dev()),
            libc::minor(meta.dev())
        );
        std::fs::write(
            dir.path().join("1234/maps"),
            format!(
                "7f00-7f10 r-xp 00000000 {dev} {ino} /opt/drv/libcuda.so.1\n\
                 7f10-7f20 r--p 00010000 {dev} {ino} /opt/drv/libcuda.so.1\n\
                 7f20-7f30 r-xp 00000000 fd:01 43 /usr/lib/libc.so.6\n\
                 7f30-7f40 rw-p 00000000 00:00 0 \n",
                ino = meta.ino()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("99")).unwrap();
        std::fs::write(dir.path().join("99/maps"), "garbage without fields\n\n").unwrap();
        let procfs = ProcFs::new(dir.path());
        let Found {
            drivers: found,
            read,
            ..
        } = mapped_libraries(&procfs, &HashSet::new());
        assert_eq!(read, 2, "both processes' maps read once");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pid, 1234);
        let lib = open_mapped(&procfs, &found[0]).unwrap();
        assert_eq!(lib.display, "/opt/drv/libcuda.so.1");
        assert_eq!(lib.id, found[0].id);
        assert!(mapped_libraries(&procfs, &HashSet::from([1234]))
            .drivers
            .is_empty());

        // The same name planted as a link out of the root is never followed out.
        std::fs::remove_file(lib_dir.join("libcuda.so.1")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("1234/maps"), lib_dir.join("libcuda.so.1"))
            .unwrap();
        let e = open_mapped(&procfs, &found[0]).unwrap_err();
        assert_eq!(e.reason(), "unreachable", "{e}");
    }
}

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

/// `libcuda.so*` files in the standard driver directories.
pub fn standard_libraries() -> Vec<Library> {
    let mut out = Vec::new();
    for dir in STANDARD_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.to_str().is_some_and(is_cuda_driver) {
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

/// Scans the memory maps of running processes for CUDA driver mappings, one per file and
/// process. `skip` holds pids already known to map an attached library (their maps need not
/// be read again).
pub fn mapped_libraries(procfs: &ProcFs, skip: &HashSet<u32>) -> Vec<Mapped> {
    let mut out = Vec::new();
    for pid in procfs.pids() {
        if skip.contains(&pid) {
            continue;
        }
        let Some(maps) = procfs.maps(pid) else {
            continue;
        };
        if memchr_libcuda(&maps).is_none() {
            continue;
        }
        // Only a line naming `libcuda` can name a driver: the others are not parsed at all.
        for line in String::from_utf8_lossy(&maps)
            .lines()
            .filter(|l| l.contains("libcuda"))
        {
            if let Some(m) = parse_maps_line(pid, line) {
                out.push(m);
            }
        }
    }
    out.sort_by_key(|m| (m.id, m.pid));
    out.dedup_by_key(|m| (m.id, m.pid));
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
        let found = mapped_libraries(&procfs, &HashSet::new());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pid, 1234);
        let lib = open_mapped(&procfs, &found[0]).unwrap();
        assert_eq!(lib.display, "/opt/drv/libcuda.so.1");
        assert_eq!(lib.id, found[0].id);
        assert!(mapped_libraries(&procfs, &HashSet::from([1234])).is_empty());

        // The same name planted as a link out of the root is never followed out.
        std::fs::remove_file(lib_dir.join("libcuda.so.1")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("1234/maps"), lib_dir.join("libcuda.so.1"))
            .unwrap();
        let e = open_mapped(&procfs, &found[0]).unwrap_err();
        assert_eq!(e.reason(), "unreachable", "{e}");
    }
}

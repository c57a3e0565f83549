//! Finding CUDA driver libraries: files named `libcuda.so*` mapped by running processes (seen
//! through `/proc/<pid>/root`, so libraries inside containers are found too), in the standard
//! driver locations, and given explicitly. Files are identified by (device, inode): a uprobe
//! on a file covers every process that maps it, whatever path it was reached by.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::proc::ProcFs;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Library {
    pub id: FileId,
    /// A path the agent can open (through `/proc/<pid>/root` or `map_files` when needed).
    pub path: PathBuf,
    /// The path as the mapping process sees it, for logs and labels.
    pub display: String,
}

pub fn is_cuda_driver(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == "libcuda.so" || name.starts_with("libcuda.so.")
}

pub fn library_at(path: &Path, display: impl Into<String>) -> Option<Library> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Library {
        id: FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        },
        path: path.to_path_buf(),
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
                if let Some(lib) = library_at(&path, path.display().to_string()) {
                    out.push(lib);
                }
            }
        }
    }
    dedup(out)
}

/// Scans the memory maps of running processes for CUDA driver libraries. `skip` holds pids
/// already known to map an attached library (their maps need not be read again).
pub fn mapped_libraries(procfs: &ProcFs, skip: &HashSet<u32>) -> Vec<(u32, Library)> {
    let mut out = Vec::new();
    for pid in procfs.pids() {
        if skip.contains(&pid) {
            continue;
        }
        let base = procfs.root().join(pid.to_string());
        let Ok(maps) = std::fs::read(base.join("maps")) else {
            continue;
        };
        if memchr_libcuda(&maps).is_none() {
            continue;
        }
        for line in String::from_utf8_lossy(&maps).lines() {
            if let Some(lib) = parse_maps_line(&base, line) {
                out.push((pid, lib));
            }
        }
    }
    out.sort_by_key(|(pid, lib)| (lib.id, *pid));
    out.dedup_by_key(|(_, lib)| lib.id);
    out
}

fn memchr_libcuda(haystack: &[u8]) -> Option<usize> {
    haystack.windows(7).position(|w| w == b"libcuda")
}

/// One `/proc/<pid>/maps` line → the library it maps, if it is a CUDA driver.
fn parse_maps_line(proc_pid: &Path, line: &str) -> Option<Library> {
    let mut fields = line.splitn(6, char::is_whitespace);
    let range = fields.next()?;
    let _perms = fields.next()?;
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let _inode = fields.next()?;
    let path = fields.next()?.trim_start();
    let (path, deleted) = match path.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (path, false),
    };
    if !path.starts_with('/') || !is_cuda_driver(path) {
        return None;
    }
    // A file replaced on disk is still reachable through the mapping itself.
    let open_path = if deleted {
        proc_pid.join("map_files").join(range)
    } else {
        proc_pid.join("root").join(path.trim_start_matches('/'))
    };
    library_at(&open_path, path)
}

pub fn dedup(mut libs: Vec<Library>) -> Vec<Library> {
    libs.sort_by_key(|l| l.id);
    libs.dedup_by_key(|l| l.id);
    libs
}

#[cfg(test)]
mod tests {
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
    fn scans_a_captured_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        let lib_dir = dir.path().join("1234/root/opt/drv");
        std::fs::create_dir_all(&lib_dir).unwrap();
        std::fs::write(lib_dir.join("libcuda.so.1"), b"\x7fELF").unwrap();
        std::fs::write(
            dir.path().join("1234/maps"),
            "7f00-7f10 r-xp 00000000 fd:01 42 /opt/drv/libcuda.so.1\n\
             7f10-7f20 r--p 00010000 fd:01 42 /opt/drv/libcuda.so.1\n\
             7f20-7f30 r-xp 00000000 fd:01 43 /usr/lib/libc.so.6\n\
             7f30-7f40 rw-p 00000000 00:00 0 \n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("99")).unwrap();
        std::fs::write(dir.path().join("99/maps"), "garbage without fields\n\n").unwrap();
        let procfs = ProcFs::new(dir.path());
        let found = mapped_libraries(&procfs, &HashSet::new());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, 1234);
        assert_eq!(found[0].1.display, "/opt/drv/libcuda.so.1");
        assert_eq!(found[0].1.path, lib_dir.join("libcuda.so.1"));
        assert!(mapped_libraries(&procfs, &HashSet::from([1234])).is_empty());
    }
}

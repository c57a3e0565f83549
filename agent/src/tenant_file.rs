//! Files other processes name, opened without trusting their names. The agent is root on a
//! shared node and a tenant controls its own file tree: a path read from `/proc/<pid>/maps`
//! resolved through `/proc/<pid>/root` by an ordinary `open` follows an absolute symlink out
//! to the host's tree, and a FIFO or device there would block or disturb the agent. So:
//!
//! - the path is resolved by `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` inside the
//!   process's root: `..` and absolute symlinks stay in it, `/proc/*/fd` links are refused;
//! - it is first opened `O_PATH` (no open side effects, never blocks), checked to be a regular
//!   file with the device and inode the maps line names, and only then reopened for reading,
//!   `O_NONBLOCK`, through `/proc/self/fd/N`;
//! - the caller reads and attaches through that descriptor (`/proc/self/fd/N`), so a path
//!   swapped after the check changes nothing.
//!
//! A mapping the path no longer reaches (a deleted file, a process that `chroot`ed after
//! mapping) is opened through `/proc/<pid>/map_files/<range>`, the kernel's own handle on the
//! mapped file, where the agent may (CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE).

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{
            ffi::OsStrExt,
            fs::{MetadataExt, OpenOptionsExt},
        },
    },
    path::{Path, PathBuf},
};

/// A file as the kernel identifies it; a uprobe on it covers every path that reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {path} inside {root}")]
    Open {
        root: PathBuf,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a regular file")]
    NotRegular { path: String },
    #[error(
        "{path} is not the mapped file (device and inode {found:?}, the mapping has {expected:?})"
    )]
    NotTheMappedFile {
        path: String,
        expected: FileId,
        found: FileId,
    },
}

impl OpenError {
    /// A short label value for `inferscope_dropped_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Open { .. } => "unreachable",
            Self::NotRegular { .. } => "not_regular",
            Self::NotTheMappedFile { .. } => "not_the_mapped_file",
        }
    }
}

/// A regular file opened for reading, with what identifies it.
#[derive(Debug)]
pub struct TenantFile {
    pub file: File,
    pub id: FileId,
    pub size: u64,
}

impl TenantFile {
    /// A path to this very file for APIs that take paths (uprobe attach): the kernel follows
    /// the descriptor, not a name.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// Opens `path` (absolute, as the process sees it) inside the directory `root` (for another
/// process, `/proc/<pid>/root`; `/` for the agent's own files). `expected` is the device and
/// inode the process's maps line names, when there is one.
pub fn open_in_root(
    root: &Path,
    path: &str,
    expected: Option<FileId>,
) -> Result<TenantFile, OpenError> {
    let err = |source| OpenError::Open {
        root: root.to_path_buf(),
        path: path.to_string(),
        source,
    };
    let root_fd = open_path(root, libc::O_DIRECTORY).map_err(err)?;
    let relative = path.trim_start_matches('/');
    let relative = if relative.is_empty() { "." } else { relative };
    let fd = openat2_in_root(&root_fd, relative).map_err(err)?;
    finish(fd, path, expected)
}

/// Opens the file mapped at `range` (`start-end` as in maps) through
/// `<proc_pid>/map_files/<range>`.
pub fn open_mapping(
    proc_pid: &Path,
    range: &str,
    expected: Option<FileId>,
) -> Result<TenantFile, OpenError> {
    let link = proc_pid.join("map_files").join(range);
    let fd = open_path(&link, 0).map_err(|source| OpenError::Open {
        root: proc_pid.to_path_buf(),
        path: format!("map_files/{range}"),
        source,
    })?;
    finish(fd, &link.display().to_string(), expected)
}

fn finish(fd: OwnedFd, path: &str, expected: Option<FileId>) -> Result<TenantFile, OpenError> {
    let err = |source| OpenError::Open {
        root: PathBuf::from("/"),
        path: path.to_string(),
        source,
    };
    let meta = File::from(fd.try_clone().map_err(err)?)
        .metadata()
        .map_err(err)?;
    if !meta.file_type().is_file() {
        return Err(OpenError::NotRegular {
            path: path.to_string(),
        });
    }
    let found = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if let Some(expected) = expected {
        if !same_file(expected, found, &fd) {
            return Err(OpenError::NotTheMappedFile {
                path: path.to_string(),
                expected,
                found,
            });
        }
    }
    // Reopen the checked file itself for reading; O_NONBLOCK all the same, in case.
    let reopen = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&reopen)
        .map_err(err)?;
    Ok(TenantFile {
        file,
        id: found,
        size: meta.size(),
    })
}

/// Device and inode as the maps line has them. Before Linux 6.8 a file mapped through
/// overlayfs shows the underlying file's device there while `fstat` of the overlay path gives
/// the overlay's (the inode number is the same on a single-filesystem overlay): that pair is
/// accepted when the opened file is on overlayfs.
fn same_file(expected: FileId, found: FileId, fd: &OwnedFd) -> bool {
    if expected == found {
        return true;
    }
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    if expected.ino != found.ino {
        return false;
    }
    // SAFETY: fstatfs writes the struct it is given; the descriptor is open.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type as i64 == OVERLAYFS_SUPER_MAGIC
}

fn open_path(path: &Path, extra: i32) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated path; O_PATH opens have no side effects and do not block.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | extra) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat2_in_root(root: &OwnedFd, relative: &str) -> std::io::Result<OwnedFd> {
    let c = CString::new(relative).map_err(std::io::Error::other)?;
    // `struct open_how` of linux/openat2.h (libc's is non-exhaustive, so not constructible).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: the struct and path outlive the call; the size is the struct's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn id_of(path: &Path) -> FileId {
        let m = std::fs::metadata(path).unwrap();
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }

    #[test]
    fn absolute_symlinks_and_dotdot_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host-secret");
        std::fs::write(&host, b"host").unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("lib")).unwrap();
        std::fs::write(root.join("lib/real.so"), b"tenant").unwrap();
        // An absolute link to the host file: inside the root it names root/<host path>.
        symlink(&host, root.join("lib/abs.so")).unwrap();
        symlink("../../../../../../host-secret", root.join("lib/dotdot.so")).unwrap();
        symlink("/lib/real.so", root.join("lib/inside.so")).unwrap();
        symlink("/proc/self/root/etc/hostname", root.join("lib/magic.so")).unwrap();
        for name in ["abs.so", "dotdot.so", "magic.so"] {
            let e = open_in_root(&root, &format!("/lib/{name}"), None).unwrap_err();
            assert_eq!(e.reason(), "unreachable", "{name}: {e}");
        }
        let f = open_in_root(&root, "/lib/inside.so", None).unwrap();
        assert_eq!(f.id, id_of(&root.join("lib/real.so")));
        assert_eq!(f.size, 6);
        assert_eq!(
            std::fs::read(f.fd_path()).unwrap(),
            b"tenant",
            "the descriptor path reaches the checked file"
        );
    }

    #[test]
    fn fifos_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("libcuda.so.1");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_in_root(dir.path(), "/libcuda.so.1", None).unwrap_err();
        assert_eq!(e.reason(), "not_regular");
        let e = open_in_root(dir.path(), "/", None).unwrap_err();
        assert_eq!(e.reason(), "not_regular");
    }

    #[test]
    fn a_file_that_is_not_the_mapped_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"a").unwrap();
        std::fs::write(dir.path().join("b"), b"b").unwrap();
        let b = id_of(&dir.path().join("b"));
        let e = open_in_root(dir.path(), "/a", Some(b)).unwrap_err();
        assert_eq!(e.reason(), "not_the_mapped_file", "{e}");
        assert!(open_in_root(dir.path(), "/b", Some(b)).is_ok());
    }

    #[test]
    fn a_mapping_of_this_process_opens_through_map_files() {
        // This test binary is mapped executable; its first maps line names it.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let line = maps
            .lines()
            .find(|l| l.ends_with(&*exe.to_string_lossy()))
            .unwrap();
        let range = line.split_whitespace().next().unwrap();
        match open_mapping(Path::new("/proc/self"), range, Some(id_of(&exe))) {
            Ok(f) => assert_eq!(f.id, id_of(&exe)),
            // Not root (no CAP_SYS_ADMIN/CAP_CHECKPOINT_RESTORE): map_files is closed.
            Err(e) => assert_eq!(e.reason(), "unreachable", "{e}"),
        }
    }
}

//! Small readers of `/proc` (rooted at a configurable path so tests can use captured trees).

use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::new("/proc")
    }
}

/// The most of a maps text read: a process with more mappings than this names its libraries
/// in the first ones, and the rest cannot make the agent allocate.
const MAPS_MAX: u64 = 16 << 20;

impl ProcFs {
    /// `/proc/<pid>/maps`, at most [`MAPS_MAX`] bytes of it; `None` when it cannot be read.
    pub fn maps(&self, pid: u32) -> Option<Vec<u8>> {
        read_maps(&self.root.join(pid.to_string()))
    }

    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The process's `comm`, or `None` when it is gone.
    pub fn comm(&self, pid: u32) -> Option<String> {
        let raw = std::fs::read_to_string(self.root.join(pid.to_string()).join("comm")).ok()?;
        Some(raw.trim_end_matches('\n').to_string())
    }

    pub fn alive(&self, pid: u32) -> bool {
        self.root.join(pid.to_string()).exists()
    }

    /// The parent's pid, from `/proc/<pid>/stat` (after the `comm` in parentheses, which may
    /// hold spaces and parentheses itself).
    pub fn ppid(&self, pid: u32) -> Option<u32> {
        self.stat_field(pid, 4)
    }

    /// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`, from the 3rd on: those after
    /// the `comm` in parentheses, which may hold spaces and parentheses itself.
    fn stat_field<T: std::str::FromStr>(&self, pid: u32, n: usize) -> Option<T> {
        let stat = std::fs::read_to_string(self.root.join(pid.to_string()).join("stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
    }

    /// The cgroup the process's memory is accounted to ([`memory_cgroup`]), empty when the
    /// process is gone or cannot be told. On a v1 hierarchy the kernel shows an exiting
    /// process (an OOM victim being killed, say) in the root cgroup, `/`: that answer is
    /// believed only of a process that is not exiting.
    pub fn memory_cgroup(&self, pid: u32) -> String {
        let Ok(text) = std::fs::read_to_string(self.root.join(pid.to_string()).join("cgroup"))
        else {
            return String::new();
        };
        let (path, v1) = memory_path(&text);
        if path == "/" && v1 && self.exiting(pid) != Some(false) {
            return String::new();
        }
        path
    }

    /// Whether the process is exiting (`PF_EXITING` in the flags of `/proc/<pid>/stat`).
    pub fn exiting(&self, pid: u32) -> Option<bool> {
        const PF_EXITING: u64 = 0x4;
        let flags: u64 = self.stat_field(pid, 9)?;
        Some(flags & PF_EXITING != 0)
    }

    /// Numeric entries of the proc root.
    pub fn pids(&self) -> impl Iterator<Item = u32> {
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
    }
}

/// The cgroup a process's memory is accounted to, from `/proc/<pid>/cgroup`: the v1 memory
/// controller's path if there is one, else the v2 path.
pub fn memory_cgroup(text: &str) -> String {
    memory_path(text).0
}

/// [`memory_cgroup`], and whether it is the v1 memory controller's.
fn memory_path(text: &str) -> (String, bool) {
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            return (path.to_string(), true);
        }
        if controllers.is_empty() {
            v2 = Some(path.to_string());
        }
    }
    (v2.unwrap_or_default(), false)
}

/// The container id in a cgroup path (Docker, containerd, CRI-O; systemd and cgroupfs
/// drivers): the last 64-hex-digit run in the path.
pub fn container_id(path: &str) -> Option<String> {
    path.split(['/', '-', '.', ':'])
        .rev()
        .find(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
}

/// `<proc_pid>/maps` (`proc_pid` being `/proc/<pid>` or a captured tree's), bounded.
pub fn read_maps(proc_pid: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(proc_pid.join("maps"))
        .ok()?
        .take(MAPS_MAX)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exiting_process_in_the_v1_root_has_no_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let procfs = ProcFs::new(dir.path());
        let v1_root = "12:memory:/\n0::/user.slice\n";
        for (pid, cgroup, flags, want) in [
            // Killed by the OOM killer: exiting, shown in the v1 root.
            (1, v1_root, "4194564", ""),
            // Really in the root cgroup, alive.
            (2, v1_root, "4194560", "/"),
            (3, "12:memory:/job\n", "4194564", "/job"),
            // v2 keeps the real path of an exiting process.
            (4, "0::/\n", "4194564", "/"),
        ] {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("cgroup"), cgroup).unwrap();
            std::fs::write(
                p.join("stat"),
                format!("{pid} (py (x)) R 1 {pid} {pid} 0 -1 {flags} 0 0"),
            )
            .unwrap();
            assert_eq!(procfs.memory_cgroup(pid), want, "pid {pid}");
        }
        assert_eq!(procfs.memory_cgroup(99), "", "gone");
        std::fs::remove_file(dir.path().join("1/stat")).unwrap();
        assert_eq!(procfs.memory_cgroup(1), "", "cannot be told");
    }

    #[test]
    fn finds_the_memory_cgroup_and_container() {
        let v1 = "12:memory:/kubepods/burstable/pod1/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n3:cpu:/x\n0::/\n";
        assert!(memory_cgroup(v1).starts_with("/kubepods/burstable/pod1/"));
        let v2 = "0::/kubepods.slice/kubepods-pod2.slice/cri-containerd-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.scope\n";
        let path = memory_cgroup(v2);
        assert_eq!(container_id(&path).unwrap(), "a".repeat(64));
        assert_eq!(container_id("/user.slice"), None);
        assert_eq!(memory_cgroup("garbage"), "");
    }
}

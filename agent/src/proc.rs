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

impl ProcFs {
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
        let stat = std::fs::read_to_string(self.root.join(pid.to_string()).join("stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        rest.split_whitespace().nth(1)?.parse().ok()
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
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            return path.to_string();
        }
        if controllers.is_empty() {
            v2 = Some(path.to_string());
        }
    }
    v2.unwrap_or_default()
}

/// The container id in a cgroup path (Docker, containerd, CRI-O; systemd and cgroupfs
/// drivers): the last 64-hex-digit run in the path.
pub fn container_id(path: &str) -> Option<String> {
    path.split(['/', '-', '.', ':'])
        .rev()
        .find(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

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

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

    /// Numeric entries of the proc root.
    pub fn pids(&self) -> impl Iterator<Item = u32> {
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
    }
}

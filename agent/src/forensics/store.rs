//! Reports on disk: one JSON file per report under the forensics directory, written
//! atomically (temporary file, fsync, rename), kept within a count and a byte budget (oldest
//! go first). A directory that cannot be written keeps reports in memory (bounded) and says so;
//! unreadable files are skipped with a warning, never fatal.

use std::{
    collections::VecDeque,
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use super::report::{Report, SCHEMA_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write report {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read report {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("report {path} is not a valid report")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("report {path} has schema version {found}, this agent reads {SCHEMA_VERSION}")]
    Schema { path: PathBuf, found: u32 },
    #[error("no report with id {0}")]
    NotFound(String),
}

/// Reports kept in memory when the directory cannot be written.
const IN_MEMORY: usize = 16;

pub struct Store {
    dir: PathBuf,
    max_reports: usize,
    max_bytes: u64,
    memory: VecDeque<Report>,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>, max_reports: usize, max_bytes: u64) -> Self {
        Self {
            dir: dir.into(),
            max_reports,
            max_bytes,
            memory: VecDeque::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a report; on failure keeps it in memory and returns the error.
    pub fn save(&mut self, report: &Report) -> Result<PathBuf, StoreError> {
        match self.write(report) {
            Ok(path) => {
                self.enforce_retention();
                Ok(path)
            }
            Err(e) => {
                if self.memory.len() == IN_MEMORY {
                    self.memory.pop_front();
                }
                self.memory.push_back(report.clone());
                Err(e)
            }
        }
    }

    fn write(&self, report: &Report) -> Result<PathBuf, StoreError> {
        let path = self.dir.join(format!("{}.json", report.id));
        let err = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = self.dir.join(format!(".{}.json.tmp", report.id));
        let body = serde_json::to_vec_pretty(report).map_err(|e| err(std::io::Error::other(e)))?;
        let mut f = fs::File::create(&tmp).map_err(err)?;
        f.write_all(&body).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, &path).map_err(err)?;
        // The rename is durable once the directory is.
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(path)
    }

    /// Report files, oldest first (ids start with the time), with their sizes.
    fn files(&self) -> Vec<(PathBuf, u64)> {
        let mut out: Vec<(PathBuf, u64)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.ends_with(".json") && !name.starts_with('.')
            })
            .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
            .collect();
        out.sort();
        out
    }

    fn enforce_retention(&self) {
        let mut files = self.files();
        let mut total: u64 = files.iter().map(|(_, n)| n).sum();
        while !files.is_empty() && (files.len() > self.max_reports || total > self.max_bytes) {
            let (path, n) = files.remove(0);
            match fs::remove_file(&path) {
                Ok(()) => total -= n,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove old report");
                    break;
                }
            }
        }
    }

    /// Every readable report, newest first; unreadable files are returned as errors beside.
    pub fn list(&self) -> (Vec<Report>, Vec<StoreError>) {
        let mut reports = Vec::new();
        let mut errors = Vec::new();
        for (path, _) in self.files() {
            match read(&path) {
                Ok(r) => reports.push(r),
                Err(e) => errors.push(e),
            }
        }
        for r in &self.memory {
            if !reports.iter().any(|x| x.id == r.id) {
                reports.push(r.clone());
            }
        }
        reports.sort_by(|a, b| b.time_unix_ms.cmp(&a.time_unix_ms).then(b.id.cmp(&a.id)));
        (reports, errors)
    }

    pub fn get(&self, id: &str) -> Result<Report, StoreError> {
        if let Some(r) = self.memory.iter().find(|r| r.id == id) {
            return Ok(r.clone());
        }
        // Ids are generated by the agent; refuse anything that could leave the directory.
        if id.is_empty() || id.contains(['/', '\\']) || id.starts_with('.') {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let path = self.dir.join(format!("{id}.json"));
        if !path.exists() {
            return Err(StoreError::NotFound(id.to_string()));
        }
        read(&path)
    }
}

/// A report file; secrets masked as it is read, so reports written before the agent masked
/// them show none either.
pub fn read(path: &Path) -> Result<Report, StoreError> {
    let bytes = fs::read(path).map_err(|source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    let found = value
        .get("schema_version")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0) as u32;
    if found != SCHEMA_VERSION {
        return Err(StoreError::Schema {
            path: path.to_path_buf(),
            found,
        });
    }
    let mut report: Report = serde_json::from_value(value).map_err(|source| StoreError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    report.redact();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forensics::report::{Kind, ProcessInfo, Timeline};

    pub(crate) fn report(id: &str, t: u64) -> Report {
        Report {
            schema_version: SCHEMA_VERSION,
            id: id.into(),
            kind: Kind::Cuda,
            time: "2026-01-01T00:00:00Z".into(),
            time_unix_ms: t,
            summary: format!("report {id}"),
            process: ProcessInfo {
                pid: 1,
                comm: "x".into(),
                ..Default::default()
            },
            gpu: None,
            cuda: None,
            exit: None,
            host_oom: None,
            xid: None,
            allocations: None,
            gpu_processes: Vec::new(),
            timeline: Timeline::default(),
            suppressed_before: 0,
        }
    }

    #[test]
    fn saves_lists_newest_first_and_keeps_within_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::new(dir.path(), 3, u64::MAX);
        for i in 0..5 {
            s.save(&report(&format!("2026010{i}-cuda-1"), i)).unwrap();
        }
        let (reports, errors) = s.list();
        assert!(errors.is_empty());
        let ids: Vec<&str> = reports.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["20260104-cuda-1", "20260103-cuda-1", "20260102-cuda-1"]
        );
        assert_eq!(s.get("20260103-cuda-1").unwrap().time_unix_ms, 3);
        assert!(matches!(
            s.get("20260100-cuda-1"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.get("../etc/passwd"),
            Err(StoreError::NotFound(_))
        ));
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn keeps_within_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec_pretty(&report("a", 0)).unwrap().len() as u64;
        let mut s = Store::new(dir.path(), 100, one * 2 + one / 2);
        for i in 0..4 {
            s.save(&report(&format!("r{i}"), i)).unwrap();
        }
        assert_eq!(s.list().0.len(), 2);
    }

    #[test]
    fn corrupt_partial_and_foreign_files_are_skipped_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::new(dir.path(), 100, u64::MAX);
        s.save(&report("good", 1)).unwrap();
        std::fs::write(
            dir.path().join("partial.json"),
            b"{\"schema_version\": 1, \"id\": ",
        )
        .unwrap();
        std::fs::write(dir.path().join("garbage.json"), [0xff, 0x00, 0x13]).unwrap();
        std::fs::write(dir.path().join("future.json"), b"{\"schema_version\": 99}").unwrap();
        std::fs::write(dir.path().join(".tmp.json.tmp"), b"half").unwrap();
        let (reports, errors) = s.list();
        assert_eq!(reports.len(), 1);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors
            .iter()
            .any(|e| matches!(e, StoreError::Schema { found: 99, .. })));
    }

    #[test]
    fn secrets_in_a_report_on_disk_are_masked_as_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = report("old", 1);
        r.process.cmdline = "server --api-key sk-live-1".into();
        std::fs::write(dir.path().join("old.json"), serde_json::to_vec(&r).unwrap()).unwrap();
        let s = Store::new(dir.path(), 10, u64::MAX);
        assert_eq!(
            s.get("old").unwrap().process.cmdline,
            "server --api-key ***"
        );
        assert_eq!(s.list().0[0].process.cmdline, "server --api-key ***");
    }

    #[test]
    fn an_unwritable_directory_keeps_reports_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let mut s = Store::new(&file, 100, u64::MAX);
        assert!(s.save(&report("kept", 1)).is_err());
        assert_eq!(s.get("kept").unwrap().summary, "report kept");
        assert_eq!(s.list().0.len(), 1);
    }
}

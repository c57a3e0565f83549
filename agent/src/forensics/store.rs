//! Reports on disk: one JSON file per report under the forensics directory, written
//! atomically (temporary file, fsync, rename), kept within a count and a byte budget (oldest
//! go first, before the new one is written). Reports hold command lines and stacks: the
//! directory is 0700 and each file 0600 from its creation, and a write that fails (disk full)
//! leaves no temporary file. A directory that cannot be written keeps reports in memory
//! (bounded) and says so; unreadable files are skipped with a warning, never fatal.

use std::{
    collections::VecDeque,
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
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

/// The directory's mode, and each report's: the agent's alone.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// `.<id>.json.tmp`: a report being written.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".json.tmp")
}

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

    /// Readies the directory as the writer starts: creates it 0700, or tightens one the
    /// agent owns to 0700 and its reports to 0600; removes the temporary files of writes that
    /// a crash interrupted. A directory another user owns is left as it is, with a warning:
    /// that user can list and remove the reports (not read them, they are 0600).
    pub fn prepare(&self) {
        let dir = self.dir.display().to_string();
        if let Err(e) = self.create_dir() {
            tracing::warn!(dir, error = %e, "cannot create the forensics directory; reports are kept in memory until it can be written");
            return;
        }
        let meta = match fs::metadata(&self.dir) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(dir, error = %e, "cannot read the forensics directory's mode");
                return;
            }
        };
        // SAFETY: no preconditions.
        let euid = unsafe { libc::geteuid() };
        let ours = meta.uid() == euid;
        let mode = meta.permissions().mode() & 0o777;
        if !ours {
            tracing::warn!(dir, owner = meta.uid(), mode = format!("{mode:o}"), "the forensics directory belongs to another user, who can list and remove the reports");
        } else if mode != DIR_MODE {
            match fs::set_permissions(&self.dir, fs::Permissions::from_mode(DIR_MODE)) {
                Ok(()) => {
                    tracing::info!(
                        dir,
                        was = format!("{mode:o}"),
                        "forensics directory set to 0700"
                    )
                }
                Err(e) => {
                    tracing::warn!(dir, error = %e, "cannot set the forensics directory to 0700")
                }
            }
        }
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            if is_temporary(&name) {
                match fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(path = %entry.path().display(), "removed the temporary file of an interrupted write")
                    }
                    Err(e) => {
                        tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a temporary file")
                    }
                }
            } else if ours
                && name.ends_with(".json")
                && meta.uid() == euid
                && meta.permissions().mode() & 0o077 != 0
            {
                // Written by an agent before reports were private.
                let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(FILE_MODE));
            }
        }
    }

    /// The directory, 0700 where it is created (its missing parents too). The umask can only
    /// take bits away.
    fn create_dir(&self) -> std::io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&self.dir)
    }

    /// Writes a report; on failure keeps it in memory and returns the error.
    pub fn save(&mut self, report: &Report) -> Result<PathBuf, StoreError> {
        match self.write(report) {
            Ok(path) => {
                // Only a report larger than the whole budget is over it here.
                self.enforce_retention(0);
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
        let body = serde_json::to_vec_pretty(report).map_err(|e| err(std::io::Error::other(e)))?;
        self.create_dir().map_err(err)?;
        // Room first: a directory at its budget makes room before the new report is written.
        self.enforce_retention(body.len() as u64);
        let tmp = self.dir.join(format!(".{}.json.tmp", report.id));
        let written = write_new(&tmp, &body).and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            // A disk that filled up mid-write leaves nothing half-written behind.
            let _ = fs::remove_file(&tmp);
            return Err(err(e));
        }
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
            .filter_map(|e| Some((e.path(), e.metadata().ok().filter(|m| m.is_file())?.len())))
            .collect();
        out.sort();
        out
    }

    /// Removes the oldest reports until the directory, with `incoming` bytes more (one more
    /// report when not 0), is within the count and the byte budget.
    fn enforce_retention(&self, incoming: u64) {
        let mut files = self.files();
        let mut total: u64 = files.iter().map(|(_, n)| n).sum();
        let one_more = usize::from(incoming > 0);
        while !files.is_empty()
            && (files.len() + one_more > self.max_reports
                || total.saturating_add(incoming) > self.max_bytes)
        {
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

/// A new file, 0600 from its creation, written and synced.
fn write_new(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.write_all(body)?;
    f.sync_all()
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
            requests: None,
            python: None,
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

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_directory_is_0700_and_reports_0600_from_creation() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/forensics");
        let mut s = Store::new(&dir, 10, u64::MAX);
        let path = s.save(&report("r1", 1)).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&path), 0o600);
        let s = Store::new(root.path().join("b"), 10, u64::MAX);
        s.prepare();
        assert_eq!(mode(&root.path().join("b")), 0o700);
    }

    #[test]
    fn prepare_tightens_the_directory_and_removes_interrupted_writes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(d.join(".20260101-cuda-1-1.json.tmp"), b"{\"half").unwrap();
        std::fs::write(d.join("old.json"), b"{}").unwrap();
        std::fs::set_permissions(d.join("old.json"), fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(d.join("notes.tmp"), b"not ours").unwrap();
        std::fs::create_dir(d.join(".x.json.tmp")).unwrap();
        Store::new(d, 10, u64::MAX).prepare();
        assert_eq!(mode(d), 0o700);
        assert_eq!(mode(&d.join("old.json")), 0o600);
        assert_eq!(names(d), [".x.json.tmp", "notes.tmp", "old.json"]);
    }

    #[test]
    fn a_directory_of_another_user_is_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        // Only root can give a directory away; elsewhere there is nothing to check.
        if std::os::unix::fs::chown(d, Some(65534), None).is_err() {
            return;
        }
        Store::new(d, 10, u64::MAX).prepare();
        assert_eq!(mode(d), 0o755);
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::new(dir.path(), 10, u64::MAX);
        s.save(&report("r1", 1)).unwrap();
        // The report's name is taken by a directory that is not empty: the rename fails
        // after the temporary file was written and synced.
        std::fs::create_dir_all(dir.path().join("r2.json/x")).unwrap();
        let e = s.save(&report("r2", 2)).unwrap_err();
        assert!(matches!(e, StoreError::Write { .. }), "{e:?}");
        assert_eq!(names(dir.path()), ["r1.json", "r2.json"]);
        assert_eq!(s.get("r2").unwrap().summary, "report r2", "kept in memory");
    }

    #[test]
    fn retention_makes_room_before_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::new(dir.path(), 2, u64::MAX);
        s.save(&report("r1", 1)).unwrap();
        s.save(&report("r2", 2)).unwrap();
        // The write of r3 fails at its rename: the oldest report has already made room.
        std::fs::create_dir_all(dir.path().join("r3.json/x")).unwrap();
        assert!(s.save(&report("r3", 3)).is_err());
        assert_eq!(names(dir.path()), ["r2.json", "r3.json"]);
        // Within bytes alike: room for the incoming report's size.
        let dir = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec_pretty(&report("a", 0)).unwrap().len() as u64;
        let mut s = Store::new(dir.path(), 100, one * 2);
        s.save(&report("a", 1)).unwrap();
        s.save(&report("b", 2)).unwrap();
        std::fs::create_dir_all(dir.path().join("c.json/x")).unwrap();
        assert!(s.save(&report("c", 3)).is_err());
        assert_eq!(names(dir.path()), ["b.json", "c.json"]);
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

//! The NVML double (`tests/nvml-double/libnvml.c`): where it is built and a helper to
//! write its control file.  See the crate README for the keys and their defaults.

use std::fmt::Display;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Path of the control file the NVML double reads (`key=value` lines).
pub const ENV_NVML_CONTROL: &str = "FAKEGPU_NVML_CONTROL";
/// `1` makes `nvmlInit*` fail with `NVML_ERROR_DRIVER_NOT_LOADED` (9).
pub const ENV_NVML_FAIL_INIT: &str = "FAKEGPU_NVML_FAIL_INIT";
/// Bytes added per process and device to `usedGpuMemory` (and to memory used),
/// like a real CUDA context plus workspaces.  Default [`DEFAULT_NVML_CTX_OVERHEAD`].
pub const ENV_NVML_CTX_OVERHEAD: &str = "FAKEGPU_NVML_CTX_OVERHEAD";
/// Default of [`ENV_NVML_CTX_OVERHEAD`]: 512 MiB.
pub const DEFAULT_NVML_CTX_OVERHEAD: u64 = 512 << 20;

/// Groups of calls that `gpu.<d>.unsupported` can turn into `NVML_ERROR_NOT_SUPPORTED`.
pub const NVML_UNSUPPORTED_GROUPS: &[&str] = &[
    "utilization",
    "memory",
    "power",
    "power_limit",
    "energy",
    "temperature",
    "clocks",
    "clocks_event_reasons",
    "throttle",
    "pcie",
    "ecc",
    "mig",
    "processes",
    "process_utilization",
    "events",
    "brand",
    "pci",
];

/// Directory holding the NVML double `libnvidia-ml.so.1` (+ `libnvidia-ml.so`).
pub fn nvml_double_dir() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("nvml")
}

/// Path of the NVML double (`.../nvml/libnvidia-ml.so.1`), for
/// `Nvml::builder().lib_path(..)`.
pub fn nvml_double_path() -> PathBuf {
    nvml_double_dir().join("libnvidia-ml.so.1")
}

/// Directory of the "old driver" NVML double (built with `-DOLD_DRIVER`).
pub fn nvml_old_double_dir() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("nvml-old")
}

/// Path of the "old driver" NVML double: lacks `nvmlDeviceGetTotalEnergyConsumption`,
/// `nvmlDeviceGetProcessUtilization` and the `nvmlDevice{Get,GetSupported}Clocks
/// {Throttle,Event}Reasons` symbols.
pub fn nvml_old_double_path() -> PathBuf {
    nvml_old_double_dir().join("libnvidia-ml.so.1")
}

/// Serialises read-modify-write cycles of control files within this process.
static WRITE_LOCK: Mutex<()> = Mutex::new(());

/// Writer of the NVML double's control file.  Every change rewrites the whole file
/// atomically (temp file + rename), keeping the other lines, so the double never
/// reads a half-written file and always notices the change (new inode).
#[derive(Debug, Clone)]
pub struct NvmlControl {
    path: PathBuf,
}

impl NvmlControl {
    /// A control file at `path` (created by the first change; a missing file means
    /// all defaults).
    pub fn new(path: impl Into<PathBuf>) -> NvmlControl {
        NvmlControl { path: path.into() }
    }

    /// The file's path (the value for [`ENV_NVML_CONTROL`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets `key=value`, replacing an existing line for `key`.
    pub fn set(&self, key: &str, value: impl Display) -> io::Result<()> {
        let value = value.to_string();
        check(key, &value)?;
        self.update(|lines| {
            upsert(lines, key, &value);
            Ok(())
        })
    }

    /// Sets every `key=value` of `pairs` in one write: the double sees all or none of them.
    pub fn set_many(&self, pairs: &[(String, String)]) -> io::Result<()> {
        for (key, value) in pairs {
            check(key, value)?;
        }
        self.update(|lines| {
            for (key, value) in pairs {
                upsert(lines, key, value);
            }
            Ok(())
        })
    }

    /// Sets `gpu.<dev>.<key>=value`.
    pub fn set_gpu(&self, dev: u32, key: &str, value: impl Display) -> io::Result<()> {
        self.set(&format!("gpu.{dev}.{key}"), value)
    }

    /// Removes the line for `key` (the double falls back to the default).
    pub fn remove(&self, key: &str) -> io::Result<()> {
        self.update(|lines| {
            lines.retain(|l| key_of(l) != Some(key));
            Ok(())
        })
    }

    /// Value of `key`, if set.
    pub fn get(&self, key: &str) -> io::Result<Option<String>> {
        Ok(self
            .read_lines()?
            .iter()
            .find(|l| key_of(l) == Some(key))
            .and_then(|l| l.split_once('=').map(|(_, v)| v.trim().to_string())))
    }

    /// Injects an XID critical error on device `dev`: appends `xid.<seq>=<dev>:<code>`
    /// with `seq` one more than the highest present, and returns `seq`.
    pub fn inject_xid(&self, dev: u32, code: u64) -> io::Result<u64> {
        let mut seq = 0;
        self.update(|lines| {
            seq = lines
                .iter()
                .filter_map(|l| key_of(l)?.strip_prefix("xid.")?.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
                + 1;
            lines.push(format!("xid.{seq}={dev}:{code}"));
            Ok(())
        })?;
        Ok(seq)
    }

    fn read_lines(&self) -> io::Result<Vec<String>> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => Ok(s.lines().map(str::to_string).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Vec<String>) -> io::Result<()>) -> io::Result<()> {
        let _guard = WRITE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut lines = self.read_lines()?;
        f(&mut lines)?;
        let name = self
            .path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
            .to_string_lossy()
            .into_owned();
        let tmp = self
            .path
            .with_file_name(format!(".{name}.tmp.{}", std::process::id()));
        {
            let mut file = std::fs::File::create(&tmp)?;
            for l in &lines {
                writeln!(file, "{l}")?;
            }
            file.flush()?;
        }
        std::fs::rename(&tmp, &self.path)
    }
}

fn check(key: &str, value: &str) -> io::Result<()> {
    let bad = key.is_empty()
        || key.contains(['=', '\n', '\r', '#'])
        || key.trim() != key
        || value.contains(['\n', '\r']);
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad control entry {key:?}={value:?}"),
        ));
    }
    Ok(())
}

fn key_of(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.starts_with('#') {
        return None;
    }
    t.split_once('=').map(|(k, _)| k.trim())
}

fn upsert(lines: &mut Vec<String>, key: &str, value: &str) {
    let entry = format!("{key}={value}");
    match lines.iter_mut().find(|l| key_of(l) == Some(key)) {
        Some(l) => *l = entry,
        None => lines.push(entry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_keeps_other_lines_and_injects_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control");
        std::fs::write(&path, "# comment\ngpu.0.temperature=40\n").unwrap();
        let c = NvmlControl::new(&path);
        c.set_gpu(0, "power_mw", 123).unwrap();
        c.set_gpu(0, "temperature", 50).unwrap();
        assert_eq!(c.inject_xid(1, 79).unwrap(), 1);
        assert_eq!(c.inject_xid(0, 48).unwrap(), 2);
        c.remove("gpu.0.power_mw").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# comment\ngpu.0.temperature=50\nxid.1=1:79\nxid.2=0:48\n"
        );
        assert_eq!(c.get("gpu.0.temperature").unwrap().as_deref(), Some("50"));
        assert_eq!(c.get("gpu.0.power_mw").unwrap(), None);
        assert!(c.set("bad\nkey", 1).is_err());
        assert!(c.set("k", "a\nb").is_err());
        assert!(nvml_double_path().exists());
        assert!(nvml_old_double_path().exists());
    }
}

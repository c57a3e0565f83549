//! The `[forensics]` section: how many reports are kept and how often one is written.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ForensicsConfig {
    /// Reports kept in `forensics_dir`; the oldest go first.
    pub max_reports: usize,
    /// Bytes the reports may take in `forensics_dir`.
    pub max_bytes: u64,
    /// One report per process and kind per window, in seconds; further events are counted.
    pub window_secs: u64,
    /// How far back a report's timeline reaches, in seconds.
    pub timeline_secs: u64,
    /// A request that arrived, or got its first token, this many ms before a CUDA failure in
    /// its server is marked as a likely trigger.
    pub trigger_window_ms: u64,
    /// For this many seconds after a CUDA failure in an inference server, its requests that
    /// end in a server error, a reset or a timeout are added to the report (rewritten then).
    pub after_failure_secs: u64,
    /// Read the Python stacks of a Python process whose CUDA call failed (py-spy, through
    /// SYS_PTRACE; the process is paused for the few ms the copy takes).
    pub python_stacks: bool,
    /// Stop a Python process with a CUDA ledger at its next out-of-memory failure, as the
    /// call returns, until its Python stacks are read (a few ms): the stacks are where the
    /// call failed, before an exception unwinds them. Needs `python_stacks` and CAP_KILL.
    pub python_freeze: bool,
    /// Least time between two such stops of one process, in seconds.
    pub python_freeze_every_secs: u64,
}

impl Default for ForensicsConfig {
    fn default() -> Self {
        Self {
            max_reports: 200,
            max_bytes: 64 * 1024 * 1024,
            window_secs: 60,
            timeline_secs: 300,
            trigger_window_ms: 2000,
            after_failure_secs: 30,
            python_stacks: true,
            python_freeze: true,
            python_freeze_every_secs: 60,
        }
    }
}

impl ForensicsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.python_freeze && self.python_freeze_every_secs == 0 {
            // A process failing in a loop would be stopped at every failure.
            return Err("forensics.python_freeze_every_secs must be at least 1".into());
        }
        Ok(())
    }
}

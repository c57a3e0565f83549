//! OOM forensics: a report for every CUDA out-of-memory, host OOM kill, crash of a process
//! holding GPU memory, and XID error. The tracker notices the trigger and takes a snapshot
//! of what only it knows (the ledger, rates, failures, the process's executable mappings) as
//! a [`Draft`](crate::track::draft::Draft), defined with its vocabulary in
//! [`crate::track::draft`]: this layer sits above the tracker and consumes it. A writer
//! thread turns it into a [`report::Report`] (`assemble`: GPU timeline from the NVML ring,
//! call stacks symbolized with blazesym, cgroup and node memory) and stores it (`store`).
//! `render` prints it.

pub mod assemble;
mod config;
pub mod metrics;
pub mod python;
pub mod render;
pub mod report;
pub mod requests;
pub mod store;
pub mod symbolize;

pub use config::ForensicsConfig;

/// Forensics knobs (config section `[forensics]`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_reports: usize,
    pub max_bytes: u64,
    /// One report per (process, kind) per window; more events are counted.
    pub window_secs: u64,
    pub timeline_secs: u64,
}

//! inferscope: a node agent that watches GPU inference servers from outside.
//!
//! Data flows one way: [`probe`] (load and attach eBPF programs, discover CUDA libraries)
//! → [`ingest`] (ring buffer → typed events) → [`track`] (per-process allocation ledger)
//! → [`export`] (Prometheus `/metrics`); [`attrib`] names the pod and container of a process.
//! [`scrape`] reads the inference servers' own `/metrics` for the same exposition. [`agent`]
//! wires the stages and owns shutdown.

pub mod agent;
pub mod attrib;
pub mod caps;
pub mod clock;
pub mod config;
pub mod cuda_error;
pub mod deadline;
pub mod env;
pub mod events;
pub mod export;
pub mod forensics;
pub mod gpu;
pub mod health;
pub mod held;
pub mod http;
pub mod ingest;
pub mod labels;
pub mod metrics;
pub mod probe;
pub mod proc;
pub mod queue;
pub mod redact;
pub mod scrape;
pub mod seccomp;
pub mod servers;
pub mod tenant_file;
pub mod tls;
pub mod track;
pub mod wake;

/// An error with its causes, `a: b: c` (what a log line or a test should show of it).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

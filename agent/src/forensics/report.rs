//! The forensic report: one JSON document per event, schema versioned. Everything an
//! operator needs to answer "why did it run out of memory" without the process.

use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u32 = 1;

// The tracker's words for what it saw at the trigger, serialized in the report as they are.
pub use crate::track::draft::{GpuProcessRow, Kind, ProcessInfo};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub id: String,
    pub kind: Kind,
    /// Wall-clock time of the event, RFC 3339.
    pub time: String,
    /// Milliseconds since the Unix epoch (for sorting and charts).
    pub time_unix_ms: u64,
    pub summary: String,
    pub process: ProcessInfo,
    pub gpu: Option<GpuInfo>,
    pub cuda: Option<CudaFailure>,
    pub exit: Option<ExitInfo>,
    pub host_oom: Option<HostOom>,
    pub xid: Option<u64>,
    /// The process's live GPU allocations at the instant.
    pub allocations: Option<Allocations>,
    /// Every process on the same GPU.
    pub gpu_processes: Vec<GpuProcessRow>,
    pub timeline: Timeline,
    /// Reports of the same kind and process suppressed in the window before this one.
    pub suppressed_before: u64,
    /// A CUDA failure in an inference server: the requests it had in flight, the likely
    /// trigger, and those that failed after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Requests>,
    /// A CUDA failure in a Python process: its Python stacks (beside `cuda.stack`, the
    /// failing call's native one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonStacks>,
}

/// Every thread's Python stack, read out of the process after the failure.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PythonStacks {
    /// How long after the failing call returned the stacks were read.
    pub read_ms_after_failure: f64,
    /// Read while the process was stopped at the failing call's return (and continued then:
    /// `read_ms_after_failure` is how long it was stopped); else read when the report was
    /// written, where the threads were by then.
    #[serde(default)]
    pub frozen: bool,
    /// The failing thread first.
    pub threads: Vec<PythonThread>,
    /// Why they could not be read, when they could not.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PythonThread {
    /// Python's thread id.
    pub thread_id: u64,
    /// The kernel's (the failing call's thread is the one with its id).
    pub os_thread_id: Option<u64>,
    pub name: Option<String>,
    /// The thread whose CUDA call failed.
    pub failing: bool,
    pub active: bool,
    pub owns_gil: bool,
    /// Innermost first.
    pub frames: Vec<PythonFrame>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PythonFrame {
    pub function: String,
    pub file: String,
    pub line: i32,
}

/// The requests of the failing process's server (and the servers of its process tree).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Requests {
    /// The server processes (pids) whose requests are listed.
    pub servers: Vec<u32>,
    /// A request that arrived, or got its first token, this long before the failure is a
    /// likely trigger.
    pub trigger_window_ms: u64,
    /// In flight at the failing call, oldest first.
    pub in_flight: Vec<RequestRow>,
    /// Why no request is marked as the trigger, when none is.
    pub no_trigger: Option<String>,
    /// How long after the failure the server's requests were followed.
    pub after_window_secs: u64,
    /// Whether that window has passed (the report is rewritten when it has).
    pub after_complete: bool,
    /// The requests that ended in a server error, a reset or a timeout in that window.
    pub failed_after: Vec<RequestRow>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRow {
    pub server_pid: u32,
    pub model: String,
    /// Seconds before the failure it arrived (its first byte).
    pub arrived_seconds_before: f64,
    /// `streaming` (it had token events by the failure) or `waiting_first_token` (its prompt
    /// being processed, or an answer that is not streamed being computed).
    pub state: String,
    /// Token events it had streamed by the failure.
    pub tokens_so_far: u64,
    /// The request body's size: the prompt on the wire.
    pub prompt_bytes: u64,
    /// When the response told.
    pub prompt_tokens: Option<u64>,
    /// From the request body.
    pub max_tokens: Option<u64>,
    /// The client's address.
    pub client: Option<String>,
    /// The process on this node holding the client's end of the connection, when there is
    /// one (looked up as the report is written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_process: Option<ClientProcess>,
    pub likely_trigger: bool,
    pub trigger_reason: Option<String>,
    /// How it ended, when it has: HTTP status, or the error type.
    pub outcome: Option<String>,
    /// Seconds after the failure it ended.
    pub ended_seconds_after: Option<f64>,
}

/// A request's client on this node: its process and, in a pod, the pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientProcess {
    pub pid: u32,
    pub comm: String,
    /// Empty outside a pod.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container: String,
}

impl ClientProcess {
    /// `namespace/pod/container`, else `pid N comm`.
    pub fn describe(&self) -> String {
        if self.pod.is_empty() {
            format!("pid {} {}", self.pid, self.comm)
        } else {
            format!(
                "pod {}/{} container {} (pid {} {})",
                self.namespace, self.pod, self.container, self.pid, self.comm
            )
        }
    }
}

impl Report {
    /// Masks secrets (`crate::redact`) in every text field: command line, names, symbols.
    pub fn redact(&mut self) {
        self.strings_mut(&mut |s| *s = crate::redact::text(s));
    }

    /// Every text field, for what must reach each of them: redaction before a report is
    /// stored or exported, escaping before it is printed. A new text field goes here too
    /// (the test below fails until it does).
    pub fn strings_mut(&mut self, f: &mut impl FnMut(&mut String)) {
        fn frames(stack: &mut [Frame], f: &mut dyn FnMut(&mut String)) {
            for fr in stack {
                fr.function.iter_mut().for_each(&mut *f);
                fr.module.iter_mut().for_each(&mut *f);
                fr.file.iter_mut().for_each(&mut *f);
            }
        }
        f(&mut self.id);
        f(&mut self.time);
        f(&mut self.summary);
        let p = &mut self.process;
        f(&mut p.comm);
        f(&mut p.cmdline);
        f(&mut p.cgroup);
        p.container_id.iter_mut().for_each(&mut *f);
        f(&mut p.namespace);
        f(&mut p.pod);
        f(&mut p.container);
        if let Some(g) = &mut self.gpu {
            g.uuid.iter_mut().for_each(&mut *f);
            g.name.iter_mut().for_each(&mut *f);
            g.throttle_reasons.iter_mut().for_each(&mut *f);
        }
        if let Some(c) = &mut self.cuda {
            f(&mut c.api);
            f(&mut c.error);
            frames(&mut c.stack, f);
        }
        if let Some(e) = &mut self.exit {
            e.signal_name.iter_mut().for_each(&mut *f);
        }
        if let Some(h) = &mut self.host_oom {
            h.largest_processes.iter_mut().for_each(|r| f(&mut r.comm));
        }
        if let Some(a) = &mut self.allocations {
            a.by_size_class.iter_mut().for_each(|c| f(&mut c.class));
            for row in &mut a.largest {
                f(&mut row.api);
                frames(&mut row.stack, f);
            }
        }
        self.gpu_processes.iter_mut().for_each(|r| f(&mut r.comm));
        let t = &mut self.timeline;
        for g in &mut t.gpu {
            g.throttle_reasons.iter_mut().for_each(&mut *f);
        }
        t.processes.iter_mut().for_each(|s| f(&mut s.comm));
        for x in &mut t.failures {
            f(&mut x.api);
            f(&mut x.error);
        }
        t.requests.iter_mut().for_each(|s| f(&mut s.comm));
        if let Some(p) = &mut self.python {
            p.error.iter_mut().for_each(&mut *f);
            for t in &mut p.threads {
                t.name.iter_mut().for_each(&mut *f);
                for fr in &mut t.frames {
                    f(&mut fr.function);
                    f(&mut fr.file);
                }
            }
        }
        if let Some(r) = &mut self.requests {
            r.no_trigger.iter_mut().for_each(&mut *f);
            for row in r.in_flight.iter_mut().chain(r.failed_after.iter_mut()) {
                f(&mut row.model);
                f(&mut row.state);
                row.client.iter_mut().for_each(&mut *f);
                if let Some(c) = &mut row.client_process {
                    for s in [&mut c.comm, &mut c.namespace, &mut c.pod, &mut c.container] {
                        f(s);
                    }
                }
                row.trigger_reason.iter_mut().for_each(&mut *f);
                row.outcome.iter_mut().for_each(&mut *f);
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub utilization: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_watts: Option<f64>,
    pub throttle_reasons: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CudaFailure {
    pub api: String,
    pub requested_bytes: u64,
    pub error: String,
    pub code: u32,
    pub thread: u32,
    pub stack: Vec<Frame>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub signal_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostOom {
    pub total_vm_bytes: u64,
    pub anon_rss_bytes: u64,
    pub file_rss_bytes: u64,
    pub shmem_rss_bytes: u64,
    pub pgtables_bytes: u64,
    pub oom_score_adj: i32,
    pub uid: u32,
    pub cgroup_limit_bytes: Option<u64>,
    pub cgroup_usage_bytes: Option<u64>,
    pub node_memory_total_bytes: Option<u64>,
    pub node_memory_available_bytes: Option<u64>,
    /// The largest processes on the node by resident memory.
    pub largest_processes: Vec<RssRow>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RssRow {
    pub pid: u32,
    pub comm: String,
    pub rss_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Allocations {
    pub count: u64,
    pub bytes: u64,
    pub by_size_class: Vec<SizeClass>,
    pub largest: Vec<AllocationRow>,
    /// Allocations and frees per second over the last minute.
    pub alloc_rate_per_s: f64,
    pub free_rate_per_s: f64,
    /// Bytes in allocations older than 10 minutes (long-lived: weights, pools).
    pub old_bytes: u64,
    pub old_count: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SizeClass {
    pub class: String,
    pub count: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocationRow {
    pub bytes: u64,
    pub api: String,
    pub gpu: i32,
    pub age_seconds: f64,
    pub stack: Vec<Frame>,
    /// What became of its stack: why `stack` is empty when it is.
    #[serde(default)]
    pub stack_status: StackStatus,
}

/// Whether a live allocation's stack was walked, and why not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StackStatus {
    /// Walked and symbolized (`stack` holds it).
    Walked,
    /// Below `probes.stack_threshold_bytes` and not picked by the byte sampler.
    NotSampled,
    /// Walked, but nothing was stored: the stack table was full or the unwinding failed.
    Missed,
    /// A report written before the status was kept.
    #[default]
    Unknown,
}

impl StackStatus {
    /// Says, in a report's text and HTML, why an allocation row has no stack.
    pub fn missing_text(self) -> &'static str {
        match self {
            StackStatus::Walked => "stack lost",
            StackStatus::NotSampled => "stack not sampled: below the threshold",
            StackStatus::Missed => "stack not stored: the stack table was full or unwinding failed",
            StackStatus::Unknown => "stack not sampled",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    pub address: u64,
    pub function: Option<String>,
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub offset: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// Seconds covered before the event.
    pub window_seconds: u64,
    pub gpu: Vec<GpuPoint>,
    pub processes: Vec<ProcessSeries>,
    pub failures: Vec<FailurePoint>,
    /// Requests in flight on each watched inference server (from the wire), once a second.
    #[serde(default)]
    pub requests: Vec<RequestSeries>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestSeries {
    pub pid: u32,
    pub comm: String,
    /// (t, requests in flight, their request body bytes).
    pub points: Vec<(f64, u32, u64)>,
}

/// Times are seconds relative to the event (negative: before).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuPoint {
    pub t: f64,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub utilization: Option<u32>,
    pub power_watts: Option<f64>,
    pub temperature_c: Option<u32>,
    pub throttle_reasons: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessSeries {
    pub pid: u32,
    pub comm: String,
    /// (t, ledger bytes on the report's GPU).
    pub points: Vec<(f64, u64)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailurePoint {
    pub t: f64,
    pub pid: u32,
    pub api: String,
    pub requested_bytes: u64,
    pub error: String,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report with every optional part present and every text field set to `text`.
    pub(crate) fn full(text: &str) -> Report {
        let t = || text.to_string();
        let frame = || Frame {
            address: 1,
            function: Some(t()),
            module: Some(t()),
            file: Some(t()),
            line: Some(1),
            offset: Some(1),
        };
        Report {
            schema_version: SCHEMA_VERSION,
            id: t(),
            kind: Kind::Cuda,
            time: t(),
            time_unix_ms: 1,
            summary: t(),
            process: ProcessInfo {
                pid: 1,
                comm: t(),
                cmdline: t(),
                cgroup: t(),
                container_id: Some(t()),
                namespace: t(),
                pod: t(),
                container: t(),
            },
            gpu: Some(GpuInfo {
                index: 0,
                uuid: Some(t()),
                name: Some(t()),
                memory_total_bytes: Some(1),
                memory_used_bytes: Some(1),
                utilization: Some(1),
                temperature_c: Some(1),
                power_watts: Some(1.0),
                throttle_reasons: vec![t()],
            }),
            cuda: Some(CudaFailure {
                api: t(),
                requested_bytes: 1,
                error: t(),
                code: 2,
                thread: 1,
                stack: vec![frame()],
            }),
            exit: Some(ExitInfo {
                exit_code: Some(1),
                signal: Some(9),
                signal_name: Some(t()),
            }),
            host_oom: Some(HostOom {
                largest_processes: vec![RssRow {
                    pid: 1,
                    comm: t(),
                    rss_bytes: 1,
                }],
                ..Default::default()
            }),
            xid: Some(1),
            allocations: Some(Allocations {
                by_size_class: vec![SizeClass {
                    class: t(),
                    count: 1,
                    bytes: 1,
                }],
                largest: vec![AllocationRow {
                    bytes: 1,
                    api: t(),
                    gpu: 0,
                    age_seconds: 1.0,
                    stack: vec![frame()],
                    stack_status: StackStatus::Walked,
                }],
                ..Default::default()
            }),
            gpu_processes: vec![GpuProcessRow {
                pid: 1,
                comm: t(),
                ledger_bytes: 1,
                nvml_bytes: Some(1),
            }],
            timeline: Timeline {
                window_seconds: 1,
                gpu: vec![GpuPoint {
                    t: 0.0,
                    memory_used_bytes: None,
                    memory_total_bytes: None,
                    utilization: None,
                    power_watts: None,
                    temperature_c: None,
                    throttle_reasons: vec![t()],
                }],
                processes: vec![ProcessSeries {
                    pid: 1,
                    comm: t(),
                    points: vec![(0.0, 1)],
                }],
                failures: vec![FailurePoint {
                    t: 0.0,
                    pid: 1,
                    api: t(),
                    requested_bytes: 1,
                    error: t(),
                }],
                requests: vec![RequestSeries {
                    pid: 1,
                    comm: t(),
                    points: vec![(0.0, 1, 1)],
                }],
            },
            suppressed_before: 0,
            requests: Some(Requests {
                servers: vec![1],
                trigger_window_ms: 1,
                in_flight: vec![RequestRow {
                    model: t(),
                    state: t(),
                    client: Some(t()),
                    client_process: Some(ClientProcess {
                        pid: 1,
                        comm: t(),
                        namespace: t(),
                        pod: t(),
                        container: t(),
                    }),
                    trigger_reason: Some(t()),
                    outcome: Some(t()),
                    ..Default::default()
                }],
                no_trigger: Some(t()),
                after_window_secs: 1,
                after_complete: true,
                failed_after: vec![RequestRow {
                    model: t(),
                    state: t(),
                    client: Some(t()),
                    client_process: Some(ClientProcess {
                        pid: 1,
                        comm: t(),
                        namespace: t(),
                        pod: t(),
                        container: t(),
                    }),
                    trigger_reason: Some(t()),
                    outcome: Some(t()),
                    ..Default::default()
                }],
            }),
            python: Some(PythonStacks {
                read_ms_after_failure: 1.0,
                frozen: true,
                threads: vec![PythonThread {
                    name: Some(t()),
                    frames: vec![PythonFrame {
                        function: t(),
                        file: t(),
                        line: 1,
                    }],
                    ..Default::default()
                }],
                error: Some(t()),
            }),
        }
    }

    /// Every string value in a JSON document.
    fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }

    #[test]
    fn strings_mut_reaches_every_text_field() {
        let mut r = full("before");
        let mut n = 0;
        r.strings_mut(&mut |s| {
            *s = "after".into();
            n += 1;
        });
        let mut all = Vec::new();
        strings(&serde_json::to_value(&r).unwrap(), &mut all);
        // `kind` and `stack_status` are enums: their names are the agent's, never a process's.
        all.retain(|s| s != "cuda" && s != "walked");
        assert!(all.iter().all(|s| s == "after"), "{all:?}");
        assert_eq!(n, all.len());
    }
}

//! Forensics triggers, on the tracker's side: keep what a report needs that only the tracker
//! knows (a timeline of ledger bytes per process, allocation and free counts, each process's
//! command line and cgroup), notice triggers, and hand a snapshot ([`Draft`]) to the
//! forensics writer.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::SystemTime,
};

use agent_common::{
    cuda::{CudaApi, CudaMemEvent, Role},
    oom::OomKillEvent,
    sched::{ProcessExitEvent, EXIT_CODE_KNOWN},
};

use super::{
    draft::{
        Draft, DraftSink, GpuProcessRow, Kind, LedgerSeries, Limiter, ProcessInfo, TriggerSettings,
    },
    ledger::Outcome,
    Tracker,
};
use crate::{clock::monotonic_ns, cuda_error, metrics::KindLabels};

const CUDA_ERROR_OUT_OF_MEMORY: u32 = 2;

/// A process's ledger at one instant.
struct Snapshot {
    ts_ns: u64,
    bytes: BTreeMap<i32, u64>,
    allocs: u64,
    frees: u64,
}

#[derive(Clone, Default)]
struct Meta {
    cmdline: String,
    cgroup: String,
}

pub(super) struct ForensicsState {
    sink: DraftSink,
    limiter: Limiter,
    timeline_ns: u64,
    meta: HashMap<u32, Meta>,
    timeline: HashMap<u32, VecDeque<Snapshot>>,
    /// Successful allocations and frees per process, since first seen.
    counts: HashMap<u32, (u64, u64)>,
}

impl ForensicsState {
    pub(super) fn new(sink: DraftSink, settings: TriggerSettings) -> Self {
        Self {
            sink,
            limiter: Limiter::new(settings.window_secs),
            timeline_ns: settings.timeline_secs.max(60).saturating_mul(1_000_000_000),
            meta: HashMap::new(),
            timeline: HashMap::new(),
            counts: HashMap::new(),
        }
    }
}

fn read_meta(procfs: &crate::proc::ProcFs, pid: u32) -> Meta {
    let dir = procfs.root().join(pid.to_string());
    let cmdline = std::fs::read(dir.join("cmdline"))
        .map(|b| cmdline(&b))
        .unwrap_or_default();
    let cgroup = procfs.memory_cgroup(pid);
    Meta { cmdline, cgroup }
}

/// `/proc/<pid>/cmdline` as a report shows it: secrets masked argument by argument, then
/// joined and cut to its start (arguments can hold prompts on odd setups). Masking comes
/// first, so the cut cannot leave a prefix of a secret.
fn cmdline(raw: &[u8]) -> String {
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    crate::redact::argv(&args)
        .join(" ")
        .trim()
        .chars()
        .take(512)
        .collect()
}

impl Tracker {
    pub(super) fn seen_process(&mut self, tgid: u32) {
        let procfs = self.procfs.clone();
        if let Some(f) = self.forensics.as_mut() {
            f.meta.insert(tgid, read_meta(&procfs, tgid));
        }
    }

    pub(super) fn forget_process(&mut self, tgid: u32) {
        if let Some(f) = self.forensics.as_mut() {
            f.meta.remove(&tgid);
            f.timeline.remove(&tgid);
            f.counts.remove(&tgid);
        }
    }

    pub(super) fn count_call(&mut self, e: &CudaMemEvent, api: CudaApi, outcome: &Outcome) {
        if let Some(f) = self.forensics.as_mut() {
            let c = f.counts.entry(e.header.tgid).or_default();
            match outcome {
                Outcome::Device { .. } if e.result == 0 => {
                    if matches!(api.role(), Role::DeviceAlloc | Role::PhysicalCreate) {
                        c.0 += 1;
                    } else {
                        c.1 += 1;
                    }
                }
                _ => {}
            }
        }
        let alloc_side = matches!(api.role(), Role::DeviceAlloc | Role::PhysicalCreate);
        if e.result == CUDA_ERROR_OUT_OF_MEMORY && alloc_side {
            self.metrics
                .oom_events
                .get_or_create(&KindLabels { kind: "cuda" })
                .inc();
            let gpu = u32::try_from(e.device).ok();
            if let Some(mut d) = self.draft(Kind::Cuda, e.header.tgid, gpu, e.header.ts_ns) {
                d.cuda = Some(*e);
                self.send(d);
            }
        }
    }

    pub(super) fn process_exit(&mut self, e: &ProcessExitEvent) {
        let code = (e.flags & EXIT_CODE_KNOWN != 0).then_some(e.exit_code);
        let crashed = e.signal != 0 || code.is_some_and(|c| c != 0);
        let holds = self
            .ledger
            .process(e.header.tgid)
            .map(|p| {
                p.device_bytes()
                    .iter()
                    .filter(|(_, b)| **b > 0)
                    .max_by_key(|(_, b)| **b)
                    .map(|(g, _)| *g)
            })
            .unwrap_or(None);
        let Some(gpu) = holds else { return };
        if !crashed {
            return;
        }
        self.metrics
            .oom_events
            .get_or_create(&KindLabels {
                kind: "gpu_process_crash",
            })
            .inc();
        if let Some(mut d) = self.draft(
            Kind::GpuProcessCrash,
            e.header.tgid,
            u32::try_from(gpu).ok(),
            e.header.ts_ns,
        ) {
            d.exit = Some((code, e.signal));
            if d.process.comm.is_empty() {
                d.process.comm = comm_of(&e.comm);
            }
            self.send(d);
        }
    }

    pub(super) fn oom_kill(&mut self, e: &OomKillEvent) {
        self.metrics
            .oom_events
            .get_or_create(&KindLabels {
                kind: "host_oom_kill",
            })
            .inc();
        let pid = e.victim_pid;
        // The victim's cgroup, now, while the process still exists.
        let cgroup = self.procfs.memory_cgroup(pid);
        let gpu = self
            .ledger
            .process(pid)
            .and_then(|p| {
                p.device_bytes()
                    .iter()
                    .max_by_key(|(_, b)| **b)
                    .map(|(g, _)| *g)
            })
            .and_then(|g| u32::try_from(g).ok());
        if let Some(mut d) = self.draft(Kind::HostOomKill, pid, gpu, e.header.ts_ns) {
            d.host_oom = Some(*e);
            d.process.comm = comm_of(&e.comm);
            if !cgroup.is_empty() {
                d.process.cgroup = cgroup;
            }
            self.send(d);
        }
    }

    pub(super) fn xid(&mut self, gpu: u32, xid: u64, ts_ns: u64) {
        self.metrics
            .oom_events
            .get_or_create(&KindLabels { kind: "xid" })
            .inc();
        // The process with the most memory on the GPU is the likely victim; pid 0 when none.
        let pid = self
            .ledger
            .processes()
            .filter_map(|(pid, p)| Some((pid, *p.device_bytes().get(&(gpu as i32))?)))
            .max_by_key(|(_, b)| *b)
            .map_or(0, |(pid, _)| pid);
        if let Some(mut d) = self.draft(Kind::Xid, pid, Some(gpu), ts_ns) {
            d.xid = Some(xid);
            self.send(d);
        }
    }

    fn send(&mut self, d: Draft) {
        if let Some(f) = &self.forensics {
            f.sink.submit(d);
        }
    }

    /// Records every process's ledger (once a second), kept for the timeline window.
    pub(super) fn record_timeline(&mut self) {
        let Some(f) = self.forensics.as_mut() else {
            return;
        };
        let now = monotonic_ns();
        let horizon = now.saturating_sub(f.timeline_ns);
        for (pid, p) in self.ledger.processes() {
            let (allocs, frees) = f.counts.get(&pid).copied().unwrap_or_default();
            let ring = f.timeline.entry(pid).or_default();
            while ring.front().is_some_and(|s| s.ts_ns < horizon) {
                ring.pop_front();
            }
            ring.push_back(Snapshot {
                ts_ns: now,
                bytes: p.device_bytes().clone(),
                allocs,
                frees,
            });
        }
    }

    /// A snapshot for a report, unless the limiter has already given this process and kind
    /// its report in the current window.
    fn draft(&mut self, kind: Kind, pid: u32, gpu: Option<u32>, ts_ns: u64) -> Option<Draft> {
        self.forensics.as_ref()?;
        let workload = self.workload_of(pid);
        let f = self.forensics.as_mut()?;
        let Some(suppressed_before) = f.limiter.admit(pid, kind, ts_ns) else {
            self.metrics
                .forensics_suppressed
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .inc();
            return None;
        };
        let meta = f
            .meta
            .get(&pid)
            .cloned()
            .unwrap_or_else(|| read_meta(&self.procfs, pid));
        let ledger = self.ledger.process(pid);
        let comm = ledger
            .map(|p| p.comm.clone())
            .or_else(|| self.procfs.comm(pid))
            .unwrap_or_default();
        let container_id = crate::proc::container_id(&meta.cgroup);
        let allocations = ledger
            .map(|p| {
                p.allocations()
                    .filter(|a| gpu.is_none_or(|g| a.device == g as i32))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();

        // Rates over the last minute from the ledger timeline.
        let (allocs, frees) = f.counts.get(&pid).copied().unwrap_or_default();
        let rates = f
            .timeline
            .get(&pid)
            .and_then(|ring| {
                ring.iter()
                    .find(|s| ts_ns.saturating_sub(s.ts_ns) <= 60_000_000_000)
            })
            .map(|s| {
                let secs = (ts_ns.saturating_sub(s.ts_ns) as f64 / 1e9).max(1.0);
                (
                    (allocs - s.allocs.min(allocs)) as f64 / secs,
                    (frees - s.frees.min(frees)) as f64 / secs,
                )
            })
            .unwrap_or((0.0, 0.0));

        let mut gpu_processes = Vec::new();
        let mut series = Vec::new();
        if let Some(g) = gpu {
            let mut pids: Vec<u32> = self
                .ledger
                .processes()
                .filter(|(_, p)| p.device_bytes().contains_key(&(g as i32)))
                .map(|(pid, _)| pid)
                .collect();
            pids.extend(
                self.nvml
                    .iter()
                    .filter(|(_, gpus)| gpus.contains_key(&g))
                    .map(|(pid, _)| *pid),
            );
            pids.sort_unstable();
            pids.dedup();
            for p in pids {
                let lp = self.ledger.process(p);
                let comm = lp
                    .map(|x| x.comm.clone())
                    .or_else(|| self.procfs.comm(p))
                    .unwrap_or_default();
                gpu_processes.push(GpuProcessRow {
                    pid: p,
                    comm: comm.clone(),
                    ledger_bytes: lp
                        .and_then(|x| x.device_bytes().get(&(g as i32)).copied())
                        .unwrap_or(0),
                    nvml_bytes: self.nvml.get(&p).and_then(|m| m.get(&g).copied().flatten()),
                });
                if let Some(ring) = f.timeline.get(&p) {
                    let mut points: Vec<(u64, u64)> = ring
                        .iter()
                        .map(|s| (s.ts_ns, s.bytes.get(&(g as i32)).copied().unwrap_or(0)))
                        .collect();
                    // The instant itself, from the live ledger.
                    points.push((
                        ts_ns,
                        lp.and_then(|x| x.device_bytes().get(&(g as i32)).copied())
                            .unwrap_or(0),
                    ));
                    series.push(LedgerSeries {
                        pid: p,
                        comm,
                        points,
                    });
                }
            }
        }
        let horizon = ts_ns.saturating_sub(f.timeline_ns);
        let failures = self
            .failures
            .iter()
            .filter(|r| {
                r.event.header.ts_ns >= horizon && gpu.is_none_or(|g| r.event.device == g as i32)
            })
            .map(|r| {
                (
                    r.event.header.ts_ns,
                    r.event.header.tgid,
                    CudaApi::from_u32(r.event.api)
                        .map_or("unknown", |a| a.symbol())
                        .to_string(),
                    r.event.size,
                    cuda_error::name(r.event.result).into_owned(),
                )
            })
            .collect();
        // Monotonic event time → wall clock.
        let wall = SystemTime::now()
            .checked_sub(std::time::Duration::from_nanos(
                monotonic_ns().saturating_sub(ts_ns),
            ))
            .unwrap_or_else(SystemTime::now);
        Some(Draft {
            kind,
            ts_ns,
            wall,
            process: ProcessInfo {
                pid,
                comm,
                cmdline: meta.cmdline,
                cgroup: meta.cgroup,
                container_id,
                namespace: workload.0.namespace.clone(),
                pod: workload.0.pod.clone(),
                container: workload.0.container.clone(),
            },
            gpu,
            cuda: None,
            exit: None,
            host_oom: None,
            xid: None,
            allocations,
            rates,
            gpu_processes,
            ledger: series,
            failures,
            suppressed_before,
            maps: crate::proc::capture_exec_maps(&self.procfs.root().join(pid.to_string())),
        })
    }
}

fn comm_of(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_is_masked_before_it_is_cut() {
        let secret = "sk-".to_string() + &"x".repeat(600);
        let raw =
            format!("vllm\0serve\0m\0--api-key\0{secret}\0--hf-token=hf_abc\0HF_TOKEN=hf_def\0");
        let line = cmdline(raw.as_bytes());
        assert_eq!(
            line,
            "vllm serve m --api-key *** --hf-token=*** HF_TOKEN=***"
        );
        // A secret past the cut is masked too, not left as a prefix.
        let long = format!("{}\0--token\0{secret}\0", "a".repeat(500));
        let line = cmdline(long.as_bytes());
        assert!(!line.contains("sk-"), "{line}");
        assert_eq!(line.chars().count(), 512);
        assert_eq!(cmdline(b""), "");
    }
}

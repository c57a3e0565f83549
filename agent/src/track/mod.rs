//! The tracker: the one owner of per-process state. Applies decoded events to the ledger,
//! keeps the exported counters and gauges in step with it, and sets the ledger next to NVML's
//! per-process view (their difference is the process's overhead).

mod config;
pub mod draft;
pub mod ledger;
pub mod metrics;
mod triggers;

pub use config::LimitsConfig;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use agent_common::cuda::{CudaApi, CudaMemEvent, Role, FLAG_DEVICE_UNKNOWN, FLAG_FROZEN};

use metrics::{
    ApiErrorLabels, ApiLabels, PidGpuLabels, ProcessGpuLabels, ProcessLabels, TrackMetrics,
};

use crate::{
    attrib::Attributor,
    events::{AllocFailed, Notice},
    labels::SharedWorkload,
};
use crate::{
    cuda_error,
    gpu::{history::GpuHistory, GpuProcesses, GpuSample},
    ingest::{Batch, Event},
    metrics::SourceLabels,
    proc::ProcFs,
};
use ledger::{Ledger, Outcome};

/// What reaches the tracker.
#[derive(Debug)]
pub enum Input {
    Events(Batch),
    GpuProcesses(GpuProcesses),
    /// An XID critical error NVML reported (CLOCK_MONOTONIC ns).
    Xid {
        gpu: u32,
        xid: u64,
        ts_ns: u64,
    },
}

impl From<Batch> for Input {
    fn from(batch: Batch) -> Self {
        Input::Events(batch)
    }
}

impl Input {
    /// The GPU side's reports this stage takes (usage goes to the `http` stage).
    pub fn from_gpu(report: crate::gpu::GpuReport) -> Option<Self> {
        match report {
            crate::gpu::GpuReport::Processes(p) => Some(Input::GpuProcesses(p)),
            crate::gpu::GpuReport::Xid { gpu, xid, ts_ns } => Some(Input::Xid { gpu, xid, ts_ns }),
            crate::gpu::GpuReport::Usage(_) => None,
        }
    }
}

/// Bytes of records and snapshots waiting for the tracker. A batch of events is at most
/// [`crate::ingest::MAX_BATCH`] records (about 400 KiB): past this the readers wait and the
/// rings absorb bursts; an NVML snapshot or XID that finds no room is dropped and counted
/// (`what="tracker_queue"`), the next snapshot replacing it.
pub const QUEUE_BYTES: usize = 16 * 1024 * 1024;

impl crate::queue::Weigh for Input {
    fn weight(&self) -> usize {
        size_of::<Input>()
            + match self {
                Input::Events(batch) => batch.capacity() * size_of::<crate::ingest::Event>(),
                Input::GpuProcesses(p) => {
                    p.entries.capacity() * size_of::<crate::gpu::GpuProcess>()
                }
                Input::Xid { .. } => 0,
            }
    }
}

/// A failed CUDA call with the GPU's state at that instant, kept for forensics.
#[derive(Clone, Debug)]
pub struct FailureRecord {
    pub event: CudaMemEvent,
    pub comm: String,
    pub gpu_state: Option<GpuSample>,
}

/// The `gpu` of device memory on an ordinal NVML does not list.
const UNKNOWN_GPU: i32 = -1;

/// Failures kept in memory for forensics.
const FAILURES_KEPT: usize = 1024;

/// How often the ledgers of processes whose exit was missed are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

pub struct Tracker {
    ledger: Ledger,
    metrics: Arc<TrackMetrics>,
    procfs: ProcFs,
    max_label_len: usize,
    /// (tgid, api, CUresult; `u32::MAX` for every code the driver does not define) already
    /// logged: one line per kind of failure per process.
    logged_failures: HashSet<(u32, u32, u32)>,
    history: Arc<GpuHistory>,
    failures: VecDeque<FailureRecord>,
    /// NVML's last view: pid → (gpu → bytes).
    nvml: HashMap<u32, HashMap<u32, Option<u64>>>,
    /// Series set from NVML's view, to remove those that go away.
    nvml_series: HashSet<PidGpuLabels>,
    overhead_series: HashSet<ProcessGpuLabels>,
    forensics: Option<triggers::ForensicsState>,
    /// Who each process in the ledger is (node, namespace, pod, container).
    attrib: Option<Arc<Attributor>>,
    workload: HashMap<u32, SharedWorkload>,
    /// The labels of a process nobody attributes, allocated once.
    unattributed: SharedWorkload,
    /// OTLP: failed calls as log records, rate-limited per process.
    failure_logs: Option<crate::events::RateLimited>,
    /// Reads Python stacks: told of each process with a ledger (its interpreter is found
    /// ahead), of each one a failure stopped, and of exits.
    python: Option<Box<dyn ProcessNotes>>,
}

/// What the reader of Python stacks (forensics) hears of the tracker's processes.
pub trait ProcessNotes: Send {
    /// A process has a ledger from now on.
    fn seen(&self, pid: u32);
    /// The CUDA probe stopped `pid` as its call on thread `tid` failed at `ts_ns`
    /// (`FLAG_FROZEN`): it must be continued.
    fn frozen(&self, pid: u32, tid: u32, ts_ns: u64);
    fn exit(&self, pid: u32);
}

impl Tracker {
    pub fn new(
        metrics: Arc<TrackMetrics>,
        procfs: ProcFs,
        limits: &LimitsConfig,
        history: Arc<GpuHistory>,
    ) -> Self {
        Self {
            ledger: Ledger::new(limits.max_processes, limits.max_allocations_per_process)
                .with_budget(limits.ledger_budget_bytes),
            metrics,
            procfs,
            max_label_len: limits.max_label_len,
            logged_failures: HashSet::new(),
            history,
            failures: VecDeque::new(),
            nvml: HashMap::new(),
            nvml_series: HashSet::new(),
            overhead_series: HashSet::new(),
            forensics: None,
            attrib: None,
            workload: HashMap::new(),
            unattributed: SharedWorkload::default(),
            failure_logs: None,
            python: None,
        }
    }

    /// Labels per-process series with the process's workload from now on.
    pub fn with_attribution(mut self, attrib: Arc<Attributor>) -> Self {
        self.attrib = Some(attrib);
        self
    }

    /// The workload labels of `pid`: as last set for a process in the ledger, else asked.
    fn workload_of(&self, pid: u32) -> SharedWorkload {
        match (self.workload.get(&pid), &self.attrib) {
            (Some(w), _) => w.clone(),
            (None, Some(a)) => a.labels(pid).into(),
            (None, None) => self.unattributed.clone(),
        }
    }

    /// Sends failed CUDA calls to OTLP log export (rate-limited).
    pub fn with_failure_logs(mut self, logs: Option<crate::events::RateLimited>) -> Self {
        self.failure_logs = logs;
        self
    }

    pub fn with_python(mut self, python: Option<Box<dyn ProcessNotes>>) -> Self {
        self.python = python;
        self
    }

    /// Sends a forensic report draft for every trigger from now on.
    pub fn with_forensics(
        mut self,
        sink: draft::DraftSink,
        settings: draft::TriggerSettings,
    ) -> Self {
        self.forensics = Some(triggers::ForensicsState::new(sink, settings));
        self
    }

    /// Recent failed calls with the GPU state at each, oldest first.
    pub fn recent_failures(&self) -> impl Iterator<Item = &FailureRecord> {
        self.failures.iter()
    }

    pub fn input(&mut self, input: Input) {
        match input {
            Input::Events(batch) => batch.iter().for_each(|ev| self.handle(ev)),
            Input::GpuProcesses(p) => self.gpu_processes(p),
            Input::Xid { gpu, xid, ts_ns } => self.xid(gpu, xid, ts_ns),
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn handle(&mut self, ev: &Event) {
        self.metrics
            .core
            .events
            .get_or_create(&SourceLabels {
                source: ev.source(),
            })
            .inc();
        match ev {
            Event::CudaMem(e) => self.cuda(e),
            Event::ProcessExit(e) => {
                self.process_exit(e);
                self.exit(e.header.tgid)
            }
            Event::OomKill(e) => self.oom_kill(e),
        }
    }

    fn cuda(&mut self, e: &CudaMemEvent) {
        if e.flags & FLAG_FROZEN != 0 {
            // Stopped until its stacks are read: before anything else.
            if let Some(py) = &self.python {
                py.frozen(e.header.tgid, e.header.pid, e.header.ts_ns);
            } else {
                drop(crate::held::Held::new(e.header.tgid));
            }
        }
        let mut e = *e;
        if e.flags & FLAG_DEVICE_UNKNOWN != 0 {
            // The context predates the probes. A process NVML sees on one GPU only is on that one.
            if let Some(gpus) = self.nvml.get(&e.header.tgid) {
                if gpus.len() == 1 {
                    e.device = *gpus.keys().next().unwrap_or(&0) as i32;
                    e.flags &= !FLAG_DEVICE_UNKNOWN;
                }
            }
        }
        // The ordinal comes from the process (a context call's argument, `cuMemCreate`'s
        // location): where NVML lists the GPUs, one it does not list is `-1`, so the `gpu`
        // label only names devices that exist.
        if self.history.knows(e.device) == Some(false) {
            e.device = UNKNOWN_GPU;
            self.metrics.core.dropped("gpu_label", "unknown_device");
        }
        let e = &e;
        let Some(api) = CudaApi::from_u32(e.api) else {
            self.metrics.core.drop_reason("unknown_api");
            return;
        };
        let m = &self.metrics;
        let labels = ApiLabels { api: api.symbol() };
        let release = matches!(
            api.role(),
            Role::DeviceFree | Role::HostFree | Role::PhysicalRelease | Role::AddressRangeFree
        );
        if release {
            m.cuda_frees.get_or_create(&labels).inc();
        } else {
            m.cuda_alloc_calls.get_or_create(&labels).inc();
            m.cuda_alloc_latency
                .get_or_create(&labels)
                .observe(e.duration_ns as f64 / 1e9);
        }
        if e.result == 0 {
            if !release {
                m.cuda_alloc_bytes.get_or_create(&labels).inc_by(e.size);
            }
        } else {
            // A label takes only the codes the driver defines: the result is whatever the
            // library a process loaded returned (the log line keeps the number).
            let error = cuda_error::label(e.result);
            if error == cuda_error::OTHER {
                m.core.dropped("error_label", "unknown_code");
            }
            let family = if release {
                &m.cuda_free_failures
            } else {
                &m.cuda_alloc_failures
            };
            family
                .get_or_create(&ApiErrorLabels {
                    api: api.symbol(),
                    error,
                })
                .inc();
            self.log_failure(e, api, error);
        }

        let tgid = e.header.tgid;
        let new_process = self.ledger.process(tgid).is_none();
        let (procfs, max) = (&self.procfs, self.max_label_len);
        let outcome = self
            .ledger
            .apply(e, api, || comm_label(procfs, e.header.tgid, max));
        if new_process && self.ledger.process(tgid).is_some() {
            if let Some(a) = &self.attrib {
                self.workload.insert(tgid, a.labels(tgid).into());
            }
            self.seen_process(tgid);
            if let Some(py) = &self.python {
                py.seen(tgid);
            }
        }
        self.count_call(e, api, &outcome);
        match outcome {
            Outcome::Device { device } => self.publish_device(e.header.tgid, device),
            Outcome::Host => self.publish_host(e.header.tgid),
            Outcome::UnknownFree => {
                self.metrics.cuda_unknown_frees.get_or_create(&labels).inc();
            }
            Outcome::ProcessLimit => self.metrics.core.drop_reason("process_limit"),
            Outcome::AllocationLimit => self.metrics.core.drop_reason("allocation_limit"),
            Outcome::LedgerBudget => self.metrics.core.drop_reason("ledger_budget"),
            Outcome::Range | Outcome::Failed => {}
        }
        self.metrics.tracked_processes.set(self.ledger.len() as i64);
    }

    fn log_failure(&mut self, e: &CudaMemEvent, api: CudaApi, error: &str) {
        let comm = self
            .ledger
            .process(e.header.tgid)
            .map(|p| p.comm.clone())
            .unwrap_or_else(|| comm_label(&self.procfs, e.header.tgid, self.max_label_len));
        let gpu_state = u32::try_from(e.device)
            .ok()
            .and_then(|gpu| self.history.at(gpu, e.header.ts_ns));
        let described = gpu_state.as_ref().map_or_else(
            || "unknown (no NVML sample)".to_string(),
            GpuSample::describe,
        );
        if self.failures.len() == FAILURES_KEPT {
            self.failures.pop_front();
        }
        self.failures.push_back(FailureRecord {
            event: *e,
            comm: comm.clone(),
            gpu_state,
        });
        if let Some(logs) = &mut self.failure_logs {
            logs.offer(e.header.tgid, e.header.ts_ns, || {
                Notice::AllocFailed(AllocFailed {
                    time_unix_nano: crate::events::now_unix_nano(),
                    pid: e.header.tgid,
                    comm: comm.clone(),
                    api: api.symbol(),
                    error: error.to_string(),
                    size: e.size,
                    device: e.device,
                })
            });
        }
        // Codes the driver does not define are one kind: a library returning a new code on
        // every call gets one line, not one per code.
        let kind = if error == cuda_error::OTHER {
            u32::MAX
        } else {
            e.result
        };
        if !self.logged_failures.insert((e.header.tgid, e.api, kind)) {
            return;
        }
        tracing::warn!(
            pid = e.header.tgid,
            tid = e.header.pid,
            comm,
            api = api.symbol(),
            size = e.size,
            device = e.device,
            error,
            code = e.result,
            stack_id = e.stack_id,
            gpu_state = described,
            "CUDA call failed (further failures of this kind in this process are only counted)"
        );
    }

    fn publish_device(&self, tgid: u32, device: i32) {
        let Some(p) = self.ledger.process(tgid) else {
            return;
        };
        let labels = ProcessGpuLabels {
            pid: tgid,
            comm: p.comm.clone(),
            gpu: device,
            workload: self.workload_of(tgid),
        };
        let bytes = p.device_bytes().get(&device).copied().unwrap_or(0);
        self.metrics
            .process_memory_allocated
            .get_or_create(&labels)
            .set(bytes as i64);
        self.metrics
            .process_allocations
            .get_or_create(&labels)
            .set(p.device_count(device) as i64);
    }

    fn publish_host(&self, tgid: u32) {
        let Some(p) = self.ledger.process(tgid) else {
            return;
        };
        self.metrics
            .process_host_pinned
            .get_or_create(&ProcessLabels {
                pid: tgid,
                comm: p.comm.clone(),
                workload: self.workload_of(tgid),
            })
            .set(p.host_bytes() as i64);
    }

    /// Releases a process's ledger and its series.
    pub fn exit(&mut self, tgid: u32) {
        self.logged_failures.retain(|(t, _, _)| *t != tgid);
        self.forget_process(tgid);
        if let Some(py) = &self.python {
            py.exit(tgid);
        }
        self.unpublish(tgid);
        self.workload.remove(&tgid);
        let Some(p) = self.ledger.remove(tgid) else {
            return;
        };
        self.metrics.tracked_processes.set(self.ledger.len() as i64);
        tracing::debug!(pid = tgid, comm = p.comm, "process exited, ledger released");
    }

    /// Removes the ledger's series of a process.
    fn unpublish(&self, tgid: u32) {
        let Some(p) = self.ledger.process(tgid) else {
            return;
        };
        let workload = self.workload_of(tgid);
        for device in p.device_bytes().keys() {
            let labels = ProcessGpuLabels {
                pid: tgid,
                comm: p.comm.clone(),
                gpu: *device,
                workload: workload.clone(),
            };
            self.metrics.process_memory_allocated.remove(&labels);
            self.metrics.process_allocations.remove(&labels);
        }
        self.metrics.process_host_pinned.remove(&ProcessLabels {
            pid: tgid,
            comm: p.comm.clone(),
            workload,
        });
    }

    /// Moves the series of processes whose workload changed (their pod became known, or they
    /// moved to another cgroup) to the new labels.
    fn relabel(&mut self) {
        let Some(a) = self.attrib.clone() else {
            return;
        };
        let pids: Vec<u32> = self.ledger.processes().map(|(tgid, _)| tgid).collect();
        for tgid in pids {
            let now = SharedWorkload::from(a.labels(tgid));
            if self.workload.get(&tgid) == Some(&now) {
                continue;
            }
            self.unpublish(tgid);
            self.workload.insert(tgid, now);
            let Some(p) = self.ledger.process(tgid) else {
                continue;
            };
            let devices: Vec<i32> = p.device_bytes().keys().copied().collect();
            let host = p.host_bytes() > 0;
            for d in devices {
                self.publish_device(tgid, d);
            }
            if host {
                self.publish_host(tgid);
            }
        }
    }

    /// NVML's per-process view: export it, and the difference to the ledger.
    fn gpu_processes(&mut self, snapshot: GpuProcesses) {
        if let Some(a) = &self.attrib {
            a.note_gpu_processes(&snapshot);
        }
        self.nvml.clear();
        let mut series = HashSet::new();
        for p in &snapshot.entries {
            self.nvml
                .entry(p.pid)
                .or_default()
                .insert(p.gpu, p.used_bytes);
            let labels = PidGpuLabels {
                pid: p.pid,
                gpu: p.gpu,
                workload: self.workload_of(p.pid),
            };
            if let Some(b) = p.used_bytes {
                self.metrics
                    .gpu_process_memory_used
                    .get_or_create(&labels)
                    .set(b as i64);
            }
            if let Some(u) = p.sm_util {
                self.metrics
                    .gpu_process_sm_utilization
                    .get_or_create(&labels)
                    .set(f64::from(u) / 100.0);
            }
            series.insert(labels);
        }
        for labels in self.nvml_series.difference(&series) {
            self.metrics.gpu_process_memory_used.remove(labels);
            self.metrics.gpu_process_sm_utilization.remove(labels);
        }
        self.nvml_series = series;
        self.publish_overheads();
    }

    /// `gpu_process_memory_overhead_bytes` for processes both views know.
    fn publish_overheads(&mut self) {
        let mut now = HashSet::new();
        for (pid, gpus) in &self.nvml {
            let Some(p) = self.ledger.process(*pid) else {
                continue;
            };
            for (gpu, bytes) in gpus {
                let Some(bytes) = bytes else { continue };
                let ledger = p.device_bytes().get(&(*gpu as i32)).copied().unwrap_or(0);
                let labels = ProcessGpuLabels {
                    pid: *pid,
                    comm: p.comm.clone(),
                    gpu: *gpu as i32,
                    workload: self.workload_of(*pid),
                };
                self.metrics
                    .gpu_process_memory_overhead
                    .get_or_create(&labels)
                    .set(*bytes as i64 - ledger as i64);
                now.insert(labels);
            }
        }
        for gone in self.overhead_series.difference(&now) {
            self.metrics.gpu_process_memory_overhead.remove(gone);
        }
        self.overhead_series = now;
    }

    /// Drops ledgers of processes that are gone but whose exit event was lost.
    pub fn sweep(&mut self) {
        let gone: Vec<u32> = self
            .ledger
            .processes()
            .map(|(tgid, _)| tgid)
            .filter(|tgid| !self.procfs.alive(*tgid))
            .collect();
        for tgid in gone {
            self.exit(tgid);
        }
        self.relabel();
    }
}

fn comm_label(procfs: &ProcFs, tgid: u32, max: usize) -> String {
    let mut comm = procfs.comm(tgid).unwrap_or_else(|| "unknown".into());
    if comm.len() > max {
        let mut cut = max;
        while !comm.is_char_boundary(cut) {
            cut -= 1;
        }
        comm.truncate(cut);
    }
    comm
}

/// Runs until the ingest side closes the channel, then returns the tracker (drained). Beats
/// `heartbeat` at least once a second, idle or not.
pub async fn run(
    mut tracker: Tracker,
    mut rx: crate::queue::Receiver<Input>,
    heartbeat: crate::health::Heartbeat,
) -> Tracker {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut timeline = tokio::time::interval(Duration::from_secs(1));
    timeline.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        heartbeat.beat();
        tokio::select! {
            input = rx.recv() => match input {
                Some(input) => tracker.input(input),
                None => {
                    heartbeat.done();
                    return tracker;
                }
            },
            _ = sweep.tick() => tracker.sweep(),
            _ = timeline.tick() => tracker.record_timeline(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(tgid: u32, api: CudaApi, ptr: u64, size: u64, result: u32) -> Event {
        let mut e = CudaMemEvent::default();
        e.header.tgid = tgid;
        e.api = api as u32;
        e.ptr = ptr;
        e.size = size;
        e.result = result;
        e.duration_ns = 1500;
        Event::CudaMem(e)
    }

    /// A tracker over an empty proc tree (the directory lives as long as the tuple).
    fn tracker() -> (Arc<TrackMetrics>, tempfile::TempDir, Tracker) {
        let metrics = TrackMetrics::new(&Arc::new(crate::metrics::Metrics::new()));
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::new(
            metrics.clone(),
            ProcFs::new(dir.path()),
            &LimitsConfig::default(),
            Arc::new(GpuHistory::new(600)),
        );
        (metrics, dir, t)
    }

    #[test]
    fn metrics_follow_the_events() {
        let (metrics, _dir, mut t) = tracker();
        t.handle(&event(7, CudaApi::MemAlloc, 0x10, 1000, 0));
        t.handle(&event(7, CudaApi::MemAlloc, 0, 5000, 2));
        t.handle(&event(7, CudaApi::MemAlloc, 0, 0, 777));
        t.handle(&event(7, CudaApi::MemFree, 0x99, 0, 0));
        let text = metrics.core.encode();
        for line in [
            "gpu_cuda_alloc_calls_total{api=\"cuMemAlloc_v2\"} 3",
            "gpu_cuda_alloc_bytes_total{api=\"cuMemAlloc_v2\"} 1000",
            "gpu_cuda_alloc_failures_total{api=\"cuMemAlloc_v2\",error=\"out_of_memory\"} 1",
            "gpu_cuda_alloc_failures_total{api=\"cuMemAlloc_v2\",error=\"other\"} 1",
            "gpu_cuda_unknown_frees_total{api=\"cuMemFree_v2\"} 1",
            "gpu_process_memory_allocated_bytes{pid=\"7\",comm=\"unknown\",gpu=\"0\"} 1000",
            "inferscope_events_total{source=\"cuda\"} 4",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // The process is not in the (empty) proc tree: the sweep releases it.
        t.sweep();
        assert!(t.ledger().is_empty());
        assert!(!metrics
            .core
            .encode()
            .contains("gpu_process_memory_allocated_bytes{"));
    }

    #[test]
    fn result_codes_the_driver_does_not_define_share_one_label() {
        let (metrics, _dir, mut t) = tracker();
        for code in 1000..1300 {
            t.handle(&event(7, CudaApi::MemAlloc, 0, 4096, code));
        }
        t.handle(&event(7, CudaApi::MemAlloc, 0, 1 << 30, 2));
        t.handle(&event(7, CudaApi::MemFree, 0x99, 0, 9999));
        let text = metrics.core.encode();
        let failures: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("gpu_cuda_alloc_failures_total{"))
            .collect();
        for line in [
            "gpu_cuda_alloc_failures_total{api=\"cuMemAlloc_v2\",error=\"other\"} 300",
            "gpu_cuda_alloc_failures_total{api=\"cuMemAlloc_v2\",error=\"out_of_memory\"} 1",
        ] {
            assert!(failures.contains(&line), "missing {line:?} in\n{text}");
        }
        assert_eq!(failures.len(), 2, "{text}");
        assert!(
            text.contains("gpu_cuda_free_failures_total{api=\"cuMemFree_v2\",error=\"other\"} 1")
        );
        assert!(text.contains(
            "inferscope_dropped_total{what=\"error_label\",reason=\"unknown_code\"} 301"
        ));
        // One log line for all the unknown codes of a process and API, one for the OOM.
        assert_eq!(t.logged_failures.len(), 3);
    }

    #[test]
    fn a_device_nvml_does_not_list_is_gpu_minus_one() {
        let metrics = TrackMetrics::new(&Arc::new(crate::metrics::Metrics::new()));
        let dir = tempfile::tempdir().unwrap();
        let history = Arc::new(GpuHistory::new(600));
        let mut t = Tracker::new(
            metrics.clone(),
            ProcFs::new(dir.path()),
            &LimitsConfig::default(),
            history.clone(),
        );
        // Without NVML the ordinal is taken as it comes.
        let on = |device: i32, ptr: u64, api: CudaApi, size: u64| {
            let Event::CudaMem(mut e) = event(7, api, ptr, size, 0) else {
                unreachable!()
            };
            e.device = device;
            Event::CudaMem(e)
        };
        t.handle(&on(5, 0x10, CudaApi::MemAlloc, 100));
        assert!(metrics.core.encode().contains("gpu=\"5\"} 100"));
        t.exit(7);
        // NVML lists GPUs 0 and 1: ordinals 2 and beyond, or negative, name no device.
        history.set_identity(0, "GPU-a".into(), "H100".into());
        history.set_identity(1, "GPU-b".into(), "H100".into());
        for (i, device) in [0, 1, 2, 7, 4096, -5].into_iter().enumerate() {
            t.handle(&on(device, 0x100 + i as u64, CudaApi::MemAlloc, 10));
        }
        let text = metrics.core.encode();
        for line in [
            "gpu_process_memory_allocated_bytes{pid=\"7\",comm=\"unknown\",gpu=\"0\"} 10",
            "gpu_process_memory_allocated_bytes{pid=\"7\",comm=\"unknown\",gpu=\"1\"} 10",
            "gpu_process_memory_allocated_bytes{pid=\"7\",comm=\"unknown\",gpu=\"-1\"} 40",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        let series = |text: &str| {
            text.lines()
                .filter(|l| l.starts_with("gpu_process_memory_allocated_bytes{"))
                .count()
        };
        assert_eq!(series(&text), 3, "{text}");
        assert!(text
            .contains("inferscope_dropped_total{what=\"gpu_label\",reason=\"unknown_device\"} 4"));
        // A free finds the allocation where it was put.
        t.handle(&on(0, 0x103, CudaApi::MemFree, 0));
        assert!(metrics.core.encode().contains("gpu=\"-1\"} 30"));
    }

    #[test]
    fn ledger_meets_nvml_and_failures_carry_the_gpu_state() {
        use crate::gpu::GpuProcess;
        let metrics = TrackMetrics::new(&Arc::new(crate::metrics::Metrics::new()));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("7")).unwrap();
        std::fs::write(dir.path().join("7/comm"), "vllm\n").unwrap();
        let history = Arc::new(GpuHistory::new(600));
        let mut t = Tracker::new(
            metrics.clone(),
            ProcFs::new(dir.path()),
            &LimitsConfig::default(),
            history.clone(),
        );
        // NVML sees pid 7 on GPU 1 only, with its context overhead.
        t.input(Input::GpuProcesses(GpuProcesses {
            ts_ns: 1,
            entries: vec![GpuProcess {
                pid: 7,
                gpu: 1,
                used_bytes: Some(5000),
                sm_util: Some(40),
            }],
        }));
        // An allocation from a context the probes never saw created: device unknown → GPU 1.
        let Event::CudaMem(mut e) = event(7, CudaApi::MemAlloc, 0x10, 1000, 0) else {
            unreachable!()
        };
        e.flags = FLAG_DEVICE_UNKNOWN;
        t.handle(&Event::CudaMem(e));
        t.input(Input::GpuProcesses(GpuProcesses {
            ts_ns: 2,
            entries: vec![GpuProcess {
                pid: 7,
                gpu: 1,
                used_bytes: Some(5000),
                sm_util: None,
            }],
        }));
        let text = metrics.core.encode();
        for line in [
            "gpu_process_memory_allocated_bytes{pid=\"7\",comm=\"vllm\",gpu=\"1\"} 1000",
            "gpu_process_memory_used_bytes{pid=\"7\",gpu=\"1\"} 5000",
            "gpu_process_memory_overhead_bytes{pid=\"7\",comm=\"vllm\",gpu=\"1\"} 4000",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // The GPU's state at the failure's instant is attached to it.
        for (ts, util) in [(100, 10), (200, 87), (300, 5)] {
            history.push(GpuSample {
                gpu: 1,
                ts_ns: ts,
                utilization: Some(util),
                ..Default::default()
            });
        }
        let Event::CudaMem(mut e) = event(7, CudaApi::MemAlloc, 0, 1 << 30, 2) else {
            unreachable!()
        };
        e.device = 1;
        e.header.ts_ns = 250;
        t.handle(&Event::CudaMem(e));
        let f = t.recent_failures().last().unwrap();
        assert_eq!(f.gpu_state.as_ref().unwrap().utilization, Some(87));
        assert_eq!(f.comm, "vllm");
        // The process leaves NVML's list: its NVML series go.
        t.input(Input::GpuProcesses(GpuProcesses::default()));
        let text = metrics.core.encode();
        assert!(!text.contains("gpu_process_memory_used_bytes{"), "{text}");
        assert!(
            !text.contains("gpu_process_memory_overhead_bytes{"),
            "{text}"
        );
    }
}

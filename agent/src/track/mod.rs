//! The tracker: the one owner of per-process state. Applies decoded events to the ledger and
//! keeps the exported counters and gauges in step with it.

pub mod ledger;

use std::{collections::HashSet, sync::Arc, time::Duration};

use agent_common::cuda::{CudaApi, CudaMemEvent, Role};
use tokio::sync::mpsc;

use crate::{
    cuda_error,
    export::metrics::{
        ApiErrorLabels, ApiLabels, Metrics, ProcessGpuLabels, ProcessLabels, SourceLabels,
    },
    ingest::{Batch, Event},
    proc::ProcFs,
};
use ledger::{Ledger, Outcome};

/// How often the ledgers of processes whose exit was missed are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

pub struct Tracker {
    ledger: Ledger,
    metrics: Arc<Metrics>,
    procfs: ProcFs,
    max_label_len: usize,
    /// (tgid, api, CUresult) already logged: one line per kind of failure per process.
    logged_failures: HashSet<(u32, u32, u32)>,
}

impl Tracker {
    pub fn new(
        metrics: Arc<Metrics>,
        procfs: ProcFs,
        limits: &crate::config::LimitsConfig,
    ) -> Self {
        Self {
            ledger: Ledger::new(limits.max_processes, limits.max_allocations_per_process),
            metrics,
            procfs,
            max_label_len: limits.max_label_len,
            logged_failures: HashSet::new(),
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn handle(&mut self, ev: &Event) {
        self.metrics
            .events
            .get_or_create(&SourceLabels {
                source: ev.source(),
            })
            .inc();
        match ev {
            Event::CudaMem(e) => self.cuda(e),
            Event::ProcessExit(e) => self.exit(e.header.tgid),
        }
    }

    fn cuda(&mut self, e: &CudaMemEvent) {
        let Some(api) = CudaApi::from_u32(e.api) else {
            self.metrics.drop_reason("unknown_api");
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
            let error = cuda_error::name(e.result).into_owned();
            let family = if release {
                &m.cuda_free_failures
            } else {
                &m.cuda_alloc_failures
            };
            family
                .get_or_create(&ApiErrorLabels {
                    api: api.symbol(),
                    error: error.clone(),
                })
                .inc();
            self.log_failure(e, api, &error);
        }

        let (procfs, max) = (&self.procfs, self.max_label_len);
        let outcome = self
            .ledger
            .apply(e, api, || comm_label(procfs, e.header.tgid, max));
        match outcome {
            Outcome::Device { device } => self.publish_device(e.header.tgid, device),
            Outcome::Host => self.publish_host(e.header.tgid),
            Outcome::UnknownFree => {
                self.metrics.cuda_unknown_frees.get_or_create(&labels).inc();
            }
            Outcome::ProcessLimit => self.metrics.drop_reason("process_limit"),
            Outcome::AllocationLimit => self.metrics.drop_reason("allocation_limit"),
            Outcome::Range | Outcome::Failed => {}
        }
        self.metrics.tracked_processes.set(self.ledger.len() as i64);
    }

    fn log_failure(&mut self, e: &CudaMemEvent, api: CudaApi, error: &str) {
        if !self
            .logged_failures
            .insert((e.header.tgid, e.api, e.result))
        {
            return;
        }
        let comm = self
            .ledger
            .process(e.header.tgid)
            .map(|p| p.comm.clone())
            .unwrap_or_else(|| comm_label(&self.procfs, e.header.tgid, self.max_label_len));
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
            })
            .set(p.host_bytes() as i64);
    }

    /// Releases a process's ledger and its series.
    pub fn exit(&mut self, tgid: u32) {
        self.logged_failures.retain(|(t, _, _)| *t != tgid);
        let Some(p) = self.ledger.remove(tgid) else {
            return;
        };
        for device in p.device_bytes().keys() {
            let labels = ProcessGpuLabels {
                pid: tgid,
                comm: p.comm.clone(),
                gpu: *device,
            };
            self.metrics.process_memory_allocated.remove(&labels);
            self.metrics.process_allocations.remove(&labels);
        }
        self.metrics.process_host_pinned.remove(&ProcessLabels {
            pid: tgid,
            comm: p.comm.clone(),
        });
        self.metrics.tracked_processes.set(self.ledger.len() as i64);
        tracing::debug!(pid = tgid, comm = p.comm, "process exited, ledger released");
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

/// Runs until the ingest side closes the channel, then returns the tracker (drained).
pub async fn run(mut tracker: Tracker, mut rx: mpsc::Receiver<Batch>) -> Tracker {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => batch.iter().for_each(|ev| tracker.handle(ev)),
                None => return tracker,
            },
            _ = sweep.tick() => tracker.sweep(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;

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

    #[test]
    fn metrics_follow_the_events() {
        let metrics = Arc::new(Metrics::new());
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tracker::new(
            metrics.clone(),
            ProcFs::new(dir.path()),
            &LimitsConfig::default(),
        );
        t.handle(&event(7, CudaApi::MemAlloc, 0x10, 1000, 0));
        t.handle(&event(7, CudaApi::MemAlloc, 0, 5000, 2));
        t.handle(&event(7, CudaApi::MemAlloc, 0, 0, 777));
        t.handle(&event(7, CudaApi::MemFree, 0x99, 0, 0));
        let text = metrics.encode();
        for line in [
            "gpu_cuda_alloc_calls_total{api=\"cuMemAlloc_v2\"} 3",
            "gpu_cuda_alloc_bytes_total{api=\"cuMemAlloc_v2\"} 1000",
            "gpu_cuda_alloc_failures_total{api=\"cuMemAlloc_v2\",error=\"out_of_memory\"} 1",
            "gpu_cuda_alloc_failures_total{api=\"cuMemAlloc_v2\",error=\"code_777\"} 1",
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
            .encode()
            .contains("gpu_process_memory_allocated_bytes{"));
    }
}

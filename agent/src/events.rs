//! What the stages tell the log exporter, as plain data: a CUDA call that failed, an XID
//! error, a forensic report written. Producers fill these in (owned, no prompt text, secrets
//! already masked) and offer them without waiting; `crate::export::otlp::logs` turns them into
//! log records. They sit below every stage so that producers and exporter need not know each
//! other: the tracker, the NVML event thread and the forensics writer import this, the
//! exporter imports this, and neither side imports the other.

use std::{collections::HashMap, path::PathBuf};

use prometheus_client::metrics::counter::Counter;

use crate::queue::{Sender, Weigh};

/// One thing worth a log record.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    AllocFailed(AllocFailed),
    Xid(XidError),
    Report(ReportWritten),
}

/// A failed CUDA driver call.
#[derive(Clone, Debug, PartialEq)]
pub struct AllocFailed {
    pub time_unix_nano: u64,
    pub pid: u32,
    pub comm: String,
    /// The driver's symbol (`cuMemAlloc_v2`).
    pub api: &'static str,
    /// The `CUresult` name (`out_of_memory`).
    pub error: String,
    pub size: u64,
    pub device: i32,
}

/// An XID critical error NVML reported.
#[derive(Clone, Debug, PartialEq)]
pub struct XidError {
    pub time_unix_nano: u64,
    pub gpu: u32,
    pub uuid: String,
    pub xid: u64,
}

/// A forensic report, as written (or kept in memory when writing failed).
#[derive(Clone, Debug, PartialEq)]
pub struct ReportWritten {
    pub time_unix_nano: u64,
    pub id: String,
    /// The report kind as its `kind` label says it (`cuda`, `host_oom_kill`,
    /// `gpu_process_crash`, `xid`).
    pub kind: &'static str,
    pub pid: u32,
    pub comm: String,
    pub gpu: Option<u32>,
    pub xid: Option<u64>,
    /// Where it was stored; `None` when it could not be.
    pub path: Option<PathBuf>,
    pub summary: String,
}

impl Weigh for Notice {
    fn weight(&self) -> usize {
        size_of::<Self>()
            + match self {
                Notice::AllocFailed(f) => f.comm.capacity() + f.error.capacity(),
                Notice::Xid(x) => x.uuid.capacity(),
                Notice::Report(r) => {
                    r.id.capacity()
                        + r.comm.capacity()
                        + r.summary.capacity()
                        + r.path.as_ref().map_or(0, |p| p.as_os_str().len())
                }
            }
    }
}

pub fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// At most `per_sec` notices per process per second; the rest are counted as dropped. A
/// process failing every call in a loop would otherwise fill the log queue for everyone.
pub struct RateLimited {
    sink: Sender<Notice>,
    per_sec: u32,
    /// pid → (second, notices sent in it).
    windows: HashMap<u32, (u64, u32)>,
    dropped: Counter,
}

impl RateLimited {
    pub fn new(sink: Sender<Notice>, per_sec: u32, dropped: Counter) -> Self {
        Self {
            sink,
            per_sec,
            windows: HashMap::new(),
            dropped,
        }
    }

    /// Offers a notice for `pid` at `now_ns` (any monotonic clock); `make` runs only when
    /// the notice is within the rate.
    pub fn offer(&mut self, pid: u32, now_ns: u64, make: impl FnOnce() -> Notice) {
        let second = now_ns / 1_000_000_000;
        if self.windows.len() > 4096 {
            self.windows.retain(|_, (s, _)| *s == second);
        }
        let w = self.windows.entry(pid).or_insert((second, 0));
        if w.0 != second {
            *w = (second, 0);
        }
        if w.1 >= self.per_sec {
            self.dropped.inc();
            return;
        }
        w.1 += 1;
        self.sink.offer(make());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_failures_are_rate_limited_per_process() {
        let dropped = Counter::default();
        let (sink, rx) = crate::queue::with_items(1 << 20, 100, Counter::default());
        let mut r = RateLimited::new(sink, 2, dropped.clone());
        let f = |pid| {
            Notice::AllocFailed(AllocFailed {
                time_unix_nano: 1,
                pid,
                comm: "python".into(),
                api: "cuMemAlloc_v2",
                error: "out_of_memory".into(),
                size: 1 << 20,
                device: 0,
            })
        };
        for i in 0..5 {
            r.offer(1, 1_000_000_000 + i, || f(1));
        }
        r.offer(2, 1_000_000_000, || f(2));
        r.offer(1, 2_000_000_000, || f(1));
        let mut pids = Vec::new();
        while let Ok(Notice::AllocFailed(n)) = rx.try_recv() {
            pids.push(n.pid);
        }
        assert_eq!(
            pids,
            [1, 1, 2, 1],
            "2 for pid 1, 1 for pid 2, 1 for pid 1 in the next second"
        );
        assert_eq!(dropped.get(), 3);
    }
}

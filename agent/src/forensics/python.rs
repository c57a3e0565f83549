//! The Python stacks of a process whose CUDA call failed, read out of its memory with py-spy
//! (as a library, through the SYS_PTRACE the agent holds): function, file and line of every
//! frame of every thread, the failing thread first. Local variables are never read: they may
//! hold prompts.
//!
//! Read where the call failed, not where the thread went next. A Python process with a CUDA
//! ledger is looked into ahead of any failure (the tracker names it, [`PythonHandle::seen`]):
//! once its interpreter is found, the process is *armed* (`CUDA_FREEZE`), and the CUDA return
//! probe stops it (`SIGSTOP`) at its next out-of-memory failure, as the call returns, before an
//! exception can unwind a frame. The stacks are read from the stopped process at once and it
//! is continued (a few ms; `inferscope_forensics_python_stopped_seconds`), then armed again no
//! sooner than `forensics.python_freeze_every_secs`. A failure in a process not armed (its
//! first failure came before its interpreter was found, or the freeze is off) is read when
//! its report is written, pausing the process only while the frames are copied, and the
//! report says how long after the failure that was.
//!
//! One thread owns the interpreters found. Finding one reads the process's binary and memory
//! (tens of ms, more for a large process) and runs on a thread of its own, so a stopped
//! process never waits for another's search. The freeze's record could be lost on the way
//! (a full queue): the service also looks at its armed processes every second, and one whose
//! arming the probe took is read and continued then.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};

use super::report::{PythonFrame, PythonStacks, PythonThread};
use crate::held::{Held, ProcessRef};

/// Interpreters kept found, at most (the oldest one found goes first); as many processes
/// armed.
const MAX_SPIES: usize = 32;
/// Processes waiting for their interpreter to be found.
const MAX_QUEUED: usize = 64;
/// Processes remembered as not Python.
const MAX_NOT_PYTHON: usize = 16384;
/// Requests waiting for the service.
const QUEUE: usize = 256;
/// How long a report waits for its stacks (a first search included).
const READ_WAIT: Duration = Duration::from_secs(5);
/// How long a frozen process is waited for to show as stopped.
const STOP_WAIT: Duration = Duration::from_millis(50);
/// How often armed processes are looked at for a freeze whose record was lost.
const WATCHDOG: Duration = Duration::from_secs(1);
/// Stacks read in a freeze serve the report of a failure at most this long before them.
const FROZEN_FRESH_NS: u64 = 10_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct FrozenLabels {
    /// `record`: the probe's record reached the service; `watchdog`: it was lost and the
    /// service found the process stopped on its own.
    pub how: &'static str,
}

pub struct PythonMetrics {
    /// Processes armed to be stopped at their next out-of-memory failure.
    pub armed: Gauge,
    pub frozen: Family<FrozenLabels, Counter>,
    /// From the failing call's return to the process continued.
    pub stopped_seconds: Histogram,
}

impl PythonMetrics {
    pub fn new(core: &Arc<crate::metrics::Metrics>) -> Arc<Self> {
        let m = Self {
            armed: Gauge::default(),
            frozen: Family::default(),
            stopped_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14),
            ),
        };
        for how in ["record", "watchdog"] {
            let _ = m.frozen.get_or_create(&FrozenLabels { how });
        }
        core.register_with(|r| {
            r.register(
                "inferscope_forensics_python_armed",
                "Python processes whose interpreter is found and that the CUDA probe stops at their next out-of-memory failure, so that their Python stacks are read where the call failed (forensics.python_freeze)",
                m.armed.clone(),
            );
            r.register(
                "inferscope_forensics_python_frozen",
                "Python processes stopped at an out-of-memory failure and continued once their stacks were read, by how the agent learnt of it",
                m.frozen.clone(),
            );
            r.register(
                "inferscope_forensics_python_stopped_seconds",
                "How long a process stopped at an out-of-memory failure stayed stopped, from the failing call's return to its SIGCONT",
                m.stopped_seconds.clone(),
            );
        });
        Arc::new(m)
    }
}

pub struct Settings {
    /// Where the probe looks for armed processes; `None`: never stop one.
    pub freeze: Option<BpfHashMap<MapData, u32, u32>>,
    /// Least time between two stops of one process.
    pub every: Duration,
}

enum Ask {
    Seen(u32),
    Frozen {
        held: Held,
        tid: u32,
        failed_ns: u64,
    },
    Read {
        pid: u32,
        tid: u32,
        failed_ns: u64,
        reply: SyncSender<Option<PythonStacks>>,
    },
    Exit(u32),
    Found {
        pid: u32,
        started: u64,
        spy: Result<Box<py_spy::PythonSpy>, String>,
    },
    Stop,
}

/// Where the tracker and the forensics writer reach the service; it stops when the last
/// handle goes.
#[derive(Clone)]
pub struct PythonHandle(Arc<Sender>);

struct Sender {
    tx: SyncSender<Ask>,
    dropped: Counter,
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.tx.send(Ask::Stop);
    }
}

impl PythonHandle {
    fn offer(&self, ask: Ask) {
        if let Err(TrySendError::Full(_)) = self.0.tx.try_send(ask) {
            // A frozen process in it is continued as the request drops.
            self.0.dropped.inc();
        }
    }

    /// A process with a CUDA ledger: if it runs Python, its interpreter is found ahead.
    pub fn seen(&self, pid: u32) {
        self.offer(Ask::Seen(pid));
    }

    /// The CUDA probe stopped `pid` as its call on thread `tid` failed at `failed_ns`
    /// (`FLAG_FROZEN`): its stacks are read, then it is continued.
    pub fn frozen(&self, pid: u32, tid: u32, failed_ns: u64) {
        self.offer(Ask::Frozen {
            held: Held::new(pid),
            tid,
            failed_ns,
        });
    }

    pub fn exit(&self, pid: u32) {
        self.offer(Ask::Exit(pid));
    }

    /// The Python stacks of `pid` for its failure on thread `tid` at `failed_ns`
    /// (CLOCK_MONOTONIC): those read while a freeze held it, else read now; `None` when it
    /// is not a Python process (or the service did not answer in time).
    pub fn stacks(&self, pid: u32, tid: u32, failed_ns: u64) -> Option<PythonStacks> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.offer(Ask::Read {
            pid,
            tid,
            failed_ns,
            reply,
        });
        answer.recv_timeout(READ_WAIT).ok().flatten()
    }
}

impl crate::track::ProcessNotes for PythonHandle {
    fn seen(&self, pid: u32) {
        PythonHandle::seen(self, pid);
    }

    fn frozen(&self, pid: u32, tid: u32, ts_ns: u64) {
        PythonHandle::frozen(self, pid, tid, ts_ns);
    }

    fn exit(&self, pid: u32) {
        PythonHandle::exit(self, pid);
    }
}

/// Starts the service's thread.
pub fn start(
    procfs: crate::proc::ProcFs,
    settings: Settings,
    metrics: Arc<PythonMetrics>,
    dropped: Counter,
) -> std::io::Result<(PythonHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let service = Service {
        procfs,
        tx: tx.clone(),
        settings,
        metrics,
        spies: HashMap::new(),
        order: VecDeque::new(),
        finding: None,
        queued: VecDeque::new(),
        waiting: Vec::new(),
        armed: HashMap::new(),
        rearm: Vec::new(),
        frozen: HashMap::new(),
        not_python: HashSet::new(),
    };
    let thread = std::thread::Builder::new()
        .name("python-stacks".into())
        .spawn(move || service.run(rx))?;
    Ok((PythonHandle(Arc::new(Sender { tx, dropped })), thread))
}

struct Spy {
    /// The process's start time: a pid reused by another process is found afresh.
    started: u64,
    spy: Box<py_spy::PythonSpy>,
}

/// Stacks read while a freeze held the process (continued as soon as they were read).
struct FrozenRead {
    read_ns: u64,
    result: Result<Vec<PythonThread>, String>,
}

struct Service {
    procfs: crate::proc::ProcFs,
    /// For the finders' answers.
    tx: SyncSender<Ask>,
    settings: Settings,
    metrics: Arc<PythonMetrics>,
    spies: HashMap<u32, Spy>,
    order: VecDeque<u32>,
    /// The process whose interpreter a finder thread is looking for.
    finding: Option<u32>,
    queued: VecDeque<u32>,
    /// Reports waiting for a search to end.
    waiting: Vec<(u32, u32, u64, SyncSender<Option<PythonStacks>>)>,
    armed: HashMap<u32, ProcessRef>,
    /// (when, pid): to arm again.
    rearm: Vec<(Instant, u32)>,
    frozen: HashMap<u32, FrozenRead>,
    /// Processes seen not to run Python (their exit forgets them).
    not_python: HashSet<u32>,
}

/// Whether `pid` runs a Python interpreter, from its executable's and its command's names (a
/// process that is not is not looked into).
fn is_python(procfs: &crate::proc::ProcFs, pid: u32) -> bool {
    let named = |s: &str| {
        let base = s.rsplit('/').next().unwrap_or(s);
        base.starts_with("python") || base.starts_with("pypy")
    };
    procfs.comm(pid).is_some_and(|c| named(&c))
        || crate::servers::argv(procfs, pid)
            .and_then(|a| a.first().cloned())
            .is_some_and(|a| named(&a))
}

impl Service {
    fn run(mut self, rx: Receiver<Ask>) {
        loop {
            let wait = self
                .next_tick()
                .map(|at| at.saturating_duration_since(Instant::now()));
            let ask = match wait {
                Some(wait) => rx.recv_timeout(wait),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match ask {
                Ok(Ask::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(ask) => self.handle(ask),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.tick();
        }
        // Nobody would read a process stopped from now on.
        for pid in self.armed.keys().copied().collect::<Vec<_>>() {
            self.disarm(pid);
        }
    }

    fn next_tick(&self) -> Option<Instant> {
        let rearm = self.rearm.iter().map(|(at, _)| *at).min();
        let watchdog = (!self.armed.is_empty()).then(|| Instant::now() + WATCHDOG);
        match (rearm, watchdog) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn handle(&mut self, ask: Ask) {
        match ask {
            Ask::Seen(pid) => self.seen(pid),
            Ask::Frozen {
                held,
                tid,
                failed_ns,
            } => self.frozen(held, tid, failed_ns, "record"),
            Ask::Read {
                pid,
                tid,
                failed_ns,
                reply,
            } => {
                if let Some(answer) = self.read(pid, tid, failed_ns) {
                    let _ = reply.send(answer);
                } else {
                    self.waiting.push((pid, tid, failed_ns, reply));
                    self.seen(pid);
                }
            }
            Ask::Exit(pid) => self.forget(pid),
            Ask::Found { pid, started, spy } => self.found(pid, started, spy),
            Ask::Stop => {}
        }
    }

    fn seen(&mut self, pid: u32) {
        if self.spies.contains_key(&pid)
            || self.finding == Some(pid)
            || self.queued.contains(&pid)
            || self.not_python.contains(&pid)
        {
            return;
        }
        if !is_python(&self.procfs, pid) {
            if self.not_python.len() < MAX_NOT_PYTHON {
                self.not_python.insert(pid);
            }
            self.answer_waiting(pid, || None);
            return;
        }
        if self.queued.len() >= MAX_QUEUED {
            self.answer_waiting(pid, || None);
            return;
        }
        self.queued.push_back(pid);
        self.find_next();
    }

    /// Starts a finder thread for the next queued process, if none runs.
    fn find_next(&mut self) {
        if self.finding.is_some() {
            return;
        }
        let Some(pid) = self.queued.pop_front() else {
            return;
        };
        let started = self.procfs.stat(pid).map(|s| s.starttime).unwrap_or(0);
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("python-find".into())
            .spawn(move || {
                let config = py_spy::Config {
                    blocking: py_spy::config::LockingStrategy::Lock,
                    include_idle: true,
                    dump_locals: 0,
                    native: false,
                    ..Default::default()
                };
                let spy = py_spy::PythonSpy::new(pid as py_spy::Pid, &config)
                    .map(Box::new)
                    .map_err(|e| format!("{e:#}"));
                let _ = tx.send(Ask::Found { pid, started, spy });
            });
        match spawned {
            Ok(_) => self.finding = Some(pid),
            Err(e) => self.answer_waiting(pid, || Some(failed(0, e.to_string()))),
        }
    }

    fn found(&mut self, pid: u32, started: u64, spy: Result<Box<py_spy::PythonSpy>, String>) {
        self.finding = None;
        match spy {
            Ok(spy) if self.procfs.stat(pid).map(|s| s.starttime) == Some(started) => {
                if self.order.len() >= MAX_SPIES {
                    if let Some(old) = self.order.pop_front() {
                        self.forget(old);
                    }
                }
                self.spies.insert(pid, Spy { started, spy });
                self.order.push_back(pid);
                self.arm(pid);
                let waiting: Vec<_> = self.take_waiting(pid);
                for (_, tid, failed_ns, reply) in waiting {
                    let answer = self.read(pid, tid, failed_ns).flatten();
                    let _ = reply.send(answer);
                }
            }
            Ok(_) => self.answer_waiting(pid, || None),
            Err(e) => {
                tracing::debug!(pid, error = e, "no Python interpreter found");
                self.answer_waiting(pid, || Some(failed(0, e.clone())));
            }
        }
        self.find_next();
    }

    fn take_waiting(&mut self, pid: u32) -> Vec<(u32, u32, u64, SyncSender<Option<PythonStacks>>)> {
        let (these, others) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.0 == pid);
        self.waiting = others;
        these
    }

    fn answer_waiting(&mut self, pid: u32, answer: impl Fn() -> Option<PythonStacks>) {
        for (_, _, failed_ns, reply) in self.take_waiting(pid) {
            let a = answer().map(|mut a| {
                a.read_ms_after_failure = ms_since(failed_ns);
                a
            });
            let _ = reply.send(a);
        }
    }

    fn arm(&mut self, pid: u32) {
        let Some(map) = self.settings.freeze.as_mut() else {
            return;
        };
        if self.armed.contains_key(&pid) || !self.spies.contains_key(&pid) {
            return;
        }
        // Named before it is armed: a pid reused after this is never signalled.
        let process = ProcessRef::new(pid);
        if map.insert(pid, 1, 0).is_ok() {
            self.armed.insert(pid, process);
            self.metrics.armed.set(self.armed.len() as i64);
        }
    }

    fn disarm(&mut self, pid: u32) {
        if self.armed.remove(&pid).is_some() {
            if let Some(map) = self.settings.freeze.as_mut() {
                let _ = map.remove(&pid);
            }
            self.metrics.armed.set(self.armed.len() as i64);
        }
    }

    /// Armed again when due; a process whose arming the probe took without its record
    /// reaching here is read and continued.
    fn tick(&mut self) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .rearm
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, pid)| *pid)
            .collect();
        self.rearm.retain(|(at, _)| *at > now);
        for pid in due {
            self.arm(pid);
        }
        let Some(map) = self.settings.freeze.as_ref() else {
            return;
        };
        let taken: Vec<u32> = self
            .armed
            .keys()
            .copied()
            .filter(|pid| matches!(map.get(pid, 0), Err(aya::maps::MapError::KeyNotFound)))
            .collect();
        for pid in taken {
            let Some(process) = self.armed.remove(&pid) else {
                continue;
            };
            self.metrics.armed.set(self.armed.len() as i64);
            if self.procfs.stat(pid).is_none() {
                // Exited: its exit removed the entry.
                continue;
            }
            // The failing thread is not known here: the report's request names it.
            self.frozen(process.held(), 0, crate::clock::monotonic_ns(), "watchdog");
        }
    }

    /// Reads a stopped process's stacks and continues it.
    fn frozen(&mut self, held: Held, tid: u32, failed_ns: u64, how: &'static str) {
        let pid = held.pid();
        let was_armed = self.armed.remove(&pid).is_some();
        self.metrics.armed.set(self.armed.len() as i64);
        if !was_armed
            && self
                .frozen
                .get(&pid)
                .is_some_and(|f| f.read_ns >= failed_ns)
        {
            // The watchdog got there first: continued already (once more is harmless).
            return;
        }
        let Some(spy) = self.spies.get_mut(&pid) else {
            drop(held);
            return;
        };
        if tid != 0 {
            let deadline = Instant::now() + STOP_WAIT;
            while self.procfs.thread_stopped(pid, tid) == Some(false) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        // Stopped already: nothing to lock, and a ptrace attach to a stopped process would
        // have to undo its stop.
        spy.spy.config.blocking = py_spy::config::LockingStrategy::NonBlocking;
        let traces = spy.spy.get_stack_traces();
        spy.spy.config.blocking = py_spy::config::LockingStrategy::Lock;
        let read_ns = crate::clock::monotonic_ns();
        held.release();
        let stopped_ms = ms_since(failed_ns);
        self.metrics
            .frozen
            .get_or_create(&FrozenLabels { how })
            .inc();
        if how == "record" {
            // The watchdog does not know when the process stopped.
            self.metrics.stopped_seconds.observe(stopped_ms / 1e3);
        }
        let result = match traces {
            Ok(t) => Ok(threads(t)),
            Err(e) => Err(format!("{e:#}")),
        };
        tracing::debug!(
            pid,
            stopped_ms,
            how,
            "process stopped at its failure continued"
        );
        self.frozen.insert(pid, FrozenRead { read_ns, result });
        self.rearm.push((Instant::now() + self.settings.every, pid));
    }

    /// The stacks for a report, if they can be had now: `Some(None)` for a process that is
    /// not Python, `None` when its interpreter must be found first.
    fn read(&mut self, pid: u32, tid: u32, failed_ns: u64) -> Option<Option<PythonStacks>> {
        if let Some(f) = self.frozen.remove(&pid) {
            if f.read_ns >= failed_ns && f.read_ns - failed_ns <= FROZEN_FRESH_NS {
                return Some(Some(stacks(
                    f.result,
                    tid,
                    (f.read_ns - failed_ns) as f64 / 1e6,
                    true,
                )));
            }
        }
        let started = self.procfs.stat(pid).map(|s| s.starttime).unwrap_or(0);
        if self.spies.get(&pid).is_some_and(|s| s.started != started) {
            self.forget(pid);
        }
        let Some(spy) = self.spies.get_mut(&pid) else {
            if self.not_python.contains(&pid) || !is_python(&self.procfs, pid) {
                return Some(None);
            }
            return None;
        };
        let traces = spy.spy.get_stack_traces();
        let after = ms_since(failed_ns);
        Some(Some(match traces {
            Ok(t) => stacks(Ok(threads(t)), tid, after, false),
            Err(e) => {
                self.forget(pid);
                failed(failed_ns, format!("{e:#}"))
            }
        }))
    }

    /// Forgets a process (it exited, or its pid was reused).
    fn forget(&mut self, pid: u32) {
        self.disarm(pid);
        self.spies.remove(&pid);
        self.order.retain(|p| *p != pid);
        self.frozen.remove(&pid);
        self.rearm.retain(|(_, p)| *p != pid);
        self.queued.retain(|p| *p != pid);
        self.not_python.remove(&pid);
    }
}

fn ms_since(ns: u64) -> f64 {
    crate::clock::monotonic_ns().saturating_sub(ns) as f64 / 1e6
}

fn threads(traces: Vec<py_spy::StackTrace>) -> Vec<PythonThread> {
    traces
        .into_iter()
        .map(|t| PythonThread {
            thread_id: t.thread_id,
            os_thread_id: t.os_thread_id,
            name: t.thread_name,
            failing: false,
            active: t.active,
            owns_gil: t.owns_gil,
            frames: t
                .frames
                .into_iter()
                .map(|f| PythonFrame {
                    function: f.name,
                    file: f.filename,
                    line: f.line,
                })
                .collect(),
        })
        .collect()
}

/// The report's section: the thread `tid` marked failing and first.
fn stacks(
    result: Result<Vec<PythonThread>, String>,
    tid: u32,
    read_ms_after_failure: f64,
    frozen: bool,
) -> PythonStacks {
    match result {
        Ok(mut threads) => {
            for t in &mut threads {
                t.failing = t.os_thread_id == Some(u64::from(tid));
            }
            threads.sort_by_key(|t| !t.failing);
            PythonStacks {
                read_ms_after_failure,
                frozen,
                threads,
                error: None,
            }
        }
        Err(error) => PythonStacks {
            read_ms_after_failure,
            frozen,
            threads: Vec::new(),
            error: Some(error),
        },
    }
}

fn failed(failed_ns: u64, error: String) -> PythonStacks {
    stacks(Err(error), 0, ms_since(failed_ns), false)
}

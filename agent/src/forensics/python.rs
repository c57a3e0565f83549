//! The Python stacks of a process whose CUDA call failed, read out of its memory with py-spy
//! (as a library, through the SYS_PTRACE the agent holds): function, file and line of every
//! frame of every thread, the failing thread first. The process is paused only while its
//! threads' frames are copied (py-spy's locking strategy: a few milliseconds); finding the
//! interpreter in a process the first time takes longer and runs while it goes on, so a
//! report says how long after the failure the stacks were read. Local variables are never
//! read: they may hold prompts.

use std::collections::HashMap;

use super::report::{PythonFrame, PythonStacks, PythonThread};

/// Interpreters kept found, at most (the oldest one found goes first).
const MAX_SPIES: usize = 32;

pub struct Python {
    procfs: crate::proc::ProcFs,
    /// pid → (the process's start time, its interpreter found): a pid reused by another
    /// process is found afresh.
    spies: HashMap<u32, (u64, py_spy::PythonSpy)>,
    order: Vec<u32>,
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

impl Python {
    pub fn new(procfs: crate::proc::ProcFs) -> Self {
        Self {
            procfs,
            spies: HashMap::new(),
            order: Vec::new(),
        }
    }

    /// The Python stacks of `pid` now, its thread `failing_tid` first; `None` when it is not
    /// a Python process. `failed_ns` is when the failing call returned (CLOCK_MONOTONIC).
    pub fn stacks(&mut self, pid: u32, failing_tid: u32, failed_ns: u64) -> Option<PythonStacks> {
        if !is_python(&self.procfs, pid) {
            return None;
        }
        let started = self.procfs.stat(pid).map(|s| s.starttime).unwrap_or(0);
        if self.spies.get(&pid).is_some_and(|(s, _)| *s != started) {
            self.forget(pid);
        }
        if !self.spies.contains_key(&pid) {
            let config = py_spy::Config {
                blocking: py_spy::config::LockingStrategy::Lock,
                include_idle: true,
                dump_locals: 0,
                native: false,
                ..Default::default()
            };
            match py_spy::PythonSpy::new(pid as py_spy::Pid, &config) {
                Ok(spy) => {
                    if self.order.len() >= MAX_SPIES {
                        let old = self.order.remove(0);
                        self.spies.remove(&old);
                    }
                    self.spies.insert(pid, (started, spy));
                    self.order.push(pid);
                }
                Err(e) => return Some(failed(failed_ns, format!("{e:#}"))),
            }
        }
        let (_, spy) = self.spies.get_mut(&pid)?;
        let traces = spy.get_stack_traces();
        let read_ns = crate::clock::monotonic_ns().saturating_sub(failed_ns);
        let traces = match traces {
            Ok(t) => t,
            Err(e) => {
                self.forget(pid);
                return Some(failed(failed_ns, format!("{e:#}")));
            }
        };
        let mut threads: Vec<PythonThread> = traces
            .into_iter()
            .map(|t| PythonThread {
                thread_id: t.thread_id,
                os_thread_id: t.os_thread_id,
                name: t.thread_name,
                failing: t.os_thread_id == Some(u64::from(failing_tid)),
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
            .collect();
        // The failing thread first.
        threads.sort_by_key(|t| !t.failing);
        Some(PythonStacks {
            read_ms_after_failure: read_ns as f64 / 1e6,
            threads,
            error: None,
        })
    }

    /// Forgets a process (it exited, or its pid was reused).
    pub fn forget(&mut self, pid: u32) {
        self.spies.remove(&pid);
        self.order.retain(|p| *p != pid);
    }
}

fn failed(failed_ns: u64, error: String) -> PythonStacks {
    PythonStacks {
        read_ms_after_failure: crate::clock::monotonic_ns().saturating_sub(failed_ns) as f64 / 1e6,
        threads: Vec::new(),
        error: Some(error),
    }
}

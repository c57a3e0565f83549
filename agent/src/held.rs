//! Processes the probes stopped (`SIGSTOP` from the program, `bpf_send_signal`) until the
//! agent has done what it stopped them for: the loader probe until a new driver is attached
//! (`probe/manager.rs`), a failing CUDA call until its Python stacks are read
//! (`forensics/python.rs`). Each is continued when its guard is released or dropped, whatever
//! happened in between, and addressed through a pidfd so that a pid reused meanwhile is never
//! signalled.
//!
//! The probes record each process they stop in the `STOPPED` map before they stop it. When the
//! agent leaves, it first turns the stops off (`STOPS_OFF`), and last continues every process
//! still recorded there ([`continue_all`]), even when a stage it was waiting for (a manager
//! busy attaching drivers, a held record still in a ring) never got to let its process go: an
//! agent restarted in a rollout never leaves a workload stopped.

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::OnceLock,
};

use aya::maps::{Array, HashMap as BpfHashMap, IterableMap, MapData};

/// The probes' `STOPPED` map and `CONFIG` array, as descriptors any thread can use.
struct Stops {
    stopped: OwnedFd,
    config: OwnedFd,
}

static STOPS: OnceLock<Stops> = OnceLock::new();

/// Hands over the loaded object's `STOPPED` map and `CONFIG` array (once, at load).
pub fn track(stopped: &MapData, config: &Array<MapData, u64>) {
    let dup = |m: &MapData| m.fd().as_fd().try_clone_to_owned().ok();
    if let (Some(stopped), Some(config)) = (dup(stopped), dup(config.map())) {
        let _ = STOPS.set(Stops { stopped, config });
    }
}

fn stopped_map() -> Option<BpfHashMap<MapData, u32, u32>> {
    let fd = STOPS.get()?.stopped.try_clone().ok()?;
    BpfHashMap::try_from(aya::maps::Map::HashMap(MapData::from_fd(fd).ok()?)).ok()
}

/// No probe stops a process from now on (the agent is leaving).
pub fn stops_off() {
    let Some(fd) = STOPS.get().and_then(|s| s.config.try_clone().ok()) else {
        return;
    };
    let config = MapData::from_fd(fd)
        .ok()
        .and_then(|d| Array::<MapData, u64>::try_from(aya::maps::Map::Array(d)).ok());
    if let Some(mut config) = config {
        if let Err(e) = config.set(agent_common::config::STOPS_OFF, 1, 0) {
            tracing::warn!(error = %e, "cannot turn the probes' process stops off");
        }
    }
}

/// Continues every process a probe stopped and nobody continued; returns how many.
pub fn continue_all() -> usize {
    let Some(map) = stopped_map() else {
        return 0;
    };
    let pids: Vec<u32> = map.keys().filter_map(Result::ok).collect();
    // Each guard continues its process and takes it out of the map as it drops.
    pids.iter().for_each(|&pid| drop(Held::new(pid)));
    pids.len()
}

/// The process was continued: no longer the agent's to continue.
fn forget(pid: u32) {
    if let Some(mut map) = stopped_map() {
        let _ = map.remove(&pid);
    }
}

/// A process named by a pidfd taken when it was named (falling back to its pid where pidfds
/// are refused).
pub struct ProcessRef {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl ProcessRef {
    pub fn new(pid: u32) -> Self {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: a descriptor the kernel just returned, owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        });
        Self { pid, pidfd }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process is stopped and this guard continues it.
    pub fn held(self) -> Held {
        Held(self)
    }

    fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        let sent = match &self.pidfd {
            // SAFETY: a valid pidfd, no siginfo, no flags.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    signal,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            },
            // No pidfd (the process is already gone, or pidfds are refused): by pid.
            // SAFETY: kill takes a pid and a signal.
            None => unsafe { libc::kill(self.pid as libc::pid_t, signal) }.into(),
        };
        if sent == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// A stopped process: continued (`SIGCONT`) when released or dropped.
pub struct Held(ProcessRef);

impl Held {
    pub fn new(pid: u32) -> Self {
        ProcessRef::new(pid).held()
    }

    pub fn pid(&self) -> u32 {
        self.0.pid
    }

    pub fn release(self) {}
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Err(e) = self.0.signal(libc::SIGCONT) {
            tracing::debug!(pid = self.0.pid, error = %e, "SIGCONT to a held process");
        }
        forget(self.0.pid);
    }
}

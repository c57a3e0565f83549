//! Processes the probes stopped (`SIGSTOP` from the program, `bpf_send_signal`) until the
//! agent has done what it stopped them for: the loader probe until a new driver is attached
//! (`probe/manager.rs`), a failing CUDA call until its Python stacks are read
//! (`forensics/python.rs`). Each is continued when its guard is released or dropped, whatever
//! happened in between, and addressed through a pidfd so that a pid reused meanwhile is never
//! signalled.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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
    }
}

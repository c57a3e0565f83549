//! The capabilities the agent holds, read once at start, so that a container short of one
//! says in one line which and what it costs, instead of a kernel `EPERM` from deep inside a
//! map creation or a discovery round that silently finds nothing.
//!
//! `CAP_SYS_ADMIN` covers `CAP_BPF` and `CAP_PERFMON` in the kernel (`bpf_capable()`,
//! `perfmon_capable()`), so each check accepts either.

use caps::{CapSet, Capability};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub bpf: bool,
    pub perfmon: bool,
    pub sys_admin: bool,
    pub sys_ptrace: bool,
    /// Signals to other users' processes: continuing a process held at its driver load.
    pub kill: bool,
}

/// A capability without which no probe can run: the agent does not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Missing {
    #[error("cannot load eBPF programs: the agent holds neither CAP_BPF nor CAP_SYS_ADMIN (add the BPF capability to its container, see docs/install.md)")]
    Bpf,
    #[error("cannot attach probes: the agent holds neither CAP_PERFMON nor CAP_SYS_ADMIN (add the PERFMON capability to its container, see docs/install.md)")]
    Perfmon,
}

impl Held {
    /// The effective set of this process; `None` when it cannot be read (then nothing is
    /// said in advance and the kernel's answers speak).
    pub fn current() -> Option<Held> {
        let set = caps::read(None, CapSet::Effective).ok()?;
        Some(Held {
            bpf: set.contains(&Capability::CAP_BPF),
            perfmon: set.contains(&Capability::CAP_PERFMON),
            sys_admin: set.contains(&Capability::CAP_SYS_ADMIN),
            sys_ptrace: set.contains(&Capability::CAP_SYS_PTRACE),
            kill: set.contains(&Capability::CAP_KILL),
        })
    }

    /// Every capability the agent's whole work needs.
    pub fn all() -> Held {
        Held {
            bpf: true,
            perfmon: true,
            sys_admin: true,
            sys_ptrace: true,
            kill: true,
        }
    }

    /// The first capability without which nothing can be probed.
    pub fn required(&self) -> Result<(), Missing> {
        if !(self.bpf || self.sys_admin) {
            return Err(Missing::Bpf);
        }
        if !(self.perfmon || self.sys_admin) {
            return Err(Missing::Perfmon);
        }
        Ok(())
    }

    /// Whether a process held at its driver load can be continued whoever runs it.
    pub fn may_hold(&self) -> bool {
        self.kill
    }

    /// What runs short for want of a capability that is not required: the family that loses
    /// part of its work, and what it loses. (`CAP_SYS_ADMIN`'s share, uprobes and mounting
    /// tracefs, is said by the families themselves, from the kernel's answer: older kernels
    /// do not need it.)
    pub fn shortfalls(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if !self.sys_ptrace {
            out.push((
                "cuda",
                "no CAP_SYS_PTRACE: the maps and libraries of a process that holds a capability \
                 the agent lacks (a server running as root in a container) cannot be read, so \
                 its CUDA calls are not probed",
            ));
        }
        if !self.kill {
            out.push((
                "cuda",
                "no CAP_KILL: a process that loads a CUDA driver is not held until its probes \
                 are attached (the agent could not continue another user's process), so its \
                 first calls may go uncounted",
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_stands_for_bpf_and_perfmon() {
        let only_admin = Held {
            bpf: false,
            perfmon: false,
            sys_admin: true,
            sys_ptrace: true,
            kill: true,
        };
        assert_eq!(only_admin.required(), Ok(()));
        let chart_without_admin = Held {
            sys_admin: false,
            ..Held::all()
        };
        assert_eq!(chart_without_admin.required(), Ok(()));
    }

    #[test]
    fn a_missing_required_capability_is_named() {
        let no_bpf = Held {
            bpf: false,
            sys_admin: false,
            ..Held::all()
        };
        assert_eq!(no_bpf.required(), Err(Missing::Bpf));
        assert!(Missing::Bpf.to_string().contains("CAP_BPF"));
        let no_perfmon = Held {
            perfmon: false,
            sys_admin: false,
            ..Held::all()
        };
        assert_eq!(no_perfmon.required(), Err(Missing::Perfmon));
        assert!(Missing::Perfmon.to_string().contains("CAP_PERFMON"));
    }

    #[test]
    fn without_sys_ptrace_cuda_discovery_is_short() {
        assert!(Held::all().shortfalls().is_empty());
        let held = Held {
            sys_ptrace: false,
            ..Held::all()
        };
        let short = held.shortfalls();
        assert_eq!(short.len(), 1);
        assert_eq!(short[0].0, "cuda");
        assert!(short[0].1.starts_with("no CAP_SYS_PTRACE"));
        let no_kill = Held {
            kill: false,
            ..Held::all()
        };
        assert!(no_kill.shortfalls()[0].1.starts_with("no CAP_KILL"));
        assert!(!no_kill.may_hold());
        assert!(Held::all().may_hold());
    }
}

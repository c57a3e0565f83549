//! The seccomp profile the DaemonSet runs the agent under, in the format of a Kubernetes
//! `Localhost` profile (also the OCI runtime spec's `linux.seccomp`): `inferscope
//! seccomp-profile` prints it, and the chart's init container installs it on the node.
//!
//! It is an allowlist, narrower than the runtimes' `RuntimeDefault` once that is combined with
//! `CAP_SYS_ADMIN` (which opens `unshare`, namespace-creating `clone`, the new mount API,
//! `sethostname`, ...): the calls an ordinary multi-threaded Rust and glibc program makes,
//! what `dlopen`ed NVML needs, and the five calls that are the agent's job. Everything else
//! fails with `EPERM`; a call the kernel does not know on an architecture is left out by the
//! runtime.

use std::{io, path::Path};

use serde_json::{json, Value};

/// A set of calls allowed for one reason.
struct Allowed {
    why: &'static str,
    names: &'static [&'static str],
}

/// The agent's own work: what `RuntimeDefault` refuses a container unless it holds
/// `CAP_SYS_ADMIN` (and, in newer runtimes, `CAP_BPF` / `CAP_PERFMON`).
const AGENT: &[Allowed] = &[
    Allowed {
        why: "load the eBPF programs, create and read their maps and ring buffers",
        names: &["bpf"],
    },
    Allowed {
        why: "attach tracepoints and uprobes",
        names: &["perf_event_open"],
    },
    Allowed {
        why: "mount tracefs where the node has not (and nothing else: the mount is private to the container)",
        names: &["mount", "umount2"],
    },
    Allowed {
        why: "scrape a server that listens on loopback only, from inside its network namespace",
        names: &["setns"],
    },
    Allowed {
        why: "read the Python stacks of a process whose CUDA call failed (forensics.python_stacks): pause its threads for the few ms of the copy, read its interpreter's memory",
        names: &["ptrace", "process_vm_readv"],
    },
];

/// What any threaded program of the agent's kind makes, by area.
const ORDINARY: &[Allowed] = &[
    Allowed {
        why: "memory",
        names: &[
            "brk",
            "mmap",
            "mmap2",
            "munmap",
            "mremap",
            "mprotect",
            "madvise",
            "mincore",
            "mlock",
            "munlock",
            "membarrier",
        ],
    },
    Allowed {
        why: "threads and synchronization",
        names: &[
            "futex",
            "futex_time64",
            "futex_waitv",
            "set_robust_list",
            "get_robust_list",
            "set_tid_address",
            "rseq",
            "sched_yield",
            "sched_getaffinity",
            "sched_setaffinity",
            "sched_getparam",
            "sched_getscheduler",
            "sched_get_priority_max",
            "sched_get_priority_min",
            "gettid",
            "arch_prctl",
            "set_thread_area",
            "get_thread_area",
            "set_tls",
            "prctl",
            "getcpu",
        ],
    },
    Allowed {
        why: "process identity and limits",
        names: &[
            "getpid",
            "getppid",
            "getuid",
            "geteuid",
            "getgid",
            "getegid",
            "getresuid",
            "getresgid",
            "getgroups",
            "getpgid",
            "getpgrp",
            "getsid",
            "capget",
            "getrlimit",
            "setrlimit",
            "prlimit64",
            "ugetrlimit",
            "getrusage",
            "times",
            "uname",
            "sysinfo",
            "getpriority",
            "umask",
        ],
    },
    Allowed {
        why: "signals",
        names: &[
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "rt_sigpending",
            "rt_sigsuspend",
            "rt_sigtimedwait",
            "rt_sigtimedwait_time64",
            "rt_sigqueueinfo",
            "rt_tgsigqueueinfo",
            "sigaltstack",
            "sigreturn",
            "kill",
            // Continuing a process held at its driver load, by a handle that outlives its pid.
            "pidfd_open",
            "pidfd_send_signal",
            "tgkill",
            "tkill",
            "restart_syscall",
            "pause",
            "signalfd4",
        ],
    },
    Allowed {
        why: "time and sleeping",
        names: &[
            "clock_gettime",
            "clock_gettime64",
            "clock_getres",
            "clock_getres_time64",
            "clock_nanosleep",
            "clock_nanosleep_time64",
            "nanosleep",
            "gettimeofday",
            "time",
            "timerfd_create",
            "timerfd_settime",
            "timerfd_settime64",
            "timerfd_gettime",
            "timerfd_gettime64",
        ],
    },
    Allowed {
        why: "files: the config, /proc, /sys, the servers' libraries, forensic reports",
        names: &[
            "open",
            "openat",
            "openat2",
            "close",
            "close_range",
            "read",
            "readv",
            "pread64",
            "preadv",
            "preadv2",
            "write",
            "writev",
            "pwrite64",
            "pwritev",
            "pwritev2",
            "lseek",
            "_llseek",
            "stat",
            "stat64",
            "lstat",
            "lstat64",
            "fstat",
            "fstat64",
            "newfstatat",
            "fstatat64",
            "statx",
            "statfs",
            "statfs64",
            "fstatfs",
            "fstatfs64",
            "access",
            "faccessat",
            "faccessat2",
            "readlink",
            "readlinkat",
            "getdents",
            "getdents64",
            "getcwd",
            "chdir",
            "fchdir",
            "mkdir",
            "mkdirat",
            "rename",
            "renameat",
            "renameat2",
            "unlink",
            "unlinkat",
            "rmdir",
            "fsync",
            "fdatasync",
            "ftruncate",
            "ftruncate64",
            "fallocate",
            "chmod",
            "fchmod",
            "fchmodat",
            "fchmodat2",
            "fadvise64",
            "fadvise64_64",
            "dup",
            "dup2",
            "dup3",
            "fcntl",
            "fcntl64",
            "flock",
            "ioctl",
            "pipe",
            "pipe2",
            "memfd_create",
            "getxattr",
            "lgetxattr",
            "fgetxattr",
            "inotify_init1",
            "inotify_add_watch",
            "inotify_rm_watch",
        ],
    },
    Allowed {
        why: "sockets: /metrics, OTLP, the kubelet and API server, servers' own /metrics",
        names: &[
            "socket",
            "socketpair",
            "bind",
            "listen",
            "accept",
            "accept4",
            "connect",
            "getsockname",
            "getpeername",
            "getsockopt",
            "setsockopt",
            "shutdown",
            "sendto",
            "sendmsg",
            "sendmmsg",
            "recvfrom",
            "recvmsg",
            "recvmmsg",
            "recvmmsg_time64",
        ],
    },
    Allowed {
        why: "waiting on many descriptors (tokio, the ring buffers)",
        names: &[
            "epoll_create",
            "epoll_create1",
            "epoll_ctl",
            "epoll_wait",
            "epoll_pwait",
            "epoll_pwait2",
            "poll",
            "ppoll",
            "ppoll_time64",
            "select",
            "_newselect",
            "pselect6",
            "pselect6_time64",
            "eventfd",
            "eventfd2",
        ],
    },
    Allowed {
        why: "randomness (hash maps, TLS)",
        names: &["getrandom"],
    },
    Allowed {
        why: "starting (the runtime applies the profile before it executes the agent) and ending",
        names: &["execve", "exit", "exit_group", "wait4", "waitid"],
    },
];

/// Namespace flags of `clone`: `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC |
/// CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET`. A thread is created with none of them.
const CLONE_NAMESPACES: u64 = 0x7E02_0000;

/// `ENOSYS`: `clone3` passes its flags in memory, where seccomp cannot look, so it is answered
/// "not implemented" and glibc falls back to `clone`, whose flags it can.
const ENOSYS: u32 = 38;

/// `EPERM`, for every call not allowed.
const EPERM: u32 = 1;

/// Architectures the profile applies to; a call of another ABI (32-bit `int 0x80`, say) is
/// refused by the runtime's bad-architecture action.
const ARCHITECTURES: &[&str] = &["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"];

/// The profile, as JSON.
pub fn profile() -> Value {
    let allow = |names: Vec<&str>| json!({ "names": names, "action": "SCMP_ACT_ALLOW" });
    let mut syscalls: Vec<Value> = AGENT
        .iter()
        .chain(ORDINARY)
        .map(|a| {
            let mut rule = allow(a.names.to_vec());
            rule["comment"] = json!(a.why);
            rule
        })
        .collect();
    syscalls.push(json!({
        "names": ["clone"],
        "action": "SCMP_ACT_ALLOW",
        "args": [{ "index": 0, "value": CLONE_NAMESPACES, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ" }],
        "comment": "threads, never new namespaces",
    }));
    syscalls.push(json!({
        "names": ["clone3"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": ENOSYS,
        "comment": "glibc falls back to clone, whose flags are checked",
    }));
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": ARCHITECTURES,
        "syscalls": syscalls,
    })
}

/// The profile as the file a node holds: pretty JSON with a final newline.
pub fn text() -> String {
    let mut text = serde_json::to_string_pretty(&profile()).expect("a JSON value serializes");
    text.push('\n');
    text
}

/// Writes the profile to `path` (directories created), replacing an older one in one rename
/// so the kubelet never reads half a profile. Readable by all: the kubelet reads it. Needs no
/// capability where the directory belongs to root (the init container holds none).
pub fn install(path: &Path) -> io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".inferscope-seccomp")
        .tempfile_in(dir)?;
    tmp.write_all(text().as_bytes())?;
    tmp.as_file().sync_all()?;
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_for(name: &str) -> Vec<Value> {
        let p = profile();
        p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["names"].as_array().unwrap().iter().any(|n| n == name))
            .cloned()
            .collect()
    }

    #[test]
    fn the_agents_own_calls_are_allowed() {
        for name in [
            "bpf",
            "perf_event_open",
            "mount",
            "umount2",
            "setns",
            "openat2",
        ] {
            let rules = rules_for(name);
            assert_eq!(rules.len(), 1, "{name}: {rules:?}");
            assert_eq!(rules[0]["action"], "SCMP_ACT_ALLOW", "{name}");
            assert!(rules[0].get("args").is_none(), "{name}");
        }
    }

    #[test]
    fn what_cap_sys_admin_would_open_stays_shut() {
        for name in [
            "unshare",
            "pivot_root",
            "chroot",
            "fsopen",
            "move_mount",
            "open_tree",
            "sethostname",
            "kexec_load",
            "init_module",
            "finit_module",
            "process_vm_writev",
            "io_uring_setup",
            "userfaultfd",
            "keyctl",
            "open_by_handle_at",
            "swapon",
            "reboot",
        ] {
            assert!(rules_for(name).is_empty(), "{name} must not be allowed");
        }
        let p = profile();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(p["defaultErrnoRet"], 1);
    }

    #[test]
    fn threads_but_no_namespaces() {
        let clone = rules_for("clone");
        assert_eq!(clone.len(), 1);
        let arg = &clone[0]["args"][0];
        assert_eq!(arg["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(arg["value"], 0x7E02_0000u64);
        assert_eq!(arg["valueTwo"], 0);
        for flag in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
        ] {
            assert_ne!(flag as u64 & CLONE_NAMESPACES, 0, "{flag:#x}");
        }
        // A thread's flags pass.
        let thread = libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID;
        assert_eq!(thread as u64 & CLONE_NAMESPACES, 0);
        let clone3 = rules_for("clone3");
        assert_eq!(clone3[0]["action"], "SCMP_ACT_ERRNO");
        assert_eq!(clone3[0]["errnoRet"], 38);
    }

    #[test]
    fn every_name_once() {
        let p = profile();
        let mut seen = std::collections::BTreeSet::new();
        for rule in p["syscalls"].as_array().unwrap() {
            for n in rule["names"].as_array().unwrap() {
                assert!(seen.insert(n.as_str().unwrap().to_string()), "{n} twice");
            }
        }
    }

    #[test]
    fn install_replaces_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inferscope/agent.json");
        install(&path).unwrap();
        std::fs::write(&path, "old").unwrap();
        install(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), profile());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["agent.json"], "no temporary file left");
    }
}

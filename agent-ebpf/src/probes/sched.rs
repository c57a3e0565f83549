//! Process exits, reported only for processes the `cuda` family has seen, so that userspace
//! can release their ledgers and tell a crash from a normal exit. `sched_process_exit` carries
//! no exit status, so two more tracepoints note it on the way: `exit_group`'s status for a
//! process that ends itself, and the fatal signal (default action) that ends one otherwise.

use agent_common::{
    lost,
    sched::{ExitInfo, ProcessExitEvent, EXIT_CODE_KNOWN},
    EventHeader, EventKind,
};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};

use super::cuda::CUDA_PROCESSES;
use crate::maps::{count_lost, submit_flags, EVENTS};

/// Offset of `group_dead` in `sched/sched_process_exit`; userspace sets it from the format
/// file (0 when the kernel lacks the field: fall back to the group leader's exit).
#[unsafe(no_mangle)]
static GROUP_DEAD_OFFSET: u32 = 32;

const SIG_DFL: u64 = 0;

#[map]
static EXIT_INFO: LruHashMap<u32, ExitInfo> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn watched_tgid() -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    CUDA_PROCESSES.get_ptr(&tgid).map(|_| tgid)
}

/// Signals whose default action ends the process.
#[inline(always)]
fn fatal_by_default(sig: i32) -> bool {
    matches!(sig, 1..=6 | 7 | 8 | 9 | 10 | 11 | 12 | 13 | 14 | 15 | 24 | 25 | 26 | 27 | 31)
}

#[tracepoint]
pub fn signal_deliver(ctx: TracePointContext) -> u32 {
    let Some(tgid) = watched_tgid() else { return 0 };
    // sig at 8, sa_handler at 24 (signal/signal_deliver format, stable since 3.x).
    let (Ok(sig), Ok(handler)) = (unsafe { ctx.read_at::<i32>(8) }, unsafe { ctx.read_at::<u64>(24) })
    else {
        return 0;
    };
    if handler != SIG_DFL || !fatal_by_default(sig) {
        return 0;
    }
    let mut info = match EXIT_INFO.get_ptr(&tgid) {
        Some(i) => unsafe { *i },
        None => ExitInfo::default(),
    };
    info.signal = sig;
    let _ = EXIT_INFO.insert(&tgid, &info, 0);
    0
}

#[tracepoint]
pub fn sys_enter_exit_group(ctx: TracePointContext) -> u32 {
    let Some(tgid) = watched_tgid() else { return 0 };
    let Ok(code) = (unsafe { ctx.read_at::<u64>(16) }) else { return 0 };
    let mut info = match EXIT_INFO.get_ptr(&tgid) {
        Some(i) => unsafe { *i },
        None => ExitInfo::default(),
    };
    info.exit_code = (code & 0xff) as i32;
    info.flags |= EXIT_CODE_KNOWN;
    let _ = EXIT_INFO.insert(&tgid, &info, 0);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if CUDA_PROCESSES.get_ptr(&tgid).is_none() {
        return 0;
    }
    let offset = unsafe { core::ptr::read_volatile(&GROUP_DEAD_OFFSET) };
    let group_dead = if offset == 0 {
        pid_tgid as u32 == tgid
    } else {
        matches!(unsafe { ctx.read_at::<u8>(offset as usize) }, Ok(v) if v != 0)
    };
    if !group_dead {
        return 0;
    }
    let _ = CUDA_PROCESSES.remove(&tgid);
    let info = match EXIT_INFO.get_ptr(&tgid) {
        Some(i) => unsafe { *i },
        None => ExitInfo::default(),
    };
    let _ = EXIT_INFO.remove(&tgid);
    let Some(mut entry) = EVENTS.reserve::<ProcessExitEvent>(0) else {
        count_lost(lost::SCHED);
        return 0;
    };
    entry.write(ProcessExitEvent {
        header: EventHeader {
            kind: EventKind::ProcessExit as u32,
            _pad: 0,
            ts_ns: unsafe { bpf_ktime_get_ns() },
            tgid,
            pid: pid_tgid as u32,
        },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        exit_code: info.exit_code,
        signal: info.signal,
        flags: info.flags,
        _pad: 0,
    });
    // A crash matters now: wake the reader.
    entry.submit(submit_flags(info.signal != 0));
    0
}

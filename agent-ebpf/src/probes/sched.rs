//! Process exits, reported only for processes the `cuda` family has seen, so that userspace
//! can release their ledgers.

use agent_common::{lost, sched::ProcessExitEvent, EventHeader, EventKind};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use super::cuda::CUDA_PROCESSES;
use crate::maps::{count_lost, submit_flags, EVENTS};

/// Offset of `group_dead` in `sched/sched_process_exit`; userspace sets it from the format
/// file (0 when the kernel lacks the field: fall back to the group leader's exit).
#[unsafe(no_mangle)]
static GROUP_DEAD_OFFSET: u32 = 32;

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
    });
    entry.submit(submit_flags(false));
    0
}

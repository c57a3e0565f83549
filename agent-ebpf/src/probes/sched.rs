//! Process exits, reported only for processes the `cuda` family has seen, so that userspace
//! can release their ledgers and tell a crash from a normal exit. The exit status is the
//! exiting task's own `exit_code` (set before the tracepoint fires: the `exit_group` status in
//! bits 8-15, or the fatal signal in bits 0-6), read at an offset userspace takes from the
//! kernel's BTF. No syscall tracepoint is needed for it: one of those would send every
//! syscall of every task on the node through the kernel's tracing path.

use agent_common::{
    lost,
    sched::{ProcessExitEvent, EXIT_CODE_KNOWN},
    EventHeader, EventKind,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use super::{
    cuda::{CUDA_CTX_DEVICE, CUDA_FAIL_STACK, CUDA_FREEZE, CUDA_PROCESSES, CUDA_THREAD_CTX},
    discovery::{DRIVER_REPORTED, TLS_REPORTED},
    tls::{TLS_CALLS, TLS_LAST_READ},
};
use crate::maps::{count_lost, submit_flags, EVENTS, STOPPED};

/// Offset of `group_dead` in `sched/sched_process_exit`; userspace sets it from the format
/// file (0 when the kernel lacks the field: fall back to the group leader's exit).
#[unsafe(no_mangle)]
static GROUP_DEAD_OFFSET: u32 = 32;

/// Offset of `exit_code` in `struct task_struct`, from the kernel's BTF; 0 when unknown (the
/// exit is then reported without a status).
#[unsafe(no_mangle)]
static TASK_EXIT_CODE_OFFSET: u32 = 0;

/// (exit status, fatal signal, flags) of the exiting task.
#[inline(always)]
fn exit_status() -> (i32, i32, u32) {
    let offset = unsafe { core::ptr::read_volatile(&TASK_EXIT_CODE_OFFSET) };
    if offset == 0 {
        return (0, 0, 0);
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Ok(code) = (unsafe { bpf_probe_read_kernel(task.wrapping_add(offset as usize) as *const i32) })
    else {
        return (0, 0, 0);
    };
    match code & 0x7f {
        0 => ((code >> 8) & 0xff, 0, EXIT_CODE_KNOWN),
        signal => (0, signal, 0),
    }
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let offset = unsafe { core::ptr::read_volatile(&GROUP_DEAD_OFFSET) };
    let group_dead = if offset == 0 {
        pid_tgid as u32 == tgid
    } else {
        matches!(unsafe { ctx.read_at::<u8>(offset as usize) }, Ok(v) if v != 0)
    };
    // Per-thread and per-process state goes with its owner (ids are reused).
    let _ = CUDA_THREAD_CTX.remove(&pid_tgid);
    let _ = TLS_LAST_READ.remove(&pid_tgid);
    let _ = TLS_CALLS.remove(&pid_tgid);
    if !group_dead {
        return 0;
    }
    // The pid may come back as another program: its driver load is news again.
    let _ = DRIVER_REPORTED.remove(&tgid);
    let _ = TLS_REPORTED.remove(&tgid);
    let _ = CUDA_CTX_DEVICE.remove(&tgid);
    let _ = CUDA_FAIL_STACK.remove(&tgid);
    let _ = CUDA_FREEZE.remove(&tgid);
    let _ = STOPPED.remove(&tgid);
    if CUDA_PROCESSES.get_ptr(&tgid).is_none() {
        return 0;
    }
    let _ = CUDA_PROCESSES.remove(&tgid);
    let (exit_code, signal, flags) = exit_status();
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
        exit_code,
        signal,
        flags,
        _pad: 0,
    });
    // A crash matters now: wake the reader.
    entry.submit(submit_flags(signal != 0));
    0
}

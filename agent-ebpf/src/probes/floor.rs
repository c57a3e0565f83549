//! The least a probe can do to deliver one allocation to userspace: stash the arguments at
//! entry, emit one ring-buffer record at return. `cargo xtask bench` measures the `cuda`
//! family against this floor; the agent never attaches it.

use agent_common::{cuda::CudaMemEvent, lost};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, uprobe, uretprobe},
    maps::HashMap,
    programs::{ProbeContext, RetProbeContext},
};

use crate::maps::{count_lost, EVENTS};

#[map]
static FLOOR_STASH: HashMap<u64, [u64; 2]> = HashMap::with_max_entries(4096, 0);

#[uprobe]
pub fn floor_enter(ctx: ProbeContext) -> u32 {
    let args = [
        ctx.arg::<u64>(0).unwrap_or(0),
        ctx.arg::<u64>(1).unwrap_or(0),
    ];
    let _ = FLOOR_STASH.insert(&bpf_get_current_pid_tgid(), &args, 0);
    0
}

#[uretprobe]
pub fn floor_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(args) = FLOOR_STASH.get_ptr(&pid_tgid) else {
        return 0;
    };
    let args = unsafe { *args };
    let _ = FLOOR_STASH.remove(&pid_tgid);
    let Some(mut entry) = EVENTS.reserve::<CudaMemEvent>(0) else {
        count_lost(lost::CUDA);
        return 0;
    };
    let mut ev = CudaMemEvent::default();
    ev.header.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.result = ctx.ret::<u64>() as u32;
    ev.ptr = args[0];
    ev.size = args[1];
    entry.write(ev);
    entry.submit(agent_common::BPF_RB_NO_WAKEUP);
    0
}

/// What the `http` family's per-syscall tracepoints (`syscalls/sys_enter_read`, ...), which it
/// used before its raw tracepoints, cost a process it does not watch: the kernel builds the
/// call's record, the program looks the process up and returns. The bench attaches it to the
/// same 21 tracepoints to compare the two hooks side by side.
#[aya_ebpf::macros::tracepoint]
pub fn tax_per_syscall(_ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = super::http::HTTP_WATCHED.get_ptr(&tgid);
    0
}

/// The least a syscall hook costs: a raw tracepoint on `sys_exit` (where the `http` family's
/// program is) that returns at once. What the bench measures with it is the kernel's tracing
/// path alone.
#[aya_ebpf::macros::raw_tracepoint(tracepoint = "sys_exit")]
pub fn tax_raw_floor(_ctx: aya_ebpf::programs::RawTracePointContext) -> u32 {
    0
}

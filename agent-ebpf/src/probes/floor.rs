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

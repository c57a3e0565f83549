//! Host OOM kills: `oom/mark_victim`, for every victim (a GPU process or not: forensics
//! decides what it means).

use agent_common::{lost, oom::OomKillEvent, EventHeader, EventKind, BPF_RB_FORCE_WAKEUP};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};

use crate::maps::{count_lost, EVENTS};

#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    // Offsets of oom/mark_victim (kernel ≥ 6.4 layout; userspace checks the format file and
    // leaves this program unattached when it differs).
    let read = |off: usize| unsafe { ctx.read_at::<u64>(off) }.unwrap_or(0);
    let pid = unsafe { ctx.read_at::<i32>(8) }.unwrap_or(0) as u32;
    let Some(mut entry) = EVENTS.reserve::<OomKillEvent>(0) else {
        count_lost(lost::OOM);
        return 0;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut ev = OomKillEvent {
        header: EventHeader {
            kind: EventKind::OomKill as u32,
            _pad: 0,
            ts_ns: unsafe { bpf_ktime_get_ns() },
            tgid: (pid_tgid >> 32) as u32,
            pid: pid_tgid as u32,
        },
        victim_pid: pid,
        uid: unsafe { ctx.read_at::<u32>(48) }.unwrap_or(0),
        total_vm_kb: read(16),
        anon_rss_kb: read(24),
        file_rss_kb: read(32),
        shmem_rss_kb: read(40),
        pgtables_kb: read(56),
        oom_score_adj: i32::from(unsafe { ctx.read_at::<i16>(64) }.unwrap_or(0)),
        _pad: 0,
        comm: [0; 16],
    };
    // comm is a __data_loc string: low 16 bits offset, high 16 bits length.
    if let Ok(loc) = unsafe { ctx.read_at::<u32>(12) } {
        let src = unsafe { (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize) };
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(src, &mut ev.comm) };
    }
    entry.write(ev);
    entry.submit(BPF_RB_FORCE_WAKEUP);
    0
}

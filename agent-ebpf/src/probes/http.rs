//! Socket syscalls of watched processes (inference servers), as tracepoints: kprobes are not
//! available on the kernels this runs on. Only processes in `HTTP_WATCHED` (written by
//! userspace) and only their accepted sockets (`HTTP_CONNS`: set at accept, removed at close,
//! seeded by userspace for connections older than the agent) produce records.
//!
//! Enter programs stash the call's arguments per thread; the one exit program, attached to
//! every `sys_exit_*` of the family, emits the bytes the call really moved: one record per
//! buffer (per iovec for vectored calls, up to `IOV_MAX`), the first `CAPTURE_BYTES` of each.

use agent_common::{
    http::{
        config, cost, ConnKey, HttpAcceptEvent, HttpCloseEvent, HttpDataEvent, CAPTURE_MAX, DIR_IN,
        DIR_OUT, FLAG_IOV_LEFT, FLAG_TRUNCATED, HTTP_DATA_PREFIX, IOV_MAX,
    },
    lost, EventHeader, EventKind,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_probe_read_user as probe_read_user_raw,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TracePointContext,
};

use crate::maps::{count_lost, submit_flags_on, HTTP_EVENTS};

const HTTP_WAKEUP: u32 = agent_common::config::HTTP_WAKEUP_BYTES;

/// Offsets in the `syscalls/sys_enter_*` and `sys_exit_*` records.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

const KIND_IN: u32 = 1;
const KIND_OUT: u32 = 2;
const KIND_VEC_IN: u32 = 3;
const KIND_VEC_OUT: u32 = 4;
const KIND_ACCEPT: u32 = 5;

#[repr(C)]
#[derive(Clone, Copy)]
struct Stash {
    kind: u32,
    fd: u32,
    /// Buffer, iovec array or sockaddr pointer.
    ptr: u64,
    /// iovec count for vectored calls.
    count: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// Processes whose sockets are watched (tgid → 1), written by userspace.
#[map]
static HTTP_WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// Accepted sockets of watched processes.
#[map]
static HTTP_CONNS: LruHashMap<ConnKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// Arguments from syscall entry to exit, per thread (the calls may sleep: not per-CPU).
#[map]
static HTTP_STASH: LruHashMap<u64, Stash> = LruHashMap::with_max_entries(16384, 0);

/// Where a data record is built before it is copied, at its real length, to the ring.
#[map]
static HTTP_SCRATCH: PerCpuArray<HttpDataEvent> = PerCpuArray::with_max_entries(1, 0);

/// The family's knobs (`agent_common::http::config`).
#[map]
static HTTP_CONFIG: Array<u64> = Array::with_max_entries(config::COUNT, 0);

/// Runs and copied bytes, per CPU (`agent_common::http::cost`), for the family's budget where
/// the kernel's run-time statistics are off.
#[map]
static HTTP_COST: PerCpuArray<u64> = PerCpuArray::with_max_entries(cost::COUNT, 0);

#[inline(always)]
fn count_cost(slot: u32, n: u64) {
    if let Some(c) = HTTP_COST.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer while this program runs.
        unsafe { *c += n };
    }
}

#[inline(always)]
fn watched(tgid: u32) -> bool {
    HTTP_WATCHED.get_ptr(&tgid).is_some()
}

#[inline(always)]
fn arg(ctx: &TracePointContext, offset: usize) -> u64 {
    unsafe { ctx.read_at::<u64>(offset) }.unwrap_or(0)
}

#[inline(always)]
fn header(kind: EventKind, pid_tgid: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        _pad: 0,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
    }
}

/// Stashes a call on a watched connection for the exit program.
#[inline(always)]
fn stash(ctx: &TracePointContext, kind: u32) -> u32 {
    count_cost(cost::RUNS, 1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !watched(tgid) {
        return 0;
    }
    let fd = arg(ctx, ARG0) as u32;
    if kind != KIND_ACCEPT && HTTP_CONNS.get_ptr(&ConnKey { tgid, fd }).is_none() {
        return 0;
    }
    let (ptr, count) = (arg(ctx, ARG1), arg(ctx, ARG2));
    let s = Stash {
        kind,
        fd,
        ptr,
        count,
    };
    if HTTP_STASH.insert(&pid_tgid, &s, 0).is_err() {
        count_lost(lost::HTTP);
    }
    0
}

#[tracepoint]
pub fn http_enter_accept(ctx: TracePointContext) -> u32 {
    stash(&ctx, KIND_ACCEPT)
}

#[tracepoint]
pub fn http_enter_read(ctx: TracePointContext) -> u32 {
    stash(&ctx, KIND_IN)
}

#[tracepoint]
pub fn http_enter_write(ctx: TracePointContext) -> u32 {
    stash(&ctx, KIND_OUT)
}

#[tracepoint]
pub fn http_enter_readv(ctx: TracePointContext) -> u32 {
    stash(&ctx, KIND_VEC_IN)
}

#[tracepoint]
pub fn http_enter_writev(ctx: TracePointContext) -> u32 {
    stash(&ctx, KIND_VEC_OUT)
}

/// `recvmsg(fd, msghdr, flags)`: the iovecs are read from the msghdr.
#[tracepoint]
pub fn http_enter_recvmsg(ctx: TracePointContext) -> u32 {
    stash_msg(&ctx, KIND_VEC_IN)
}

#[tracepoint]
pub fn http_enter_sendmsg(ctx: TracePointContext) -> u32 {
    stash_msg(&ctx, KIND_VEC_OUT)
}

#[inline(always)]
fn stash_msg(ctx: &TracePointContext, kind: u32) -> u32 {
    count_cost(cost::RUNS, 1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !watched(tgid) {
        return 0;
    }
    let fd = arg(ctx, ARG0) as u32;
    if HTTP_CONNS.get_ptr(&ConnKey { tgid, fd }).is_none() {
        return 0;
    }
    let msg = arg(ctx, ARG1);
    let Ok(iov) = (unsafe { bpf_probe_read_user((msg + 16) as *const u64) }) else {
        return 0;
    };
    let Ok(n) = (unsafe { bpf_probe_read_user((msg + 24) as *const u64) }) else {
        return 0;
    };
    let s = Stash {
        kind,
        fd,
        ptr: iov,
        count: n,
    };
    if HTTP_STASH.insert(&pid_tgid, &s, 0).is_err() {
        count_lost(lost::HTTP);
    }
    0
}

/// Every `sys_exit_*` of the family.
#[tracepoint]
pub fn http_exit(ctx: TracePointContext) -> u32 {
    count_cost(cost::RUNS, 1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(s) = HTTP_STASH.get_ptr(&pid_tgid) else {
        return 0;
    };
    let s = unsafe { *s };
    let _ = HTTP_STASH.remove(&pid_tgid);
    let ret = arg(&ctx, RET) as i64;
    if ret <= 0 {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    match s.kind {
        KIND_ACCEPT => accepted(pid_tgid, tgid, s, ret as u32),
        KIND_IN | KIND_OUT => {
            let dir = if s.kind == KIND_IN { DIR_IN } else { DIR_OUT };
            emit(pid_tgid, s.fd, dir, s.ptr, ret as u64, 0);
        }
        _ => {
            let dir = if s.kind == KIND_VEC_IN {
                DIR_IN
            } else {
                DIR_OUT
            };
            let mut left = ret as u64;
            for i in 0..IOV_MAX {
                if left == 0 || u64::from(i) >= s.count {
                    break;
                }
                let Ok(v) =
                    (unsafe { bpf_probe_read_user((s.ptr + 16 * u64::from(i)) as *const Iovec) })
                else {
                    break;
                };
                let part = if v.len < left { v.len } else { left };
                left -= part;
                let flags = if i == IOV_MAX - 1 && left > 0 {
                    FLAG_IOV_LEFT
                } else {
                    0
                };
                if part > 0 {
                    emit(pid_tgid, s.fd, dir, v.base, part, flags);
                }
            }
        }
    }
    0
}

#[inline(always)]
fn accepted(pid_tgid: u64, tgid: u32, s: Stash, fd: u32) {
    let _ = HTTP_CONNS.insert(&ConnKey { tgid, fd }, &1, 0);
    let Some(mut entry) = HTTP_EVENTS.reserve::<HttpAcceptEvent>(0) else {
        count_lost(lost::HTTP);
        return;
    };
    let mut peer = [0u8; 28];
    if s.ptr != 0 {
        peer = unsafe { bpf_probe_read_user(s.ptr as *const [u8; 28]) }.unwrap_or([0; 28]);
    }
    entry.write(HttpAcceptEvent {
        header: header(EventKind::HttpAccept, pid_tgid),
        fd,
        listen_fd: s.fd,
        peer,
        _pad: 0,
    });
    entry.submit(submit_flags_on(&HTTP_EVENTS, HTTP_WAKEUP, false));
}

/// One data record: the first `CAPTURE_BYTES` of `len` bytes at `src`, copied to the ring
/// at their real length (a per-CPU scratch record holds them meanwhile).
#[inline(always)]
fn emit(pid_tgid: u64, fd: u32, direction: u32, src: u64, len: u64, flags: u32) {
    let Some(ev) = HTTP_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let ev = unsafe { &mut *ev };
    let cap = HTTP_CONFIG.get(config::CAPTURE_BYTES).copied().unwrap_or(0);
    let mut n = if len < cap { len } else { cap };
    if n > CAPTURE_MAX as u64 {
        n = CAPTURE_MAX as u64;
    }
    ev.header = header(EventKind::HttpData, pid_tgid);
    ev.fd = fd;
    ev.direction = direction;
    ev.len = len;
    ev.flags = flags | if n < len { FLAG_TRUNCATED } else { 0 };
    let n = n as u32 & (2 * CAPTURE_MAX as u32 - 1);
    if n > CAPTURE_MAX as u32 {
        return;
    }
    if n > 0 {
        let r = unsafe {
            probe_read_user_raw(
                ev.data.as_mut_ptr().cast(),
                n,
                src as *const core::ffi::c_void,
            )
        };
        if r < 0 {
            ev.captured = 0;
            ev.flags |= FLAG_TRUNCATED;
        } else {
            ev.captured = n;
            count_cost(cost::BYTES, u64::from(n));
        }
    } else {
        ev.captured = 0;
    }
    let size = HTTP_DATA_PREFIX as u32 + ev.captured;
    // A power-of-two mask, then the real bound: both for the verifier.
    let size = size & 0x3fff;
    if size as usize > HTTP_DATA_PREFIX + CAPTURE_MAX {
        return;
    }
    let bytes = unsafe {
        core::slice::from_raw_parts((ev as *const HttpDataEvent).cast::<u8>(), size as usize)
    };
    if HTTP_EVENTS.output::<[u8]>(bytes, submit_flags_on(&HTTP_EVENTS, HTTP_WAKEUP, false)).is_err() {
        count_lost(lost::HTTP);
    }
}

#[tracepoint]
pub fn http_close(ctx: TracePointContext) -> u32 {
    count_cost(cost::RUNS, 1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !watched(tgid) {
        return 0;
    }
    let fd = arg(&ctx, ARG0) as u32;
    let key = ConnKey { tgid, fd };
    if HTTP_CONNS.get_ptr(&key).is_none() {
        return 0;
    }
    let _ = HTTP_CONNS.remove(&key);
    let Some(mut entry) = HTTP_EVENTS.reserve::<HttpCloseEvent>(0) else {
        count_lost(lost::HTTP);
        return 0;
    };
    entry.write(HttpCloseEvent {
        header: header(EventKind::HttpClose, pid_tgid),
        fd,
        _pad: 0,
    });
    entry.submit(submit_flags_on(&HTTP_EVENTS, HTTP_WAKEUP, false));
    0
}

//! Socket syscalls of watched processes (inference servers), as two raw tracepoints on
//! `raw_syscalls/sys_enter` and `sys_exit`: kprobes are not available on the kernels this runs
//! on, and BPF trampolines (`fentry` on the socket functions) are refused. A raw tracepoint
//! runs on every syscall of the node, but returns after comparing the syscall's number for all
//! but the family's eleven calls, and reads the arguments from the saved registers; the
//! per-syscall tracepoints it replaces built a record of every hooked call first, for every
//! process (`docs/probes.md` has the figures). Only processes in `HTTP_WATCHED` (written by
//! userspace) and only their accepted sockets (`HTTP_CONNS`: set at accept, removed at close,
//! seeded by userspace for connections older than the agent) produce records.
//!
//! The enter program stashes the call's arguments per thread; the exit program emits the
//! bytes the call really moved: one record per call, the first `CAPTURE_BYTES` of them (for a
//! vectored call, its iovecs' bytes one after the other, up to `IOV_WALK` iovecs).

use agent_common::{
    http::{
        config, cost, ConnKey, HttpAcceptEvent, HttpCloseEvent, HttpDataEvent, CAPTURE_MAX,
        CONN_PLAIN, CONN_TLS, DIR_IN, DIR_OUT, FLAG_TRUNCATED, HTTP_DATA_PREFIX, IOV_WALK,
    },
    lost, EventHeader, EventKind,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::bpf_probe_read_user as probe_read_user_raw,
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::RawTracePointContext,
};

use super::tls::TLS_LAST_READ;
use crate::maps::{count_lost, submit_flags_on, HTTP_EVENTS};

const HTTP_WAKEUP: u32 = agent_common::config::HTTP_WAKEUP_BYTES;

/// x86_64 syscall numbers of the family's calls.
const SYS_READ: u64 = 0;
const SYS_WRITE: u64 = 1;
const SYS_CLOSE: u64 = 3;
const SYS_READV: u64 = 19;
const SYS_WRITEV: u64 = 20;
const SYS_ACCEPT: u64 = 43;
const SYS_SENDTO: u64 = 44;
const SYS_RECVFROM: u64 = 45;
const SYS_SENDMSG: u64 = 46;
const SYS_RECVMSG: u64 = 47;
const SYS_ACCEPT4: u64 = 288;

/// Offsets in x86_64's `struct pt_regs`: the first three arguments and the syscall number.
const REG_ARG0: u64 = 112; // di
const REG_ARG1: u64 = 104; // si
const REG_ARG2: u64 = 96; // dx
const REG_ORIG_AX: u64 = 120;

const KIND_IN: u32 = 1;
const KIND_OUT: u32 = 2;
const KIND_VEC_IN: u32 = 3;
const KIND_VEC_OUT: u32 = 4;
const KIND_ACCEPT: u32 = 5;
const KIND_MSG_IN: u32 = 6;
const KIND_MSG_OUT: u32 = 7;
const KIND_CLOSE: u32 = 8;
/// Or'd into a stashed kind: the connection is tied to an OpenSSL `SSL*`, whose probes carry
/// its plaintext; its ciphertext is not copied.
const KIND_TLS: u32 = 0x100;

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
pub static HTTP_WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// Accepted sockets of watched processes: [`CONN_PLAIN`], or [`CONN_TLS`] once tied to an
/// `SSL*` by the TLS probes.
#[map]
pub static HTTP_CONNS: LruHashMap<ConnKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// Arguments from syscall entry to exit, per thread (the calls may sleep: not per-CPU).
#[map]
static HTTP_STASH: LruHashMap<u64, Stash> = LruHashMap::with_max_entries(16384, 0);

/// Where a data record is built before it is copied, at its real length, to the ring. The
/// spill after the record lets the verifier see every copy (at an offset below
/// `CAPTURE_MAX`, of at most `CAPTURE_MAX` bytes) stay inside the value.
#[repr(C)]
pub struct Scratch {
    ev: HttpDataEvent,
    _spill: [u8; CAPTURE_MAX],
}

#[map]
static HTTP_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The family's knobs (`agent_common::http::config`).
#[map]
static HTTP_CONFIG: Array<u64> = Array::with_max_entries(config::COUNT, 0);

/// Runs and copied bytes, per CPU (`agent_common::http::cost`), for the family's budget where
/// the kernel's run-time statistics are off.
#[map]
static HTTP_COST: PerCpuArray<u64> = PerCpuArray::with_max_entries(cost::COUNT, 0);

#[inline(always)]
pub fn http_config(index: u32) -> u64 {
    HTTP_CONFIG.get(index).copied().unwrap_or(0)
}

#[inline(always)]
pub fn count_cost(slot: u32, n: u64) {
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
fn header(kind: EventKind, pid_tgid: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        _pad: 0,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
    }
}

/// The call's argument `n` (0-based) from the user registers saved at syscall entry.
#[inline(always)]
fn reg(regs: u64, offset: u64) -> u64 {
    unsafe { bpf_probe_read_kernel((regs + offset) as *const u64) }.unwrap_or(0)
}

/// What the family does with a syscall, by number; `None` for every other syscall, which
/// returns at once (no map is looked at).
#[inline(always)]
fn kind_of(id: u64) -> Option<u32> {
    Some(match id {
        SYS_READ | SYS_RECVFROM => KIND_IN,
        SYS_WRITE | SYS_SENDTO => KIND_OUT,
        SYS_READV => KIND_VEC_IN,
        SYS_WRITEV => KIND_VEC_OUT,
        SYS_RECVMSG => KIND_MSG_IN,
        SYS_SENDMSG => KIND_MSG_OUT,
        SYS_ACCEPT | SYS_ACCEPT4 => KIND_ACCEPT,
        SYS_CLOSE => KIND_CLOSE,
        _ => return None,
    })
}

/// Every syscall's entry (`raw_syscalls/sys_enter`, as a raw tracepoint: the arguments come
/// from the saved registers, without the record the per-syscall tracepoints build).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn http_sys_enter(ctx: RawTracePointContext) -> u32 {
    let id: u64 = ctx.arg(1);
    let Some(kind) = kind_of(id) else {
        return 0;
    };
    count_cost(cost::RUNS, 1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !watched(tgid) {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    let fd = reg(regs, REG_ARG0) as u32;
    if kind == KIND_CLOSE {
        closed(pid_tgid, tgid, fd);
        return 0;
    }
    let mut tls = 0;
    if kind != KIND_ACCEPT {
        let Some(conn) = HTTP_CONNS.get_ptr(&ConnKey { tgid, fd }) else {
            return 0;
        };
        if unsafe { *conn } == CONN_TLS {
            tls = KIND_TLS;
        }
    }
    let (ptr, count, kind) = match kind {
        KIND_MSG_IN | KIND_MSG_OUT => {
            // `recvmsg(fd, msghdr, flags)`: the iovecs are read from the msghdr.
            let msg = reg(regs, REG_ARG1);
            let Ok(iov) = (unsafe { bpf_probe_read_user((msg + 16) as *const u64) }) else {
                return 0;
            };
            let Ok(n) = (unsafe { bpf_probe_read_user((msg + 24) as *const u64) }) else {
                return 0;
            };
            let vec = if kind == KIND_MSG_IN {
                KIND_VEC_IN
            } else {
                KIND_VEC_OUT
            };
            (iov, n, vec)
        }
        _ => (reg(regs, REG_ARG1), reg(regs, REG_ARG2), kind),
    };
    let s = Stash {
        kind: kind | tls,
        fd,
        ptr,
        count,
    };
    if HTTP_STASH.insert(&pid_tgid, &s, 0).is_err() {
        count_lost(lost::HTTP);
    }
    0
}

/// Every syscall's exit (`raw_syscalls/sys_exit`): the family's calls emit the bytes they
/// really moved.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn http_sys_exit(ctx: RawTracePointContext) -> u32 {
    let regs: u64 = ctx.arg(0);
    let Some(called) = kind_of(reg(regs, REG_ORIG_AX)) else {
        return 0;
    };
    count_cost(cost::RUNS, 1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(s) = HTTP_STASH.get_ptr(&pid_tgid) else {
        if called == KIND_ACCEPT {
            accepted_unstashed(&ctx, regs, pid_tgid);
        }
        return 0;
    };
    let s = unsafe { *s };
    let _ = HTTP_STASH.remove(&pid_tgid);
    let ret: i64 = ctx.arg(1);
    if ret <= 0 {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let kind = s.kind & !KIND_TLS;
    if kind == KIND_IN || kind == KIND_VEC_IN {
        // What an `SSL_read` on this thread that returns bytes is reading (`probes/tls.rs`).
        let _ = TLS_LAST_READ.insert(&pid_tgid, &s.fd, 0);
    }
    if s.kind & KIND_TLS != 0 {
        return 0;
    }
    match kind {
        KIND_ACCEPT => accepted(pid_tgid, tgid, s, ret as u32),
        KIND_IN | KIND_OUT => {
            let dir = if kind == KIND_IN { DIR_IN } else { DIR_OUT };
            emit(pid_tgid, s.fd, dir, s.ptr, ret as u64, 0);
        }
        _ => {
            let dir = if kind == KIND_VEC_IN {
                DIR_IN
            } else {
                DIR_OUT
            };
            emit_vec(pid_tgid, s.fd, dir, s.ptr, s.count, ret as u64);
        }
    }
    0
}

/// An `accept` that entered before the programs were attached: a thread-per-connection server
/// (blocking sockets) waits in it for its next client, and the connection it returns would
/// otherwise never be followed. Its arguments are still in the saved registers.
#[inline(always)]
fn accepted_unstashed(ctx: &RawTracePointContext, regs: u64, pid_tgid: u64) {
    let ret: i64 = ctx.arg(1);
    let tgid = (pid_tgid >> 32) as u32;
    if ret <= 0 || !watched(tgid) {
        return;
    }
    let s = Stash {
        kind: KIND_ACCEPT,
        fd: reg(regs, REG_ARG0) as u32,
        ptr: reg(regs, REG_ARG1),
        count: 0,
    };
    accepted(pid_tgid, tgid, s, ret as u32);
}

#[inline(always)]
fn accepted(pid_tgid: u64, tgid: u32, s: Stash, fd: u32) {
    let _ = HTTP_CONNS.insert(&ConnKey { tgid, fd }, &CONN_PLAIN, 0);
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
pub fn emit(pid_tgid: u64, fd: u32, direction: u32, src: u64, len: u64, flags: u32) {
    let Some(scratch) = HTTP_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let ev = unsafe { &mut (*scratch).ev };
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
    output(ev);
}

/// A vectored call's record: its iovecs' bytes one after the other, the first
/// `CAPTURE_BYTES` of the `total` it moved, walking at most `IOV_WALK` iovecs at `iov`.
#[inline(always)]
fn emit_vec(pid_tgid: u64, fd: u32, direction: u32, iov: u64, count: u64, total: u64) {
    let Some(scratch) = HTTP_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let scratch = unsafe { &mut *scratch };
    let mut cap = HTTP_CONFIG.get(config::CAPTURE_BYTES).copied().unwrap_or(0);
    if cap > CAPTURE_MAX as u64 {
        cap = CAPTURE_MAX as u64;
    }
    let ev = &mut scratch.ev;
    ev.header = header(EventKind::HttpData, pid_tgid);
    ev.fd = fd;
    ev.direction = direction;
    ev.len = total;
    ev.flags = 0;
    let mut off: u64 = 0;
    let mut left = total;
    for i in 0..IOV_WALK {
        if left == 0 || u64::from(i) >= count || off >= cap {
            break;
        }
        let Ok(v) = (unsafe { bpf_probe_read_user((iov + 16 * u64::from(i)) as *const Iovec) })
        else {
            break;
        };
        let part = if v.len < left { v.len } else { left };
        left -= part;
        let room = cap - off;
        let n = if part < room { part } else { room };
        if n == 0 {
            continue;
        }
        // Masks the verifier can follow: an offset below CAPTURE_MAX, a size of at most
        // CAPTURE_MAX, inside the record and its spill.
        let at = (off as usize) & (CAPTURE_MAX - 1);
        let size = (n as u32) & (2 * CAPTURE_MAX as u32 - 1);
        if size > CAPTURE_MAX as u32 {
            break;
        }
        let dst = unsafe { (scratch as *mut Scratch).cast::<u8>().add(HTTP_DATA_PREFIX + at) };
        let r = unsafe { probe_read_user_raw(dst.cast(), size, v.base as *const core::ffi::c_void) };
        if r < 0 {
            break;
        }
        off += n;
    }
    let ev = &mut scratch.ev;
    ev.captured = off as u32;
    if off < total {
        ev.flags |= FLAG_TRUNCATED;
    }
    count_cost(cost::BYTES, off);
    output(ev);
}

/// Copies a built record to the ring at its real length.
#[inline(always)]
fn output(ev: &HttpDataEvent) {
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

#[inline(always)]
fn closed(pid_tgid: u64, tgid: u32, fd: u32) {
    let key = ConnKey { tgid, fd };
    if HTTP_CONNS.get_ptr(&key).is_none() {
        return;
    }
    let _ = HTTP_CONNS.remove(&key);
    let Some(mut entry) = HTTP_EVENTS.reserve::<HttpCloseEvent>(0) else {
        count_lost(lost::HTTP);
        return;
    };
    entry.write(HttpCloseEvent {
        header: header(EventKind::HttpClose, pid_tgid),
        fd,
        _pad: 0,
    });
    entry.submit(submit_flags_on(&HTTP_EVENTS, HTTP_WAKEUP, false));
}

//! Socket syscalls of watched processes (inference servers), from one raw tracepoint on
//! `raw_syscalls/sys_exit`: kprobes are not available on the kernels this runs on, and BPF
//! trampolines (`fentry` on the socket functions) are refused. A raw tracepoint runs on every
//! syscall of the node, but returns after comparing the syscall's number for all but the
//! family's eleven calls. Everything is read when the call returns: its arguments are still in
//! the registers saved at entry, so no entry program (and no per-thread stash from entry to
//! exit) is needed, and the node's syscalls take one hook, not two. Only processes in
//! `HTTP_WATCHED` (written by userspace) and only their accepted sockets (`HTTP_CONNS`: set at
//! accept, removed at close, seeded by userspace for connections older than the agent, and
//! removed by it when a process is no longer watched) produce records: a call on a socket
//! looks up its connection alone, only an accept looks up its process.
//!
//! A call emits the bytes it really moved: one record per call, the first `CAPTURE_BYTES` of
//! them (for a vectored call, its iovecs' bytes one after the other, up to `IOV_WALK`
//! iovecs).

use agent_common::{
    http::{
        config, cost, ConnKey, ConnState, FdLayout, HttpAcceptEvent, HttpCloseEvent,
        HttpDataEvent, CAPTURE_MAX, CONN_TLS, DIR_IN, DIR_OUT, FLAG_TRUNCATED, HTTP_DATA_PREFIX,
        IOV_WALK,
    },
    lost, EventHeader, EventKind,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
        generated::bpf_probe_read_user as probe_read_user_raw,
    },
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, RawTracePointContext},
};

use super::tls::{stamp_ssl_call, TLS_CALLS, TLS_LAST_READ};
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

/// Where x86_64's `struct pt_regs` keeps, one after the other, `dx`, `si`, `di` and
/// `orig_ax`: the third, second and first arguments and the syscall number.
const REG_DX: u64 = 96;

const KIND_IN: u32 = 1;
const KIND_OUT: u32 = 2;
const KIND_VEC_IN: u32 = 3;
const KIND_VEC_OUT: u32 = 4;
const KIND_ACCEPT: u32 = 5;
const KIND_MSG_IN: u32 = 6;
const KIND_MSG_OUT: u32 = 7;
const KIND_CLOSE: u32 = 8;

/// Whether a syscall of `kind` writes to its socket.
#[inline(always)]
pub fn is_out(kind: u32) -> bool {
    kind == KIND_OUT || kind == KIND_VEC_OUT || kind == KIND_MSG_OUT
}

/// The saved registers the family reads, in their order in `struct pt_regs`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Args {
    /// Third argument: byte count, iovec count.
    dx: u64,
    /// Second argument: buffer, iovec array, msghdr or sockaddr pointer.
    si: u64,
    /// First argument: the fd.
    di: u64,
    orig_ax: u64,
}

/// iovecs read at once by [`emit_vec`].
const IOV_BATCH: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// Processes whose sockets are watched (tgid → 1), written by userspace.
#[map]
pub static HTTP_WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// Accepted sockets of watched processes: plain, or [`CONN_TLS`] once tied to an `SSL*` by
/// the TLS probes.
#[map]
pub static HTTP_CONNS: LruHashMap<ConnKey, ConnState> = LruHashMap::with_max_entries(65536, 0);

/// The kernel's layout from a task to its open files (set by the loader from BTF).
#[unsafe(no_mangle)]
static FD_LAYOUT: FdLayout = FdLayout {
    known: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_fd: 0,
    fdt_max_fds: 0,
};

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

/// The saved registers of the current syscall.
#[inline(always)]
fn args(regs: u64) -> Option<Args> {
    unsafe { bpf_probe_read_kernel((regs + REG_DX) as *const Args) }.ok()
}

/// The `struct file` the current process's `fd` now refers to (0: none), or `None` where the
/// kernel's layout is unknown or a read fails.
#[inline(always)]
fn fd_file(fd: u32) -> Option<u64> {
    let l = unsafe { core::ptr::read_volatile(&FD_LAYOUT) };
    if l.known == 0 {
        return None;
    }
    let task = unsafe { bpf_get_current_task() };
    let read = |at: u64| unsafe { bpf_probe_read_kernel(at as *const u64) }.ok();
    let files = read(task + u64::from(l.task_files))?;
    let fdt = read(files + u64::from(l.files_fdt))?;
    let max = unsafe { bpf_probe_read_kernel((fdt + u64::from(l.fdt_max_fds)) as *const u32) }
        .ok()?;
    if fd >= max {
        return Some(0);
    }
    let table = read(fdt + u64::from(l.fdt_fd))?;
    read(table + 8 * u64::from(fd))
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

/// Every syscall's exit (`raw_syscalls/sys_exit`, as a BTF tracepoint: the saved registers
/// are read with plain loads, where a raw tracepoint needs a helper call to read them, on
/// every syscall of the node).
#[btf_tracepoint(function = "sys_exit")]
pub fn http_sys_exit(ctx: BtfTracePointContext) -> u32 {
    let regs: *const u64 = ctx.arg(0);
    // SAFETY: the verifier knows `regs` as the kernel's `struct pt_regs` and checks each load
    // against its layout; a fault reads 0.
    let id = unsafe { *regs.add((REG_DX / 8 + 3) as usize) };
    let Some(kind) = kind_of(id) else {
        return 0;
    };
    let a = unsafe {
        Args {
            dx: *regs.add((REG_DX / 8) as usize),
            si: *regs.add((REG_DX / 8 + 1) as usize),
            di: *regs.add((REG_DX / 8 + 2) as usize),
            orig_ax: id,
        }
    };
    on_exit(kind, a, ctx.arg(1))
}

/// The same as [`http_sys_exit`] as a raw tracepoint, for kernels that refuse BTF
/// tracepoints.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn http_sys_exit_raw(ctx: RawTracePointContext) -> u32 {
    let regs: u64 = ctx.arg(0);
    let Some(a) = args(regs) else {
        return 0;
    };
    let Some(kind) = kind_of(a.orig_ax) else {
        return 0;
    };
    on_exit(kind, a, ctx.arg(1))
}

/// A call of the family's, of `kind`, that returned `ret`.
#[inline(always)]
fn on_exit(kind: u32, a: Args, ret: i64) -> u32 {
    count_cost(cost::RUNS, 1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let fd = a.di as u32;
    if kind == KIND_ACCEPT {
        if ret > 0 && watched(tgid) {
            accepted(pid_tgid, tgid, fd, a.si, ret as u32);
        }
        return 0;
    }
    // Only watched processes have followed connections: one lookup decides both.
    let key = ConnKey { tgid, fd };
    let Some(conn) = HTTP_CONNS.get_ptr(&key) else {
        return 0;
    };
    if kind == KIND_CLOSE {
        if ret == 0 {
            closed(pid_tgid, key, unsafe { (*conn).file });
        }
        return 0;
    }
    if ret <= 0 {
        return 0;
    }
    if kind == KIND_IN || kind == KIND_VEC_IN || kind == KIND_MSG_IN {
        // What an `SSL_read` on this thread that returns bytes is reading (`probes/tls.rs`).
        let _ = TLS_LAST_READ.insert(&pid_tgid, &fd, 0);
    }
    if unsafe { (*conn).state } == CONN_TLS {
        // Its plaintext comes from the TLS probes. Through a socket BIO this syscall runs
        // inside the thread's `SSL_read`/`SSL_write`, and it is when the bytes really moved:
        // the call's return can come milliseconds later on a busy CPU.
        if let Some(call) = TLS_CALLS.get_ptr_mut(&pid_tgid) {
            unsafe { stamp_ssl_call(&mut *call, kind) };
        }
        return 0;
    }
    let ret = ret as u64;
    match kind {
        KIND_IN => emit(pid_tgid, fd, DIR_IN, a.si, ret, 0, 0),
        KIND_OUT => emit(pid_tgid, fd, DIR_OUT, a.si, ret, 0, 0),
        KIND_VEC_IN => emit_vec(pid_tgid, fd, DIR_IN, a.si, a.dx, ret),
        KIND_VEC_OUT => emit_vec(pid_tgid, fd, DIR_OUT, a.si, a.dx, ret),
        _ => {
            // `recvmsg(fd, msghdr, flags)`, `sendmsg` (gRPC C-core writes with it): the iovecs
            // are the msghdr's, its pointer and count read in one user read (each costs the
            // same whatever its size).
            let Ok(m) = (unsafe { bpf_probe_read_user((a.si + 16) as *const [u64; 2]) }) else {
                return 0;
            };
            let dir = if kind == KIND_MSG_IN { DIR_IN } else { DIR_OUT };
            emit_vec(pid_tgid, fd, dir, m[0], m[1], ret);
        }
    }
    0
}

/// A connection accepted on `listen_fd` as `fd`, the peer's address at `addr`. A thread-per-
/// connection server (blocking sockets) that waited in `accept` since before the programs
/// were attached is followed too: nothing was needed from the call's entry.
#[inline(always)]
fn accepted(pid_tgid: u64, tgid: u32, listen_fd: u32, addr: u64, fd: u32) {
    let state = ConnState::plain(fd_file(fd).unwrap_or(0));
    let _ = HTTP_CONNS.insert(&ConnKey { tgid, fd }, &state, 0);
    let Some(mut entry) = HTTP_EVENTS.reserve::<HttpAcceptEvent>(0) else {
        count_lost(lost::HTTP);
        return;
    };
    let mut peer = [0u8; 28];
    if addr != 0 {
        peer = unsafe { bpf_probe_read_user(addr as *const [u8; 28]) }.unwrap_or([0; 28]);
    }
    entry.write(HttpAcceptEvent {
        header: header(EventKind::HttpAccept, pid_tgid),
        fd,
        listen_fd,
        peer,
        _pad: 0,
    });
    entry.submit(submit_flags_on(&HTTP_EVENTS, HTTP_WAKEUP, false));
}

/// One data record: the first `CAPTURE_BYTES` of `len` bytes at `src`, copied to the ring
/// at their real length (a per-CPU scratch record holds them meanwhile).
/// Timed `ts_ns`, or now when that is 0.
#[inline(always)]
pub fn emit(pid_tgid: u64, fd: u32, direction: u32, src: u64, len: u64, flags: u32, ts_ns: u64) {
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
    if ts_ns != 0 {
        ev.header.ts_ns = ts_ns;
    }
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
    // The iovecs are read IOV_BATCH at a time: each user read costs the same for 16 bytes as
    // for 128 (hyper writes a chunked event as three iovecs, h2 a frame as two).
    let mut vecs = [Iovec { base: 0, len: 0 }; IOV_BATCH as usize];
    for i in 0..IOV_WALK {
        if left == 0 || u64::from(i) >= count || off >= cap {
            break;
        }
        let j = i & (IOV_BATCH - 1);
        if j == 0 {
            let k = count - u64::from(i);
            let k = if k < u64::from(IOV_BATCH) { k } else { u64::from(IOV_BATCH) };
            let size = (k as u32 * 16) & (2 * 16 * IOV_BATCH - 1);
            if size > 16 * IOV_BATCH {
                break;
            }
            let r = unsafe {
                probe_read_user_raw(
                    vecs.as_mut_ptr().cast(),
                    size,
                    (iov + 16 * u64::from(i)) as *const core::ffi::c_void,
                )
            };
            if r < 0 {
                break;
            }
        }
        let Some(v) = vecs.get(j as usize).copied() else {
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

/// A `close` of `fd` that succeeded. It is seen returning, after the kernel freed the fd
/// number: another thread's `accept` may have taken it since, and its exit may already have
/// followed the new connection under the same key. That connection's socket is the file the
/// fd now refers to, and its entry stays; the closed connection's state in userspace ends
/// with that accept's record.
#[inline(always)]
fn closed(pid_tgid: u64, key: ConnKey, file: u64) {
    if file != 0 && fd_file(key.fd) == Some(file) {
        return;
    }
    let _ = HTTP_CONNS.remove(&key);
    let Some(mut entry) = HTTP_EVENTS.reserve::<HttpCloseEvent>(0) else {
        count_lost(lost::HTTP);
        return;
    };
    entry.write(HttpCloseEvent {
        header: header(EventKind::HttpClose, pid_tgid),
        fd: key.fd,
        _pad: 0,
    });
    entry.submit(submit_flags_on(&HTTP_EVENTS, HTTP_WAKEUP, false));
}

//! OpenSSL inside watched processes: a uprobe and a return probe on the internal read and
//! write functions that `SSL_read`, `SSL_read_ex`, `SSL_write` and `SSL_write_ex` call (or on
//! those four where their callees cannot be shown to be shared) of the `libssl` a watched
//! server maps, attached for that process only (an unwatched process using the same file never
//! traps). Each call that moved
//! bytes becomes a data record of the `http` family, flagged [`FLAG_TLS_PLAIN`], carrying the
//! plaintext in place of the socket's ciphertext.
//!
//! An `SSL*` is tied to its socket by the order of the thread's calls: the socket read
//! (`http_sys_exit` notes it per thread in [`TLS_LAST_READ`]) that comes before an `SSL_read`
//! returning bytes names that `SSL*`'s connection. This holds for a socket BIO, where the read
//! happens inside `SSL_read`, and for the memory BIOs of Python's asyncio (uvicorn), where the
//! event loop reads the socket, feeds the BIO, then calls `SSL_read` on the same thread. A
//! server reads before it writes, so writes use the tie the reads made. Once tied, the
//! connection is marked in `HTTP_CONNS` and its ciphertext is no longer copied.

use agent_common::{
    http::{
        config, cost,
        tls::{self, SslKey, CALL_EX, CALL_INNER, CALL_OUT_ARG4, CALL_WRITE},
        ConnKey, CONN_TLS, DIR_IN, DIR_OUT, FLAG_TLS_PLAIN,
    },
    lost,
};
use aya_ebpf::{
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};

use super::http::{count_cost, emit, http_config, HTTP_CONNS};
use crate::maps::count_lost;

/// One SSL call from entry to return, per thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslCall {
    ssl: u64,
    buf: u64,
    /// `size_t *readbytes` / `*written` of the `_ex` and the internal calls.
    out: u64,
    /// [`CALL_WRITE`], [`CALL_EX`] bits: the attach cookie.
    what: u64,
    /// Through a socket BIO, when the bytes moved: the first socket read inside an `SSL_read`
    /// (the request's arrival), the last socket write inside an `SSL_write` (what the client
    /// then reads). 0 through a memory BIO, where the socket calls happen outside: the call's
    /// return times its record.
    io_ns: u64,
}

/// A socket syscall of `kind` (`KIND_*` of `probes/http.rs`) returned on a TLS connection
/// while this thread was inside `call`.
#[inline(always)]
pub fn stamp_ssl_call(call: &mut SslCall, kind: u32) {
    let write = call.what & CALL_WRITE != 0;
    if write != super::http::is_out(kind) || (!write && call.io_ns != 0) {
        return;
    }
    call.io_ns = unsafe { bpf_ktime_get_ns() };
}

#[map]
pub static TLS_CALLS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(16384, 0);

/// `SSL*` → socket fd, per process (entries of a process that is no longer watched are removed
/// by userspace; an address reused for a new connection is tied again by its first read).
#[map]
pub static TLS_SSL_FD: LruHashMap<SslKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// Per thread: the watched socket last read and not yet claimed by an `SSL_read`.
#[map]
pub static TLS_LAST_READ: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

#[uprobe]
pub fn tls_enter(ctx: ProbeContext) -> u32 {
    let what = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    // The traps are paid whatever the program does next.
    count_cost(
        cost::TLS_TRAPS + ((what >> tls::TRAP_SHIFT) as u32 & 3),
        1,
    );
    if http_config(config::PAUSED) != 0 {
        return 0;
    }
    count_cost(cost::RUNS, 1);
    // Both read before either is chosen: a load from the context at an offset computed from
    // the cookie is refused by the verifier.
    let (arg3, arg4): (u64, u64) = (ctx.arg(3).unwrap_or(0), ctx.arg(4).unwrap_or(0));
    let arg4 = core::hint::black_box(arg4);
    let call = SslCall {
        ssl: ctx.arg(0).unwrap_or(0),
        buf: ctx.arg(1).unwrap_or(0),
        out: if what & CALL_INNER != 0 && what & CALL_OUT_ARG4 != 0 {
            arg4
        } else if what & (CALL_EX | CALL_INNER) != 0 {
            arg3
        } else {
            0
        },
        what,
        io_ns: 0,
    };
    if TLS_CALLS
        .insert(&bpf_get_current_pid_tgid(), &call, 0)
        .is_err()
    {
        count_lost(lost::HTTP);
    }
    0
}

#[uretprobe]
pub fn tls_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = TLS_CALLS.get_ptr(&pid_tgid) else {
        return 0;
    };
    let call = unsafe { *call };
    let _ = TLS_CALLS.remove(&pid_tgid);
    if http_config(config::PAUSED) != 0 {
        return 0;
    }
    count_cost(cost::RUNS, 1);
    let ret = ctx.ret::<u64>() as i32;
    let n = if call.what & CALL_INNER != 0 {
        if ret <= 0 || call.out == 0 {
            return 0;
        }
        unsafe { bpf_probe_read_user(call.out as *const u64) }.unwrap_or(0)
    } else if call.what & CALL_EX != 0 {
        if ret != 1 || call.out == 0 {
            return 0;
        }
        unsafe { bpf_probe_read_user(call.out as *const u64) }.unwrap_or(0)
    } else {
        if ret <= 0 {
            return 0;
        }
        ret as u64
    };
    if n == 0 {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let key = SslKey {
        tgid,
        _pad: 0,
        ssl: call.ssl,
    };
    let write = call.what & CALL_WRITE != 0;
    let fd = if write {
        TLS_SSL_FD.get_ptr(&key).map(|fd| unsafe { *fd })
    } else if let Some(fd) = TLS_LAST_READ.get_ptr(&pid_tgid) {
        let fd = unsafe { *fd };
        let _ = TLS_LAST_READ.remove(&pid_tgid);
        let _ = TLS_SSL_FD.insert(&key, &fd, 0);
        if let Some(conn) = HTTP_CONNS.get_ptr_mut(&ConnKey { tgid, fd }) {
            // Only this field changes: a racing write of the same value is harmless.
            unsafe { (*conn).state = CONN_TLS };
        }
        Some(fd)
    } else {
        TLS_SSL_FD.get_ptr(&key).map(|fd| unsafe { *fd })
    };
    let Some(fd) = fd else {
        // Bytes of a connection never read from since the agent started: nothing to tie.
        count_cost(cost::TLS_UNTIED, 1);
        return 0;
    };
    let dir = if write { DIR_OUT } else { DIR_IN };
    emit(pid_tgid, fd, dir, call.buf, n, FLAG_TLS_PLAIN, call.io_ns);
    0
}

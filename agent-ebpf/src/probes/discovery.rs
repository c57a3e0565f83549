//! Discovery by events: the kernel tells the agent when a process has loaded a CUDA driver,
//! when a process execs, and when a socket starts listening, so that userspace reads `/proc`
//! once at start and afterwards only for the processes these records name.
//!
//! Loads are seen in the dynamic loader: a uprobe on glibc's `_dl_debug_state`, the function
//! `ld.so` calls for debuggers after each change of its list of loaded objects (at start, for
//! the libraries the program needs, and at every `dlopen`). When the list is consistent again,
//! the program looks at the newest entries for a `libcuda.so*` and, the first time in the
//! process, reports it. With `HOLD_OPENERS` set it stops the process first (`SIGSTOP`,
//! delivered as the probe returns: before the library's initialisers run and before `dlopen`
//! returns to its caller), and the agent sends `SIGCONT` once the driver is attached. This
//! needs neither BPF trampolines nor syscall tracepoints, which tax every syscall on the node.

use agent_common::{
    discovery::{
        LoaderCookie, DriverLoadedEvent, ListenEvent, ProcessExecEvent, DRIVER_NAME, FLAG_HELD,
        FLAG_TLS_LIBRARY, LOADER_TAIL, NAME_MAX, TLS_LIBRARY_NAME,
    },
    lost, EventHeader, EventKind, BPF_RB_FORCE_WAKEUP,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        bpf_probe_read_user_str_bytes,
    },
    macros::{map, tracepoint, uprobe},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, TracePointContext},
};

use super::http::HTTP_WATCHED;
use crate::maps::{count_lost, stop_current};

const TCP_LISTEN: i32 = 10;
const IPPROTO_TCP: u16 = 6;
/// `r_state` of `struct r_debug` when the list of loaded objects is consistent.
const RT_CONSISTENT: i32 = 0;
/// Longest walk of a process's list of loaded objects.
const MAX_OBJECTS: u32 = 512;

/// Offsets in `sock/inet_sock_set_state` (stable since Linux 4.16).
const SET_STATE_NEWSTATE: usize = 20;
const SET_STATE_SPORT: usize = 24;
const SET_STATE_FAMILY: usize = 28;
const SET_STATE_PROTOCOL: usize = 30;

/// `struct r_debug` and `struct link_map` (glibc's public layouts, `<link.h>`).
const R_MAP: u64 = 8;
const R_STATE: u64 = 24;
const L_NAME: u64 = 8;
const L_NEXT: u64 = 24;
const L_PREV: u64 = 32;

/// 1: stop a process that loads a driver until the agent has attached.
#[unsafe(no_mangle)]
static HOLD_OPENERS: u32 = 0;
/// The agent's own process, never held: it would wait for itself.
#[unsafe(no_mangle)]
static OWN_TGID: u32 = 0;

/// The discovery records' own ring: small, rare records.
#[map]
pub static DISCOVERY_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Processes whose driver load was reported (forgotten at exec and at exit: pids are reused).
#[map]
pub static DRIVER_REPORTED: LruHashMap<u32, u32> = LruHashMap::with_max_entries(65536, 0);

/// Watched processes whose `libssl` load was reported (forgotten at exec and at exit).
#[map]
pub static TLS_REPORTED: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

/// Room for one object name, per CPU (the stack is too small for several).
#[map]
static NAME_SCRATCH: PerCpuArray<[u8; NAME_MAX]> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn global(v: &u32) -> u32 {
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn header(kind: EventKind) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind: kind as u32,
        _pad: 0,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
    }
}

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// `_dl_debug_state` in one `ld.so`; the cookie is the distance from it to that loader's
/// `_r_debug` ([`LoaderCookie`]).
#[uprobe]
pub fn discovery_loader(ctx: ProbeContext) -> u32 {
    let _ = loader_changed(&ctx);
    0
}

#[inline(always)]
fn loader_changed(ctx: &ProbeContext) -> Option<()> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let driver_due = DRIVER_REPORTED.get_ptr(&tgid).is_none();
    // OpenSSL matters only in a process whose sockets are watched.
    let tls_due = HTTP_WATCHED.get_ptr(&tgid).is_some() && TLS_REPORTED.get_ptr(&tgid).is_none();
    if !driver_due && !tls_due {
        return None;
    }
    // The uprobe handler sees the breakpoint's own address in the instruction pointer.
    let ip = unsafe { (*ctx.regs).rip };
    let cookie = LoaderCookie(unsafe { aya_ebpf::helpers::bpf_get_attach_cookie(ctx.regs.cast()) });
    let r_debug = ip.wrapping_add(cookie.r_debug_delta() as u64);
    let state: i32 = unsafe { bpf_probe_read_user((r_debug + R_STATE) as *const i32) }.ok()?;
    if state != RT_CONSISTENT {
        return None;
    }
    // The newest objects are at the tail: find it, then look back at most LOADER_TAIL.
    let mut map = read_u64(r_debug + R_MAP)?;
    let mut i = 0;
    while i < MAX_OBJECTS {
        let next = read_u64(map + L_NEXT)?;
        if next == 0 {
            break;
        }
        map = next;
        i += 1;
    }
    let mut driver = false;
    let mut tls = false;
    let mut j = 0;
    while j < LOADER_TAIL && map != 0 {
        let name = read_u64(map + L_NAME)?;
        if driver_due && !driver && is_named(name, DRIVER_NAME) {
            driver = true;
        }
        if tls_due && !tls && is_named(name, TLS_LIBRARY_NAME) {
            tls = true;
        }
        map = read_u64(map + L_PREV)?;
        j += 1;
    }
    if tls {
        let _ = TLS_REPORTED.insert(&tgid, &1, 0);
        report_tls();
    }
    if !driver {
        return None;
    }
    let _ = DRIVER_REPORTED.insert(&tgid, &1, 0);
    let Some(mut entry) = DISCOVERY_EVENTS.reserve::<DriverLoadedEvent>(0) else {
        // Not held: nobody would know to let it go.
        count_lost(lost::DISCOVERY);
        return None;
    };
    let mut flags = 0;
    if global(&HOLD_OPENERS) != 0 && tgid != global(&OWN_TGID) && stop_current(tgid) {
        flags |= FLAG_HELD;
    }
    entry.write(DriverLoadedEvent {
        header: header(EventKind::DriverLoaded),
        flags,
        _pad: 0,
    });
    entry.submit(BPF_RB_FORCE_WAKEUP);
    Some(())
}

/// A watched process loaded OpenSSL: the agent probes it for that process.
#[inline(always)]
fn report_tls() {
    let Some(mut entry) = DISCOVERY_EVENTS.reserve::<DriverLoadedEvent>(0) else {
        count_lost(lost::DISCOVERY);
        return;
    };
    entry.write(DriverLoadedEvent {
        header: header(EventKind::DriverLoaded),
        flags: FLAG_TLS_LIBRARY,
        _pad: 0,
    });
    entry.submit(BPF_RB_FORCE_WAKEUP);
}

/// Bytes at the end of a path the name check looks at: room for `/libcuda.so.` and a
/// version such as `570.133.20`.
const WINDOW: usize = 32;

/// Whether the object's name (a path) ends in `/<wanted>` or `/<wanted>.<anything>`, judged
/// on the last [`WINDOW`] bytes of the path (a fixed amount of work per object).
#[inline(always)]
fn is_named<const N: usize>(name: u64, wanted: &[u8; N]) -> bool {
    let slashed = N + 1;
    if name == 0 {
        return false;
    }
    let Some(buf) = NAME_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let buf = unsafe { &mut *buf };
    let Ok(got) = (unsafe { bpf_probe_read_user_str_bytes(name as *const u8, buf) }) else {
        return false;
    };
    let len = got.len();
    if len < slashed || len >= NAME_MAX {
        return false;
    }
    // The window's end, and the window itself: the path's last bytes.
    let end = if len >= WINDOW { WINDOW } else { len };
    let Ok(window) = (unsafe { bpf_probe_read_user((name + (len - end) as u64) as *const [u8; WINDOW]) })
        .or_else(|_| unsafe { bpf_probe_read_user(name as *const [u8; WINDOW]) })
    else {
        return false;
    };
    let mut p = 0;
    while p + slashed <= WINDOW {
        if p + slashed > end {
            break;
        }
        if window[p] == b'/' && matches_at(&window, p + 1, wanted) {
            let after = p + slashed;
            if after == end || (after < WINDOW && window[after] == b'.') {
                return true;
            }
        }
        p += 1;
    }
    false
}

#[inline(always)]
fn matches_at<const N: usize>(window: &[u8; WINDOW], at: usize, wanted: &[u8; N]) -> bool {
    let mut m = 0;
    while m < N {
        if at + m >= WINDOW || window[at + m] != wanted[m] {
            return false;
        }
        m += 1;
    }
    true
}

#[tracepoint]
pub fn discovery_exec(_ctx: TracePointContext) -> u32 {
    let h = header(EventKind::ProcessExec);
    // A new program: its driver and OpenSSL loads are news again.
    let _ = DRIVER_REPORTED.remove(&h.tgid);
    let _ = TLS_REPORTED.remove(&h.tgid);
    let Some(mut entry) = DISCOVERY_EVENTS.reserve::<ProcessExecEvent>(0) else {
        count_lost(lost::DISCOVERY);
        return 0;
    };
    entry.write(ProcessExecEvent { header: h });
    // Flag 0: the kernel wakes the reader only when it has caught up, so a burst of execs
    // (a shell script, a build) costs one wakeup.
    entry.submit(0);
    0
}

#[tracepoint]
pub fn discovery_listen(ctx: TracePointContext) -> u32 {
    let Ok(state) = (unsafe { ctx.read_at::<i32>(SET_STATE_NEWSTATE) }) else {
        return 0;
    };
    if state != TCP_LISTEN {
        return 0;
    }
    if !matches!(unsafe { ctx.read_at::<u16>(SET_STATE_PROTOCOL) }, Ok(IPPROTO_TCP)) {
        return 0;
    }
    let port = unsafe { ctx.read_at::<u16>(SET_STATE_SPORT) }.unwrap_or(0);
    let family = unsafe { ctx.read_at::<u16>(SET_STATE_FAMILY) }.unwrap_or(0);
    let Some(mut entry) = DISCOVERY_EVENTS.reserve::<ListenEvent>(0) else {
        count_lost(lost::DISCOVERY);
        return 0;
    };
    entry.write(ListenEvent {
        header: header(EventKind::Listen),
        port,
        family,
        _pad: 0,
    });
    entry.submit(0);
    0
}

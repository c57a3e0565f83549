//! Uprobes on the CUDA driver's memory API. One entry and one return program serve every
//! symbol: the attach cookie carries the `CudaApi` id, so the symbol table lives in userspace
//! (`agent_common::cuda::APIS`) and adding a symbol needs no new program. The cookie's upper
//! bits carry the library's slot, which only the hit counters use.

use agent_common::{
    config,
    cuda::{
        hits_index, stacks, stacks_index, CudaApi, CudaMemEvent, ProcessContexts,
        PROCESS_CONTEXTS, COOKIE_API_MASK, COOKIE_SLOT_SHIFT, CUDA_ERROR_OUT_OF_MEMORY,
        FLAG_DEVICE_UNKNOWN, FLAG_FROZEN, FLAG_STACK_SAMPLED, FLAG_STACK_THRESHOLD,
        HITS_MAP_ENTRIES,
    },
    lost, EventKind,
};
use aya_ebpf::{
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
        bpf_probe_read_user,
    },
    macros::{map, uprobe, uretprobe},
    maps::{LruHashMap, PerCpuArray, StackTrace},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};

use crate::maps::{config, count_lost, stop_current, submit_flags, EVENTS};

const BPF_F_USER_STACK: u64 = 1 << 8;
const CUDA_SUCCESS: u32 = 0;
const CTX_STACK_DEPTH: usize = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct StashKey {
    pid_tgid: u64,
    api: u64,
}

/// Arguments saved at entry for the return probe. The driver may sleep inside these calls,
/// so a per-CPU slot is not safe; an LRU map keeps entries of threads killed mid-call bounded.
#[repr(C)]
#[derive(Clone, Copy)]
struct Stash {
    ts_ns: u64,
    args: [u64; 5],
    /// Device of `cuMemCreate`'s `prop->location.id`, read at entry.
    device: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ThreadCtx {
    current: i32,
    depth: u32,
    stack: [i32; CTX_STACK_DEPTH],
}

#[map]
static CUDA_STASH: LruHashMap<StashKey, Stash> = LruHashMap::with_max_entries(16384, 0);

/// Process → its contexts' device ordinals, learnt from `cuDevicePrimaryCtxRetain`/
/// `cuCtxCreate_v2`; removed when the process exits (`sched_process_exit`).
#[map]
pub static CUDA_CTX_DEVICE: LruHashMap<u32, ProcessContexts> =
    LruHashMap::with_max_entries(16384, 0);

/// Thread → current device and its push/pop stack; removed when the thread exits.
#[map]
pub static CUDA_THREAD_CTX: LruHashMap<u64, ThreadCtx> = LruHashMap::with_max_entries(65536, 0);

/// Processes that made a memory call; the `sched` family reports only their exits.
#[map]
pub static CUDA_PROCESSES: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

/// Calls per (library slot, api id), per CPU: the probe budget's measure of each probe's hit
/// rate on each library.
#[map]
static CUDA_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HITS_MAP_ENTRIES, 0);

/// Bytes of successful allocations left, on this CPU, before the byte sampler picks the next
/// one below the threshold.
#[map]
static CUDA_SAMPLE_LEFT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static CUDA_STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

#[uprobe]
pub fn cuda_enter(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let api = cookie & COOKIE_API_MASK;
    let slot = (cookie >> COOKIE_SLOT_SHIFT) as u32;
    if let Some(n) = CUDA_HITS.get_ptr_mut(hits_index(slot, api as u32)) {
        unsafe { *n += 1 };
    }
    let mut stash = Stash {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        args: [
            ctx.arg::<u64>(0).unwrap_or(0),
            ctx.arg::<u64>(1).unwrap_or(0),
            ctx.arg::<u64>(2).unwrap_or(0),
            ctx.arg::<u64>(3).unwrap_or(0),
            ctx.arg::<u64>(4).unwrap_or(0),
        ],
        device: -1,
    };
    if api == CudaApi::MemCreate as u64 {
        // CUmemAllocationProp { type u32, requestedHandleTypes u32, location { type u32, id i32 } }
        let id_ptr = (stash.args[2] + 12) as *const i32;
        if let Ok(id) = unsafe { bpf_probe_read_user(id_ptr) } {
            stash.device = id as i64;
        }
    }
    let key = StashKey {
        pid_tgid: bpf_get_current_pid_tgid(),
        api,
    };
    if CUDA_STASH.insert(&key, &stash, 0).is_err() {
        count_lost(lost::STASH);
    }
    0
}

#[uretprobe]
pub fn cuda_return(ctx: RetProbeContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let api = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } & COOKIE_API_MASK;
    let pid_tgid = bpf_get_current_pid_tgid();
    let key = StashKey { pid_tgid, api };
    let Some(stash) = CUDA_STASH.get_ptr(&key) else {
        // Entered before the probe was attached, or the stash was evicted.
        return 0;
    };
    let stash = unsafe { *stash };
    let _ = CUDA_STASH.remove(&key);
    let result = ctx.ret::<u64>() as u32;
    let tgid = (pid_tgid >> 32) as u32;
    let a = stash.args;

    let (size, ptr, aux, is_alloc) = match api {
        x if x == CudaApi::MemAlloc as u64
            || x == CudaApi::MemAllocManaged as u64
            || x == CudaApi::MemAllocAsync as u64
            || x == CudaApi::MemAllocFromPoolAsync as u64
            || x == CudaApi::MemAllocHost as u64
            || x == CudaApi::MemHostAlloc as u64
            || x == CudaApi::MemCreate as u64
            || x == CudaApi::MemAddressReserve as u64 =>
        {
            (a[1], read_out(a[0], result), 0, true)
        }
        x if x == CudaApi::MemAllocPitch as u64 => {
            let pitch = read_out(a[1], result);
            (pitch * a[3], read_out(a[0], result), pitch, true)
        }
        x if x == CudaApi::MemMap as u64 => (a[1], a[0], a[3], true),
        x if x == CudaApi::MemFree as u64
            || x == CudaApi::MemFreeAsync as u64
            || x == CudaApi::MemRelease as u64
            || x == CudaApi::MemFreeHost as u64 =>
        {
            (0, a[0], 0, false)
        }
        x if x == CudaApi::MemUnmap as u64 || x == CudaApi::MemAddressFree as u64 => {
            (a[1], a[0], 0, false)
        }
        _ => {
            track_context(api, tgid, pid_tgid, &a, result);
            return 0;
        }
    };

    let mut flags = 0;
    let device = if stash.device >= 0 {
        stash.device as i32
    } else {
        match CUDA_THREAD_CTX.get_ptr(&pid_tgid) {
            Some(t) if unsafe { (*t).current } >= 0 => unsafe { (*t).current },
            _ => {
                flags |= FLAG_DEVICE_UNKNOWN;
                0
            }
        }
    };

    let failed = result != CUDA_SUCCESS;
    let mut stack_id = -1;
    let why = if failed {
        if failure_stack_due(tgid) {
            Some(stacks::FAILURE)
        } else {
            None
        }
    } else if is_alloc {
        stack_due(size)
    } else {
        None
    };
    if let Some(why) = why {
        if why == stacks::SAMPLED {
            flags |= FLAG_STACK_SAMPLED;
        } else if why == stacks::THRESHOLD {
            flags |= FLAG_STACK_SAMPLED | FLAG_STACK_THRESHOLD;
        }
        stack_id = match unsafe {
            aya_ebpf::helpers::bpf_get_stackid(
                ctx.as_ptr(),
                core::ptr::addr_of!(CUDA_STACKS) as *mut core::ffi::c_void,
                BPF_F_USER_STACK,
            )
        } {
            id if id >= 0 => id as i32,
            _ => -1,
        };
        count_stack(why);
        if stack_id < 0 {
            count_stack(stacks::MISSED);
        }
    }

    if CUDA_PROCESSES.get_ptr(&tgid).is_none() {
        let _ = CUDA_PROCESSES.insert(&tgid, &1, 0);
    }

    let Some(mut entry) = EVENTS.reserve::<CudaMemEvent>(0) else {
        // Not frozen either: nobody would know to continue it.
        count_lost(lost::CUDA);
        return 0;
    };
    if failed && is_alloc && result == CUDA_ERROR_OUT_OF_MEMORY && freeze_due(tgid) {
        flags |= FLAG_FROZEN;
    }
    entry.write(CudaMemEvent {
        header: agent_common::EventHeader {
            kind: EventKind::CudaMem as u32,
            _pad: 0,
            ts_ns: now,
            tgid,
            pid: pid_tgid as u32,
        },
        api: api as u32,
        result,
        device,
        stack_id,
        size,
        ptr,
        aux,
        duration_ns: now - stash.ts_ns,
        flags,
        _pad: 0,
    });
    entry.submit(submit_flags(failed));
    0
}

/// Processes to stop at their next out-of-memory failure, so that their Python stacks are
/// read where the call failed: armed by the agent once it has found the interpreter in the
/// process (`forensics/python.rs`), disarmed by the freeze itself; removed at exit.
#[map]
pub static CUDA_FREEZE: LruHashMap<u32, u32> = LruHashMap::with_max_entries(1024, 0);

/// Stops the process if it is armed, once: of two CPUs failing at once only the one whose
/// removal took the entry sends the signal. The stop takes effect as this probe returns to the
/// process, at the failing call's return.
#[inline(always)]
fn freeze_due(tgid: u32) -> bool {
    CUDA_FREEZE.get_ptr(&tgid).is_some()
        && CUDA_FREEZE.remove(&tgid).is_ok()
        && stop_current(tgid)
}

/// Reads a `u64` out-parameter, which is only written when the call succeeded.
#[inline(always)]
fn read_out(addr: u64, result: u32) -> u64 {
    if result != CUDA_SUCCESS || addr == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_user(addr as *const u64) }.unwrap_or(0)
}

/// Least time between two failing calls of one process whose user stacks are recorded. A
/// process failing in a loop (retries, or a driver without a device, where every call fails)
/// otherwise paid a stack walk per call; the first failure of a burst, the one a forensic
/// report is about, always has its stack.
const FAIL_STACK_GAP_NS: u64 = 1_000_000;

/// When each process last had a failing call's stack recorded; removed at its exit.
#[map]
pub static CUDA_FAIL_STACK: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn failure_stack_due(tgid: u32) -> bool {
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    match CUDA_FAIL_STACK.get_ptr_mut(&tgid) {
        Some(last) => {
            // Another CPU may race here: at worst two stacks in one gap.
            if now.wrapping_sub(unsafe { *last }) < FAIL_STACK_GAP_NS {
                return false;
            }
            unsafe { *last = now };
            true
        }
        None => {
            let _ = CUDA_FAIL_STACK.insert(&tgid, &now, 0);
            true
        }
    }
}

/// Why a successful allocation of `size` bytes has its stack walked, if it does: every one at
/// or above the threshold; below it, sampled by bytes as heap profilers do. A per-CPU
/// countdown of bytes is drawn afresh after each pick, uniformly in `[1, 2 × mean]`, so an
/// allocation of `size` bytes is picked with a probability of about `size / mean` (every
/// one of at least twice the mean), and a run of equal sizes cannot fall into step with a
/// fixed period.
#[inline(always)]
fn stack_due(size: u64) -> Option<u32> {
    let threshold = config(config::STACK_THRESHOLD_BYTES);
    if threshold != 0 && size >= threshold {
        return Some(stacks::THRESHOLD);
    }
    let mean = config(config::STACK_SAMPLE_BYTES);
    if mean == 0 {
        return None;
    }
    let left = CUDA_SAMPLE_LEFT.get_ptr_mut(0)?;
    // Per-CPU slot: no other writer while this program runs.
    let left = unsafe { &mut *left };
    if *left > size {
        *left -= size;
        return None;
    }
    let r = (u64::from(unsafe { bpf_get_prandom_u32() }) << 32)
        | u64::from(unsafe { bpf_get_prandom_u32() });
    *left = 1 + r % mean.saturating_mul(2);
    Some(stacks::SAMPLED)
}

#[inline(always)]
fn count_stack(why: u32) {
    if let Some(n) = CUDA_HITS.get_ptr_mut(stacks_index(why)) {
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn track_context(api: u64, tgid: u32, pid_tgid: u64, a: &[u64; 5], result: u32) {
    if result != CUDA_SUCCESS {
        return;
    }
    if api == CudaApi::DevicePrimaryCtxRetain as u64 || api == CudaApi::CtxCreate as u64 {
        // cuDevicePrimaryCtxRetain(CUcontext*, CUdevice); cuCtxCreate_v2(CUcontext*, flags, CUdevice)
        let dev = if api == CudaApi::CtxCreate as u64 {
            a[2]
        } else {
            a[1]
        } as i32;
        let ctx = read_out(a[0], result);
        if ctx != 0 {
            remember_context(tgid, ctx, dev);
        }
        if api == CudaApi::CtxCreate as u64 {
            set_current(pid_tgid, dev, false);
        }
    } else if api == CudaApi::CtxSetCurrent as u64 || api == CudaApi::CtxPushCurrent as u64 {
        let dev = context_device(tgid, a[0]);
        set_current(pid_tgid, dev, api == CudaApi::CtxPushCurrent as u64);
    } else if api == CudaApi::CtxPopCurrent as u64 {
        if let Some(t) = CUDA_THREAD_CTX.get_ptr_mut(&pid_tgid) {
            let t = unsafe { &mut *t };
            if t.depth > 0 {
                t.depth -= 1;
                let i = t.depth as usize;
                t.current = if i < CTX_STACK_DEPTH { t.stack[i] } else { -1 };
            } else {
                t.current = -1;
            }
        }
    }
}

#[inline(always)]
fn remember_context(tgid: u32, ctx: u64, dev: i32) {
    if CUDA_CTX_DEVICE.get_ptr(&tgid).is_none() {
        let empty = ProcessContexts {
            ctx: [0; PROCESS_CONTEXTS],
            dev: [-1; PROCESS_CONTEXTS],
            next: 0,
            _pad: 0,
        };
        // BPF_NOEXIST: a thread of the process that raced here first keeps its entry.
        let _ = CUDA_CTX_DEVICE.insert(&tgid, &empty, 1);
    }
    let Some(p) = CUDA_CTX_DEVICE.get_ptr_mut(&tgid) else {
        return;
    };
    let p = unsafe { &mut *p };
    let mut free = PROCESS_CONTEXTS;
    for i in 0..PROCESS_CONTEXTS {
        if p.ctx[i] == ctx {
            p.dev[i] = dev;
            return;
        }
        if p.ctx[i] == 0 && free == PROCESS_CONTEXTS {
            free = i;
        }
    }
    if free == PROCESS_CONTEXTS {
        free = p.next as usize % PROCESS_CONTEXTS;
        p.next = p.next.wrapping_add(1);
    }
    if free < PROCESS_CONTEXTS {
        p.ctx[free] = ctx;
        p.dev[free] = dev;
    }
}

#[inline(always)]
fn context_device(tgid: u32, ctx: u64) -> i32 {
    let Some(p) = CUDA_CTX_DEVICE.get_ptr(&tgid) else {
        return -1;
    };
    let p = unsafe { &*p };
    for i in 0..PROCESS_CONTEXTS {
        if ctx != 0 && p.ctx[i] == ctx {
            return p.dev[i];
        }
    }
    -1
}

#[inline(always)]
fn set_current(pid_tgid: u64, dev: i32, push: bool) {
    if let Some(t) = CUDA_THREAD_CTX.get_ptr_mut(&pid_tgid) {
        let t = unsafe { &mut *t };
        if push {
            let i = t.depth as usize;
            if i < CTX_STACK_DEPTH {
                t.stack[i] = t.current;
            }
            t.depth += 1;
        }
        t.current = dev;
        return;
    }
    let mut t = ThreadCtx {
        current: dev,
        depth: 0,
        stack: [-1; CTX_STACK_DEPTH],
    };
    if push {
        t.depth = 1;
    }
    let _ = CUDA_THREAD_CTX.insert(&pid_tgid, &t, 0);
}

use agent_common::{config, lost, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::{
    helpers::generated::bpf_send_signal,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};

/// The ring buffer of the `cuda`, `sched` and `oom` families. Userspace resizes it at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// The `http` family's own ring: a flood of a server's bytes fills this one, never the ring
/// that carries the CUDA ledger's allocations and frees. Same size as [`EVENTS`].
#[map]
pub static HTTP_EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Reserve failures per source, per CPU: never silent.
#[map]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(lost::COUNT, 0);

/// Knobs userspace changes while running (see `agent_common::config`).
#[map]
pub static CONFIG: Array<u64> = Array::with_max_entries(config::COUNT, 0);

/// Processes a probe stopped (`SIGSTOP`) for the agent and the agent has not continued yet,
/// by tgid: whatever state the agent's other threads are in when it leaves, it continues
/// every process still here (`agent/src/held.rs`). Removed at the process's exit.
#[map]
pub static STOPPED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

const SIGSTOP: u32 = 19;

/// Stops the current process for the agent, recorded in [`STOPPED`] first: not while the
/// agent is leaving (`STOPS_OFF`), nor when it cannot be recorded (nobody would continue it).
/// The stop takes effect as the probe returns to the process.
#[inline(always)]
pub fn stop_current(tgid: u32) -> bool {
    if config(config::STOPS_OFF) != 0 || STOPPED.insert(&tgid, &1, 0).is_err() {
        return false;
    }
    if unsafe { bpf_send_signal(SIGSTOP) } == 0 {
        return true;
    }
    let _ = STOPPED.remove(&tgid);
    false
}

#[inline(always)]
pub fn config(index: u32) -> u64 {
    CONFIG.get(index).copied().unwrap_or(0)
}

#[inline(always)]
pub fn count_lost(source: u32) {
    if let Some(n) = EVENTS_LOST.get_ptr_mut(source) {
        // Per-CPU slot: no other writer while this program runs.
        unsafe { *n += 1 };
    }
}

/// Submit flags: no wakeup per event (a wakeup costs microseconds, the consumer polls on a
/// short timer), except for urgent records and when unread data passes the configured mark.
#[inline(always)]
pub fn submit_flags(urgent: bool) -> u64 {
    submit_flags_on(&EVENTS, config::WAKEUP_BYTES, urgent)
}

/// Least time between two wakeups forced by urgent records on one CPU. A burst of failing
/// calls (a retry loop, a driver without a device) would otherwise wake the reader once per
/// call, some 8 µs each for the caller on a small node; after the first, the reader is awake
/// and polling (it sleeps only after `IDLE_POLLS` empty polls, far longer than this gap), and
/// a sleeping reader's one-byte mark wakes it on any record anyway.
const URGENT_GAP_NS: u64 = 1_000_000;

/// When this CPU last forced a wakeup for an urgent record.
#[map]
static LAST_URGENT_NS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// [`submit_flags`] for a record of `ring`, whose mark is the `CONFIG` slot `mark_knob`.
#[inline(always)]
pub fn submit_flags_on(ring: &RingBuf, mark_knob: u32, urgent: bool) -> u64 {
    if urgent {
        if let Some(last) = LAST_URGENT_NS.get_ptr_mut(0) {
            let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
            // Per-CPU slot: no other writer while this program runs.
            if now.wrapping_sub(unsafe { *last }) >= URGENT_GAP_NS {
                unsafe { *last = now };
                return BPF_RB_FORCE_WAKEUP;
            }
        }
    }
    let mark = config(mark_knob);
    if mark != 0 && ring.query(BPF_RB_AVAIL_DATA) > mark {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

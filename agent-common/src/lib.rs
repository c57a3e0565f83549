//! Records shared by the eBPF programs and the userspace agent.
//!
//! Every ring-buffer record starts with [`EventHeader`] at offset 0; `kind` says which family
//! struct follows. Structs are `#[repr(C)]`, `Copy`, without implicit padding, and their sizes
//! are pinned by `const` assertions so that kernel and userspace cannot drift apart silently.
#![no_std]

pub mod cuda;
pub mod discovery;
pub mod http;
pub mod oom;
pub mod sched;

/// Kinds of ring-buffer records. Ranges per family; ids are never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// [`cuda::CudaMemEvent`]
    CudaMem = 100,
    /// [`http::HttpDataEvent`] (variable length: header and the captured bytes)
    HttpData = 200,
    /// [`http::HttpAcceptEvent`]
    HttpAccept = 201,
    /// [`http::HttpCloseEvent`]
    HttpClose = 202,
    /// [`sched::ProcessExitEvent`]
    ProcessExit = 300,
    /// [`oom::OomKillEvent`]
    OomKill = 400,
    /// [`discovery::DriverLoadedEvent`]
    DriverLoaded = 500,
    /// [`discovery::ProcessExecEvent`]
    ProcessExec = 501,
    /// [`discovery::ListenEvent`]
    Listen = 502,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            100 => Some(Self::CudaMem),
            200 => Some(Self::HttpData),
            201 => Some(Self::HttpAccept),
            202 => Some(Self::HttpClose),
            300 => Some(Self::ProcessExit),
            400 => Some(Self::OomKill),
            500 => Some(Self::DriverLoaded),
            501 => Some(Self::ProcessExec),
            502 => Some(Self::Listen),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub tgid: u32,
    pub pid: u32,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 24);

/// Indexes of the per-CPU lost-event counter array (`EVENTS_LOST`), one per event source.
pub mod lost {
    pub const CUDA: u32 = 0;
    pub const SCHED: u32 = 1;
    pub const STASH: u32 = 2;
    pub const OOM: u32 = 3;
    pub const HTTP: u32 = 4;
    pub const DISCOVERY: u32 = 5;
    pub const COUNT: u32 = 8;
}

/// Indexes of the `CONFIG` array that userspace writes at run time.
pub mod config {
    /// Mean bytes of successful allocations between two whose user stack is walked, for
    /// those below `STACK_THRESHOLD_BYTES` (0: none of them).
    pub const STACK_SAMPLE_BYTES: u32 = 0;
    /// Bytes of unread data in `EVENTS` above which a producer forces a wakeup (1 while
    /// its reader sleeps without a timer: the next record wakes it).
    pub const WAKEUP_BYTES: u32 = 1;
    /// The same for `HTTP_EVENTS`.
    pub const HTTP_WAKEUP_BYTES: u32 = 2;
    /// Successful allocations of at least this many bytes all carry their user stack (0:
    /// none by size).
    pub const STACK_THRESHOLD_BYTES: u32 = 3;
    /// 1 once the agent is leaving: no probe stops a process any more (`STOPPED`).
    pub const STOPS_OFF: u32 = 4;
    pub const COUNT: u32 = 5;
}

/// Ring buffer submit flags (aya-ebpf 0.2 does not define them).
pub const BPF_RB_NO_WAKEUP: u64 = 1;
pub const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// `bpf_ringbuf_query` flag: amount of data not yet consumed.
pub const BPF_RB_AVAIL_DATA: u64 = 0;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for crate::EventHeader {}
    unsafe impl aya::Pod for crate::cuda::CudaMemEvent {}
    unsafe impl aya::Pod for crate::cuda::ProcessContexts {}
    unsafe impl aya::Pod for crate::http::ConnKey {}
    unsafe impl aya::Pod for crate::http::ConnState {}
    unsafe impl aya::Pod for crate::http::FdLayout {}
    unsafe impl aya::Pod for crate::http::tls::SslKey {}
    unsafe impl aya::Pod for crate::sched::ProcessExitEvent {}
    unsafe impl aya::Pod for crate::oom::OomKillEvent {}
}

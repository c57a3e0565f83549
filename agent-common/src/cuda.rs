//! CUDA driver memory API records (`probes/cuda.rs` in agent-ebpf).

use crate::EventHeader;

/// Driver API functions the `cuda` probe family knows. The id travels as the uprobe's attach
/// cookie and in [`CudaMemEvent::api`]; ids are never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CudaApi {
    MemAlloc = 1,
    MemAllocPitch = 2,
    MemAllocManaged = 3,
    MemAllocAsync = 4,
    MemAllocFromPoolAsync = 5,
    MemCreate = 6,
    MemMap = 7,
    MemAddressReserve = 8,
    MemAllocHost = 9,
    MemHostAlloc = 10,
    MemFree = 20,
    MemFreeAsync = 21,
    MemRelease = 22,
    MemUnmap = 23,
    MemAddressFree = 24,
    MemFreeHost = 25,
    CtxSetCurrent = 40,
    CtxPushCurrent = 41,
    CtxPopCurrent = 42,
    DevicePrimaryCtxRetain = 43,
    CtxCreate = 44,
}

/// Library files the `cuda` family can probe at once. Each gets a slot, carried in the attach
/// cookie, so that the probe budget measures and sheds each library's probes on their own.
pub const LIBRARY_SLOTS: u32 = 64;
/// Api ids are below this (the largest is 44); one slot's run of hit counters.
pub const API_SLOTS: u32 = 64;
/// The attach cookie is `slot << COOKIE_SLOT_SHIFT | api`.
pub const COOKIE_SLOT_SHIFT: u32 = 8;
pub const COOKIE_API_MASK: u64 = (1 << COOKIE_SLOT_SHIFT) - 1;
/// Hit counters in the hit-count array, indexed by [`hits_index`].
pub const HITS_ENTRIES: u32 = LIBRARY_SLOTS * API_SLOTS;
/// Entries of the hit-count array: the hit counters, then the stack walks by why each was
/// taken ([`stacks`], at [`stacks_index`]).
pub const HITS_MAP_ENTRIES: u32 = HITS_ENTRIES + stacks::COUNT;

/// Why a call's user stack was walked, counted per CPU after the hit counters.
pub mod stacks {
    /// A successful allocation below the threshold, picked by the byte sampler.
    pub const SAMPLED: u32 = 0;
    /// A successful allocation at or above the threshold: every one.
    pub const THRESHOLD: u32 = 1;
    /// A failing call (at most one per process per `FAIL_STACK_GAP_NS`).
    pub const FAILURE: u32 = 2;
    /// Walks of any kind that stored no stack (the stack table full, or the walk failed).
    pub const MISSED: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Index of the stack-walk counter for `why` ([`stacks`]).
pub const fn stacks_index(why: u32) -> u32 {
    HITS_ENTRIES + why
}

/// The attach cookie of `api` on the library in `slot`.
pub const fn cookie(slot: u32, api: u32) -> u64 {
    ((slot as u64) << COOKIE_SLOT_SHIFT) | api as u64
}

/// Index of the (library slot, api) hit counter.
pub const fn hits_index(slot: u32, api: u32) -> u32 {
    slot * API_SLOTS + api
}
const _: () = {
    let mut i = 0;
    while i < APIS.len() {
        assert!((APIS[i].0 as u32) < API_SLOTS);
        i += 1;
    }
};
const _: () = assert!((API_SLOTS as u64) <= COOKIE_API_MASK + 1);

/// What a call does to the memory a process holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Allocates device memory: out-pointer in arg 0, size in arg 1.
    DeviceAlloc,
    /// Allocates pinned host memory.
    HostAlloc,
    /// Creates a physical allocation handle (VMM).
    PhysicalCreate,
    /// Reserves or maps virtual address ranges (VMM); holds no memory by itself.
    AddressRange,
    /// Releases device memory by pointer.
    DeviceFree,
    HostFree,
    /// Releases a physical allocation handle.
    PhysicalRelease,
    /// Unmaps or frees a virtual address range.
    AddressRangeFree,
    /// Changes the calling thread's current context; no event.
    Context,
}

/// Every probed symbol with its id and role, in the order the agent attaches them.
pub const APIS: &[(CudaApi, &str, Role)] = &[
    (CudaApi::MemAlloc, "cuMemAlloc_v2", Role::DeviceAlloc),
    (
        CudaApi::MemAllocPitch,
        "cuMemAllocPitch_v2",
        Role::DeviceAlloc,
    ),
    (
        CudaApi::MemAllocManaged,
        "cuMemAllocManaged",
        Role::DeviceAlloc,
    ),
    (CudaApi::MemAllocAsync, "cuMemAllocAsync", Role::DeviceAlloc),
    (
        CudaApi::MemAllocFromPoolAsync,
        "cuMemAllocFromPoolAsync",
        Role::DeviceAlloc,
    ),
    (CudaApi::MemCreate, "cuMemCreate", Role::PhysicalCreate),
    (CudaApi::MemMap, "cuMemMap", Role::AddressRange),
    (
        CudaApi::MemAddressReserve,
        "cuMemAddressReserve",
        Role::AddressRange,
    ),
    (CudaApi::MemAllocHost, "cuMemAllocHost_v2", Role::HostAlloc),
    (CudaApi::MemHostAlloc, "cuMemHostAlloc", Role::HostAlloc),
    (CudaApi::MemFree, "cuMemFree_v2", Role::DeviceFree),
    (CudaApi::MemFreeAsync, "cuMemFreeAsync", Role::DeviceFree),
    (CudaApi::MemRelease, "cuMemRelease", Role::PhysicalRelease),
    (CudaApi::MemUnmap, "cuMemUnmap", Role::AddressRangeFree),
    (
        CudaApi::MemAddressFree,
        "cuMemAddressFree",
        Role::AddressRangeFree,
    ),
    (CudaApi::MemFreeHost, "cuMemFreeHost", Role::HostFree),
    (CudaApi::CtxSetCurrent, "cuCtxSetCurrent", Role::Context),
    (
        CudaApi::CtxPushCurrent,
        "cuCtxPushCurrent_v2",
        Role::Context,
    ),
    (CudaApi::CtxPopCurrent, "cuCtxPopCurrent_v2", Role::Context),
    (
        CudaApi::DevicePrimaryCtxRetain,
        "cuDevicePrimaryCtxRetain",
        Role::Context,
    ),
    (CudaApi::CtxCreate, "cuCtxCreate_v2", Role::Context),
];

impl CudaApi {
    pub fn from_u32(v: u32) -> Option<Self> {
        APIS.iter()
            .find(|(api, _, _)| *api as u32 == v)
            .map(|(api, _, _)| *api)
    }

    pub fn symbol(self) -> &'static str {
        self.entry().1
    }

    pub fn role(self) -> Role {
        self.entry().2
    }

    fn entry(self) -> &'static (CudaApi, &'static str, Role) {
        // Every variant is listed in APIS; the fallback is unreachable by construction.
        APIS.iter()
            .find(|(api, _, _)| *api == self)
            .unwrap_or(&APIS[0])
    }
}

/// One completed memory API call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaMemEvent {
    pub header: EventHeader,
    /// [`CudaApi`] id.
    pub api: u32,
    /// The `CUresult` the call returned.
    pub result: u32,
    /// Device ordinal of the calling thread's current context (or of `cuMemCreate`'s location).
    pub device: i32,
    /// User stack id in `CUDA_STACKS`, negative when none was taken.
    pub stack_id: i32,
    /// Bytes requested (pitch allocations: pitch × height; frees: the size argument if any).
    pub size: u64,
    /// Resulting device pointer or handle; for frees the pointer or handle released.
    pub ptr: u64,
    /// `cuMemMap`: the handle mapped; pitch allocations: the pitch.
    pub aux: u64,
    pub duration_ns: u64,
    /// `FLAG_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CudaMemEvent>() == 80);

/// The device ordinal was not known (no context call seen for this thread); `device` is 0.
pub const FLAG_DEVICE_UNKNOWN: u32 = 1;
/// A stack was walked for this successful call (failures always carry one): picked by the
/// byte sampler, or, with [`FLAG_STACK_THRESHOLD`], because the allocation is large.
pub const FLAG_STACK_SAMPLED: u32 = 2;
/// The allocation is at or above the stack threshold: its stack was walked whatever the
/// sampler said (`stack_id` < 0 then means the walk stored nothing).
pub const FLAG_STACK_THRESHOLD: u32 = 4;
/// The failing call's process was stopped (`SIGSTOP`) as the call returned, so that its
/// Python stacks are read where it failed: the agent continues it once they are read. Only a
/// process the agent armed (`CUDA_FREEZE`), once per arming.
pub const FLAG_FROZEN: u32 = 8;
/// `CUresult` of an allocation the device has no room for.
pub const CUDA_ERROR_OUT_OF_MEMORY: u32 = 2;

/// Contexts remembered per process: a primary context per device and the few a program
/// creates. Past that, the oldest is forgotten (its threads then report no device).
pub const PROCESS_CONTEXTS: usize = 16;

/// A process's contexts and their devices (the context → device map's value, keyed by tgid,
/// so that the process's exit removes it whole). Contexts are pointers, unique only within a
/// process; 0 marks a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessContexts {
    pub ctx: [u64; PROCESS_CONTEXTS],
    pub dev: [i32; PROCESS_CONTEXTS],
    /// Slot the next context goes to when all are taken.
    pub next: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ProcessContexts>() == 16 * 12 + 8);

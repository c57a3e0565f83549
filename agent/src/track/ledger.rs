//! The allocation ledger: per process, the live device allocations (pointer → size, api, time,
//! device, stack), physical VMM handles, pinned host allocations and reserved address ranges,
//! with totals per device. Applied only to completed, successful calls.

use std::collections::{BTreeMap, HashMap};

use agent_common::cuda::{CudaApi, CudaMemEvent, Role, FLAG_STACK_SAMPLED};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub size: u64,
    pub api: CudaApi,
    pub ts_ns: u64,
    pub device: i32,
    pub stack_id: i32,
    /// Whether the probe walked its stack (sampled, or at or above the threshold): with a
    /// `stack_id` < 0, the walk stored nothing.
    pub stack_walked: bool,
}

#[derive(Debug, Default)]
pub struct ProcessLedger {
    pub comm: String,
    device: HashMap<u64, Allocation>,
    physical: HashMap<u64, Allocation>,
    host: HashMap<u64, Allocation>,
    ranges: HashMap<u64, u64>,
    device_bytes: BTreeMap<i32, u64>,
    device_count: BTreeMap<i32, u64>,
    host_bytes: u64,
}

impl ProcessLedger {
    pub fn device_bytes(&self) -> &BTreeMap<i32, u64> {
        &self.device_bytes
    }

    pub fn device_count(&self, device: i32) -> u64 {
        self.device_count.get(&device).copied().unwrap_or(0)
    }

    pub fn host_bytes(&self) -> u64 {
        self.host_bytes
    }

    pub fn reserved_ranges(&self) -> usize {
        self.ranges.len()
    }

    /// Live device allocations (pointer-based and physical handles).
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.device.values().chain(self.physical.values())
    }

    fn live(&self) -> usize {
        self.device.len() + self.physical.len() + self.host.len() + self.ranges.len()
    }

    fn add(&mut self, a: Allocation) {
        *self.device_bytes.entry(a.device).or_insert(0) += a.size;
        *self.device_count.entry(a.device).or_insert(0) += 1;
    }

    fn sub(&mut self, a: Allocation) {
        if let Some(b) = self.device_bytes.get_mut(&a.device) {
            *b = b.saturating_sub(a.size);
        }
        if let Some(c) = self.device_count.get_mut(&a.device) {
            *c = c.saturating_sub(1);
        }
    }
}

/// What an event did to the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Device memory of `device` changed.
    Device { device: i32 },
    /// Pinned host memory changed.
    Host,
    /// A VMM address range was reserved, freed, mapped or unmapped (no memory held).
    Range,
    /// A successful release of something the ledger never saw (allocated before the agent).
    UnknownFree,
    /// The call failed; the ledger is unchanged.
    Failed,
    /// The process limit is reached; the event is dropped.
    ProcessLimit,
    /// The per-process allocation limit is reached; the allocation is not tracked.
    AllocationLimit,
    /// All processes together hold the ledger's byte budget; the allocation is not tracked.
    LedgerBudget,
}

/// Bytes one tracked allocation costs at worst: a hash-map slot of `(u64, Allocation)` and
/// its control byte, at the lowest load factor a hashbrown table has just after it grew
/// (7/16). Reserved ranges (`(u64, u64)`) cost less; counted the same.
pub const ENTRY_BYTES: usize = (size_of::<(u64, Allocation)>() + 1) * 16 / 7;
const _: () = assert!(ENTRY_BYTES == 93, "the docs name 93 bytes per allocation");

/// Bytes one tracked process costs with no allocation: its ledger, `comm`, its map entry.
pub const PROCESS_BYTES: usize = size_of::<(u32, ProcessLedger)>() + 64 + 8;

pub struct Ledger {
    procs: HashMap<u32, ProcessLedger>,
    max_processes: usize,
    max_allocations: usize,
    /// Live allocations over all processes at once (from the byte budget).
    max_total: usize,
    /// Live allocations over all processes now.
    total: usize,
}

impl Ledger {
    pub fn new(max_processes: usize, max_allocations: usize) -> Self {
        Self {
            procs: HashMap::new(),
            max_processes,
            max_allocations,
            max_total: usize::MAX,
            total: 0,
        }
    }

    /// Bounds the live allocations of all processes together to what `bytes` hold at
    /// [`ENTRY_BYTES`] each; further ones are not tracked (`Outcome::LedgerBudget`).
    pub fn with_budget(mut self, bytes: usize) -> Self {
        self.max_total = bytes / ENTRY_BYTES;
        self
    }

    /// Live allocations (and reserved ranges) tracked over all processes.
    pub fn live_total(&self) -> usize {
        self.total
    }

    pub fn process(&self, tgid: u32) -> Option<&ProcessLedger> {
        self.procs.get(&tgid)
    }

    pub fn processes(&self) -> impl Iterator<Item = (u32, &ProcessLedger)> {
        self.procs.iter().map(|(k, v)| (*k, v))
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    pub fn remove(&mut self, tgid: u32) -> Option<ProcessLedger> {
        let p = self.procs.remove(&tgid)?;
        self.total -= p.live();
        Some(p)
    }

    pub fn apply(
        &mut self,
        ev: &CudaMemEvent,
        api: CudaApi,
        comm: impl FnOnce() -> String,
    ) -> Outcome {
        if ev.result != 0 {
            return Outcome::Failed;
        }
        let tgid = ev.header.tgid;
        if !self.procs.contains_key(&tgid) {
            if self.procs.len() >= self.max_processes {
                return Outcome::ProcessLimit;
            }
            self.procs.insert(
                tgid,
                ProcessLedger {
                    comm: comm(),
                    ..Default::default()
                },
            );
        }
        let max_allocations = self.max_allocations;
        let node_full = self.total >= self.max_total;
        let Some(p) = self.procs.get_mut(&tgid) else {
            return Outcome::ProcessLimit;
        };
        let before = p.live();
        // What an addition comes to when there is no room for it; the process's own limit
        // is named first.
        let full = if before >= max_allocations {
            Some(Outcome::AllocationLimit)
        } else if node_full {
            Some(Outcome::LedgerBudget)
        } else {
            None
        };
        let outcome = Self::apply_to(p, ev, api, full);
        self.total = self.total + p.live() - before;
        outcome
    }

    fn apply_to(
        p: &mut ProcessLedger,
        ev: &CudaMemEvent,
        api: CudaApi,
        full: Option<Outcome>,
    ) -> Outcome {
        let alloc = Allocation {
            size: ev.size,
            api,
            ts_ns: ev.header.ts_ns,
            device: ev.device,
            stack_id: ev.stack_id,
            stack_walked: ev.flags & FLAG_STACK_SAMPLED != 0,
        };
        match api.role() {
            Role::DeviceAlloc | Role::PhysicalCreate => {
                if let Some(full) = full {
                    return full;
                }
                let map = if api.role() == Role::DeviceAlloc {
                    &mut p.device
                } else {
                    &mut p.physical
                };
                // A pointer handed out again without a free we saw: the old one is gone.
                if let Some(old) = map.insert(ev.ptr, alloc) {
                    p.sub(old);
                }
                p.add(alloc);
                Outcome::Device { device: ev.device }
            }
            Role::DeviceFree | Role::PhysicalRelease => {
                let map = if api.role() == Role::DeviceFree {
                    &mut p.device
                } else {
                    &mut p.physical
                };
                match map.remove(&ev.ptr) {
                    Some(old) => {
                        p.sub(old);
                        Outcome::Device { device: old.device }
                    }
                    None => Outcome::UnknownFree,
                }
            }
            Role::HostAlloc => {
                if let Some(full) = full {
                    return full;
                }
                if let Some(old) = p.host.insert(ev.ptr, alloc) {
                    p.host_bytes = p.host_bytes.saturating_sub(old.size);
                }
                p.host_bytes += alloc.size;
                Outcome::Host
            }
            Role::HostFree => match p.host.remove(&ev.ptr) {
                Some(old) => {
                    p.host_bytes = p.host_bytes.saturating_sub(old.size);
                    Outcome::Host
                }
                None => Outcome::UnknownFree,
            },
            Role::AddressRange => {
                if api == CudaApi::MemAddressReserve {
                    if let Some(full) = full {
                        return full;
                    }
                    p.ranges.insert(ev.ptr, ev.size);
                }
                Outcome::Range
            }
            Role::AddressRangeFree => {
                if api == CudaApi::MemAddressFree && p.ranges.remove(&ev.ptr).is_none() {
                    return Outcome::UnknownFree;
                }
                Outcome::Range
            }
            Role::Context => Outcome::Range,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(tgid: u32, api: CudaApi, ptr: u64, size: u64, device: i32, result: u32) -> CudaMemEvent {
        let mut e = CudaMemEvent::default();
        e.header.tgid = tgid;
        e.api = api as u32;
        e.ptr = ptr;
        e.size = size;
        e.device = device;
        e.result = result;
        e
    }

    fn apply(l: &mut Ledger, e: CudaMemEvent) -> Outcome {
        let api = CudaApi::from_u32(e.api).unwrap();
        l.apply(&e, api, || "proc".into())
    }

    #[test]
    fn allocs_and_frees_balance_per_device() {
        let mut l = Ledger::new(10, 100);
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemAlloc, 0x10, 100, 0, 0)),
            Outcome::Device { device: 0 }
        );
        apply(&mut l, ev(1, CudaApi::MemAllocAsync, 0x20, 50, 1, 0));
        apply(&mut l, ev(1, CudaApi::MemAllocPitch, 0x30, 7, 1, 0));
        let p = l.process(1).unwrap();
        assert_eq!(p.device_bytes()[&0], 100);
        assert_eq!(p.device_bytes()[&1], 57);
        assert_eq!(p.device_count(1), 2);
        // A free carries no device: the ledger knows it from the allocation.
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemFreeAsync, 0x20, 0, 0, 0)),
            Outcome::Device { device: 1 }
        );
        assert_eq!(l.process(1).unwrap().device_bytes()[&1], 7);
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemFree, 0x99, 0, 0, 0)),
            Outcome::UnknownFree
        );
        // A failed free leaves the allocation in place.
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemFree, 0x10, 0, 0, 1)),
            Outcome::Failed
        );
        assert_eq!(l.process(1).unwrap().device_bytes()[&0], 100);
    }

    #[test]
    fn failures_change_nothing() {
        let mut l = Ledger::new(10, 100);
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemAlloc, 0, 1 << 30, 0, 2)),
            Outcome::Failed
        );
        assert!(l.is_empty());
    }

    #[test]
    fn vmm_handles_hold_memory_and_ranges_do_not() {
        let mut l = Ledger::new(10, 100);
        apply(
            &mut l,
            ev(1, CudaApi::MemAddressReserve, 0x1000, 4096, 0, 0),
        );
        apply(&mut l, ev(1, CudaApi::MemCreate, 0xabc, 2 << 20, 1, 0));
        apply(&mut l, ev(1, CudaApi::MemMap, 0x1000, 2 << 20, 0, 0));
        assert_eq!(l.process(1).unwrap().device_bytes()[&1], 2 << 20);
        assert_eq!(l.process(1).unwrap().reserved_ranges(), 1);
        apply(&mut l, ev(1, CudaApi::MemUnmap, 0x1000, 2 << 20, 0, 0));
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemRelease, 0xabc, 0, 0, 0)),
            Outcome::Device { device: 1 }
        );
        assert_eq!(l.process(1).unwrap().device_bytes()[&1], 0);
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemAddressFree, 0x1000, 4096, 0, 0)),
            Outcome::Range
        );
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemRelease, 0xabc, 0, 0, 0)),
            Outcome::UnknownFree
        );
    }

    #[test]
    fn host_memory_is_apart() {
        let mut l = Ledger::new(10, 100);
        apply(&mut l, ev(1, CudaApi::MemHostAlloc, 0x5, 4096, 0, 0));
        let p = l.process(1).unwrap();
        assert_eq!(p.host_bytes(), 4096);
        assert!(p.device_bytes().is_empty());
        apply(&mut l, ev(1, CudaApi::MemFreeHost, 0x5, 0, 0, 0));
        assert_eq!(l.process(1).unwrap().host_bytes(), 0);
    }

    #[test]
    fn limits_are_enforced() {
        let mut l = Ledger::new(1, 2);
        apply(&mut l, ev(1, CudaApi::MemAlloc, 1, 1, 0, 0));
        apply(&mut l, ev(1, CudaApi::MemAlloc, 2, 1, 0, 0));
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemAlloc, 3, 1, 0, 0)),
            Outcome::AllocationLimit
        );
        assert_eq!(
            apply(&mut l, ev(2, CudaApi::MemAlloc, 3, 1, 0, 0)),
            Outcome::ProcessLimit
        );
        assert_eq!(l.process(1).unwrap().device_bytes()[&0], 2);
    }

    #[test]
    fn reused_pointer_replaces_the_old_allocation() {
        let mut l = Ledger::new(10, 100);
        apply(&mut l, ev(1, CudaApi::MemAlloc, 0x10, 100, 0, 0));
        apply(&mut l, ev(1, CudaApi::MemAlloc, 0x10, 30, 0, 0));
        assert_eq!(l.process(1).unwrap().device_bytes()[&0], 30);
    }

    #[test]
    fn the_byte_budget_bounds_all_processes_together() {
        let mut l = Ledger::new(100, 1_000_000).with_budget(50 * ENTRY_BYTES);
        for tgid in 1..=10 {
            for ptr in 1..=20 {
                apply(&mut l, ev(tgid, CudaApi::MemAlloc, ptr, 1, 0, 0));
            }
        }
        assert_eq!(l.live_total(), 50);
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemAlloc, 99, 1, 0, 0)),
            Outcome::LedgerBudget
        );
        // Frees and exits give room back.
        apply(&mut l, ev(1, CudaApi::MemFree, 1, 0, 0, 0));
        assert_eq!(l.live_total(), 49);
        l.remove(2);
        assert_eq!(l.live_total(), 29);
        assert_eq!(
            apply(&mut l, ev(1, CudaApi::MemAlloc, 99, 1, 0, 0)),
            Outcome::Device { device: 0 }
        );
        // The default budget's worst case: every process at its cap still fits.
        let d = crate::track::LimitsConfig::default();
        assert!(
            d.ledger_budget_bytes + d.max_processes * PROCESS_BYTES <= 96 * 1024 * 1024,
            "ledger worst case past 96 MiB"
        );
    }
}

//! The probe budget: when what the probes cost (hit rate × measured cost per hit) passes a
//! share of one core, shed probes in a fixed order, cheapest information first. Allocation
//! probes, which carry allocation-failure capture, are shed last.

use std::collections::HashMap;

use agent_common::cuda::{CudaApi, Role};

use super::elf::FirstInstruction;

/// Added by a return probe on top of the entry probe, in ns (docs/performance.md).
pub const RETURN_COST_NS: u64 = 250;
/// A user stack walk at return, in ns: a conservative figure for frame-pointer unwinding.
pub const STACK_COST_NS: u64 = 2_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shed {
    StackSampling,
    Api(CudaApi),
}

impl Shed {
    pub fn name(self) -> &'static str {
        match self {
            Shed::StackSampling => "stack_sampling",
            Shed::Api(api) => api.symbol(),
        }
    }
}

fn shed_rank(role: Role) -> u8 {
    match role {
        Role::HostAlloc | Role::HostFree => 0,
        Role::AddressRange | Role::AddressRangeFree => 1,
        Role::Context => 2,
        Role::DeviceFree | Role::PhysicalRelease => 3,
        Role::DeviceAlloc | Role::PhysicalCreate => 4,
    }
}

/// Cost per second of the probes in nanoseconds of CPU.
pub fn cost_ns_per_s(
    rates: &HashMap<CudaApi, f64>,
    costs: &HashMap<CudaApi, FirstInstruction>,
    stack_every: u64,
) -> f64 {
    let mut total = 0.0;
    for (api, first) in costs {
        let rate = rates.get(api).copied().unwrap_or(0.0);
        total += rate * (first.entry_cost_ns() + RETURN_COST_NS) as f64;
        if stack_every > 0 && matches!(api.role(), Role::DeviceAlloc | Role::PhysicalCreate) {
            total += rate / stack_every as f64 * STACK_COST_NS as f64;
        }
    }
    total
}

/// What to shed, in order, so that the cost falls under `share` of a core. Empty when within.
pub fn plan(
    rates: &HashMap<CudaApi, f64>,
    costs: &HashMap<CudaApi, FirstInstruction>,
    stack_every: u64,
    share: f64,
) -> Vec<Shed> {
    let limit = share * 1e9;
    if share <= 0.0 || cost_ns_per_s(rates, costs, stack_every) <= limit {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut stack_every = stack_every;
    if stack_every > 0 {
        out.push(Shed::StackSampling);
        stack_every = 0;
        if cost_ns_per_s(rates, costs, stack_every) <= limit {
            return out;
        }
    }
    let mut remaining = costs.clone();
    let mut order: Vec<CudaApi> = costs.keys().copied().collect();
    // Within a rank, the costliest probe goes first.
    order.sort_by(|a, b| {
        let cost = |api: &CudaApi| {
            rates.get(api).copied().unwrap_or(0.0) * costs[api].entry_cost_ns() as f64
        };
        shed_rank(a.role())
            .cmp(&shed_rank(b.role()))
            .then(cost(b).total_cmp(&cost(a)))
    });
    for api in order {
        if rates.get(&api).copied().unwrap_or(0.0) <= 0.0 {
            continue;
        }
        remaining.remove(&api);
        out.push(Shed::Api(api));
        if cost_ns_per_s(rates, &remaining, stack_every) <= limit {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(first: FirstInstruction) -> HashMap<CudaApi, FirstInstruction> {
        agent_common::cuda::APIS
            .iter()
            .map(|(api, _, _)| (*api, first))
            .collect()
    }

    #[test]
    fn within_budget_sheds_nothing() {
        let rates = HashMap::from([(CudaApi::MemAlloc, 1000.0), (CudaApi::MemFree, 1000.0)]);
        // 2000 hits/s × (435 + 250) ns ≈ 1.4 ms/s = 0.14 % of a core.
        assert!(plan(&rates, &costs(FirstInstruction::Emulated), 64, 0.05).is_empty());
    }

    #[test]
    fn sheds_cheap_information_first_and_allocations_last() {
        let rates = HashMap::from([
            (CudaApi::MemAlloc, 20_000.0),
            (CudaApi::MemFree, 20_000.0),
            (CudaApi::MemAllocHost, 20_000.0),
            (CudaApi::CtxSetCurrent, 20_000.0),
        ]);
        // Single-stepped probes: 15.25 µs per hit; 80k hits/s ≈ 1.2 cores.
        let p = plan(&rates, &costs(FirstInstruction::SingleStep), 64, 0.65);
        assert_eq!(
            p,
            vec![
                Shed::StackSampling,
                Shed::Api(CudaApi::MemAllocHost),
                Shed::Api(CudaApi::CtxSetCurrent),
            ]
        );
        let p = plan(&rates, &costs(FirstInstruction::SingleStep), 64, 0.01);
        assert_eq!(p.last(), Some(&Shed::Api(CudaApi::MemAlloc)));
        assert_eq!(p[p.len() - 2], Shed::Api(CudaApi::MemFree));
    }

    #[test]
    fn zero_share_means_no_budget() {
        let rates = HashMap::from([(CudaApi::MemAlloc, 1e7)]);
        assert!(plan(&rates, &costs(FirstInstruction::SingleStep), 1, 0.0).is_empty());
    }
}

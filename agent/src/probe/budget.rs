//! The probe budget: when what the probes cost (hit rate × measured cost per hit) passes a
//! share of one core, shed probes, costliest library first and, within a library, in a fixed
//! order, cheapest information first. Allocation probes, which carry allocation-failure
//! capture, are shed last. Every shed is undone after a cool-down ([`Cooldowns`]): a library
//! that one tenant makes hot costs its own probes for a while, never the driver's node-wide.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use agent_common::cuda::{CudaApi, Role};

use super::elf::FirstInstruction;

/// Added by a return probe on top of the entry probe, in ns (docs/performance.md).
pub const RETURN_COST_NS: u64 = 250;
/// A user stack walk at return, in ns: a conservative figure for frame-pointer unwinding.
pub const STACK_COST_NS: u64 = 2_000;

/// User stack walks per second, as the programs counted them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StackWalks {
    /// Of allocations below the threshold, picked by the byte sampler: shed first.
    pub sampled: f64,
    /// Of allocations at or above the threshold and of failing calls: never shed. A large
    /// allocation takes the driver far longer than the walk, and failures are rate-limited
    /// per process in the program.
    pub kept: f64,
}

impl StackWalks {
    fn cost_ns_per_s(self) -> f64 {
        (self.sampled + self.kept) * STACK_COST_NS as f64
    }
}
/// The longest cool-down, however often a probe is shed again.
pub const COOLDOWN_CAP: Duration = Duration::from_secs(30 * 60);
/// A probe that stays attached for this many of its cool-downs starts again from the base one.
pub const RESET_AFTER_COOLDOWNS: u32 = 3;

/// One api's probes (entry and return) on one library, named by the library's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Probe {
    pub slot: u32,
    pub api: CudaApi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shed {
    /// Global: one knob for every library.
    StackSampling,
    Api(Probe),
    /// The whole `http` family (`super::http_budget`).
    Http,
}

impl Shed {
    pub fn name(self) -> &'static str {
        match self {
            Shed::StackSampling => "stack_sampling",
            Shed::Api(p) => p.api.symbol(),
            Shed::Http => "http",
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

/// What one probe costs per second, in nanoseconds of CPU (its stack walks aside).
fn probe_cost(rate: f64, first: FirstInstruction) -> f64 {
    rate * (first.entry_cost_ns() + RETURN_COST_NS) as f64
}

/// Cost per second of the probes and their stack walks in nanoseconds of CPU.
pub fn cost_ns_per_s(
    rates: &HashMap<Probe, f64>,
    costs: &HashMap<Probe, FirstInstruction>,
    stacks: StackWalks,
) -> f64 {
    costs
        .iter()
        .map(|(p, first)| probe_cost(rates.get(p).copied().unwrap_or(0.0), *first))
        .sum::<f64>()
        + stacks.cost_ns_per_s()
}

/// What to shed, in order, so that the cost falls under `share` of a core. Empty when within.
/// Stack sampling goes first; then the probes of the costliest library, in rank order, then
/// those of the next library if that was not enough.
pub fn plan(
    rates: &HashMap<Probe, f64>,
    costs: &HashMap<Probe, FirstInstruction>,
    stacks: StackWalks,
    share: f64,
) -> Vec<Shed> {
    let limit = share * 1e9;
    if share <= 0.0 || cost_ns_per_s(rates, costs, stacks) <= limit {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut stacks = stacks;
    if stacks.sampled > 0.0 {
        out.push(Shed::StackSampling);
        stacks.sampled = 0.0;
        if cost_ns_per_s(rates, costs, stacks) <= limit {
            return out;
        }
    }
    let rate = |p: &Probe| rates.get(p).copied().unwrap_or(0.0);
    let cost = |p: &Probe| probe_cost(rate(p), costs[p]);
    let mut libraries: BTreeMap<u32, Vec<Probe>> = BTreeMap::new();
    for p in costs.keys() {
        libraries.entry(p.slot).or_default().push(*p);
    }
    let mut libraries: Vec<(f64, Vec<Probe>)> = libraries
        .into_values()
        .map(|probes| (probes.iter().map(cost).sum(), probes))
        .collect();
    libraries.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut remaining = costs.clone();
    for (_, mut probes) in libraries {
        // Within a rank, the costliest probe goes first.
        probes.sort_by(|a, b| {
            shed_rank(a.api.role())
                .cmp(&shed_rank(b.api.role()))
                .then(cost(b).total_cmp(&cost(a)))
                .then(a.api.cmp(&b.api))
        });
        for p in probes {
            if rate(&p) <= 0.0 {
                continue;
            }
            remaining.remove(&p);
            out.push(Shed::Api(p));
            if cost_ns_per_s(rates, &remaining, stacks) <= limit {
                return out;
            }
        }
    }
    out
}

/// When each shed probe comes back. The first shed of a probe lasts the base cool-down; a
/// probe shed again soon after it came back stays off twice as long as the last time (up to
/// [`COOLDOWN_CAP`]); one that stayed attached for [`RESET_AFTER_COOLDOWNS`] of its cool-downs
/// is forgotten and starts again from the base.
#[derive(Debug)]
pub struct Cooldowns {
    base: Duration,
    cap: Duration,
    entries: HashMap<Shed, Entry>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    cooldown: Duration,
    state: State,
}

#[derive(Clone, Copy, Debug)]
enum State {
    Shed { until: Instant },
    Attached { since: Instant },
}

impl Cooldowns {
    pub fn new(base: Duration) -> Self {
        Self {
            base,
            cap: COOLDOWN_CAP.max(base),
            entries: HashMap::new(),
        }
    }

    /// Records that `what` was shed at `now`; returns how long it stays off.
    pub fn shed(&mut self, what: Shed, now: Instant) -> Duration {
        let cooldown = match self.entries.get(&what) {
            Some(Entry {
                cooldown,
                state: State::Attached { since },
            }) if now.saturating_duration_since(*since) < *cooldown * RESET_AFTER_COOLDOWNS => {
                (*cooldown * 2).min(self.cap)
            }
            Some(Entry {
                cooldown,
                state: State::Shed { .. },
            }) => *cooldown,
            _ => self.base,
        };
        self.entries.insert(
            what,
            Entry {
                cooldown,
                state: State::Shed {
                    until: now + cooldown,
                },
            },
        );
        cooldown
    }

    /// Shed probes whose cool-down has ended, in a stable order.
    pub fn due(&self, now: Instant) -> Vec<Shed> {
        let mut out: Vec<Shed> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Shed { until } if until <= now))
            .map(|(what, _)| *what)
            .collect();
        out.sort();
        out
    }

    /// Records that `what` is attached again at `now`.
    pub fn restored(&mut self, what: Shed, now: Instant) {
        if let Some(e) = self.entries.get_mut(&what) {
            e.state = State::Attached { since: now };
        }
    }

    pub fn is_shed(&self, what: Shed) -> bool {
        self.entries
            .get(&what)
            .is_some_and(|e| matches!(e.state, State::Shed { .. }))
    }

    /// Forgets probes that have stayed attached long enough for their backoff to reset.
    pub fn forget_settled(&mut self, now: Instant) {
        self.entries.retain(|_, e| match e.state {
            State::Shed { .. } => true,
            State::Attached { since } => {
                now.saturating_duration_since(since) < e.cooldown * RESET_AFTER_COOLDOWNS
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(slot: u32, api: CudaApi) -> Probe {
        Probe { slot, api }
    }

    fn costs(slots: &[u32], first: FirstInstruction) -> HashMap<Probe, FirstInstruction> {
        slots
            .iter()
            .flat_map(|slot| {
                agent_common::cuda::APIS
                    .iter()
                    .map(move |(api, _, _)| (p(*slot, *api), first))
            })
            .collect()
    }

    fn shed(slot: u32, api: CudaApi) -> Shed {
        Shed::Api(p(slot, api))
    }

    /// Stack walks as one in 64 allocations would take them.
    fn one_in_64(allocations_per_s: f64) -> StackWalks {
        StackWalks {
            sampled: allocations_per_s / 64.0,
            kept: 0.0,
        }
    }

    #[test]
    fn within_budget_sheds_nothing() {
        let rates = HashMap::from([
            (p(0, CudaApi::MemAlloc), 1000.0),
            (p(0, CudaApi::MemFree), 1000.0),
        ]);
        // 2000 hits/s × (435 + 250) ns ≈ 1.4 ms/s = 0.14 % of a core.
        let c = costs(&[0], FirstInstruction::Emulated);
        assert!(plan(&rates, &c, one_in_64(1000.0), 0.05).is_empty());
    }

    #[test]
    fn sheds_cheap_information_first_and_allocations_last() {
        let rates = HashMap::from([
            (p(0, CudaApi::MemAlloc), 20_000.0),
            (p(0, CudaApi::MemFree), 20_000.0),
            (p(0, CudaApi::MemAllocHost), 20_000.0),
            (p(0, CudaApi::CtxSetCurrent), 20_000.0),
        ]);
        // Single-stepped probes: 15.25 µs per hit; 80k hits/s ≈ 1.2 cores.
        let c = costs(&[0], FirstInstruction::SingleStep);
        let plan_at = |share| plan(&rates, &c, one_in_64(20_000.0), share);
        assert_eq!(
            plan_at(0.65),
            vec![
                Shed::StackSampling,
                shed(0, CudaApi::MemAllocHost),
                shed(0, CudaApi::CtxSetCurrent),
            ]
        );
        let all = plan_at(0.01);
        assert_eq!(all.last(), Some(&shed(0, CudaApi::MemAlloc)));
        assert_eq!(all[all.len() - 2], shed(0, CudaApi::MemFree));
    }

    #[test]
    fn the_hot_library_is_shed_first_and_the_cold_one_untouched() {
        // Slot 3: a tenant's library in a tight loop; slot 0: the real driver, busy but modest.
        let rates = HashMap::from([
            (p(3, CudaApi::MemAlloc), 40_000.0),
            (p(3, CudaApi::MemFree), 40_000.0),
            (p(3, CudaApi::CtxSetCurrent), 40_000.0),
            (p(0, CudaApi::MemAlloc), 2_000.0),
            (p(0, CudaApi::MemFree), 2_000.0),
            (p(0, CudaApi::MemAllocHost), 500.0),
        ]);
        let c = costs(&[0, 3], FirstInstruction::SingleStep);
        // The driver alone costs ≈ 0.069 of a core: within 0.1 once the tenant's probes are off.
        let walks = one_in_64(42_000.0);
        let steps = plan(&rates, &c, walks, 0.1);
        assert_eq!(
            steps,
            vec![
                Shed::StackSampling,
                shed(3, CudaApi::CtxSetCurrent),
                shed(3, CudaApi::MemFree),
                shed(3, CudaApi::MemAlloc),
            ]
        );
        // Only when the hot library's probes are not enough is the next one touched, and
        // then again in rank order.
        let steps = plan(&rates, &c, walks, 0.05);
        assert_eq!(
            steps[4..],
            [shed(0, CudaApi::MemAllocHost), shed(0, CudaApi::MemFree)]
        );
    }

    #[test]
    fn walks_at_the_threshold_are_priced_but_never_shed() {
        let rates = HashMap::from([(p(0, CudaApi::MemAlloc), 1_000.0)]);
        let c = costs(&[0], FirstInstruction::Emulated);
        // 1,000 large allocations/s: 1,000 walks × 2 µs = 0.2 % of a core, on top of the probes.
        let walks = StackWalks {
            sampled: 0.0,
            kept: 1_000.0,
        };
        let with = cost_ns_per_s(&rates, &c, walks);
        let without = cost_ns_per_s(&rates, &c, StackWalks::default());
        assert_eq!(with - without, 1_000.0 * STACK_COST_NS as f64);
        // Over budget: no stack sampling to shed, so the probes go.
        assert_eq!(
            plan(&rates, &c, walks, 0.001),
            vec![shed(0, CudaApi::MemAlloc)]
        );
        // Sampled walks are shed first, and alone when that is enough.
        let walks = StackWalks {
            sampled: 1_000.0,
            kept: 0.0,
        };
        assert_eq!(plan(&rates, &c, walks, 0.001), vec![Shed::StackSampling]);
    }

    #[test]
    fn zero_share_means_no_budget() {
        let rates = HashMap::from([(p(0, CudaApi::MemAlloc), 1e7)]);
        let walks = one_in_64(1e7);
        assert!(plan(
            &rates,
            &costs(&[0], FirstInstruction::SingleStep),
            walks,
            0.0
        )
        .is_empty());
    }

    #[test]
    fn a_shed_probe_is_due_back_when_its_cooldown_ends() {
        let t0 = Instant::now();
        let base = Duration::from_secs(60);
        let mut c = Cooldowns::new(base);
        let hot = shed(3, CudaApi::MemAlloc);
        assert_eq!(c.shed(hot, t0), base);
        assert_eq!(
            c.shed(Shed::StackSampling, t0 + Duration::from_secs(10)),
            base
        );
        assert!(c.is_shed(hot));
        assert!(c.due(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(c.due(t0 + base), vec![hot]);
        assert_eq!(
            c.due(t0 + Duration::from_secs(70)),
            vec![Shed::StackSampling, hot]
        );
        c.restored(hot, t0 + base);
        assert!(!c.is_shed(hot));
        assert_eq!(
            c.due(t0 + Duration::from_secs(70)),
            vec![Shed::StackSampling]
        );
    }

    #[test]
    fn the_cooldown_doubles_while_shed_again_soon_and_resets_after_a_quiet_spell() {
        let base = Duration::from_secs(60);
        let mut c = Cooldowns::new(base);
        let hot = shed(3, CudaApi::MemAlloc);
        let mut now = Instant::now();
        let mut seen = Vec::new();
        // Shed again right after each re-attach: 1, 2, 4, ... minutes, capped at 30.
        for _ in 0..8 {
            let cooldown = c.shed(hot, now);
            seen.push(cooldown.as_secs() / 60);
            now += cooldown;
            assert_eq!(c.due(now), vec![hot]);
            c.restored(hot, now);
            now += Duration::from_secs(1);
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        // Attached for three cool-downs of its last length: it starts again from the base.
        now += COOLDOWN_CAP * RESET_AFTER_COOLDOWNS;
        c.forget_settled(now);
        assert_eq!(c.shed(hot, now), base);
        // Another probe's history is its own.
        let other = shed(0, CudaApi::MemAlloc);
        assert_eq!(c.shed(other, now), base);
        // Short of the reset: the backoff still doubles.
        now += base;
        c.restored(hot, now);
        now += base * RESET_AFTER_COOLDOWNS - Duration::from_secs(1);
        c.forget_settled(now);
        assert_eq!(c.shed(hot, now), base * 2);
    }

    #[test]
    fn the_cap_is_never_below_the_base() {
        let base = COOLDOWN_CAP * 2;
        let mut c = Cooldowns::new(base);
        let now = Instant::now();
        assert_eq!(c.shed(Shed::StackSampling, now), base);
        c.restored(Shed::StackSampling, now + base);
        assert_eq!(c.shed(Shed::StackSampling, now + base), base);
    }
}

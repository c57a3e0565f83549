//! What the `cuda` family's user stack walks cost an allocating thread, by allocation size:
//! stacks sampled one allocation in 64 (the rule before byte sampling), by bytes at the
//! defaults (every allocation at or above `probes.stack_threshold_bytes`, below it one per
//! `probes.stack_sample_bytes` on average), and none; each against the unprobed call. The
//! configurations are interleaved within each round, on the nop5 double (its probe is the
//! cheapest, so the walks stand out); medians over the rounds.

use std::fmt::Write as _;

use anyhow::Context;
use cuda_workload::Variant;
use inferscope::{config::Config, probe::ProbesConfig};
use tokio::runtime::Runtime;

use crate::{driver::open_variant, probes::AgentRun};

/// Allocation sizes measured: a small pool block, a caching allocator's segment, and one at
/// the default threshold.
pub const SIZES: [usize; 3] = [4 << 10, 2 << 20, 64 << 20];

/// The stack rules compared, in the table's order.
#[derive(Clone, Copy, Debug)]
enum Rule {
    None,
    OneIn64,
    Bytes,
}

impl Rule {
    const ALL: [Rule; 3] = [Rule::None, Rule::OneIn64, Rule::Bytes];

    /// The probe knobs that give this rule for allocations of `size` bytes.
    fn probes(self, size: usize) -> ProbesConfig {
        let mut p = Config::default().probes;
        match self {
            Rule::None => {
                p.stack_threshold_bytes = 0;
                p.stack_sample_bytes = 0;
            }
            // One in 64 calls of equal size: a mean of 64 allocations' bytes between walks.
            Rule::OneIn64 => {
                p.stack_threshold_bytes = 0;
                p.stack_sample_bytes = 64 * size as u64;
            }
            Rule::Bytes => {}
        }
        p
    }
}

/// One allocation size's figures.
#[derive(Clone, Debug)]
pub struct Row {
    pub size: usize,
    /// Median ns per alloc/free pair: unprobed, then per [`Rule::ALL`].
    pub unprobed_ns: f64,
    pub ns: [f64; 3],
    /// Stack walks per 1,000 allocations, per [`Rule::ALL`], over all rounds.
    pub walks_per_1000: [f64; 3],
}

#[derive(Clone, Debug)]
pub struct StackCost {
    pub pairs: u64,
    pub rounds: usize,
    pub rows: Vec<Row>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn measure(rt: &Runtime, pairs: u64, rounds: usize) -> anyhow::Result<StackCost> {
    let variant = Variant::Nop5;
    let drv = open_variant(variant)?;
    let lib = variant.lib_path();
    let mut rows = Vec::new();
    for size in SIZES {
        drv.time_pairs_of(pairs / 10, size);
        let mut unprobed = Vec::new();
        let mut ns: [Vec<f64>; 3] = Default::default();
        let mut walks = [0u64; 3];
        for _ in 0..rounds {
            unprobed.push(drv.time_pairs_of(pairs, size).as_nanos() as f64 / pairs as f64);
            for (i, rule) in Rule::ALL.iter().enumerate() {
                let run = AgentRun::start_with(rt, &lib, false, &rule.probes(size))?;
                drv.bind_context()?;
                let t = drv.time_pairs_of(pairs, size);
                let (d, _) = run.finish(rt);
                ns[i].push(t.as_nanos() as f64 / pairs as f64);
                walks[i] += d.stack_walks;
            }
        }
        let allocations = (pairs * rounds as u64) as f64;
        rows.push(Row {
            size,
            unprobed_ns: median(unprobed),
            ns: ns.map(median),
            walks_per_1000: walks.map(|w| w as f64 * 1000.0 / allocations),
        });
    }
    Ok(StackCost {
        pairs,
        rounds,
        rows,
    })
}

/// Runs [`measure`] on a runtime of its own.
pub fn measure_alone(pairs: u64, rounds: usize) -> anyhow::Result<StackCost> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    measure(&rt, pairs, rounds)
}

fn size_name(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}

pub fn table(c: &StackCost) -> String {
    let defaults = Config::default().probes;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Stack walks: one allocation in 64 (before) against byte sampling (ns per `cuMemAlloc_v2` + `cuMemFree_v2` pair on the nop5 double, median of {} rounds of {} pairs)\n",
        c.rounds, c.pairs
    );
    let _ = writeln!(
        s,
        "| allocation | unprobed | agent, no stacks | agent, 1 in 64 (before) | agent, by bytes (defaults) | walks per 1,000 allocations: 1 in 64 / by bytes |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for r in &c.rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} / {:.1} |",
            size_name(r.size),
            r.unprobed_ns,
            r.ns[0],
            r.ns[1],
            r.ns[2],
            r.walks_per_1000[1],
            r.walks_per_1000[2]
        );
    }
    let _ = writeln!(
        s,
        "\nBy bytes (`probes.stack_threshold_bytes` = {} MiB, `probes.stack_sample_bytes` = {} MiB): every allocation at or above the threshold carries its stack, so the few large ones a forensic report lists first always have theirs; below it, an allocation of `n` bytes is walked with a probability of about `n` / {} MiB. Small allocations are walked far less often than one in 64; large ones always are, which the double (whose allocations cost the same at any size) shows at its worst: on a GPU the driver spends far longer allocating 64 MiB than a walk takes.",
        defaults.stack_threshold_bytes >> 20,
        defaults.stack_sample_bytes >> 20,
        defaults.stack_sample_bytes >> 20,
    );
    s
}

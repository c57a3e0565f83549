//! The `http` family's budget. Its programs run on every read, write, send, receive, accept
//! and close of every process on the node (whether the caller is watched is decided inside
//! them), and a watched server's calls cost a copy of each buffer on top: what the family
//! costs follows the node's syscall rate, which tenants set. Each manager tick measures that
//! cost; past `probes.http_budget_core_share` of a core the family is detached as a whole (a
//! request is timed from all of its calls: no part of the family is worth keeping alone), the
//! http stage is told to drop what it half saw, and the family comes back after the cool-down
//! the CUDA probes use ([`super::budget::Cooldowns`]).
//!
//! The cost is measured where it can be: the kernel's run-time statistics of the programs
//! (`BPF_ENABLE_STATS`, which takes CAP_SYS_ADMIN, or `kernel.bpf_stats_enabled` set by the
//! operator), plus the tracepoint dispatch around each run, which they leave out. Without
//! them it is estimated from the runs and copied bytes the programs count themselves.

use std::{
    os::fd::OwnedFd,
    sync::{mpsc, Arc},
    time::Instant,
};

use agent_common::http::cost;
use aya::Ebpf;

use super::metrics::{FamilyLabels, ProbeLabels, ProbeMetrics, TrapLabels};
use super::{
    budget::{Cooldowns, Shed, RETURN_COST_NS},
    elf::FirstInstruction,
    http::{self, Control, HttpProbes},
    links::Links,
    per_cpu_sum,
};
use crate::health::Health;

/// What a run costs beyond the run time the kernel measures: the tracing path's dispatch to
/// the program and the statistics' own clock reads. Measured on the 2-core VM of
/// docs/performance.md, when the family hooked both syscall entry and exit: a write to
/// `/dev/null` in a loop took 480 ns more with the family attached, two runs of 88 ns of
/// program time each (now one run a call, on `sys_exit`).
pub const DISPATCH_NS: u64 = 150;
/// A run all in, where the statistics are off. The same loop took 350 ns more without them
/// (175 ns a run, caches hot); a run at an ordinary rate, caches cold, measured up to 500 ns
/// of program time alone. Between the two: the estimate matters at high rates.
pub const RUN_NS: u64 = 250;
/// A KiB copied from a watched process into the ring (read from the caller, written to the
/// ring), where the statistics are off: an estimate, not measured apart from the run.
pub const BYTE_NS_PER_KIB: u64 = 250;

/// Where a cost figure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The kernel's run-time statistics.
    Measured,
    /// Counted runs and bytes at [`RUN_NS`] and [`BYTE_NS_PER_KIB`].
    Estimated,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Measured => "measured",
            Source::Estimated => "estimated",
        }
    }
}

/// The family's counters at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// The kernel's run time and run count of the programs (0 while statistics are off).
    pub run_ns: u64,
    pub run_count: u64,
    /// The programs' own counts (`agent_common::http::cost`).
    pub runs: u64,
    pub bytes: u64,
    /// OpenSSL calls whose `SSL*` was never tied to a socket (their bytes not captured).
    pub tls_untied: u64,
    /// OpenSSL calls probed, by the kind of their entry trap (`agent_common::http::tls`'s
    /// `TRAP_*`).
    pub tls_traps: [u64; TRAP_KINDS],
}

const TRAP_KINDS: usize = agent_common::http::tls::TRAP_KINDS as usize;

/// What a probed OpenSSL call's traps cost, by kind (`TRAP_*` order): its entry probe's, as
/// measured for the CUDA probes on the same kind of first instruction, and its return
/// probe's. They happen before and after any program runs, so the kernel's run-time
/// statistics never see them; on the bench VM they are most of a TLS server's added cost
/// (`docs/performance.md`: tens of µs per call where OpenSSL 3's exported calls, whose first
/// instruction is single-stepped, are probed).
fn trap_ns(kind: usize) -> u64 {
    trap_kind(kind).entry_cost_ns() + RETURN_COST_NS
}

/// The probed first instruction of a `TRAP_*` kind.
fn trap_kind(kind: usize) -> FirstInstruction {
    [
        FirstInstruction::Nop5,
        FirstInstruction::Emulated,
        FirstInstruction::SingleStep,
    ][kind]
}

/// CPU time, in ns, that the counters' growth from `before` to `now` stands for. Runs the
/// kernel counted are measured; if it counted none while the programs did, its statistics are
/// off and the programs' counts are priced instead.
pub fn cost_ns(before: &Counters, now: &Counters) -> (u64, Source) {
    let traps: u64 = (0..TRAP_KINDS)
        .map(|k| now.tls_traps[k].saturating_sub(before.tls_traps[k]) * trap_ns(k))
        .sum();
    let runs = now.run_count.saturating_sub(before.run_count);
    if runs > 0 {
        let run_ns = now.run_ns.saturating_sub(before.run_ns);
        return (run_ns + runs * DISPATCH_NS + traps, Source::Measured);
    }
    let runs = now.runs.saturating_sub(before.runs);
    let bytes = now.bytes.saturating_sub(before.bytes);
    (
        runs * RUN_NS + bytes * BYTE_NS_PER_KIB / 1024 + traps,
        Source::Estimated,
    )
}

/// The family under its budget, owned by the probe manager.
pub struct HttpBudget {
    probes: HttpProbes,
    /// Share of one core the family may cost (0: no budget).
    share: f64,
    /// Keeps the kernel's run-time statistics on while it lives.
    _stats: Option<OwnedFd>,
    last: Option<(Instant, Counters)>,
    /// The counters as the metrics were last told them: from the programs' load (all zero
    /// then), so that what the first tick finds counted is not lost to its baseline.
    reported: Counters,
    /// The watcher, told of each pause and resume.
    control: Option<mpsc::Sender<Control>>,
    metrics: Arc<ProbeMetrics>,
    health: Arc<Health>,
}

impl HttpBudget {
    /// `stats`: turn the kernel's run-time statistics on (they then cost every BPF program on
    /// the node two clock reads per run).
    pub fn new(
        probes: HttpProbes,
        share: f64,
        stats: bool,
        metrics: Arc<ProbeMetrics>,
        health: Arc<Health>,
    ) -> Self {
        let stats = (stats && share > 0.0)
            .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime))
            .and_then(|r| {
                r.map_err(|e| {
                    tracing::info!(
                        error = %e,
                        "BPF run-time statistics unavailable: the http family's cost is estimated from its counted runs"
                    )
                })
                .ok()
            });
        let family = FamilyLabels { family: "http" };
        let _ = metrics.probe_cost.get_or_create(&family);
        let probe = ProbeLabels { probe: "http" };
        metrics.probe_shed.get_or_create(&probe).set(0);
        let _ = metrics.probe_sheds.get_or_create(&probe);
        Self {
            probes,
            share,
            _stats: stats,
            last: None,
            reported: Counters::default(),
            control: None,
            metrics,
            health,
        }
    }

    /// The watcher thread's control channel, told of pauses and resumes.
    pub fn with_control(mut self, control: Option<mpsc::Sender<Control>>) -> Self {
        self.control = control;
        self
    }

    fn counters(&self, ebpf: &Ebpf) -> Counters {
        let mut c = Counters {
            runs: per_cpu_sum(&self.probes.cost, cost::RUNS),
            bytes: per_cpu_sum(&self.probes.cost, cost::BYTES),
            tls_untied: per_cpu_sum(&self.probes.cost, cost::TLS_UNTIED),
            tls_traps: std::array::from_fn(|k| {
                per_cpu_sum(&self.probes.cost, cost::TLS_TRAPS + k as u32)
            }),
            ..Default::default()
        };
        for name in http::program_names() {
            if let Some(info) = ebpf.program(name).and_then(|p| p.info().ok()) {
                c.run_ns += info.run_time().as_nanos() as u64;
                c.run_count += info.run_count();
            }
        }
        c
    }

    /// Counts what the programs counted since the last report into the metrics.
    fn report(&mut self, counters: &Counters) {
        let before = std::mem::replace(&mut self.reported, *counters);
        let untied = counters.tls_untied.saturating_sub(before.tls_untied);
        if untied > 0 {
            self.metrics
                .core
                .dropped
                .get_or_create(&crate::metrics::DroppedLabels {
                    what: "tls_call",
                    reason: "untied",
                })
                .inc_by(untied);
        }
        for (k, (n, b)) in counters.tls_traps.iter().zip(before.tls_traps).enumerate() {
            if *n > b {
                self.metrics
                    .tls_calls
                    .get_or_create(&TrapLabels {
                        trap: trap_kind(k).as_str(),
                    })
                    .inc_by(n - b);
            }
        }
    }

    /// Measures the family's cost since the last tick and sheds it when past the budget.
    pub fn enforce(&mut self, ebpf: &Ebpf, now: Instant, cooldowns: &mut Cooldowns) {
        let counters = self.counters(ebpf);
        self.report(&counters);
        let Some((then, before)) = self.last.replace((now, counters)) else {
            return;
        };
        let secs = now.duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        let (ns, source) = cost_ns(&before, &counters);
        let share = ns as f64 / 1e9 / secs;
        tracing::trace!(
            cost_ns = ns,
            cost = source.label(),
            run_ns = counters.run_ns.saturating_sub(before.run_ns),
            run_count = counters.run_count.saturating_sub(before.run_count),
            runs = counters.runs.saturating_sub(before.runs),
            bytes = counters.bytes.saturating_sub(before.bytes),
            tls_calls = counters
                .tls_traps
                .iter()
                .sum::<u64>()
                .saturating_sub(before.tls_traps.iter().sum()),
            secs,
            "http family cost"
        );
        self.metrics
            .probe_cost
            .get_or_create(&FamilyLabels { family: "http" })
            .set(share);
        if self.share <= 0.0 || share <= self.share || !self.probes.is_attached() {
            return;
        }
        self.probes.detach();
        let at_ns = crate::clock::monotonic_ns();
        self.tell(Control::Paused { at_ns });
        let cooldown = cooldowns.shed(Shed::Http, now);
        self.publish(false);
        let probe = ProbeLabels { probe: "http" };
        self.metrics.probe_sheds.get_or_create(&probe).inc();
        self.health.degrade(
            "http",
            format!(
                "shed by the probe budget, {share:.3} of a core over {}: requests are not timed until it is re-attached in {} s",
                self.share,
                cooldown.as_secs()
            ),
        );
        tracing::warn!(
            probe = "http",
            estimated_core_share = format!("{share:.3}"),
            cost = source.label(),
            budget = self.share,
            cooldown_secs = cooldown.as_secs(),
            "probe budget exceeded, shedding the http family: requests are not timed meanwhile"
        );
    }

    /// Re-attaches the family after its cool-down; on an error it stays off for another.
    pub fn restore(&mut self, ebpf: &mut Ebpf, now: Instant, cooldowns: &mut Cooldowns) {
        match self.probes.reattach(ebpf) {
            Ok(()) => {
                let at_ns = crate::clock::monotonic_ns();
                self.tell(Control::Resumed { at_ns });
                cooldowns.restored(Shed::Http, now);
                // Runs while detaching and attaching belong to no interval measured.
                self.last = Some((now, self.counters(ebpf)));
                self.publish(true);
                self.health.restore("http");
                tracing::info!(
                    probe = "http",
                    "probe cool-down over, http family re-attached"
                );
            }
            Err(e) => {
                let cooldown = cooldowns.shed(Shed::Http, now);
                tracing::warn!(
                    probe = "http",
                    error = crate::error_chain(&e),
                    retry_secs = cooldown.as_secs(),
                    "cannot re-attach the http family"
                );
            }
        }
    }

    fn publish(&self, attached: bool) {
        self.metrics
            .probe_shed
            .get_or_create(&ProbeLabels { probe: "http" })
            .set(i64::from(!attached));
        self.metrics
            .probe_family_up
            .get_or_create(&FamilyLabels { family: "http" })
            .set(i64::from(attached));
    }

    fn tell(&self, c: Control) {
        if let Some(control) = &self.control {
            // The watcher ends only at shutdown, after the manager's last tick.
            let _ = control.send(c);
        }
    }

    /// The links, for the shutdown to release with the others.
    pub fn take_links(&mut self) -> Links {
        self.probes.take_links()
    }

    /// Attached now (not shed).
    pub fn is_attached(&self) -> bool {
        self.probes.is_attached()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_run_time_is_used_when_it_counts() {
        let before = Counters {
            run_ns: 1_000,
            run_count: 10,
            runs: 10,
            bytes: 0,
            tls_untied: 0,
            tls_traps: [0; TRAP_KINDS],
        };
        let now = Counters {
            run_ns: 501_000,
            run_count: 1_010,
            runs: 1_010,
            bytes: 4096,
            tls_untied: 0,
            tls_traps: [0; TRAP_KINDS],
        };
        // 500 µs of program time plus the dispatch of 1000 runs.
        assert_eq!(
            cost_ns(&before, &now),
            (500_000 + 1_000 * DISPATCH_NS, Source::Measured)
        );
    }

    #[test]
    fn counted_runs_and_bytes_are_priced_when_statistics_are_off() {
        let before = Counters::default();
        let now = Counters {
            runs: 1_000,
            bytes: 4 * 1024 * 1024,
            ..Default::default()
        };
        assert_eq!(
            cost_ns(&before, &now),
            (
                1_000 * RUN_NS + 4 * 1024 * BYTE_NS_PER_KIB,
                Source::Estimated
            )
        );
        // Nothing ran: nothing cost.
        assert_eq!(cost_ns(&now, &now), (0, Source::Estimated));
    }

    #[test]
    fn openssl_calls_are_priced_by_their_traps_measured_or_not() {
        let before = Counters::default();
        // 1,000 calls into an OpenSSL whose first instruction is single-stepped, 10 into
        // one with a nop: the traps cost them far more than their programs' runs.
        let now = Counters {
            runs: 2_020,
            tls_traps: [10, 0, 1_000],
            ..Default::default()
        };
        let traps = 10 * (180 + RETURN_COST_NS) + 1_000 * (15_000 + RETURN_COST_NS);
        assert_eq!(
            cost_ns(&before, &now),
            (2_020 * RUN_NS + traps, Source::Estimated)
        );
        let measured = Counters {
            run_ns: 400_000,
            run_count: 2_020,
            ..now
        };
        assert_eq!(
            cost_ns(&before, &measured),
            (400_000 + 2_020 * DISPATCH_NS + traps, Source::Measured)
        );
    }
}

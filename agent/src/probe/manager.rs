//! The probe manager: one thread that owns the loaded eBPF object. It discovers CUDA driver
//! libraries and attaches to new ones, moves the kernel's lost-event counts to the metrics,
//! and enforces the probe budget. Nothing here runs on the event path.

use std::{
    collections::{HashMap, HashSet},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use agent_common::{
    config as knob,
    cuda::{hits_index, APIS},
    lost,
};
use aya::{
    maps::{Array, MapData, PerCpuArray},
    Ebpf,
};

use super::metrics::{FamilyLabels, ProbeLabels, ProbeMetrics};
use super::{
    budget::{self, Cooldowns, Shed},
    cuda::CudaProbes,
    discover::{self, FileId, Library},
    http_budget::HttpBudget,
    links::Links,
    per_cpu_sum, set_config,
};
use crate::{
    health::Health,
    metrics::{DroppedLabels, SourceLabels},
    proc::ProcFs,
};

pub struct Manager {
    ebpf: Ebpf,
    cuda: Option<CudaProbes>,
    config_map: Array<MapData, u64>,
    lost_map: PerCpuArray<MapData, u64>,
    hits_map: PerCpuArray<MapData, u64>,
    metrics: Arc<ProbeMetrics>,
    health: Arc<Health>,
    /// Tracepoint links of the `sched` and `oom` families.
    links: Links,
    /// The `http` family, under its own budget.
    http: Option<HttpBudget>,
    procfs: ProcFs,
    explicit: Vec<std::path::PathBuf>,
    /// Pids whose driver mappings were handled: their maps are not read again.
    known_pids: HashSet<u32>,
    /// Reasons already logged for refusing a process's library.
    refused_reasons: HashSet<&'static str>,
    lost_seen: [u64; lost::COUNT as usize],
    /// Last hit count read, per hit counter index.
    hits_seen: HashMap<u32, u64>,
    last_budget: Instant,
    /// Stack sampling as configured, and as it is now (0 while shed).
    stack_every_configured: u64,
    stack_every: u64,
    budget_share: f64,
    cooldowns: Cooldowns,
    /// Whether the slot limit was already logged.
    limit_logged: bool,
}

/// The maps the manager reads and writes, taken out of the loaded object.
pub struct ManagerMaps {
    pub config: Array<MapData, u64>,
    pub lost: PerCpuArray<MapData, u64>,
    pub hits: PerCpuArray<MapData, u64>,
}

impl Manager {
    #[expect(
        clippy::too_many_arguments,
        reason = "the manager's inputs, named at the one call"
    )]
    pub fn new(
        ebpf: Ebpf,
        cuda: Option<CudaProbes>,
        maps: ManagerMaps,
        links: Links,
        metrics: Arc<ProbeMetrics>,
        health: Arc<Health>,
        config: &super::ProbesConfig,
        procfs: ProcFs,
        explicit: Vec<std::path::PathBuf>,
    ) -> Self {
        Self {
            ebpf,
            cuda,
            config_map: maps.config,
            lost_map: maps.lost,
            hits_map: maps.hits,
            metrics,
            health,
            links,
            http: None,
            procfs,
            explicit,
            known_pids: HashSet::new(),
            refused_reasons: HashSet::new(),
            lost_seen: [0; lost::COUNT as usize],
            hits_seen: HashMap::new(),
            last_budget: Instant::now(),
            stack_every_configured: config.stack_sample_every,
            stack_every: config.stack_sample_every,
            budget_share: config.budget_core_share,
            cooldowns: Cooldowns::new(Duration::from_secs(config.shed_cooldown_secs)),
            limit_logged: false,
        }
    }

    /// Puts the `http` family's links under its budget.
    pub fn with_http(mut self, http: Option<HttpBudget>) -> Self {
        self.http = http;
        self
    }

    /// Explicit and standard-location libraries, then those mapped by running processes.
    pub fn discover(&mut self) {
        if self.cuda.is_none() {
            return;
        }
        let mut found: Vec<Library> = Vec::new();
        for path in &self.explicit {
            // An attached library is not reopened each round; a replaced one (new inode) is.
            if discover::id_at(path).is_some_and(|id| self.knows(id)) {
                continue;
            }
            match discover::library_at(path, path.display().to_string()) {
                Ok(lib) => found.push(lib),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = crate::error_chain(&e),
                    "--cuda-lib: cannot open"
                ),
            }
        }
        found.extend(discover::standard_libraries(|id| self.knows(id)));
        // Forget pids that are gone (pids are reused).
        let procfs = &self.procfs;
        self.known_pids.retain(|pid| procfs.alive(*pid));
        for mapped in discover::mapped_libraries(&self.procfs, &self.known_pids) {
            // Tried once per process, whatever the outcome: a tenant's bad file is not
            // reopened every tick.
            self.known_pids.insert(mapped.pid);
            if self.knows(mapped.id) {
                continue;
            }
            match discover::open_mapped(&self.procfs, &mapped) {
                Ok(lib) => found.push(lib),
                Err(e) => self.refuse(&mapped, &e),
            }
        }
        for lib in discover::dedup(found) {
            self.attach(&lib);
        }
    }

    /// A process's driver mapping the agent will not open: counted, and logged once per
    /// reason (a tenant can make many).
    fn refuse(&mut self, mapped: &discover::Mapped, e: &crate::tenant_file::OpenError) {
        let reason = e.reason();
        self.metrics
            .core
            .dropped
            .get_or_create(&DroppedLabels {
                what: "cuda_library",
                reason,
            })
            .inc();
        if self.refused_reasons.insert(reason) {
            tracing::warn!(
                pid = mapped.pid,
                library = mapped.path,
                error = crate::error_chain(e),
                "a process's CUDA library is not probed (logged once per reason; counted in inferscope_dropped_total)"
            );
        } else {
            tracing::debug!(pid = mapped.pid, library = mapped.path, error = %e, "CUDA library not probed");
        }
    }

    fn attach(&mut self, lib: &Library) {
        let Some(cuda) = self.cuda.as_mut() else {
            return;
        };
        if cuda.is_attached(lib.id) {
            return;
        }
        let report = cuda.attach_library(&mut self.ebpf, lib);
        if report.over_limit {
            self.metrics
                .core
                .dropped
                .get_or_create(&DroppedLabels {
                    what: "cuda_library",
                    reason: "limit",
                })
                .inc();
            if !std::mem::replace(&mut self.limit_logged, true) {
                tracing::warn!(
                    library = lib.display,
                    limit = agent_common::cuda::LIBRARY_SLOTS,
                    "too many CUDA library files: this one and any further are not probed (logged once; counted in inferscope_dropped_total)"
                );
            }
            return;
        }
        if report.attached.is_empty() && report.denied > 0 {
            // One line, not one per symbol: the next library would be refused alike.
            let (_, error) = &report.failed[0];
            let reason =
                format!("the kernel refuses uprobes without CAP_SYS_ADMIN (Linux 6.16+): {error}");
            tracing::warn!(
                library = lib.display,
                error = reason,
                "no CUDA probe attached"
            );
            self.health.degrade("cuda", reason);
            self.metrics
                .probe_family_up
                .get_or_create(&FamilyLabels { family: "cuda" })
                .set(0);
            self.publish_attach_state();
            return;
        }
        if report.attached.is_empty() {
            tracing::warn!(library = lib.display, failed = ?report.failed, "no CUDA probe attached");
        } else {
            tracing::info!(
                library = lib.display,
                attached = report.attached.len(),
                missing = ?report.missing,
                "CUDA driver probed"
            );
        }
        for (sym, err) in &report.failed {
            tracing::warn!(
                library = lib.display,
                symbol = sym,
                error = err,
                "attach failed"
            );
        }
        self.publish_attach_state();
    }

    fn publish_attach_state(&self) {
        let Some(cuda) = &self.cuda else { return };
        let counts = cuda.attach_counts();
        let shed = cuda.shed_counts();
        for (api, sym, _) in APIS {
            let n = counts.get(api).copied().unwrap_or(0);
            self.metrics
                .probe_attached
                .get_or_create(&ProbeLabels { probe: sym })
                .set(n as i64);
            let n = shed.get(api).copied().unwrap_or(0);
            let probe = ProbeLabels { probe: sym };
            self.metrics.probe_shed.get_or_create(&probe).set(n as i64);
            // At 0 from the start, so that increase() sees the first shed.
            let _ = self.metrics.probe_sheds.get_or_create(&probe);
        }
        self.metrics
            .probe_shed
            .get_or_create(&ProbeLabels {
                probe: Shed::StackSampling.name(),
            })
            .set(self.cooldowns.is_shed(Shed::StackSampling) as i64);
        self.metrics
            .cuda_libraries
            .set(cuda.libraries().count() as i64);
    }

    pub fn knows(&self, id: FileId) -> bool {
        self.cuda.as_ref().is_some_and(|c| c.is_attached(id))
    }

    /// Moves the kernel's per-CPU lost counts into the metrics.
    pub fn publish_lost(&mut self) {
        for (index, source) in [
            (lost::CUDA, "cuda"),
            (lost::SCHED, "sched"),
            (lost::STASH, "cuda_stash"),
            (lost::HTTP, "http"),
        ] {
            let now = per_cpu_sum(&self.lost_map, index);
            let seen = &mut self.lost_seen[index as usize];
            let counter = self
                .metrics
                .core
                .events_lost
                .get_or_create(&SourceLabels { source });
            if now > *seen {
                counter.inc_by(now - *seen);
                *seen = now;
            }
        }
    }

    /// Re-attaches what has served its cool-down, measures each probe's hit rate on each
    /// library and sheds what the budget cannot pay for; the `http` family likewise, by what
    /// its programs cost.
    pub fn enforce_budget(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_budget).as_secs_f64();
        self.last_budget = now;
        self.restore_due(now);
        self.cooldowns.forget_settled(now);
        if let Some(http) = self.http.as_mut() {
            http.enforce(&self.ebpf, now, &mut self.cooldowns);
        }
        if self.cuda.is_none() {
            return;
        }
        let Some(cuda) = self.cuda.as_ref() else {
            return;
        };
        let costs = cuda.attached_costs();
        let mut rates = HashMap::new();
        for probe in costs.keys() {
            let index = hits_index(probe.slot, probe.api as u32);
            let count = per_cpu_sum(&self.hits_map, index);
            let before = self.hits_seen.insert(index, count).unwrap_or(count);
            if elapsed > 0.0 {
                rates.insert(*probe, count.saturating_sub(before) as f64 / elapsed);
            }
        }
        let plan = budget::plan(&rates, &costs, self.stack_every, self.budget_share);
        if plan.is_empty() {
            return;
        }
        let cost = budget::cost_ns_per_s(&rates, &costs, self.stack_every) / 1e9;
        for step in plan {
            let library = match step {
                Shed::StackSampling => {
                    self.stack_every = 0;
                    set_config(&mut self.config_map, knob::STACK_SAMPLE_EVERY, 0);
                    "*".to_string()
                }
                Shed::Api(probe) => {
                    let Some(name) = self.cuda.as_mut().and_then(|c| c.shed(probe)) else {
                        continue;
                    };
                    name
                }
                // Never in a CUDA plan: the http family has a budget of its own.
                Shed::Http => continue,
            };
            self.metrics
                .probe_sheds
                .get_or_create(&ProbeLabels { probe: step.name() })
                .inc();
            let cooldown = self.cooldowns.shed(step, now);
            tracing::warn!(
                probe = step.name(),
                library,
                estimated_core_share = format!("{cost:.3}"),
                budget = self.budget_share,
                cooldown_secs = cooldown.as_secs(),
                "probe budget exceeded, shedding probe"
            );
        }
        // Said only once the probes are really gone.
        self.publish_attach_state();
    }

    /// Re-attaches the shed probes whose cool-down has ended; the next budget tick measures
    /// them again.
    fn restore_due(&mut self, now: Instant) {
        let due = self.cooldowns.due(now);
        if due.is_empty() {
            return;
        }
        for step in due {
            match step {
                Shed::Http => {
                    if let Some(http) = self.http.as_mut() {
                        http.restore(&mut self.ebpf, now, &mut self.cooldowns);
                    }
                }
                Shed::StackSampling => {
                    self.stack_every = self.stack_every_configured;
                    set_config(
                        &mut self.config_map,
                        knob::STACK_SAMPLE_EVERY,
                        self.stack_every,
                    );
                    self.cooldowns.restored(step, now);
                    tracing::info!(
                        probe = step.name(),
                        "probe cool-down over, stack sampling back on"
                    );
                }
                Shed::Api(probe) => {
                    let Some(cuda) = self.cuda.as_mut() else {
                        return;
                    };
                    match cuda.reattach(&mut self.ebpf, probe) {
                        Ok(Some(library)) => {
                            // Hits counted while detaching belong to no interval measured.
                            let index = hits_index(probe.slot, probe.api as u32);
                            self.hits_seen
                                .insert(index, per_cpu_sum(&self.hits_map, index));
                            self.cooldowns.restored(step, now);
                            tracing::info!(
                                probe = step.name(),
                                library,
                                "probe cool-down over, probe re-attached"
                            );
                        }
                        Ok(None) => self.cooldowns.restored(step, now),
                        Err(e) => {
                            // Off for another cool-down; tried again then.
                            let cooldown = self.cooldowns.shed(step, now);
                            tracing::warn!(
                                probe = step.name(),
                                library = cuda.library_name(probe.slot).unwrap_or("?"),
                                error = crate::error_chain(&e),
                                retry_secs = cooldown.as_secs(),
                                "cannot re-attach a shed probe"
                            );
                        }
                    }
                }
            }
        }
        self.publish_attach_state();
    }

    /// Runs until told to stop, then detaches everything. Beats `heartbeat` every tick.
    pub fn run(
        mut self,
        interval: Duration,
        stop: mpsc::Receiver<()>,
        heartbeat: crate::health::Heartbeat,
    ) {
        loop {
            heartbeat.beat();
            match stop.recv_timeout(interval) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            self.discover();
            self.publish_lost();
            self.enforce_budget();
        }
        heartbeat.done();
        self.publish_lost();
        let mut links = std::mem::take(&mut self.links);
        if let Some(http) = self.http.as_mut() {
            links.extend(http.take_links());
        }
        if let Some(cuda) = self.cuda.as_mut() {
            links.extend(cuda.take_links());
        }
        let n = links.len();
        links.release();
        tracing::debug!(links = n, "links released");
        // Dropping the object closes every program and map.
        drop(self.ebpf);
        tracing::info!("probes detached");
    }
}

//! The probe manager: one thread that owns the loaded eBPF object. It discovers CUDA driver
//! libraries and attaches to new ones, moves the kernel's lost-event counts to the metrics,
//! and enforces the probe budget. Nothing here runs on the event path.
//!
//! Discovery reads every process's maps once, at start. Afterwards the `discovery` family's
//! records name what changed: a process mapping a driver file not yet handled (held stopped
//! until attached, when it was held), execs and new listening sockets (passed on to the
//! `http` watcher). Without that family it polls `/proc` every interval, as it must.

use std::{
    collections::{HashMap, HashSet},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use agent_common::{
    config as knob,
    cuda::{hits_index, stacks, stacks_index, APIS},
    lost,
};
use aya::{
    maps::{Array, MapData, PerCpuArray},
    Ebpf,
};

use super::metrics::{FamilyLabels, ProbeLabels, ProbeMetrics, StackLabels};
use super::{
    budget::{self, Cooldowns, Shed, StackWalks},
    cuda::CudaProbes,
    discover::{self, FileId, Library},
    discovery_hooks::DiscoveryHooks,
    http::Control,
    http_budget::HttpBudget,
    links::Links,
    per_cpu_sum, set_config,
    tls::{Looked, TlsProbes},
};
use crate::{
    health::Health,
    held::Held,
    ingest::{decode, Decoded, Discovery},
    metrics::{DroppedLabels, SourceLabels},
    proc::ProcFs,
    servers::ServerBoard,
};

/// Longest the manager waits for a held process to reach its stop before it reads its maps.
const HOLD_WAIT: Duration = Duration::from_millis(200);
/// Pids passed on to the `http` watcher in one message; past it, a rescan is asked for.
const MAX_PIDS_PER_MESSAGE: usize = 4096;
/// Processes polled at most because their loader is not probed.
const MAX_POLLED: usize = 4096;
/// Longest a stop request waits while the manager waits for records.
const STOP_LATENCY: Duration = Duration::from_millis(100);

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
    /// The kernel's discovery records; polling where absent.
    hooks: Option<DiscoveryHooks>,
    /// Where execs and new listeners go (the `http` watcher).
    servers: Option<mpsc::Sender<Control>>,
    /// OpenSSL in the watched servers, following the watcher's list.
    tls: Option<TlsProbes>,
    watched: Option<Arc<ServerBoard>>,
    /// The list's generation last followed.
    watched_generation: u64,
    /// Rung to end its sleep: its stop, a change of the watched servers.
    wake: Option<Arc<crate::wake::Wake>>,
    /// Discovery records lost so far: a loss means a full rescan.
    discovery_lost: u64,
    procfs: ProcFs,
    explicit: Vec<std::path::PathBuf>,
    /// Pids whose driver mappings were handled: their maps are not read again.
    known_pids: HashSet<u32>,
    /// Processes whose loader is not probed (musl's, one refused): with the kernel's records
    /// they are the only ones polled, until they map a driver or exit.
    polled: HashSet<u32>,
    /// Loader files that could not be probed: not tried again.
    refused_loaders: HashSet<FileId>,
    /// Reasons already logged for refusing a process's library.
    refused_reasons: HashSet<&'static str>,
    lost_seen: [u64; lost::COUNT as usize],
    /// Last hit count read, per hit counter index.
    hits_seen: HashMap<u32, u64>,
    last_budget: Instant,
    /// The byte sampler's mean as configured (stack sampling is 0 while shed).
    stack_sample_bytes: u64,
    /// Last stack-walk counts read, by why (`agent_common::cuda::stacks`).
    stacks_seen: [u64; stacks::COUNT as usize],
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

/// The `source` label of `inferscope_events_lost_total` for each index of the kernel's
/// lost-event counters that is published (named here so that docs/metrics.md is checked
/// against it).
pub const LOST_SOURCES: [(u32, &str); 6] = [
    (lost::CUDA, "cuda"),
    (lost::SCHED, "sched"),
    (lost::OOM, "oom"),
    (lost::STASH, "cuda_stash"),
    (lost::HTTP, "http"),
    (lost::DISCOVERY, "discovery"),
];

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
            hooks: None,
            servers: None,
            tls: None,
            watched: None,
            watched_generation: 0,
            wake: None,
            discovery_lost: 0,
            procfs,
            explicit,
            known_pids: HashSet::new(),
            polled: HashSet::new(),
            refused_loaders: HashSet::new(),
            refused_reasons: HashSet::new(),
            lost_seen: [0; lost::COUNT as usize],
            hits_seen: HashMap::new(),
            last_budget: Instant::now(),
            stack_sample_bytes: config.stack_sample_bytes,
            stacks_seen: [0; stacks::COUNT as usize],
            budget_share: config.budget_core_share,
            cooldowns: Cooldowns::new(Duration::from_secs(config.shed_cooldown_secs)),
            limit_logged: false,
        }
    }

    /// What ends its sleep early besides a discovery record: its stop, a change of the
    /// watched servers.
    pub fn with_wake(mut self, wake: Option<Arc<crate::wake::Wake>>) -> Self {
        self.wake = wake;
        self
    }

    /// Probes the OpenSSL of each server on `watched` (the `http` watcher's list) while it is
    /// on it.
    pub fn with_tls(mut self, tls: Option<TlsProbes>, watched: Arc<ServerBoard>) -> Self {
        self.tls = tls;
        self.watched = Some(watched);
        self
    }

    /// Follows the watched servers: OpenSSL probed in new ones, unprobed in gone ones.
    /// `retry`: processes found without a libssl are read again (no loader records for them:
    /// polling, or records lost).
    fn follow_watched(&mut self, retry: bool) {
        let (Some(tls), Some(board)) = (self.tls.as_mut(), self.watched.as_ref()) else {
            return;
        };
        if retry {
            tls.retry_without();
        }
        let generation = board.generation();
        if generation == self.watched_generation && !retry {
            return;
        }
        self.watched_generation = generation;
        let watched: HashSet<u32> = board.snapshot().into_keys().collect();
        for pid in tls.watched(&watched) {
            self.look_at_tls(pid, false);
        }
        self.publish_tls();
    }

    /// The TLS probes are part of the `http` family: off while it is shed (their traps are
    /// most of what reading TLS costs a server), back with it.
    fn follow_http_shed(&mut self) {
        let Some(attached) = self.http.as_ref().map(|h| h.is_attached()) else {
            return;
        };
        let Some(tls) = self.tls.as_mut() else {
            return;
        };
        match (attached, tls.is_paused()) {
            (false, false) => {
                tls.pause();
                tracing::info!("TLS probes detached with the http family");
                self.publish_tls();
            }
            (true, true) => {
                tls.resume();
                // Every watched server is looked at again, as at the start.
                self.follow_watched(true);
            }
            _ => {}
        }
    }

    /// One watched process's OpenSSL; `again`: its loader has just loaded one.
    fn look_at_tls(&mut self, pid: u32, again: bool) {
        let Some(tls) = self.tls.as_mut() else {
            return;
        };
        match tls.look(&mut self.ebpf, &self.procfs, pid, again) {
            Ok(Looked::Attached { library, internal }) => tracing::info!(
                pid,
                library,
                probed = if internal {
                    "internal read and write functions"
                } else {
                    "exported calls"
                },
                "reading the server's TLS as plaintext through its OpenSSL"
            ),
            Ok(Looked::NoLibrary | Looked::Known | Looked::NotWatched | Looked::Paused) => {}
            // Gone meanwhile.
            Err(super::tls::TlsAttachError::Maps) => {}
            Err(e) => {
                self.metrics
                    .core
                    .dropped
                    .get_or_create(&DroppedLabels {
                        what: "tls_library",
                        reason: e.reason(),
                    })
                    .inc();
                tracing::warn!(
                    pid,
                    error = crate::error_chain(&e),
                    "a watched server's TLS is not read (counted in inferscope_dropped_total)"
                );
            }
        }
    }

    fn publish_tls(&self) {
        if let Some(tls) = &self.tls {
            self.metrics.tls_processes.set(tls.processes() as i64);
        }
    }

    /// Puts the `http` family's links under its budget.
    pub fn with_http(mut self, http: Option<HttpBudget>) -> Self {
        self.http = http;
        self
    }

    /// Discovery from the kernel's records (see the module's docs).
    pub fn with_hooks(mut self, hooks: Option<DiscoveryHooks>) -> Self {
        self.hooks = hooks;
        self
    }

    /// Whether discovery runs on the kernel's records (else it polls).
    pub fn by_events(&self) -> bool {
        self.hooks.is_some()
    }

    /// Where execs and new listening sockets are passed on.
    pub fn with_server_events(mut self, servers: Option<mpsc::Sender<Control>>) -> Self {
        self.servers = servers;
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
        let mut found_libs = found;
        // Forget pids that are gone (pids are reused).
        let procfs = &self.procfs;
        self.known_pids.retain(|pid| procfs.alive(*pid));
        let found = discover::mapped_libraries(&self.procfs, &self.known_pids);
        for lib in self.take_found(found) {
            found_libs.push(lib);
        }
        for lib in discover::dedup(found_libs) {
            self.attach(&lib);
        }
    }

    /// Counts the reads, probes new loaders, and opens the new drivers found in processes'
    /// maps (refusals counted); returns the drivers to attach.
    fn take_found(&mut self, found: discover::Found) -> Vec<Library> {
        self.metrics
            .core
            .proc_reads
            .get_or_create(&crate::metrics::ProcFileLabels { file: "maps" })
            .inc_by(found.read);
        for loader in &found.loaders {
            self.probe_loader(loader);
        }
        if let Some(hooks) = &self.hooks {
            for &(pid, loader) in &found.loader_of {
                if hooks.knows_loader(loader) {
                    continue;
                }
                if self.polled.len() < MAX_POLLED {
                    self.polled.insert(pid);
                } else {
                    self.metrics.core.dropped("polled_process", "limit");
                }
            }
        }
        let mut libs = Vec::new();
        for mapped in found.drivers {
            // Tried once per process, whatever the outcome: a tenant's bad file is not
            // reopened every tick.
            self.known_pids.insert(mapped.pid);
            self.polled.remove(&mapped.pid);
            if self.knows(mapped.id) {
                continue;
            }
            match discover::open_mapped(&self.procfs, &mapped) {
                Ok(lib) => libs.push(lib),
                Err(e) => self.refuse(&mapped, &e),
            }
        }
        libs
    }

    /// Attaches the loader probe to a loader file not probed yet.
    fn probe_loader(&mut self, mapped: &discover::Mapped) {
        let Some(hooks) = self.hooks.as_mut() else {
            return;
        };
        if hooks.knows_loader(mapped.id) || self.refused_loaders.contains(&mapped.id) {
            return;
        }
        let result = discover::open_mapped(&self.procfs, mapped)
            .map_err(|e| (e.reason(), crate::error_chain(&e)))
            .and_then(|lib| {
                hooks
                    .attach_loader(&mut self.ebpf, &lib)
                    .map_err(|e| (e.reason(), crate::error_chain(&e)))
            });
        match result {
            Ok(()) => tracing::info!(
                loader = mapped.path,
                loaders = hooks.loaders(),
                "dynamic loader probed: driver loads are seen as they happen"
            ),
            Err((reason, error)) => {
                self.refused_loaders.insert(mapped.id);
                self.metrics.core.dropped("loader", reason);
                tracing::debug!(loader = mapped.path, error, "dynamic loader not probed");
            }
        }
    }

    /// What a tick does for discovery: with the kernel's records, only the explicit
    /// libraries (a `stat` each) and a full rescan after records were lost; without, a poll.
    fn discover_tick(&mut self) {
        if self.hooks.is_none() {
            self.discover();
            self.follow_watched(true);
            return;
        }
        let lost = per_cpu_sum(&self.lost_map, lost::DISCOVERY);
        if lost > self.discovery_lost {
            self.follow_watched(true);
            self.discovery_lost = lost;
            tracing::warn!(
                lost,
                "discovery records were lost: reading every process again"
            );
            self.known_pids.clear();
            self.discover();
            self.tell_servers(Control::Rescan);
            return;
        }
        // Processes under a loader without the probe: their maps, until they map a driver.
        let procfs = &self.procfs;
        self.polled.retain(|pid| procfs.alive(*pid));
        let mut libs = Vec::new();
        for pid in self.polled.clone() {
            let mut found = discover::Found::default();
            found.add(&self.procfs, pid);
            libs.extend(self.take_found(found));
        }
        for lib in discover::dedup(libs) {
            self.attach(&lib);
        }
        let explicit: Vec<std::path::PathBuf> = self
            .explicit
            .iter()
            .filter(|p| !discover::id_at(p).is_some_and(|id| self.knows(id)))
            .cloned()
            .collect();
        for path in explicit {
            match discover::library_at(&path, path.display().to_string()) {
                Ok(lib) => self.attach(&lib),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = crate::error_chain(&e),
                    "--cuda-lib: cannot open"
                ),
            }
        }
    }

    fn tell_servers(&self, c: Control) {
        if let Some(tx) = &self.servers {
            let _ = tx.send(c);
        }
    }

    /// Reads every discovery record waiting: driver mappings are handled at once (their
    /// openers may be held), execs and listeners passed on in one message each.
    fn drain_discovery(&mut self) {
        let mut loaded = Vec::new();
        let mut tls_loaded: Vec<u32> = Vec::new();
        let mut execs: Vec<u32> = Vec::new();
        let mut listens: Vec<(u32, u16)> = Vec::new();
        let mut overflow = false;
        if let Some(hooks) = self.hooks.as_mut() {
            while let Some(item) = hooks.ring.next() {
                match decode(&item) {
                    Ok(Decoded::Discovery(Discovery::DriverLoaded(e)))
                        if e.flags & agent_common::discovery::FLAG_TLS_LIBRARY != 0 =>
                    {
                        tls_loaded.push(e.header.tgid)
                    }
                    Ok(Decoded::Discovery(Discovery::DriverLoaded(e))) => loaded.push(e),
                    Ok(Decoded::Discovery(Discovery::Exec(e))) => {
                        if execs.len() < MAX_PIDS_PER_MESSAGE {
                            execs.push(e.header.tgid);
                        } else {
                            overflow = true;
                        }
                    }
                    Ok(Decoded::Discovery(Discovery::Listen(e))) => {
                        if listens.len() < MAX_PIDS_PER_MESSAGE {
                            listens.push((e.header.tgid, e.port));
                        } else {
                            overflow = true;
                        }
                    }
                    Ok(_) => self.metrics.core.drop_reason("unknown_kind"),
                    Err(e) => self.metrics.core.drop_reason(e.reason()),
                }
                // Held processes wait: they are let go before the next batch is read.
                if loaded.len() >= 64 {
                    break;
                }
            }
        }
        for e in loaded {
            self.driver_loaded(&e);
        }
        if !tls_loaded.is_empty() {
            self.follow_watched(false);
            for pid in tls_loaded {
                self.look_at_tls(pid, true);
            }
            self.publish_tls();
        }
        if self.cuda.is_some() {
            // A new program: its loader and whatever driver it maps already (one read).
            for &pid in &execs {
                self.look_at(pid);
            }
        }
        if overflow {
            self.tell_servers(Control::Rescan);
        } else {
            if !execs.is_empty() {
                execs.sort_unstable();
                execs.dedup();
                self.tell_servers(Control::Execs(execs));
            }
            if !listens.is_empty() {
                self.tell_servers(Control::Listening(listens));
            }
        }
    }

    /// One process's maps, read once: its loader probed, its new drivers attached. A new
    /// loader means the process may have loaded a driver before the probe was there: its maps
    /// are read once more.
    fn look_at(&mut self, pid: u32) {
        let loaders = self.hooks.as_ref().map_or(0, |h| h.loaders());
        let mut found = discover::Found::default();
        found.add(&self.procfs, pid);
        let mut libs = self.take_found(found);
        if self.hooks.as_ref().map_or(0, |h| h.loaders()) > loaders {
            let mut again = discover::Found::default();
            again.add(&self.procfs, pid);
            libs.extend(self.take_found(again));
        }
        for lib in discover::dedup(libs) {
            self.attach(&lib);
        }
    }

    /// A process's loader has loaded a driver: its maps are read (that process's only), new
    /// driver files attached or refused, and the process let go if it was held.
    fn driver_loaded(&mut self, e: &agent_common::discovery::DriverLoadedEvent) {
        let started = Instant::now();
        let pid = e.header.tgid;
        let held = (e.flags & agent_common::discovery::FLAG_HELD != 0).then(|| Held::new(pid));
        if held.is_some() {
            // Stopped means the probe has returned; the mapping was there before it ran.
            let deadline = started + HOLD_WAIT;
            while self.procfs.thread_stopped(pid, e.header.pid) == Some(false)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        self.known_pids.remove(&pid);
        self.look_at(pid);
        if let Some(held) = held {
            held.release();
            let seconds = started.elapsed().as_secs_f64();
            self.metrics.openers_held.inc();
            self.metrics.opener_hold_seconds.observe(seconds);
            tracing::debug!(pid, seconds, "process held at its driver load let go");
        }
    }

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
                past_first_instruction = report.past_first_instruction,
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
        for (index, source) in LOST_SOURCES {
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

    /// The programs' stack walks since the last tick, per second over `elapsed` seconds;
    /// counted on `inferscope_cuda_stacks_total` by why each was taken.
    fn stack_walks(&mut self, elapsed: f64) -> StackWalks {
        let mut per_s = [0.0; stacks::COUNT as usize];
        for (why, name) in [
            (stacks::SAMPLED, "sampled"),
            (stacks::THRESHOLD, "threshold"),
            (stacks::FAILURE, "failure"),
            (stacks::MISSED, "missed"),
        ] {
            let now = per_cpu_sum(&self.hits_map, stacks_index(why));
            let seen = &mut self.stacks_seen[why as usize];
            let new = now.saturating_sub(*seen);
            *seen = now;
            self.metrics
                .cuda_stacks
                .get_or_create(&StackLabels { why: name })
                .inc_by(new);
            if elapsed > 0.0 {
                per_s[why as usize] = new as f64 / elapsed;
            }
        }
        StackWalks {
            sampled: per_s[stacks::SAMPLED as usize],
            kept: per_s[stacks::THRESHOLD as usize] + per_s[stacks::FAILURE as usize],
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
        self.follow_http_shed();
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
        let walks = self.stack_walks(elapsed);
        let plan = budget::plan(&rates, &costs, walks, self.budget_share);
        if plan.is_empty() {
            return;
        }
        let cost = budget::cost_ns_per_s(&rates, &costs, walks) / 1e9;
        for step in plan {
            let library = match step {
                Shed::StackSampling => {
                    set_config(&mut self.config_map, knob::STACK_SAMPLE_BYTES, 0);
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
                    set_config(
                        &mut self.config_map,
                        knob::STACK_SAMPLE_BYTES,
                        self.stack_sample_bytes,
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
    /// Discovery records are handled as they come; the rest every `interval`.
    pub fn run(
        mut self,
        interval: Duration,
        stop: mpsc::Receiver<()>,
        heartbeat: crate::health::Heartbeat,
    ) {
        let mut next = Instant::now() + interval;
        loop {
            heartbeat.beat();
            let wait = next.saturating_duration_since(Instant::now());
            let stopped = match &self.hooks {
                Some(hooks) => {
                    // Without a wake to ring, the stop and the watched servers are looked at
                    // every STOP_LATENCY.
                    let wake = self.wake.clone();
                    let wake = wake.as_deref();
                    let wait = if wake.is_some() {
                        wait
                    } else {
                        wait.min(STOP_LATENCY)
                    };
                    if hooks.wait(wait, wake) {
                        self.drain_discovery();
                    }
                    if let Some(w) = wake {
                        w.clear();
                    }
                    !matches!(stop.try_recv(), Err(mpsc::TryRecvError::Empty))
                }
                None => !matches!(
                    stop.recv_timeout(wait),
                    Err(mpsc::RecvTimeoutError::Timeout)
                ),
            };
            if stopped {
                break;
            }
            self.follow_watched(false);
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + interval;
            self.discover_tick();
            self.publish_lost();
            self.enforce_budget();
        }
        heartbeat.done();
        self.publish_lost();
        // The probes stop no process any more (`held::stops_off`): those held until now are
        // let go before the detach, which takes a while on a VM.
        self.release_held();
        let mut links = std::mem::take(&mut self.links);
        if let Some(hooks) = self.hooks.as_mut() {
            links.extend(hooks.take_links());
        }
        if let Some(http) = self.http.as_mut() {
            links.extend(http.take_links());
        }
        if let Some(cuda) = self.cuda.as_mut() {
            links.extend(cuda.take_links());
        }
        if let Some(tls) = self.tls.as_mut() {
            links.extend(tls.take_links());
        }
        let n = links.len();
        links.release();
        tracing::debug!(links = n, "links released");
        self.release_held();
        // Dropping the object closes every program and map.
        drop(self.ebpf);
        tracing::info!("probes detached");
    }
}

impl Manager {
    /// After the detach: a process the loader probe stopped in the moment before would wait
    /// for nobody. Every held process still in the ring is let go.
    fn release_held(&mut self) {
        let Some(hooks) = self.hooks.as_mut() else {
            return;
        };
        while let Some(item) = hooks.ring.next() {
            if let Ok(Decoded::Discovery(Discovery::DriverLoaded(e))) = decode(&item) {
                if e.flags & agent_common::discovery::FLAG_HELD != 0 {
                    drop(Held::new(e.header.tgid));
                }
            }
        }
    }
}

//! Wiring of the pipeline and its shutdown. Order on the way out: stop the ring-buffer
//! reader (it drains what is left), let the tracker drain its channel, stop the exporter,
//! flush OTLP (bounded), detach the probes. The whole shutdown has a deadline, so that a stage
//! stuck in a call (NVML, a file a tenant planted) cannot keep the agent from exiting: each
//! stage gets [`STAGE_SHARE`], the stages and the flush end by [`DRAIN_BY`], the detach by
//! [`DETACH_BY`], and the process by [`EXIT_BY`] whatever happens; what did not finish is
//! named in the log and left to the process's exit (the kernel detaches the probes when their
//! descriptors close). Detaching takes the kernel a while (an RCU grace period per
//! tracepoint: seconds for a few dozen), in the agent or at its exit alike, so the drain ends
//! early enough to leave it that time.

use std::{
    path::Path,
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::{
    config::Config,
    deadline::{self, Deadline},
    export::{http, otlp},
    forensics,
    gpu::{self, history::GpuHistory},
    health::{self, Health},
    ingest,
    metrics::Metrics,
    probe::{
        self,
        cuda::CudaProbes,
        http_budget::HttpBudget,
        manager::{Manager, ManagerMaps},
        metrics::FamilyLabels,
    },
    proc::ProcFs,
    queue,
    track::{self, Tracker},
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("inferscope must run as root (it loads eBPF programs: CAP_BPF, CAP_PERFMON)")]
    NotRoot,
    #[error("the kernel has no BTF (/sys/kernel/btf/vmlinux is missing); a kernel built with CONFIG_DEBUG_INFO_BTF is required")]
    NoBtf,
    #[error(transparent)]
    Bind(#[from] http::BindError),
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error("cannot start the probe manager thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Otlp(#[from] otlp::OtlpError),
    #[error(transparent)]
    Capability(#[from] crate::caps::Missing),
}

pub fn preflight() -> Result<(), StartError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(StartError::NotRoot);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(StartError::NoBtf);
    }
    if let Some(held) = crate::caps::Held::current() {
        held.required()?;
    }
    Ok(())
}

/// BPF maps and ring buffers count against RLIMIT_MEMLOCK on kernels before 5.11 (later ones
/// charge the memory cgroup instead), and a container's default limit is far below the ring
/// buffer: the limit is lifted (CAP_SYS_RESOURCE, which the DaemonSet grants for this), else
/// the soft limit is raised to the hard one.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit and getrlimit only read or write the struct they are given.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return;
    }
    let denied = std::io::Error::last_os_error();
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut now) == 0 && {
            now.rlim_cur = now.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &now) == 0
        }
    };
    tracing::debug!(
        error = %denied,
        limit_bytes = raised.then_some(now.rlim_max),
        "RLIMIT_MEMLOCK not lifted (no CAP_SYS_RESOURCE; only kernels before 5.11 need it)"
    );
}

/// How long the OTLP flush may hold up shutdown (never past [`DRAIN_BY`]).
const OTLP_FLUSH: Duration = Duration::from_secs(5);
/// The longest wait for one stage to end once told to stop: a stuck stage costs the others no
/// more than this (they have all been told at once, so they end meanwhile).
const STAGE_SHARE: Duration = Duration::from_secs(1);
/// From SIGTERM: every stage has ended or been left, and OTLP flushed.
const DRAIN_BY: Duration = Duration::from_millis(2500);
/// How long the probe manager has to leave its loop once told to stop (it is between two
/// discovery rounds, or in one); past it, it is stuck in discovery and not waited for.
const MANAGER_SHARE: Duration = Duration::from_millis(500);
/// From SIGTERM: the probe manager has detached the probes, or been left.
const DETACH_BY: Duration = Duration::from_millis(4500);
/// From SIGTERM: the process ends, even with every runtime thread stuck.
const EXIT_BY: Duration = Duration::from_millis(4750);

/// Starts the probe families one by one: one that cannot load or attach is logged once and
/// left out (`inferscope_probe_family_up{family} 0`, named by `/healthz`), and the agent runs
/// on with the others.
struct Families<'a> {
    config: &'a Config,
    metrics: &'a probe::metrics::ProbeMetrics,
    health: &'a Health,
    /// Why tracefs is unavailable, when it is: families of tracepoints cannot start.
    tracefs: Option<&'a String>,
}

impl Families<'_> {
    fn start<T>(
        &mut self,
        family: &'static str,
        tracepoints: bool,
        attach: impl FnOnce(&mut aya::Ebpf) -> Result<T, probe::ProbeError>,
        ebpf: &mut aya::Ebpf,
    ) -> Option<T> {
        let up = |v: i64| {
            self.metrics
                .probe_family_up
                .get_or_create(&FamilyLabels { family })
                .set(v)
        };
        if self.config.probes.disabled.iter().any(|d| d == family) {
            up(0);
            return None;
        }
        let result = match self.tracefs {
            Some(why) if tracepoints => Err(why.clone()),
            _ => attach(ebpf).map_err(|e| crate::error_chain(&e)),
        };
        match result {
            Ok(t) => {
                up(1);
                Some(t)
            }
            Err(reason) => {
                tracing::warn!(
                    family,
                    error = reason,
                    "probe family not started; the others run on"
                );
                self.health.degrade(family, reason);
                up(0);
                None
            }
        }
    }
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    preflight()?;
    raise_memlock();
    let listener = http::bind(config.prometheus_listen).await?;
    let m = StageMetrics::new();
    let metrics = m.core.clone();
    let health = Arc::new(Health::new());
    for (family, shortfall) in crate::caps::Held::current()
        .map(|held| held.shortfalls())
        .unwrap_or_default()
    {
        tracing::warn!(family, "{shortfall}");
        health.degrade(family, shortfall.to_string());
    }

    // Before the first tracepoint (and the format file read just below).
    let tracefs = probe::tracefs::ensure().map_err(|e| crate::error_chain(&e));
    let mut loaded = probe::load(
        config.probes.ring_buffer_bytes,
        probe::sched::group_dead_offset(),
    )?;
    probe::init_config(
        &mut loaded.config,
        config.probes.stack_sample_every,
        config.probes.ring_buffer_bytes,
    );
    let mut families = Families {
        config: &config,
        metrics: &m.probe,
        health: &health,
        tracefs: tracefs.as_ref().err(),
    };
    let mut links = probe::links::Links::default();
    for family in [
        families.start("sched", true, probe::sched::attach, &mut loaded.ebpf),
        families.start("oom", true, probe::oom::attach, &mut loaded.ebpf),
    ]
    .into_iter()
    .flatten()
    {
        links.extend(family);
    }
    let (http_maps, http_probes) = families
        .start(
            "http",
            true,
            |ebpf| probe::http::attach(ebpf, config.http.capture_bytes),
            &mut loaded.ebpf,
        )
        .unzip();
    let cuda = families.start(
        "cuda",
        false,
        |ebpf| CudaProbes::load(ebpf, &config.probes.disabled),
        &mut loaded.ebpf,
    );
    let mut manager = Manager::new(
        loaded.ebpf,
        cuda,
        ManagerMaps {
            config: loaded.config,
            lost: loaded.lost,
            hits: loaded.hits,
        },
        links,
        m.probe.clone(),
        health.clone(),
        &config.probes,
        ProcFs::new(&config.proc_root),
        config.cuda_libs.clone(),
    );
    manager.discover();

    let (stop_tx, stop_rx) = watch::channel(false);
    let (attributor, attrib_tasks) = crate::attrib::start(
        &config.attribution,
        config.limits.max_processes,
        ProcFs::new(&config.proc_root),
        &crate::env::ProcessEnv,
        m.attrib.clone(),
        stop_rx.clone(),
        &health,
    );
    let (batch_tx, batch_rx) =
        queue::channel(track::QUEUE_BYTES, queue_drops(&metrics, "tracker_queue"));
    let history = Arc::new(GpuHistory::new(config.nvml.history_secs));
    let exporter = match config.otlp_settings.clone() {
        Some(s) => Some(otlp::Exporter::start(
            s,
            metrics.clone(),
            Some(history.clone()),
        )?),
        None => None,
    };
    let sinks = exporter
        .as_ref()
        .map(otlp::Exporter::sinks)
        .unwrap_or_default();
    let nvml_stop = Arc::new(AtomicBool::new(false));
    let nvml_threads = start_nvml(
        &config,
        &m.gpu,
        &history,
        &batch_tx,
        &nvml_stop,
        &attributor,
        sinks.logs.clone(),
        &health,
    );
    let load = Arc::new(crate::http::load::LoadBoard::new(
        config.forensics.timeline_secs,
    ));
    let servers = Arc::new(crate::servers::ServerBoard::default());
    let http_stage = crate::http::Stage::start(
        http_maps,
        &config.http,
        ProcFs::new(&config.proc_root),
        Duration::from_millis(config.probes.discovery_interval_ms),
        m.http.clone(),
        load.clone(),
        servers.clone(),
        Some(attributor.clone()),
        sinks.spans.clone(),
        &health,
    )
    .map_err(StartError::Thread)?;
    let manager = manager.with_http(http_probes.map(|probes| {
        HttpBudget::new(
            probes,
            config.probes.http_budget_core_share,
            config.probes.run_time_stats,
            m.probe.clone(),
            health.clone(),
        )
        .with_control(http_stage.control())
    }));
    let scrape_servers = if http_stage.watching() {
        crate::scrape::Servers::Board(servers)
    } else {
        crate::scrape::Servers::Scan {
            ports: config.http.watch_ports.clone(),
            matchers: config.http.match_commands.clone(),
            seen: Default::default(),
        }
    };
    let scraper = crate::scrape::Stage::start(
        &config.scrape,
        ProcFs::new(&config.proc_root),
        m.scrape.clone(),
        scrape_servers,
        Some(attributor.clone()),
        stop_rx.clone(),
        &health,
    );
    let poll = Duration::from_millis(config.probes.poll_interval_ms);
    // One reader per ring: the http family's records never share a ring with the ledger's.
    let http_ingest = http_stage.sender().map(|http| {
        tokio::spawn(ingest::run(
            loaded.http_events,
            poll,
            batch_tx.clone(),
            Some(http),
            metrics.clone(),
            stop_rx.clone(),
            health.heartbeat("http-ingest", health::QUICK),
        ))
    });
    let ingest = tokio::spawn(ingest::run(
        loaded.events,
        poll,
        batch_tx,
        None::<queue::Sender<crate::http::tracker::Input>>,
        metrics.clone(),
        stop_rx.clone(),
        health.heartbeat("ingest", health::QUICK),
    ));
    let (draft_tx, draft_rx) = queue::channel(
        track::draft::QUEUE_BYTES,
        queue_drops(&metrics, "forensics_queue"),
    );
    let writer = forensics::assemble::Writer {
        store: forensics::store::Store::new(
            &config.forensics_dir,
            config.forensics.max_reports,
            config.forensics.max_bytes,
        ),
        stack_map: loaded.stacks.take(),
        history: history.clone(),
        metrics: m.forensics.clone(),
        settings: forensics::Settings {
            max_reports: config.forensics.max_reports,
            max_bytes: config.forensics.max_bytes,
            window_secs: config.forensics.window_secs,
            timeline_secs: config.forensics.timeline_secs,
        },
        seq: 0,
        load: Some(load),
        logs: sinks.logs.clone(),
    };
    // A report reads the target's files to symbolize its stacks: seconds for a large library.
    let beat = health.heartbeat(
        "forensics",
        health::deadline(Duration::from_secs(20), health::SLOW),
    );
    let writer = std::thread::Builder::new()
        .name("forensics".into())
        .spawn(move || writer.run(draft_rx, beat))
        .map_err(StartError::Thread)?;
    let tracker = Tracker::new(
        m.track.clone(),
        ProcFs::new(&config.proc_root),
        &config.limits,
        history,
    )
    .with_forensics(
        track::draft::DraftSink::new(draft_tx, m.track.clone()),
        track::draft::TriggerSettings {
            window_secs: config.forensics.window_secs,
            timeline_secs: config.forensics.timeline_secs,
        },
    )
    .with_attribution(attributor)
    .with_failure_logs(sinks.alloc_failures());
    drop(sinks);
    let tracker = tokio::spawn(track::run(
        tracker,
        batch_rx,
        health.heartbeat("tracker", health::QUICK),
    ));
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        stop_rx,
    ));

    let (manager_stop, manager_rx) = std::sync::mpsc::channel();
    let interval = Duration::from_millis(config.probes.discovery_interval_ms);
    let manager_beat = health.heartbeat("probe-manager", health::deadline(interval, health::SLOW));
    let beat = manager_beat.clone();
    let manager = std::thread::Builder::new()
        .name("probe-manager".into())
        .spawn(move || manager.run(interval, manager_rx, beat))
        .map_err(StartError::Thread)?;

    health.set_ready();
    let degraded: Vec<&str> = health.degraded().into_iter().map(|(f, _)| f).collect();
    tracing::info!(
        listen = %config.prometheus_listen,
        ?degraded,
        "probes attached, serving /metrics"
    );

    shutdown.await;
    tracing::info!("shutting down");
    let started = Instant::now();
    deadline::watchdog(started + EXIT_BY);
    let mut d = Deadline::new(started, DRAIN_BY);
    // Every stage is told at once; they are then waited for in order.
    let _ = stop_tx.send(true);
    nvml_stop.store(true, std::sync::atomic::Ordering::Release);
    for (stage, t) in nvml_threads {
        if let Some(Err(_)) = d.join(stage, STAGE_SHARE, t).await {
            tracing::error!(stage, "an NVML thread panicked");
        }
    }
    report_task("ingest", d.task("ingest", STAGE_SHARE, ingest).await);
    if let Some(h) = http_ingest {
        report_task("http-ingest", d.task("http-ingest", STAGE_SHARE, h).await);
    }
    http_stage.stop(&mut d, STAGE_SHARE).await;
    scraper.stop(&mut d, STAGE_SHARE).await;
    if let Some(Ok(t)) = d.task("tracker", STAGE_SHARE, tracker).await {
        tracing::debug!(processes = t.ledger().len(), "tracker drained");
    }
    // The tracker held the last draft sender: the writer finishes what it has and ends.
    if let Some(Err(_)) = d.join("forensics", STAGE_SHARE, writer).await {
        tracing::error!("the forensics writer panicked");
    }
    report_task("exporter", d.task("exporter", STAGE_SHARE, server).await);
    for t in attrib_tasks {
        report_task(
            "attribution",
            d.task("attribution", STAGE_SHARE, t)
                .await
                .map(|r| r.map(Ok::<(), std::convert::Infallible>)),
        );
    }
    // Every producer of spans and log records has ended: flush them and the last metrics.
    if let Some(e) = exporter {
        e.shutdown(OTLP_FLUSH.min(d.remaining())).await;
    }
    let _ = manager_stop.send(());
    let mut detach = Deadline::new(started, DETACH_BY);
    // It says done as it leaves its loop, then detaches: a manager that does not is stuck in
    // discovery, and its probes are left to the process's exit rather than waited for.
    let left_loop = async {
        while !manager_beat.is_done() && !manager.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if detach
        .wait("probe-manager", MANAGER_SHARE, left_loop)
        .await
        .is_some()
    {
        // Out of its loop, it is detaching: the kernel serialises uprobe detaches (about 0.1 s
        // each on a VM), so a driver's 42 probes can outlast the deadline. Not a fault: what
        // is left is finished by the process's exit.
        let until = started + DETACH_BY;
        while !manager.is_finished() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !manager.is_finished() {
            tracing::info!(
                "probes still detaching at the deadline: the process's exit finishes it"
            );
        } else if manager.join().is_err() {
            tracing::error!("probe manager panicked");
        }
    }
    let late: Vec<&str> = d.late().iter().chain(detach.late()).copied().collect();
    if !late.is_empty() {
        tracing::warn!(
            ?late,
            "shutdown deadline: these stages did not finish and are left to the process's exit \
             (the kernel detaches the probes when their descriptors close)"
        );
    }
    Ok(())
}

/// Every stage's metric families, made and registered before any stage starts, so that
/// `/metrics` lists every family whether or not its stage runs.
struct StageMetrics {
    core: Arc<Metrics>,
    probe: Arc<probe::metrics::ProbeMetrics>,
    gpu: Arc<gpu::metrics::GpuMetrics>,
    attrib: Arc<crate::attrib::metrics::AttribMetrics>,
    http: Arc<crate::http::metrics::HttpMetrics>,
    scrape: Arc<crate::scrape::metrics::ScrapeMetrics>,
    track: Arc<track::metrics::TrackMetrics>,
    forensics: Arc<forensics::metrics::ForensicsMetrics>,
}

impl StageMetrics {
    fn new() -> Self {
        let core = Arc::new(Metrics::new());
        Self {
            probe: probe::metrics::ProbeMetrics::new(&core),
            gpu: gpu::metrics::GpuMetrics::new(&core),
            attrib: crate::attrib::metrics::AttribMetrics::new(&core),
            http: crate::http::metrics::HttpMetrics::new(&core),
            scrape: crate::scrape::metrics::ScrapeMetrics::new(&core),
            track: track::metrics::TrackMetrics::new(&core),
            forensics: forensics::metrics::ForensicsMetrics::new(&core),
            core,
        }
    }
}

/// The GPU side's reports, into the tracker's queue. Over a weak sender: a thread stuck in an
/// NVML call must not keep the queue open, or the tracker would never drain at shutdown; a
/// report finding no room is dropped and counted (the next snapshot replaces it).
fn gpu_reports(tracker: &queue::Sender<track::Input>) -> gpu::ReportSink {
    let tracker = tracker.downgrade();
    Arc::new(move |report| {
        if let Some(tx) = tracker.upgrade() {
            tx.offer(track::Input::from(report));
        }
    })
}

/// Opens NVML and starts the sampler and XID threads, named, each with its heartbeat; without
/// NVML the agent runs on, says so once and exports `inferscope_source_up{source="nvml"} 0`.
#[expect(
    clippy::too_many_arguments,
    reason = "what the two threads share, named at the one call"
)]
fn start_nvml(
    config: &Config,
    metrics: &Arc<gpu::metrics::GpuMetrics>,
    history: &Arc<GpuHistory>,
    tracker: &queue::Sender<track::Input>,
    stop: &Arc<AtomicBool>,
    attributor: &crate::attrib::Attributor,
    logs: Option<queue::Sender<crate::events::Notice>>,
    health: &Health,
) -> Vec<(&'static str, std::thread::JoinHandle<()>)> {
    if !config.nvml.enabled {
        return Vec::new();
    }
    let nvml = match gpu::nvml::open(config.nvml.lib.as_deref()) {
        Ok(n) => Arc::new(n),
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            tracing::warn!(error = %e, cause, "NVML unavailable: no GPU telemetry (the probes still run)");
            gpu::nvml::set_source_up(&metrics.core, false);
            return Vec::new();
        }
    };
    let reports = gpu_reports(tracker);
    let sampler = match gpu::nvml::Sampler::new(
        nvml.clone(),
        metrics.clone(),
        history.clone(),
        Some(reports.clone()),
        ProcFs::new(&config.proc_root),
        &config.cost,
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "NVML cannot list GPUs: no GPU telemetry");
            gpu::nvml::set_source_up(&metrics.core, false);
            return Vec::new();
        }
    };
    gpu::nvml::set_source_up(&metrics.core, true);
    let gpus = sampler.gpu_labels();
    attributor.set_gpus(&gpus);
    let interval = Duration::from_millis(config.nvml.interval_ms);
    let mut threads = Vec::new();
    let s = stop.clone();
    let beat = health.heartbeat("nvml-sampler", health::deadline(interval, health::QUICK));
    match std::thread::Builder::new()
        .name("nvml-sampler".into())
        .spawn(move || sampler.run(interval, s, beat))
    {
        Ok(t) => threads.push(("nvml-sampler", t)),
        Err(e) => tracing::error!(error = %e, "cannot start the NVML sampler thread"),
    }
    let (m, s) = (metrics.clone(), stop.clone());
    let beat = health.heartbeat("nvml-events", health::QUICK);
    match std::thread::Builder::new()
        .name("nvml-events".into())
        .spawn(move || gpu::xid::run(nvml, gpus, m, s, Some(reports), logs, beat))
    {
        Ok(t) => threads.push(("nvml-events", t)),
        Err(e) => tracing::error!(error = %e, "cannot start the NVML event thread"),
    }
    threads
}

/// The counter of items a queue between stages gives up (`inferscope_dropped_total`).
fn queue_drops(
    metrics: &Metrics,
    what: &'static str,
) -> prometheus_client::metrics::counter::Counter {
    metrics
        .dropped
        .get_or_create(&crate::metrics::DroppedLabels {
            what,
            reason: "queue_full",
        })
        .clone()
}

/// Logs how a task ended; `None` (left behind at the deadline) was logged already.
fn report_task<E: std::fmt::Display>(
    stage: &str,
    r: Option<Result<Result<(), E>, tokio::task::JoinError>>,
) {
    match r {
        Some(Ok(Ok(()))) | None => {}
        Some(Ok(Err(e))) => tracing::error!(stage, error = %e, "stage ended with an error"),
        Some(Err(e)) => tracing::error!(stage, error = %e, "stage panicked"),
    }
}

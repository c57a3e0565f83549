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

/// Runs the agent until `shutdown` resolves: every stage's metrics registered, the stages
/// started bottom up (probes and sources, the state they feed, forensics, export), then, on
/// `shutdown`, stopped in the order that lets each drain into the next.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    preflight()?;
    raise_memlock();
    let listener = http::bind(config.prometheus_listen).await?;
    let (stop_tx, stop) = watch::channel(false);
    let w = Wiring {
        config: &config,
        metrics: StageMetrics::new(),
        health: Arc::new(Health::new()),
        stop,
    };
    w.note_missing_capabilities();

    let probes = w.load_probes()?;
    let (attributor, attrib_tasks) = w.start_attribution();
    let history = Arc::new(GpuHistory::new(config.nvml.history_secs));
    let exporter = w.start_otlp(&history)?;
    let sinks = exporter
        .as_ref()
        .map(otlp::Exporter::sinks)
        .unwrap_or_default();
    let (batch_tx, batch_rx) = queue::channel(
        track::QUEUE_BYTES,
        queue_drops(&w.metrics.core, "tracker_queue"),
    );
    let load = Arc::new(crate::http::load::LoadBoard::new(
        config.forensics.timeline_secs,
    ));
    let servers = Arc::new(crate::servers::ServerBoard::default());
    // Finished requests are kept past a failure's window, for its report.
    let requests = Arc::new(crate::http::requests::RequestLog::new(
        Duration::from_secs(config.forensics.after_failure_secs + 60),
        REQUEST_LOG_MAX,
        w.metrics
            .core
            .dropped
            .get_or_create(&crate::metrics::DroppedLabels {
                what: "request_log",
                reason: "limit",
            })
            .clone(),
    ));
    let http_stage = w.start_http(
        probes.http_maps,
        probes.manager.by_events(),
        &load,
        &servers,
        &attributor,
        sinks.spans.clone(),
        requests.clone(),
    )?;
    let nvml = w.start_nvml(
        &history,
        &batch_tx,
        http_stage.sender(),
        &attributor,
        sinks.logs.clone(),
    );
    let scraper = w.start_scrape(&http_stage, servers.clone(), &attributor);
    let readers = w.start_readers(probes.rings, batch_tx, &http_stage, requests.asked());
    let request_source = forensics::requests::RequestSource {
        log: requests,
        servers: servers.clone(),
        procfs: w.procfs(),
        trigger_window: Duration::from_millis(config.forensics.trigger_window_ms),
        after: Duration::from_secs(config.forensics.after_failure_secs),
        attrib: Some(attributor.clone()),
    };
    let python = w.start_python(probes.freeze)?;
    let (writer, drafts) = w.start_forensics(
        probes.stacks,
        &history,
        load,
        request_source,
        sinks.logs.clone(),
        python.clone(),
    )?;
    let tracker = w.start_tracker(
        history,
        drafts,
        attributor,
        sinks.alloc_failures(),
        batch_rx,
        python,
    );
    drop(sinks);
    let server = tokio::spawn(http::serve(
        listener,
        w.metrics.core.clone(),
        w.health.clone(),
        w.stop.clone(),
    ));
    let manager = w.start_manager(probes.manager, probes.http_probes, &http_stage, servers)?;
    w.say_ready();

    shutdown.await;
    tracing::info!("shutting down");
    Running {
        nvml,
        readers,
        http: http_stage,
        scraper,
        tracker,
        writer,
        server,
        attrib_tasks,
        exporter,
        manager,
    }
    .stop(stop_tx)
    .await;
    Ok(())
}

/// What every stage is started with: the configuration, its own metrics, the health board,
/// and the signal to stop.
struct Wiring<'a> {
    config: &'a Config,
    metrics: StageMetrics,
    health: Arc<Health>,
    stop: watch::Receiver<bool>,
}

/// The probes loaded and their families attached, the manager not yet running.
struct Probes {
    manager: Manager,
    rings: Rings,
    http_maps: Option<probe::http::HttpMaps>,
    http_probes: Option<probe::http::HttpProbes>,
    stacks: Option<aya::maps::StackTraceMap<aya::maps::MapData>>,
    /// Where Python processes are armed to stop at an out-of-memory failure; `None` when
    /// they may not be (`forensics.python_freeze` off, or no CAP_KILL).
    freeze: Option<aya::maps::HashMap<aya::maps::MapData, u32, u32>>,
}

/// The two ring buffers: one per reader, so that the http family's records never share a ring
/// with the ledger's.
struct Rings {
    events: aya::maps::RingBuf<aya::maps::MapData>,
    http_events: aya::maps::RingBuf<aya::maps::MapData>,
    /// Where the readers move their wakeup marks (a handle of the probes' `CONFIG`).
    config: Option<aya::maps::Array<aya::maps::MapData, u64>>,
}

/// The ring-buffer readers' tasks.
struct Readers {
    events: tokio::task::JoinHandle<std::io::Result<()>>,
    http: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// The NVML threads and the flag that ends them.
struct Nvml {
    stop: Arc<AtomicBool>,
    threads: Vec<(&'static str, std::thread::JoinHandle<()>)>,
}

/// The probe manager's thread, what tells it to stop, and its heartbeat (done as it leaves
/// its loop, before it detaches).
struct ManagerThread {
    thread: std::thread::JoinHandle<()>,
    stop: std::sync::mpsc::Sender<()>,
    beat: health::Heartbeat,
    /// Rung after the stop is sent: the manager may be asleep until its next tick.
    wake: Option<Arc<crate::wake::Wake>>,
}

impl Wiring<'_> {
    fn procfs(&self) -> ProcFs {
        ProcFs::new(&self.config.proc_root)
    }

    fn note_missing_capabilities(&self) {
        for (family, shortfall) in crate::caps::Held::current()
            .map(|held| held.shortfalls())
            .unwrap_or_default()
        {
            tracing::warn!(family, "{shortfall}");
            self.health.degrade(family, shortfall.to_string());
        }
    }

    /// Loads the eBPF object and attaches each probe family that can start; the CUDA
    /// libraries present now are found and probed before any stage reads a record.
    fn load_probes(&self) -> Result<Probes, StartError> {
        let config = self.config;
        // Before the first tracepoint (and the format file read just below).
        let tracefs = probe::tracefs::ensure().map_err(|e| crate::error_chain(&e));
        // Never stop a process the agent might not be allowed to continue.
        let may_hold = crate::caps::Held::current().is_none_or(|held| held.may_hold());
        let layout = probe::KernelLayout::read(config.probes.hold_openers && may_hold);
        let mut loaded = probe::load(config.probes.ring_buffer_bytes, &layout)?;
        probe::init_config(&mut loaded.config, &config.probes);
        let mut families = Families {
            config,
            metrics: &self.metrics.probe,
            health: &self.health,
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
                |ebpf| {
                    probe::http::attach(
                        ebpf,
                        config.http.capture_bytes,
                        config.probes.http_raw_tracepoint,
                        config.probes.tls_internal,
                    )
                },
                &mut loaded.ebpf,
            )
            .unzip();
        let cuda = families.start(
            "cuda",
            false,
            |ebpf| CudaProbes::load(ebpf, &config.probes.disabled),
            &mut loaded.ebpf,
        );
        // Before the first look at /proc: what starts meanwhile is reported, not missed.
        let hooks = families.start(
            "discovery",
            true,
            probe::discovery_hooks::DiscoveryHooks::attach,
            &mut loaded.ebpf,
        );
        let config_handle = probe::config_handle(&loaded.config);
        let mut manager = Manager::new(
            loaded.ebpf,
            cuda,
            ManagerMaps {
                config: loaded.config,
                lost: loaded.lost,
                hits: loaded.hits,
            },
            links,
            self.metrics.probe.clone(),
            self.health.clone(),
            &config.probes,
            self.procfs(),
            config.cuda_libs.clone(),
        )
        .with_hooks(hooks);
        manager.discover();
        Ok(Probes {
            manager,
            rings: Rings {
                events: loaded.events,
                http_events: loaded.http_events,
                config: config_handle,
            },
            http_maps,
            http_probes,
            stacks: loaded.stacks.take(),
            freeze: loaded
                .freeze
                .take()
                .filter(|_| config.forensics.python_freeze && may_hold),
        })
    }

    fn start_attribution(
        &self,
    ) -> (
        Arc<crate::attrib::Attributor>,
        Vec<tokio::task::JoinHandle<()>>,
    ) {
        crate::attrib::start(
            &self.config.attribution,
            self.config.limits.max_processes,
            self.procfs(),
            &crate::env::ProcessEnv,
            self.metrics.attrib.clone(),
            self.stop.clone(),
            &self.health,
        )
    }

    fn start_otlp(&self, history: &Arc<GpuHistory>) -> Result<Option<otlp::Exporter>, StartError> {
        let Some(settings) = self.config.otlp_settings.clone() else {
            return Ok(None);
        };
        Ok(Some(otlp::Exporter::start(
            settings,
            self.metrics.core.clone(),
            Some(history.clone()),
        )?))
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the stage's inputs, named at the one call"
    )]
    fn start_http(
        &self,
        maps: Option<probe::http::HttpMaps>,
        by_events: bool,
        load: &Arc<crate::http::load::LoadBoard>,
        servers: &Arc<crate::servers::ServerBoard>,
        attributor: &Arc<crate::attrib::Attributor>,
        spans: Option<queue::Sender<crate::http::finished::RequestFinished>>,
        requests: Arc<crate::http::requests::RequestLog>,
    ) -> Result<crate::http::Stage, StartError> {
        crate::http::Stage::start(
            maps,
            by_events,
            &self.config.http,
            self.procfs(),
            Duration::from_millis(self.config.probes.discovery_interval_ms),
            self.metrics.http.clone(),
            load.clone(),
            servers.clone(),
            Some(attributor.clone()),
            spans,
            requests,
            &self.health,
        )
        .map_err(StartError::Thread)
    }

    /// The scraper takes the servers the http watcher finds, or scans for them itself when
    /// that family is not running.
    fn start_scrape(
        &self,
        http: &crate::http::Stage,
        servers: Arc<crate::servers::ServerBoard>,
        attributor: &Arc<crate::attrib::Attributor>,
    ) -> crate::scrape::Stage {
        let servers = if http.watching() {
            crate::scrape::Servers::Board(servers)
        } else {
            crate::scrape::Servers::Scan {
                ports: self.config.http.watch_ports.clone(),
                matchers: self.config.http.match_commands.clone(),
                seen: Default::default(),
            }
        };
        crate::scrape::Stage::start(
            &self.config.scrape,
            self.procfs(),
            self.metrics.scrape.clone(),
            servers,
            Some(attributor.clone()),
            self.stop.clone(),
            &self.health,
        )
    }

    fn start_readers(
        &self,
        rings: Rings,
        tracker: queue::Sender<track::Input>,
        http: &crate::http::Stage,
        asked: Arc<tokio::sync::Notify>,
    ) -> Readers {
        let poll = Duration::from_millis(self.config.probes.poll_interval_ms);
        let awake = u64::from(self.config.probes.ring_buffer_bytes / 4);
        let mark = |index| {
            Some(ingest::WakeMark {
                config: probe::config_handle(rings.config.as_ref()?)?,
                index,
                awake,
            })
        };
        let http_mark = mark(agent_common::config::HTTP_WAKEUP_BYTES);
        let events_mark = mark(agent_common::config::WAKEUP_BYTES);
        let http = http.sender().map(|http| {
            tokio::spawn(ingest::run(
                rings.http_events,
                Duration::from_millis(self.config.probes.http_poll_interval_ms),
                tracker.clone(),
                Some(http),
                self.metrics.core.clone(),
                self.stop.clone(),
                self.health.heartbeat("http-ingest", health::QUICK),
                http_mark,
                Some(asked),
            ))
        });
        let events = tokio::spawn(ingest::run(
            rings.events,
            poll,
            tracker,
            None::<queue::Sender<crate::http::tracker::Input>>,
            self.metrics.core.clone(),
            self.stop.clone(),
            self.health.heartbeat("ingest", health::QUICK),
            events_mark,
            None,
        ));
        Readers { events, http }
    }

    /// The service that reads Python stacks for forensics (`forensics.python_stacks`); it
    /// ends when the tracker and the writer have let go of it.
    fn start_python(
        &self,
        freeze: Option<aya::maps::HashMap<aya::maps::MapData, u32, u32>>,
    ) -> Result<Option<forensics::python::PythonHandle>, StartError> {
        let f = &self.config.forensics;
        if !f.python_stacks {
            return Ok(None);
        }
        let (handle, _thread) = forensics::python::start(
            self.procfs(),
            forensics::python::Settings {
                freeze,
                every: Duration::from_secs(f.python_freeze_every_secs),
            },
            self.metrics.python.clone(),
            queue_drops(&self.metrics.core, "python_queue"),
        )
        .map_err(StartError::Thread)?;
        Ok(Some(handle))
    }

    /// The forensics writer's thread, and the sink the tracker sends it drafts through.
    fn start_forensics(
        &self,
        stacks: Option<aya::maps::StackTraceMap<aya::maps::MapData>>,
        history: &Arc<GpuHistory>,
        load: Arc<crate::http::load::LoadBoard>,
        requests: forensics::requests::RequestSource,
        logs: Option<queue::Sender<crate::events::Notice>>,
        python: Option<forensics::python::PythonHandle>,
    ) -> Result<(std::thread::JoinHandle<()>, track::draft::DraftSink), StartError> {
        let f = &self.config.forensics;
        let (draft_tx, draft_rx) = queue::channel(
            track::draft::QUEUE_BYTES,
            queue_drops(&self.metrics.core, "forensics_queue"),
        );
        let writer = forensics::assemble::Writer {
            store: forensics::store::Store::new(
                &self.config.forensics_dir,
                f.max_reports,
                f.max_bytes,
            ),
            stack_map: stacks,
            history: history.clone(),
            metrics: self.metrics.forensics.clone(),
            node: requests
                .attrib
                .as_ref()
                .map(|a| a.node().to_string())
                .unwrap_or_default(),
            settings: forensics::Settings {
                max_reports: f.max_reports,
                max_bytes: f.max_bytes,
                window_secs: f.window_secs,
                timeline_secs: f.timeline_secs,
            },
            seq: 0,
            load: Some(load),
            logs,
            requests: Some(requests),
            pending: Vec::new(),
            python,
        };
        // A report reads the target's files to symbolize its stacks: seconds for a large library.
        let beat = self.health.heartbeat(
            "forensics",
            health::deadline(Duration::from_secs(20), health::SLOW),
        );
        let thread = std::thread::Builder::new()
            .name("forensics".into())
            .spawn(move || writer.run(draft_rx, beat))
            .map_err(StartError::Thread)?;
        Ok((
            thread,
            track::draft::DraftSink::new(draft_tx, self.metrics.track.clone()),
        ))
    }

    fn start_tracker(
        &self,
        history: Arc<GpuHistory>,
        drafts: track::draft::DraftSink,
        attributor: Arc<crate::attrib::Attributor>,
        failure_logs: Option<crate::events::RateLimited>,
        input: queue::Receiver<track::Input>,
        python: Option<forensics::python::PythonHandle>,
    ) -> tokio::task::JoinHandle<Tracker> {
        let tracker = Tracker::new(
            self.metrics.track.clone(),
            self.procfs(),
            &self.config.limits,
            history,
        )
        .with_forensics(
            drafts,
            track::draft::TriggerSettings {
                window_secs: self.config.forensics.window_secs,
                timeline_secs: self.config.forensics.timeline_secs,
            },
        )
        .with_attribution(attributor)
        .with_failure_logs(failure_logs)
        .with_python(python.map(|p| Box::new(p) as Box<dyn track::ProcessNotes>));
        tokio::spawn(track::run(
            tracker,
            input,
            self.health.heartbeat("tracker", health::QUICK),
        ))
    }

    /// The probe manager's thread: discovery, the budgets (the http family's with control of
    /// its stage), lost counts.
    fn start_manager(
        &self,
        manager: Manager,
        mut http_probes: Option<probe::http::HttpProbes>,
        http: &crate::http::Stage,
        servers: Arc<crate::servers::ServerBoard>,
    ) -> Result<ManagerThread, StartError> {
        let probes = &self.config.probes;
        let tls = http_probes.as_mut().and_then(|p| p.tls.take());
        let manager = manager
            .with_server_events(http.control())
            .with_tls(tls, servers.clone())
            .with_http(http_probes.map(|p| {
                HttpBudget::new(
                    p,
                    probes.http_budget_core_share,
                    probes.run_time_stats,
                    self.metrics.probe.clone(),
                    self.health.clone(),
                )
                .with_control(http.control())
            }));
        let wake = match crate::wake::Wake::new() {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                tracing::warn!(error = %e, "no eventfd: the probe manager polls for its stop");
                None
            }
        };
        if let Some(w) = &wake {
            servers.wake_on_change(w.clone());
        }
        let manager = manager.with_wake(wake.clone());
        let (stop, rx) = std::sync::mpsc::channel();
        let interval = Duration::from_millis(probes.discovery_interval_ms);
        let beat = self
            .health
            .heartbeat("probe-manager", health::deadline(interval, health::SLOW));
        let b = beat.clone();
        let thread = std::thread::Builder::new()
            .name("probe-manager".into())
            .spawn(move || manager.run(interval, rx, b))
            .map_err(StartError::Thread)?;
        Ok(ManagerThread {
            thread,
            stop,
            beat,
            wake,
        })
    }

    fn say_ready(&self) {
        self.health.set_ready();
        let degraded: Vec<&str> = self.health.degraded().into_iter().map(|(f, _)| f).collect();
        tracing::info!(
            listen = %self.config.prometheus_listen,
            ?degraded,
            "probes attached, serving /metrics"
        );
    }
}

/// The stages while the agent runs, in the order they are stopped.
struct Running {
    nvml: Nvml,
    readers: Readers,
    http: crate::http::Stage,
    scraper: crate::scrape::Stage,
    tracker: tokio::task::JoinHandle<Tracker>,
    writer: std::thread::JoinHandle<()>,
    server: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    attrib_tasks: Vec<tokio::task::JoinHandle<()>>,
    exporter: Option<otlp::Exporter>,
    manager: ManagerThread,
}

/// Continues the processes the probes stopped and the agent has not let go (a manager still
/// attaching at the deadline never got to them).
fn continue_stopped() {
    let n = crate::held::continue_all();
    if n > 0 {
        tracing::info!(
            processes = n,
            "continued the processes the probes had stopped and nobody had let go"
        );
    }
}

impl Running {
    /// Every stage is told at once; they are then waited for in order, each within its share
    /// of the deadline.
    async fn stop(self, stop: watch::Sender<bool>) {
        let started = Instant::now();
        // No probe stops a process while the agent leaves; those stopped before are continued
        // last, whatever the stages below finish.
        crate::held::stops_off();
        deadline::watchdog(started + EXIT_BY);
        let mut d = Deadline::new(started, DRAIN_BY);
        let _ = stop.send(true);
        self.nvml
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
        for (stage, t) in self.nvml.threads {
            if let Some(Err(_)) = d.join(stage, STAGE_SHARE, t).await {
                tracing::error!(stage, "an NVML thread panicked");
            }
        }
        report_task(
            "ingest",
            d.task("ingest", STAGE_SHARE, self.readers.events).await,
        );
        if let Some(h) = self.readers.http {
            report_task("http-ingest", d.task("http-ingest", STAGE_SHARE, h).await);
        }
        self.http.stop(&mut d, STAGE_SHARE).await;
        self.scraper.stop(&mut d, STAGE_SHARE).await;
        if let Some(Ok(t)) = d.task("tracker", STAGE_SHARE, self.tracker).await {
            tracing::debug!(processes = t.ledger().len(), "tracker drained");
        }
        // The tracker held the last draft sender: the writer finishes what it has and ends.
        if let Some(Err(_)) = d.join("forensics", STAGE_SHARE, self.writer).await {
            tracing::error!("the forensics writer panicked");
        }
        report_task(
            "exporter",
            d.task("exporter", STAGE_SHARE, self.server).await,
        );
        for t in self.attrib_tasks {
            report_task(
                "attribution",
                d.task("attribution", STAGE_SHARE, t)
                    .await
                    .map(|r| r.map(Ok::<(), std::convert::Infallible>)),
            );
        }
        // Every producer of spans and log records has ended: flush them and the last metrics.
        if let Some(e) = self.exporter {
            e.shutdown(OTLP_FLUSH.min(d.remaining())).await;
        }
        let detach = self.manager.stop(started).await;
        continue_stopped();
        let late: Vec<&str> = d.late().iter().chain(detach.late()).copied().collect();
        if !late.is_empty() {
            tracing::warn!(
                ?late,
                "shutdown deadline: these stages did not finish and are left to the process's exit \
                 (the kernel detaches the probes when their descriptors close)"
            );
        }
    }
}

impl ManagerThread {
    /// Tells the manager to stop and waits for it to detach, until [`DETACH_BY`].
    async fn stop(self, started: Instant) -> Deadline {
        let Self {
            thread,
            stop,
            beat,
            wake,
        } = self;
        let _ = stop.send(());
        if let Some(w) = wake {
            w.ring();
        }
        let mut detach = Deadline::new(started, DETACH_BY);
        // It says done as it leaves its loop, then detaches: a manager that does not is stuck in
        // discovery, and its probes are left to the process's exit rather than waited for.
        let left_loop = async {
            while !beat.is_done() && !thread.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if detach
            .wait("probe-manager", MANAGER_SHARE, left_loop)
            .await
            .is_some()
        {
            // Out of its loop, it is detaching: the kernel serialises uprobe detaches (about
            // 0.1 s each on a VM), so a driver's 42 probes can outlast the deadline. Not a
            // fault: what is left is finished by the process's exit.
            let until = started + DETACH_BY;
            while !thread.is_finished() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !thread.is_finished() {
                tracing::info!(
                    "probes still detaching at the deadline: the process's exit finishes it"
                );
            } else if thread.join().is_err() {
                tracing::error!("probe manager panicked");
            }
        }
        detach
    }
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
    python: Arc<forensics::python::PythonMetrics>,
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
            python: forensics::python::PythonMetrics::new(&core),
            core,
        }
    }
}

/// The GPU side's reports, into the tracker's queue, and each interval's use into the `http`
/// stage's (which splits it between the models served). Over weak senders: a thread stuck in
/// an NVML call must not keep a queue open, or its stage would never drain at shutdown; a
/// report finding no room is dropped and counted (the next snapshot replaces it).
fn gpu_reports(
    tracker: &queue::Sender<track::Input>,
    http: Option<queue::Sender<crate::http::tracker::Input>>,
) -> gpu::ReportSink {
    let tracker = tracker.downgrade();
    let http = http.map(|h| h.downgrade());
    Arc::new(move |report| {
        if let gpu::GpuReport::Usage(usage) = report {
            if let Some(tx) = http.as_ref().and_then(|h| h.upgrade()) {
                tx.offer(crate::http::tracker::Input::GpuUsage(usage));
            }
        } else if let (Some(tx), Some(input)) = (tracker.upgrade(), track::Input::from_gpu(report))
        {
            tx.offer(input);
        }
    })
}

/// Opens NVML and starts the sampler and XID threads, named, each with its heartbeat; without
/// NVML the agent runs on, says so once and exports `inferscope_source_up{source="nvml"} 0`.
impl Wiring<'_> {
    fn start_nvml(
        &self,
        history: &Arc<GpuHistory>,
        tracker: &queue::Sender<track::Input>,
        http: Option<queue::Sender<crate::http::tracker::Input>>,
        attributor: &crate::attrib::Attributor,
        logs: Option<queue::Sender<crate::events::Notice>>,
    ) -> Nvml {
        let mut nvml = Nvml {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        let (config, metrics, health) = (self.config, &self.metrics.gpu, &self.health);
        if !config.nvml.enabled {
            return nvml;
        }
        let lib = match gpu::nvml::open(config.nvml.lib.as_deref()) {
            Ok(n) => Arc::new(n),
            Err(e) => {
                let cause = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                tracing::warn!(error = %e, cause, "NVML unavailable: no GPU telemetry (the probes still run)");
                gpu::nvml::set_source_up(&metrics.core, false);
                return nvml;
            }
        };
        let reports = gpu_reports(tracker, http);
        let sampler = match gpu::nvml::Sampler::new(
            lib.clone(),
            metrics.clone(),
            history.clone(),
            Some(reports.clone()),
            self.procfs(),
            &config.cost,
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "NVML cannot list GPUs: no GPU telemetry");
                gpu::nvml::set_source_up(&metrics.core, false);
                return nvml;
            }
        };
        gpu::nvml::set_source_up(&metrics.core, true);
        let gpus = sampler.gpu_labels();
        attributor.set_gpus(&gpus);
        let interval = Duration::from_millis(config.nvml.interval_ms);
        let s = nvml.stop.clone();
        let beat = health.heartbeat("nvml-sampler", health::deadline(interval, health::QUICK));
        match std::thread::Builder::new()
            .name("nvml-sampler".into())
            .spawn(move || sampler.run(interval, s, beat))
        {
            Ok(t) => nvml.threads.push(("nvml-sampler", t)),
            Err(e) => tracing::error!(error = %e, "cannot start the NVML sampler thread"),
        }
        let (m, s) = (metrics.clone(), nvml.stop.clone());
        let beat = health.heartbeat("nvml-events", health::QUICK);
        match std::thread::Builder::new()
            .name("nvml-events".into())
            .spawn(move || gpu::xid::run(lib, gpus, m, s, Some(reports), logs, beat))
        {
            Ok(t) => nvml.threads.push(("nvml-events", t)),
            Err(e) => tracing::error!(error = %e, "cannot start the NVML event thread"),
        }
        nvml
    }
}

/// Finished requests kept for forensic reports, at most (a few MiB).
const REQUEST_LOG_MAX: usize = 16384;

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

#[cfg(test)]
mod docs_tests;

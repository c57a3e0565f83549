//! Wiring of the pipeline and its shutdown. Order on the way out: stop the ring-buffer
//! reader (it drains what is left), let the tracker drain its channel, stop the exporter,
//! flush OTLP (bounded), detach the probes.

use std::{
    path::Path,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use tokio::sync::{mpsc, watch};

use crate::{
    config::Config,
    export::{
        http,
        metrics::{FamilyLabels, Metrics},
        otlp,
    },
    forensics,
    gpu::{self, history::GpuHistory},
    health::Health,
    ingest,
    probe::{
        self,
        cuda::CudaProbes,
        manager::{Manager, ManagerMaps},
    },
    proc::ProcFs,
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
}

pub fn preflight() -> Result<(), StartError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(StartError::NotRoot);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(StartError::NoBtf);
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

/// How long the OTLP flush may hold up shutdown.
const OTLP_FLUSH: Duration = Duration::from_secs(5);

/// Starts the probe families one by one: one that cannot load or attach is logged once and
/// left out (`inferscope_probe_family_up{family} 0`, named by `/healthz`), and the agent runs
/// on with the others.
struct Families<'a> {
    config: &'a Config,
    metrics: &'a Metrics,
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
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());

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
        metrics: &metrics,
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
    let http_maps = families
        .start(
            "http",
            true,
            |ebpf| probe::http::attach(ebpf, config.http.capture_bytes),
            &mut loaded.ebpf,
        )
        .map(|(maps, http_links)| {
            links.extend(http_links);
            maps
        });
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
        metrics.clone(),
        health.clone(),
        &config,
    );
    manager.discover();

    let (stop_tx, stop_rx) = watch::channel(false);
    let (attributor, attrib_tasks) =
        crate::attrib::start(&config, metrics.clone(), stop_rx.clone());
    let (batch_tx, batch_rx) = mpsc::channel(256);
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
        &metrics,
        &history,
        &batch_tx,
        &nvml_stop,
        &attributor,
        sinks.logs.clone(),
    );
    let load = Arc::new(crate::http::load::LoadBoard::new(
        config.forensics.timeline_secs,
    ));
    let servers = Arc::new(crate::http::discover::ServerBoard::default());
    let http_stage = crate::http::Stage::start(
        http_maps,
        &config,
        metrics.clone(),
        load.clone(),
        servers.clone(),
        Some(attributor.clone()),
        sinks.spans.clone(),
    )
    .map_err(StartError::Thread)?;
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
        &config,
        metrics.clone(),
        scrape_servers,
        Some(attributor.clone()),
        stop_rx.clone(),
    );
    let poll = Duration::from_millis(config.probes.poll_interval_ms);
    // One reader per ring: the http family's records never share a ring with the ledger's.
    let http_ingest = http_stage.sender().map(|http| {
        tokio::spawn(ingest::run_with_http(
            loaded.http_events,
            poll,
            batch_tx.clone(),
            Some(http),
            metrics.clone(),
            stop_rx.clone(),
        ))
    });
    let ingest = tokio::spawn(ingest::run(
        loaded.events,
        poll,
        batch_tx,
        metrics.clone(),
        stop_rx.clone(),
    ));
    let (draft_tx, draft_rx) = std::sync::mpsc::sync_channel(64);
    let writer = forensics::assemble::Writer {
        store: forensics::store::Store::new(
            &config.forensics_dir,
            config.forensics.max_reports,
            config.forensics.max_bytes,
        ),
        stack_map: loaded.stacks.take(),
        history: history.clone(),
        metrics: metrics.clone(),
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
    let writer = std::thread::Builder::new()
        .name("forensics".into())
        .spawn(move || writer.run(draft_rx))
        .map_err(StartError::Thread)?;
    let tracker = Tracker::new(
        metrics.clone(),
        ProcFs::new(&config.proc_root),
        &config.limits,
        history,
    )
    .with_forensics(
        forensics::Forensics::new(draft_tx, metrics.clone()),
        &config.forensics,
    )
    .with_attribution(attributor)
    .with_failure_logs(sinks.alloc_failures());
    drop(sinks);
    let tracker = tokio::spawn(track::run(tracker, batch_rx));
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        stop_rx,
    ));

    let (manager_stop, manager_rx) = std::sync::mpsc::channel();
    let interval = Duration::from_millis(config.probes.discovery_interval_ms);
    let manager = std::thread::Builder::new()
        .name("probe-manager".into())
        .spawn(move || manager.run(interval, manager_rx))
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
    let _ = stop_tx.send(true);
    nvml_stop.store(true, std::sync::atomic::Ordering::Release);
    for t in nvml_threads {
        if t.join().is_err() {
            tracing::error!("an NVML thread panicked");
        }
    }
    report_join("ingest", ingest.await.map(|r| r.map_err(|e| e.to_string())));
    if let Some(h) = http_ingest {
        report_join("http ingest", h.await.map(|r| r.map_err(|e| e.to_string())));
    }
    http_stage.stop().await;
    scraper.stop().await;
    if let Ok(t) = tracker.await {
        tracing::debug!(processes = t.ledger().len(), "tracker drained");
    }
    // The tracker held the last draft sender: the writer finishes what it has and ends.
    if writer.join().is_err() {
        tracing::error!("the forensics writer panicked");
    }
    report_join(
        "exporter",
        server.await.map(|r| r.map_err(|e| e.to_string())),
    );
    for t in attrib_tasks {
        report_join("attribution", t.await.map(Ok));
    }
    // Every producer of spans and log records has ended: flush them and the last metrics.
    if let Some(e) = exporter {
        e.shutdown(OTLP_FLUSH).await;
    }
    let _ = manager_stop.send(());
    if manager.join().is_err() {
        tracing::error!("probe manager panicked");
    }
    Ok(())
}

/// Opens NVML and starts the sampler and XID threads; without NVML the agent runs on, says so
/// once and exports `inferscope_source_up{source="nvml"} 0`.
fn start_nvml(
    config: &Config,
    metrics: &Arc<Metrics>,
    history: &Arc<GpuHistory>,
    tracker: &mpsc::Sender<track::Input>,
    stop: &Arc<AtomicBool>,
    attributor: &crate::attrib::Attributor,
    logs: Option<otlp::queue::Sink<otlp::logs::LogItem>>,
) -> Vec<std::thread::JoinHandle<()>> {
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
            gpu::nvml::set_source_up(metrics, false);
            return Vec::new();
        }
    };
    let sampler = match gpu::nvml::Sampler::new(
        nvml.clone(),
        metrics.clone(),
        history.clone(),
        Some(tracker.clone()),
        ProcFs::new(&config.proc_root),
        &config.cost,
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "NVML cannot list GPUs: no GPU telemetry");
            gpu::nvml::set_source_up(metrics, false);
            return Vec::new();
        }
    };
    gpu::nvml::set_source_up(metrics, true);
    let gpus = sampler.gpu_labels();
    attributor.set_gpus(&gpus);
    let interval = Duration::from_millis(config.nvml.interval_ms);
    let mut threads = Vec::new();
    let s = stop.clone();
    match std::thread::Builder::new()
        .name("nvml-sampler".into())
        .spawn(move || sampler.run(interval, s))
    {
        Ok(t) => threads.push(t),
        Err(e) => tracing::error!(error = %e, "cannot start the NVML sampler thread"),
    }
    let (m, s) = (metrics.clone(), stop.clone());
    match std::thread::Builder::new()
        .name("nvml-events".into())
        .spawn({
            let tracker = tracker.clone();
            move || gpu::xid::run(nvml, gpus, m, s, Some(tracker), logs)
        }) {
        Ok(t) => threads.push(t),
        Err(e) => tracing::error!(error = %e, "cannot start the NVML event thread"),
    }
    threads
}

fn report_join(stage: &str, r: Result<Result<(), String>, tokio::task::JoinError>) {
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(stage, error = e, "stage ended with an error"),
        Err(e) => tracing::error!(stage, error = %e, "stage panicked"),
    }
}

//! The `inferscope` binary: command line and process-level concerns only.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use inferscope::{
    config::{Config, Overrides},
    env::ProcessEnv,
};

#[derive(Parser)]
#[command(
    name = "inferscope",
    version,
    about = "Watches GPU inference servers from outside: eBPF on the CUDA driver, NVML, the wire"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (as root).
    Run(RunArgs),
    /// Read the forensic reports the agent wrote.
    Forensics {
        #[command(subcommand)]
        command: ForensicsCommand,
    },
    /// Print the seccomp profile the agent runs under (a Kubernetes `Localhost` profile), or
    /// install it as a file (what the chart's init container does).
    SeccompProfile {
        /// Write the profile to this file, replacing it atomically, instead of printing it.
        #[arg(long, value_name = "FILE")]
        install: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ForensicsCommand {
    /// Reports, newest first: id, time, kind, pid, comm, GPU, summary.
    List {
        #[command(flatten)]
        dir: ForensicsDir,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// One report.
    Show {
        /// Report id (from `list`).
        id: String,
        #[command(flatten)]
        dir: ForensicsDir,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(clap::Args)]
struct ForensicsDir {
    /// TOML config file whose forensics_dir to read.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of the reports [default: /var/lib/inferscope/forensics].
    #[arg(long)]
    forensics_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
    Html,
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file (optional; embedded defaults otherwise).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address of the Prometheus /metrics and /healthz listener [default: 127.0.0.1:9464].
    #[arg(long)]
    prometheus_listen: Option<SocketAddr>,
    /// Directory for forensic reports [default: /var/lib/inferscope/forensics].
    #[arg(long)]
    forensics_dir: Option<PathBuf>,
    /// A CUDA driver library to probe in addition to those discovered (repeatable).
    #[arg(long = "cuda-lib")]
    cuda_libs: Vec<PathBuf>,
    /// Never attach this probe family (cuda, sched, oom, http, discovery) or CUDA symbol
    /// (repeatable).
    #[arg(long = "disable-probe")]
    disable_probes: Vec<String>,
    /// NVML library to load [default: libnvidia-ml.so.1 from the usual places].
    #[arg(long)]
    nvml_lib: Option<PathBuf>,
    /// Watch the process listening on this port as an inference server (repeatable).
    #[arg(long = "watch-port")]
    watch_ports: Vec<u16>,
    /// Export metrics, traces and logs over OTLP to this collector (beats the config file and
    /// OTEL_EXPORTER_OTLP_ENDPOINT) [default: off].
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    // A panic in any task or thread ends the process; the kernel detaches every probe
    // when the process's file descriptors close.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!("panic, exiting: probes are detached as the process ends");
        std::process::exit(70);
    }));
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Forensics { command } => forensics(command),
        Command::SeccompProfile { install } => seccomp_profile(install),
    };
    if let Err(e) = result {
        // One line: the cause chain, with the multi-line messages of parsers folded.
        let msg = format!("{e:#}");
        eprintln!(
            "inferscope: {}",
            msg.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        std::process::exit(1);
    }
}

fn seccomp_profile(install: Option<PathBuf>) -> anyhow::Result<()> {
    match install {
        Some(path) => inferscope::seccomp::install(&path)
            .with_context(|| format!("cannot install the seccomp profile at {}", path.display())),
        None => {
            use std::io::Write;
            std::io::stdout().write_all(inferscope::seccomp::text().as_bytes())?;
            Ok(())
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("INFERSCOPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        prometheus_listen: args.prometheus_listen,
        forensics_dir: args.forensics_dir,
        cuda_libs: args.cuda_libs,
        disable_probes: args.disable_probes,
        nvml_lib: args.nvml_lib,
        watch_ports: args.watch_ports,
        otlp_endpoint: args.otlp_endpoint,
    };
    let config = Config::load(args.config.as_deref(), &ProcessEnv, &overrides)?;
    inject_panic();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(inferscope::agent::run(config, shutdown_signal()));
    // The shutdown has had its deadline: a blocking call that never returned is not waited
    // for again here.
    runtime.shutdown_background();
    result?;
    Ok(())
}

/// Fault injection for the crash tests (`tests/integration/tests/crash.rs`):
/// `INFERSCOPE_FAULT_PANIC_AFTER_MS=N` panics a thread of the agent N ms after start, to show
/// that a panic ends the process and leaves no probe attached. Unset in production.
fn inject_panic() {
    let Some(ms) = std::env::var("INFERSCOPE_FAULT_PANIC_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("fault".into())
        .spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            panic!("INFERSCOPE_FAULT_PANIC_AFTER_MS: injected panic");
        });
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn forensics(command: ForensicsCommand) -> anyhow::Result<()> {
    use inferscope::forensics::{render, store::Store};
    let store = |dir: ForensicsDir| -> anyhow::Result<Store> {
        let overrides = Overrides {
            forensics_dir: dir.forensics_dir,
            ..Default::default()
        };
        let config = Config::load(dir.config.as_deref(), &ProcessEnv, &overrides)?;
        Ok(Store::new(config.forensics_dir, usize::MAX, u64::MAX))
    };
    match command {
        ForensicsCommand::List { dir, format } => {
            let store = store(dir)?;
            let (reports, errors) = store.list();
            for e in &errors {
                let e = e.to_string();
                eprintln!("inferscope: skipped: {}", render::visible(&e).unwrap_or(e));
            }
            match format {
                Format::Json => {
                    let rows: Vec<serde_json::Value> = reports
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "id": r.id, "time": r.time, "kind": r.kind, "pid": r.process.pid,
                                "comm": r.process.comm, "gpu": r.gpu.as_ref().map(|g| g.index),
                                "summary": r.summary,
                            })
                        })
                        .collect();
                    println!("{}", render::json(&rows)?);
                }
                Format::Text => {
                    if reports.is_empty() {
                        println!("no reports in {}", store.dir().display());
                    }
                    for r in &reports {
                        println!("{}", render::list_line(r));
                    }
                }
                Format::Html => anyhow::bail!("--format html is for `forensics show`"),
            }
        }
        ForensicsCommand::Show { id, dir, format } => {
            let report = store(dir)?.get(&id)?;
            match format {
                Format::Text => print!("{}", render::text(&report)),
                Format::Json => println!("{}", render::json(&report)?),
                Format::Html => print!("{}", render::html(&report)),
            }
        }
    }
    Ok(())
}

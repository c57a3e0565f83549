//! `cargo xtask setup | build | test | demo | bench | manifests`: everything a fresh machine needs, in
//! one place. Every command runs `setup` first; `setup` installs only what is missing.

mod bench;
mod demo;
mod setup;
mod util;

use xtask::{layers, manifests};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: the eBPF toolchain (aya's nightly + rust-src, or Debian's
    /// rustc with a precompiled BPF core), bpf-linker, a C compiler for the test doubles.
    Setup,
    /// Build the eBPF object and the agent in release (target/release/inferscope).
    Build,
    /// Run every test tier this machine can run (the root tier needs root and BTF).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the agent on its embedded defaults against a scripted CUDA workload.
    Demo,
    /// Measure probe overhead and pipeline throughput; prints a table of ratios.
    Bench {
        /// Shorter run (fewer iterations), for a quick look.
        #[arg(long)]
        quick: bool,
    },
    /// Render the Helm chart (deploy/helm/inferscope) into deploy/manifests/ and copy
    /// deploy/prometheus/*.yaml into the chart (tests/integration/tests/deploy.rs fails on
    /// drift).
    Manifests,
    /// The agent crate's top-level modules, what each imports, and any circle among them.
    Layers,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    setup::run(matches!(cli.command, Cmd::Test { .. } | Cmd::Setup))?;
    match cli.command {
        Cmd::Setup => Ok(()),
        Cmd::Build => build(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => {
            build()?;
            demo::run()
        }
        Cmd::Bench { quick } => {
            build()?;
            bench::run(quick)
        }
        Cmd::Layers => {
            let graph = layers::graph(&util::root_dir().join(AGENT_SRC))?;
            for (module, imports) in &graph {
                let to: Vec<&str> = imports.keys().map(String::as_str).collect();
                println!("{module} → {}", to.join(", "));
            }
            check_layers()
        }
        Cmd::Manifests => {
            setup::helm()?;
            manifests::run(&util::root_dir()).map_err(anyhow::Error::msg)
        }
    }
}

fn build() -> anyhow::Result<()> {
    util::cargo(&["build", "--release", "--workspace", "--bins"])
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    let root = util::is_root();
    if !root {
        if std::env::var_os("CI").is_some() {
            anyhow::bail!("CI is set but not running as root: the root test tier cannot run");
        }
        eprintln!("xtask: not root: the root tier (real eBPF loads and attaches) will be skipped");
    }
    util::cargo(&["fmt", "--all", "--", "--check"])?;
    check_layers()?;
    util::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // A fuzz target that no longer compiles fails here, not after the whole suite.
    fuzz_build()?;
    // The root-tier tests start the agent and the workload binaries.
    util::cargo(&["build", "--workspace", "--bins"])?;
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.push("--");
    // The root tier shares the kernel's uprobes on one test library; one test at a time
    // keeps each agent's view to its own workload.
    args.push("--test-threads=1");
    args.extend(extra.iter().map(String::as_str));
    let (tests, failures) = match util::cargo_test(&args) {
        Ok(()) => (Ok(()), String::new()),
        Err((e, failures)) => (Err(e), failures),
    };
    // The README's first command, as a new user runs it: a change that breaks it fails here.
    let demo = if root {
        build().and_then(|()| demo::run())
    } else {
        Ok(())
    };
    let fuzz = fuzz();
    if !failures.is_empty() {
        eprintln!(
            "\nxtask: the tests that failed, again (their output is further up):\n{failures}"
        );
    }
    tests.and(demo).and(fuzz)
}

/// The agent crate's sources, whose top-level modules must not import each other in a circle.
const AGENT_SRC: &str = "agent/src";

/// The knots among the agent's modules that predate the check, one per line (their modules,
/// space-separated). A circle passes while its modules are all in one line; one that reaches
/// further fails `cargo xtask test`. Lines shrink as the knots are taken apart.
const KNOWN_CIRCLES: &str = include_str!("../known-circles.txt");

/// The layers the agent's modules are ordered in, bottom first.
const LAYERS: &str = include_str!("../layers.txt");

fn check_layers() -> anyhow::Result<()> {
    let graph = layers::graph(&util::root_dir().join(AGENT_SRC))?;
    let new = layers::unknown_circles(&graph, KNOWN_CIRCLES);
    if !new.is_empty() {
        anyhow::bail!(
            "the agent's modules import each other in a circle (docs/architecture.md, layers):\n{}",
            new.join("\n")
        );
    }
    let order =
        layers::parse_layers(LAYERS).map_err(|e| anyhow::anyhow!("xtask/layers.txt: {e}"))?;
    let up = layers::layer_violations(&graph, &order);
    if !up.is_empty() {
        anyhow::bail!(
            "the agent's modules break their layers (docs/architecture.md, layers):\n{}",
            up.join("\n")
        );
    }
    Ok(())
}

const FUZZ_TARGETS: [&str; 7] = [
    "http_parser",
    "server_metrics",
    "elf_symbols",
    "proc_maps",
    "http2",
    "hpack",
    "event_skim",
];

/// `cargo fuzz` on rustup's nightly, not the stable cargo running xtask, in the repository.
fn cargo_fuzz(root: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("rustup");
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(root)
        .args(["run", "nightly", "cargo", "fuzz"]);
    cmd
}

/// Builds each fuzz target as [`fuzz`] builds it before running it.
fn fuzz_build() -> anyhow::Result<()> {
    let root = util::root_dir();
    for target in FUZZ_TARGETS {
        util::run(cargo_fuzz(&root).args(["build", target]))?;
    }
    Ok(())
}

/// Fuzz targets run for a bounded time (`INFERSCOPE_FUZZ_SECS`, default 60, shared by the
/// targets); a crash or a failed check fails the run (the input is left in `fuzz/artifacts/`).
fn fuzz() -> anyhow::Result<()> {
    let total: u64 = std::env::var("INFERSCOPE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let secs = (total / FUZZ_TARGETS.len() as u64).max(1);
    let root = util::root_dir();
    for target in FUZZ_TARGETS {
        let corpus = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = root.join("fuzz/seeds").join(target);
        util::run(
            cargo_fuzz(&root)
                .args(["run", target])
                .arg(&corpus)
                .arg(&seeds)
                .args(["--", &format!("-max_total_time={secs}")]),
        )?;
    }
    Ok(())
}

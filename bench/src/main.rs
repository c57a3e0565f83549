//! `inferscope-bench` (run by `cargo xtask bench [--quick]`, as root): measures, side by side
//! in one run, what the agent's probes cost per CUDA memory call against the least a probe can
//! do (the floor programs) and against no probe, on the three first-instruction kinds of the
//! CUDA driver double; the event pipeline's throughput, CPU per event and wakeup latency; and
//! the agent's memory with 10,000 live allocations in 100 processes; what the `http` family
//! costs a streaming server (the TGI stand-in) as its clients see it; the agent's peak RSS
//! under 10,000 connections each holding a partial request plus endless streams. Prints the tables and
//! writes them to `docs/performance.md`. Figures are reported against their targets; nothing
//! is asserted.

mod agentproc;
mod capture_cost;
mod driver;
mod http;
mod httpmem;
mod node_scale;
mod nvml;
mod otlp;
mod probes;
mod report;
mod stacks;
mod syscall_tax;

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use cuda_workload::Variant;

use agentproc::{metric_sum, AgentProcess, Workload};
use driver::{open_variant, Driver};
use probes::{AgentRun, FloorRun};

/// Sizes of one run.
pub struct Sizes {
    pub quick: bool,
    /// Alloc/free pairs per measurement on nop5 and push.
    pub pairs_fast: u64,
    /// Alloc/free pairs per measurement on endbr (its entry probes are single-stepped).
    pub pairs_endbr: u64,
    pub rounds: usize,
    /// Duration of each throughput measurement.
    pub hammer: Duration,
    /// Alloc/free pairs, one every 2 ms, for the wakeup latency.
    pub latency_pairs: usize,
    pub processes: usize,
    pub allocs_per_process: usize,
    /// Streamed requests per configuration (without / with the agent) for the http figures.
    pub http_requests: usize,
    pub http_concurrency: usize,
    pub http_tokens: u64,
    /// Rounds of the in-process OTLP export measurements.
    pub otlp_rounds: usize,
    /// How long the agent runs with its collector down, at 200 requests/s.
    pub otlp_down_secs: u64,
    /// Write + read iterations per loop of the unwatched-process tax.
    pub syscall_tax_iterations: u64,
    /// Streamed requests per configuration and round of the per-captured-call cost.
    pub capture_requests: u64,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        let div = if quick { 10 } else { 1 };
        Self {
            quick,
            pairs_fast: 200_000 / div,
            pairs_endbr: 20_000 / div,
            rounds: 3,
            hammer: Duration::from_millis(3000 / div),
            latency_pairs: 1000 / div as usize,
            processes: 100,
            allocs_per_process: 100,
            // Phases of about 5 s at 200 requests/s: the agent in its steady state, not its
            // first reads.
            http_requests: 6000 / div as usize,
            http_concurrency: 32,
            http_tokens: 64,
            otlp_rounds: if quick { 5 } else { 21 },
            otlp_down_secs: if quick { 20 } else { 600 },
            syscall_tax_iterations: SYSCALL_TAX_ITERATIONS / div,
            capture_requests: CAPTURE_REQUESTS / div,
        }
    }
}

/// What a per-call row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// `cuMemAlloc_v2` + `cuMemFree_v2` pairs on a double, a context current.
    Pairs(Variant),
    /// `cuMemAlloc_v2` failing with `not_initialized` (no `cuInit`): the novmm double (first
    /// instruction `push`, emulated) or the real 535 driver (probes on the emulated `je` after
    /// its `cmpl`), the one path on which both can be timed without a GPU.
    Uninit { real: bool },
}

impl Subject {
    pub fn name(self) -> &'static str {
        match self {
            Subject::Pairs(v) => v.name(),
            Subject::Uninit { real: false } => "novmm double (push)",
            Subject::Uninit { real: true } => "real 535 driver (`je` after `cmpl`)",
        }
    }

    /// Probed calls per iteration (records expected per iteration).
    pub fn calls(self) -> u64 {
        match self {
            Subject::Pairs(_) => 2,
            Subject::Uninit { .. } => 1,
        }
    }
}

/// Cost per iteration (a pair, or one failing call) of one subject: medians over the
/// rounds, in ns.
pub struct Overhead {
    pub subject: Subject,
    pub pairs: u64,
    pub none_ns: f64,
    pub floor_ns: f64,
    pub agent_ns: f64,
    /// Events delivered / expected (one per probed call), over all rounds.
    pub floor_delivered: (u64, u64),
    pub agent_delivered: (u64, u64),
    pub floor_lost: u64,
    pub agent_lost: u64,
}

pub struct Throughput {
    pub threads: usize,
    pub seconds: f64,
    pub raw_rate: f64,
    pub raw_events: u64,
    pub raw_expected: u64,
    pub raw_lost: u64,
    pub pipe_rate: f64,
    pub pipe_events: u64,
    pub pipe_expected: u64,
    pub pipe_lost: u64,
    pub pipe_dropped: u64,
    /// Agent process CPU (user + system) per event processed, ns.
    pub cpu_per_event_ns: f64,
}

pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub struct Memory {
    pub processes: usize,
    pub allocations: u64,
    pub idle_rss_kib: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub struct Results {
    pub nvml: nvml::NvmlCost,
    pub overhead: Vec<Overhead>,
    /// The failing-call rows: the double beside the real driver.
    pub failing: Vec<Overhead>,
    pub throughput: Throughput,
    pub latency: Latency,
    pub memory: Memory,
    pub http: http::HttpCost,
    pub grpc: http::HttpCost,
    /// The TLS server with OpenSSL's internal functions probed (the default), then its
    /// exported calls.
    pub tls: http::HttpCost,
    pub tls_exported: http::HttpCost,
    pub otlp: otlp::OtlpCost,
}

/// Connections holding a partial request, and the rounds of 1 KiB each header grows by
/// (10,000 × 12 KiB is past the default 32 MiB http state budget).
const HTTP_MEMORY_CONNECTIONS: usize = 10_000;
const HTTP_MEMORY_ROUNDS: usize = 12;

/// `CUDA_ERROR_NOT_INITIALIZED`.
const NOT_INITIALIZED: u32 = 3;

/// Loop iterations (a write and a read each) and rounds of the unwatched-process tax.
const SYSCALL_TAX_ITERATIONS: u64 = 200_000;
const SYSCALL_TAX_ROUNDS: usize = 5;
/// Requests per configuration and round, and rounds, of the per-captured-call cost.
const CAPTURE_REQUESTS: u64 = 2000;
const CAPTURE_ROUNDS: usize = 10;

fn main() {
    let quick = std::env::args().skip(1).any(|a| a == "--quick");
    let args: Vec<String> = std::env::args().collect();
    // `--serve-partial PORT`: the watched server of the memory figures (a process of its own).
    if let Some(i) = args.iter().position(|a| a == "--serve-partial") {
        let port = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if let Err(e) = httpmem::serve(port) {
            eprintln!("inferscope-bench: serving: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    // `--http-memory-only`: only the memory figures under hostile HTTP input, printed.
    if args.iter().any(|a| a == "--http-memory-only") {
        match httpmem::measure(
            &Variant::Nop5.lib_path(),
            HTTP_MEMORY_CONNECTIONS,
            HTTP_MEMORY_ROUNDS,
        ) {
            Ok(m) => {
                println!("{}", httpmem::table(&m));
                return;
            }
            Err(e) => {
                eprintln!("inferscope-bench: {e:#}");
                std::process::exit(1);
            }
        }
    }
    // `--capture-only`: only what a watched server pays per captured call, printed.
    if args.iter().any(|a| a == "--capture-only") {
        let requests = std::env::var("BENCH_CAPTURE_REQUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick {
                CAPTURE_REQUESTS / 10
            } else {
                CAPTURE_REQUESTS
            });
        for writes in [capture_cost::Writes::Whole, capture_cost::Writes::Vectored] {
            match capture_cost::measure(&Variant::Nop5.lib_path(), writes, requests, CAPTURE_ROUNDS)
            {
                Ok(c) => println!("{}", capture_cost::table(&c)),
                Err(e) => {
                    eprintln!("inferscope-bench: {e:#}");
                    std::process::exit(1);
                }
            }
        }
        return;
    }
    // `--stacks-only`: only the stack walks' cost by allocation size, printed.
    if args.iter().any(|a| a == "--stacks-only") {
        let sizes = Sizes::new(quick);
        match stacks::measure_alone(sizes.pairs_fast, sizes.rounds) {
            Ok(c) => {
                println!("{}", stacks::table(&c));
                return;
            }
            Err(e) => {
                eprintln!("inferscope-bench: {e:#}");
                std::process::exit(1);
            }
        }
    }
    // `--syscall-tax-only`: only what an unwatched process pays per syscall, printed.
    if args.iter().any(|a| a == "--syscall-tax-only") {
        match syscall_tax::measure(
            &Variant::Nop5.lib_path(),
            SYSCALL_TAX_ITERATIONS,
            SYSCALL_TAX_ROUNDS,
        ) {
            Ok(t) => {
                println!("{}", syscall_tax::table(&t));
                return;
            }
            Err(e) => {
                eprintln!("inferscope-bench: {e:#}");
                std::process::exit(1);
            }
        }
    }
    // `--node-scale-only`: only the busy-node figures, printed.
    if args.iter().any(|a| a == "--node-scale-only") {
        match node_scale::measure(&Variant::Nop5.lib_path(), &node_scale::Sizes::new(quick)) {
            Ok(n) => {
                println!("{}", node_scale::table(&n));
                return;
            }
            Err(e) => {
                eprintln!("inferscope-bench: {e:#}");
                std::process::exit(1);
            }
        }
    }
    // `--per-call-only`: only the per-call tables, printed.
    if args.iter().any(|a| a == "--per-call-only") {
        let sizes = Sizes::new(quick);
        let run = || -> anyhow::Result<String> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let (overhead, failing) = measure_per_call(&rt, &sizes, Instant::now())?;
            Ok(report::per_call_tables(&overhead, &failing))
        };
        match run() {
            Ok(t) => {
                println!("{t}");
                return;
            }
            Err(e) => {
                eprintln!("inferscope-bench: {e:#}");
                std::process::exit(1);
            }
        }
    }
    // `--tgi-only`, `--grpc-only`, `--tls-only`: only that server's wire-timing figures, printed.
    // (`--tls-only`: both placements of the TLS probes.) `BENCH_HTTP_REQUESTS=N` sends N
    // requests per configuration in place of 6,000 (a value that is not such a number fails).
    // The agent reads the bench's environment: `INFERSCOPE_*` settings apply to it.
    type Wire = fn(&std::path::Path, usize, usize, u64) -> anyhow::Result<http::HttpCost>;
    let wire_only: Option<Vec<Wire>> = if args.iter().any(|a| a == "--grpc-only") {
        Some(vec![http::measure_grpc])
    } else if args.iter().any(|a| a == "--tgi-only") {
        Some(vec![http::measure])
    } else if args.iter().any(|a| a == "--tls-only") {
        Some(vec![
            |l, r, c, t| http::measure_tls(l, r, c, t, true),
            |l, r, c, t| http::measure_tls(l, r, c, t, false),
        ])
    } else {
        None
    };
    if let Some(measures) = wire_only {
        let sizes = Sizes::new(quick);
        let run = || -> anyhow::Result<String> {
            let requests = match std::env::var("BENCH_HTTP_REQUESTS") {
                Ok(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n >= http::ROUNDS)
                    .with_context(|| {
                        format!(
                            "BENCH_HTTP_REQUESTS={v:?}: a number of requests, at least one per \
                             round ({})",
                            http::ROUNDS
                        )
                    })?,
                Err(_) => sizes.http_requests,
            };
            let mut out = String::new();
            for measure in measures {
                let g = measure(
                    &Variant::Nop5.lib_path(),
                    requests,
                    sizes.http_concurrency,
                    sizes.http_tokens,
                )?;
                out.push_str(&report::wire_table(&g));
            }
            Ok(out)
        };
        match run() {
            Ok(t) => {
                println!("{t}");
                return;
            }
            Err(e) => {
                eprintln!("inferscope-bench: {e:#}");
                std::process::exit(1);
            }
        }
    }
    // `--otlp-only [SECS]`: only the OTLP figures, printed, docs/performance.md untouched.
    if let Some(i) = args.iter().position(|a| a == "--otlp-only") {
        let secs = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(20);
        let sizes = Sizes::new(quick);
        match otlp::measure(sizes.otlp_rounds, secs, &Variant::Nop5.lib_path()) {
            Ok(o) => {
                let mut s = String::new();
                report::otlp_table(&mut s, &o);
                println!("{s}");
                return;
            }
            Err(e) => {
                eprintln!("inferscope-bench: {e:#}");
                std::process::exit(1);
            }
        }
    }
    if let Err(e) = run(quick) {
        eprintln!("inferscope-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(quick: bool) -> anyhow::Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (it loads and attaches eBPF programs)");
    }
    let sizes = Sizes::new(quick);
    let started = Instant::now();
    // First, while this process is single-threaded: the NVML double reads its environment.
    eprintln!(
        "bench: [  0 s] NVML sampling, {} simulated GPUs",
        nvml::GPUS
    );
    let scratch =
        std::env::temp_dir().join(format!("inferscope-bench-nvml-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let nvml_cost = nvml::measure(
        &scratch,
        if quick { 50 } else { 500 },
        if quick { 1.0 } else { 3.0 },
    );
    let _ = std::fs::remove_dir_all(&scratch);
    let nvml_cost = nvml_cost?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;

    let (overhead, failing) = measure_per_call(&rt, &sizes, started)?;

    let nop5 = open_variant(Variant::Nop5)?;
    eprintln!(
        "bench: [{:>3.0} s] throughput ({:?} per measurement)",
        started.elapsed().as_secs_f64(),
        sizes.hammer
    );
    let throughput = measure_throughput(&nop5, sizes.hammer)?;
    eprintln!(
        "bench: [{:>3.0} s] wakeup latency ({} pairs, one every 2 ms)",
        started.elapsed().as_secs_f64(),
        sizes.latency_pairs
    );
    let latency = measure_latency(&rt, &nop5, sizes.latency_pairs)?;
    drop(nop5);
    eprintln!(
        "bench: [{:>3.0} s] agent RSS with {} processes × {} allocations",
        started.elapsed().as_secs_f64(),
        sizes.processes,
        sizes.allocs_per_process
    );
    let memory = measure_memory(sizes.processes, sizes.allocs_per_process)?;
    eprintln!(
        "bench: [{:>3.0} s] stack walks by allocation size ({} pairs × {} rounds × 3 rules)",
        started.elapsed().as_secs_f64(),
        sizes.pairs_fast,
        sizes.rounds
    );
    let stack_cost = stacks::measure(&rt, sizes.pairs_fast, sizes.rounds)?;
    drop(rt);
    eprintln!(
        "bench: [{:>3.0} s] http: {} streamed requests × {} token events, {} connections, without and with the agent",
        started.elapsed().as_secs_f64(),
        sizes.http_requests,
        sizes.http_tokens,
        sizes.http_concurrency
    );
    let http = http::measure(
        &Variant::Nop5.lib_path(),
        sizes.http_requests,
        sizes.http_concurrency,
        sizes.http_tokens,
    )?;
    eprintln!(
        "bench: [{:>3.0} s] grpc: {} streamed calls × {} messages, {} streams on one channel, without and with the agent",
        started.elapsed().as_secs_f64(),
        sizes.http_requests,
        sizes.http_tokens,
        sizes.http_concurrency
    );
    let grpc = http::measure_grpc(
        &Variant::Nop5.lib_path(),
        sizes.http_requests,
        sizes.http_concurrency,
        sizes.http_tokens,
    )?;
    eprintln!(
        "bench: [{:>3.0} s] tls: {} streamed requests × {} token events, {} connections to a C server over OpenSSL, without and with the agent",
        started.elapsed().as_secs_f64(),
        sizes.http_requests,
        sizes.http_tokens,
        sizes.http_concurrency
    );
    let [tls, tls_exported] = [true, false].map(|internal| {
        http::measure_tls(
            &Variant::Nop5.lib_path(),
            sizes.http_requests,
            sizes.http_concurrency,
            sizes.http_tokens,
            internal,
        )
    });
    let (tls, tls_exported) = (tls?, tls_exported?);
    eprintln!(
        "bench: [{:>3.0} s] http memory: {HTTP_MEMORY_CONNECTIONS} partial requests and endless streams",
        started.elapsed().as_secs_f64(),
    );
    let http_memory = httpmem::measure(
        &Variant::Nop5.lib_path(),
        HTTP_MEMORY_CONNECTIONS,
        HTTP_MEMORY_ROUNDS,
    )?;

    eprintln!(
        "bench: [{:>3.0} s] unwatched-process tax: {} × write+read on a pipe and a loopback socket, {} rounds",
        started.elapsed().as_secs_f64(),
        sizes.syscall_tax_iterations,
        SYSCALL_TAX_ROUNDS,
    );
    let tax = syscall_tax::measure(
        &Variant::Nop5.lib_path(),
        sizes.syscall_tax_iterations,
        SYSCALL_TAX_ROUNDS,
    )?;

    eprintln!(
        "bench: [{:>3.0} s] watched-server cost per captured call (write, then writev): {} requests × 3 configurations, {} rounds each",
        started.elapsed().as_secs_f64(),
        sizes.capture_requests,
        CAPTURE_ROUNDS,
    );
    let capture = capture_cost::measure(
        &Variant::Nop5.lib_path(),
        capture_cost::Writes::Whole,
        sizes.capture_requests,
        CAPTURE_ROUNDS,
    )?;
    let capture_vectored = capture_cost::measure(
        &Variant::Nop5.lib_path(),
        capture_cost::Writes::Vectored,
        sizes.capture_requests,
        CAPTURE_ROUNDS,
    )?;

    let scale_sizes = node_scale::Sizes::new(quick);
    eprintln!(
        "bench: [{:>3.0} s] busy node: {} idle processes ({} with {} mappings), {} execs/s for {:?}",
        started.elapsed().as_secs_f64(),
        scale_sizes.idle,
        scale_sizes.mapped,
        scale_sizes.mappings,
        scale_sizes.churn_per_sec,
        scale_sizes.churn,
    );
    let scale = node_scale::measure(&Variant::Nop5.lib_path(), &scale_sizes)?;

    eprintln!(
        "bench: [{:>3.0} s] otlp: export cost ({} rounds), then {} s with the collector down at 200 requests/s",
        started.elapsed().as_secs_f64(),
        sizes.otlp_rounds,
        sizes.otlp_down_secs
    );
    let otlp = otlp::measure(
        sizes.otlp_rounds,
        sizes.otlp_down_secs,
        &Variant::Nop5.lib_path(),
    )?;

    let results = Results {
        nvml: nvml_cost,
        overhead,
        failing,
        throughput,
        latency,
        memory,
        http,
        grpc,
        tls,
        tls_exported,
        otlp,
    };
    let elapsed = started.elapsed();
    let tables = report::tables(&results)
        + "\n"
        + &httpmem::table(&http_memory)
        + "\n"
        + &syscall_tax::table(&tax)
        + "\n"
        + &capture_cost::table(&capture)
        + "\n"
        + &capture_cost::table(&capture_vectored)
        + "\n"
        + &stacks::table(&stack_cost)
        + "\n"
        + &node_scale::table(&scale);
    println!("{tables}");
    let doc = report::document(&sizes, &results, &tables, elapsed);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("docs")
        .join("performance.md");
    std::fs::create_dir_all(path.parent().context("docs dir")?)?;
    std::fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "bench: done in {:.0} s; wrote {}",
        elapsed.as_secs_f64(),
        path.canonicalize().unwrap_or(path).display()
    );
    Ok(())
}

/// The per-call rows: pairs on each double's first-instruction kind, then failing calls on the
/// double and on the real driver.
fn measure_per_call(
    rt: &tokio::runtime::Runtime,
    sizes: &Sizes,
    started: Instant,
) -> anyhow::Result<(Vec<Overhead>, Vec<Overhead>)> {
    let mut overhead = Vec::new();
    for variant in [Variant::Nop5, Variant::Push, Variant::Endbr] {
        let pairs = if variant == Variant::Endbr {
            sizes.pairs_endbr
        } else {
            sizes.pairs_fast
        };
        eprintln!(
            "bench: [{:>3.0} s] per-call overhead on {} ({pairs} pairs × {} rounds)",
            started.elapsed().as_secs_f64(),
            variant.name(),
            sizes.rounds
        );
        let drv = open_variant(variant)?;
        let subject = Subject::Pairs(variant);
        overhead.push(measure_overhead(
            rt,
            subject,
            &drv,
            &variant.lib_path(),
            pairs,
            sizes.rounds,
        )?);
    }
    let mut failing = Vec::new();
    for (real, lib) in [
        (false, Variant::NoVmm.lib_path()),
        (true, driver::real_driver_path()?),
    ] {
        let subject = Subject::Uninit { real };
        eprintln!(
            "bench: [{:>3.0} s] per-call overhead of failing calls on the {} ({} calls × {} rounds)",
            started.elapsed().as_secs_f64(),
            subject.name(),
            sizes.pairs_endbr,
            sizes.rounds
        );
        let drv = Driver::open_uninit(&lib)?;
        let code = drv.pair();
        if code != NOT_INITIALIZED {
            bail!(
                "{}: cuMemAlloc_v2 without cuInit returned {code}, not {NOT_INITIALIZED}",
                lib.display()
            );
        }
        failing.push(measure_overhead(
            rt,
            subject,
            &drv,
            &lib,
            sizes.pairs_endbr,
            sizes.rounds,
        )?);
    }

    Ok((overhead, failing))
}

fn per_pair_ns(d: Duration, pairs: u64) -> f64 {
    d.as_nanos() as f64 / pairs as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (a) nothing attached, (b) the floor, (c) the agent's `cuda` family with its pipeline,
/// interleaved within each round; medians over the rounds. `drv` is `lib`, loaded.
fn measure_overhead(
    rt: &tokio::runtime::Runtime,
    subject: Subject,
    drv: &Driver,
    lib: &std::path::Path,
    pairs: u64,
    rounds: usize,
) -> anyhow::Result<Overhead> {
    drv.time_pairs(pairs / 10); // warm the library's tables and the caches
    let expected = subject.calls() * pairs;
    let (mut none, mut floor, mut agent) = (Vec::new(), Vec::new(), Vec::new());
    let mut out = Overhead {
        subject,
        pairs,
        none_ns: 0.0,
        floor_ns: 0.0,
        agent_ns: 0.0,
        floor_delivered: (0, 0),
        agent_delivered: (0, 0),
        floor_lost: 0,
        agent_lost: 0,
    };
    for _ in 0..rounds {
        none.push(per_pair_ns(drv.time_pairs(pairs), pairs));

        let run = FloorRun::start(lib)?;
        let t = drv.time_pairs(pairs);
        let d = run.finish();
        floor.push(per_pair_ns(t, pairs));
        out.floor_delivered.0 += d.events;
        out.floor_delivered.1 += expected;
        out.floor_lost += d.lost;

        let run = AgentRun::start(rt, lib, false)?;
        if let Subject::Pairs(_) = subject {
            // Context calls once the probes are on, so they know this thread's device.
            drv.bind_context()?;
        }
        let t = drv.time_pairs(pairs);
        let (d, _) = run.finish(rt);
        agent.push(per_pair_ns(t, pairs));
        out.agent_delivered.0 += d.events;
        out.agent_delivered.1 += expected;
        out.agent_lost += d.lost;
    }
    out.none_ns = median(none);
    out.floor_ns = median(floor);
    out.agent_ns = median(agent);
    Ok(out)
}

/// `threads` threads doing alloc/free pairs for `dur`: (pairs done, wall time).
fn hammer(drv: &Driver, threads: usize, dur: Duration) -> anyhow::Result<(u64, Duration)> {
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    drv.bind_context()?;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..64 {
                            std::hint::black_box(drv.pair());
                        }
                        n += 64;
                    }
                    total.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        }
        Ok(())
    })?;
    Ok((total.load(Ordering::Relaxed), start.elapsed()))
}

fn measure_throughput(drv: &Driver, dur: Duration) -> anyhow::Result<Throughput> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let lib = Variant::Nop5.lib_path();

    // Raw: floor programs, a consumer that only counts.
    let run = FloorRun::start(&lib)?;
    let (raw_pairs, raw_el) = hammer(drv, threads, dur)?;
    let raw = run.finish();

    // Pipeline: the real agent binary, probe budget off (it would shed the probes at this
    // rate, which is its job but not what is measured here).
    let agent = AgentProcess::start(&lib, &[("INFERSCOPE_PROBES__BUDGET_CORE_SHARE", "0")])?;
    let before = agent.metrics()?;
    let e0 = metric_sum(&before, "inferscope_events_total");
    let cpu0 = agent.cpu_ns()?;
    let (pipe_pairs, pipe_el) = hammer(drv, threads, dur)?;
    let expected = e0 + 2.0 * pipe_pairs as f64;
    let done = Instant::now();
    // Wait for the tracker to catch up, and for the manager to publish lost counts (1 s).
    let after = agent.wait_for("the pipeline to drain", Duration::from_secs(30), |t| {
        let lost = metric_sum(t, "inferscope_events_lost_total");
        metric_sum(t, "inferscope_events_total") + lost >= expected
            && done.elapsed() > Duration::from_millis(1500)
    });
    let after = match after {
        Ok(t) => t,
        Err(_) => agent.metrics()?,
    };
    let cpu1 = agent.cpu_ns()?;
    let e1 = metric_sum(&after, "inferscope_events_total");
    let pipe_lost = metric_sum(&after, "inferscope_events_lost_total") as u64;
    let pipe_dropped = metric_sum(&after, "inferscope_events_dropped_total") as u64;
    agent.stop()?;
    let pipe_events = (e1 - e0) as u64;

    Ok(Throughput {
        threads,
        seconds: dur.as_secs_f64(),
        raw_rate: raw.events as f64 / raw_el.as_secs_f64(),
        raw_events: raw.events,
        raw_expected: 2 * raw_pairs,
        raw_lost: raw.lost,
        pipe_rate: pipe_events as f64 / pipe_el.as_secs_f64(),
        pipe_events,
        pipe_expected: 2 * pipe_pairs,
        pipe_lost,
        pipe_dropped,
        cpu_per_event_ns: (cpu1 - cpu0) as f64 / pipe_events.max(1) as f64,
    })
}

fn measure_latency(
    rt: &tokio::runtime::Runtime,
    drv: &Driver,
    pairs: usize,
) -> anyhow::Result<Latency> {
    let run = AgentRun::start(rt, &Variant::Nop5.lib_path(), true)?;
    drv.bind_context()?;
    for _ in 0..pairs {
        std::hint::black_box(drv.pair());
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(50));
    let (_, mut lat) = run.finish(rt);
    if lat.is_empty() {
        bail!("no event reached the tracker");
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1e6;
    Ok(Latency {
        samples: lat.len(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    })
}

fn measure_memory(processes: usize, allocs: usize) -> anyhow::Result<Memory> {
    let variant = Variant::Nop5;
    let agent = AgentProcess::start(&variant.lib_path(), &[])?;
    std::thread::sleep(Duration::from_millis(500));
    let (idle_rss_kib, _) = agent.rss_kib()?;
    let plan = format!("alloc dev=0 size=4096 count={allocs}; checkpoint name=live");
    let mut workloads = (0..processes)
        .map(|_| Workload::spawn(variant, &plan))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for w in &mut workloads {
        w.next_line()?; // ready
        w.proceed()?;
    }
    for w in &mut workloads {
        w.next_line()?; // checkpoint: every allocation made
    }
    let want = (processes * allocs) as f64;
    let text = agent
        .wait_for(
            "every allocation in the ledger",
            Duration::from_secs(60),
            |t| {
                metric_sum(t, "inferscope_tracked_processes") >= processes as f64
                    && metric_sum(t, "gpu_process_allocations") >= want
            },
        )
        .with_context(|| agent.log())?;
    let (rss_kib, hwm_kib) = agent.rss_kib()?;
    drop(workloads);
    agent.stop()?;
    Ok(Memory {
        processes: metric_sum(&text, "inferscope_tracked_processes") as usize,
        allocations: metric_sum(&text, "gpu_process_allocations") as u64,
        idle_rss_kib,
        rss_kib,
        hwm_kib,
    })
}

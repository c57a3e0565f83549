//! What a busy node costs the agent: idle processes with many mappings (its CPU at rest and
//! its RSS once it has looked at them), processes starting and exiting (its CPU meanwhile,
//! what it read per exec, and its memory back where it was after), and processes that load a
//! driver nobody has probed and allocate at once (whether their first call is counted, and for
//! how long each was held).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::agentproc::{metric_sum, AgentProcess};

pub struct Sizes {
    pub idle: usize,
    /// Of them, processes with `mappings` mappings each (the rest have a few).
    pub mapped: usize,
    pub mappings: usize,
    pub rest: Duration,
    pub churn_per_sec: u32,
    pub churn: Duration,
    pub first_calls: usize,
}

impl Sizes {
    pub fn new(quick: bool) -> Self {
        Self {
            idle: if quick { 400 } else { 2000 },
            mapped: if quick { 100 } else { 500 },
            mappings: 10_000,
            rest: Duration::from_secs(if quick { 5 } else { 20 }),
            churn_per_sec: 200,
            churn: Duration::from_secs(if quick { 5 } else { 30 }),
            first_calls: if quick { 3 } else { 10 },
        }
    }
}

#[derive(Debug, Default)]
pub struct NodeScale {
    pub idle: usize,
    pub mapped: usize,
    pub mappings: usize,
    /// Agent CPU from its start until it had looked at every process, seconds.
    pub start_cpu_s: f64,
    pub rest_secs: f64,
    /// Agent CPU at rest, as a share of one core.
    pub rest_share: f64,
    pub rss_kib: u64,
    pub churn_execs: u64,
    pub churn_secs: f64,
    pub churn_share: f64,
    /// `/proc` files read per exec during the churn (maps and command line).
    pub reads_per_exec: f64,
    pub rss_before_churn_kib: u64,
    pub rss_after_churn_kib: u64,
    /// Entries in the agent's per-process BPF maps before and after the churn.
    pub bpf_entries_before: BTreeMap<&'static str, u64>,
    pub bpf_entries_after: BTreeMap<&'static str, u64>,
    /// And after the processes that loaded a driver and allocated had exited.
    pub bpf_entries_end: BTreeMap<&'static str, u64>,
    /// Processes that loaded a fresh driver and allocated at once: first calls counted / run.
    pub first_calls: (u64, u64),
    pub hold_mean_ms: f64,
}

/// Idle processes forked from one parent that mapped `mappings` regions first.
struct Idle(Child);

impl Idle {
    fn start(mappings: usize, processes: usize) -> anyhow::Result<Self> {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/servers/many_maps.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args([mappings.to_string(), processes.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("python3 (run `cargo xtask setup`)")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("many_maps.py did not start: {line:?}");
        }
        Ok(Self(child))
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        // Closing stdin makes it kill its children and wait for them.
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

fn reads(text: &str) -> f64 {
    metric_sum(text, "inferscope_discovery_proc_reads_total")
}

/// Sum of the samples of `name` whose labels include `label` (`key="value"`).
fn sum_with(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn alloc_calls(text: &str) -> f64 {
    sum_with(text, "gpu_cuda_alloc_calls_total", "api=\"cuMemAlloc_v2\"")
}

pub fn measure(lib: &Path, sizes: &Sizes) -> anyhow::Result<NodeScale> {
    let mut out = NodeScale {
        idle: sizes.idle,
        mapped: sizes.mapped,
        mappings: sizes.mappings,
        ..Default::default()
    };
    let _many = Idle::start(sizes.mappings, sizes.mapped)?;
    let _few = Idle::start(50, sizes.idle - sizes.mapped)?;
    let agent = AgentProcess::start(lib, &[])?;
    agent.wait_for(
        "the first look at every process",
        Duration::from_secs(300),
        |t| {
            sum_with(
                t,
                "inferscope_discovery_proc_reads_total",
                "file=\"cmdline\"",
            ) >= sizes.idle as f64
        },
    )?;
    // The watcher may still be reading its last command lines.
    std::thread::sleep(Duration::from_secs(2));
    out.start_cpu_s = agent.cpu_ns()? as f64 / 1e9;
    let cpu = agent.cpu_ns()?;
    let t = Instant::now();
    std::thread::sleep(sizes.rest);
    out.rest_secs = t.elapsed().as_secs_f64();
    out.rest_share = (agent.cpu_ns()? - cpu) as f64 / 1e9 / out.rest_secs;
    out.rss_kib = agent.rss_kib()?.0;

    // Churn: short-lived processes, started on a fixed schedule.
    out.rss_before_churn_kib = agent.rss_kib()?.0;
    out.bpf_entries_before = inferscope::probe::census::entries()?;
    let before = reads(&agent.metrics()?);
    let cpu = agent.cpu_ns()?;
    let t = Instant::now();
    let period = Duration::from_secs_f64(1.0 / f64::from(sizes.churn_per_sec));
    let mut next = Instant::now();
    let mut children = Vec::new();
    while t.elapsed() < sizes.churn {
        children.push(Command::new("/bin/true").spawn().context("/bin/true")?);
        out.churn_execs += 1;
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    for mut c in children {
        let _ = c.wait();
    }
    out.churn_secs = t.elapsed().as_secs_f64();
    // The last records read and handled.
    std::thread::sleep(Duration::from_secs(1));
    out.churn_share = (agent.cpu_ns()? - cpu) as f64 / 1e9 / out.churn_secs;
    out.reads_per_exec = (reads(&agent.metrics()?) - before) / out.churn_execs as f64;
    out.rss_after_churn_kib = agent.rss_kib()?.0;
    out.bpf_entries_after = inferscope::probe::census::entries()?;

    // A driver file no process has mapped, loaded by a process that allocates at once.
    let dir = tempfile_dir()?;
    for i in 0..sizes.first_calls {
        let sub = dir.join(i.to_string());
        std::fs::create_dir_all(&sub)?;
        std::fs::copy(lib, sub.join("libcuda.so.1"))?;
        let before = alloc_calls(&agent.metrics()?);
        let status = Command::new(crate::agentproc::sibling_bin(
            cuda_workload::WORKLOAD_BIN_NAME,
        )?)
        .args(["--plan", "alloc dev=0 size=4096 count=1"])
        .env("LD_LIBRARY_PATH", &sub)
        .env(cuda_workload::ENV_GPU_MEM, "1G")
        .env(cuda_workload::ENV_GPU_COUNT, "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
        if !status.success() {
            bail!("cuda-workload failed: {status}");
        }
        out.first_calls.1 += 1;
        let counted = agent
            .wait_for("the first call", Duration::from_secs(2), |t| {
                alloc_calls(t) > before
            })
            .is_ok();
        out.first_calls.0 += u64::from(counted);
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Their exits handled.
    std::thread::sleep(Duration::from_millis(500));
    out.bpf_entries_end = inferscope::probe::census::entries()?;
    let text = agent.metrics()?;
    let (sum, count) = (
        metric_sum(&text, "inferscope_probe_opener_hold_seconds_sum"),
        metric_sum(&text, "inferscope_probe_opener_hold_seconds_count"),
    );
    out.hold_mean_ms = if count > 0.0 {
        sum / count * 1e3
    } else {
        f64::NAN
    };
    agent.stop()?;
    Ok(out)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("inferscope-bench-drivers-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The section of docs/performance.md, against the targets of the issue that set them.
pub fn table(n: &NodeScale) -> String {
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let mut s = String::from("### A busy node\n\n");
    s += &format!(
        "{} idle processes, {} of them with {} mappings each (forked from one parent that mapped \
         them), the agent started after them (defaults: every family on).\n\n",
        n.idle, n.mapped, n.mappings
    );
    s += "| figure | value | target |\n|---|---|---|\n";
    s += &format!(
        "| agent CPU from its start to its first look at every process done | {:.2} s | — |\n",
        n.start_cpu_s
    );
    s += &format!(
        "| agent CPU at rest, over {:.0} s | {:.3} % of a core | ≤ 0.5 %: {} |\n",
        n.rest_secs,
        n.rest_share * 100.0,
        verdict(n.rest_share <= 0.005)
    );
    s += &format!(
        "| agent RSS at rest | {:.1} MiB | — |\n",
        n.rss_kib as f64 / 1024.0
    );
    s += &format!(
        "| {} processes started and exited over {:.0} s ({:.0}/s): agent CPU | {:.2} % of a core | — |\n",
        n.churn_execs,
        n.churn_secs,
        n.churn_execs as f64 / n.churn_secs,
        n.churn_share * 100.0
    );
    s += &format!(
        "| `/proc` files read per exec (maps and command line) | {:.2} | 2 |\n",
        n.reads_per_exec
    );
    s += &format!(
        "| agent RSS before / after the churn | {:.1} / {:.1} MiB | back where it was: {} |\n",
        n.rss_before_churn_kib as f64 / 1024.0,
        n.rss_after_churn_kib as f64 / 1024.0,
        verdict(n.rss_after_churn_kib <= n.rss_before_churn_kib + 1024)
    );
    s += &bpf_row("the churn", &n.bpf_entries_before, &n.bpf_entries_after);
    s += &format!(
        "| processes loading a driver never probed and allocating at once: first call counted | {} of {} | every one: {} |\n",
        n.first_calls.0,
        n.first_calls.1,
        verdict(n.first_calls.0 == n.first_calls.1)
    );
    s += &format!(
        "| how long each was held (mean) | {:.1} ms | — |\n",
        n.hold_mean_ms
    );
    s += &bpf_row(
        "those processes exited",
        &n.bpf_entries_before,
        &n.bpf_entries_end,
    );
    s += "\nThe agent reads every process's maps and command line once when it starts (a maps \
text of 10,000 lines takes about 15 ms), then only the processes the kernel names \
(`docs/architecture.md`, Discovery): at rest it reads nothing, and its CPU is what its own \
timers cost, its ring readers asleep until a record wakes them. Each exec costs one read of \
the new program's maps and one of its command line. A process that loads a driver file no \
process had mapped is held (stopped) from its loader's report until the probes are attached, \
so its first call is counted. The BPF map entries are counted from outside the agent by map \
id (`probe::census`), before the churn, after it, and after the driver-loading processes \
exited: threads' current contexts, processes' contexts and drivers, connections.\n";
    s
}

/// A row comparing the agent's per-process BPF map entries with the baseline: totals, and each
/// map that grew.
fn bpf_row(
    when: &str,
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> String {
    let grown: Vec<String> = after
        .iter()
        .filter(|(name, n)| **n > before.get(*name).copied().unwrap_or(0))
        .map(|(name, n)| format!("`{name}` {} → {n}", before.get(name).copied().unwrap_or(0)))
        .collect();
    format!(
        "| entries in the agent's {} per-process BPF maps: before the churn / after {when} | {} / {}{} | back where they were: {} |\n",
        inferscope::probe::census::PER_PROCESS.len(),
        before.values().sum::<u64>(),
        after.values().sum::<u64>(),
        if grown.is_empty() {
            String::new()
        } else {
            format!(" ({})", grown.join(", "))
        },
        if grown.is_empty() { "met" } else { "**missed**" }
    )
}

//! `cargo xtask demo`: the agent on its embedded defaults watching a scripted scenario on the
//! CUDA driver and NVML doubles. Two processes share one simulated 16 GiB GPU: an inference
//! server that loads weights through the VMM API (as PyTorch's expandable segments do) and
//! fills a KV cache, and a second job that takes a slice; the GPU heats up until it throttles,
//! then the server asks for more than is left and gets CUDA_ERROR_OUT_OF_MEMORY. The agent
//! finds the driver the processes mapped and NVML through the loader's search path, as it
//! would on a node. The demo prints what the agent sees at each step.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use prom_scrape::{http_get, Scrape};

const PORT: u16 = 9464;
const GIB: f64 = (1u64 << 30) as f64;

const SERVER_PLAN: &str =
    "vmm dev=0 size=1073741824 count=6; alloc dev=0 size=268435456 count=16; \
    async dev=0 size=2097152 count=64; host size=67108864 count=4; checkpoint name=loaded; \
    free count=8; async dev=0 size=1048576 count=32; checkpoint name=serving; \
    exhaust dev=0 size=1073741824; checkpoint name=oom";
const JOB_PLAN: &str = "alloc dev=0 size=536870912 count=8; checkpoint name=held";

/// The simulated GPU, shared by the CUDA driver double (in the workloads) and the NVML double
/// (in the agent).
struct Gpu {
    state: PathBuf,
    control: PathBuf,
}

impl Gpu {
    fn env(&self) -> [(&'static str, String); 4] {
        [
            ("FAKEGPU_COUNT", "1".into()),
            ("FAKEGPU_MEM", (16u64 << 30).to_string()),
            ("FAKEGPU_STATE", self.state.display().to_string()),
            ("FAKEGPU_NVML_CONTROL", self.control.display().to_string()),
        ]
    }

    /// Sets NVML readings of GPU 0 (`key=value` lines of the NVML double's control file).
    fn set(&self, values: &[(&str, &str)]) -> anyhow::Result<()> {
        let text: String = values
            .iter()
            .map(|(k, v)| format!("gpu.0.{k}={v}\n"))
            .collect();
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.control)?;
        Ok(())
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(&self.control);
    }
}

struct Proc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    fn start(bin: &Path, lib_dir: &str, gpu: &Gpu, plan: &str) -> anyhow::Result<Proc> {
        let mut child = Command::new(bin)
            .args(["--plan", plan, "--pause"])
            .env("LD_LIBRARY_PATH", lib_dir)
            .envs(gpu.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start cuda-workload")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut p = Proc {
            child,
            stdin,
            stdout,
        };
        p.line()?; // ready
        Ok(p)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("workload {} ended early", self.pid());
        }
        Ok(line)
    }

    /// Lets the workload run to its end and exit.
    fn finish(&mut self) -> anyhow::Result<()> {
        writeln!(self.stdin)?;
        self.stdin.flush()?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("workload {} ended with {status}", self.pid());
        }
        Ok(())
    }

    /// Lets the workload run to its next checkpoint.
    fn step(&mut self) -> anyhow::Result<()> {
        writeln!(self.stdin)?;
        self.stdin.flush()?;
        self.line().map(drop)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn double_dir(workload_bin: &Path, which: &str) -> anyhow::Result<String> {
    let out = Command::new(workload_bin)
        .args(["--double-dir", which])
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

pub fn run() -> anyhow::Result<()> {
    if !crate::util::is_root() {
        bail!("the demo loads eBPF programs: run it as root");
    }
    let release = crate::util::root_dir().join("target/release");
    let agent_bin = release.join("inferscope");
    let workload_bin = release.join("cuda-workload");
    let cuda_dir = double_dir(&workload_bin, "push")?;
    let nvml_dir = double_dir(&workload_bin, "nvml")?;
    let tmp = std::env::temp_dir();
    let gpu = Gpu {
        state: tmp.join(format!("inferscope-demo-gpu-{}", std::process::id())),
        control: tmp.join(format!("inferscope-demo-nvml-{}", std::process::id())),
    };
    let _ = std::fs::remove_file(&gpu.state);
    gpu.set(&[
        ("utilization", "35"),
        ("temperature", "58"),
        ("power_mw", "310000"),
    ])?;

    println!("== inferscope demo ==");
    println!(
        "agent:    {} run   (embedded defaults)",
        agent_bin.display()
    );
    println!("GPU:      1 simulated GPU of 16 GiB: CUDA driver double ({cuda_dir}),");
    println!("          NVML double on the agent's library search path ({nvml_dir})");
    // Reports go to a scratch directory rather than the default /var/lib/inferscope/forensics,
    // so that the demo leaves nothing behind.
    let reports = tmp.join(format!("inferscope-demo-forensics-{}", std::process::id()));
    let mut agent = AgentProc(
        Command::new(&agent_bin)
            .arg("run")
            .arg("--forensics-dir")
            .arg(&reports)
            .env("INFERSCOPE_LOG", "warn")
            .env("LD_LIBRARY_PATH", &nvml_dir)
            .envs(gpu.env())
            .spawn()
            .context("start the agent")?,
    );
    wait(&mut agent, "the agent to answer /healthz", |_| {
        matches!(http_get(PORT, "/healthz"), Some((200, _)))
    })?;
    println!("metrics:  http://127.0.0.1:{PORT}/metrics\n");

    let mut server = Proc::start(&workload_bin, &cuda_dir, &gpu, SERVER_PLAN)?;
    let mut job = Proc::start(&workload_bin, &cuda_dir, &gpu, JOB_PLAN)?;
    // Nothing was said to the agent about these processes: it finds the driver library they
    // mapped on its own.
    wait(&mut agent, "the agent to discover the driver", |_| {
        scrape().is_some_and(|s| s.sum("inferscope_cuda_libraries", &[]) >= 1.0)
    })?;
    println!(
        "discovered the CUDA driver mapped by pids {} and {}\n",
        server.pid(),
        job.pid()
    );

    server.step()?;
    gpu.set(&[
        ("utilization", "71"),
        ("temperature", "69"),
        ("power_mw", "455000"),
    ])?;
    show(
        &mut agent,
        "1. server loaded weights (VMM) and KV cache",
        &[&server],
    )?;
    job.step()?;
    show(
        &mut agent,
        "2. a second job takes 4 GiB of the same GPU",
        &[&server, &job],
    )?;
    server.step()?;
    gpu.set(&[
        ("utilization", "97"),
        ("temperature", "88"),
        ("power_mw", "698000"),
        ("throttle", "0x44"),
    ])?;
    show(
        &mut agent,
        "3. server serves; the GPU heats up and throttles",
        &[&server, &job],
    )?;
    server.step()?;
    show(
        &mut agent,
        "4. server asks for 1 GiB more than is left",
        &[&server, &job],
    )?;
    forensics(&agent_bin, &reports)?;

    println!("Try: curl -s http://127.0.0.1:{PORT}/metrics | grep -E '^gpu_'");
    println!("(the demo ends in 10 s, or on Ctrl-C)");
    std::thread::sleep(Duration::from_secs(10));
    // Both end normally (a kill would be reported as a crash of a GPU process).
    server.finish()?;
    job.finish()?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let status = agent.0.wait()?;
    let _ = std::fs::remove_dir_all(&reports);
    println!("\nagent stopped ({status}); probes detached.");
    if !status.success() {
        bail!("the agent did not exit cleanly: {status}");
    }
    Ok(())
}

fn scrape() -> Option<Scrape> {
    match http_get(PORT, "/metrics") {
        Some((200, body)) => Some(Scrape::parse(&body)),
        _ => None,
    }
}

fn wait(
    agent: &mut AgentProc,
    what: &str,
    mut ok: impl FnMut(&mut AgentProc) -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !ok(agent) {
        if let Some(status) = agent.0.try_wait()? {
            bail!("the agent exited ({status}) while waiting for {what}");
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Prints the GPU, the per-process ledger next to NVML's view, and the per-API counters once
/// the agent has caught up.
fn show(agent: &mut AgentProc, title: &str, procs: &[&Proc]) -> anyhow::Result<()> {
    // Events reach the ledger within milliseconds and NVML is sampled every second: wait for
    // two scrapes a sampling interval apart to agree on the GPU series shown here, leaving out
    // those that move every second whatever the workload does (energy, idle time). The
    // agent's own series (costs, samples, queues) are not compared: they always move.
    let mut last = String::new();
    wait(agent, "the agent to settle", |_| {
        std::thread::sleep(Duration::from_millis(1100));
        let text = scrape().map(|s| s.text).unwrap_or_default();
        let strip = |t: &str| {
            t.lines()
                .filter(|l| {
                    l.starts_with("gpu_")
                        && !l.starts_with("gpu_energy")
                        && !l.starts_with("gpu_idle")
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let settled = strip(&text) == strip(&last);
        last = text;
        settled
    })?;
    let s = Scrape::parse(&last);
    let g = [("gpu", "0")];
    let throttle: Vec<String> = s
        .label_values("gpu_throttle_active", "reason")
        .into_iter()
        .filter(|r| s.sum("gpu_throttle_active", &[("gpu", "0"), ("reason", r)]) == 1.0)
        .collect();
    println!("-- {title}");
    println!(
        "   GPU 0: {:.2}/{:.2} GiB used, utilization {:.0}%, {:.0} C, {:.0} W, throttle: {}",
        s.sum("gpu_memory_used_bytes", &g) / GIB,
        s.sum("gpu_memory_total_bytes", &g) / GIB,
        s.sum("gpu_utilization", &g) * 100.0,
        s.sum("gpu_temperature_celsius", &g),
        s.sum("gpu_power_watts", &g),
        if throttle.is_empty() {
            "none".into()
        } else {
            throttle.join(", ")
        },
    );
    println!(
        "   {:>8}  {:<14} {:>11} {:>7} {:>10} {:>13} {:>10}",
        "pid", "comm", "ledger GiB", "allocs", "NVML GiB", "overhead GiB", "pinned MiB"
    );
    for p in procs {
        let pid = p.pid().to_string();
        let l = [("pid", pid.as_str()), ("gpu", "0")];
        println!(
            "   {:>8}  {:<14} {:>11.2} {:>7} {:>10.2} {:>13.2} {:>10.0}",
            pid,
            comm(p.pid()),
            s.sum("gpu_process_memory_allocated_bytes", &l) / GIB,
            s.sum("gpu_process_allocations", &l),
            s.sum("gpu_process_memory_used_bytes", &l) / GIB,
            s.sum("gpu_process_memory_overhead_bytes", &l) / GIB,
            s.sum("gpu_process_host_pinned_bytes", &[("pid", pid.as_str())]) / (1u64 << 20) as f64,
        );
    }
    println!(
        "   {:<26} {:>7} {:>10} {:>9}",
        "api", "calls", "GiB", "failures"
    );
    for api in s.label_values("gpu_cuda_alloc_calls_total", "api") {
        let l = [("api", api.as_str())];
        println!(
            "   {:<26} {:>7} {:>10.2} {:>9}",
            api,
            s.sum("gpu_cuda_alloc_calls_total", &l),
            s.sum("gpu_cuda_alloc_bytes_total", &l) / GIB,
            s.sum("gpu_cuda_alloc_failures_total", &l),
        );
    }
    let frees = s.sum("gpu_cuda_frees_total", &[]);
    let oom = s.sum(
        "gpu_cuda_alloc_failures_total",
        &[("error", "out_of_memory")],
    );
    println!("   frees: {frees}   out-of-memory failures: {oom}\n");
    Ok(())
}

/// The forensic report the OOM produced, as an operator would read it.
fn forensics(agent_bin: &Path, dir: &Path) -> anyhow::Result<()> {
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(agent_bin)
            .arg("forensics")
            .args(args)
            .arg("--forensics-dir")
            .arg(dir)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let start = Instant::now();
    let id = loop {
        let list = cli(&["list"])?;
        if let Some(id) = list
            .lines()
            .find(|l| l.contains(" cuda "))
            .and_then(|l| l.split_whitespace().next())
        {
            println!("$ inferscope forensics list\n{list}");
            break id.to_string();
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("no forensic report appeared in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = cli(&["show", &id])?;
    println!("$ inferscope forensics show {id}");
    for line in text.lines().take(40) {
        println!("{line}");
    }
    // Outside the report directory, which the demo removes: the page stays to be opened.
    let html = std::env::temp_dir().join("inferscope-demo-report.html");
    std::fs::write(&html, cli(&["show", &id, "--format", "html"])?)?;
    println!(
        "\n(the HTML page with the memory timeline: {})\n",
        html.display()
    );
    Ok(())
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(PathBuf::from(format!("/proc/{pid}/comm")))
        .map(|c| c.trim().to_string())
        .unwrap_or_default()
}

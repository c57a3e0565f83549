//! The real agent binary (`target/release/inferscope run`) as a child process, and the
//! `cuda-workload` processes for the RSS figure.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use cuda_workload::{OutputLine, Variant};
use prom_scrape::http_get;

/// How long an agent runs after it found its server before its CPU is read for a phase: its
/// start (the other families' loading, the first discovery rounds) is not what requests cost.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How long after a phase its CPU is read again: its `http` reader drains within a poll
/// interval (`probes.http_poll_interval_ms`, 200 ms), and no scrape happens meanwhile.
pub const DRAIN: Duration = Duration::from_millis(400);

/// A sibling binary of this one (`target/release/<name>`), built by `cargo xtask bench`.
pub fn sibling_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing: run `cargo xtask bench` (it builds every binary first)",
            path.display()
        );
    }
    Ok(path)
}

pub struct AgentProcess {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl AgentProcess {
    /// Starts the agent on a free port with `--cuda-lib lib` and extra environment, and waits
    /// until `/healthz` answers (the library is attached by then).
    pub fn start(lib: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_with(lib, env, &[])
    }

    /// [`AgentProcess::start`] with extra arguments (`--watch-port PORT`).
    pub fn start_with(lib: &Path, env: &[(&str, &str)], args: &[String]) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir =
            std::env::temp_dir().join(format!("inferscope-bench-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = Command::new(sibling_bin("inferscope")?)
            .arg("run")
            .args(["--prometheus-listen", &format!("127.0.0.1:{port}")])
            .arg("--forensics-dir")
            .arg(dir.join("forensics"))
            .arg("--cuda-lib")
            .arg(lib)
            .args(args)
            .env("INFERSCOPE_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the agent")?;
        let mut agent = Self { child, port, dir };
        let start = Instant::now();
        loop {
            if let Some((200, _)) = http_get(port, "/healthz") {
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!("agent exited during start ({status}):\n{}", agent.log());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("agent not ready after 30 s:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        match http_get(self.port, "/metrics") {
            Some((200, body)) => Ok(body),
            other => bail!("scraping /metrics failed: {other:?}"),
        }
    }

    /// User + system CPU of the agent process (all its threads, dead ones included), in ns.
    pub fn cpu_ns(&self) -> anyhow::Result<u64> {
        proc_cpu_ns(self.pid())
    }

    /// `VmRSS` and `VmHWM` of the agent, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    /// Polls the metrics until `f` holds on a scrape (or `timeout`).
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            let text = self.metrics()?;
            if f(&text) {
                return Ok(text);
            }
            if start.elapsed() > timeout {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait: the agent detaches its probes on the way out.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.terminate();
        Ok(())
    }

    fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The CPU time (user + system, every thread it had, the exited ones too) of process `pid`, in
/// ns, from its CPU-time clock: the scheduler's own accounting, to the nanosecond, where
/// `/proc/<pid>/stat` counts 10 ms ticks.
pub fn proc_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid out-pointer.
    let r = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    if r != 0 {
        bail!(
            "no CPU clock for process {pid}: {}",
            std::io::Error::from_raw_os_error(r)
        );
    }
    inferscope::clock::read_ns(clock).ok_or_else(|| {
        anyhow::anyhow!(
            "reading process {pid}'s CPU clock: {}",
            std::io::Error::last_os_error()
        )
    })
}

/// CPU nanoseconds of the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_ns() -> u64 {
    inferscope::clock::read_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0)
}

/// Mean of `v` and its standard error.
pub fn mean_stderr(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

/// Sum of the samples of `name` whose labels contain `label` (e.g. `source="http"`).
pub fn metric_sum_labeled(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Sum of every sample of `name` (with or without labels) in a Prometheus text scrape.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            l.rsplit_once(' ')?.1.parse::<f64>().ok()
        })
        .sum()
}

/// A `cuda-workload` process paused after its plan's checkpoint.
pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Workload {
    /// Starts the workload on the double of `variant`; it stops at `ready`.
    pub fn spawn(variant: Variant, plan: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(sibling_bin(cuda_workload::WORKLOAD_BIN_NAME)?)
            .args(["--plan", plan, "--pause"])
            .env("LD_LIBRARY_PATH", variant.dir())
            .env(cuda_workload::ENV_GPU_MEM, "64G")
            .env_remove(cuda_workload::ENV_GPU_STATE)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting cuda-workload")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("workload stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    pub fn next_line(&mut self) -> anyhow::Result<OutputLine> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("cuda-workload ended early");
        }
        OutputLine::parse(line.trim()).map_err(|e| anyhow::anyhow!("bad line {line:?}: {e}"))
    }

    pub fn proceed(&mut self) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Support for the root-tier tests: start the real agent binary and the `cuda-workload`
//! fixture, scrape `/metrics`, and check that nothing stays attached afterwards.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

pub mod reports;
mod sim_gpus;
pub mod tls_proxy;

pub use root_test::root_test;
pub use sim_gpus::{str_pairs, SimGpus};

pub use cuda_workload::{OutputLine, Truth, Variant};
pub use prom_scrape::{http_get, Scrape};

/// `target/<profile>`, from the test executable's own path (`target/<profile>/deps/x`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// A workspace binary built by `cargo build --workspace --bins` (what `cargo xtask test` does).
pub fn bin(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask test` (or `cargo build --workspace --bins` first)",
        path.display()
    );
    path
}

/// Whether the root tier can run. Without root it is skipped, except under CI, where a
/// missing capability is a failure.
pub fn root_tier() -> bool {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    if root && btf {
        return true;
    }
    let why = if root {
        "the kernel has no BTF"
    } else {
        "not root"
    };
    if std::env::var_os("CI").is_some() {
        panic!("root-tier test cannot run under CI: {why}");
    }
    eprintln!("skipping root-tier test: {why}");
    false
}

/// Mounts the host's tracefs when it is not: what the chart's hostPath mount of
/// `/sys/kernel/tracing` hands an agent that holds no CAP_SYS_ADMIN to mount it itself.
pub fn ensure_host_tracefs() {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        return;
    }
    let status = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .expect("mount (util-linux)");
    assert!(status.success(), "cannot mount tracefs: {status}");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent, started as a child process on its own port with its own directories.
pub struct Agent {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Agent {
    pub fn start(extra: &[&str]) -> Agent {
        Self::start_with_env(extra, &[])
    }

    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Agent {
        Self::start_under(&[], extra, env)
    }

    /// Started by `wrapper` (a program and its arguments, which execs the agent's binary
    /// appended to them; `setpriv` to hold only some capabilities), so the child's pid is
    /// the agent's.
    pub fn start_under(wrapper: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("inferscope"));
                c
            }
            None => Command::new(bin("inferscope")),
        };
        let child = command
            .arg("run")
            .args(["--prometheus-listen", &format!("127.0.0.1:{port}")])
            .arg("--forensics-dir")
            .arg(dir.path().join("forensics"))
            .args(extra)
            .env("INFERSCOPE_LOG", "info,inferscope=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn inferscope");
        let mut agent = Agent {
            child: Some(child),
            port,
            dir,
        };
        let ready = Instant::now();
        loop {
            if let Some((200, _)) = http_get(port, "/healthz") {
                break;
            }
            if let Some(status) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited during start ({status}):\n{}", agent.log());
            }
            assert!(
                ready.elapsed() < Duration::from_secs(30),
                "agent not ready:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn scrape(&self) -> Scrape {
        let (status, body) = http_get(self.port, "/metrics").expect("scrape /metrics");
        assert_eq!(status, 200);
        Scrape::parse(&body)
    }

    /// Waits until `f` holds on a scrape (events reach the ledger within milliseconds;
    /// the timeout only bounds a failing test).
    pub fn wait_for(&self, what: &str, mut f: impl FnMut(&Scrape) -> bool) -> Scrape {
        let mut last = None;
        let start = Instant::now();
        loop {
            let s = self.scrape();
            if f(&s) {
                return s;
            }
            if start.elapsed() > Duration::from_secs(15) {
                let text = last.map(|s: Scrape| s.text).unwrap_or_default();
                panic!(
                    "timed out waiting for {what}; last scrape:\n{text}\nagent log:\n{}",
                    self.log()
                );
            }
            last = Some(s);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then checks that the agent exits within `bound` (else it is killed and the
    /// test fails) and that no probe program is left loaded. Returns the exit status and the
    /// agent's log.
    pub fn stop_within(mut self, bound: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let ids = program_ids(child.id());
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let sent = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if sent.elapsed() > bound {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not exit within {bound:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_no_probe_programs(&ids);
        (status, self.log())
    }

    /// Waits for the agent to end by itself or by `signal` (sent now, unless 0), then checks
    /// that none of its programs is left loaded. Returns its exit status and log.
    pub fn end_with(mut self, signal: i32, bound: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let ids = program_ids(child.id());
        if signal != 0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
        let status = eventually("the agent to end", bound, || child.try_wait().unwrap());
        assert_no_probe_programs(&ids);
        (status, self.log())
    }

    /// SIGTERM, then checks the exit code and that no probe program is left loaded.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let ids = program_ids(child.id());
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert_no_probe_programs(&ids);
        status
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

/// Ids of the eBPF programs a process holds open (from `/proc/<pid>/fdinfo`).
pub fn program_ids(pid: u32) -> Vec<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

/// Fails if any of these programs (the agent's, listed while it ran) is still loaded once
/// the kernel has had its grace period: a raw tracepoint's link frees its program after an
/// RCU grace period, not when its descriptor closes. Only the agent under test is checked:
/// other agents may run beside it.
pub fn assert_no_probe_programs(ids: &[u32]) {
    assert!(!ids.is_empty(), "the agent held no eBPF programs");
    let left = || -> Vec<String> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| ids.contains(&p.id()))
            .map(|p| format!("{} ({})", p.name_as_str().unwrap_or("?"), p.id()))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut still = left();
    while !still.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        still = left();
    }
    assert!(
        still.is_empty(),
        "programs still loaded 2 s after the agent stopped: {still:?}"
    );
}

/// The workload fixture, paused at `ready` until [`Workload::proceed`].
pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
}

pub struct WorkloadOptions<'a> {
    pub variant: Variant,
    pub gpus: u32,
    pub gpu_mem: u64,
    pub state_file: Option<&'a Path>,
}

impl Default for WorkloadOptions<'_> {
    fn default() -> Self {
        Self {
            variant: Variant::Push,
            gpus: 2,
            gpu_mem: 1 << 30,
            state_file: None,
        }
    }
}

impl Workload {
    pub fn start(plan: &str, opts: &WorkloadOptions) -> Workload {
        Self::start_in(plan, opts, &opts.variant.dir())
    }

    /// Starts the workload on the driver library found in `lib_dir`.
    pub fn start_in(plan: &str, opts: &WorkloadOptions, lib_dir: &Path) -> Workload {
        Self::start_with(plan, opts, lib_dir, &[], &[])
    }

    /// With `args` on its command line after `--` (the workload ignores them: a server's own
    /// options, `--api-key …`) and `env` in its environment.
    pub fn start_with(
        plan: &str,
        opts: &WorkloadOptions,
        lib_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Workload {
        Self::spawn(plan, opts, lib_dir, args, env, true)
    }

    /// Not paused at all: it loads the driver and runs its plan at once (checkpoints only
    /// report), as a server loading its weights does.
    pub fn start_unpaused(plan: &str, opts: &WorkloadOptions, lib_dir: &Path) -> Workload {
        Self::spawn(plan, opts, lib_dir, &[], &[], false)
    }

    fn spawn(
        plan: &str,
        opts: &WorkloadOptions,
        lib_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        pause: bool,
    ) -> Workload {
        let mut cmd = Command::new(bin(cuda_workload::WORKLOAD_BIN_NAME));
        cmd.args(["--plan", plan])
            .args(pause.then_some("--pause"))
            .arg("--")
            .args(args)
            .envs(env.iter().copied())
            .env("LD_LIBRARY_PATH", lib_dir)
            .env(cuda_workload::ENV_GPU_COUNT, opts.gpus.to_string())
            .env(cuda_workload::ENV_GPU_MEM, opts.gpu_mem.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(state) = opts.state_file {
            cmd.env(cuda_workload::ENV_GPU_STATE, state);
        }
        let mut child = cmd.spawn().expect("spawn cuda-workload");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut w = Workload {
            child,
            stdin,
            stdout,
            pid: 0,
        };
        match w.next_line() {
            OutputLine::Ready { pid, .. } => w.pid = pid,
            other => panic!("expected ready, got {other:?}"),
        }
        w
    }

    pub fn next_line(&mut self) -> OutputLine {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read workload stdout");
        assert!(n > 0, "workload ended without the expected output");
        let parsed =
            OutputLine::parse(line.trim()).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"));
        if let OutputLine::Skipped { skipped, reason } = &parsed {
            panic!("workload skipped {skipped}: {reason}");
        }
        parsed
    }

    /// Lets the paused workload go on (past `ready` or a checkpoint).
    pub fn proceed(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Reads up to the next checkpoint or final line and returns its truth.
    pub fn truth(&mut self) -> Truth {
        self.next_line()
            .truth()
            .cloned()
            .expect("a line with truth")
    }

    pub fn wait(mut self) -> ExitStatus {
        drop(self.stdin.take());
        self.child.wait().unwrap()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first difference between the agent's CUDA figures and the workload's truth, for every
/// API the truth names (calls, successful bytes on the alloc side, failures by error name)
/// and for the process's ledger (live bytes per device, pinned host bytes).
pub fn mismatch(s: &Scrape, truth: &Truth) -> Option<String> {
    let check = |what: String, got: f64, want: u64| -> Option<String> {
        (got != want as f64).then(|| format!("{what}: agent {got}, workload {want}"))
    };
    for (api, stats) in &truth.apis {
        let release = matches!(
            api.as_str(),
            "cuMemFree_v2"
                | "cuMemFreeAsync"
                | "cuMemRelease"
                | "cuMemUnmap"
                | "cuMemAddressFree"
                | "cuMemFreeHost"
        );
        let l = [("api", api.as_str())];
        let (calls, failures) = if release {
            ("gpu_cuda_frees_total", "gpu_cuda_free_failures_total")
        } else {
            (
                "gpu_cuda_alloc_calls_total",
                "gpu_cuda_alloc_failures_total",
            )
        };
        if let Some(m) = check(format!("{api} calls"), s.sum(calls, &l), stats.calls) {
            return Some(m);
        }
        if !release {
            if let Some(m) = check(
                format!("{api} bytes"),
                s.sum("gpu_cuda_alloc_bytes_total", &l),
                stats.bytes,
            ) {
                return Some(m);
            }
        }
        if let Some(m) = check(
            format!("{api} failures"),
            s.sum(failures, &l),
            stats.failed(),
        ) {
            return Some(m);
        }
        for (error, n) in &stats.failures {
            let got = s.sum(failures, &[("api", api), ("error", error)]);
            if let Some(m) = check(format!("{api} failures {error}"), got, *n) {
                return Some(m);
            }
        }
    }
    let pid = truth.pid.to_string();
    for (dev, bytes) in &truth.live_device_bytes {
        let got = s.sum(
            "gpu_process_memory_allocated_bytes",
            &[("pid", &pid), ("gpu", &dev.to_string())],
        );
        if let Some(m) = check(format!("pid {pid} gpu {dev} live bytes"), got, *bytes) {
            return Some(m);
        }
    }
    let got = s.sum("gpu_process_host_pinned_bytes", &[("pid", &pid)]);
    check(
        format!("pid {pid} pinned host bytes"),
        got,
        truth.live_host_bytes,
    )
}

/// Waits for the agent's figures to equal the truth; on timeout, fails naming the difference.
pub fn assert_agent_sees(agent: &Agent, truth: &Truth) -> Scrape {
    let start = Instant::now();
    loop {
        let s = agent.scrape();
        match mismatch(&s, truth) {
            None => return s,
            Some(m) if start.elapsed() > Duration::from_secs(15) => {
                panic!("{m}\nscrape:\n{}\nagent log:\n{}", s.text, agent.log())
            }
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Where the Python stand-ins live (`tests/servers`).
pub fn servers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../servers")
}

/// A client whose clock is the truth the agent's timing is held to: run as a real-time task
/// (`SCHED_FIFO`), so that it reads each message as it arrives. As an ordinary task on a busy
/// 2-core machine (the agent, the server and the client share it) it now and then read one
/// message 3 to 7 ms late, a gap the server never wrote. The clients block on their sockets
/// between messages, so they take no CPU from the others.
pub fn timing_client(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("chrt");
    c.args(["--fifo", "10"]).arg(program);
    c
}

/// Runs a client script of tests/servers with `args`; its stdout is one JSON document (the
/// client's truth). The `timing` mode runs as [`timing_client`].
pub fn python_client(script: &str, args: &[&str]) -> serde_json::Value {
    let mut command = if args.first() == Some(&"timing") {
        timing_client("python3")
    } else {
        Command::new("python3")
    };
    let out = run_ok(command.arg(servers_dir().join(script)).args(args));
    serde_json::from_slice(&out).expect("client JSON")
}

/// Runs `command` to its end and returns its stdout; fails the test with its stderr when it
/// exits unsuccessfully.
pub fn run_ok(command: &mut Command) -> Vec<u8> {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// tests/servers/tgi_shard: one of TGI's shards as its launcher starts it (the Python script
/// `text-generation-server serve MODEL --uds-path PATH`), serving on the Unix socket
/// `PATH-0` in a directory of its own, each of its methods called once; an agent finds it
/// by its command line alone.
pub struct TgiShard {
    child: std::process::Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl TgiShard {
    pub fn start(model: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Real-time too, as the router's client is: a call the shard answers in half a
        // millisecond waits in its socket, where no probe sees it, whenever an ordinary task
        // holds the shard off the CPU (3.7 ms seen on the busy 2-core machine).
        let child = timing_client("python3")
            .arg(servers_dir().join("tgi_shard/text-generation-server"))
            .args(["serve", model, "--uds-path"])
            .arg(dir.path().join("text-generation-server"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 (run `cargo xtask setup` for grpcio)");
        let socket = dir.path().join("text-generation-server-0");
        eventually("the shard's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
        // A fresh grpcio server reads its first call of each method milliseconds late (the
        // call waits in its socket, where no probe sees it): every method once, first.
        python_client("grpc_client.py", &["shard-warm", socket.to_str().unwrap()]);
        Self {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for TgiShard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `grpc_client.py` with `args` as TGI's router calls a [`TgiShard`] (its `shard` modes), as
/// a [`timing_client`].
pub fn tgi_router(args: &[&str]) -> Command {
    let mut c = timing_client("python3");
    c.arg(servers_dir().join("grpc_client.py")).args(args);
    c
}

/// The OpenAI-compatible stand-in on uvicorn + FastAPI (vLLM's API stack), on its own port.
pub struct OpenAiServer {
    pub child: Child,
    pub port: u16,
}

impl OpenAiServer {
    pub fn start(model: &str) -> OpenAiServer {
        Self::start_with(model, &[])
    }

    /// With extra arguments (`--metrics vllm` serves vLLM's own metrics too).
    pub fn start_with(model: &str, extra: &[&str]) -> OpenAiServer {
        Self::start_with_env(model, extra, &[])
    }

    /// With extra arguments and environment (the CUDA double's, with `--cuda-lib`).
    pub fn start_with_env(model: &str, extra: &[&str], env: &[(&str, &str)]) -> OpenAiServer {
        let port = free_port();
        let child = Command::new("python3")
            .arg(servers_dir().join("openai_server.py"))
            .args(["--port", &port.to_string(), "--model", model])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 (run `cargo xtask setup` for fastapi, uvicorn, openai)");
        eventually("the stand-in server", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        OpenAiServer { child, port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// POSTs a JSON body; panics unless the answer is 200.
    pub fn post(&self, path: &str, json: &str) {
        use std::io::Read;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            c,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{json}",
            json.len()
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "POST {path}: {answer}");
    }

    /// Opens `n` streamed chat completions of 100 tokens at 100 ms each and returns their
    /// connections (the requests stay in flight while they are held) and the body sent.
    pub fn slow_streams(&self, model: &str, n: usize) -> (Vec<std::net::TcpStream>, String) {
        self.streams(model, n, 100, 100)
    }

    /// Opens `n` streamed chat completions of `tokens` tokens, `token_ms` apart, and returns
    /// their connections and the body sent.
    pub fn streams(
        &self,
        model: &str,
        n: usize,
        tokens: u64,
        token_ms: u64,
    ) -> (Vec<std::net::TcpStream>, String) {
        let body = format!(
            r#"{{"model":"{model}","stream":true,"max_tokens":{tokens},"messages":[{{"role":"user","content":"x"}}]}}"#
        );
        let conns = (0..n)
            .map(|_| {
                let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
                write!(
                    c,
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-token-ms: {token_ms}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                c
            })
            .collect();
        (conns, body)
    }
}

impl Drop for OpenAiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The documents of a YAML stream as JSON (python3's yaml, which yamllint brings).
pub fn yaml_docs(text: &str) -> Vec<serde_json::Value> {
    let script = "import json, sys, yaml\n\
                  docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
                  json.dump(docs, sys.stdout)";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (run `cargo xtask setup`)");
    let mut stdin = child.stdin.take().unwrap();
    let input = text.to_string();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(input.as_bytes()).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "not YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        serde_json::Value::Array(docs) => docs,
        other => panic!("{other}"),
    }
}

/// Bit numbers (linux/capability.h) of the capabilities the chart may name.
pub fn capability_bit(name: &str) -> u32 {
    match name {
        "KILL" => 5,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        "CHECKPOINT_RESTORE" => 40,
        other => panic!("capability {other}: add its bit here"),
    }
}

/// Whether an agent log line names `model`.
pub fn is_model(line: &str, model: &str) -> bool {
    line.contains(&format!("model=\"{model}\"")) || line.contains(&format!("model={model} "))
}

/// The agent's `http request finished` lines that `matches` accepts: (TTFT µs, token gaps µs,
/// latency µs) each.
pub fn finished_lines(log: &str, matches: impl Fn(&str) -> bool) -> Vec<(u64, Vec<u64>, u64)> {
    let field = |line: &str, name: &str| -> Option<String> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        let rest = &line[at..];
        let end = if rest.starts_with('[') {
            rest.find(']')? + 1
        } else {
            rest.find(' ').unwrap_or(rest.len())
        };
        Some(rest[..end].trim_matches('"').to_string())
    };
    log.lines()
        .filter(|l| l.contains("http request finished") && matches(l))
        .map(|l| {
            let ttft = field(l, "ttft_us")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let gaps = field(l, "gaps_us")
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .split(',')
                .filter_map(|g| g.trim().parse().ok())
                .collect();
            let latency = field(l, "latency_us")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (ttft, gaps, latency)
        })
        .collect()
}

/// The agent's `http request finished` lines that `matches` accepts against what a client
/// measured (`truth`, in order: `ttft_ms`, `gaps_ms`, `latency_ms` each); returns the lines.
pub fn assert_timed_as_the_client(
    agent: &Agent,
    truth: &[serde_json::Value],
    matches: impl Fn(&str) -> bool,
) -> Vec<(u64, Vec<u64>, u64)> {
    let n = truth.len();
    let seen = finished_lines(&agent.log(), matches);
    assert_eq!(seen.len(), n, "agent lines:\n{}", agent.log());
    // The agent times the server's socket: the request's first byte arrives after the client
    // sent it and the answer leaves before the client reads it, so the agent's figure is at
    // most the client's (1 ms for the two clocks' reads). The client's clock also counts its
    // own scheduling, which a busy 2-core VM stretches by a few ms: below, the bound is 2 ms
    // plus 10 % of what the client measured. (tests/servers/client.py times each message by
    // its socket's receipt timestamp, so only the gRPC clients' figures carry that noise; the
    // HTTP client's agree with the agent's within 0.3 ms a gap here.)
    let close = |what: &str, agent_us: u64, client_ms: f64| {
        let agent_ms = agent_us as f64 / 1000.0;
        assert!(
            agent_ms <= client_ms + 1.0 && agent_ms >= client_ms - (2.0 + 0.10 * client_ms),
            "{what}: agent {agent_ms} ms, client {client_ms:.3} ms"
        );
    };
    for (i, (t, (ttft, gaps, latency))) in truth.iter().zip(&seen).enumerate() {
        close(
            &format!("request {i} TTFT"),
            *ttft,
            t["ttft_ms"].as_f64().unwrap(),
        );
        close(
            &format!("request {i} latency"),
            *latency,
            t["latency_ms"].as_f64().unwrap(),
        );
        let want: Vec<f64> = t["gaps_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        assert_eq!(gaps.len(), want.len(), "request {i} token gaps");
        // A gap has no such order: a client that reads one message late sees the gap before
        // it longer and the one after it shorter than the server wrote them. Both ways, the
        // same bound.
        for (j, (g, w)) in gaps.iter().zip(&want).enumerate() {
            let agent_ms = *g as f64 / 1000.0;
            assert!(
                (agent_ms - w).abs() <= 2.0 + 0.10 * w,
                "request {i} gap {j}: agent {agent_ms} ms, client {w:.3} ms"
            );
        }
    }
    seen
}

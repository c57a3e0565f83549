//! Root tier of discovery by events: the kernel names new driver mappings, execs and
//! listening sockets, so the agent probes a driver before its first call returns, reads no
//! process twice for nothing, and finds servers in other network namespaces at once.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    time::Duration,
};

use integration::*;

const MIB: u64 = 1 << 20;

/// A driver file no process had mapped before (a fresh copy: its own inode), loaded by a
/// process that allocates as soon as it has loaded it, as a server loading its weights
/// does: the opener is held at its mapping until the probes are in place, so its very first
/// call is in the ledger.
#[root_test]
fn a_driver_mapped_after_the_start_has_its_first_allocation_counted() {
    // A long interval: a poll could not find the driver in time, only the kernel's record.
    let agent = Agent::start_with_env(
        &[],
        &[("INFERSCOPE_PROBES__DISCOVERY_INTERVAL_MS", "60000")],
    );
    let s = agent.scrape();
    assert_eq!(
        s.sum("inferscope_probe_family_up", &[("family", "discovery")]),
        1.0,
        "{}",
        s.text
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(Variant::Push.lib_path(), dir.path().join("libcuda.so.1")).unwrap();
    let opts = WorkloadOptions {
        gpus: 1,
        ..Default::default()
    };
    let mut w = Workload::start_unpaused(
        "alloc dev=0 size=1048576 count=5; async dev=0 size=4096 count=3; checkpoint name=done; sleep ms=60000",
        &opts,
        dir.path(),
    );
    let truth = w.truth();
    assert_eq!(truth.api("cuMemAlloc_v2").ok, 5);
    assert_eq!(truth.live_device_bytes[&0], 5 * MIB + 3 * 4096);
    let s = assert_agent_sees(&agent, &truth);
    assert_eq!(
        s.sum("inferscope_probe_openers_held_total", &[]),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(s.sum("inferscope_events_lost_total", &[]), 0.0);
    // The process ran on after it was let go (its truth came after the allocations).
    assert_eq!(s.sum("inferscope_cuda_libraries", &[]), 1.0);
    drop(w);
    assert!(agent.stop().success());
}

/// An agent told to stop while processes keep loading driver files it has not probed yet
/// (each held stopped until its probes are attached; as in a rollout while pods start): it
/// turns the stops off, lets go every process it held, and leaves none stopped, whether its
/// manager got to them before the exit or not (its detach outlasts the deadline here).
#[root_test]
fn an_agent_leaving_while_drivers_load_leaves_no_process_stopped() {
    let agent = Agent::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let spawn = |i: usize| {
        let lib = dir.path().join(format!("{i}")).join("libcuda.so.1");
        std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
        std::fs::copy(Variant::Push.lib_path(), &lib).unwrap();
        Command::new("python3")
            .args([
                "-c",
                "import ctypes, sys, time\n\
                 ctypes.CDLL(sys.argv[1])\n\
                 print('loaded', flush=True)\n\
                 time.sleep(120)",
                lib.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3")
    };
    // A process loading a driver file of its own every 40 ms, from before the stop until after
    // the agent's exit.
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut children: Vec<Child> = std::thread::scope(|scope| {
        let spawner = scope.spawn(|| {
            let mut out = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) && out.len() < 80 {
                out.push(spawn(out.len()));
                std::thread::sleep(Duration::from_millis(40));
            }
            out
        });
        agent.wait_for("the first opener held", |s| {
            s.sum("inferscope_probe_openers_held_total", &[]) >= 1.0
        });
        std::thread::sleep(Duration::from_millis(500));
        let stopped = std::thread::spawn({
            let agent = agent;
            move || agent.stop().success()
        })
        .join()
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(stopped);
        spawner.join().unwrap()
    });
    // Every one ran past its driver load, and none is stopped.
    let (tx, rx) = std::sync::mpsc::channel();
    for c in &mut children {
        let (pid, out, tx) = (c.id(), c.stdout.take().unwrap(), tx.clone());
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send((pid, line));
        });
    }
    drop(tx);
    // A stopped process never prints: all of them are given 20 s together.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut loaded = std::collections::HashSet::new();
    while let Ok((pid, line)) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        if line.trim() == "loaded" {
            loaded.insert(pid);
        }
    }
    let not_loaded: Vec<u32> = children
        .iter()
        .map(|c| c.id())
        .filter(|pid| !loaded.contains(pid))
        .collect();
    let stopped: Vec<u32> = children
        .iter()
        .map(|c| c.id())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the command's closing parenthesis.
            stat.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('T'))
                == Some(true)
        })
        .collect();
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(children.len() >= 10, "{} processes", children.len());
    assert!(
        stopped.is_empty() && not_loaded.is_empty(),
        "left stopped: {stopped:?}; never past their driver load: {not_loaded:?}"
    );
}

/// Idle processes with many mappings: their maps are read once, at the agent's start, and
/// not again while nothing on the node maps a driver.
#[root_test]
fn processes_without_a_driver_are_not_read_again() {
    let mut many = Command::new("python3")
        .arg(servers_dir().join("many_maps.py"))
        .args(["1000", "1000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(many.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let agent = Agent::start_with_env(&[], &[("INFERSCOPE_PROBES__DISCOVERY_INTERVAL_MS", "200")]);
    let reads =
        |s: &Scrape, file: &str| s.sum("inferscope_discovery_proc_reads_total", &[("file", file)]);
    agent.wait_for("the first look at every process", |s| {
        reads(s, "maps") >= 1000.0 && reads(s, "cmdline") >= 1000.0
    });
    // The watcher's first scan may still be reading its last command lines.
    std::thread::sleep(Duration::from_secs(1));
    let first = agent.scrape();
    let maps = reads(&first, "maps");
    // Fifteen discovery ticks: a poll would read the thousand processes on every one. A
    // process that execs meanwhile anywhere on the node is read once, as it should be.
    std::thread::sleep(Duration::from_secs(3));
    let later = agent.scrape();
    let again = reads(&later, "maps") - maps;
    assert!(again < 100.0, "maps read again: {again}");
    let cmdlines = reads(&later, "cmdline") - reads(&first, "cmdline");
    assert!(cmdlines < 100.0, "command lines read again: {cmdlines}");
    assert!(agent.stop().success());
    drop(many.stdin.take());
    let _ = many.wait();
}

/// The stand-in server in a network namespace of its own, as a pod has.
struct PodServer {
    child: Child,
    port: u16,
}

impl PodServer {
    fn start(model: &str, port: u16) -> PodServer {
        let server = servers_dir().join("openai_server.py");
        let child = Command::new("unshare")
            .args(["--net", "--", "sh", "-c"])
            .arg(format!(
                "ip link set lo up && exec python3 {} --port {port} --model {model}",
                server.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare");
        let pod = PodServer { child, port };
        eventually(
            "the server in its namespace",
            Duration::from_secs(30),
            || pod.request(model).ok(),
        );
        pod
    }

    /// One completion request from inside the server's namespace.
    fn request(&self, model: &str) -> Result<(), String> {
        let script = format!(
            "import urllib.request as u; r = u.Request('http://127.0.0.1:{}/v1/chat/completions', \
             data=b'{{\"model\":\"{model}\",\"max_tokens\":2,\"messages\":[{{\"role\":\"user\",\"content\":\"a\"}}]}}', \
             headers={{'Content-Type': 'application/json'}}); print(u.urlopen(r).status)",
            self.port
        );
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.child.id()))
            .args(["python3", "-c", &script])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "200" {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--watch-port` finds servers in network namespaces other than the agent's: one listening
/// before the agent started (each namespace's sockets read once at start) and one that starts
/// listening after (the kernel's record of the listen).
#[root_test]
fn watch_port_finds_servers_in_their_own_network_namespaces() {
    let port = free_port();
    let before = PodServer::start("ns-before", port);
    let agent = Agent::start_with_env(
        &["--watch-port", &port.to_string()],
        &[("INFERSCOPE_PROBES__DISCOVERY_INTERVAL_MS", "60000")],
    );
    agent.wait_for("the server started before the agent", |s| {
        s.sum("inferscope_http_watched_processes", &[]) == 1.0
    });
    let after = PodServer::start("ns-after", port);
    agent.wait_for("the server started after the agent", |s| {
        s.sum("inferscope_http_watched_processes", &[]) == 2.0
    });
    for (server, model) in [(&before, "ns-before"), (&after, "ns-after")] {
        server.request(model).unwrap();
        agent.wait_for("the request in the namespace", |s| {
            s.sum(
                "llm_requests_total",
                &[("model", model), ("status_code", "200")],
            ) >= 1.0
        });
    }
    drop(before);
    agent.wait_for("the stopped server to be forgotten", |s| {
        s.sum("inferscope_http_watched_processes", &[]) == 1.0
    });
    assert!(agent.stop().success());
}

/// A process that execs into a server is watched from its exec: its command line is read
/// then, once, not on a poll (the interval here is a minute).
#[root_test]
fn a_process_that_execs_into_a_server_is_found_at_its_exec() {
    let agent = Agent::start_with_env(
        &[],
        &[
            ("INFERSCOPE_HTTP__MATCH_COMMANDS", "[\"openai_server.py\"]"),
            ("INFERSCOPE_PROBES__DISCOVERY_INTERVAL_MS", "60000"),
        ],
    );
    let port = free_port();
    // A shell first (not a server: the script's name is not on its command line), which
    // then becomes one.
    let shell = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "read go; exec python3 \"$SERVER\" --port {port} --model execd"
        ))
        .env("SERVER", servers_dir().join("openai_server.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed however the test ends.
    let mut served = OpenAiServer { child: shell, port };
    std::thread::sleep(Duration::from_millis(300));
    let s = agent.scrape();
    assert_eq!(
        s.sum("inferscope_http_watched_processes", &[]),
        0.0,
        "the shell is no server"
    );
    writeln!(served.child.stdin.as_mut().unwrap(), "go").unwrap();
    agent.wait_for("the exec'd server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) == 1.0
    });
    eventually("the server to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    served.post(
        "/v1/chat/completions",
        r#"{"model":"execd","max_tokens":2,"messages":[{"role":"user","content":"a"}]}"#,
    );
    agent.wait_for("its request", |s| {
        s.sum(
            "llm_requests_total",
            &[("model", "execd"), ("status_code", "200")],
        ) == 1.0
    });
    let _ = served.child.kill();
    let _ = served.child.wait();
    assert!(agent.stop().success());
}

//! What a watched server pays per captured write, resolved finely enough to tell what to cut.
//! The bench process is the server, so that no runtime of a server adds its own noise: one
//! thread serves TGI's streamed `POST /generate_stream` on a loopback connection it accepted
//! (a chunked server-sent event per `write`, as `bench/c/tls_sse.c` writes them, or per
//! `writev` of three iovecs, as hyper writes them for TGI's router), another thread is its
//! client. The figure is the server thread's own CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`, where the programs run: inside its syscalls) per request,
//! without the agent, with an empty raw tracepoint on `sys_exit` (the kernel's
//! tracing path alone, which any syscall hook costs), and with the agent watching the process
//! (`--watch-port`, the http family's budget off so that it is not shed mid-phase), in
//! interleaved rounds. `BENCH_BPF_STATS=1` also prints the family's
//! program time per run from the kernel's statistics, switched on for the agent's phases
//! (their own clock reads then land in the figure); `BENCH_CAPTURE_REQUESTS=N` sets the
//! requests per phase of `--capture-only`.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context};

use crate::agentproc::{
    mean_stderr, metric_sum, metric_sum_labeled, thread_cpu_ns, AgentProcess, DRAIN, SETTLE,
};

/// Token events per request, as the wire-timing sections.
pub const EVENTS: usize = 64;

const BODY: &str = r#"{"inputs":"hi","parameters":{"max_new_tokens":64}}"#;
const HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
const END: &[u8] = b"0\r\n\r\n";

/// How the server writes each event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Writes {
    /// One `write` of the whole chunk (as `bench/c/tls_sse.c` and most C servers).
    #[default]
    Whole,
    /// One `writev` of three iovecs: the chunk's size line, the event, its CRLF (as hyper
    /// writes a chunked body: TGI's router, axum).
    Vectored,
}

#[derive(Clone, Debug, Default)]
pub struct CaptureCost {
    pub writes: Writes,
    /// Requests per configuration and round.
    pub requests: u64,
    pub rounds: usize,
    /// Server thread CPU per request, ns, one per round: without, empty hook, agent.
    pub without: Vec<f64>,
    pub floor: Vec<f64>,
    pub agent: Vec<f64>,
    /// The agent's CPU (every thread) per request, ns, over its phases.
    pub agent_cpu_ns: f64,
    /// Requests per second in the agent's phases.
    pub rate: f64,
    pub counted: u64,
    pub sent: u64,
    /// Data records of the `http` family the agent read, and lost.
    pub records: u64,
    pub lost: u64,
}

impl CaptureCost {
    /// Added per request by the agent: mean over the rounds of (agent − without), ± stderr.
    pub fn added(&self) -> (f64, f64) {
        round_differences(&self.agent, &self.without)
    }

    /// Added per request over the empty hook: what the programs themselves cost.
    pub fn over_floor(&self) -> (f64, f64) {
        round_differences(&self.agent, &self.floor)
    }

    /// Added per request by the empty hook: the kernel's tracing path.
    pub fn floor_added(&self) -> (f64, f64) {
        round_differences(&self.floor, &self.without)
    }

    /// Captured calls of the server thread per request: the request's read, the head, every
    /// event, the last chunk.
    pub fn captured_calls() -> f64 {
        (EVENTS + 3) as f64
    }
}

fn request() -> Vec<u8> {
    format!(
        "POST /generate_stream HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
}

/// Mean over the rounds of `a − b`, round by round, ± its standard error.
fn round_differences(a: &[f64], b: &[f64]) -> (f64, f64) {
    let d: Vec<f64> = a.iter().zip(b).map(|(a, b)| a - b).collect();
    mean_stderr(&d)
}

/// Each event's chunk: its size line, the event, its CRLF.
fn chunks() -> Vec<[Vec<u8>; 3]> {
    (0..EVENTS)
        .map(|i| {
            let ev = format!(
                "data:{{\"index\":{i},\"token\":{{\"id\":{},\"text\":\" tok\",\"logprob\":-0.25,\"special\":false}},\"generated_text\":null,\"details\":null}}\n\n",
                1000 + i
            );
            [
                format!("{:x}\r\n", ev.len()).into_bytes(),
                ev.into_bytes(),
                b"\r\n".to_vec(),
            ]
        })
        .collect()
}

/// Writes one chunk as `writes` says.
fn write_chunk(s: &mut TcpStream, parts: &[Vec<u8>; 3], writes: Writes) -> std::io::Result<()> {
    match writes {
        Writes::Whole => s.write_all(&parts.concat()),
        Writes::Vectored => {
            let total: usize = parts.iter().map(Vec::len).sum();
            let slices = parts.each_ref().map(|p| std::io::IoSlice::new(p));
            let n = s.write_vectored(&slices)?;
            // Loopback takes a chunk this small whole; the rest, if ever, in one write.
            if n < total {
                s.write_all(&parts.concat()[n..])?;
            }
            Ok(())
        }
    }
}

/// Pins thread (or process) `tid` (0: the calling thread) to `cpu`.
fn pin(tid: i32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity get
    // valid pointers to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

/// Pins every thread of process `pid` to `cpu` (threads it starts later inherit it).
fn pin_process(pid: u32, cpu: usize) -> anyhow::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) {
            // A thread that exited meanwhile is not an error.
            let _ = pin(tid, cpu);
        }
    }
    Ok(())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `requests` streamed requests on a connection accepted now; the server thread's CPU per
/// request, ns. The serving thread has the first CPU to itself; the client (and the agent)
/// run on the last, so that neither's work lands in the server's caches.
fn phase(
    listener: &TcpListener,
    chunks: &[[Vec<u8>; 3]],
    writes: Writes,
    requests: u64,
) -> anyhow::Result<f64> {
    let addr = listener.local_addr()?;
    let response_len =
        HEAD.len() + chunks.iter().flatten().map(Vec::len).sum::<usize>() + END.len();
    let request = request();
    let sent = request.clone();
    let (tell, client_addr) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || -> anyhow::Result<()> {
        pin(0, cpus() - 1)?;
        let mut c = TcpStream::connect(addr)?;
        tell.send(c.local_addr()?)?;
        c.set_nodelay(true)?;
        let mut buf = vec![0u8; response_len];
        for _ in 0..requests {
            c.write_all(&sent)?;
            c.read_exact(&mut buf)
                .context("the client reading a response")?;
        }
        if !buf.ends_with(END) {
            bail!("the response did not end with its last chunk");
        }
        Ok(())
    });
    let client_addr = client_addr.recv()?;
    let mut s = loop {
        // The agent scrapes a watched server's port too: only the client's connection serves.
        let (conn, peer) = listener.accept()?;
        if peer == client_addr {
            break conn;
        }
    };
    s.set_nodelay(true)?;
    let mut req = vec![0u8; request.len()];
    let start = thread_cpu_ns();
    for _ in 0..requests {
        s.read_exact(&mut req)
            .context("the server reading a request")?;
        s.write_all(HEAD)?;
        for c in chunks {
            write_chunk(&mut s, c, writes)?;
        }
        s.write_all(END)?;
    }
    let spent = thread_cpu_ns() - start;
    client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    if req != request {
        bail!("the server read a different request");
    }
    Ok(spent as f64 / requests as f64)
}

/// `rounds` rounds of three phases of `requests` each.
pub fn measure(
    lib: &Path,
    writes: Writes,
    requests: u64,
    rounds: usize,
) -> anyhow::Result<CaptureCost> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    // The measuring thread serves: it keeps the first CPU for the whole run.
    pin(0, 0)?;
    let _unpin = Unpin;
    let chunks = chunks();
    let _ = inferscope::probe::tracefs::ensure();
    // Warm the code paths and the socket buffers.
    phase(&listener, &chunks, writes, requests / 4 + 1)?;
    let mut out = CaptureCost {
        writes,
        requests,
        rounds,
        ..Default::default()
    };
    let mut agent_cpu = 0u64;
    let mut agent_secs = 0.0;
    for _ in 0..rounds {
        out.without
            .push(phase(&listener, &chunks, writes, requests)?);

        let mut loaded =
            inferscope::probe::load(1 << 20, &inferscope::probe::KernelLayout::read(false))
                .context("loading the eBPF object")?;
        let links = inferscope::probe::floor::attach_raw_floor(&mut loaded.ebpf)
            .context("attaching the empty raw tracepoints")?;
        out.floor.push(phase(&listener, &chunks, writes, requests)?);
        links.release();
        drop(loaded);

        // The http family's budget off: at this rate (about 150,000 captured calls a second
        // here) its measured cost passes the default 5 % of a core within a second and the
        // family is shed, which a longer phase would then measure instead of the capture.
        let agent = AgentProcess::start_with(
            lib,
            &[("INFERSCOPE_PROBES__HTTP_BUDGET_CORE_SHARE", "0")],
            &["--watch-port".into(), port.to_string()],
        )?;
        agent
            .wait_for(
                "the bench process to be watched",
                Duration::from_secs(30),
                |t| metric_sum(t, "inferscope_http_watched_processes") >= 1.0,
            )
            .with_context(|| agent.log())?;
        pin_process(agent.pid(), cpus() - 1)?;
        // Past its start (the first discovery rounds), so that its CPU over the phase is what
        // the requests cost it.
        std::thread::sleep(SETTLE);
        let r0 = metric_sum(&agent.metrics()?, "llm_requests_total");
        let cpu0 = agent.cpu_ns()?;
        let stats = std::env::var_os("BENCH_BPF_STATS").is_some();
        if stats {
            std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
        }
        let t = std::time::Instant::now();
        out.agent.push(phase(&listener, &chunks, writes, requests)?);
        agent_secs += t.elapsed().as_secs_f64();
        if stats {
            for p in aya::programs::loaded_programs().flatten() {
                let name = p.name_as_str().unwrap_or("").to_string();
                if name.starts_with("http_sys") {
                    eprintln!(
                        "{name}: {} runs, {:.0} ns a run",
                        p.run_count(),
                        p.run_time().as_nanos() as f64 / p.run_count().max(1) as f64
                    );
                }
            }
            std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0")?;
        }
        // Its reader drains within a poll interval (200 ms); no scrape meanwhile, whose
        // rendering is not what a request costs.
        std::thread::sleep(DRAIN);
        let cpu1 = agent.cpu_ns()?;
        let want = r0 + requests as f64;
        let text = agent
            .wait_for("every request counted", Duration::from_secs(30), |t| {
                metric_sum(t, "llm_requests_total") >= want
            })
            .or_else(|_| agent.metrics())?;
        agent_cpu += cpu1 - cpu0;
        out.counted += (metric_sum(&text, "llm_requests_total") - r0) as u64;
        out.sent += requests;
        out.records +=
            metric_sum_labeled(&text, "inferscope_events_total", "source=\"http\"") as u64;
        out.lost +=
            metric_sum_labeled(&text, "inferscope_events_lost_total", "source=\"http\"") as u64;
        agent.stop()?;
    }
    out.agent_cpu_ns = agent_cpu as f64 / out.sent.max(1) as f64;
    out.rate = out.sent as f64 / agent_secs.max(1e-9);
    Ok(out)
}

/// Gives the calling thread every CPU again when dropped, however the measurement ended: the
/// bench's later sections run on it.
struct Unpin;

impl Drop for Unpin {
    fn drop(&mut self) {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; `cpu` is below the machine's count.
        unsafe {
            let mut all: libc::cpu_set_t = std::mem::zeroed();
            for cpu in 0..cpus() {
                libc::CPU_SET(cpu, &mut all);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &all);
        }
    }
}

/// The section of docs/performance.md.
pub fn table(c: &CaptureCost) -> String {
    let (title, how) = match c.writes {
        Writes::Whole => ("", "one `write` per event"),
        Writes::Vectored => (
            ", written as hyper writes",
            "one `writev` per event of three iovecs, the chunk's size line, the event and its \
             CRLF, as hyper writes a chunked body (TGI's router, axum)",
        ),
    };
    let mut s = format!("### What a watched server pays per captured call{title}\n\n");
    s += &format!(
        "The bench process serves {} streamed `POST /generate_stream` requests per configuration \
         and round ({EVENTS} chunked token events each, {how}, on a loopback \
         connection it accepted) to a client thread of its own; {} interleaved rounds without \
         the agent, with an empty raw tracepoint on `sys_exit` (the kernel's tracing path \
         alone, on the tracepoint the agent's program is on), and with the agent watching the process \
         (`--watch-port`, the http family's budget off, defaults otherwise: at this rate the \
         family's cost passes its default budget of 5 % of a core within a second, and it would \
         be shed). The serving thread has the first CPU to itself, \
         the client and the agent share the last. The figure is the serving thread's CPU clock \
         per request: the programs run inside its syscalls, and nothing else (the client, the \
         agent) is in it. Added: the \
         mean over the rounds of the per-round difference, ± its standard error. The agent's \
         CPU (its process CPU clock, every thread) from 1 s after it found the process until \
         400 ms after the phase, with no scrape in between.\n\n",
        c.requests, c.rounds
    );
    let (w, _) = mean_stderr(&c.without);
    let (f, _) = mean_stderr(&c.floor);
    let (a, _) = mean_stderr(&c.agent);
    let (added, added_err) = c.added();
    let (over, over_err) = c.over_floor();
    let (floor, floor_err) = c.floor_added();
    let calls = CaptureCost::captured_calls();
    s += "| figure | measured | target | |\n|---|---:|---|---|\n";
    s += &format!(
        "| server thread CPU per request: without / empty hook / agent | {:.1} / {:.1} / {:.1} µs | | |\n",
        w / 1e3,
        f / 1e3,
        a / 1e3
    );
    s += &format!(
        "| added by the agent per request of {EVENTS} events | {:+.1} ± {:.1} µs | ≤ 25 µs | {} |\n",
        added / 1e3,
        added_err / 1e3,
        if added <= 25_000.0 { "met" } else { "**missed**" }
    );
    s += &format!(
        "| of which the tracing path (empty hook) | {:+.1} ± {:.1} µs | | |\n",
        floor / 1e3,
        floor_err / 1e3
    );
    s += &format!(
        "| of which the programs (agent − empty hook) | {:+.1} ± {:.1} µs | | |\n",
        over / 1e3,
        over_err / 1e3
    );
    s += &format!(
        "| per captured call ({calls:.0} per request: the read, the head, {EVENTS} events, the last chunk): added / programs alone | {:+.0} / {:+.0} ns | | |\n",
        added / calls,
        over / calls
    );
    s += &format!(
        "| agent CPU per request; per 1,000 requests/s (share of one core) | {:.1} µs; {:.1} % | ≤ 4 % | {} |\n",
        c.agent_cpu_ns / 1e3,
        c.agent_cpu_ns / 1e4,
        if c.agent_cpu_ns / 1e4 <= 4.0 { "met" } else { "**missed**" }
    );
    s += &format!(
        "| agent: requests counted / sent; http records (lost) | {}/{}; {} ({}) | all, zero loss | {} |\n",
        c.counted,
        c.sent,
        c.records,
        c.lost,
        if c.counted == c.sent && c.lost == 0 { "met" } else { "**missed**" }
    );
    s += &format!(
        "\nThe agent's phases ran at {:.0} requests/s ({:.0} captured calls/s). Its CPU per \
         request here is its work per record (decode, the HTTP/1.1 and SSE parsers, one JSON \
         parse per token event) and grows with the rate; the wire-timing sections' \"per 1,000 \
         requests/s\" come from about 200 requests/s, where each of the reader's polls (every \
         200 ms while records come) finds fewer records and the agent's code and state colder. \
         The programs' time per captured call is almost all fixed per call rather than per \
         byte: reading the caller's buffer (`bpf_probe_read_user`, the same for 16 bytes as \
         for 150 on this VM), the \
         connection lookup, the clock and the ring output, each a helper call under this \
         kernel's retpoline and return-thunk mitigations. The read is the largest: with it \
         compiled out of the program (a run of 2026-12-07, the kernel's statistics on), the \
         program went from about 400 to 235 ns a run, and a profile of the serving thread put \
         a third of the program's samples in the kernel's user copy \
         (`copy_from_user_nofault`), a cost any program that reads the caller's bytes pays.\n",
        c.rate,
        c.rate * calls
    );
    if c.writes == Writes::Vectored {
        s += VECTORED_READS;
    }
    s
}

/// What a vectored event costs beyond a single write.
const VECTORED_READS: &str = "\nA `writev` event costs the program four user reads here \
    against one for a single `write`: its iovec array (up to eight entries in one read) and \
    each iovec's bytes.\n";

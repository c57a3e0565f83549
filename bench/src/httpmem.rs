//! The agent's memory under hostile HTTP input: 10,000 connections to a watched server, each
//! holding a partial request (a header block that grows 1 KiB a round and never ends), plus
//! two endless streams (one of SSE events, one event of endless `data:` lines). The server is
//! this binary run as `--serve-partial PORT` in a process of its own (the agent watches it by
//! port); it reads everything and answers only the streams. Reported: the agent's RSS after
//! each round and while the load holds, its peak (VmHWM), and what it counted as dropped.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::agentproc::{metric_sum, AgentProcess};

pub struct HttpMemory {
    pub connections: usize,
    /// Header bytes each connection has sent when the load holds.
    pub header_bytes: usize,
    pub budget_bytes: u64,
    /// (seconds since the agent started, VmRSS KiB, `inferscope_http_state_bytes`).
    pub samples: Vec<(f64, u64, u64)>,
    pub peak_kib: u64,
    pub idle_kib: u64,
    /// RSS when the budget was first reached, and at the end.
    pub at_budget_kib: u64,
    pub end_kib: u64,
    pub tracked: u64,
    pub dropped_connections: u64,
    pub dropped_exchanges: u64,
    pub dropped_gaps: u64,
}

const STREAM_EVENT: &[u8] = b"data: {\"choices\":[{\"text\":\"x\"}]}\n\n";
const DATA_LINE: &[u8] = b"data: {\"choices\":[{\"text\":\"xxxxxxxxxxxxxxxxxxxxxxxx\"}]}\n";

/// Raises the open-file limit to `n` (both limits; without the privilege to raise the hard
/// limit, the soft one to the hard one) and fails when that is less than `n`.
pub fn raise_nofile(n: u64) -> anyhow::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain structs passed by pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let want = libc::rlimit {
            rlim_cur: n.max(lim.rlim_cur),
            rlim_max: n.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    if lim.rlim_cur < n {
        bail!(
            "RLIMIT_NOFILE is {} and cannot be raised to {n}",
            lim.rlim_cur
        );
    }
    Ok(())
}

/// `--serve-partial PORT`: reads every connection, answers `GET /stream` with SSE events
/// forever and `GET /event` with one event of `data:` lines forever; never answers the rest.
pub fn serve(port: u16) -> anyhow::Result<()> {
    raise_nofile(NOFILE)?;
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true)?;
            conns.push(s);
        }
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(conns.iter().map(|c| c.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        let mut keep = Vec::with_capacity(conns.len());
        for (c, fd) in conns.drain(..).zip(&fds[1..]) {
            if fd.revents == 0 {
                keep.push(c);
                continue;
            }
            let mut c = c;
            match c.read(&mut buf) {
                Ok(0) => {}
                Ok(n) if buf[..n].starts_with(b"GET /stream") => stream(c, false),
                Ok(n) if buf[..n].starts_with(b"GET /event") => stream(c, true),
                Ok(_) => keep.push(c),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => keep.push(c),
                Err(_) => {}
            }
        }
        conns = keep;
    }
}

/// Writes forever (until the client goes): SSE events, or one event of endless lines.
fn stream(mut c: TcpStream, one_event: bool) {
    std::thread::spawn(move || {
        let _ = c.set_nonblocking(false);
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";
        if c.write_all(head).is_err() {
            return;
        }
        // Under the probes' 4096-byte capture: every byte is seen.
        let piece = if one_event { DATA_LINE } else { STREAM_EVENT };
        let block = piece.repeat(4000 / piece.len());
        while c.write_all(&block).is_ok() {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Samples, 2 s apart, while the load holds.
const HOLD_SAMPLES: usize = 15;

/// Descriptors each side needs: the connections and a margin.
const NOFILE: u64 = 10_000 + 512;

pub fn measure(lib: &Path, connections: usize, rounds: usize) -> anyhow::Result<HttpMemory> {
    raise_nofile(NOFILE.max(connections as u64 + 512))?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let _server = Server(
        Command::new(std::env::current_exe()?)
            .args(["--serve-partial", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the partial-request server")?,
    );
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the partial-request server did not listen");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let budget = inferscope::http::tracker::Limits::default().state_budget_bytes as u64;
    let port_s = format!("[{port}]");
    let agent = AgentProcess::start(lib, &[("INFERSCOPE_HTTP__WATCH_PORTS", &port_s)])?;
    let t0 = Instant::now();
    agent
        .wait_for("the server to be watched", Duration::from_secs(30), |t| {
            metric_sum(t, "inferscope_http_watched_processes") >= 1.0
        })
        .with_context(|| agent.log())?;
    std::thread::sleep(Duration::from_secs(1));
    let idle_kib = agent.rss_kib()?.0;
    let mut samples = Vec::new();
    let mut sample = |agent: &AgentProcess| -> anyhow::Result<(u64, u64)> {
        let (rss, _) = agent.rss_kib()?;
        let state = metric_sum(&agent.metrics()?, "inferscope_http_state_bytes") as u64;
        samples.push((t0.elapsed().as_secs_f64(), rss, state));
        Ok((rss, state))
    };
    // The two endless streams, read and discarded by threads of their own.
    for path in ["/stream", "/event"] {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
        std::thread::spawn(move || {
            let mut sink = vec![0u8; 65536];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        });
    }
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Pad: ")?;
        clients.push(s);
    }
    let pad = [b'a'; 1024];
    let mut at_budget_kib = 0;
    for _ in 0..rounds {
        for s in &mut clients {
            s.write_all(&pad)?;
        }
        std::thread::sleep(Duration::from_millis(500));
        let (rss, state) = sample(&agent)?;
        if at_budget_kib == 0 && state + 512 * 1024 >= budget {
            at_budget_kib = rss;
        }
    }
    // The load holds: partial requests open, the streams running.
    for _ in 0..HOLD_SAMPLES {
        std::thread::sleep(Duration::from_secs(2));
        sample(&agent)?;
    }
    let text = agent.metrics()?;
    let dropped = |what: &str, reason: &str| -> u64 {
        let key = format!("inferscope_dropped_total{{what=\"{what}\",reason=\"{reason}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(&key)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    let (end_kib, peak_kib) = agent.rss_kib()?;
    let out = HttpMemory {
        connections,
        header_bytes: rounds * pad.len() + 40,
        budget_bytes: budget,
        peak_kib,
        idle_kib,
        at_budget_kib,
        end_kib,
        tracked: metric_sum(&text, "inferscope_http_connections") as u64,
        dropped_connections: dropped("http_connection", "budget"),
        dropped_exchanges: dropped("http_exchange", "budget")
            + dropped("http_exchange", "too_large"),
        dropped_gaps: dropped("token_gap", "too_large"),
        samples,
    };
    drop(clients);
    agent.stop()?;
    Ok(out)
}

/// The figures as a markdown section.
pub fn table(m: &HttpMemory) -> String {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut s = format!(
        "### Memory under hostile HTTP input\n\n\
         {} connections to a watched server, each holding a partial request (its header \
         block grows 1 KiB a round to {} bytes and never ends), plus an endless SSE stream and \
         one SSE event of endless `data:` lines; `http.state_budget_bytes` at its default, \
         {} MiB.\n\n\
         | | value | target |\n|---|---|---|\n\
         | agent RSS, idle (watching the server) | {:.1} MiB | |\n\
         | agent RSS when the budget was reached | {:.1} MiB | |\n\
         | agent RSS at the end (load held 30 s) | {:.1} MiB | no growth after the budget |\n\
         | agent peak RSS (VmHWM) | {:.1} MiB | ≤ 128 MiB |\n\
         | connections tracked at the end | {} | |\n\
         | dropped: connections not tracked (`budget`) | {} | |\n\
         | dropped: exchanges shed (`budget`, `too_large`) | {} | |\n\
         | dropped: token gaps past 4096 per request | {} | |\n\n\
         | t (s) | RSS (MiB) | http state (MiB) |\n|---|---|---|\n",
        m.connections,
        m.header_bytes,
        m.budget_bytes / (1024 * 1024),
        mib(m.idle_kib),
        mib(m.at_budget_kib),
        mib(m.end_kib),
        mib(m.peak_kib),
        m.tracked,
        m.dropped_connections,
        m.dropped_exchanges,
        m.dropped_gaps,
    );
    for (t, rss, state) in &m.samples {
        s.push_str(&format!(
            "| {t:.1} | {:.1} | {:.1} |\n",
            mib(*rss),
            *state as f64 / (1024.0 * 1024.0)
        ));
    }
    s
}

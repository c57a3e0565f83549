//! Root tier: a watched server that answers with one SSE event whose `data:` lines never end
//! (the benchmark's `inferscope-bench --serve-partial` server). The agent's http state stays
//! within `http.max_connection_bytes`, the exchange is shed and counted, and the agent's
//! memory does not follow the bytes streamed.

use std::{
    io::{Read, Write},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use integration::*;

/// Below the event's own cap (64 KiB) plus the other buffers: the connection is shed.
const MAX_CONNECTION_BYTES: f64 = 96.0 * 1024.0;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[root_test]
fn an_endless_sse_event_keeps_the_connection_within_its_bytes() {
    let port = free_port();
    let _server = Server(
        Command::new(bin("inferscope-bench"))
            .args(["--serve-partial", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("inferscope-bench --serve-partial"),
    );
    eventually("the server", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let agent = Agent::start_with_env(
        &["--watch-port", &port.to_string()],
        &[(
            "INFERSCOPE_HTTP__MAX_CONNECTION_BYTES",
            &(MAX_CONNECTION_BYTES as u64).to_string(),
        )],
    );
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /event HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let read = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (read, stop) = (read.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut sink = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                match stream.read(&mut sink) {
                    Ok(n) if n > 0 => read.fetch_add(n as u64, Ordering::Relaxed),
                    _ => break,
                };
            }
        })
    };
    let within = |s: &Scrape| {
        let state = s.sum("inferscope_http_state_bytes", &[]);
        assert!(
            state <= MAX_CONNECTION_BYTES,
            "http state {state} past the connection's {MAX_CONNECTION_BYTES} bytes\n{}",
            s.text
        );
    };
    let shed = [("what", "http_exchange"), ("reason", "too_large")];
    let s = agent.wait_for("the endless event to be shed", |s| {
        within(s);
        s.sum("inferscope_dropped_total", &shed) >= 1.0
    });
    assert_eq!(
        s.sum(
            "llm_request_errors_total",
            &[("model", "unknown"), ("error_type", "untracked")]
        ),
        1.0,
        "{}",
        s.text
    );
    // From here on, 64 MiB more of the same event: the agent reads all of it (its records
    // count), holds none of it.
    let before = rss_kib(agent.pid());
    let events = s.sum("inferscope_events_total", &[("source", "http")]);
    let from = read.load(Ordering::Relaxed);
    eventually("64 MiB more of the event", Duration::from_secs(120), || {
        within(&agent.scrape());
        (read.load(Ordering::Relaxed) - from > 64 << 20).then_some(())
    });
    let s = agent.wait_for("the streamed records", |s| {
        s.sum("inferscope_events_total", &[("source", "http")]) > events + 10_000.0
    });
    within(&s);
    let after = rss_kib(agent.pid());
    assert!(
        after < before + 16 * 1024,
        "agent RSS grew from {before} KiB to {after} KiB while 64 MiB streamed"
    );
    assert_eq!(
        s.sum("inferscope_dropped_total", &shed),
        1.0,
        "shed once, then the rest of the event is skipped"
    );
    stop.store(true, Ordering::Relaxed);
    assert!(agent.stop().success());
    let _ = reader.join();
}

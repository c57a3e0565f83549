//! What the `http` family costs an inference server: the same streamed load against a server
//! without the agent and with it, in interleaved rounds, as its clients see it (latency per
//! request), as the server does (throughput, its own CPU, which pays the syscall probes) and
//! the agent's CPU. Three servers: the TGI stand-in (`text-generation-router`, axum + hyper,
//! HTTP/1.1 server-sent events), a gRPC one (`tonic-llm`, tonic, server-streaming calls
//! multiplexed on one channel) and a C server streaming the same events over TLS with OpenSSL
//! (`c/tls_sse.c`: the agent reads it through its uprobes on `libssl`).

use std::{
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use tgi_stand_in::{Client, Request};

use crate::agentproc::{
    mean_stderr, metric_sum, metric_sum_labeled, proc_cpu_ns, sibling_bin, AgentProcess, DRAIN,
    SETTLE,
};

/// The load, and what it cost.
pub struct HttpCost {
    /// Which server, for the table.
    pub server: &'static str,
    pub requests: usize,
    pub concurrency: usize,
    pub tokens: u64,
    pub ttft_ms: f64,
    pub token_ms: f64,
    /// Client latency per request (send → last byte), without / with the agent.
    pub p50_ms: (f64, f64),
    pub p99_ms: (f64, f64),
    /// Client TTFT, median, without / with.
    pub ttft_p50_ms: (f64, f64),
    /// Requests per second over the load phases, without / with.
    pub rps: (f64, f64),
    /// The server process's CPU (user + system) per request, without / with, µs.
    pub server_cpu_us: (f64, f64),
    /// What the agent added to it, µs per request: the mean over the rounds of (with − without)
    /// in the same round, and its standard error.
    pub server_cpu_added_us: (f64, f64),
    /// The agent's CPU over the phases with it, as a share of one core.
    pub agent_share: f64,
    /// The agent's CPU at rest (the server watched, no request) before each phase, as a
    /// share of one core: what does not grow with the rate.
    pub agent_rest_share: f64,
    /// Requests the agent counted / sent in the phases with it; its lost http records.
    pub agent_requests: (u64, u64),
    pub agent_tokens: u64,
    pub agent_lost: u64,
    pub events: u64,
}

pub(crate) struct Server {
    child: Child,
    pub(crate) port: u16,
}

impl Server {
    pub(crate) fn start(ttft_ms: f64, token_ms: f64) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(sibling_bin("text-generation-router")?)
            .args(["--port", &port.to_string(), "--model-id", "bench/tgi"])
            .args(["--ttft-ms", &ttft_ms.to_string()])
            .args(["--token-ms", &token_ms.to_string()])
            .arg("--tcp-nodelay")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the TGI stand-in")?;
        let server = Self { child, port };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the TGI stand-in did not listen");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One phase: `requests` streamed requests over `concurrency` keep-alive connections.
/// Returns (latencies, TTFTs, wall time).
fn load(
    port: u16,
    requests: usize,
    concurrency: usize,
    tokens: u64,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Duration)> {
    let next = Mutex::new(0usize);
    let out = Mutex::new((Vec::with_capacity(requests), Vec::with_capacity(requests)));
    let start = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    let mut c = Client::connect(port)?;
                    let req = Request::new(true, tokens);
                    loop {
                        {
                            let mut n = next.lock().unwrap();
                            if *n >= requests {
                                return Ok(());
                            }
                            *n += 1;
                        }
                        let t = c.send(&req)?;
                        if t.status != 200 || t.token_events != tokens {
                            bail!("bad response: {} with {} tokens", t.status, t.token_events);
                        }
                        let mut o = out.lock().unwrap();
                        o.0.push(t.latency);
                        o.1.push(t.ttft.unwrap_or_default());
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(())
    })?;
    let wall = start.elapsed();
    let (lat, ttft) = out.into_inner().unwrap();
    Ok((lat, ttft, wall))
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

/// A server the load runs against.
trait Target {
    fn pid(&self) -> u32;
    /// `requests` requests, `concurrency` at once: latencies, TTFTs, wall time.
    fn load(
        &self,
        requests: usize,
        concurrency: usize,
    ) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Duration)>;
    /// The agent's arguments to watch it.
    fn agent_args(&self) -> Vec<String>;
    /// The gauge that says the agent is ready for it.
    fn ready_gauge(&self) -> &'static str {
        "inferscope_http_watched_processes"
    }
    /// The agent's environment besides its defaults.
    fn agent_env(&self) -> &[(&'static str, &'static str)] {
        &[]
    }
}

struct Tgi {
    server: Server,
    tokens: u64,
}

impl Target for Tgi {
    fn pid(&self) -> u32 {
        self.server.child.id()
    }

    fn load(
        &self,
        requests: usize,
        concurrency: usize,
    ) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Duration)> {
        load(self.server.port, requests, concurrency, self.tokens)
    }

    fn agent_args(&self) -> Vec<String> {
        Vec::new() // found by its command line
    }
}

/// A server binary with a load client of its own: `BIN serve PORT [ARGS]` listens, `BIN load
/// PORT REQUESTS CONCURRENCY TOKENS` prints the timings as JSON ([`timings`]). `tonic-llm`
/// (gRPC, 10 ms to the first message, then one every 1 ms) and `tls_sse` (TGI's events over
/// TLS with OpenSSL) are both driven this way, found by `--watch-port`.
struct ServeLoad {
    bin: std::path::PathBuf,
    child: Child,
    port: u16,
    tokens: u64,
    /// The gauge that says the agent is ready for it.
    gauge: &'static str,
    /// The agent's environment besides its defaults.
    env: Vec<(&'static str, &'static str)>,
}

impl ServeLoad {
    fn start(
        bin: std::path::PathBuf,
        serve_args: &[String],
        tokens: u64,
        gauge: &'static str,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&bin)
            .args(["serve", &port.to_string()])
            .args(serve_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let server = Self {
            bin,
            child,
            port,
            tokens,
            gauge,
            env: Vec::new(),
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("{} did not listen", server.bin.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for ServeLoad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Target for ServeLoad {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn load(
        &self,
        requests: usize,
        concurrency: usize,
    ) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Duration)> {
        let out = Command::new(&self.bin)
            .args([
                "load".to_string(),
                self.port.to_string(),
                requests.to_string(),
                concurrency.to_string(),
                self.tokens.to_string(),
            ])
            .output()
            .with_context(|| format!("{} load", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} load: {}",
                self.bin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        timings(&out.stdout)
    }

    fn agent_args(&self) -> Vec<String> {
        vec!["--watch-port".into(), self.port.to_string()]
    }

    fn ready_gauge(&self) -> &'static str {
        self.gauge
    }

    fn agent_env(&self) -> &[(&'static str, &'static str)] {
        &self.env
    }
}

/// A load client's JSON: `latency_ms`, `ttft_ms` per request, `wall_ms`.
fn timings(json: &[u8]) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Duration)> {
    let v: serde_json::Value = serde_json::from_slice(json)?;
    let ms = |key: &str| -> Vec<Duration> {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_f64())
                    .map(|x| Duration::from_secs_f64(x / 1000.0))
                    .collect()
            })
            .unwrap_or_default()
    };
    let wall = Duration::from_secs_f64(v["wall_ms"].as_f64().unwrap_or(0.0) / 1000.0);
    Ok((ms("latency_ms"), ms("ttft_ms"), wall))
}

/// The C server over TLS: HTTP/1.1 streamed requests read through the server's OpenSSL,
/// probed on its internal read and write functions (the default) or, with `internal` false
/// (`probes.tls_internal = false`), on its exported `SSL_read`/`SSL_write`.
pub fn measure_tls(
    lib: &Path,
    requests: usize,
    concurrency: usize,
    tokens: u64,
    internal: bool,
) -> anyhow::Result<HttpCost> {
    let (ttft_ms, token_ms) = (10.0, 1.0);
    let mut target = ServeLoad::start(
        env!("TLS_SSE_BIN").into(),
        &[ttft_ms.to_string(), token_ms.to_string()],
        tokens,
        "inferscope_http_tls_processes",
    )?;
    let server = if internal {
        TLS_INTERNAL
    } else {
        // The budget off: these probes cost past its default share at this rate, and a shed
        // (the TLS probes go with the family) would measure its absence, not the probes.
        target.env = vec![
            ("INFERSCOPE_PROBES__TLS_INTERNAL", "false"),
            ("INFERSCOPE_PROBES__HTTP_BUDGET_CORE_SHARE", "0"),
        ];
        TLS_EXPORTED
    };
    interleaved(
        &target,
        server,
        lib,
        requests,
        concurrency,
        tokens,
        ttft_ms,
        token_ms,
    )
}

/// The TLS sections' servers, for the tables.
pub const TLS_INTERNAL: &str = "C server over TLS (OpenSSL, its internal functions probed)";
pub const TLS_EXPORTED: &str =
    "C server over TLS (OpenSSL, its exported calls probed: `probes.tls_internal = false`)";

/// The TGI stand-in: HTTP/1.1 streamed requests.
pub fn measure(
    lib: &Path,
    requests: usize,
    concurrency: usize,
    tokens: u64,
) -> anyhow::Result<HttpCost> {
    let (ttft_ms, token_ms) = (10.0, 1.0);
    let target = Tgi {
        server: Server::start(ttft_ms, token_ms)?,
        tokens,
    };
    interleaved(
        &target,
        "TGI stand-in",
        lib,
        requests,
        concurrency,
        tokens,
        ttft_ms,
        token_ms,
    )
}

/// `tonic-llm`: gRPC server-streaming calls, multiplexed on one channel.
pub fn measure_grpc(
    lib: &Path,
    requests: usize,
    concurrency: usize,
    tokens: u64,
) -> anyhow::Result<HttpCost> {
    let target = ServeLoad::start(
        sibling_bin("tonic-llm")?,
        &[],
        tokens,
        "inferscope_http_watched_processes",
    )?;
    interleaved(
        &target,
        "gRPC (tonic)",
        lib,
        requests,
        concurrency,
        tokens,
        10.0,
        1.0,
    )
}

/// Rounds of each configuration: enough for an error bar on what the agent adds per request.
pub const ROUNDS: usize = 6;

/// How long the agent's CPU is read at rest, before each phase with it.
const REST: Duration = Duration::from_secs(1);

/// Without and with the agent, in interleaved rounds (without, with, without, with, ...) so
/// that drift on the machine falls on both alike.
#[expect(
    clippy::too_many_arguments,
    reason = "the load's shape, named at two calls"
)]
fn interleaved(
    target: &dyn Target,
    server: &'static str,
    lib: &Path,
    requests: usize,
    concurrency: usize,
    tokens: u64,
    ttft_ms: f64,
    token_ms: f64,
) -> anyhow::Result<HttpCost> {
    let pid = target.pid();
    // Warm the server and the connections' code paths.
    target.load(concurrency * 2, concurrency)?;
    let per = requests / ROUNDS;
    let (mut lat, mut ttft) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let (mut wall, mut server_cpu) = ([Duration::ZERO; 2], [0u64; 2]);
    // Per round: the server's CPU per request without and with, ns.
    let mut round_added: Vec<f64> = Vec::with_capacity(ROUNDS);
    let (mut agent_cpu, mut agent_wall) = (0u64, Duration::ZERO);
    let (mut rest_cpu, mut rest_wall) = (0u64, Duration::ZERO);
    let (mut counted, mut agent_tokens, mut lost, mut events) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..ROUNDS {
        let mut per_request = [0f64; 2];
        for with in [false, true] {
            let i = usize::from(with);
            let agent = if with {
                let a = AgentProcess::start_with(lib, target.agent_env(), &target.agent_args())?;
                let gauge = target.ready_gauge();
                a.wait_for("the server to be watched", Duration::from_secs(30), |t| {
                    metric_sum(t, gauge) >= 1.0
                })
                .with_context(|| a.log())?;
                std::thread::sleep(SETTLE);
                let (cpu, at) = (a.cpu_ns()?, std::time::Instant::now());
                std::thread::sleep(REST);
                rest_cpu += a.cpu_ns()? - cpu;
                rest_wall += at.elapsed();
                Some(a)
            } else {
                None
            };
            let before = match &agent {
                Some(a) => {
                    let r0 = metric_sum(&a.metrics()?, "llm_requests_total");
                    Some((a.cpu_ns()?, r0))
                }
                None => None,
            };
            let s0 = proc_cpu_ns(pid)?;
            let (l, t, w) = target.load(per, concurrency)?;
            let spent = proc_cpu_ns(pid)? - s0;
            let agent_cpu1 = match &agent {
                Some(a) => {
                    std::thread::sleep(DRAIN);
                    a.cpu_ns()?
                }
                None => 0,
            };
            server_cpu[i] += spent;
            per_request[i] = spent as f64 / per as f64;
            wall[i] += w;
            lat[i].extend(l);
            ttft[i].extend(t);
            if let (Some(a), Some((cpu0, r0))) = (agent, before) {
                let want = r0 + per as f64;
                let text = a
                    .wait_for("every request counted", Duration::from_secs(30), |t| {
                        metric_sum(t, "llm_requests_total") >= want
                    })
                    .or_else(|_| a.metrics())?;
                agent_cpu += agent_cpu1 - cpu0;
                agent_wall += w;
                counted += (metric_sum(&text, "llm_requests_total") - r0) as u64;
                agent_tokens += metric_sum(&text, "llm_tokens_output_total") as u64;
                lost += metric_sum_labeled(&text, "inferscope_events_lost_total", "source=\"http\"")
                    as u64;
                events +=
                    metric_sum_labeled(&text, "inferscope_events_total", "source=\"http\"") as u64;
                a.stop()?;
            }
        }
        round_added.push(per_request[1] - per_request[0]);
    }
    let n = (requests / ROUNDS * ROUNDS) as f64;
    let (mean, stderr) = mean_stderr(&round_added);
    Ok(HttpCost {
        server,
        requests: requests / ROUNDS * ROUNDS,
        concurrency,
        tokens,
        ttft_ms,
        token_ms,
        p50_ms: (pct(&mut lat[0], 0.5), pct(&mut lat[1], 0.5)),
        p99_ms: (pct(&mut lat[0], 0.99), pct(&mut lat[1], 0.99)),
        ttft_p50_ms: (pct(&mut ttft[0], 0.5), pct(&mut ttft[1], 0.5)),
        rps: (n / wall[0].as_secs_f64(), n / wall[1].as_secs_f64()),
        server_cpu_us: (
            server_cpu[0] as f64 / n / 1e3,
            server_cpu[1] as f64 / n / 1e3,
        ),
        server_cpu_added_us: (mean / 1e3, stderr / 1e3),
        agent_share: agent_cpu as f64 / agent_wall.as_nanos().max(1) as f64,
        agent_rest_share: rest_cpu as f64 / rest_wall.as_nanos().max(1) as f64,
        agent_requests: (counted, n as u64),
        agent_tokens,
        agent_lost: lost,
        events,
    })
}

//! The tables (markdown, also what is printed) and `docs/performance.md`.

use std::{fmt::Write, time::Duration};

use crate::{Results, Sizes};

const RATIO_TARGET: f64 = 1.3;
const RATE_TARGET: f64 = 1_000_000.0;
const RATE_SHARE_TARGET: f64 = 0.25;
const CPU_TARGET_NS: f64 = 1000.0;
const P99_TARGET_MS: f64 = 10.0;
const RSS_TARGET_MIB: f64 = 64.0;
/// Sampling 8 GPUs at 1 Hz: under 0.5 % of one core.
const NVML_SHARE_TARGET: f64 = 0.005;
/// Client latency added by the http family: p50 under 1 %, p99 under 3 %.
const HTTP_P50_TARGET: f64 = 0.01;
const HTTP_P99_TARGET: f64 = 0.03;

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn rate(r: f64) -> String {
    format!("{:.2} M/s", r / 1e6)
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn overhead_row(s: &mut String, o: &crate::Overhead) {
    let ratio = o.agent_ns / o.floor_ns;
    let _ = writeln!(
        s,
        "| {} | {} | {:.0} | {:.0} | {:.0} | {:.2} ({}) | {:.1} | {}/{} (lost {}) | {}/{} (lost {}) |",
        o.subject.name(),
        thousands(o.pairs),
        o.none_ns,
        o.floor_ns,
        o.agent_ns,
        ratio,
        verdict(ratio <= RATIO_TARGET),
        o.agent_ns / o.none_ns,
        thousands(o.floor_delivered.0),
        thousands(o.floor_delivered.1),
        o.floor_lost,
        thousands(o.agent_delivered.0),
        thousands(o.agent_delivered.1),
        o.agent_lost,
    );
}

/// The per-call tables: pairs on each double, then failing calls on the double and the real
/// driver.
pub fn per_call_tables(overhead: &[crate::Overhead], failing: &[crate::Overhead]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Per call: `cuMemAlloc_v2` + `cuMemFree_v2` pair (ns per pair, median of rounds)\n"
    );
    let _ = writeln!(
        s,
        "| first instruction | pairs/round | unprobed (a) | floor (b) | agent (c) | (c)/(b) target ≤ {RATIO_TARGET} | (c)/(a) | floor events delivered | agent events delivered |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in overhead {
        overhead_row(&mut s, o);
    }
    if !failing.is_empty() {
        let _ = writeln!(
            s,
            "\n### Per call on the failure path: `cuMemAlloc_v2` without `cuInit` (ns per call, median of rounds)\n"
        );
        let _ = writeln!(
            s,
            "| library (probed instruction) | calls/round | unprobed (a) | floor (b) | agent (c) | (c)/(b) target ≤ {RATIO_TARGET} | (c)/(a) | floor events delivered | agent events delivered |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for o in failing {
            overhead_row(&mut s, o);
        }
    }
    s
}

/// The two result tables, in markdown.
pub fn tables(r: &Results) -> String {
    let mut s = String::new();
    let n = &r.nvml;
    let per_round_1hz = n.cpu_per_gpu_sample_ns * f64::from(n.gpus) / 1e9;
    let _ = writeln!(s, "### NVML sampling ({} simulated GPUs)\n", n.gpus);
    let _ = writeln!(s, "| figure | measured | target | |");
    let _ = writeln!(s, "|---|---:|---|---|");
    let _ = writeln!(
        s,
        "| sampler CPU per GPU per sample (in process, {} rounds) | {:.1} µs | | |",
        n.samples,
        n.cpu_per_gpu_sample_ns / 1000.0
    );
    let _ = writeln!(
        s,
        "| share of one core, {} GPUs at 1 Hz | {:.3} % | < 0.5 % | {} |",
        n.gpus,
        per_round_1hz * 100.0,
        verdict(per_round_1hz < NVML_SHARE_TARGET)
    );
    let _ = writeln!(
        s,
        "| share of one core, {} GPUs at 100 ms (10 Hz) | {:.3} % | | |",
        n.gpus,
        per_round_1hz * 1000.0
    );
    let _ = writeln!(
        s,
        "| agent binary at 100 ms: sampling rounds per second ({:.0} s) | {:.1} | 10 | |",
        n.seconds, n.agent_rounds_per_s
    );
    let _ = writeln!(
        s,
        "| agent binary at 100 ms: CPU share with NVML / with NVML off | {:.2} % / {:.2} % | | |\n",
        n.agent_share_nvml * 100.0,
        n.agent_share_off * 100.0
    );
    s.push_str(&per_call_tables(&r.overhead, &r.failing));
    let t = &r.throughput;
    let l = &r.latency;
    let m = &r.memory;
    let share = t.pipe_rate / t.raw_rate;
    let rss = mib(m.rss_kib);
    let _ = writeln!(s, "\n### Pipeline\n");
    let _ = writeln!(s, "| figure | measured | target | |");
    let _ = writeln!(s, "|---|---:|---|---|");
    let _ = writeln!(
        s,
        "| raw ring-buffer rate (floor probes, counting consumer; {} load threads, {:.1} s) | {} ({}/{} events, lost {}) | reference | |",
        t.threads,
        t.seconds,
        rate(t.raw_rate),
        thousands(t.raw_events),
        thousands(t.raw_expected),
        t.raw_lost
    );
    let _ = writeln!(
        s,
        "| pipeline rate (agent binary: ring buffer → decode → ledger, same load) | {} ({}/{} events, lost {}, dropped {}) | ≥ 1.00 M/s, zero loss | {} |",
        rate(t.pipe_rate),
        thousands(t.pipe_events),
        thousands(t.pipe_expected),
        t.pipe_lost,
        t.pipe_dropped,
        verdict(t.pipe_rate >= RATE_TARGET && t.pipe_lost == 0 && t.pipe_events >= t.pipe_expected)
    );
    let _ = writeln!(
        s,
        "| pipeline rate / raw rate | {:.0} % | ≥ {:.0} % | {} |",
        share * 100.0,
        RATE_SHARE_TARGET * 100.0,
        verdict(share >= RATE_SHARE_TARGET)
    );
    let _ = writeln!(
        s,
        "| agent CPU per event (user + system of the agent process / events) | {:.0} ns | ≤ 1 µs | {} |",
        t.cpu_per_event_ns,
        verdict(t.cpu_per_event_ns <= CPU_TARGET_NS)
    );
    let _ = writeln!(
        s,
        "| consumer capacity on one core (1 / CPU per event, derived) | {} | | |",
        rate(1e9 / t.cpu_per_event_ns.max(1.0))
    );
    let _ = writeln!(
        s,
        "| wakeup latency, event → ledger ({} events, 1 pair / 2 ms): p50 / p99 / max | {:.2} / {:.2} / {:.2} ms | p99 ≤ 10 ms | {} |",
        l.samples,
        l.p50_ms,
        l.p99_ms,
        l.max_ms,
        verdict(l.p99_ms <= P99_TARGET_MS)
    );
    let _ = writeln!(
        s,
        "| agent RSS, {} live allocations in {} processes (idle: {:.1} MiB, peak: {:.1} MiB) | {:.1} MiB | ≤ 64 MiB | {} |",
        thousands(m.allocations),
        m.processes,
        mib(m.idle_rss_kib),
        mib(m.hwm_kib),
        rss,
        verdict(rss <= RSS_TARGET_MIB)
    );
    http_table(&mut s, &r.http);
    http_table(&mut s, &r.grpc);
    http_table(&mut s, &r.tls);
    http_table(&mut s, &r.tls_exported);
    otlp_table(&mut s, &r.otlp);
    s
}

fn added(without: f64, with: f64) -> f64 {
    (with - without) / without
}

/// One wire-timing table, alone.
pub fn wire_table(h: &crate::http::HttpCost) -> String {
    let mut s = String::new();
    http_table(&mut s, h);
    s
}

/// What the capture may add to the server's CPU per streamed request of 64 events.
const SERVER_CPU_TARGET_US: f64 = 25.0;

fn http_table(s: &mut String, h: &crate::http::HttpCost) {
    let _ = writeln!(
        s,
        "\n### Wire timing: streamed requests to the {}, without / with the agent\n",
        h.server
    );
    let how = if h.server.starts_with("gRPC") {
        "server-streaming `llm.Generator/Generate` calls, multiplexed on one HTTP/2 channel, at once"
    } else {
        "`POST /generate_stream`, keep-alive connections at once"
    };
    let _ = writeln!(
        s,
        "{} per configuration; {}: {}; {} token events each (first after {} ms, then every {} ms).\n",
        thousands(h.requests as u64),
        how,
        h.concurrency,
        h.tokens,
        h.ttft_ms,
        h.token_ms
    );
    let _ = writeln!(s, "| figure | without | with agent | added | target | |");
    let _ = writeln!(s, "|---|---:|---:|---:|---|---|");
    let p50 = added(h.p50_ms.0, h.p50_ms.1);
    let p99 = added(h.p99_ms.0, h.p99_ms.1);
    let _ = writeln!(
        s,
        "| client latency per request, p50 | {:.2} ms | {:.2} ms | {:+.2} % | < 1 % | {} |",
        h.p50_ms.0,
        h.p50_ms.1,
        p50 * 100.0,
        verdict(p50 < HTTP_P50_TARGET)
    );
    let _ = writeln!(
        s,
        "| client latency per request, p99 | {:.2} ms | {:.2} ms | {:+.2} % | < 3 % | {} |",
        h.p99_ms.0,
        h.p99_ms.1,
        p99 * 100.0,
        verdict(p99 < HTTP_P99_TARGET)
    );
    let _ = writeln!(
        s,
        "| client TTFT, p50 | {:.2} ms | {:.2} ms | {:+.2} % | | |",
        h.ttft_p50_ms.0,
        h.ttft_p50_ms.1,
        added(h.ttft_p50_ms.0, h.ttft_p50_ms.1) * 100.0
    );
    let _ = writeln!(
        s,
        "| server throughput (requests/s) | {:.0} | {:.0} | {:+.2} % | | |",
        h.rps.0,
        h.rps.1,
        added(h.rps.0, h.rps.1) * 100.0
    );
    let _ = writeln!(
        s,
        "| server CPU per request (user + system of the server process, its CPU clock; added: mean of the rounds ± standard error) | {:.0} µs | {:.0} µs | {:+.1} ± {:.1} µs | ≤ {SERVER_CPU_TARGET_US:.0} µs | {} |",
        h.server_cpu_us.0,
        h.server_cpu_us.1,
        h.server_cpu_added_us.0,
        h.server_cpu_added_us.1,
        verdict(h.server_cpu_added_us.0 <= SERVER_CPU_TARGET_US)
    );
    let per_krps = h.agent_share / (h.rps.1 / 1000.0);
    let _ = writeln!(
        s,
        "| agent CPU per 1,000 requests/s (share of one core; {:.1} % at {:.0} requests/s) | | {:.1} % | | | |",
        h.agent_share * 100.0,
        h.rps.1,
        per_krps * 100.0
    );
    let _ = writeln!(
        s,
        "| agent CPU at rest (the server watched, no request; share of one core); per 1,000 requests/s above it | | {:.2} %; {:.1} % | | | |",
        h.agent_rest_share * 100.0,
        (h.agent_share - h.agent_rest_share).max(0.0) / (h.rps.1 / 1000.0) * 100.0
    );
    let _ = writeln!(
        s,
        "| agent: requests counted / sent; output tokens; http records (lost) | | {}/{}; {}; {} (lost {}) | | all, zero loss | {} |",
        thousands(h.agent_requests.0),
        thousands(h.agent_requests.1),
        thousands(h.agent_tokens),
        thousands(h.events),
        h.agent_lost,
        verdict(
            h.agent_requests.0 == h.agent_requests.1
                && h.agent_tokens == h.agent_requests.1 * h.tokens
                && h.agent_lost == 0
        )
    );
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let vm = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    format!(
        "- CPU: {model}, {cores} cores{}\n- memory: {mem_gib:.0} GiB\n- kernel: Linux {kernel} ({os}, x86_64)\n",
        if vm { " (virtual machine: the `hypervisor` CPU flag is set)" } else { "" }
    )
}

/// OTLP export: measured, no targets set by the issue beyond "flat memory".
pub fn otlp_table(s: &mut String, o: &crate::otlp::OtlpCost) {
    let d = &o.down;
    let _ = writeln!(s, "\n### OTLP export\n");
    let _ = writeln!(s, "| figure | measured |");
    let _ = writeln!(s, "|---|---:|");
    let _ = writeln!(
        s,
        "| 1,000 spans: build + protobuf encode (thread CPU, median of {}) | {:.0} µs |",
        o.rounds, o.spans_build_us
    );
    let _ = writeln!(
        s,
        "| 1,000 spans: build, encode, send over HTTP/protobuf to a local sink (wall) | {:.0} µs ({} KiB) |",
        o.spans_send_us,
        o.spans_bytes / 1024
    );
    let _ = writeln!(
        s,
        "| 10,000 metric points: registry snapshot + mapping + encode (thread CPU) | {:.1} ms |",
        o.points_build_ms
    );
    let _ = writeln!(
        s,
        "| 10,000 metric points: the same and the send (wall) | {:.1} ms ({} KiB) |",
        o.points_send_ms,
        o.points_bytes / 1024
    );
    let _ = writeln!(
        s,
        "| collector down {:.0} s at {:.0} requests/s: requests sent / counted | {} / {} |",
        d.seconds, d.target_rps, d.requests, d.counted
    );
    let secs = |v: Option<f64>| match (d.otlp_on, v) {
        (false, _) => "OTLP off".to_string(),
        (true, None) => "not within 60 s".to_string(),
        (true, Some(v)) => format!("{v:.1} s"),
    };
    let _ = writeln!(
        s,
        "| collector back: first metrics push / first spans after | {} / {} |",
        secs(d.back_metrics_s),
        secs(d.back_spans_s)
    );
    let _ = writeln!(
        s,
        "| agent RSS after warm-up / highest / last (VmHWM) | {:.1} / {:.1} / {:.1} MiB ({:.1} MiB) |",
        mib(d.rss_start_kib),
        mib(d.rss_max_kib),
        mib(d.rss_end_kib),
        mib(d.hwm_kib)
    );
    let tenths: Vec<String> = d
        .rss_tenths_kib
        .iter()
        .map(|k| format!("{:.1}", mib(*k)))
        .collect();
    let _ = writeln!(
        s,
        "| agent RSS at each tenth of the run (MiB) | {} |",
        tenths.join(", ")
    );
    let _ = writeln!(
        s,
        "| dropped and counted: spans; failed metric pushes | {}; {} |",
        thousands(d.dropped_traces),
        d.dropped_metrics
    );
    let _ = writeln!(
        s,
        "| agent CPU meanwhile (share of one core); forensic reports it wrote | {:.1} %; {} |",
        d.agent_share * 100.0,
        d.reports
    );
}

/// `docs/performance.md`.
pub fn document(sizes: &Sizes, r: &Results, tables: &str, elapsed: Duration) -> String {
    let mut d = String::new();
    let command = if sizes.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let _ = writeln!(d, "# Performance\n");
    let _ = writeln!(
        d,
        "What inferscope costs the processes it watches and what its event pipeline sustains, \
measured side by side in one run against the CUDA driver test double \
(`tests/cuda-workload`, no GPU needed) and, for the `http` family, a TGI stand-in. \
This file is written by the benchmark; \
figures are reported against their targets, nothing is asserted. \
Bare metal is cheaper than the nested virtual machine below: uprobe traps, and above all \
single-stepping, are slower under a hypervisor.\n"
    );
    let _ = writeln!(d, "## How it was measured\n");
    let _ = writeln!(
        d,
        "```\n{command}   # as root; --quick divides every count by 10\n```\n"
    );
    let _ = writeln!(
        d,
        "This run: `{command}`, {:.0} s. Machine, read at run time:\n\n{}",
        elapsed.as_secs_f64(),
        machine()
    );
    let _ = writeln!(
        d,
        "- **Per call.** The bench process `dlopen`s the double's `libcuda.so.1` of each variant \
(first instruction of every function: a 5-byte nop, `push %rbp`, `endbr64`), calls `cuInit`, \
`cuDevicePrimaryCtxRetain` and `cuCtxSetCurrent`, then times pairs of \
`cuMemAlloc_v2(&p, 4096)` + `cuMemFree_v2(p)` (a) with nothing attached, (b) with the floor \
programs (`floor_enter`/`floor_return`: stash two arguments in a hash map at entry, one \
ring-buffer record at return, nothing else) on those two symbols and a thread that drains \
the ring buffer every millisecond, (c) with the agent's `cuda` family attached to the \
library as the agent attaches it (every symbol of its table, default knobs: 1-in-64 stack \
sampling) and the agent's own ingest → tracker stages running on a tokio runtime in the \
bench process. {} rounds, (a), (b), (c) interleaved in each, median per column. \
\"Delivered\" counts the records the consumer read (b) or the events the tracker applied (c). \
The failure-path table does the same with single `cuMemAlloc_v2` calls on a library loaded \
without `cuInit`, which fail with `not_initialized`: the novmm double and NVIDIA's real \
`libcuda.so.535` (Debian's, extracted by `cargo xtask setup`; no GPU here), the floor placed \
where the agent places its probes (`probe/prologue.rs`).\n",
        sizes.rounds
    );
    let _ = writeln!(
        d,
        "- **Throughput.** One load thread per core does alloc/free pairs on the nop5 double for \
{:.1} s. Raw rate: floor probes and the counting consumer. Pipeline rate: the real agent \
binary (`inferscope run --cuda-lib <double>`, probe budget off so it does not shed the \
probes) as a separate process; events applied from its `inferscope_events_total`, loss \
from `inferscope_events_lost_total`, CPU from `/proc/<pid>/stat` (utime + stime of the \
whole process, from before the load until the pipeline drained) divided by the events.\n",
        sizes.hammer.as_secs_f64()
    );
    let _ = writeln!(
        d,
        "- **Wakeup latency.** Agent probes and pipeline in the bench process; one pair every \
2 ms; per event, `CLOCK_MONOTONIC` right after the tracker applied it minus the event's \
`bpf_ktime_get_ns()` stamp (the same clock).\n"
    );
    let _ = writeln!(
        d,
        "- **NVML.** The agent's sampler (`gpu::nvml::Sampler`) in the bench process over the NVML \
double with {} simulated GPUs: thread CPU time (`CLOCK_THREAD_CPUTIME_ID`) of {} sampling rounds \
(every reading the agent makes: utilization, memory, power and limit, energy, temperature, two \
clocks, clock event reasons, PCIe both ways, ECC, running processes, process samples). Then the \
agent binary with a 100 ms interval for {:.0} s, beside the same binary with NVML off: CPU from \
`/proc/<pid>/stat`, rounds from `inferscope_nvml_samples_total`. The double answers from \
memory; a real driver's calls take longer (see the note in the reading).\n",
        r.nvml.gpus, r.nvml.samples, r.nvml.seconds
    );
    let _ = writeln!(
        d,
        "- **Memory.** The agent binary with default settings; {} `cuda-workload` processes each \
make {} `cuMemAlloc_v2` of 4 KiB and stay alive; `VmRSS` of the agent once its metrics show \
every process and allocation.\n",
        sizes.processes, sizes.allocs_per_process
    );
    let _ = writeln!(
        d,
        "- **HTTP.** The TGI stand-in (`tests/servers/tgi`: axum + hyper like TGI's router, \
`TCP_NODELAY` on, 2 tokio workers on the same 2 cores as everything else) serves streamed \
`POST /generate_stream` requests; {} client threads, one keep-alive connection each, send \
{} requests per configuration in six interleaved rounds (without, with, without, with, ...; \
the agent started afresh for each round with its defaults and found the server by its command \
line). Client latency is send → last byte of the response, TTFT send → first token event, \
both read on the client's monotonic clock; throughput is requests over the phases' wall time; \
server and agent CPU from their processes' CPU clocks (`clock_getcpuclockid`: the scheduler's \
nanoseconds, every thread) over the phases (the agent's from 1 s after it found the server, \
past its start, until 400 ms after the phase, with no scrape in between; at rest over the \
second before the phase, the server watched and idle), and what the agent \
adds to the server's CPU per request as the mean over the rounds of (with − without) with its \
standard error. The same \
load goes to a gRPC server (`tonic-llm`, server-streaming calls on one channel) and to a C \
server over TLS (`bench/c/tls_sse.c`, OpenSSL, read through the agent's uprobes on `libssl`: \
on its internal read and write functions, the default, then with `probes.tls_internal = false` \
on its exported calls, the http family's budget off: they cost past its default share at this \
rate, and the budget would shed them).\n",
        sizes.http_concurrency, sizes.http_requests
    );
    let _ = writeln!(
        d,
        "- **OTLP.** In the bench process, the agent's own export code: 1,000 request spans \
built (`export::otlp::traces`, the SDK's `SpanData`) and turned into the protobuf request as \
`opentelemetry-otlp`'s exporter does (`opentelemetry-proto`'s transform) and encoded, and a registry of 10,000 points (5,000 \
counter and 5,000 gauge series with model/pid/gpu labels, beside the empty catalogue) \
snapshot through the Prometheus→OTLP mapping and encoded, each timed by thread CPU, then \
again with the send (the exporter over HTTP/protobuf for spans, `reqwest` for metrics) to a local sink that reads the request and \
answers 200; median of {} rounds. Then the agent binary exporting to a port where nothing \
listens (metrics every 5 s, spans on; only the `http` probe family, so that forensic reports \
about other processes cannot move the memory figure) while 16 keep-alive clients send 200 \
streamed requests/s in total to the TGI stand-in for {} s: `VmRSS` every second after a \
warm-up (reported at each tenth of the run), and the counted drops. Then a collector (the \
sink) comes up on that port while requests go on: the time to its first metrics push and its \
first spans. (`BENCH_OTLP_OFF=1 inferscope-bench --otlp-only SECS` runs the \
same without OTLP, for comparison.)\n",
        r.otlp.rounds, sizes.otlp_down_secs
    );
    let _ = writeln!(d, "## Results\n\n{tables}");
    let _ = writeln!(d, "## Reading the figures\n\n{}", interpretation(r));
    d
}

/// When the pipeline kept up with everything offered but the rate stayed under the target:
/// what bounded the offered load.
fn offered_load_note(r: &Results) -> String {
    let t = &r.throughput;
    let kept_up = t.pipe_lost == 0 && t.pipe_dropped == 0 && t.pipe_events >= t.pipe_expected;
    if !kept_up || t.pipe_rate >= RATE_TARGET {
        return String::new();
    }
    let Some(nop5) = r
        .overhead
        .iter()
        .find(|o| o.subject == crate::Subject::Pairs(cuda_workload::Variant::Nop5))
    else {
        return String::new();
    };
    let per_event = nop5.agent_ns / 2.0;
    format!(
        " The pipeline read and applied every event offered, so the rate below target is the \
load generator's: with the agent's probes a producer pays {per_event:.0} ns per event (half \
the nop5 pair above), so {} threads with every core to themselves could offer at most {}, \
and the agent's own {:.0} ns of CPU per event shares the same {} cores. The 1 M/s target \
cannot be shown with this load on this machine; the consumer's CPU per event below puts one \
consumer core's capacity at {}.",
        t.threads,
        rate(t.threads as f64 * 1e9 / per_event),
        t.cpu_per_event_ns,
        t.threads,
        rate(1e9 / t.cpu_per_event_ns.max(1.0))
    )
}

fn interpretation(r: &Results) -> String {
    let mut s = String::new();
    for o in &r.overhead {
        let ratio = o.agent_ns / o.floor_ns;
        let over = o.agent_ns - o.floor_ns;
        let probe = o.floor_ns - o.none_ns;
        let _ = write!(
            s,
            "- **{} — agent / floor = {ratio:.2} (target ≤ {RATIO_TARGET}: {}).** The floor's \
probes add {probe:.0} ns to a {:.0} ns pair; the agent adds {over:+.0} ns more. ",
            o.subject.name(),
            verdict(ratio <= RATIO_TARGET),
            o.none_ns,
        );
        let _ = match o.subject {
            crate::Subject::Pairs(cuda_workload::Variant::Endbr) => writeln!(
                s,
                "Each entry probe here is single-stepped (trapped by the hypervisor), which \
dominates both (b) and (c), so the ratio is close to 1 while the absolute cost per pair is \
tens of microseconds; the agent's answer to that cost is its probe budget, not its programs."
            ),
            _ => writeln!(
                s,
                "Beyond the floor's work, the agent's programs read the attach cookie, count the \
hit per CPU, stash five arguments in an LRU map keyed by (thread, api), look up the \
thread's current device, check the process set, sample 1 stack in 64 and query the ring \
buffer's fill level for the wakeup mark. The uprobe traps themselves, which both pay, are \
the larger part of the cost. (c)/(a) is large because the double's pair costs only \
tens of nanoseconds; a real driver's `cuMemAlloc_v2` costs microseconds."
            ),
        };
    }
    let find = |real| {
        r.failing
            .iter()
            .find(|o| o.subject == crate::Subject::Uninit { real })
    };
    if let (Some(double), Some(real)) = (find(false), find(true)) {
        let ratio = real.agent_ns / real.floor_ns;
        let _ = writeln!(
            s,
            "- **Real 535 driver — agent / floor = {ratio:.2} (target ≤ {RATIO_TARGET}: {}); the \
double on the same path {:.2}.** Without a GPU the real driver answers every allocation \
`not_initialized`, so only the failure path can be timed on it; the double loaded without \
`cuInit` takes the same path. The floor sits where the agent does (`probe/prologue.rs`: on \
the real driver the emulated `je` after the single-stepped `cmpl`), so both pay the same \
trap: {:.0} ns of floor over a {:.0} ns call on the real driver, {:.0} over {:.0} on the \
double. What the agent adds beyond the floor ({:+.0} ns real, {:+.0} ns double) is what it \
adds on a success too (the pairs above), plus what a failure costs it: the first failing \
call of a process in each millisecond has its user stack walked and stored and wakes the \
reader (at most once a millisecond per CPU); the others are counted only. A successful \
allocation on the real driver needs a GPU; it pays the same trap.",
            verdict(ratio <= RATIO_TARGET),
            double.agent_ns / double.floor_ns,
            real.floor_ns - real.none_ns,
            real.none_ns,
            double.floor_ns - double.none_ns,
            double.none_ns,
            real.agent_ns - real.floor_ns,
            double.agent_ns - double.floor_ns,
        );
    }
    let t = &r.throughput;
    let share = t.pipe_rate / t.raw_rate;
    let _ = writeln!(
        s,
        "- **Pipeline rate {} (target ≥ 1 M/s with zero loss: {}); {:.0} % of the raw rate \
(target ≥ 25 %: {}).** Both rates are bounded by the producers: {} load threads share {} \
cores with the consumer, and each event costs the producer a uprobe trap pair, so the \
figures say how fast this machine can generate probed calls, and whether the pipeline \
keeps up (lost {}, dropped {}). The agent's probes cost the producer more per call than \
the floor's, which lowers the pipeline's offered load relative to the raw one.{}",
        rate(t.pipe_rate),
        verdict(t.pipe_rate >= RATE_TARGET && t.pipe_lost == 0 && t.pipe_events >= t.pipe_expected),
        share * 100.0,
        verdict(share >= RATE_SHARE_TARGET),
        t.threads,
        t.threads,
        t.pipe_lost,
        t.pipe_dropped,
        offered_load_note(r),
    );
    let _ = writeln!(
        s,
        "- **CPU per event {:.0} ns (target ≤ 1 µs: {}).** The whole agent process (reader, \
decode, tracker with ledger and metrics updates, exporter, probe manager) per event \
applied; 1 / this is the rate one core could sustain as a consumer ({}).",
        t.cpu_per_event_ns,
        verdict(t.cpu_per_event_ns <= CPU_TARGET_NS),
        rate(1e9 / t.cpu_per_event_ns.max(1.0)),
    );
    let l = &r.latency;
    let _ = writeln!(
        s,
        "- **Wakeup latency p99 {:.2} ms (target ≤ 10 ms: {}).** Probes submit without waking \
the reader (a wakeup costs microseconds per event); the reader drains on its 5 ms timer, \
so at a low rate an event waits for the next tick: the latency is spread over 0-5 ms plus \
scheduling (p50 {:.2} ms, max {:.2} ms).",
        l.p99_ms,
        verdict(l.p99_ms <= P99_TARGET_MS),
        l.p50_ms,
        l.max_ms
    );
    let m = &r.memory;
    let _ = writeln!(
        s,
        "- **RSS {:.1} MiB at {} allocations in {} processes (target ≤ 64 MiB: {}).** Idle \
{:.1} MiB; the difference is the ledger (one entry per live allocation) and the \
per-process metric series.",
        mib(m.rss_kib),
        thousands(m.allocations),
        m.processes,
        verdict(mib(m.rss_kib) <= RSS_TARGET_MIB),
        mib(m.idle_rss_kib),
    );
    http_reading(&mut s, r);
    let n = &r.nvml;
    let share = n.cpu_per_gpu_sample_ns * f64::from(n.gpus) / 1e9;
    let _ = writeln!(
        s,
        "- **NVML: {:.3} % of a core for {} GPUs at 1 Hz (target < 0.5 %: {}).** The agent's \
own work per GPU and sample ({:.1} µs) is what this measures; on a real node each NVML call \
also costs the driver's ioctl, typically tens of microseconds, so a real node's figure is \
higher and is best read from the agent's own CPU use there. At 100 ms \
the agent binary made {:.1} sampling rounds per second (10 expected) at {:.2} % of a core, \
against {:.2} % with NVML off.",
        share * 100.0,
        n.gpus,
        verdict(share < NVML_SHARE_TARGET),
        n.cpu_per_gpu_sample_ns / 1000.0,
        n.agent_rounds_per_s,
        n.agent_share_nvml * 100.0,
        n.agent_share_off * 100.0,
    );
    otlp_reading(&mut s, &r.otlp);
    s
}

fn otlp_reading(s: &mut String, o: &crate::otlp::OtlpCost) {
    let d = &o.down;
    let per_span_us = o.spans_build_us / 1000.0;
    let _ = writeln!(
        s,
        "- **OTLP: {:.1} µs of CPU per span, {:.1} ms per 10,000 metric points.** At 200 \
requests/s spans cost {:.2} % of a core to build and encode; a 60 s metrics interval makes \
the snapshot negligible. With the collector down for {:.0} s the agent's RSS went from \
{:.1} to {:.1} MiB (highest {:.1}): the span queue is bounded ({} spans dropped and counted, \
{} failed metric pushes counted) and nothing else accumulates. With a collector back on the \
same port the first metrics push (cumulative totals) arrived after {} and the first spans \
after {} (also tested: tests/integration/tests/otlp.rs).",
        per_span_us,
        o.points_build_ms,
        per_span_us * 200.0 / 1e4,
        d.seconds,
        mib(d.rss_start_kib),
        mib(d.rss_end_kib),
        mib(d.rss_max_kib),
        thousands(d.dropped_traces),
        d.dropped_metrics,
        d.back_metrics_s
            .map_or("more than 60 s".to_string(), |v| format!("{v:.1} s")),
        d.back_spans_s
            .map_or("more than 60 s".to_string(), |v| format!("{v:.1} s")),
    );
}

fn http_reading(s: &mut String, r: &Results) {
    let h = &r.http;
    let p50 = added(h.p50_ms.0, h.p50_ms.1);
    let p99 = added(h.p99_ms.0, h.p99_ms.1);
    let per_request_events = h.events as f64 / h.agent_requests.1.max(1) as f64;
    let _ = writeln!(
        s,
        "- **HTTP: client latency {:+.2} % at p50 (target < 1 %: {}), {:+.2} % at p99 (target < 3 %: \
{}); throughput {:+.2} %.** A request here is almost all the server's timed waits ({:.0} ms \
asked for, {:.0} ms at p50 without the agent: tokio rounds each 1 ms sleep up to its next \
timer tick), so the added latency is what the probes and the agent's CPU take from the server's syscalls and cores: the server's \
CPU per request went from {:.0} to {:.0} µs, {:+.1} ± {:.1} µs added (target ≤ {:.0} µs: {}; the \
mean over the rounds of what each round added, read from the server's CPU clock) (the \
syscall tracepoints run in its context: \
{:.0} http records per request, one per `read`/`write`/`writev` call), and the agent used \
{:.1} % of a core at {:.0} requests/s, i.e. {:.1} % of a core per 1,000 requests/s of \
{} token events each ({:.2} % of a core at rest with the server watched, {:.1} % per \
1,000 requests/s above that). On 2 cores shared by the clients, the server and the agent, the \
latency differences move by a few percent either way from run to run (p50 as well as p99); \
the server's CPU per request is the steadier measure of the cost. The agent counted {}/{} \
requests with {} lost records.",
        p50 * 100.0,
        verdict(p50 < HTTP_P50_TARGET),
        p99 * 100.0,
        verdict(p99 < HTTP_P99_TARGET),
        added(h.rps.0, h.rps.1) * 100.0,
        h.ttft_ms + h.token_ms * (h.tokens - 1) as f64,
        h.p50_ms.0,
        h.server_cpu_us.0,
        h.server_cpu_us.1,
        h.server_cpu_added_us.0,
        h.server_cpu_added_us.1,
        SERVER_CPU_TARGET_US,
        verdict(h.server_cpu_added_us.0 <= SERVER_CPU_TARGET_US),
        per_request_events,
        h.agent_share * 100.0,
        h.rps.1,
        h.agent_share / (h.rps.1 / 1000.0) * 100.0,
        h.tokens,
        h.agent_rest_share * 100.0,
        (h.agent_share - h.agent_rest_share).max(0.0) / (h.rps.1 / 1000.0) * 100.0,
        thousands(h.agent_requests.0),
        thousands(h.agent_requests.1),
        h.agent_lost,
    );
    let (t, x) = (&r.tls, &r.tls_exported);
    let calls = t.tokens as f64 + 3.0;
    let _ = writeln!(
        s,
        "- **TLS read through the server's OpenSSL: {:+.1} ± {:.1} µs of server CPU per request \
with the probes on OpenSSL's internal functions (target ≤ {:.0} µs: {}), against {:+.1} ± {:.1} µs \
on its exported calls; the agent counted {}/{} and {}/{} requests with {} and {} lost records.** \
The C server (`bench/c/tls_sse.c`: OpenSSL 3, blocking sockets, a thread per connection) makes \
about {:.0} `SSL_write`/`SSL_read` calls per request, each paying an entry and a return uprobe: \
about {:.1} µs a call on the internal functions, {:.1} µs on the exported calls. OpenSSL 3's \
`SSL_read` and `SSL_write` begin with `sub $imm, %rsp`, which the kernel single-steps out of \
line (a second trap, expensive under a hypervisor), and an entry probe cannot move past an \
instruction that moves the stack pointer; the internal functions they call (found from their \
code, `docs/probes.md`) begin with `push`, which the kernel emulates. The return probe's \
trampoline traps once more in both. In exchange a tied connection's ciphertext is not copied \
into the ring ({:.0} records per request here, against {:.0} in clear to the TGI stand-in).",
        t.server_cpu_added_us.0,
        t.server_cpu_added_us.1,
        SERVER_CPU_TARGET_US,
        verdict(t.server_cpu_added_us.0 <= SERVER_CPU_TARGET_US),
        x.server_cpu_added_us.0,
        x.server_cpu_added_us.1,
        thousands(t.agent_requests.0),
        thousands(t.agent_requests.1),
        thousands(x.agent_requests.0),
        thousands(x.agent_requests.1),
        t.agent_lost,
        x.agent_lost,
        calls,
        t.server_cpu_added_us.0 / calls,
        x.server_cpu_added_us.0 / calls,
        t.events as f64 / t.agent_requests.1.max(1) as f64,
        per_request_events,
    );
}

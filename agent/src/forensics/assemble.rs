//! Draft → report: the writer thread's side. Reads what may take time or I/O (the GPU ring,
//! stack symbolization, cgroup and node memory) and writes the summary sentence.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{
    render::bytes,
    report::{
        AllocationRow, Allocations, CudaFailure, ExitInfo, FailurePoint, GpuInfo, GpuPoint,
        HostOom, Kind, ProcessSeries, Report, RequestSeries, RssRow, SizeClass, StackStatus,
        Timeline, SCHEMA_VERSION,
    },
    store::Store,
    symbolize::Stacks,
    Settings,
};
use crate::{
    cuda_error,
    events::{Notice, ReportWritten},
    gpu::{history::GpuHistory, throttle},
    health::Heartbeat,
    metrics::KindLabels,
    track::draft::Draft,
};

const OLD_NS: u64 = 600 * 1_000_000_000;
const LARGEST: usize = 20;

pub struct Writer {
    pub store: Store,
    /// The probes' stack map; the symbolizer that reads it is made on the writer's thread.
    pub stack_map: Option<aya::maps::StackTraceMap<aya::maps::MapData>>,
    pub history: Arc<GpuHistory>,
    pub metrics: Arc<super::metrics::ForensicsMetrics>,
    /// The node's name, for the alerts that point at a report.
    pub node: String,
    pub settings: Settings,
    pub seq: u64,
    /// Requests in flight per watched server, from the wire.
    pub load: Option<Arc<crate::http::load::LoadBoard>>,
    /// OTLP: one log record per report.
    pub logs: Option<crate::queue::Sender<crate::events::Notice>>,
    /// The inference servers' requests, for a CUDA failure in one of them.
    pub requests: Option<super::requests::RequestSource>,
    /// Reports waiting for the window after their failure to pass: when, the report, the
    /// failure's instant and the requests then in flight.
    pub pending: Vec<Pending>,
    /// Reads the Python stacks of a Python process whose CUDA call failed.
    pub python: Option<super::python::PythonHandle>,
}

pub struct Pending {
    due: std::time::Instant,
    report: Report,
    t_ns: u64,
    records: Vec<crate::http::requests::RequestRecord>,
}

impl Writer {
    /// Writes reports until every sender is gone, beating `heartbeat` at least once a second
    /// while it waits and after each report.
    pub fn run(mut self, rx: crate::queue::Receiver<Draft>, heartbeat: Heartbeat) {
        self.store.prepare();
        let mut stacks = Stacks::new(self.stack_map.take());
        loop {
            heartbeat.beat();
            self.complete_due(false);
            let draft = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(d) => d,
                Err(crate::queue::RecvError::Timeout) => continue,
                Err(crate::queue::RecvError::Closed) => break,
            };
            // First, while the failing thread may still be where it failed (when no freeze
            // held it there).
            let python = match (&self.python, &draft.cuda) {
                (Some(py), Some(ev)) => py.stacks(draft.process.pid, ev.header.pid, draft.ts_ns),
                _ => None,
            };
            let (report, records) = self.assemble_failure(&mut stacks, draft, python);
            let kind = report.kind.as_str();
            let saved = self.store.save(&report);
            if let (Some(src), Some((records, t_ns))) = (&self.requests, records) {
                self.pending.push(Pending {
                    due: std::time::Instant::now() + src.after,
                    report: report.clone(),
                    t_ns,
                    records,
                });
            }
            if let Some(logs) = &self.logs {
                logs.offer(Notice::Report(ReportWritten {
                    time_unix_nano: report.time_unix_ms.saturating_mul(1_000_000),
                    id: report.id.clone(),
                    kind,
                    pid: report.process.pid,
                    comm: report.process.comm.clone(),
                    gpu: report.gpu.as_ref().map(|g| g.index),
                    xid: report.xid,
                    path: saved.as_ref().ok().cloned(),
                    summary: report.summary.clone(),
                }));
            }
            match saved {
                Ok(path) => {
                    tracing::warn!(id = report.id, kind, path = %path.display(), summary = report.summary, "forensic report written");
                }
                Err(e) => {
                    self.metrics
                        .forensics_errors
                        .get_or_create(&KindLabels { kind: "write" })
                        .inc();
                    tracing::error!(id = report.id, error = %e, cause = %std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default(), summary = report.summary, "forensic report kept in memory only");
                }
            }
            self.metrics
                .forensics_reports
                .get_or_create(&KindLabels { kind })
                .inc();
            self.metrics.last_report(
                kind,
                &report.id,
                &self.node,
                (report.time_unix_ms / 1000) as i64,
            );
        }
        // Stopping: what the windows saw so far goes into their reports.
        self.complete_due(true);
        heartbeat.done();
    }

    /// A report with, for a CUDA failure, the Python stacks read and the requests in flight
    /// on the failing process's server; and those requests as the log had them, with the
    /// failure's instant, for the window after it.
    fn assemble_failure(
        &mut self,
        stacks: &mut Stacks,
        d: Draft,
        python: Option<super::report::PythonStacks>,
    ) -> (
        Report,
        Option<(Vec<crate::http::requests::RequestRecord>, u64)>,
    ) {
        let at = (d.cuda.is_some(), d.process.pid, d.ts_ns);
        let mut report = self.assemble(stacks, d);
        let found = match (&self.requests, at) {
            (Some(src), (true, pid, t_ns)) => src.at_failure(pid, t_ns).map(|r| (r, t_ns)),
            _ => None,
        };
        if python.is_none() && found.is_none() {
            return (report, None);
        }
        report.python = python;
        let records = found.map(|((requests, records), t_ns)| {
            report.requests = Some(requests);
            (records, t_ns)
        });
        // The new parts are masked and told like the rest.
        report.redact();
        report.summary = summary(&report);
        (report, records)
    }

    /// Adds to each report whose window after its failure has passed (or all, `all`) the
    /// requests that failed in it, and rewrites it.
    fn complete_due(&mut self, all: bool) {
        let Some(src) = &self.requests else {
            return;
        };
        let now = std::time::Instant::now();
        let (due, waiting): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| all || p.due <= now);
        self.pending = waiting;
        for mut p in due {
            let Some(r) = p.report.requests.as_mut() else {
                continue;
            };
            let failed = src.after_failure(r, &p.records, p.t_ns);
            self.metrics.failed_after.inc_by(failed as u64);
            p.report.redact();
            p.report.summary = summary(&p.report);
            if let Err(e) = self.store.save(&p.report) {
                self.metrics
                    .forensics_errors
                    .get_or_create(&KindLabels { kind: "write" })
                    .inc();
                tracing::error!(id = p.report.id, error = %e, "forensic report not rewritten with the requests that failed after it");
            } else {
                tracing::info!(
                    id = p.report.id,
                    failed,
                    "forensic report completed with the requests after the failure"
                );
            }
        }
    }

    pub fn assemble(&mut self, stacks: &mut Stacks, d: Draft) -> Report {
        self.seq += 1;
        let unix_ms = d
            .wall
            .duration_since(UNIX_EPOCH)
            .map(|t| t.as_millis() as u64)
            .unwrap_or(0);
        let id = format!(
            "{}-{}-{}-{}",
            compact_time(d.wall),
            d.kind.as_str(),
            d.process.pid,
            self.seq
        );
        let window_ns = self.settings.timeline_secs.saturating_mul(1_000_000_000);
        let rel = |ts: u64| (ts as f64 - d.ts_ns as f64) / 1e9;

        let gpu = d.gpu.map(|g| {
            let at = self.history.at(g, d.ts_ns);
            let (uuid, name) = self.history.identity(g).unzip();
            GpuInfo {
                index: g,
                uuid,
                name,
                memory_total_bytes: at.as_ref().and_then(|s| s.memory_total),
                memory_used_bytes: at.as_ref().and_then(|s| s.memory_used),
                utilization: at.as_ref().and_then(|s| s.utilization),
                temperature_c: at.as_ref().and_then(|s| s.temperature_c),
                power_watts: at
                    .as_ref()
                    .and_then(|s| s.power_mw)
                    .map(|p| f64::from(p) / 1000.0),
                throttle_reasons: at
                    .as_ref()
                    .and_then(|s| s.throttle)
                    .map(|m| throttle::active(m).map(String::from).collect())
                    .unwrap_or_default(),
            }
        });

        let pid = d.process.pid;
        let cuda = d.cuda.map(|e| CudaFailure {
            api: agent_common::cuda::CudaApi::from_u32(e.api)
                .map_or("unknown", |a| a.symbol())
                .to_string(),
            requested_bytes: e.size,
            error: cuda_error::name(e.result).into_owned(),
            code: e.result,
            thread: e.header.pid,
            stack: stacks.frames(pid, e.stack_id, &d.maps),
        });

        let allocations = (!d.allocations.is_empty() || d.kind == Kind::Cuda).then(|| {
            let mut a = Allocations {
                alloc_rate_per_s: d.rates.0,
                free_rate_per_s: d.rates.1,
                ..Default::default()
            };
            let classes: [(&str, u64); 5] = [
                ("< 1 MiB", 1 << 20),
                ("1-16 MiB", 16 << 20),
                ("16-256 MiB", 256 << 20),
                ("256 MiB-1 GiB", 1 << 30),
                (">= 1 GiB", u64::MAX),
            ];
            let mut by: Vec<SizeClass> = classes
                .iter()
                .map(|(c, _)| SizeClass {
                    class: c.to_string(),
                    count: 0,
                    bytes: 0,
                })
                .collect();
            for al in &d.allocations {
                a.count += 1;
                a.bytes += al.size;
                if d.ts_ns.saturating_sub(al.ts_ns) > OLD_NS {
                    a.old_count += 1;
                    a.old_bytes += al.size;
                }
                let i = classes
                    .iter()
                    .position(|(_, upper)| al.size < *upper)
                    .unwrap_or(classes.len() - 1);
                by[i].count += 1;
                by[i].bytes += al.size;
            }
            a.by_size_class = by;
            let mut largest: Vec<_> = d.allocations.clone();
            largest.sort_by(|x, y| y.size.cmp(&x.size).then(x.ts_ns.cmp(&y.ts_ns)));
            largest.truncate(LARGEST);
            a.largest = largest
                .iter()
                .map(|al| AllocationRow {
                    bytes: al.size,
                    api: al.api.symbol().to_string(),
                    gpu: al.device,
                    age_seconds: d.ts_ns.saturating_sub(al.ts_ns) as f64 / 1e9,
                    stack: stacks.frames(pid, al.stack_id, &d.maps),
                    stack_status: match (al.stack_walked, al.stack_id >= 0) {
                        (false, _) => StackStatus::NotSampled,
                        (true, true) => StackStatus::Walked,
                        (true, false) => StackStatus::Missed,
                    },
                })
                .collect();
            a
        });

        let mut timeline = Timeline {
            window_seconds: self.settings.timeline_secs,
            ..Default::default()
        };
        if let Some(g) = d.gpu {
            timeline.gpu = self
                .history
                .range(
                    g,
                    d.ts_ns.saturating_sub(window_ns),
                    d.ts_ns + 1_000_000_000,
                )
                .into_iter()
                .map(|s| GpuPoint {
                    t: rel(s.ts_ns),
                    memory_used_bytes: s.memory_used,
                    memory_total_bytes: s.memory_total,
                    utilization: s.utilization,
                    power_watts: s.power_mw.map(|p| f64::from(p) / 1000.0),
                    temperature_c: s.temperature_c,
                    throttle_reasons: s
                        .throttle
                        .map(|m| throttle::active(m).map(String::from).collect())
                        .unwrap_or_default(),
                })
                .collect();
        }
        timeline.processes = d
            .ledger
            .iter()
            .map(|s| ProcessSeries {
                pid: s.pid,
                comm: s.comm.clone(),
                points: s.points.iter().map(|(t, b)| (rel(*t), *b)).collect(),
            })
            .collect();
        timeline.failures = d
            .failures
            .iter()
            .map(|(t, p, api, size, error)| FailurePoint {
                t: rel(*t),
                pid: *p,
                api: api.clone(),
                requested_bytes: *size,
                error: error.clone(),
            })
            .collect();

        if let Some(load) = &self.load {
            timeline.requests = load
                .range(d.ts_ns.saturating_sub(window_ns), d.ts_ns + 1_000_000_000)
                .into_iter()
                .map(|(pid, pts)| RequestSeries {
                    pid,
                    comm: crate::proc::ProcFs::default().comm(pid).unwrap_or_default(),
                    points: pts.iter().map(|(t, n, b)| (rel(*t), *n, *b)).collect(),
                })
                .collect();
        }
        let exit = d.exit.map(|(code, signal)| ExitInfo {
            exit_code: code,
            signal: (signal != 0).then_some(signal),
            signal_name: (signal != 0).then(|| signal_name(signal)),
        });
        let host_oom = d.host_oom.map(|e| host_oom(&e, &d.process.cgroup));

        let mut report = Report {
            schema_version: SCHEMA_VERSION,
            id,
            kind: d.kind,
            time: rfc3339(d.wall),
            time_unix_ms: unix_ms,
            summary: String::new(),
            process: d.process,
            gpu,
            cuda,
            exit,
            host_oom,
            xid: d.xid,
            allocations,
            gpu_processes: d.gpu_processes,
            timeline,
            suppressed_before: d.suppressed_before,
            requests: None,
            python: None,
        };
        // Before anything is stored, logged or exported; the summary is made of the masked
        // parts.
        report.redact();
        report.summary = summary(&report);
        report
    }
}

/// The sentence at the top: what happened, how full the GPU was, who held it.
pub fn summary(r: &Report) -> String {
    let who = format!("pid {} ({})", r.process.pid, r.process.comm);
    let gpu_desc = r.gpu.as_ref().map(|g| {
        format!(
            "GPU {}{}",
            g.index,
            g.memory_total_bytes
                .map_or(String::new(), |t| format!(" ({})", bytes(t)))
        )
    });
    let mut s = match r.kind {
        Kind::Cuda => {
            let c = r.cuda.as_ref();
            format!(
                "{} of {} failed on {}",
                c.map_or("allocation", |c| c.api.as_str()),
                c.map_or("?".into(), |c| bytes(c.requested_bytes)),
                gpu_desc.clone().unwrap_or_else(|| "a GPU".into())
            )
        }
        Kind::GpuProcessCrash => {
            let how = r.exit.as_ref().map_or("exited".to_string(), |e| {
                match (&e.signal_name, e.exit_code) {
                    (Some(sig), _) => format!("was killed by {sig}"),
                    (None, Some(code)) => format!("exited with status {code}"),
                    _ => "exited".into(),
                }
            });
            format!("{who} {how} holding GPU memory")
        }
        Kind::HostOomKill => {
            let h = r.host_oom.as_ref();
            format!(
                "the kernel OOM killer killed {who} (rss {}{})",
                h.map_or("?".into(), |h| bytes(
                    h.anon_rss_bytes + h.file_rss_bytes + h.shmem_rss_bytes
                )),
                h.and_then(|h| h.cgroup_limit_bytes)
                    .map_or(String::new(), |l| format!(", cgroup limit {}", bytes(l)))
            )
        }
        Kind::Xid => format!(
            "XID {} on {}",
            r.xid.unwrap_or(0),
            gpu_desc.clone().unwrap_or_else(|| "a GPU".into())
        ),
    };
    if let Some(g) = &r.gpu {
        if let Some(used) = g.memory_used_bytes {
            s.push_str(&format!(": {} in use", bytes(used)));
        }
        if !g.throttle_reasons.is_empty() {
            s.push_str(&format!(", throttled ({})", g.throttle_reasons.join(", ")));
        }
    }
    if let Some(a) = &r.allocations {
        if a.count > 0 {
            s.push_str(&format!(
                ", {} held by {who} in {} allocations",
                bytes(a.bytes),
                a.count
            ));
            if a.old_count > 0 {
                s.push_str(&format!(
                    ", of which {} in {} allocations older than 10 minutes",
                    bytes(a.old_bytes),
                    a.old_count
                ));
            }
        }
    }
    let others: Vec<String> = r
        .gpu_processes
        .iter()
        .filter(|p| p.pid != r.process.pid && (p.ledger_bytes > 0 || p.nvml_bytes.unwrap_or(0) > 0))
        .map(|p| {
            format!(
                "pid {} ({}) {}",
                p.pid,
                p.comm,
                bytes(p.nvml_bytes.unwrap_or(p.ledger_bytes))
            )
        })
        .collect();
    if !others.is_empty() {
        s.push_str(&format!("; also on the GPU: {}", others.join(", ")));
    }
    // Requests in flight on the watched servers at the instant, and five minutes earlier.
    for srv in &r.timeline.requests {
        let now = srv.points.iter().rev().find(|(t, _, _)| *t <= 0.5);
        let before = srv
            .points
            .iter()
            .find(|(t, _, _)| (-300.0..=-240.0).contains(t))
            .map(|(_, n, _)| *n);
        if let Some((_, n, bytes)) = now {
            s.push_str(&format!(
                "; {n} requests in flight on pid {} ({}), {} of request bodies",
                srv.pid,
                srv.comm,
                super::render::bytes(*bytes)
            ));
            if let Some(b) = before {
                s.push_str(&format!(" (was {b} five minutes earlier)"));
            }
        }
    }
    if let Some(q) = &r.requests {
        let triggers: Vec<_> = q.in_flight.iter().filter(|x| x.likely_trigger).collect();
        if let Some(t) = triggers.last() {
            s.push_str(&format!(
                "; likely trigger: a {} request ({} prompt) that arrived {:.0} ms before",
                t.model,
                super::render::bytes(t.prompt_bytes),
                t.arrived_seconds_before * 1000.0
            ));
            if triggers.len() > 1 {
                s.push_str(&format!(" (and {} more)", triggers.len() - 1));
            }
        }
        if q.after_complete {
            s.push_str(&format!(
                "; {} requests failed in the {} s after",
                q.failed_after.len(),
                q.after_window_secs
            ));
        }
    }
    s
}

fn host_oom(e: &agent_common::oom::OomKillEvent, cgroup: &str) -> HostOom {
    let (limit, usage) = cgroup_memory(cgroup);
    let (total, available) = node_memory();
    HostOom {
        total_vm_bytes: e.total_vm_kb * 1024,
        anon_rss_bytes: e.anon_rss_kb * 1024,
        file_rss_bytes: e.file_rss_kb * 1024,
        shmem_rss_bytes: e.shmem_rss_kb * 1024,
        pgtables_bytes: e.pgtables_kb * 1024,
        oom_score_adj: e.oom_score_adj,
        uid: e.uid,
        cgroup_limit_bytes: limit,
        cgroup_usage_bytes: usage,
        node_memory_total_bytes: total,
        node_memory_available_bytes: available,
        largest_processes: largest_processes(5),
    }
}

/// Limit and usage of a memory cgroup path (v1 memory controller, else v2).
pub fn cgroup_memory(path: &str) -> (Option<u64>, Option<u64>) {
    // Unknown (the victim was gone before its cgroup could be read): never the root's figures.
    if path.is_empty() || path == "/" {
        return (None, None);
    }
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let rel = path.trim_start_matches('/');
    for (base, limit, usage) in [
        (
            "/sys/fs/cgroup/memory",
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
        ),
        ("/sys/fs/cgroup", "memory.max", "memory.current"),
        ("/sys/fs/cgroup/unified", "memory.max", "memory.current"),
    ] {
        let dir = Path::new(base).join(rel);
        let (l, u) = (read(&dir.join(limit)), read(&dir.join(usage)));
        if l.is_some() || u.is_some() {
            return (l, u);
        }
    }
    (None, None)
}

fn node_memory() -> (Option<u64>, Option<u64>) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn largest_processes(n: usize) -> Vec<RssRow> {
    let procfs = crate::proc::ProcFs::default();
    // SAFETY: no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let mut rows: Vec<RssRow> = procfs
        .pids()
        .filter_map(|pid| {
            let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
            let rss: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
            Some(RssRow {
                pid,
                comm: procfs.comm(pid).unwrap_or_default(),
                rss_bytes: rss * page,
            })
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.rss_bytes));
    rows.truncate(n);
    rows
}

pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

/// `2026-11-24T06:40:01.123Z`, without a date crate: civil-from-days (H. Hinnant).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn compact_time(t: SystemTime) -> String {
    rfc3339(t).replace(['-', ':'], "").replace('.', "")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::forensics::report::{GpuProcessRow, ProcessInfo};

    #[test]
    fn secrets_reach_neither_the_stored_report_nor_its_log_record() {
        let dir = tempfile::tempdir().unwrap();
        let forensics = dir.path().join("forensics");
        let (logs, log_rx) = crate::queue::with_items(1 << 20, 10, Default::default());
        let metrics = crate::forensics::metrics::ForensicsMetrics::new(&Arc::new(
            crate::metrics::Metrics::new(),
        ));
        let writer = Writer {
            store: Store::new(&forensics, 10, u64::MAX),
            stack_map: None,
            history: Arc::new(GpuHistory::new(60)),
            metrics: metrics.clone(),
            node: "node-1".into(),
            settings: Settings {
                max_reports: 10,
                max_bytes: u64::MAX,
                window_secs: 60,
                timeline_secs: 60,
            },
            seq: 0,
            load: None,
            requests: None,
            pending: Vec::new(),
            python: None,
            logs: Some(logs),
        };
        let draft = Draft {
            kind: Kind::GpuProcessCrash,
            ts_ns: 1,
            wall: SystemTime::now(),
            process: ProcessInfo {
                pid: 7,
                comm: "HF_TOKEN=s1".into(),
                cmdline: "server --api-key s2 --model https://u:s3@hub/m".into(),
                cgroup: String::new(),
                container_id: None,
                ..Default::default()
            },
            gpu: None,
            cuda: None,
            exit: Some((Some(1), 0)),
            host_oom: None,
            xid: None,
            allocations: Vec::new(),
            rates: (0.0, 0.0),
            gpu_processes: vec![GpuProcessRow {
                pid: 8,
                comm: "db_password=s5".into(),
                ledger_bytes: 1,
                nvml_bytes: None,
            }],
            ledger: Vec::new(),
            failures: Vec::new(),
            suppressed_before: 0,
            maps: Vec::new(),
        };
        let (tx, rx) = crate::queue::channel(crate::track::draft::QUEUE_BYTES, Default::default());
        assert!(tx.offer(draft));
        drop(tx);
        writer.run(rx, Heartbeat::default());

        let files: Vec<_> = std::fs::read_dir(&forensics)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let stored = std::fs::read_to_string(&files[0]).unwrap();
        let log = format!("{:?}", log_rx.try_recv().unwrap());
        for secret in ["s1", "s2", "s3", "s5"] {
            assert!(!stored.contains(secret), "{secret} stored: {stored}");
            assert!(!log.contains(secret), "{secret} in the log record: {log}");
        }
        assert!(stored.contains("--api-key ***") && stored.contains("pid 7 (HF_TOKEN=***)"));
        // The alerts find it by its id on this node.
        let id = files[0].file_stem().unwrap().to_str().unwrap();
        let text = metrics.core.encode();
        assert!(
            text.contains(&format!(
                "inferscope_forensics_last_report{{kind=\"gpu_process_crash\",id=\"{id}\",node=\"node-1\"}}"
            )),
            "{text}"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&files[0]), 0o600);
        assert_eq!(mode(&forensics), 0o700);
    }

    #[test]
    fn formats_times() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40.123Z");
        assert_eq!(compact_time(t), "20261118T110640123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}

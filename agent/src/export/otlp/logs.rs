//! Logs: forensic reports (`inferscope.oom` for out-of-memory and crash reports), XID errors
//! and failed CUDA calls (rate-limited per process) as OTLP log records.

use std::collections::HashMap;

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry_sdk::logs::{SdkLogRecord, SdkLogger, SdkLoggerProvider};

use super::queue::Sink;
use crate::forensics::report::{Kind, Report};

/// One log record, built by the producer (off the probe path) and batched by the exporter.
#[derive(Clone, Debug, PartialEq)]
pub struct LogItem {
    pub time_unix_nano: u64,
    pub severity: Severity,
    pub event_name: &'static str,
    pub body: String,
    pub attributes: Vec<(&'static str, AnyValue)>,
}

impl crate::queue::Weigh for LogItem {
    fn weight(&self) -> usize {
        size_of::<Self>()
            + self.body.capacity()
            + self.attributes.capacity() * size_of::<(&'static str, AnyValue)>()
            + self
                .attributes
                .iter()
                .map(|(_, v)| value_bytes(v))
                .sum::<usize>()
    }
}

/// Heap bytes of an attribute value.
fn value_bytes(v: &AnyValue) -> usize {
    match v {
        AnyValue::String(s) => s.as_str().len(),
        AnyValue::Bytes(b) => b.len(),
        AnyValue::ListAny(l) => l
            .iter()
            .map(|v| size_of::<AnyValue>() + value_bytes(v))
            .sum(),
        AnyValue::Map(m) => m
            .iter()
            .map(|(k, v)| k.as_str().len() + size_of::<AnyValue>() + value_bytes(v))
            .sum(),
        _ => 0,
    }
}

fn kv(key: &'static str, value: impl Into<AnyValue>) -> (&'static str, AnyValue) {
    (key, value.into())
}

fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A forensic report: `inferscope.oom` for the out-of-memory and crash kinds, else
/// `inferscope.forensics.report`.
pub fn report(r: &Report, path: Option<&std::path::Path>) -> LogItem {
    let event_name = match r.kind {
        Kind::Cuda | Kind::HostOomKill | Kind::GpuProcessCrash => "inferscope.oom",
        Kind::Xid => "inferscope.forensics.report",
    };
    let mut attributes = vec![
        kv("inferscope.report.id", r.id.clone()),
        kv("inferscope.report.kind", r.kind.as_str()),
        kv("process.pid", r.process.pid as i64),
        kv("process.executable.name", r.process.comm.clone()),
    ];
    if let Some(g) = &r.gpu {
        attributes.push(kv("hw.id", g.index.to_string()));
    }
    if let Some(x) = r.xid {
        attributes.push(kv("error.type", x.to_string()));
    }
    if let Some(p) = path {
        attributes.push(kv("inferscope.report.path", p.display().to_string()));
    }
    LogItem {
        time_unix_nano: r.time_unix_ms.saturating_mul(1_000_000),
        severity: Severity::Error,
        event_name,
        body: r.summary.clone(),
        attributes,
    }
}

pub fn xid(gpu: u32, uuid: &str, xid: u64) -> LogItem {
    LogItem {
        time_unix_nano: now_unix_nano(),
        severity: Severity::Error,
        event_name: "inferscope.gpu.xid",
        body: format!("XID {xid} on GPU {gpu}"),
        attributes: vec![
            kv("hw.id", gpu.to_string()),
            kv("inferscope.gpu.uuid", uuid.to_string()),
            kv("error.type", xid.to_string()),
        ],
    }
}

/// A failed CUDA driver call.
pub struct AllocFailure<'a> {
    pub pid: u32,
    pub comm: &'a str,
    pub api: &'static str,
    pub error: &'a str,
    pub size: u64,
    pub device: i32,
}

pub fn alloc_failure(f: &AllocFailure) -> LogItem {
    LogItem {
        time_unix_nano: now_unix_nano(),
        severity: Severity::Warn,
        event_name: "inferscope.cuda.alloc.failure",
        body: format!(
            "{} of {} bytes failed: {} (pid {})",
            f.api, f.size, f.error, f.pid
        ),
        attributes: vec![
            kv("process.pid", f.pid as i64),
            kv("process.executable.name", f.comm.to_string()),
            kv("inferscope.cuda.api", f.api),
            kv("error.type", f.error.to_string()),
            kv("inferscope.cuda.size", f.size as i64),
            kv("hw.id", f.device.to_string()),
        ],
    }
}

/// At most `per_sec` records per process per second; the rest are counted as dropped.
pub struct RateLimited {
    sink: Sink<LogItem>,
    per_sec: u32,
    /// pid → (second, records sent in it).
    windows: HashMap<u32, (u64, u32)>,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl RateLimited {
    pub fn new(
        sink: Sink<LogItem>,
        per_sec: u32,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            sink,
            per_sec,
            windows: HashMap::new(),
            dropped,
        }
    }

    /// Offers a record for `pid` at `now_ns` (any monotonic clock); `make` runs only when
    /// the record is within the rate.
    pub fn offer(&mut self, pid: u32, now_ns: u64, make: impl FnOnce() -> LogItem) {
        let second = now_ns / 1_000_000_000;
        if self.windows.len() > 4096 {
            self.windows.retain(|_, (s, _)| *s == second);
        }
        let w = self.windows.entry(pid).or_insert((second, 0));
        if w.0 != second {
            *w = (second, 0);
        }
        if w.1 >= self.per_sec {
            self.dropped.inc();
            return;
        }
        w.1 += 1;
        self.sink.offer(make());
    }
}

/// Makes the SDK's log records; records are only made here, never emitted through it
/// (the batching and the retries are the exporter task's).
pub struct Records {
    logger: SdkLogger,
}

impl Default for Records {
    fn default() -> Self {
        let provider = SdkLoggerProvider::builder().build();
        Self {
            logger: provider.logger_with_scope(super::transport::scope()),
        }
    }
}

impl Records {
    pub fn record(&self, item: &LogItem) -> SdkLogRecord {
        let mut r = self.logger.create_log_record();
        r.set_timestamp(
            std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_nanos(item.time_unix_nano),
        );
        r.set_observed_timestamp(std::time::SystemTime::now());
        r.set_severity_number(item.severity);
        r.set_severity_text(item.severity.name());
        r.set_event_name(item.event_name);
        r.set_body(AnyValue::String(item.body.clone().into()));
        r.add_attributes(item.attributes.iter().cloned());
        r
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn allocation_failures_are_rate_limited_per_process() {
        let dropped = Counter::default();
        let (sink, rx) = super::super::queue::channel(100, 1 << 20, Counter::default());
        let mut r = RateLimited::new(sink, 2, dropped.clone());
        let f = |pid| AllocFailure {
            pid,
            comm: "python",
            api: "cuMemAlloc_v2",
            error: "out_of_memory",
            size: 1 << 20,
            device: 0,
        };
        for i in 0..5 {
            r.offer(1, 1_000_000_000 + i, || alloc_failure(&f(1)));
        }
        r.offer(2, 1_000_000_000, || alloc_failure(&f(2)));
        r.offer(1, 2_000_000_000, || alloc_failure(&f(1)));
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(
            n, 4,
            "2 for pid 1, 1 for pid 2, 1 for pid 1 in the next second"
        );
        assert_eq!(dropped.get(), 3);
        let rec = opentelemetry_proto::tonic::logs::v1::LogRecord::from(
            &Records::default().record(&alloc_failure(&f(7))),
        );
        assert_eq!(rec.event_name, "inferscope.cuda.alloc.failure");
        assert_eq!(rec.severity_text, "WARN");
        assert_eq!(
            rec.severity_number,
            opentelemetry_proto::tonic::logs::v1::SeverityNumber::Warn as i32
        );
        let size = rec
            .attributes
            .iter()
            .find(|a| a.key == "inferscope.cuda.size")
            .and_then(|a| a.value.clone());
        assert_eq!(
            size.and_then(|v| v.value),
            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(1 << 20))
        );
    }
}

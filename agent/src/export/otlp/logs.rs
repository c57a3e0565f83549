//! Logs: the stages' notices (`crate::events`) as OTLP log records: forensic reports
//! (`inferscope.oom` for out-of-memory and crash reports), XID errors and failed CUDA calls
//! (rate-limited per process by the tracker).

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry_sdk::logs::{SdkLogRecord, SdkLogger, SdkLoggerProvider};

use crate::events::{AllocFailed, Notice, ReportWritten, XidError};

/// One log record's content, made from a notice by the exporter's batcher.
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

/// The record for a notice.
pub fn item(n: &Notice) -> LogItem {
    match n {
        Notice::AllocFailed(f) => alloc_failure(f),
        Notice::Xid(x) => xid(x),
        Notice::Report(r) => report(r),
    }
}

/// A forensic report: `inferscope.oom` for the out-of-memory and crash kinds, else
/// `inferscope.forensics.report`.
fn report(r: &ReportWritten) -> LogItem {
    let event_name = match r.kind {
        "xid" => "inferscope.forensics.report",
        _ => "inferscope.oom",
    };
    let mut attributes = vec![
        kv("inferscope.report.id", r.id.clone()),
        kv("inferscope.report.kind", r.kind),
        kv("process.pid", r.pid as i64),
        kv("process.executable.name", r.comm.clone()),
    ];
    if let Some(g) = r.gpu {
        attributes.push(kv("hw.id", g.to_string()));
    }
    if let Some(x) = r.xid {
        attributes.push(kv("error.type", x.to_string()));
    }
    if let Some(p) = &r.path {
        attributes.push(kv("inferscope.report.path", p.display().to_string()));
    }
    LogItem {
        time_unix_nano: r.time_unix_nano,
        severity: Severity::Error,
        event_name,
        body: r.summary.clone(),
        attributes,
    }
}

fn xid(x: &XidError) -> LogItem {
    LogItem {
        time_unix_nano: x.time_unix_nano,
        severity: Severity::Error,
        event_name: "inferscope.gpu.xid",
        body: format!("XID {} on GPU {}", x.xid, x.gpu),
        attributes: vec![
            kv("hw.id", x.gpu.to_string()),
            kv("inferscope.gpu.uuid", x.uuid.clone()),
            kv("error.type", x.xid.to_string()),
        ],
    }
}

fn alloc_failure(f: &AllocFailed) -> LogItem {
    LogItem {
        time_unix_nano: f.time_unix_nano,
        severity: Severity::Warn,
        event_name: "inferscope.cuda.alloc.failure",
        body: format!(
            "{} of {} bytes failed: {} (pid {})",
            f.api, f.size, f.error, f.pid
        ),
        attributes: vec![
            kv("process.pid", f.pid as i64),
            kv("process.executable.name", f.comm.clone()),
            kv("inferscope.cuda.api", f.api),
            kv("error.type", f.error.clone()),
            kv("inferscope.cuda.size", f.size as i64),
            kv("hw.id", f.device.to_string()),
        ],
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
    use super::*;

    #[test]
    fn a_failed_call_becomes_a_warning_record() {
        let n = Notice::AllocFailed(AllocFailed {
            time_unix_nano: 5,
            pid: 7,
            comm: "python".into(),
            api: "cuMemAlloc_v2",
            error: "out_of_memory".into(),
            size: 1 << 20,
            device: 0,
        });
        let rec = opentelemetry_proto::tonic::logs::v1::LogRecord::from(
            &Records::default().record(&item(&n)),
        );
        assert_eq!(rec.event_name, "inferscope.cuda.alloc.failure");
        assert_eq!(rec.time_unix_nano, 5);
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

    #[test]
    fn reports_are_named_by_kind() {
        let r = |kind| ReportWritten {
            time_unix_nano: 1,
            id: "r1".into(),
            kind,
            pid: 7,
            comm: "vllm".into(),
            gpu: Some(2),
            xid: None,
            path: None,
            summary: "s".into(),
        };
        for (kind, name) in [
            ("cuda", "inferscope.oom"),
            ("host_oom_kill", "inferscope.oom"),
            ("gpu_process_crash", "inferscope.oom"),
            ("xid", "inferscope.forensics.report"),
        ] {
            assert_eq!(item(&Notice::Report(r(kind))).event_name, name, "{kind}");
        }
    }
}

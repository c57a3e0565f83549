//! The forensics writer's series: reports written and failed, by kind (drafts dropped before
//! they reach the writer are the tracker's, `track::metrics`).

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};

use crate::{labels::KindLabels, metrics::Metrics};

pub struct ForensicsMetrics {
    /// The shared counters (outside input dropped).
    pub core: Arc<Metrics>,
    /// Reports by kind, every kind at 0 from the start.
    pub forensics_reports: Family<KindLabels, Counter>,
    pub forensics_errors: Family<KindLabels, Counter>,
    /// Requests of a server that failed in the window after a CUDA failure in it.
    pub failed_after: Counter,
    /// The latest report of each kind: one series per kind, replaced by the next.
    pub last_report: Family<LastReportLabels, Gauge>,
    last: std::sync::Mutex<std::collections::HashMap<&'static str, LastReportLabels>>,
}

/// What an alert needs to send its reader to a report: which one, and on which node's agent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LastReportLabels {
    pub kind: &'static str,
    pub id: String,
    pub node: String,
}

impl ForensicsMetrics {
    pub fn new(core: &Arc<Metrics>) -> Arc<Self> {
        let m = Self {
            core: core.clone(),
            forensics_reports: Family::default(),
            forensics_errors: Family::default(),
            failed_after: Counter::default(),
            last_report: Family::default(),
            last: Default::default(),
        };
        for kind in super::report::Kind::ALL {
            let _ = m.forensics_reports.get_or_create(&KindLabels {
                kind: kind.as_str(),
            });
        }
        core.register_with(|r| {
            r.register(
                "inferscope_forensics_reports",
                "Forensic reports produced, by kind",
                m.forensics_reports.clone(),
            );
            r.register(
                "inferscope_forensics_errors",
                "Forensic reports that could not be written to disk (kept in memory)",
                m.forensics_errors.clone(),
            );
            r.register(
                "inferscope_forensics_last_report",
                "The latest forensic report of each kind, by id and the node whose agent keeps it (Unix time it was written; the alerts' annotations name it)",
                m.last_report.clone(),
            );
            r.register(
                "inferscope_forensics_requests_failed_after",
                "Requests of an inference server that ended in a server error, a reset or a timeout in the window after a CUDA failure in it (forensics.after_failure_secs), added to that failure's report",
                m.failed_after.clone(),
            );
        });
        Arc::new(m)
    }
}

impl ForensicsMetrics {
    /// `id` is the latest report of `kind`, written at `unix_secs` on `node`.
    pub fn last_report(&self, kind: &'static str, id: &str, node: &str, unix_secs: i64) {
        let labels = LastReportLabels {
            kind,
            id: id.to_string(),
            node: node.to_string(),
        };
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = last.insert(kind, labels.clone()) {
            self.last_report.remove(&old);
        }
        self.last_report.get_or_create(&labels).set(unix_secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_last_report_per_kind() {
        let m = ForensicsMetrics::new(&Arc::new(Metrics::new()));
        m.last_report("cuda", "a", "n", 1);
        m.last_report("xid", "b", "n", 2);
        m.last_report("cuda", "c", "n", 3);
        let text = m.core.encode();
        let mut series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("inferscope_forensics_last_report{"))
            .collect();
        series.sort_unstable();
        // The first cuda report's series went with the second.
        assert_eq!(
            series,
            [
                "inferscope_forensics_last_report{kind=\"cuda\",id=\"c\",node=\"n\"} 3",
                "inferscope_forensics_last_report{kind=\"xid\",id=\"b\",node=\"n\"} 2"
            ],
            "{text}"
        );
    }
}

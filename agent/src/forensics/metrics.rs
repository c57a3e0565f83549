//! The forensics writer's series: reports written and failed, by kind (drafts dropped before
//! they reach the writer are the tracker's, `track::metrics`).

use std::sync::Arc;

use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::{labels::KindLabels, metrics::Metrics};

pub struct ForensicsMetrics {
    /// The shared counters (outside input dropped).
    pub core: Arc<Metrics>,
    /// Reports by kind, every kind at 0 from the start.
    pub forensics_reports: Family<KindLabels, Counter>,
    pub forensics_errors: Family<KindLabels, Counter>,
    /// Requests of a server that failed in the window after a CUDA failure in it.
    pub failed_after: Counter,
}

impl ForensicsMetrics {
    pub fn new(core: &Arc<Metrics>) -> Arc<Self> {
        let m = Self {
            core: core.clone(),
            forensics_reports: Family::default(),
            forensics_errors: Family::default(),
            failed_after: Counter::default(),
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
                "inferscope_forensics_requests_failed_after",
                "Requests of an inference server that ended in a server error, a reset or a timeout in the window after a CUDA failure in it (forensics.after_failure_secs), added to that failure's report",
                m.failed_after.clone(),
            );
        });
        Arc::new(m)
    }
}

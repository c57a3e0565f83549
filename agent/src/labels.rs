//! Label sets that several stages' metric families share, defined once.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};

/// What a count is about: a source of telemetry, an export signal's origin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

/// Why something was counted (an error, a drop).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Which kind of thing was counted (a report kind, a bad-input kind).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// The workload labels every per-process series carries. Empty values are left out of the
/// exposition (Prometheus treats an empty label as absent), so outside Kubernetes the series
/// keep their process labels only.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct WorkloadLabels {
    pub node: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl EncodeLabelSet for WorkloadLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        for (k, v) in [
            ("node", &self.node),
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("container", &self.container),
        ] {
            if !v.is_empty() {
                (k, v.as_str()).encode(encoder.encode_label())?;
            }
        }
        Ok(())
    }
}

/// [`WorkloadLabels`] behind an `Arc`, for the label sets built per CUDA event and per NVML
/// sample: cloning one copies a pointer, not four strings. Encodes, hashes and compares as
/// the labels it holds.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct SharedWorkload(pub Arc<WorkloadLabels>);

impl From<WorkloadLabels> for SharedWorkload {
    fn from(labels: WorkloadLabels) -> Self {
        SharedWorkload(Arc::new(labels))
    }
}

impl EncodeLabelSet for SharedWorkload {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

//! Label sets that several stages' metric families share, defined once.

use prometheus_client::encoding::EncodeLabelSet;

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

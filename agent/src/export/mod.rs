//! Exporters, the top of the pipeline: the Prometheus listener (`http`, serving the registry
//! of `crate::metrics`) and OTLP (`otlp`, turning the stages' plain events into spans and
//! log records).

pub mod http;
pub mod otlp;

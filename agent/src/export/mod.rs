//! Exporters: the metric catalogue (`metrics`), the Prometheus listener (`http`) and OTLP
//! (`otlp`).

pub mod http;
pub mod metrics;
pub mod otlp;

//! Exporters: the metric catalogue (`metrics`) and the Prometheus listener (`http`).

pub mod http;
pub mod metrics;

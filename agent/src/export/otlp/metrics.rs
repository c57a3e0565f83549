//! Metrics over OTLP: a snapshot of the Prometheus registry (the single source of truth,
//! re-exported server metrics included), renamed through [`MAPPING`] and sent as cumulative
//! sums, gauges and explicit-bucket histograms. A push that fails loses nothing: the next one
//! carries the same cumulative totals.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{InstrumentationScope, KeyValue},
    metrics::v1::{
        metric::Data, number_data_point, AggregationTemporality, Gauge, Histogram,
        HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    },
    resource::v1::Resource,
};
use prometheus_client::{
    encoding::prometheus_protobuf::prometheus_data_model as pm, registry::Registry,
};

use super::kv;

/// One Prometheus family under its OpenTelemetry name.
pub struct Mapping {
    pub prometheus: &'static str,
    pub otel: &'static str,
    pub unit: &'static str,
    /// Attributes added to every point (families merged into one OTel metric differ by them).
    pub extra: &'static [(&'static str, &'static str)],
}

const fn m(prometheus: &'static str, otel: &'static str, unit: &'static str) -> Mapping {
    Mapping {
        prometheus,
        otel,
        unit,
        extra: &[],
    }
}

/// Prometheus family (as on `/metrics`: counters with `_total`) → OpenTelemetry metric.
/// Semantic-convention names where one exists; docs/metrics.md shows the same table.
pub const MAPPING: &[Mapping] = &[
    m("llm_latency_seconds", "gen_ai.server.request.duration", "s"),
    m(
        "llm_time_to_first_token_seconds",
        "gen_ai.server.time_to_first_token",
        "s",
    ),
    m(
        "llm_time_per_output_token_seconds",
        "gen_ai.server.time_per_output_token",
        "s",
    ),
    Mapping {
        prometheus: "llm_request_input_tokens",
        otel: "gen_ai.client.token.usage",
        unit: "{token}",
        extra: &[("gen_ai.token.type", "input")],
    },
    Mapping {
        prometheus: "llm_request_output_tokens",
        otel: "gen_ai.client.token.usage",
        unit: "{token}",
        extra: &[("gen_ai.token.type", "output")],
    },
    Mapping {
        prometheus: "llm_tokens_input_total",
        otel: "inferscope.gen_ai.tokens",
        unit: "{token}",
        extra: &[("gen_ai.token.type", "input")],
    },
    Mapping {
        prometheus: "llm_tokens_output_total",
        otel: "inferscope.gen_ai.tokens",
        unit: "{token}",
        extra: &[("gen_ai.token.type", "output")],
    },
    m(
        "llm_requests_total",
        "inferscope.gen_ai.requests",
        "{request}",
    ),
    m(
        "llm_request_errors_total",
        "inferscope.gen_ai.request.errors",
        "{request}",
    ),
    m(
        "llm_requests_in_flight",
        "inferscope.gen_ai.requests.in_flight",
        "{request}",
    ),
    m("gpu_utilization", "hw.gpu.utilization", "1"),
    m("gpu_memory_utilization", "hw.gpu.memory.utilization", "1"),
    m("gpu_memory_used_bytes", "hw.gpu.memory.usage", "By"),
    m("gpu_memory_total_bytes", "hw.gpu.memory.limit", "By"),
    m("gpu_power_watts", "hw.power", "W"),
    m("gpu_energy_joules_total", "hw.energy", "J"),
    m("gpu_temperature_celsius", "hw.temperature", "Cel"),
    m("gpu_xid_errors_total", "hw.errors", "{error}"),
    m(
        "gpu_cuda_alloc_calls_total",
        "inferscope.cuda.alloc.calls",
        "{call}",
    ),
    m(
        "gpu_cuda_alloc_bytes_total",
        "inferscope.cuda.alloc.bytes",
        "By",
    ),
    m(
        "gpu_cuda_alloc_failures_total",
        "inferscope.cuda.alloc.failures",
        "{call}",
    ),
    m(
        "gpu_cuda_alloc_latency_seconds",
        "inferscope.cuda.alloc.duration",
        "s",
    ),
    m(
        "gpu_process_memory_allocated_bytes",
        "inferscope.cuda.memory.allocated",
        "By",
    ),
    m("llm_oom_events_total", "inferscope.oom.events", "{event}"),
];

/// Label → attribute renames, for every family except the servers' own (`vllm:*`, `tgi_*`).
pub const ATTRIBUTES: &[(&str, &str)] = &[
    ("model", "gen_ai.request.model"),
    ("status_code", "http.response.status_code"),
    ("error_type", "error.type"),
    ("gpu", "hw.id"),
    ("gpu_type", "hw.model"),
    ("gpu_uuid", "inferscope.gpu.uuid"),
    ("xid", "error.type"),
    ("pid", "process.pid"),
    ("comm", "process.executable.name"),
    ("namespace", "k8s.namespace.name"),
    ("pod", "k8s.pod.name"),
    ("container", "k8s.container.name"),
    ("node", "k8s.node.name"),
];

/// Metrics re-exported from the servers keep their names and labels.
fn passthrough(name: &str) -> bool {
    name.starts_with("vllm:") || name.starts_with("tgi_")
}

/// (OTel name, unit, extra attributes) of a Prometheus family.
pub fn otel_name(
    prometheus: &str,
) -> (
    std::borrow::Cow<'static, str>,
    &'static str,
    &'static [(&'static str, &'static str)],
) {
    if let Some(m) = MAPPING.iter().find(|m| m.prometheus == prometheus) {
        return (m.otel.into(), m.unit, m.extra);
    }
    if passthrough(prometheus) {
        return (prometheus.to_string().into(), "", &[]);
    }
    let unit = if prometheus.ends_with("_seconds") {
        "s"
    } else if prometheus.ends_with("_bytes") {
        "By"
    } else {
        ""
    };
    let rest = prometheus.strip_prefix("inferscope_").unwrap_or(prometheus);
    let rest = rest.strip_suffix("_total").unwrap_or(rest);
    (format!("inferscope.{rest}").into(), unit, &[])
}

pub fn attribute_name(prometheus_family: &str, label: &str) -> String {
    if passthrough(prometheus_family) {
        return label.to_string();
    }
    ATTRIBUTES
        .iter()
        .find(|(l, _)| *l == label)
        .map_or_else(|| label.to_string(), |(_, a)| a.to_string())
}

/// Wall-clock times of a snapshot.
#[derive(Clone, Copy, Debug)]
pub struct Times {
    /// When the agent started (start of every cumulative series).
    pub start_unix_nano: u64,
    pub now_unix_nano: u64,
}

/// Builds one export request from the registry's current values.
pub fn snapshot(
    registry: &Registry,
    resource: &[(String, String)],
    times: Times,
) -> Result<ExportMetricsServiceRequest, std::fmt::Error> {
    let families = prometheus_client::encoding::prometheus_protobuf::encode(registry)?;
    Ok(request(&families, resource, times))
}

pub fn request(
    families: &[pm::MetricFamily],
    resource: &[(String, String)],
    times: Times,
) -> ExportMetricsServiceRequest {
    // Families mapped onto one OTel metric are merged; the order of first appearance is kept.
    let mut metrics: Vec<Metric> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for family in families {
        let Some(data) = family_data(family, times) else {
            continue;
        };
        let (name, unit, _) = otel_name(&family.name);
        match index.get(name.as_ref()) {
            Some(&i) => merge(&mut metrics[i].data, data),
            None => {
                index.insert(name.to_string(), metrics.len());
                metrics.push(Metric {
                    name: name.into_owned(),
                    description: family.help.clone(),
                    unit: unit.to_string(),
                    data: Some(data),
                    ..Default::default()
                });
            }
        }
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| kv(k, v.as_str())).collect(),
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "inferscope".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

fn merge(into: &mut Option<Data>, from: Data) {
    match (into, from) {
        (Some(Data::Sum(a)), Data::Sum(b)) => a.data_points.extend(b.data_points),
        (Some(Data::Gauge(a)), Data::Gauge(b)) => a.data_points.extend(b.data_points),
        (Some(Data::Histogram(a)), Data::Histogram(b)) => a.data_points.extend(b.data_points),
        // Two families of different types under one name would be a mapping bug: the first wins.
        _ => {}
    }
}

fn attributes(family: &pm::MetricFamily, labels: &[pm::LabelPair]) -> Vec<KeyValue> {
    let (_, _, extra) = otel_name(&family.name);
    let mut out: Vec<KeyValue> = labels
        .iter()
        .map(|l| {
            let key = attribute_name(&family.name, &l.name);
            match key.as_str() {
                // Integers in the conventions (`process.pid`, `http.response.status_code`).
                "process.pid" | "http.response.status_code" => match l.value.parse::<i64>() {
                    Ok(i) => kv(&key, i),
                    Err(_) => kv(&key, l.value.as_str()),
                },
                _ => kv(&key, l.value.as_str()),
            }
        })
        .collect();
    out.extend(extra.iter().map(|(k, v)| kv(k, *v)));
    out
}

fn family_data(family: &pm::MetricFamily, t: Times) -> Option<Data> {
    let kind = pm::MetricType::try_from(family.r#type).unwrap_or(pm::MetricType::Untyped);
    let mut numbers = Vec::new();
    let mut histograms = Vec::new();
    for metric in &family.metric {
        let attributes = attributes(family, &metric.label);
        let value = metric
            .counter
            .as_ref()
            .map(|c| c.value)
            .or(metric.gauge.as_ref().map(|g| g.value))
            .or(metric.untyped.as_ref().map(|u| u.value));
        if let Some(h) = &metric.histogram {
            // Cumulative bucket counts (the last one +Inf) → OTLP's per-bucket counts.
            let mut explicit_bounds = Vec::with_capacity(h.bucket.len());
            let mut bucket_counts = Vec::with_capacity(h.bucket.len() + 1);
            let mut below = 0u64;
            for b in &h.bucket {
                if b.upper_bound.is_finite() {
                    explicit_bounds.push(b.upper_bound);
                    bucket_counts.push(b.cumulative_count.saturating_sub(below));
                    below = b.cumulative_count;
                }
            }
            bucket_counts.push(h.sample_count.saturating_sub(below));
            histograms.push(HistogramDataPoint {
                attributes,
                start_time_unix_nano: t.start_unix_nano,
                time_unix_nano: t.now_unix_nano,
                count: h.sample_count,
                sum: Some(h.sample_sum),
                bucket_counts,
                explicit_bounds,
                ..Default::default()
            });
        } else if let Some(v) = value {
            numbers.push(NumberDataPoint {
                attributes,
                start_time_unix_nano: t.start_unix_nano,
                time_unix_nano: t.now_unix_nano,
                value: Some(number_data_point::Value::AsDouble(v)),
                ..Default::default()
            });
        }
        // Summaries (none registered by the agent) have no OTLP equivalent worth converting.
    }
    let cumulative = AggregationTemporality::Cumulative as i32;
    match kind {
        pm::MetricType::Counter => Some(Data::Sum(Sum {
            data_points: numbers,
            aggregation_temporality: cumulative,
            is_monotonic: true,
        })),
        pm::MetricType::Histogram | pm::MetricType::GaugeHistogram => {
            Some(Data::Histogram(Histogram {
                data_points: histograms,
                aggregation_temporality: cumulative,
            }))
        }
        pm::MetricType::Gauge | pm::MetricType::Untyped => Some(Data::Gauge(Gauge {
            data_points: numbers,
        })),
        pm::MetricType::Summary => None,
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::{
        counter::Counter, family::Family, gauge::Gauge as PGauge, histogram::Histogram as PHist,
    };

    use super::*;
    use crate::{
        gpu::metrics::{GpuLabels, GpuMetrics},
        http::metrics::HttpMetrics,
        metrics::{GaugeF, Metrics},
    };

    fn attr<'a>(
        attrs: &'a [KeyValue],
        k: &str,
    ) -> Option<&'a opentelemetry_proto::tonic::common::v1::any_value::Value> {
        attrs
            .iter()
            .find(|a| a.key == k)
            .and_then(|a| a.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    const T: Times = Times {
        start_unix_nano: 1,
        now_unix_nano: 2,
    };

    #[test]
    fn catalogue_names_map_to_the_conventions() {
        assert_eq!(otel_name("gpu_utilization").0, "hw.gpu.utilization");
        assert_eq!(
            otel_name("llm_latency_seconds").0,
            "gen_ai.server.request.duration"
        );
        assert_eq!(otel_name("inferscope_events_total").0, "inferscope.events");
        assert_eq!(
            otel_name("gpu_sm_clock_hertz").0,
            "inferscope.gpu_sm_clock_hertz"
        );
        assert_eq!(otel_name("gpu_memory_free_bytes").1, "By");
        assert_eq!(
            otel_name("vllm:num_requests_running").0,
            "vllm:num_requests_running"
        );
        assert_eq!(
            attribute_name("llm_requests_total", "model"),
            "gen_ai.request.model"
        );
        assert_eq!(attribute_name("vllm:x", "model"), "model");
        // Every mapped family is in the catalogue (a family without series is not encoded,
        // so the documented catalogue is the reference).
        let doc = include_str!("../../../../docs/metrics.md");
        let catalogue = doc.split("## OTLP names").next().unwrap_or(doc);
        for m in MAPPING {
            assert!(
                catalogue.contains(&format!("`{}`", m.prometheus)),
                "{} is not in docs/metrics.md",
                m.prometheus
            );
        }
    }

    #[test]
    fn values_types_and_buckets() {
        let metrics = std::sync::Arc::new(Metrics::new());
        let gpus = GpuMetrics::new(&metrics);
        let http = HttpMetrics::new(&metrics);
        let gpu = GpuLabels {
            gpu: 1,
            gpu_uuid: "GPU-1".into(),
            gpu_type: "H100".into(),
        };
        gpus.gpu_utilization.get_or_create(&gpu).set(0.75);
        gpus.gpu_temperature.get_or_create(&gpu).set(61);
        let labels = crate::http::metrics::ModelLabels {
            model: "llama".into(),
        };
        http.tokens_input.get_or_create(&labels).inc_by(40);
        http.tokens_output.get_or_create(&labels).inc_by(7);
        let lat = http.latency.get_or_create(&labels);
        lat.observe(0.003);
        lat.observe(0.2);
        lat.observe(1e6);
        let req = metrics
            .read(|r| snapshot(r, &[("service.name".into(), "x".into())], T))
            .unwrap();
        let rm = &req.resource_metrics[0];
        assert_eq!(
            attr(&rm.resource.as_ref().unwrap().attributes, "service.name"),
            Some(
                &opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue("x".into())
            )
        );
        let ms = &rm.scope_metrics[0].metrics;
        let find = |n: &str| {
            ms.iter()
                .find(|m| m.name == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        let Some(Data::Gauge(g)) = &find("hw.gpu.utilization").data else {
            panic!("not a gauge")
        };
        assert_eq!(
            g.data_points[0].value,
            Some(number_data_point::Value::AsDouble(0.75))
        );
        assert!(matches!(
            attr(&g.data_points[0].attributes, "hw.id"),
            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) if s == "1"
        ));
        let Some(Data::Sum(s)) = &find("inferscope.gen_ai.tokens").data else {
            panic!("not a sum")
        };
        assert!(s.is_monotonic);
        assert_eq!(
            s.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let mut v: Vec<_> = s
            .data_points
            .iter()
            .map(|p| {
                (
                    format!("{:?}", attr(&p.attributes, "gen_ai.token.type")),
                    p.value,
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(v[0].1, Some(number_data_point::Value::AsDouble(40.0)));
        assert_eq!(v[1].1, Some(number_data_point::Value::AsDouble(7.0)));
        let Some(Data::Histogram(h)) = &find("gen_ai.server.request.duration").data else {
            panic!("not a histogram")
        };
        let p = &h.data_points[0];
        assert_eq!(find("gen_ai.server.request.duration").unit, "s");
        assert_eq!(p.count, 3);
        assert!((p.sum.unwrap() - (0.203 + 1e6)).abs() < 1e-6);
        assert_eq!(p.explicit_bounds.first(), Some(&0.005));
        assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1);
        assert_eq!(p.bucket_counts[0], 1);
        assert_eq!(*p.bucket_counts.last().unwrap(), 1, "+Inf bucket");
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), 3);
        assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (1, 2));
    }

    #[test]
    fn foreign_families_pass_through() {
        let mut r = Registry::default();
        let f: Family<Vec<(String, String)>, Counter> = Family::default();
        f.get_or_create(&vec![("model".into(), "m".into())])
            .inc_by(3);
        r.register("vllm:prompt_tokens", "x", f);
        let g: Family<Vec<(String, String)>, GaugeF> = Family::default();
        g.get_or_create(&vec![("gpu".into(), "0".into())]).set(2.5);
        r.register("gpu_sm_clock_hertz", "x", g);
        let h: PHist = PHist::new([1.0]);
        h.observe(3.0);
        r.register("other_seconds", "x", h);
        let i: PGauge = PGauge::default();
        r.register("inferscope_tracked_processes", "x", i);
        let req = snapshot(&r, &[], T).unwrap();
        let names: Vec<_> = req.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .map(|m| (m.name.as_str(), m.unit.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("vllm:prompt_tokens_total", ""),
                ("inferscope.gpu_sm_clock_hertz", ""),
                ("inferscope.other_seconds", "s"),
                ("inferscope.tracked_processes", "")
            ]
        );
        let m = &req.resource_metrics[0].scope_metrics[0].metrics[0];
        let Some(Data::Sum(s)) = &m.data else {
            panic!()
        };
        assert!(attr(&s.data_points[0].attributes, "model").is_some());
    }
}

//! A server's `/metrics` body (Prometheus text format 0.0.4, as vLLM's `prometheus_client`,
//! TGI's `metrics-exporter-prometheus` and SGLang write it) → families ready to be encoded
//! again as OpenMetrics, with the target's labels added ([`ingest`], the fuzzed entry point).
//!
//! OpenMetrics names a counter family without `_total` and its sample with it, so a counter
//! `x_total` becomes family `x` (its sample keeps the name `x_total`); a counter named without
//! `_total` (TGI's) gets the suffix. Untyped families become gauges (the 0.0.4 parsers in
//! `promtool` reject `unknown`). Summaries are dropped (the encoder has no summary type), and
//! so are `prometheus_client`'s `_created` gauges that stand beside a counter or histogram.

use std::collections::{BTreeMap, HashSet};

use openmetrics_parser::{
    prometheus::parse_prometheus, MetricNumber, PrometheusType, PrometheusValue,
};

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not Prometheus text format: {0}")]
    Syntax(String),
    #[error(
        "more than {limit} samples in the body, or {MAX_FAMILY_LINES} in a row without a `#` line"
    )]
    TooManySamples { limit: usize },
}

impl ParseError {
    /// The `reason` label of `inferscope_scrape_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::Syntax(_) => "parse",
            ParseError::TooManySamples { .. } => "max_series",
        }
    }
}

/// The parser finds each sample's series by a linear search of its family: a family of n
/// series costs n² (5,000: 0.2 s; 200,000: minutes). Runs of sample lines are bounded before
/// parsing, so one body costs at most `max_samples / MAX_FAMILY_LINES` such families.
pub const MAX_FAMILY_LINES: usize = 4096;

/// Counts sample lines (the body as a whole and in runs between `#` lines) without parsing.
fn check_size(text: &str, max_samples: usize) -> Result<(), ParseError> {
    let (mut total, mut run) = (0usize, 0usize);
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with('#') {
            run = 0;
        } else if !line.is_empty() {
            total += 1;
            run += 1;
            if total > max_samples || run > MAX_FAMILY_LINES {
                return Err(ParseError::TooManySamples { limit: max_samples });
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Counter(f64),
    Gauge(f64),
    /// Per-bucket (not cumulative) counts by upper bound, the last one `+Inf`.
    Histogram {
        sum: f64,
        buckets: Vec<(f64, u64)>,
    },
}

pub type Labels = Vec<(String, String)>;

#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub labels: Labels,
    pub value: Value,
}

/// One family, named as OpenMetrics names it.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: Kind,
    pub help: String,
    pub series: Vec<Series>,
}

impl Family {
    /// The value of a counter or gauge series.
    pub fn scalars(&self) -> impl Iterator<Item = (&Labels, f64)> {
        self.series.iter().filter_map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) => Some((&s.labels, v)),
            Value::Histogram { .. } => None,
        })
    }
}

/// A family left out: (name, why).
pub type Skipped = (String, &'static str);

/// Bounds on one body.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sample lines in the body; a larger body is refused before parsing.
    pub max_samples: usize,
    /// Series kept (whole families, in name order); the rest is counted.
    pub max_series: usize,
}

/// What one scrape gave, after limits.
#[derive(Debug, Default, PartialEq)]
pub struct Ingested {
    /// Sorted by name, labels relabelled.
    pub families: Vec<Family>,
    /// The families as the server wrote them (before relabelling), for the derived series.
    pub original: Vec<Family>,
    pub skipped: Vec<Skipped>,
    /// Series left out by `max_series`.
    pub truncated: usize,
}

/// Parses a body and adds `target` labels to every series; at most `max_series` series are
/// kept (whole families, in name order). A scraped label that has the name of a target label
/// is kept as `exported_<name>`.
/// `target` gives the labels once the families are known (the server kind may be told by
/// its metric names).
pub fn ingest(
    text: &str,
    target: impl FnOnce(&[Family]) -> Vec<(&'static str, String)>,
    limits: Limits,
) -> Result<Ingested, ParseError> {
    check_size(text, limits.max_samples)?;
    let max_series = limits.max_series;
    let (original, mut skipped) = parse(text)?;
    let target = target(&original);
    let target = target.as_slice();
    let mut families = Vec::new();
    let mut kept = 0usize;
    let mut truncated = 0usize;
    for f in &original {
        if RESERVED_PREFIXES.iter().any(|p| f.name.starts_with(p)) {
            skipped.push((f.name.clone(), "reserved_name"));
            continue;
        }
        if kept + f.series.len() > max_series {
            truncated += f.series.len();
            continue;
        }
        kept += f.series.len();
        families.push(relabel(f, target));
    }
    Ok(Ingested {
        families,
        original,
        skipped,
        truncated,
    })
}

/// Name prefixes of the agent's own catalogue: a scraped family of that name would make two
/// families of one name in the exposition.
const RESERVED_PREFIXES: &[&str] = &["inferscope_", "llm_", "gpu_"];

fn relabel(f: &Family, target: &[(&str, String)]) -> Family {
    let mut seen = HashSet::new();
    let series = f
        .series
        .iter()
        .filter_map(|s| {
            let mut labels: Labels = target
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect();
            for (k, v) in &s.labels {
                if target.iter().any(|(t, _)| t == k) {
                    labels.push((format!("exported_{k}"), v.clone()));
                } else {
                    labels.push((k.clone(), v.clone()));
                }
            }
            // Two series that differ only by a renamed label would collide; keep the first.
            seen.insert(labels.clone()).then(|| Series {
                labels,
                value: s.value.clone(),
            })
        })
        .collect();
    Family {
        name: f.name.clone(),
        kind: f.kind,
        help: f.help.clone(),
        series,
    }
}

/// The families of a body, sorted by name, and those left out.
pub fn parse(text: &str) -> Result<(Vec<Family>, Vec<Skipped>), ParseError> {
    if text.trim().is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let exposition = parse_prometheus(text).map_err(|e| ParseError::Syntax(format!("{e:?}")))?;
    let mut out = BTreeMap::new();
    let mut skipped = Vec::new();
    let names: HashSet<&String> = exposition.families.keys().collect();
    for (name, family) in &exposition.families {
        let kind = match family.family_type {
            PrometheusType::Counter => Kind::Counter,
            PrometheusType::Gauge | PrometheusType::Unknown => Kind::Gauge,
            PrometheusType::Histogram => Kind::Histogram,
            PrometheusType::Summary => {
                skipped.push((name.clone(), "summary"));
                continue;
            }
        };
        if let Some(base) = name.strip_suffix("_created") {
            let total = format!("{base}_total");
            if kind == Kind::Gauge && (names.contains(&total) || names.contains(&base.to_string()))
            {
                continue;
            }
        }
        let label_names = family.get_label_names();
        let mut series = Vec::new();
        for sample in family.iter_samples() {
            let Ok(set) = sample.get_labelset() else {
                continue;
            };
            let labels: Labels = set
                .iter()
                .filter(|(k, _)| !label_names.is_empty() || !k.is_empty())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let value = match (&sample.value, kind) {
                (PrometheusValue::Counter(c), Kind::Counter) => Value::Counter(number(&c.value)),
                (PrometheusValue::Gauge(g), Kind::Gauge)
                | (PrometheusValue::Unknown(g), Kind::Gauge) => Value::Gauge(number(g)),
                (PrometheusValue::Histogram(h), Kind::Histogram) => {
                    let mut cumulative: Vec<(f64, f64)> = h
                        .buckets
                        .iter()
                        .map(|b| (b.upper_bound, number(&b.count)))
                        .filter(|(le, _)| !le.is_nan())
                        .collect();
                    cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let count = h.count.map(|c| c as f64);
                    Value::Histogram {
                        sum: h.sum.as_ref().map(number).unwrap_or(0.0),
                        buckets: per_bucket(&cumulative, count),
                    }
                }
                _ => continue,
            };
            series.push(Series { labels, value });
        }
        let om_name = match kind {
            Kind::Counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name.as_str(),
        };
        out.insert(
            om_name.to_string(),
            Family {
                name: om_name.to_string(),
                kind,
                help: help_text(&family.help),
                series,
            },
        );
    }
    Ok((out.into_values().collect(), skipped))
}

fn number(n: &MetricNumber) -> f64 {
    n.as_f64()
}

/// Cumulative buckets → per-bucket counts ending in `+Inf` (added when the server left it out).
fn per_bucket(cumulative: &[(f64, f64)], count: Option<f64>) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(cumulative.len() + 1);
    let mut previous = 0u64;
    for (le, c) in cumulative {
        // `as` saturates (NaN → 0); a count below the previous bucket's is a server bug.
        let c = (*c as u64).max(previous);
        out.push((*le, c - previous));
        previous = c;
    }
    if out.last().is_none_or(|(le, _)| *le != f64::INFINITY) {
        let total = count.map(|c| c as u64).unwrap_or(previous).max(previous);
        out.push((f64::INFINITY, total - previous));
    }
    out
}

/// HELP text that both the OpenMetrics and the 0.0.4 parsers accept: backslashes and line
/// breaks escaped, double quotes (escaped in one, not in the other) replaced.
fn help_text(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' => out.push('\''),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str =
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{engine=\"0\",model_name=\"m1\"} 3.0\n\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n\
# TYPE vllm:prompt_tokens_total counter\n\
vllm:prompt_tokens_total{engine=\"0\",model_name=\"we\\\"ird\\\\x\\ny\"} 17.0\n\
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.\n\
# TYPE vllm:prompt_tokens_created gauge\n\
vllm:prompt_tokens_created{engine=\"0\",model_name=\"we\\\"ird\\\\x\\ny\"} 1.79e+09\n\
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.\n\
# TYPE vllm:time_to_first_token_seconds histogram\n\
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.001\",model_name=\"m1\"} 0.0\n\
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.5\",model_name=\"m1\"} 1.0\n\
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"1.0\",model_name=\"m1\"} 3.0\n\
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"+Inf\",model_name=\"m1\"} 4.0\n\
vllm:time_to_first_token_seconds_count{engine=\"0\",model_name=\"m1\"} 4.0\n\
vllm:time_to_first_token_seconds_sum{engine=\"0\",model_name=\"m1\"} 2.2\n\
# HELP tgi_request_count Requests\n\
# TYPE tgi_request_count counter\n\
tgi_request_count 5\n\
# HELP lat A summary\n\
# TYPE lat summary\n\
lat{quantile=\"0.5\"} 1\n\
lat_sum 1\n\
lat_count 1\n\
# TYPE llm_batch_size gauge\n\
llm_batch_size 9\n\
# TYPE untyped_thing untyped\n\
untyped_thing{server=\"x\"} 4\n";

    fn limits(max_series: usize) -> Limits {
        Limits {
            max_samples: 10_000,
            max_series,
        }
    }

    #[test]
    fn bodies_too_large_to_parse_quickly_are_refused_unparsed() {
        let run = |n: usize| {
            let mut body = String::from("# TYPE p gauge\n");
            for i in 0..n {
                body.push_str(&format!("p{{i=\"{i}\"}} 1\n"));
            }
            body
        };
        assert!(ingest(&run(MAX_FAMILY_LINES), |_| vec![], limits(1 << 20)).is_ok());
        let e = ingest(&run(MAX_FAMILY_LINES + 1), |_| vec![], limits(1 << 20)).unwrap_err();
        assert_eq!(e.reason(), "max_series");
        let two = format!("{}{}", run(3000), run(3000).replace('p', "q"));
        assert!(ingest(&two, |_| vec![], limits(1 << 20)).is_ok());
        let small = Limits {
            max_samples: 5000,
            max_series: 1 << 20,
        };
        assert!(ingest(&two, |_| vec![], small).is_err());
    }

    fn family<'a>(fs: &'a [Family], name: &str) -> &'a Family {
        fs.iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("{name} missing: {fs:#?}"))
    }

    #[test]
    fn reads_types_names_escapes_and_histograms() {
        let (fs, skipped) = parse(VLLM).unwrap();
        let names: Vec<&str> = fs.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "llm_batch_size",
                "tgi_request_count",
                "untyped_thing",
                "vllm:num_requests_running",
                "vllm:prompt_tokens",
                "vllm:time_to_first_token_seconds"
            ]
        );
        assert_eq!(skipped, vec![("lat".to_string(), "summary")]);
        let running = family(&fs, "vllm:num_requests_running");
        assert_eq!(running.kind, Kind::Gauge);
        assert_eq!(
            running.help,
            "Number of requests in model execution batches."
        );
        let tokens = family(&fs, "vllm:prompt_tokens");
        assert_eq!(tokens.kind, Kind::Counter);
        assert!(tokens.series[0]
            .labels
            .contains(&("model_name".into(), "we\"ird\\x\ny".into())));
        assert_eq!(tokens.series[0].value, Value::Counter(17.0));
        let ttft = family(&fs, "vllm:time_to_first_token_seconds");
        assert_eq!(
            ttft.series[0].value,
            Value::Histogram {
                sum: 2.2,
                buckets: vec![(0.001, 0), (0.5, 1), (1.0, 2), (f64::INFINITY, 1)]
            }
        );
        assert!(!ttft.series[0].labels.iter().any(|(k, _)| k == "le"));
        assert_eq!(family(&fs, "untyped_thing").kind, Kind::Gauge);
    }

    #[test]
    fn relabels_limits_and_reserves_names() {
        let target = [("server", "vllm".to_string()), ("pid", "42".to_string())];
        let got = ingest(VLLM, |_| target.to_vec(), limits(1000)).unwrap();
        assert!(got
            .skipped
            .contains(&("llm_batch_size".to_string(), "reserved_name")));
        let untyped = family(&got.families, "untyped_thing");
        assert_eq!(
            untyped.series[0].labels,
            vec![
                ("server".to_string(), "vllm".to_string()),
                ("pid".into(), "42".into()),
                ("exported_server".into(), "x".into())
            ]
        );
        for f in &got.families {
            for s in &f.series {
                assert_eq!(&s.labels[..2], &got.families[0].series[0].labels[..2]);
            }
        }
        // Whole families only: the 1-series families fit, the rest is counted.
        let small = ingest(VLLM, |_| target.to_vec(), limits(2)).unwrap();
        assert_eq!(small.families.len(), 2);
        assert_eq!(small.truncated, 3);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for body in [
            "<html>oops</html>",
            "x{a=\"b} 1\n",
            "\u{0}\u{1}",
            "# TYPE x counter\nx_total abc\n",
        ] {
            assert!(parse(body).is_err(), "{body:?} accepted");
        }
        assert_eq!(parse("").unwrap().0, vec![]);
    }

    #[test]
    fn buckets_without_inf_or_out_of_order_are_repaired() {
        assert_eq!(
            per_bucket(&[(1.0, 2.0), (2.0, 1.0)], Some(5.0)),
            vec![(1.0, 2), (2.0, 0), (f64::INFINITY, 3)]
        );
        assert_eq!(help_text("a \"b\"\\\nc"), "a 'b'\\\\\\nc");
    }
}

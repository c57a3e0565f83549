//! A server's `/metrics` body (Prometheus text format 0.0.4, as vLLM's `prometheus_client`,
//! TGI's `metrics-exporter-prometheus` and SGLang write it) → families ready to be encoded
//! again as OpenMetrics, with the target's labels added ([`ingest`], the fuzzed entry point).
//!
//! OpenMetrics names a counter family without `_total` and its sample with it, so a counter
//! `x_total` becomes family `x` (its sample keeps the name `x_total`); a counter named without
//! `_total` (TGI's) gets the suffix. Untyped families become gauges (the 0.0.4 parsers in
//! `promtool` reject `unknown`). Summaries are dropped (the encoder has no summary type), and
//! so are `prometheus_client`'s `_created` gauges that stand beside a counter or histogram.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::text::{self, MetricFamily, TextError, Type};

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not Prometheus text format: {0}")]
    Syntax(#[from] TextError),
    #[error("more than {limit} samples in the body")]
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

/// Counts sample lines without parsing: a body over the limit costs no allocation per line.
fn check_size(text: &str, max_samples: usize) -> Result<(), ParseError> {
    let mut total = 0usize;
    for line in text.lines() {
        let line = line.trim_start();
        if !line.is_empty() && !line.starts_with('#') {
            total += 1;
            if total > max_samples {
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
                if !target.iter().any(|(t, _)| t == k) {
                    labels.push((k.clone(), v.clone()));
                    continue;
                }
                // As Prometheus resolves a clash with a target label: `exported_` as many
                // times as it takes to find a name the series does not have.
                let mut name = format!("exported_{k}");
                while s.labels.iter().chain(&labels).any(|(l, _)| *l == name) {
                    name.insert_str(0, "exported_");
                }
                labels.push((name, v.clone()));
            }
            // Two series that differ only by a renamed label would collide; keep the first.
            seen.insert(key(&labels)).then(|| Series {
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
    let parsed = text::parse(text)?;
    let mut out = BTreeMap::new();
    let mut skipped = Vec::new();
    let names: HashSet<&str> = parsed.iter().map(|f| f.name.as_str()).collect();
    for family in &parsed {
        let name = family.name.as_str();
        let kind = match family.kind {
            Type::Counter => Kind::Counter,
            Type::Gauge | Type::Untyped => Kind::Gauge,
            Type::Histogram => Kind::Histogram,
            Type::Summary => {
                skipped.push((name.to_string(), "summary"));
                continue;
            }
        };
        if let Some(base) = name.strip_suffix("_created") {
            if kind == Kind::Gauge
                && (names.contains(format!("{base}_total").as_str()) || names.contains(base))
            {
                continue;
            }
        }
        let series = match kind {
            Kind::Histogram => histograms(family),
            _ => scalars(family, kind),
        };
        let om_name = match kind {
            // 0.0.4 names the family as its samples (`x_total`), OpenMetrics without the
            // suffix its samples carry (`x` → `x_total`).
            Kind::Counter
                if !family
                    .samples
                    .iter()
                    .any(|s| s.name.strip_prefix(name) == Some("_total")) =>
            {
                name.strip_suffix("_total").unwrap_or(name)
            }
            _ => name,
        };
        if out.contains_key(om_name) {
            skipped.push((name.to_string(), "duplicate_name"));
            continue;
        }
        out.insert(
            om_name.to_string(),
            Family {
                name: om_name.to_string(),
                kind,
                help: help_text(family.help.as_deref().unwrap_or("")),
                series,
            },
        );
    }
    Ok((out.into_values().collect(), skipped))
}

/// A label set as a key: sorted, so that the order a server writes them in does not matter.
fn key(labels: &[(String, String)]) -> Labels {
    let mut k = labels.to_vec();
    k.sort();
    k
}

/// One series per label set (the first sample of a set wins), named as the family or, for a
/// counter, with `_total` (`_created` samples are not values).
fn scalars(family: &MetricFamily, kind: Kind) -> Vec<Series> {
    let total = format!("{}_total", family.name);
    let mut seen = HashSet::new();
    family
        .samples
        .iter()
        .filter(|s| s.name == family.name || (kind == Kind::Counter && s.name == total))
        .filter(|s| seen.insert(key(&s.labels)))
        .map(|s| Series {
            labels: s.labels.clone(),
            value: match kind {
                Kind::Counter => Value::Counter(s.value),
                _ => Value::Gauge(s.value),
            },
        })
        .collect()
}

/// A histogram family's `_bucket`, `_sum` and `_count` samples joined by their labels (less
/// `le`), wherever they stand in the family.
fn histograms(family: &MetricFamily) -> Vec<Series> {
    struct Partial {
        labels: Labels,
        cumulative: Vec<(f64, f64)>,
        sum: Option<f64>,
        count: Option<f64>,
    }
    let name = family.name.as_str();
    let mut index: HashMap<Labels, usize> = HashMap::new();
    let mut partial: Vec<Partial> = Vec::new();
    for s in &family.samples {
        let suffix = s.name.strip_prefix(name).unwrap_or("");
        if !matches!(suffix, "_bucket" | "_sum" | "_count") {
            continue;
        }
        let labels: Labels = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        let i = *index.entry(key(&labels)).or_insert_with(|| {
            partial.push(Partial {
                labels,
                cumulative: Vec::new(),
                sum: None,
                count: None,
            });
            partial.len() - 1
        });
        let p = &mut partial[i];
        match suffix {
            "_bucket" => {
                let le = s.labels.iter().find(|(k, _)| k == "le");
                if let Some(le) = le.and_then(|(_, v)| v.trim().parse::<f64>().ok()) {
                    if !le.is_nan() {
                        p.cumulative.push((le, s.value));
                    }
                }
            }
            "_sum" => p.sum = p.sum.or(Some(s.value)),
            "_count" => p.count = p.count.or(Some(s.value)),
            _ => {}
        }
    }
    partial
        .into_iter()
        .map(|mut p| {
            p.cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
            // One bucket per bound: the encoder would write a bound twice.
            p.cumulative.dedup_by(|b, a| a.0 == b.0);
            Series {
                labels: p.labels,
                value: Value::Histogram {
                    sum: p.sum.unwrap_or(0.0),
                    buckets: per_bucket(&p.cumulative, p.count),
                },
            }
        })
        .collect()
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
    fn large_families_parse_and_bodies_over_max_samples_are_refused_unparsed() {
        let run = |n: usize| {
            let mut body = String::from("# TYPE p gauge\n");
            for i in 0..n {
                body.push_str(&format!("p{{i=\"{i}\"}} 1\n"));
            }
            body
        };
        let got = ingest(&run(50_000), |_| vec![], limits(1 << 20));
        assert!(got.is_err(), "over limits(..).max_samples");
        let big = Limits {
            max_samples: 50_000,
            max_series: 1 << 20,
        };
        let got = ingest(&run(50_000), |_| vec![], big).unwrap();
        assert_eq!(got.families[0].series.len(), 50_000);
        let two = format!("{}{}", run(3000), run(3000).replace('p', "q"));
        assert!(ingest(&two, |_| vec![], limits(1 << 20)).is_ok());
        let small = Limits {
            max_samples: 5000,
            max_series: 1 << 20,
        };
        let e = ingest(&two, |_| vec![], small).unwrap_err();
        assert_eq!(e.reason(), "max_series");
    }

    #[test]
    fn histograms_split_in_two_blocks_and_labels_in_any_order_are_one_series() {
        let body = "# HELP h Latency \\ \"s\".\n# TYPE h histogram\n\
h_bucket{a=\"1\",le=\"0.5\",b=\"2\"} 1 1700000000000\n\
# TYPE g gauge\ng NaN\ng{x=\"1\"} +Inf\ng{x=\"2\"} -Inf\n\
# TYPE h histogram\n\
h_bucket{b=\"2\",a=\"1\",le=\"+Inf\"} 3\nh_bucket{le=\"0.5\",b=\"2\",a=\"1\"} 9\n\
h_sum{b=\"2\",a=\"1\"} 4.5\nh_count{a=\"1\",b=\"2\"} 3\nh_created{a=\"1\",b=\"2\"} 1\n";
        let (fs, _) = parse(body).unwrap();
        let h = family(&fs, "h");
        assert_eq!(h.help, "Latency \\\\ 's'.");
        assert_eq!(h.series.len(), 1, "{h:#?}");
        assert_eq!(
            h.series[0].labels,
            vec![("a".to_string(), "1".to_string()), ("b".into(), "2".into())]
        );
        assert_eq!(
            h.series[0].value,
            Value::Histogram {
                sum: 4.5,
                buckets: vec![(0.5, 1), (f64::INFINITY, 2)]
            }
        );
        let g: Vec<f64> = family(&fs, "g").scalars().map(|(_, v)| v).collect();
        assert!(g[0].is_nan());
        assert_eq!(g[1..], [f64::INFINITY, f64::NEG_INFINITY]);
    }

    #[test]
    fn clashing_and_duplicate_names_are_resolved() {
        let body = "# TYPE x_total counter\nx_total 1\n# TYPE x gauge\nx 2\n\
up{server=\"a\",exported_server=\"b\"} 1\nup{server=\"a\",exported_server=\"b\"} 2\n\
up{exported_server=\"b\",exported_exported_server=\"a\"} 3\n";
        let got = ingest(body, |_| vec![("server", "vllm".into())], limits(100)).unwrap();
        assert_eq!(family(&got.families, "x").kind, Kind::Counter);
        assert!(got.skipped.contains(&("x".to_string(), "duplicate_name")));
        let up = family(&got.families, "up");
        assert_eq!(up.series.len(), 1);
        assert_eq!(
            up.series[0].labels,
            [
                ("server", "vllm"),
                ("exported_exported_server", "a"),
                ("exported_server", "b")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(up.series[0].value, Value::Gauge(1.0));
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
            "x{a=\"\\q\"} 1\n",
            "x{a=\"1\",a=\"2\"} 1\n",
            "x 1 not_a_timestamp\n",
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

//! The `llm_*` series derived from a server's own metrics, whatever server it is: each
//! derived series names its sources in order (vLLM's current name, vLLM's older name, TGI,
//! SGLang); the first source the server exports is used. Names are the families' as
//! [`super::parse`] names them (counters without `_total`).

use std::collections::BTreeMap;

use super::metrics::ServerSeries;
use super::parse::{Family, Labels};

/// One derived sample: (series, model, server kind, value).
#[derive(Clone, Debug, PartialEq)]
pub struct Derived {
    pub series: ServerSeries,
    pub model: String,
    pub server: &'static str,
    pub value: f64,
}

/// How several series of one model (vLLM's data-parallel `engine`s) combine.
#[derive(Clone, Copy)]
enum Combine {
    Sum,
    Mean,
}

/// Families a derived series is read from, in order of preference: (family, server kind).
type Sources = &'static [(&'static str, &'static str)];

/// (derived series, how, sources).
const RULES: &[(ServerSeries, Combine, Sources)] = &[
    (
        ServerSeries::BatchSize,
        Combine::Sum,
        &[
            ("vllm:num_requests_running", "vllm"),
            ("tgi_batch_current_size", "tgi"),
            ("sglang:num_running_reqs", "sglang"),
        ],
    ),
    (
        ServerSeries::QueueDepth,
        Combine::Sum,
        &[
            ("vllm:num_requests_waiting", "vllm"),
            ("tgi_queue_size", "tgi"),
            ("sglang:num_queue_reqs", "sglang"),
        ],
    ),
    (
        ServerSeries::KvCacheUsage,
        Combine::Mean,
        &[
            ("vllm:kv_cache_usage_perc", "vllm"),
            ("vllm:gpu_cache_usage_perc", "vllm"),
            ("sglang:token_usage", "sglang"),
        ],
    ),
    (
        ServerSeries::Preemptions,
        Combine::Sum,
        &[("vllm:num_preemptions", "vllm")],
    ),
];

/// The derived series of one target. `model` names the model of series without a
/// `model_name` label (TGI's), from the server's command line.
pub fn derive(families: &[Family], model: Option<&str>) -> Vec<Derived> {
    let find = |name: &str| families.iter().find(|f| f.name == name);
    let model_of = |labels: &Labels| -> String {
        labels
            .iter()
            .find(|(k, _)| k == "model_name")
            .map(|(_, v)| v.clone())
            .or_else(|| model.map(str::to_string))
            .unwrap_or_else(|| "unknown".into())
    };
    let by_model = |f: &Family| -> BTreeMap<String, (f64, u32)> {
        let mut m: BTreeMap<String, (f64, u32)> = BTreeMap::new();
        for (labels, v) in f.scalars() {
            let e = m.entry(model_of(labels)).or_default();
            e.0 += v;
            e.1 += 1;
        }
        m
    };
    let mut out = Vec::new();
    for (series, combine, sources) in RULES {
        let Some((f, server)) = sources.iter().find_map(|(n, s)| Some((find(n)?, *s))) else {
            continue;
        };
        for (model, (sum, n)) in by_model(f) {
            let value = match combine {
                Combine::Sum => sum,
                Combine::Mean => sum / f64::from(n),
            };
            out.push(Derived {
                series: *series,
                model,
                server,
                value,
            });
        }
    }
    // Prefix-cache hit ratio: cumulative hits over queries (vLLM v1), else the ratio the
    // server computes (vLLM v0, SGLang). No queries yet: no ratio.
    if let (Some(hits), Some(queries)) = (
        find("vllm:prefix_cache_hits"),
        find("vllm:prefix_cache_queries"),
    ) {
        let (hits, queries) = (by_model(hits), by_model(queries));
        for (model, (q, _)) in queries {
            let h = hits.get(&model).map_or(0.0, |(h, _)| *h);
            if q > 0.0 {
                out.push(Derived {
                    series: ServerSeries::KvCacheHitRatio,
                    model,
                    server: "vllm",
                    value: h / q,
                });
            }
        }
    } else if let Some((f, server)) = [
        ("vllm:gpu_prefix_cache_hit_rate", "vllm"),
        ("sglang:cache_hit_rate", "sglang"),
    ]
    .iter()
    .find_map(|(n, s)| Some((find(n)?, *s)))
    {
        for (model, (sum, n)) in by_model(f) {
            out.push(Derived {
                series: ServerSeries::KvCacheHitRatio,
                model,
                server,
                value: sum / f64::from(n),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::parse::parse;

    fn get(d: &[Derived], s: ServerSeries, model: &str) -> Option<(f64, &'static str)> {
        d.iter()
            .find(|x| x.series == s && x.model == model)
            .map(|x| (x.value, x.server))
    }

    #[test]
    fn current_vllm_names_with_two_engines() {
        let body = "# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3\n\
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 4\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2\n\
# TYPE vllm:kv_cache_usage_perc gauge\n\
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\n\
vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.75\n\
# TYPE vllm:num_preemptions_total counter\n\
vllm:num_preemptions_total{engine=\"0\",model_name=\"m\"} 7\n\
# TYPE vllm:prefix_cache_queries_total counter\n\
vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 200\n\
vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"idle\"} 0\n\
# TYPE vllm:prefix_cache_hits_total counter\n\
vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 50\n";
        let (fs, _) = parse(body).unwrap();
        let d = derive(&fs, Some("cmdline"));
        assert_eq!(get(&d, ServerSeries::BatchSize, "m"), Some((7.0, "vllm")));
        assert_eq!(get(&d, ServerSeries::QueueDepth, "m"), Some((2.0, "vllm")));
        assert_eq!(
            get(&d, ServerSeries::KvCacheUsage, "m"),
            Some((0.5, "vllm"))
        );
        assert_eq!(get(&d, ServerSeries::Preemptions, "m"), Some((7.0, "vllm")));
        assert_eq!(
            get(&d, ServerSeries::KvCacheHitRatio, "m"),
            Some((0.25, "vllm"))
        );
        assert_eq!(get(&d, ServerSeries::KvCacheHitRatio, "idle"), None);
        assert_eq!(d.len(), 5, "{d:?}");
    }

    #[test]
    fn older_vllm_tgi_and_sglang() {
        let old = "# TYPE vllm:gpu_cache_usage_perc gauge\n\
vllm:gpu_cache_usage_perc{model_name=\"o\"} 0.9\n\
# TYPE vllm:gpu_prefix_cache_hit_rate gauge\n\
vllm:gpu_prefix_cache_hit_rate{model_name=\"o\"} 0.3\n";
        let d = derive(&parse(old).unwrap().0, None);
        assert_eq!(
            get(&d, ServerSeries::KvCacheUsage, "o"),
            Some((0.9, "vllm"))
        );
        assert_eq!(
            get(&d, ServerSeries::KvCacheHitRatio, "o"),
            Some((0.3, "vllm"))
        );

        let tgi = "# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 5\n\
# TYPE tgi_queue_size gauge\ntgi_queue_size 11\n";
        let d = derive(&parse(tgi).unwrap().0, Some("bigscience/bloom"));
        assert_eq!(
            get(&d, ServerSeries::BatchSize, "bigscience/bloom"),
            Some((5.0, "tgi"))
        );
        assert_eq!(
            get(&d, ServerSeries::QueueDepth, "bigscience/bloom"),
            Some((11.0, "tgi"))
        );
        let d = derive(&parse(tgi).unwrap().0, None);
        assert_eq!(
            get(&d, ServerSeries::BatchSize, "unknown"),
            Some((5.0, "tgi"))
        );

        let sg =
            "# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name=\"q\"} 2\n\
# TYPE sglang:token_usage gauge\nsglang:token_usage{model_name=\"q\"} 0.4\n\
# TYPE sglang:cache_hit_rate gauge\nsglang:cache_hit_rate{model_name=\"q\"} 0.6\n";
        let d = derive(&parse(sg).unwrap().0, None);
        assert_eq!(get(&d, ServerSeries::BatchSize, "q"), Some((2.0, "sglang")));
        assert_eq!(
            get(&d, ServerSeries::KvCacheUsage, "q"),
            Some((0.4, "sglang"))
        );
        assert_eq!(
            get(&d, ServerSeries::KvCacheHitRatio, "q"),
            Some((0.6, "sglang"))
        );
        assert!(derive(&parse("# TYPE other gauge\nother 1\n").unwrap().0, None).is_empty());
    }
}

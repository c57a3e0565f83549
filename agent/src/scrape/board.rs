//! The latest scrape of every target, encoded into the agent's exposition by the registry
//! (a prometheus-client [`Collector`]): the servers' families merged by name (one descriptor
//! per family, every target's series under it) and the derived `llm_*` series.

use std::{collections::BTreeMap, sync::RwLock};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

use super::metrics::ServerSeries;
use super::{
    derive::Derived,
    parse::{Family, Kind, Labels, Series, Value},
};

/// What one target gave on its last successful scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetView {
    /// Relabelled, sorted by name.
    pub families: Vec<Family>,
    pub derived: Vec<Derived>,
    /// The target's labels (`server`, `pid`, `port`, ...), added to the derived series.
    pub labels: Vec<(&'static str, String)>,
}

impl TargetView {
    /// Series this view exports (scraped and derived).
    pub fn series(&self) -> usize {
        self.families.iter().map(|f| f.series.len()).sum::<usize>() + self.derived.len()
    }
}

#[derive(Debug, Default)]
pub struct ScrapeBoard {
    targets: RwLock<BTreeMap<u32, TargetView>>,
}

impl ScrapeBoard {
    pub fn set(&self, pid: u32, view: TargetView) {
        self.write().insert(pid, view);
    }

    /// Sets a target's view keeping the series of all targets together within `max_total`:
    /// whole families past the room the other targets leave are left out (in name order, as
    /// `max_series` does per target). Returns the series left out.
    pub fn set_within(&self, pid: u32, mut view: TargetView, max_total: usize) -> usize {
        let mut targets = self.write();
        let others: usize = targets
            .iter()
            .filter(|(p, _)| **p != pid)
            .map(|(_, v)| v.series())
            .sum();
        let mut room = max_total.saturating_sub(others + view.derived.len());
        let mut dropped = 0;
        view.families.retain(|f| {
            if f.series.len() <= room {
                room -= f.series.len();
                true
            } else {
                dropped += f.series.len();
                false
            }
        });
        if room == 0 && others + view.derived.len() > max_total {
            dropped += view.derived.len();
            view.derived.clear();
        }
        targets.insert(pid, view);
        dropped
    }

    /// Series held for all targets together.
    pub fn series(&self) -> usize {
        let targets = self.targets.read().unwrap_or_else(|e| e.into_inner());
        targets.values().map(TargetView::series).sum()
    }

    /// Forgets every target not in `pids` (their series disappear).
    pub fn retain(&self, keep: impl Fn(u32) -> bool) {
        self.write().retain(|pid, _| keep(*pid));
    }

    pub fn remove(&self, pid: u32) {
        self.write().remove(&pid);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, TargetView>> {
        self.targets.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collector for ScrapeBoard {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let targets = self.targets.read().unwrap_or_else(|e| e.into_inner());
        // Two servers may write one family name with different types: the first (lowest
        // pid) decides, the other's series of that name are left out.
        let mut merged: BTreeMap<&str, (Kind, &str, Vec<&Series>)> = BTreeMap::new();
        for view in targets.values() {
            for f in &view.families {
                let entry =
                    merged
                        .entry(f.name.as_str())
                        .or_insert((f.kind, f.help.as_str(), Vec::new()));
                if entry.0 == f.kind {
                    entry.2.extend(&f.series);
                }
            }
        }
        for (name, (kind, help, series)) in merged {
            if series.is_empty() {
                continue;
            }
            let metric_type = match kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
            for s in series {
                encode_series(&mut family, &s.labels, &s.value)?;
            }
        }
        for which in ServerSeries::ALL {
            let samples: Vec<(Labels, f64)> = targets
                .values()
                .flat_map(|view| {
                    view.derived
                        .iter()
                        .filter(move |d| d.series == which)
                        .map(move |d| (derived_labels(d, &view.labels), d.value))
                })
                .collect();
            if samples.is_empty() {
                continue;
            }
            let metric_type = if which.is_counter() {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut family =
                encoder.encode_descriptor(which.name(), which.help(), None, metric_type)?;
            for (labels, v) in samples {
                let value = if which.is_counter() {
                    Value::Counter(v)
                } else {
                    Value::Gauge(v)
                };
                encode_series(&mut family, &labels, &value)?;
            }
        }
        Ok(())
    }
}

/// `model` first, then the target's labels; the server kind is the one the values came from.
fn derived_labels(d: &Derived, target: &[(&'static str, String)]) -> Labels {
    let mut labels = vec![("model".to_string(), d.model.clone())];
    for (k, v) in target {
        let v = if *k == "server" {
            d.server.to_string()
        } else {
            v.clone()
        };
        labels.push(((*k).to_string(), v));
    }
    labels
}

fn encode_series(
    family: &mut prometheus_client::encoding::MetricEncoder<'_>,
    labels: &Labels,
    value: &Value,
) -> Result<(), std::fmt::Error> {
    let mut m = family.encode_family(labels)?;
    match value {
        Value::Counter(v) => m.encode_counter::<NoLabelSet, _, f64>(v, None),
        Value::Gauge(v) => m.encode_gauge(v),
        Value::Histogram { sum, buckets } => {
            let count = buckets
                .iter()
                .map(|(_, c)| *c)
                .fold(0u64, u64::saturating_add);
            m.encode_histogram::<NoLabelSet>(*sum, count, buckets, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::scrape::{derive::derive, parse::ingest};

    fn view(pid: u32, body: &str) -> TargetView {
        let labels = vec![
            ("server", "vllm".to_string()),
            ("pid", pid.to_string()),
            ("port", "8000".to_string()),
        ];
        let limits = crate::scrape::parse::Limits {
            max_samples: 1000,
            max_series: 100,
        };
        let got = ingest(body, |_| labels.clone(), limits).unwrap();
        TargetView {
            derived: derive(&got.original, None),
            families: got.families,
            labels,
        }
    }

    fn encode(board: std::sync::Arc<ScrapeBoard>) -> String {
        let mut r = Registry::default();
        r.register_collector(Box::new(board));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn merges_targets_into_one_family_and_encodes_every_type() {
        let body = "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{model_name=\"m\"} 3\n\
# HELP vllm:num_preemptions_total Preempted.\n# TYPE vllm:num_preemptions_total counter\n\
vllm:num_preemptions_total{model_name=\"m\"} 2\n\
# HELP x_seconds A histogram.\n# TYPE x_seconds histogram\n\
x_seconds_bucket{le=\"0.5\"} 1\nx_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 4.5\nx_seconds_count 3\n";
        let board = std::sync::Arc::new(ScrapeBoard::default());
        board.set(1, view(1, body));
        board.set(2, view(2, body));
        let text = encode(board.clone());
        assert_eq!(
            text.matches("# TYPE vllm:num_requests_running gauge")
                .count(),
            1,
            "{text}"
        );
        assert!(text.contains("vllm:num_requests_running{server=\"vllm\",pid=\"1\",port=\"8000\",model_name=\"m\"} 3.0"), "{text}");
        assert!(text.contains("vllm:num_requests_running{server=\"vllm\",pid=\"2\",port=\"8000\",model_name=\"m\"} 3.0"), "{text}");
        assert!(
            text.contains("# TYPE vllm:num_preemptions counter\n"),
            "{text}"
        );
        assert!(text.contains("vllm:num_preemptions_total{server=\"vllm\",pid=\"1\",port=\"8000\",model_name=\"m\"} 2.0"), "{text}");
        assert!(
            text.contains(
                "x_seconds_bucket{le=\"0.5\",server=\"vllm\",pid=\"2\",port=\"8000\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "x_seconds_bucket{le=\"+Inf\",server=\"vllm\",pid=\"2\",port=\"8000\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_count{server=\"vllm\",pid=\"2\",port=\"8000\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "llm_batch_size{model=\"m\",server=\"vllm\",pid=\"1\",port=\"8000\"} 3.0"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "llm_preemptions_total{model=\"m\",server=\"vllm\",pid=\"2\",port=\"8000\"} 2.0"
            ),
            "{text}"
        );
        // The exposition reads back as the families that went in.
        let (back, _) =
            crate::scrape::parse::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let preemptions = back
            .iter()
            .find(|f| f.name == "vllm:num_preemptions")
            .unwrap();
        assert_eq!(preemptions.kind, Kind::Counter);
        let values: Vec<f64> = preemptions.scalars().map(|(_, v)| v).collect();
        assert_eq!(values, [2.0, 2.0]);
        let x = back.iter().find(|f| f.name == "x_seconds").unwrap();
        assert_eq!(
            x.series[0].value,
            Value::Histogram {
                sum: 4.5,
                buckets: vec![(0.5, 1), (f64::INFINITY, 2)]
            }
        );
        assert_eq!(
            x.series[1].labels,
            [("server", "vllm"), ("pid", "2"), ("port", "8000")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert!(back.iter().any(|f| f.name == "llm_batch_size"), "{back:#?}");
        board.remove(1);
        board.retain(|p| p != 2);
        let text = encode(board);
        assert!(
            !text.contains("vllm:") && !text.contains("llm_batch_size"),
            "{text}"
        );
    }

    #[test]
    fn all_targets_together_stay_within_the_total() {
        let board = ScrapeBoard::default();
        let body = |n: usize| {
            (0..n)
                .map(|i| format!("# TYPE fam_{i:03} gauge\nfam_{i:03}{{a=\"1\"}} 1\nfam_{i:03}{{a=\"2\"}} 2\n"))
                .collect::<String>()
        };
        let mut views = Vec::new();
        for pid in 1..=5u32 {
            let mut v = view(pid, &body(40));
            v.derived.clear();
            views.push((pid, v));
        }
        let mut dropped = 0;
        for (pid, v) in views.clone() {
            dropped += board.set_within(pid, v, 250);
        }
        // 5 targets × 80 series, 250 kept: whole families, none split.
        assert_eq!(board.series(), 250);
        assert_eq!(dropped, 150);
        // A target scraped again keeps its share; one that is gone gives its room back.
        let (pid, v) = views[0].clone();
        assert_eq!(board.set_within(pid, v, 250), 0);
        board.remove(1);
        let (pid, v) = views[4].clone();
        assert_eq!(board.set_within(pid, v, 250), 0);
        assert!(board.series() <= 250);
    }
}

//! A server's `/metrics` body, as the scraper reads it (`inferscope::scrape::parse::ingest`),
//! on arbitrary bytes: parse, relabel, derive, and encode into the agent's exposition.
//!
//! Besides "no panic", it checks what the exposition relies on: at most `max_series` series
//! kept, every series begins with the target's labels, and the agent's encoded output (the
//! scraped families and the derived series) reads back, through the same parser, as the
//! families that went in: names, types, labels and values.
//! Seeds: `fuzz/seeds/server_metrics` (vLLM, older vLLM, TGI and SGLang bodies written by
//! `prometheus_client`).

#![no_main]

use std::sync::Arc;

use inferscope::scrape::{board, derive, parse, target};
use libfuzzer_sys::fuzz_target;

const MAX_SERIES: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A pod's labels too: they join the relabelling the fuzzer exercises.
    let workload = inferscope::labels::WorkloadLabels {
        node: "n1".into(),
        namespace: "llm".into(),
        pod: "vllm-0".into(),
        container: "server".into(),
    };
    let labels = target::target_labels("vllm", 42, 8000, &[0, 1], &workload);
    let limits = parse::Limits {
        max_samples: 20_000,
        max_series: MAX_SERIES,
    };
    let Ok(got) = parse::ingest(text, |_| labels.clone(), limits) else {
        return;
    };
    let kept: usize = got.families.iter().map(|f| f.series.len()).sum();
    assert!(kept <= MAX_SERIES, "{kept} series kept");
    for f in &got.families {
        for s in &f.series {
            let head: Vec<(&str, &str)> = s.labels[..labels.len()]
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let want: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(head, want, "target labels missing in {}", f.name);
        }
    }
    let families = got.families.clone();
    let derived = derive::derive(&got.original, Some("m"));
    let b = Arc::new(board::ScrapeBoard::default());
    b.set(
        42,
        board::TargetView {
            families: got.families,
            derived,
            labels,
        },
    );
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(b));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoding");
    let (back, _) = parse::parse(&out)
        .unwrap_or_else(|e| panic!("the exposition does not read back: {e}\n{out}"));
    for f in families.iter().filter(|f| !f.series.is_empty()) {
        let Some(b) = back.iter().find(|b| b.name == f.name) else {
            panic!("{} not read back\n{out}", f.name);
        };
        assert_eq!(b.kind, f.kind, "{}\n{out}", f.name);
        assert_eq!(b.series.len(), f.series.len(), "{}\n{out}", f.name);
        for (s, r) in f.series.iter().zip(&b.series) {
            assert_eq!(s.labels, r.labels, "{}\n{out}", f.name);
            assert!(
                same(&s.value, &r.value),
                "{}: {:?} != {:?}\n{out}",
                f.name,
                s.value,
                r.value
            );
        }
    }
});

fn same_f64(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

fn same(a: &parse::Value, b: &parse::Value) -> bool {
    use parse::Value::*;
    match (a, b) {
        (Counter(x), Counter(y)) | (Gauge(x), Gauge(y)) => same_f64(*x, *y),
        (
            Histogram {
                sum: s1,
                buckets: b1,
            },
            Histogram {
                sum: s2,
                buckets: b2,
            },
        ) => {
            // Counts travel as cumulative integers read back as f64: exact below 2^53.
            let exact = b1.iter().fold(0u64, |t, (_, c)| t.saturating_add(*c)) < 1 << 53;
            same_f64(*s1, *s2)
                && b1.len() == b2.len()
                && b1
                    .iter()
                    .zip(b2)
                    .all(|((l1, c1), (l2, c2))| same_f64(*l1, *l2) && (!exact || c1 == c2))
        }
        _ => false,
    }
}

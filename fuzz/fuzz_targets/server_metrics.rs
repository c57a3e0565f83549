//! A server's `/metrics` body, as the scraper reads it (`inferscope::scrape::parse::ingest`),
//! on arbitrary bytes: parse, relabel, derive, and encode into the agent's exposition.
//!
//! Besides "no panic", it checks what the exposition relies on: at most `max_series` series
//! kept, every series begins with the target's labels, and the agent's encoded output (the
//! scraped families and the derived series) is OpenMetrics that a parser accepts.
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
    let labels = target::target_labels("vllm", 42, 8000);
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
    // The parser refuses a document with no family at all (valid OpenMetrics).
    if out.trim() == "# EOF" {
        return;
    }
    if let Err(e) = openmetrics_parser::openmetrics::parse_openmetrics(&out) {
        panic!("the exposition is not OpenMetrics: {e:?}\n{out}");
    }
});

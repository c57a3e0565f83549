//! Scraping's series: whether each server's own `/metrics` answered, how long it took, why
//! it failed; and the collector that re-exports what the servers said (`board`).

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};

use super::board::ScrapeBoard;
use crate::metrics::{GaugeF, Metrics};

/// A scraped inference server: `inferscope_scrape_up`, `inferscope_scrape_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeTargetLabels {
    pub server: String,
    pub pid: u32,
    pub port: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeErrorLabels {
    pub server: String,
    pub reason: &'static str,
}

/// Series derived from the inference servers' own metrics (`crate::scrape::derive` says from
/// which), encoded by the scrape collector (`crate::scrape::board`) from its latest snapshot,
/// with labels `model` and the target's (`server`, `pid`, `port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServerSeries {
    BatchSize,
    QueueDepth,
    KvCacheUsage,
    KvCacheHitRatio,
    Preemptions,
}

impl ServerSeries {
    pub const ALL: [ServerSeries; 5] = [
        Self::BatchSize,
        Self::QueueDepth,
        Self::KvCacheUsage,
        Self::KvCacheHitRatio,
        Self::Preemptions,
    ];

    /// The family name (a counter's without `_total`, which the encoder appends).
    pub fn name(self) -> &'static str {
        match self {
            Self::BatchSize => "llm_batch_size",
            Self::QueueDepth => "llm_queue_depth",
            Self::KvCacheUsage => "llm_kv_cache_usage_ratio",
            Self::KvCacheHitRatio => "llm_kv_cache_hit_ratio",
            Self::Preemptions => "llm_preemptions",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Self::BatchSize => {
                "Requests the server is running (in its batch), from its own metrics"
            }
            Self::QueueDepth => "Requests waiting in the server's queue, from its own metrics",
            Self::KvCacheUsage => {
                "Fraction of the server's KV cache in use, 0-1, from its own metrics"
            }
            Self::KvCacheHitRatio => {
                "Prefix-cache hits over queries since the server started, 0-1, from its own metrics"
            }
            Self::Preemptions => "Requests the server preempted, from its own metrics",
        }
    }

    pub fn is_counter(self) -> bool {
        self == Self::Preemptions
    }
}

pub struct ScrapeMetrics {
    /// The shared counters (outside input dropped).
    pub core: Arc<Metrics>,
    pub scrape_up: Family<ScrapeTargetLabels, Gauge>,
    pub scrape_duration: Family<ScrapeTargetLabels, GaugeF>,
    pub scrape_errors: Family<ScrapeErrorLabels, Counter>,
    /// The servers' own metrics, re-exported, and the [`ServerSeries`] derived from them.
    pub scraped: Arc<ScrapeBoard>,
}

impl ScrapeMetrics {
    pub fn new(core: &Arc<Metrics>) -> Arc<Self> {
        let m = Self {
            core: core.clone(),
            scrape_up: Family::default(),
            scrape_duration: Family::default(),
            scrape_errors: Family::default(),
            scraped: Default::default(),
        };
        core.register_with(|r| {
            r.register(
                "inferscope_scrape_up",
                "1 when the last scrape of the server's own /metrics succeeded, else 0",
                m.scrape_up.clone(),
            );
            r.register(
                "inferscope_scrape_duration_seconds",
                "Duration of the last scrape of the server's own /metrics",
                m.scrape_duration.clone(),
            );
            r.register(
                "inferscope_scrape_errors",
                "Failed or partial scrapes of servers' own /metrics, by reason",
                m.scrape_errors.clone(),
            );
            r.register_collector(Box::new(m.scraped.clone()));
        });
        Arc::new(m)
    }
}

//! OTLP export of metrics, traces and logs to a collector, over gRPC or HTTP/protobuf.
//!
//! - metrics: every `OTEL_METRIC_EXPORT_INTERVAL`, a snapshot of the Prometheus registry
//!   mapped to OpenTelemetry names ([`metrics`]);
//! - traces: one span per request timed on the wire, handed over by the HTTP tracker
//!   ([`traces`]);
//! - logs: forensic reports, XID errors and failed CUDA calls ([`logs`]).
//!
//! Producers never block: spans and log records go through bounded queues ([`queue`]) drained
//! by one batching task per signal. Everything dropped is counted in
//! `inferscope_export_dropped_total{signal}`.

pub mod config;
pub mod logs;
pub mod metrics;
pub mod queue;
pub mod traces;
pub mod transport;

use std::{sync::Arc, time::Duration};

use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use tokio::{sync::watch, task::JoinHandle};

use self::{
    config::{Settings, Signal},
    queue::{Backoff, Batcher},
    transport::{Client, Payload},
};
use crate::{
    events::{Notice, RateLimited},
    gpu::history::GpuHistory,
    http::finished::RequestFinished,
    metrics::{Metrics, SignalLabels},
};

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error(transparent)]
    Config(#[from] config::OtlpConfigError),
    #[error("otlp {signal}")]
    Transport {
        signal: &'static str,
        #[source]
        source: transport::TransportError,
    },
}

/// Values an attribute can take.
pub trait IntoValue {
    fn into_value(self) -> Value;
}
impl IntoValue for &str {
    fn into_value(self) -> Value {
        Value::StringValue(self.to_string())
    }
}
impl IntoValue for i64 {
    fn into_value(self) -> Value {
        Value::IntValue(self)
    }
}

pub fn kv(key: &str, v: impl IntoValue) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(v.into_value()),
        }),
        ..Default::default()
    }
}

/// The producers' ends, handed to the stages that make spans and log records.
#[derive(Clone, Default)]
pub struct Sinks {
    pub spans: Option<crate::queue::Sender<RequestFinished>>,
    pub logs: Option<crate::queue::Sender<Notice>>,
    /// Allocation-failure log records per second and process.
    pub alloc_failure_logs_per_sec: u32,
    /// Counts allocation-failure records over the rate (`signal="logs"`).
    pub logs_dropped: Option<prometheus_client::metrics::counter::Counter>,
}

impl Sinks {
    /// A rate limiter for allocation-failure records, when logs are exported.
    pub fn alloc_failures(&self) -> Option<RateLimited> {
        Some(RateLimited::new(
            self.logs.clone()?,
            self.alloc_failure_logs_per_sec,
            self.logs_dropped.clone()?,
        ))
    }
}

pub struct Exporter {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    sinks: Sinks,
}

fn dropped(metrics: &Metrics, s: Signal) -> prometheus_client::metrics::counter::Counter {
    metrics
        .export_dropped
        .get_or_create(&SignalLabels { signal: s.label() })
        .clone()
}

fn client(
    settings: &Settings,
    s: Signal,
    resource: &opentelemetry_sdk::Resource,
) -> Result<Option<Client>, OtlpError> {
    settings
        .target(s)
        .map(|t| Client::new(t, s, resource))
        .transpose()
        .map_err(|source| OtlpError::Transport {
            signal: s.label(),
            source,
        })
}

impl Exporter {
    /// Starts one task per enabled signal. Must run inside the Tokio runtime.
    pub fn start(
        settings: Settings,
        metrics: Arc<Metrics>,
        history: Option<Arc<GpuHistory>>,
    ) -> Result<Self, OtlpError> {
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut sinks = Sinks {
            alloc_failure_logs_per_sec: settings.alloc_failure_logs_per_sec,
            ..Default::default()
        };
        let resource = Arc::new(settings.resource.clone());
        let sdk_resource = opentelemetry_sdk::Resource::builder_empty()
            .with_attributes(
                settings
                    .resource
                    .iter()
                    .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
            )
            .build();
        for s in Signal::ALL {
            if let Some(t) = settings.target(s) {
                tracing::info!(signal = s.label(), url = t.url, protocol = ?t.protocol, "OTLP export on");
            }
        }
        if let Some(c) = client(&settings, Signal::Metrics, &sdk_resource)? {
            tasks.push(tokio::spawn(push_metrics(
                c,
                metrics.clone(),
                resource.clone(),
                settings.export_interval,
                dropped(&metrics, Signal::Metrics),
                stop_rx.clone(),
            )));
        }
        if let Some(c) = client(&settings, Signal::Traces, &sdk_resource)? {
            let d = dropped(&metrics, Signal::Traces);
            let (sink, rx) = queue::channel(settings.queue_size, settings.queue_bytes, d.clone());
            let b = Batcher {
                client: c,
                signal: "traces",
                batch_size: settings.batch_size,
                batch_timeout: settings.batch_timeout,
                backoff: Backoff::default(),
                dropped: d,
                build: Box::new(move |batch: &[RequestFinished]| {
                    let clock = traces::WallClock::now();
                    Payload::Traces(
                        batch
                            .iter()
                            .map(|r| traces::span(r, clock, history.as_deref()))
                            .collect(),
                    )
                }),
            };
            tasks.push(tokio::spawn(b.run(rx, stop_rx.clone())));
            sinks.spans = Some(sink);
        }
        if let Some(c) = client(&settings, Signal::Logs, &sdk_resource)? {
            let d = dropped(&metrics, Signal::Logs);
            let (sink, rx) = queue::channel(settings.queue_size, settings.queue_bytes, d.clone());
            let records = logs::Records::default();
            let b = Batcher {
                client: c,
                signal: "logs",
                batch_size: settings.batch_size,
                batch_timeout: settings.batch_timeout,
                backoff: Backoff::default(),
                dropped: d.clone(),
                build: Box::new(move |batch: &[Notice]| {
                    Payload::Logs(
                        batch
                            .iter()
                            .map(|n| records.record(&logs::item(n)))
                            .collect(),
                    )
                }),
            };
            tasks.push(tokio::spawn(b.run(rx, stop_rx.clone())));
            sinks.logs = Some(sink);
            sinks.logs_dropped = Some(d);
        }
        Ok(Self { stop, tasks, sinks })
    }

    pub fn sinks(&self) -> Sinks {
        self.sinks.clone()
    }

    /// Flushes what is queued (one attempt each) and stops, within `within`.
    pub async fn shutdown(self, within: Duration) {
        let Self { stop, tasks, sinks } = self;
        drop(sinks);
        let _ = stop.send(true);
        let all = async {
            for t in tasks {
                if let Err(e) = t.await {
                    tracing::error!(error = %e, "an OTLP export task panicked");
                }
            }
        };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!(
                secs = within.as_secs_f64(),
                "OTLP flush did not finish in time; the rest is dropped"
            );
        }
    }
}

fn unix_nano_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Pushes a snapshot every `interval`, and once more at shutdown. A push that fails after
/// its retries counts one drop: the next push carries the same cumulative values.
async fn push_metrics(
    client: Client,
    metrics: Arc<Metrics>,
    resource: Arc<Vec<(String, String)>>,
    interval: Duration,
    dropped: prometheus_client::metrics::counter::Counter,
    mut stop: watch::Receiver<bool>,
) {
    let start = unix_nano_now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Retries end before the next push is due.
    let backoff = Backoff {
        attempts: 4,
        max: (interval / 4).max(Duration::from_millis(50)),
        ..Backoff::default()
    };
    let mut logged = false;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let times = metrics::Times {
            start_unix_nano: start,
            now_unix_nano: unix_nano_now(),
        };
        let request = match metrics.read(|r| metrics::snapshot(r, &resource, times)) {
            Ok(r) => r,
            Err(_) => {
                tracing::error!("cannot encode the registry for OTLP");
                dropped.inc();
                if stopping {
                    return;
                }
                continue;
            }
        };
        let mut make = || Payload::Metrics(request.clone());
        let ok = queue::send_with_retry(&client, &mut make, backoff, &mut stop, "metrics").await;
        if !ok {
            dropped.inc();
            if !logged {
                tracing::warn!("OTLP metrics push failed; retrying every interval (counted in inferscope_export_dropped_total)");
                logged = true;
            }
        } else if logged {
            tracing::info!("OTLP metrics push works again");
            logged = false;
        }
        if stopping {
            return;
        }
    }
}

//! The bounded queue in front of span and log export, and the task that drains it in batches.
//! Producers never wait: `offer` gives the item up when the queue holds `otlp.queue_size`
//! items or `otlp.queue_bytes` bytes (a log record carries a tenant's command line: its size
//! is the tenant's) and counts it in `inferscope_export_dropped_total{signal}`. The batcher retries a failed
//! request with exponential backoff (capped), then drops the batch and counts its items, so a
//! collector that is down costs at most one queue of memory.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use super::transport::{Client, Payload};
use crate::queue::{self, Receiver, Weigh};

/// A queue of at most `size` items and `bytes` bytes.
/// Producers never wait: [`queue::Sender::offer`] gives an item up and counts it when full.
pub fn channel<T: Weigh>(
    size: usize,
    bytes: usize,
    dropped: Counter,
) -> (queue::Sender<T>, Receiver<T>) {
    queue::with_items(bytes, size, dropped)
}

/// Retry policy of one request.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    /// Attempts per request, the first included.
    pub attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(200),
            max: Duration::from_secs(5),
            attempts: 5,
        }
    }
}

impl Backoff {
    /// Delay before attempt `n` (1-based: the delay after the first failure is `first`).
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32 << n.saturating_sub(1).min(16);
        self.first.saturating_mul(factor).min(self.max)
    }
}

/// Sends `payload` (rebuilt by `make` for each attempt) until it succeeds, fails for good, the
/// attempts run out, or `stop` is set (then one attempt is made and no more waiting).
/// Returns whether it was delivered.
pub async fn send_with_retry(
    client: &Client,
    make: &mut (dyn FnMut() -> Payload + Send),
    backoff: Backoff,
    stop: &mut watch::Receiver<bool>,
    signal: &'static str,
) -> bool {
    let mut attempt = 1;
    loop {
        match client.send(make()).await {
            Ok(()) => return true,
            Err(e) => {
                let last = attempt >= backoff.attempts || !e.retryable() || *stop.borrow();
                if last {
                    tracing::debug!(signal, error = %e, attempt, "OTLP export failed; dropped");
                    return false;
                }
                tracing::debug!(signal, error = %e, attempt, "OTLP export failed; retrying");
                let delay = backoff.delay(attempt);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
                attempt += 1;
            }
        }
    }
}

/// Turns a batch into a request.
pub type Build<T> = Box<dyn Fn(&[T]) -> Payload + Send + Sync>;

/// What a batcher needs besides its queue.
pub struct Batcher<T> {
    pub client: Client,
    pub signal: &'static str,
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub backoff: Backoff,
    pub dropped: Counter,
    pub build: Build<T>,
}

impl<T: Send + Sync + 'static> Batcher<T> {
    /// Drains `rx` until `stop` is set, then sends what is left once (the caller bounds the
    /// time this takes).
    pub async fn run(self, mut rx: Receiver<T>, mut stop: watch::Receiver<bool>) {
        let mut batch: Vec<T> = Vec::with_capacity(self.batch_size);
        let mut tick = tokio::time::interval(self.batch_timeout);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => {
                        batch.push(item);
                        if batch.len() < self.batch_size {
                            continue;
                        }
                        false
                    }
                    None => true,
                },
                _ = tick.tick() => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopping {
                rx.close();
                while let Ok(item) = rx.try_recv() {
                    batch.push(item);
                }
                for chunk in batch.chunks(self.batch_size) {
                    self.send(chunk, &mut stop).await;
                }
                return;
            }
            if !batch.is_empty() {
                self.send(&batch, &mut stop).await;
                batch.clear();
            }
        }
    }

    async fn send(&self, batch: &[T], stop: &mut watch::Receiver<bool>) {
        let mut make = || (self.build)(batch);
        if !send_with_retry(&self.client, &mut make, self.backoff, stop, self.signal).await {
            self.dropped.inc_by(batch.len() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weigh for u32 {
        fn weight(&self) -> usize {
            4
        }
    }

    #[test]
    fn a_full_queue_counts_drops_and_never_blocks() {
        let dropped = Counter::default();
        let (sink, rx) = channel::<u32>(3, 1 << 20, dropped.clone());
        for i in 0..10 {
            sink.offer(i);
        }
        assert_eq!(dropped.get(), 7);
        let mut got = Vec::new();
        while let Ok(i) = rx.try_recv() {
            got.push(i);
        }
        assert_eq!(got, vec![0, 1, 2]);
        drop(rx);
        sink.offer(99);
        assert_eq!(dropped.get(), 8, "offers after export stopped are counted");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            attempts: 10,
        };
        let d: Vec<u128> = (1..7).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_unreachable_collector_drops_whole_batches() {
        // Nothing listens on this port (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = super::super::config::Target {
            url: format!("http://127.0.0.1:{port}/v1/logs"),
            protocol: super::super::config::Protocol::HttpProtobuf,
            headers: vec![],
            timeout: Duration::from_millis(200),
            tls: Default::default(),
        };
        let dropped = Counter::default();
        let (sink, rx) = channel::<u32>(100, 1 << 20, dropped.clone());
        let records = super::super::logs::Records::default();
        let b = Batcher {
            client: Client::new(
                &target,
                super::super::config::Signal::Logs,
                &opentelemetry_sdk::Resource::builder_empty().build(),
            )
            .unwrap(),
            signal: "logs",
            batch_size: 4,
            batch_timeout: Duration::from_millis(50),
            backoff: Backoff {
                first: Duration::from_millis(10),
                max: Duration::from_millis(20),
                attempts: 2,
            },
            dropped: dropped.clone(),
            build: Box::new(move |batch| {
                Payload::Logs(
                    batch
                        .iter()
                        .map(|i: &u32| {
                            records.record(&super::super::logs::item(&crate::events::Notice::Xid(
                                crate::events::XidError {
                                    time_unix_nano: 1,
                                    gpu: *i,
                                    uuid: "GPU-0".into(),
                                    xid: 79,
                                },
                            )))
                        })
                        .collect(),
                )
            }),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        for i in 0..10 {
            sink.offer(i);
        }
        let task = tokio::spawn(b.run(rx, stop_rx));
        // Let it fail every batch.
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tokio::task::yield_now().await;
            if dropped.get() == 10 {
                break;
            }
        }
        let _ = stop_tx.send(true);
        task.await.unwrap();
        assert_eq!(
            dropped.get(),
            10,
            "every item of every failed batch is counted"
        );
    }
}

//! Reading the ring buffer. The probes submit without waking the reader (a wakeup costs
//! microseconds per event); the reader drains on a short timer and on the wakeups the kernel
//! side forces for failures and when the ring fills past a mark. Events go to the tracker in
//! batches over a queue bounded by bytes (`crate::queue`); a batch of the `http` family's
//! records, whose payloads vary, is cut at [`MAX_HTTP_BATCH_BYTES`].

pub mod decode;

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch};

pub use decode::{decode, DecodeError, Event};

use crate::{health::Heartbeat, metrics::Metrics, queue::Sender, track::Input};

/// Records per batch.
pub const MAX_BATCH: usize = 4096;
/// Bytes of the `http` family's records per batch (payloads up to 4 KiB each): a batch is
/// a small share of its queue (`crate::http::QUEUE_BYTES`).
pub const MAX_HTTP_BATCH_BYTES: usize = 1024 * 1024;

pub type Batch = Vec<Event>;

/// Runs until `stop` turns true, then drains what is left and returns.
pub async fn run(
    ring: RingBuf<MapData>,
    poll: Duration,
    out: Sender<Input>,
    metrics: std::sync::Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    run_with_http(ring, poll, out, None, metrics, stop, Heartbeat::default()).await
}

/// As [`run`], with the `http` family's records sent to their own stage (records of that
/// family are counted as dropped when there is none). Beats `heartbeat` at every poll.
pub async fn run_with_http(
    ring: RingBuf<MapData>,
    poll: Duration,
    out: Sender<Input>,
    http: Option<Sender<crate::http::tracker::Input>>,
    metrics: std::sync::Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    heartbeat: Heartbeat,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, which drops it last.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        heartbeat.beat();
        let stopping = tokio::select! {
            guard = fd.readable_mut() => {
                if let Ok(mut guard) = guard {
                    guard.clear_ready();
                }
                false
            }
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        if !drain(fd.get_mut(), &out, http.as_ref(), &metrics).await || stopping || *stop.borrow() {
            drain(fd.get_mut(), &out, http.as_ref(), &metrics).await;
            heartbeat.done();
            return Ok(());
        }
    }
}

/// Reads every available record. Returns false when the tracker has gone away.
async fn drain(
    ring: &mut RingBuf<MapData>,
    out: &Sender<Input>,
    http: Option<&Sender<crate::http::tracker::Input>>,
    metrics: &Metrics,
) -> bool {
    loop {
        let mut batch = Vec::with_capacity(64);
        let mut http_batch = Vec::new();
        let mut http_bytes = 0;
        while batch.len() + http_batch.len() < MAX_BATCH && http_bytes < MAX_HTTP_BATCH_BYTES {
            let Some(item) = ring.next() else { break };
            if let Some(r) = crate::http::record(&item) {
                match r {
                    Ok(r) if http.is_some() => {
                        http_bytes += item.len();
                        http_batch.push(r);
                    }
                    Ok(_) => metrics.drop_reason("no_http_stage"),
                    Err(e) => metrics.drop_reason(e.reason()),
                }
                continue;
            }
            match decode(&item) {
                Ok(ev) => batch.push(ev),
                Err(e) => metrics.drop_reason(e.reason()),
            }
        }
        let full =
            batch.len() + http_batch.len() == MAX_BATCH || http_bytes >= MAX_HTTP_BATCH_BYTES;
        if let (Some(tx), false) = (http, http_batch.is_empty()) {
            if tx
                .send(crate::http::tracker::Input::Records(http_batch))
                .await
                .is_err()
            {
                return false;
            }
        }
        if batch.is_empty() {
            if full {
                continue;
            }
            return true;
        }
        // Backpressure: a full queue slows the reader; the ring absorbs bursts and counts
        // what it cannot hold (inferscope_events_lost_total).
        if out.send(Input::Events(batch)).await.is_err() {
            return false;
        }
        if !full {
            return true;
        }
    }
}

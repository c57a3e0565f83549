//! Reading the ring buffer. The probes submit without waking the reader (a wakeup costs
//! microseconds per event); the reader drains on a short timer and on the wakeups the kernel
//! side forces for failures and when the ring fills past a mark. Each record is decoded once
//! ([`decode()`]) into its family's type and routed to that family's subscriber, in batches
//! over a queue bounded by bytes (`crate::queue`): the ledger's [`Event`]s to one, the `http`
//! family's [`HttpRecord`]s to another (counted as dropped, `no_http_stage`, when there is
//! none). The reader names neither subscriber: each takes its input as `From` a batch. A batch
//! of the `http` family's records, whose payloads vary, is cut at [`MAX_HTTP_BATCH_BYTES`].

pub mod decode;
mod http;

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch};

pub use decode::{decode, DecodeError, Decoded, Discovery, Event};
pub use http::HttpRecord;

use crate::{
    health::Heartbeat,
    metrics::Metrics,
    queue::{Sender, Weigh},
};

/// Records per batch.
pub const MAX_BATCH: usize = 4096;
/// Bytes of the `http` family's records per batch (payloads up to 4 KiB each): a batch is
/// a small share of its queue (`crate::http::QUEUE_BYTES`).
pub const MAX_HTTP_BATCH_BYTES: usize = 1024 * 1024;

pub type Batch = Vec<Event>;

/// Runs until `stop` turns true, then drains what is left and returns. [`Event`]s go to
/// `events`, [`HttpRecord`]s to `http` (counted as dropped when it is None). Beats
/// `heartbeat` at every poll.
pub async fn run<E, H>(
    ring: RingBuf<MapData>,
    poll: Duration,
    events: Sender<E>,
    http: Option<Sender<H>>,
    metrics: std::sync::Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    heartbeat: Heartbeat,
) -> std::io::Result<()>
where
    E: From<Vec<Event>> + Weigh,
    H: From<Vec<HttpRecord>> + Weigh,
{
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
        if !drain(fd.get_mut(), &events, http.as_ref(), &metrics).await
            || stopping
            || *stop.borrow()
        {
            drain(fd.get_mut(), &events, http.as_ref(), &metrics).await;
            heartbeat.done();
            return Ok(());
        }
    }
}

/// Reads every available record. Returns false when a subscriber has gone away.
async fn drain<E, H>(
    ring: &mut RingBuf<MapData>,
    events: &Sender<E>,
    http: Option<&Sender<H>>,
    metrics: &Metrics,
) -> bool
where
    E: From<Vec<Event>> + Weigh,
    H: From<Vec<HttpRecord>> + Weigh,
{
    loop {
        let mut batch = Vec::with_capacity(64);
        let mut http_batch = Vec::new();
        let mut http_bytes = 0;
        while batch.len() + http_batch.len() < MAX_BATCH && http_bytes < MAX_HTTP_BATCH_BYTES {
            let Some(item) = ring.next() else { break };
            match decode(&item) {
                Ok(Decoded::Event(ev)) => batch.push(ev),
                Ok(Decoded::Http(r)) if http.is_some() => {
                    http_bytes += item.len();
                    http_batch.push(r);
                }
                Ok(Decoded::Http(_)) => metrics.drop_reason("no_http_stage"),
                // Discovery has a ring of its own; one here is a kernel-side bug, counted.
                Ok(Decoded::Discovery(_)) => metrics.drop_reason("unknown_kind"),
                Err(e) => metrics.drop_reason(e.reason()),
            }
        }
        let full =
            batch.len() + http_batch.len() == MAX_BATCH || http_bytes >= MAX_HTTP_BATCH_BYTES;
        if let (Some(tx), false) = (http, http_batch.is_empty()) {
            if tx.send(H::from(http_batch)).await.is_err() {
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
        if events.send(E::from(batch)).await.is_err() {
            return false;
        }
        if !full {
            return true;
        }
    }
}

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

use std::{sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{watch, Notify},
};

pub use decode::{decode, decode_in, DecodeError, Decoded, Discovery, Event};
pub use http::{Arena, HttpRecord};

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
/// Records of the `http` family per batch: its vector (about 80 KiB) stays below the
/// allocator's `mmap` threshold, so it is reused from the heap, where one of 4,096 records
/// (about 320 KiB) could be mapped and faulted in afresh at every batch.
pub const MAX_HTTP_BATCH: usize = 1024;

pub type Batch = Vec<Event>;

/// Polls with nothing read after which a reader sleeps without its timer.
pub const IDLE_POLLS: u32 = 20;
/// How often a sleeping reader still wakes (its heartbeat).
pub const IDLE_BEAT: Duration = Duration::from_secs(1);

/// How a reader that has found nothing for a while sleeps without a timer: it lowers its
/// ring's wakeup mark (a `CONFIG` slot the probes read) to one byte, so that the next record
/// forces a wakeup, and raises it again once awake. A node without CUDA or HTTP traffic then
/// costs the agent no timer wakeups, and the first record after a quiet spell is read at once.
pub struct WakeMark {
    pub config: aya::maps::Array<MapData, u64>,
    pub index: u32,
    /// The mark while awake (a quarter of the ring).
    pub awake: u64,
}

impl WakeMark {
    fn set(&mut self, mark: u64) -> bool {
        self.config.set(self.index, mark, 0).is_ok()
    }
}

/// What the `http` subscriber is told after a drain that read records or was asked for:
/// every record committed before `at_ns` (CLOCK_MONOTONIC) has been sent ahead of this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    pub at_ns: u64,
    /// The drain was asked for (`asked` of [`run`]): someone waits to see it.
    pub asked: bool,
}

/// Runs until `stop` turns true, then drains what is left and returns. [`Event`]s go to
/// `events`, [`HttpRecord`]s to `http` (counted as dropped when it is None), each drain that
/// read records or was asked for followed by a [`Drained`] there. Beats `heartbeat` at every
/// poll. With `wake`, it sleeps without its timer after [`IDLE_POLLS`] empty polls. A
/// notification on `asked` drains at once, between polls: a forensic report waits for the
/// requests up to its failure.
#[expect(
    clippy::too_many_arguments,
    reason = "the reader's inputs, named at the two calls"
)]
pub async fn run<E, H>(
    ring: RingBuf<MapData>,
    poll: Duration,
    events: Sender<E>,
    http: Option<Sender<H>>,
    metrics: std::sync::Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    heartbeat: Heartbeat,
    mut wake: Option<WakeMark>,
    asked: Option<Arc<Notify>>,
) -> std::io::Result<()>
where
    E: From<Vec<Event>> + Weigh,
    H: From<Vec<HttpRecord>> + From<Drained> + Weigh,
{
    // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, which drops it last.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
    let mut arena = Arena::default();
    let mut empty = 0u32;
    let mut asleep = false;
    loop {
        heartbeat.beat();
        let wait = if asleep { IDLE_BEAT } else { poll };
        let mut was_asked = false;
        let stopping = tokio::select! {
            guard = fd.readable_mut() => {
                if let Ok(mut guard) = guard {
                    guard.clear_ready();
                }
                false
            }
            _ = tokio::time::sleep(wait) => false,
            _ = stop.changed() => true,
            () = notified(asked.as_deref()) => {
                was_asked = true;
                false
            }
        };
        let at_ns = crate::clock::monotonic_ns();
        let mut read = drain(fd.get_mut(), &mut arena, &events, http.as_ref(), &metrics).await;
        if read.is_some_and(|n| n == 0) && !asleep {
            empty += 1;
            if empty >= IDLE_POLLS {
                if let Some(w) = wake.as_mut() {
                    // Lowered first, then one more look: a record submitted before the
                    // probes saw the new mark did not wake anyone.
                    asleep = w.set(1);
                    read = drain(fd.get_mut(), &mut arena, &events, http.as_ref(), &metrics).await;
                }
            }
        }
        if let (Some(tx), Some(n)) = (http.as_ref(), read) {
            if (n > 0 || was_asked)
                && tx
                    .send(H::from(Drained {
                        at_ns,
                        asked: was_asked,
                    }))
                    .await
                    .is_err()
            {
                read = None;
            }
        }
        if read.is_some_and(|n| n > 0) {
            empty = 0;
            if asleep {
                if let Some(w) = wake.as_mut() {
                    w.set(w.awake);
                }
                asleep = false;
            }
        }
        if read.is_none() || stopping || *stop.borrow() {
            drain(fd.get_mut(), &mut arena, &events, http.as_ref(), &metrics).await;
            if let Some(w) = wake.as_mut() {
                w.set(w.awake);
            }
            heartbeat.done();
            return Ok(());
        }
    }
}

async fn notified(asked: Option<&Notify>) {
    match asked {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// Reads every available record. Returns how many, or `None` when a subscriber has gone
/// away.
async fn drain<E, H>(
    ring: &mut RingBuf<MapData>,
    arena: &mut Arena,
    events: &Sender<E>,
    http: Option<&Sender<H>>,
    metrics: &Metrics,
) -> Option<usize>
where
    E: From<Vec<Event>> + Weigh,
    H: From<Vec<HttpRecord>> + Weigh,
{
    let mut read = 0;
    loop {
        let mut batch = Vec::with_capacity(64);
        let mut http_batch = Vec::new();
        let mut http_bytes = 0;
        let room = |batch: &Vec<Event>, http: &Vec<HttpRecord>, bytes: usize| {
            batch.len() + http.len() < MAX_BATCH
                && http.len() < MAX_HTTP_BATCH
                && bytes < MAX_HTTP_BATCH_BYTES
        };
        while room(&batch, &http_batch, http_bytes) {
            let Some(item) = ring.next() else { break };
            read += 1;
            match decode_in(&item, arena) {
                Ok(Decoded::Event(ev)) => batch.push(ev),
                Ok(Decoded::Http(r)) if http.is_some() => {
                    http_bytes += item.len();
                    if http_batch.capacity() == 0 {
                        http_batch.reserve_exact(MAX_HTTP_BATCH);
                    }
                    http_batch.push(r);
                }
                Ok(Decoded::Http(_)) => metrics.drop_reason("no_http_stage"),
                // Discovery has a ring of its own; one here is a kernel-side bug, counted.
                Ok(Decoded::Discovery(_)) => metrics.drop_reason("unknown_kind"),
                Err(e) => metrics.drop_reason(e.reason()),
            }
        }
        let full = !room(&batch, &http_batch, http_bytes);
        if let (Some(tx), false) = (http, http_batch.is_empty()) {
            if tx.send(H::from(http_batch)).await.is_err() {
                return None;
            }
        }
        if batch.is_empty() {
            if full {
                continue;
            }
            return Some(read);
        }
        // Backpressure: a full queue slows the reader; the ring absorbs bursts and counts
        // what it cannot hold (inferscope_events_lost_total).
        if events.send(E::from(batch)).await.is_err() {
            return None;
        }
        if !full {
            return Some(read);
        }
    }
}

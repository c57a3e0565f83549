//! Reading the ring buffer. The probes submit without waking the reader (a wakeup costs
//! microseconds per event); the reader drains on a short timer and on the wakeups the kernel
//! side forces for failures and when the ring fills past a mark. Events go to the tracker in
//! batches over a bounded channel.

pub mod decode;

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

pub use decode::{decode, DecodeError, Event};

use crate::{export::metrics::Metrics, track::Input};

const MAX_BATCH: usize = 4096;

pub type Batch = Vec<Event>;

/// Runs until `stop` turns true, then drains what is left and returns.
pub async fn run(
    ring: RingBuf<MapData>,
    poll: Duration,
    out: mpsc::Sender<Input>,
    metrics: std::sync::Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, which drops it last.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
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
        if !drain(fd.get_mut(), &out, &metrics).await || stopping || *stop.borrow() {
            drain(fd.get_mut(), &out, &metrics).await;
            return Ok(());
        }
    }
}

/// Reads every available record. Returns false when the tracker has gone away.
async fn drain(ring: &mut RingBuf<MapData>, out: &mpsc::Sender<Input>, metrics: &Metrics) -> bool {
    loop {
        let mut batch = Vec::with_capacity(64);
        while batch.len() < MAX_BATCH {
            let Some(item) = ring.next() else { break };
            match decode(&item) {
                Ok(ev) => batch.push(ev),
                Err(e) => metrics.record_dropped(&e),
            }
        }
        if batch.is_empty() {
            return true;
        }
        let full = batch.len() == MAX_BATCH;
        // Backpressure: a full channel slows the reader; the ring absorbs bursts and counts
        // what it cannot hold (inferscope_events_lost_total).
        if out.send(Input::Events(batch)).await.is_err() {
            return false;
        }
        if !full {
            return true;
        }
    }
}

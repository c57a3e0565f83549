//! The queue between two stages, bounded by the bytes its items hold rather than by their
//! number: a batch of records, a forensic draft carrying a process's allocations, a span each
//! weigh what they hold ([`Weigh`]), so a queue of large items cannot hold more than one of
//! small ones. A producer either waits for room (the ring-buffer readers: the ring absorbs
//! what cannot wait and counts what it loses) or gives its item up, counted in
//! `inferscope_dropped_total{what=<the queue>,reason="queue_full"}`. An item heavier than the
//! whole queue passes alone, once the queue is empty, so that no producer waits for ever.
//!
//! One consumer, any number of producers, async or not on either side: the trackers await
//! their input, the forensics writer and the watcher are threads.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Condvar, Mutex, MutexGuard, Weak,
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

/// Bytes an item holds, its heap included (approximately: capacities, not lengths).
pub trait Weigh {
    fn weight(&self) -> usize;
}

/// A bounded queue of `bytes`; items given up are counted in `dropped`.
pub fn channel<T: Weigh>(bytes: usize, dropped: Counter) -> (Sender<T>, Receiver<T>) {
    with_items(bytes, usize::MAX, dropped)
}

/// As [`channel`], holding at most `items` as well (a limit operators set in items).
pub fn with_items<T: Weigh>(
    bytes: usize,
    items: usize,
    dropped: Counter,
) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            bytes: 0,
            receiver: true,
        }),
        capacity: bytes,
        max_items: items.max(1),
        senders: AtomicUsize::new(1),
        dropped,
        changed: Notify::new(),
        changed_cv: Condvar::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    max_items: usize,
    /// Live [`Sender`]s: none left and nothing queued, the receiver sees the end.
    senders: AtomicUsize,
    dropped: Counter,
    /// Wakes whoever waits, async or not: an item came or went, or one side left.
    changed: Notify,
    changed_cv: Condvar,
}

struct State<T> {
    items: VecDeque<(T, usize)>,
    bytes: usize,
    receiver: bool,
}

/// Why an item was not queued; it comes back.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError<T> {
    /// No room now ([`Sender::try_send`] only).
    Full(T),
    /// The receiver has gone.
    Closed(T),
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        self.changed.notify_waiters();
        self.changed_cv.notify_all();
    }

    /// Whether an item of `weight` fits now (alone, any item does).
    fn room(&self, s: &State<T>, weight: usize) -> bool {
        s.items.is_empty() || (s.bytes + weight <= self.capacity && s.items.len() < self.max_items)
    }

    /// Queues `item` of `weight` if there is room; the item back if not. The caller wakes
    /// the receiver once the lock is released.
    fn push_locked(&self, s: &mut State<T>, item: T, weight: usize) -> Result<(), SendError<T>> {
        if !s.receiver {
            return Err(SendError::Closed(item));
        }
        if !self.room(s, weight) {
            return Err(SendError::Full(item));
        }
        s.bytes += weight;
        s.items.push_back((item, weight));
        Ok(())
    }

    fn push(&self, item: T, weight: usize) -> Result<(), SendError<T>> {
        let pushed = self.push_locked(&mut self.lock(), item, weight);
        if pushed.is_ok() {
            self.wake();
        }
        pushed
    }

    /// The next item; the caller wakes the senders once the lock is released.
    fn pop_locked(&self, s: &mut State<T>) -> Result<T, RecvError> {
        if let Some((item, weight)) = s.items.pop_front() {
            s.bytes -= weight;
            return Ok(item);
        }
        if self.senders.load(Ordering::Acquire) == 0 {
            return Err(RecvError::Closed);
        }
        Err(RecvError::Timeout)
    }
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::AcqRel);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.wake();
        }
    }
}

impl<T: Weigh> Sender<T> {
    pub fn try_send(&self, item: T) -> Result<(), SendError<T>> {
        let weight = item.weight();
        self.shared.push(item, weight)
    }

    /// Queues `item`, or gives it up (counted) when there is no room or no receiver;
    /// returns whether it was queued.
    pub fn offer(&self, item: T) -> bool {
        let queued = self.try_send(item).is_ok();
        if !queued {
            self.shared.dropped.inc();
        }
        queued
    }

    /// Waits for room, then queues `item`; the item back when the receiver has gone.
    pub async fn send(&self, item: T) -> Result<(), T> {
        let weight = item.weight();
        let mut item = item;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a wake between the two is not missed.
            changed.as_mut().enable();
            match self.shared.push(item, weight) {
                Ok(()) => return Ok(()),
                Err(SendError::Closed(back)) => return Err(back),
                Err(SendError::Full(back)) => item = back,
            }
            changed.await;
        }
    }

    /// [`Sender::send`] for a thread outside the runtime.
    pub fn blocking_send(&self, item: T) -> Result<(), T> {
        let weight = item.weight();
        let mut item = item;
        let mut s = self.shared.lock();
        loop {
            match self.shared.push_locked(&mut s, item, weight) {
                Ok(()) => {
                    drop(s);
                    self.shared.wake();
                    return Ok(());
                }
                Err(SendError::Closed(back)) => return Err(back),
                Err(SendError::Full(back)) => item = back,
            }
            s = self
                .shared
                .changed_cv
                .wait(s)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A sender that does not keep the queue open.
    pub fn downgrade(&self) -> WeakSender<T> {
        WeakSender {
            shared: Arc::downgrade(&self.shared),
        }
    }
}

/// A sender that does not keep the queue open: the receiver sees the end once the strong
/// ones are gone, and [`WeakSender::upgrade`] fails from then on.
pub struct WeakSender<T> {
    shared: Weak<Shared<T>>,
}

impl<T> Clone for WeakSender<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> WeakSender<T> {
    pub fn upgrade(&self) -> Option<Sender<T>> {
        let shared = self.shared.upgrade()?;
        let mut n = shared.senders.load(Ordering::Acquire);
        loop {
            if n == 0 {
                return None;
            }
            match shared
                .senders
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(Sender { shared }),
                Err(now) => n = now,
            }
        }
    }
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// What a receive found besides an item.
#[derive(Debug, PartialEq, Eq)]
pub enum RecvError {
    /// Nothing came in time.
    Timeout,
    /// Nothing is queued and every sender has gone.
    Closed,
}

impl<T> Receiver<T> {
    fn pop(&self) -> Result<T, RecvError> {
        let popped = self.shared.pop_locked(&mut self.shared.lock());
        if popped.is_ok() {
            self.shared.wake();
        }
        popped
    }

    /// The next item, without waiting.
    pub fn try_recv(&self) -> Result<T, RecvError> {
        self.pop()
    }

    /// The next item; None once nothing is queued and every sender has gone.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.pop() {
                Ok(item) => return Some(item),
                Err(RecvError::Closed) => return None,
                Err(RecvError::Timeout) => {}
            }
            changed.await;
        }
    }

    /// The next item, waiting at most `timeout` (for a thread outside the runtime).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvError> {
        let until = Instant::now() + timeout;
        let mut s = self.shared.lock();
        loop {
            match self.shared.pop_locked(&mut s) {
                Ok(item) => {
                    drop(s);
                    self.shared.wake();
                    return Ok(item);
                }
                Err(RecvError::Closed) => return Err(RecvError::Closed),
                Err(RecvError::Timeout) => {}
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RecvError::Timeout);
            }
            s = self
                .shared
                .changed_cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Refuses further items; those queued can still be received.
    pub fn close(&mut self) {
        self.shared.lock().receiver = false;
        self.shared.wake();
    }

    /// Bytes queued now.
    pub fn bytes(&self) -> usize {
        self.shared.lock().bytes
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.receiver = false;
        s.items.clear();
        s.bytes = 0;
        drop(s);
        self.shared.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An item of a given weight.
    #[derive(Debug, PartialEq, Eq)]
    struct Item(usize);

    impl Weigh for Item {
        fn weight(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn bytes_not_items_bound_the_queue_and_drops_are_counted() {
        let dropped = Counter::default();
        let (tx, rx) = channel::<Item>(1000, dropped.clone());
        // Ten small items fit where two large ones do not.
        for _ in 0..10 {
            tx.offer(Item(100));
        }
        tx.offer(Item(1));
        assert_eq!(dropped.get(), 1);
        assert_eq!(rx.bytes(), 1000);
        assert_eq!(rx.try_recv(), Ok(Item(100)));
        tx.offer(Item(600));
        assert_eq!(dropped.get(), 2, "600 bytes do not fit in the 100 freed");
        tx.offer(Item(100));
        assert_eq!(rx.bytes(), 1000);
        assert_eq!(dropped.get(), 2);
    }

    #[test]
    fn an_item_limit_holds_beside_the_bytes() {
        let dropped = Counter::default();
        let (tx, rx) = with_items::<Item>(1000, 3, dropped.clone());
        for _ in 0..5 {
            tx.offer(Item(1));
        }
        assert_eq!((dropped.get(), rx.bytes()), (2, 3));
    }

    #[test]
    fn an_item_heavier_than_the_queue_passes_alone() {
        let dropped = Counter::default();
        let (tx, rx) = channel::<Item>(100, dropped.clone());
        tx.offer(Item(10));
        tx.offer(Item(5000));
        assert_eq!(dropped.get(), 1, "not beside another item");
        assert_eq!(rx.try_recv(), Ok(Item(10)));
        tx.offer(Item(5000));
        assert_eq!(dropped.get(), 1, "alone, it passes");
        tx.offer(Item(1));
        assert_eq!(dropped.get(), 2);
        assert_eq!(rx.try_recv(), Ok(Item(5000)));
        assert_eq!(rx.bytes(), 0);
    }

    #[test]
    fn the_receiver_sees_the_end_when_strong_senders_are_gone() {
        let (tx, rx) = channel::<Item>(100, Counter::default());
        let weak = tx.downgrade();
        let tx2 = weak.upgrade().expect("a strong sender is alive");
        tx2.offer(Item(1));
        drop(tx);
        drop(tx2);
        assert!(weak.upgrade().is_none());
        assert_eq!(rx.try_recv(), Ok(Item(1)), "what was queued is received");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(RecvError::Closed)
        );
    }

    #[test]
    fn a_gone_receiver_refuses_items_and_counts_offers() {
        let dropped = Counter::default();
        let (tx, rx) = channel::<Item>(100, dropped.clone());
        drop(rx);
        assert_eq!(tx.try_send(Item(1)), Err(SendError::Closed(Item(1))));
        assert_eq!(tx.blocking_send(Item(2)), Err(Item(2)));
        tx.offer(Item(3));
        assert_eq!(dropped.get(), 1);
    }

    #[test]
    fn a_blocked_thread_sends_once_room_is_made() {
        let (tx, rx) = channel::<Item>(100, Counter::default());
        tx.offer(Item(100));
        let sender = std::thread::spawn(move || tx.blocking_send(Item(50)));
        assert_eq!(rx.recv_timeout(Duration::from_millis(10)), Ok(Item(100)));
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(Item(50)));
        assert_eq!(sender.join().unwrap(), Ok(()));
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(10)),
            Err(RecvError::Closed)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_async_sender_waits_for_room_and_nothing_is_lost() {
        let (tx, mut rx) = channel::<Item>(1000, Counter::default());
        let producer = tokio::spawn(async move {
            for i in 0..200 {
                tx.send(Item(100 + i % 7)).await.unwrap();
            }
        });
        let mut got = 0;
        let mut most = 0;
        while let Some(Item(w)) = rx.recv().await {
            assert_eq!(w, 100 + got % 7, "in order");
            got += 1;
            most = most.max(rx.bytes());
        }
        producer.await.unwrap();
        assert_eq!(got, 200);
        assert!(most <= 1000, "{most} bytes queued");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn close_refuses_new_items_and_keeps_queued_ones() {
        let (tx, mut rx) = channel::<Item>(1000, Counter::default());
        tx.offer(Item(1));
        rx.close();
        assert_eq!(tx.send(Item(2)).await, Err(Item(2)));
        assert_eq!(rx.try_recv(), Ok(Item(1)));
    }
}

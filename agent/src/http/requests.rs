//! The requests each watched server has in flight and those that ended lately, for forensic
//! reports: which requests were running when a process ran out of GPU memory, and which ones
//! failed after it. The tracker refreshes the requests in flight at most every [`LIVE_EVERY`]
//! (when they changed) and adds each finished one; a report's writer reads them. Nothing here
//! holds request content: sizes, times, counts, the model label and the client's address.

use std::{
    collections::{HashSet, VecDeque},
    net::SocketAddr,
    sync::Mutex,
    time::Duration,
};

/// How often at most the tracker refreshes the requests in flight (after a change).
pub const LIVE_EVERY: Duration = Duration::from_millis(200);

/// One request as the wire showed it (times are CLOCK_MONOTONIC ns).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestRecord {
    /// The server process (tgid) that answered it.
    pub server: u32,
    /// Its `model` label.
    pub model: String,
    pub start_ns: u64,
    pub first_token_ns: Option<u64>,
    pub last_token_ns: Option<u64>,
    pub token_events: u64,
    /// `None` while in flight.
    pub end_ns: Option<u64>,
    pub status: Option<u16>,
    /// Its `error_type` label, when it failed.
    pub error: Option<&'static str>,
    /// Bytes of the request body: the prompt's size on the wire.
    pub request_bytes: u64,
    pub prompt_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    pub client: Option<SocketAddr>,
}

impl RequestRecord {
    /// Token events it had produced by `t`: exact before the first and from the last on, and
    /// in between as if evenly spaced (the gaps themselves are not kept here).
    pub fn tokens_at(&self, t: u64) -> u64 {
        let (Some(first), n) = (self.first_token_ns, self.token_events) else {
            return 0;
        };
        let last = self.last_token_ns.unwrap_or(first);
        if t < first || n == 0 {
            0
        } else if t >= last || last == first {
            n
        } else {
            1 + ((n - 1) as u128 * u128::from(t - first) / u128::from(last - first)) as u64
        }
    }

    /// Whether it was in flight at `t`: arrived by then and not yet ended.
    pub fn in_flight_at(&self, t: u64) -> bool {
        self.start_ns <= t && self.end_ns.is_none_or(|end| end >= t)
    }
}

struct Inner {
    /// When the requests in flight were last refreshed.
    live_ns: u64,
    live: Vec<RequestRecord>,
    /// Finished requests, oldest first.
    finished: VecDeque<RequestRecord>,
}

pub struct RequestLog {
    inner: Mutex<Inner>,
    /// Rung by a reader of the log that needs it fresh: the `http` ring's reader drains at
    /// once instead of at its next poll.
    asked: std::sync::Arc<tokio::sync::Notify>,
    retention_ns: u64,
    max_finished: usize,
    /// Finished requests given up before their retention ended (the bound was reached).
    dropped: prometheus_client::metrics::counter::Counter,
}

impl RequestLog {
    /// Keeps finished requests `retention` long, at most `max_finished` of them.
    pub fn new(
        retention: Duration,
        max_finished: usize,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner {
                live_ns: 0,
                live: Vec::new(),
                finished: VecDeque::new(),
            }),
            asked: Default::default(),
            retention_ns: retention.as_nanos() as u64,
            max_finished,
            dropped,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The requests in flight as of `through_ns`: every record the probes committed before
    /// it had been applied.
    pub fn set_live(&self, through_ns: u64, live: Vec<RequestRecord>) {
        let mut i = self.lock();
        i.live_ns = through_ns;
        i.live = live;
    }

    /// As of when the requests in flight were last refreshed.
    pub fn live_ns(&self) -> u64 {
        self.lock().live_ns
    }

    /// Asks for the requests in flight as of now: the ring is read and they are published
    /// without waiting for the reader's poll or the tracker's [`LIVE_EVERY`].
    pub fn ask_fresh(&self) {
        self.asked.notify_one();
    }

    /// What [`Self::ask_fresh`] rings: the `http` ring's reader waits on it.
    pub fn asked(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.asked.clone()
    }

    pub fn finished(&self, r: RequestRecord) {
        let end = r.end_ns.unwrap_or(r.start_ns);
        let horizon = end.saturating_sub(self.retention_ns);
        let mut i = self.lock();
        while i
            .finished
            .front()
            .is_some_and(|f| f.end_ns.unwrap_or(0) < horizon)
        {
            i.finished.pop_front();
        }
        if i.finished.len() >= self.max_finished {
            i.finished.pop_front();
            self.dropped.inc();
        }
        i.finished.push_back(r);
    }

    /// The requests of `servers` in flight at `t`, oldest first: those that finished since
    /// `t`, and those still in flight at the last refresh (a request both, having finished
    /// since, is taken as it finished).
    pub fn in_flight_at(&self, servers: &HashSet<u32>, t: u64) -> Vec<RequestRecord> {
        let key = |r: &RequestRecord| (r.server, r.start_ns, r.client);
        let wanted = |r: &&RequestRecord| servers.contains(&r.server) && r.in_flight_at(t);
        let i = self.lock();
        let mut out: Vec<RequestRecord> = i.finished.iter().filter(wanted).cloned().collect();
        let ended: HashSet<_> = i
            .finished
            .iter()
            .filter(|r| servers.contains(&r.server))
            .map(key)
            .collect();
        out.extend(
            i.live
                .iter()
                .filter(wanted)
                .filter(|r| !ended.contains(&key(r)))
                .cloned(),
        );
        out.sort_by_key(|r| r.start_ns);
        out
    }

    /// The requests of `servers` that ended after `from` and by `to`, in the order they ended.
    pub fn ended_between(&self, servers: &HashSet<u32>, from: u64, to: u64) -> Vec<RequestRecord> {
        self.lock()
            .finished
            .iter()
            .filter(|r| {
                servers.contains(&r.server) && r.end_ns.is_some_and(|e| e > from && e <= to)
            })
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(server: u32, start: u64, end: Option<u64>) -> RequestRecord {
        RequestRecord {
            server,
            start_ns: start,
            end_ns: end,
            ..Default::default()
        }
    }

    #[test]
    fn tokens_by_an_instant() {
        let r = RequestRecord {
            first_token_ns: Some(100),
            last_token_ns: Some(1100),
            token_events: 11,
            ..Default::default()
        };
        assert_eq!(r.tokens_at(99), 0);
        assert_eq!(r.tokens_at(100), 1);
        assert_eq!(r.tokens_at(600), 6);
        assert_eq!(r.tokens_at(1100), 11);
        assert_eq!(r.tokens_at(u64::MAX), 11);
        assert_eq!(RequestRecord::default().tokens_at(5), 0);
    }

    #[test]
    fn requests_in_flight_at_an_instant_and_those_that_ended_after() {
        let log = RequestLog::new(Duration::from_nanos(1000), 3, Default::default());
        log.finished(record(1, 10, Some(20)));
        log.finished(record(1, 15, Some(60)));
        log.finished(record(2, 15, Some(60)));
        // The one that started at 15 was in flight at the refresh and has finished since.
        log.set_live(
            70,
            vec![
                record(1, 15, None),
                record(1, 40, None),
                record(1, 65, None),
            ],
        );
        let one = HashSet::from([1]);
        let at = |t| {
            log.in_flight_at(&one, t)
                .iter()
                .map(|r| r.start_ns)
                .collect::<Vec<_>>()
        };
        assert_eq!(at(50), [15, 40]);
        assert_eq!(at(66), [40, 65]);
        let ended = log.ended_between(&one, 20, 100);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].end_ns, Some(60));
        // Past the bound, the oldest goes, counted.
        log.finished(record(1, 70, Some(80)));
        assert_eq!(log.dropped.get(), 1);
        assert!(log.ended_between(&one, 0, 20).is_empty());
        // Past the retention, too.
        log.finished(record(1, 2000, Some(3000)));
        assert_eq!(log.ended_between(&one, 0, 2000).len(), 0);
    }
}

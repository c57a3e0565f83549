//! Requests in flight per watched server over time, for forensics: the http stage records
//! each server's count once a second; a report reads the minutes before its event.

use std::{
    collections::{HashMap, VecDeque},
    sync::RwLock,
};

/// (CLOCK_MONOTONIC ns, requests in flight, their body bytes).
pub type Point = (u64, u32, u64);

pub struct LoadBoard {
    retention_ns: u64,
    /// Server tgid → (CLOCK_MONOTONIC ns, requests in flight, their body bytes).
    series: RwLock<HashMap<u32, VecDeque<Point>>>,
}

impl LoadBoard {
    pub fn new(retention_secs: u64) -> Self {
        Self {
            retention_ns: retention_secs.saturating_mul(1_000_000_000),
            series: RwLock::new(HashMap::new()),
        }
    }

    /// Records every server's count at `ts_ns`; servers missing from `counts` are gone.
    pub fn record(&self, ts_ns: u64, counts: &HashMap<u32, (u32, u64)>) {
        let mut series = self.series.write().unwrap_or_else(|e| e.into_inner());
        series.retain(|tgid, _| counts.contains_key(tgid));
        let horizon = ts_ns.saturating_sub(self.retention_ns);
        for (tgid, n) in counts {
            let ring = series.entry(*tgid).or_default();
            while ring.front().is_some_and(|(t, _, _)| *t < horizon) {
                ring.pop_front();
            }
            ring.push_back((ts_ns, n.0, n.1));
        }
    }

    /// Each server's counts between two instants.
    pub fn range(&self, from_ns: u64, to_ns: u64) -> Vec<(u32, Vec<Point>)> {
        let series = self.series.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u32, Vec<Point>)> = series
            .iter()
            .map(|(tgid, ring)| {
                let pts = ring
                    .iter()
                    .filter(|(t, _, _)| *t >= from_ns && *t <= to_ns)
                    .copied()
                    .collect();
                (*tgid, pts)
            })
            .filter(|(_, pts): &(u32, Vec<Point>)| !pts.is_empty())
            .collect();
        out.sort_by_key(|(tgid, _)| *tgid);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_window_and_forgets_gone_servers() {
        let b = LoadBoard::new(10);
        let s = 1_000_000_000;
        for t in 0..20 {
            b.record(t * s, &HashMap::from([(7, (t as u32, 100)), (8, (1, 5))]));
        }
        let r = b.range(0, 100 * s);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1.len(), 11);
        assert_eq!(r[0].1.last(), Some(&(19 * s, 19, 100)));
        b.record(20 * s, &HashMap::from([(8, (2, 10))]));
        assert_eq!(b.range(0, 100 * s).len(), 1);
    }
}

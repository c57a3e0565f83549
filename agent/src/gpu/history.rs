//! A ring of recent GPU samples per GPU, queried by time by the parts that correlate (the
//! tracker's failure annotations, forensics later).

use std::{
    collections::{HashMap, VecDeque},
    sync::RwLock,
};

use super::GpuSample;

pub struct GpuHistory {
    retention_ns: u64,
    rings: RwLock<HashMap<u32, VecDeque<GpuSample>>>,
    /// (uuid, name) per GPU, set once by the sampler.
    identity: RwLock<HashMap<u32, (String, String)>>,
}

impl GpuHistory {
    pub fn new(retention_secs: u64) -> Self {
        Self {
            retention_ns: retention_secs.saturating_mul(1_000_000_000),
            rings: RwLock::new(HashMap::new()),
            identity: RwLock::new(HashMap::new()),
        }
    }

    pub fn set_identity(&self, gpu: u32, uuid: String, name: String) {
        self.identity
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(gpu, (uuid, name));
    }

    /// (uuid, name) of a GPU NVML has seen.
    pub fn identity(&self, gpu: u32) -> Option<(String, String)> {
        self.identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&gpu)
            .cloned()
    }

    /// Whether NVML found GPU `gpu`; None while it has named none (no NVML).
    pub fn knows(&self, gpu: i32) -> Option<bool> {
        let identity = self.identity.read().unwrap_or_else(|e| e.into_inner());
        if identity.is_empty() {
            return None;
        }
        Some(u32::try_from(gpu).is_ok_and(|g| identity.contains_key(&g)))
    }

    pub fn push(&self, sample: GpuSample) {
        let mut rings = self.rings.write().unwrap_or_else(|e| e.into_inner());
        let ring = rings.entry(sample.gpu).or_default();
        let horizon = sample.ts_ns.saturating_sub(self.retention_ns);
        while ring.front().is_some_and(|s| s.ts_ns < horizon) {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    /// The GPU's state at `ts_ns` (CLOCK_MONOTONIC): the last sample taken at or before it,
    /// else the first one after (a failure in the first interval after start).
    pub fn at(&self, gpu: u32, ts_ns: u64) -> Option<GpuSample> {
        let rings = self.rings.read().unwrap_or_else(|e| e.into_inner());
        let ring = rings.get(&gpu)?;
        let after = ring.partition_point(|s| s.ts_ns <= ts_ns);
        if after > 0 {
            ring.get(after - 1).cloned()
        } else {
            ring.front().cloned()
        }
    }

    /// Samples of `gpu` between two instants, oldest first.
    pub fn range(&self, gpu: u32, from_ns: u64, to_ns: u64) -> Vec<GpuSample> {
        let rings = self.rings.read().unwrap_or_else(|e| e.into_inner());
        rings
            .get(&gpu)
            .map(|r| {
                r.iter()
                    .filter(|s| s.ts_ns >= from_ns && s.ts_ns <= to_ns)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn forget(&self, gpu: u32) {
        self.rings
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&gpu);
    }

    pub fn len(&self, gpu: u32) -> usize {
        self.rings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&gpu)
            .map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(gpu: u32, ts_s: u64, util: u32) -> GpuSample {
        GpuSample {
            gpu,
            ts_ns: ts_s * 1_000_000_000,
            utilization: Some(util),
            ..Default::default()
        }
    }

    #[test]
    fn answers_by_time_and_forgets_old_samples() {
        let h = GpuHistory::new(10);
        for t in 0..30 {
            h.push(sample(0, t, t as u32));
        }
        assert_eq!(h.len(0), 11, "10 s of history at 1 Hz, both ends included");
        assert_eq!(h.at(0, 25_500_000_000).unwrap().utilization, Some(25));
        assert_eq!(h.at(0, 25_000_000_000).unwrap().utilization, Some(25));
        // Before the oldest kept sample: the oldest.
        assert_eq!(h.at(0, 1).unwrap().utilization, Some(19));
        assert!(h.at(1, 0).is_none());
        assert_eq!(h.range(0, 20_000_000_000, 22_000_000_000).len(), 3);
        h.forget(0);
        assert!(h.at(0, 25_000_000_000).is_none());
    }
}

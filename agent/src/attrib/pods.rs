//! This node's pods, as the API server's list and watch leave them.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use super::metrics::AttribMetrics;
use super::{read, write};

/// A pod as attribution needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// (container id without runtime prefix, container name).
    pub containers: Vec<(String, String)>,
}

/// This node's pods by UID, bounded by `max_pods`.
pub struct PodStore {
    pods: RwLock<HashMap<String, Pod>>,
    max: usize,
    metrics: Arc<AttribMetrics>,
}

impl PodStore {
    pub fn new(max: usize, metrics: Arc<AttribMetrics>) -> Self {
        Self {
            pods: RwLock::new(HashMap::new()),
            max,
            metrics,
        }
    }

    pub fn get(&self, uid: &str) -> Option<Pod> {
        read(&self.pods).get(uid).cloned()
    }

    pub fn contains(&self, uid: &str) -> bool {
        read(&self.pods).contains_key(uid)
    }

    /// Whether the store knows pod `ns/name` under another UID than `uid`.
    pub fn known_as_other(&self, ns: &str, name: &str, uid: &str) -> bool {
        read(&self.pods)
            .iter()
            .any(|(u, p)| p.namespace == ns && p.name == name && u != uid)
    }

    pub fn len(&self) -> usize {
        read(&self.pods).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn replace(&self, pods: HashMap<String, Pod>) {
        let over = pods.len().saturating_sub(self.max);
        let kept = pods.into_iter().take(self.max).collect::<HashMap<_, _>>();
        self.dropped(over);
        *write(&self.pods) = kept;
        self.gauge();
    }

    pub fn upsert(&self, uid: String, pod: Pod) {
        {
            let mut pods = write(&self.pods);
            if pods.len() >= self.max && !pods.contains_key(&uid) {
                drop(pods);
                self.dropped(1);
                return;
            }
            pods.insert(uid, pod);
        }
        self.gauge();
    }

    pub fn delete(&self, uid: &str) {
        write(&self.pods).remove(uid);
        self.gauge();
    }

    pub fn count_error(&self) {
        self.metrics.errors("kube_apiserver");
    }

    fn dropped(&self, n: usize) {
        if n > 0 {
            self.metrics.dropped("pod_limit", n as u64);
        }
    }

    fn gauge(&self) {
        self.metrics.pods.set(self.len() as i64);
    }
}

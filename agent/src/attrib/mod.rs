//! Attribution: which node, namespace, pod and container a process belongs to, and which
//! GPUs its container was assigned.
//!
//! pid → `/proc/<pid>/cgroup` ([`cgroup`]: pod UID and container id from the path) → the pod
//! of that UID from the API server ([`apiserver`]: list/watch of this node's pods; the
//! container id names the container through the pod's container statuses) → the GPUs the
//! kubelet assigned to that container ([`podresources`]). Everything is fetched off the
//! event path; [`Attributor::lookup`] reads memory only, except for the first lookup of a
//! pid, which reads its cgroup file once. Outside Kubernetes (no API server, no kubelet
//! socket) identities carry the node only, and that is said once in the log.

pub mod apiserver;
pub mod cgroup;
mod config;
pub mod metrics;
pub mod podresources;
mod pods;

pub use config::{ApiServerConfig, AttributionConfig};
pub use pods::{Pod, PodStore};

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use crate::{labels::WorkloadLabels, metrics::Metrics, proc::ProcFs, servers::Server};
use metrics::{AttribMetrics, PodGpuLabels, ServerInfoLabels};
use podresources::Assignments;

/// How often cached identities are re-read (cgroup moves, pods arriving) and dead pids dropped.
const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// Who a process is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub labels: WorkloadLabels,
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    /// GPU (or MIG) UUIDs the kubelet assigned to the container.
    pub gpus: Vec<String>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Cuts a label value to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    let mut cut = max.min(s.len());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s[..cut].to_string()
}

/// The error's causes, joined (for one log field).
/// The node's name: configured, else `NODE_NAME`, else the hostname.
pub fn node_name(configured: Option<&str>, env: Option<String>) -> String {
    configured
        .map(str::to_string)
        .or(env.filter(|n| !n.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default()
}

/// Identities of processes, and the series that are about workloads rather than processes
/// (`llm_server_info`, `inferscope_pod_gpu_assigned`).
pub struct Attributor {
    node: String,
    max_label_len: usize,
    max_processes: usize,
    procfs: ProcFs,
    pods: Arc<PodStore>,
    gpus: RwLock<Assignments>,
    /// NVML's GPUs, index → UUID, and its last per-process view, pid → GPU indices: they name
    /// a pod's process from pod-resources alone when the API server does not know the pod.
    gpu_uuids: RwLock<HashMap<u32, String>>,
    /// NVML's product name per GPU index (`gpu_type` on `llm_server_info`).
    gpu_types: RwLock<HashMap<u32, String>>,
    process_gpus: RwLock<HashMap<u32, Vec<u32>>>,
    cache: Mutex<HashMap<u32, Arc<Identity>>>,
    /// Watched inference servers, and the `llm_server_info` series published for them.
    servers: Mutex<(HashMap<u32, Server>, Vec<ServerInfoLabels>)>,
    metrics: Arc<AttribMetrics>,
}

impl Attributor {
    pub fn new(
        node: String,
        config: &AttributionConfig,
        max_processes: usize,
        procfs: ProcFs,
        metrics: Arc<AttribMetrics>,
    ) -> Self {
        Self {
            node: truncate(&node, config.max_label_len),
            max_label_len: config.max_label_len,
            max_processes,
            procfs,
            pods: Arc::new(PodStore::new(config.max_pods, metrics.clone())),
            gpus: RwLock::new(Assignments::new()),
            gpu_uuids: RwLock::new(HashMap::new()),
            gpu_types: RwLock::new(HashMap::new()),
            process_gpus: RwLock::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            servers: Mutex::new((HashMap::new(), Vec::new())),
            metrics,
        }
    }

    /// The node's name, as every series' `node` label has it.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn pods(&self) -> &Arc<PodStore> {
        &self.pods
    }

    /// The identity of `pid`: from the cache, else resolved now (one cgroup file read) and
    /// cached while under the process limit. A process of a pod the API server had not
    /// listed when it was cached (the agent's first look at a node, before its pod list
    /// arrives) is resolved again once the pod is known, not at the next refresh.
    pub fn lookup(&self, pid: u32) -> Arc<Identity> {
        if let Some(id) = lock(&self.cache).get(&pid) {
            let pending = id.labels.pod.is_empty()
                && id
                    .pod_uid
                    .as_deref()
                    .is_some_and(|uid| self.pods.contains(uid));
            if !pending {
                return id.clone();
            }
        }
        let id = Arc::new(self.resolve(pid).unwrap_or_else(|| self.node_only()));
        let mut cache = lock(&self.cache);
        if cache.len() < self.max_processes || cache.contains_key(&pid) {
            cache.insert(pid, id.clone());
        } else {
            self.metrics.dropped("process_limit", 1);
        }
        id
    }

    /// The labels of `pid`'s series.
    pub fn labels(&self, pid: u32) -> WorkloadLabels {
        self.lookup(pid).labels.clone()
    }

    fn node_only(&self) -> Identity {
        Identity {
            labels: WorkloadLabels {
                node: self.node.clone(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Resolves `pid` now; `None` when the process is gone.
    fn resolve(&self, pid: u32) -> Option<Identity> {
        let cg = cgroup::from_cgroups(&self.procfs.cgroups(pid)?);
        let mut id = self.node_only();
        let max = self.max_label_len;
        let pod = cg.pod_uid.as_deref().and_then(|uid| self.pods.get(uid));
        if let (None, Some(uid)) = (&pod, &cg.pod_uid) {
            if let Some(((ns, pod, container), gpus)) = self.by_gpus(pid, uid) {
                id.labels.namespace = truncate(&ns, max);
                id.labels.pod = truncate(&pod, max);
                id.labels.container = truncate(&container, max);
                id.gpus = gpus;
            }
        }
        if let Some(pod) = pod {
            let container = cg.container_id.as_deref().and_then(|cid| {
                pod.containers
                    .iter()
                    .find(|(id, _)| id == cid)
                    .map(|(_, name)| name.clone())
            });
            let container = container.unwrap_or_default();
            id.gpus = read(&self.gpus)
                .get(&(pod.namespace.clone(), pod.name.clone(), container.clone()))
                .cloned()
                .unwrap_or_default();
            id.labels.namespace = truncate(&pod.namespace, max);
            id.labels.pod = truncate(&pod.name, max);
            id.labels.container = truncate(&container, max);
        }
        id.pod_uid = cg.pod_uid;
        id.container_id = cg.container_id;
        Some(id)
    }

    /// The one container whose assigned GPUs include every GPU NVML shows `pid` on; none when
    /// NVML does not show it or GPUs are shared (time-slicing): then the match is ambiguous.
    /// Pods the API server knows under another UID than `uid` (the process's) are not candidates.
    fn by_gpus(&self, pid: u32, uid: &str) -> Option<((String, String, String), Vec<String>)> {
        let uuids: Vec<String> = {
            let names = read(&self.gpu_uuids);
            read(&self.process_gpus)
                .get(&pid)?
                .iter()
                .filter_map(|i| names.get(i).cloned())
                .collect()
        };
        if uuids.is_empty() {
            return None;
        }
        let gpus = read(&self.gpus);
        let mut found = gpus.iter().filter(|((ns, pod, _), ids)| {
            uuids.iter().all(|u| ids.contains(u)) && !self.pods.known_as_other(ns, pod, uid)
        });
        let (key, ids) = found.next()?;
        if found.next().is_some() {
            return None;
        }
        Some((key.clone(), ids.clone()))
    }

    /// The GPUs an inference server uses, by index, ascending: those the kubelet assigned to
    /// its container where NVML names them, else those NVML shows the server or one of its
    /// descendants on (vLLM's engine and tensor-parallel workers are child processes).
    pub fn server_gpus(&self, pid: u32) -> Vec<u32> {
        let assigned = self.lookup(pid).gpus.clone();
        let mut gpus: Vec<u32> = if assigned.is_empty() {
            Vec::new()
        } else {
            read(&self.gpu_uuids)
                .iter()
                .filter(|(_, uuid)| assigned.contains(uuid))
                .map(|(i, _)| *i)
                .collect()
        };
        if gpus.is_empty() {
            let process_gpus = read(&self.process_gpus);
            for (p, on) in process_gpus.iter() {
                if self.descends_from(*p, pid) {
                    gpus.extend(on);
                }
            }
        }
        gpus.sort_unstable();
        gpus.dedup();
        gpus
    }

    /// [`Self::server_gpus`] as a label value: `"0,1"`; empty when none is known.
    pub fn gpu_list(gpus: &[u32]) -> String {
        let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
        list.join(",")
    }

    /// Whether `pid` is `ancestor` or below it (a bounded walk up the parents).
    fn descends_from(&self, mut pid: u32, ancestor: u32) -> bool {
        for _ in 0..32 {
            if pid == ancestor {
                return true;
            }
            match self.procfs.ppid(pid) {
                Some(parent) if parent > 1 && parent != pid => pid = parent,
                _ => return false,
            }
        }
        false
    }

    /// NVML's GPUs (index, UUID).
    pub fn set_gpu_uuids(&self, gpus: impl IntoIterator<Item = (u32, String)>) {
        *write(&self.gpu_uuids) = gpus.into_iter().collect();
    }

    /// NVML's GPUs: index, UUID and product name.
    pub fn set_gpus(&self, gpus: &[crate::gpu::metrics::GpuLabels]) {
        self.set_gpu_uuids(gpus.iter().map(|g| (g.gpu, g.gpu_uuid.clone())));
        *write(&self.gpu_types) = gpus.iter().map(|g| (g.gpu, g.gpu_type.clone())).collect();
    }

    /// NVML's per-process view of the last sample.
    pub fn note_gpu_processes(&self, snapshot: &crate::gpu::GpuProcesses) {
        let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
        for p in &snapshot.entries {
            map.entry(p.pid).or_default().push(p.gpu);
        }
        let changed = {
            let mut current = write(&self.process_gpus);
            let changed = *current != map;
            *current = map;
            changed
        };
        // A server's GPUs (on `llm_server_info`) follow NVML's view, not the next refresh.
        if changed {
            self.publish_servers();
        }
    }

    /// Re-resolves every cached pid (pods arrive and go, processes move), drops dead ones, and
    /// republishes `llm_server_info`.
    pub fn refresh(&self) {
        let pids: Vec<u32> = lock(&self.cache).keys().copied().collect();
        for pid in pids {
            match self.resolve(pid) {
                Some(id) => {
                    lock(&self.cache).insert(pid, Arc::new(id));
                }
                None => {
                    lock(&self.cache).remove(&pid);
                }
            }
        }
        self.publish_servers();
    }

    /// The watched inference servers changed.
    pub fn set_servers(&self, servers: &HashMap<u32, Server>) {
        lock(&self.servers).0 = servers.clone();
        self.publish_servers();
    }

    fn publish_servers(&self) {
        let mut state = lock(&self.servers);
        let now: Vec<ServerInfoLabels> = state
            .0
            .iter()
            .map(|(pid, s)| {
                let max = self.max_label_len;
                let gpus = self.server_gpus(*pid);
                let mut types: Vec<String> = {
                    let names = read(&self.gpu_types);
                    gpus.iter().filter_map(|g| names.get(g).cloned()).collect()
                };
                types.sort();
                types.dedup();
                ServerInfoLabels {
                    pid: *pid,
                    server: s.kind,
                    model: truncate(s.model.as_deref().unwrap_or(""), max),
                    model_version: truncate(s.model_version.as_deref().unwrap_or(""), max),
                    tensor_parallelism: s
                        .tensor_parallelism
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    gpu: Self::gpu_list(&gpus),
                    gpu_type: truncate(&types.join(","), max),
                    workload: self.labels(*pid),
                }
            })
            .collect();
        let family = &self.metrics.server_info;
        for gone in state.1.iter().filter(|l| !now.contains(l)) {
            family.remove(gone);
        }
        for l in &now {
            family.get_or_create(l).set(1);
        }
        state.1 = now;
    }

    /// New GPU assignments from pod-resources: kept for lookups, exported as
    /// `inferscope_pod_gpu_assigned`.
    pub fn set_assignments(&self, assignments: Assignments) {
        let series = |a: &Assignments| -> Vec<PodGpuLabels> {
            let max = self.max_label_len;
            a.iter()
                .flat_map(|((ns, pod, container), ids)| {
                    ids.iter().map(move |id| PodGpuLabels {
                        namespace: truncate(ns, max),
                        pod: truncate(pod, max),
                        container: truncate(container, max),
                        gpu_uuid: id.clone(),
                    })
                })
                .collect()
        };
        let family = &self.metrics.pod_gpu_assigned;
        let mut gpus = write(&self.gpus);
        let new = series(&assignments);
        for old in series(&gpus) {
            if !new.contains(&old) {
                family.remove(&old);
            }
        }
        for l in &new {
            family.get_or_create(l).set(1);
        }
        *gpus = assignments;
    }
}

/// Starts attribution's background tasks: the pod list/watch, the pod-resources poll and
/// the cache refresh. They end when `stop` turns true.
/// Each task has its heartbeat in `health`. `max_processes` bounds the identity cache as the
/// tracker bounds its processes; the node's name and the API server come from `env` when the
/// section does not name them (`NODE_NAME`, `KUBERNETES_SERVICE_HOST`/`_PORT`).
pub fn start(
    a: &AttributionConfig,
    max_processes: usize,
    procfs: ProcFs,
    env: &dyn crate::env::EnvSource,
    metrics: Arc<AttribMetrics>,
    stop: tokio::sync::watch::Receiver<bool>,
    health: &crate::health::Health,
) -> (Arc<Attributor>, Vec<tokio::task::JoinHandle<()>>) {
    let node = node_name(a.node_name.as_deref(), env.var("NODE_NAME"));
    let attributor = Arc::new(Attributor::new(
        node.clone(),
        a,
        max_processes,
        procfs,
        metrics.clone(),
    ));
    let mut tasks = Vec::new();
    if !a.enabled {
        tracing::info!("attribution off (attribution.enabled = false): process labels only");
        return (attributor, tasks);
    }
    let url = a.api_server.url.clone().or_else(|| {
        let host = env.var("KUBERNETES_SERVICE_HOST")?;
        let port = env
            .var("KUBERNETES_SERVICE_PORT")
            .unwrap_or_else(|| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Some(format!("https://{host}:{port}"))
    });
    let socket = a
        .pod_resources_socket
        .exists()
        .then(|| a.pod_resources_socket.clone());
    if url.is_none() && socket.is_none() {
        tracing::info!(
            node,
            "not in Kubernetes (no API server configured or in the environment, no kubelet \
             pod-resources socket): process labels only"
        );
    }
    if let Some(url) = url {
        let exists = |p: &PathBuf| p.exists().then(|| p.clone());
        let endpoint = apiserver::Endpoint {
            token_path: exists(&a.api_server.token_path),
            ca_path: url
                .starts_with("https://")
                .then(|| exists(&a.api_server.ca_path))
                .flatten(),
            url,
            node: node.clone(),
            resync: Duration::from_secs(a.resync_secs.max(1)),
        };
        tracing::info!(url = endpoint.url, node, "pod metadata from the API server");
        let m = metrics.clone();
        // Network waits only, each bounded by a timeout: it beats while it is polled.
        tasks.push(tokio::spawn(crate::health::beating(
            health.heartbeat("attribution-apiserver", crate::health::QUICK),
            Duration::from_secs(1),
            apiserver::run(
                endpoint,
                attributor.pods().clone(),
                move |up| set_source(&m.core, "kube_apiserver", up),
                stop.clone(),
            ),
        )));
    }
    match socket {
        Some(socket) => {
            tracing::info!(socket = %socket.display(), "GPU assignments from the kubelet's pod-resources API");
            let every = Duration::from_secs(a.pod_resources_interval_secs.max(1));
            // A List is bounded by its connect (5 s) and request (10 s) timeouts.
            let round = every + Duration::from_secs(15);
            let beat = health.heartbeat(
                "attribution-pod-resources",
                crate::health::deadline(round, crate::health::SLOW),
            );
            tasks.push(tokio::spawn(poll_pod_resources(
                attributor.clone(),
                socket,
                a.gpu_resource_prefixes.clone(),
                a.max_pods,
                every,
                stop.clone(),
                beat,
            )));
        }
        None => tracing::debug!(
            socket = %a.pod_resources_socket.display(),
            "no kubelet pod-resources socket: GPU assignments off"
        ),
    }
    let refresher = attributor.clone();
    let mut stop_refresh = stop;
    let beat = health.heartbeat(
        "attribution-refresh",
        crate::health::deadline(REFRESH_EVERY, crate::health::SLOW),
    );
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            beat.beat();
            tokio::select! {
                _ = tick.tick() => {
                    let r = refresher.clone();
                    // File reads: off the runtime's worker threads.
                    let _ = tokio::task::spawn_blocking(move || r.refresh()).await;
                }
                _ = stop_refresh.changed() => break,
            }
        }
        beat.done();
    }));
    (attributor, tasks)
}

async fn poll_pod_resources(
    attributor: Arc<Attributor>,
    socket: PathBuf,
    prefixes: Vec<String>,
    max_pods: usize,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    heartbeat: crate::health::Heartbeat,
) {
    let metrics = attributor.metrics.clone();
    let mut failing = false;
    loop {
        heartbeat.beat();
        let listed = tokio::select! {
            r = podresources::list(&socket, &prefixes, max_pods) => r,
            _ = stop.changed() => break,
        };
        match listed {
            Ok((assignments, left_out)) => {
                if failing {
                    tracing::info!("pod-resources reachable again");
                }
                failing = false;
                if left_out > 0 {
                    metrics.dropped("pod_limit", left_out as u64);
                }
                set_source(&metrics.core, "pod_resources", true);
                attributor.set_assignments(assignments);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        error = crate::error_chain(&e),
                        "pod-resources List failed (retrying; further failures are counted)"
                    );
                }
                failing = true;
                metrics.errors("pod_resources");
                set_source(&metrics.core, "pod_resources", false);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => break,
        }
    }
    heartbeat.done();
}

/// `inferscope_source_up{source}` for the attribution sources.
fn set_source(metrics: &Metrics, source: &'static str, up: bool) {
    metrics
        .source_up
        .get_or_create(&crate::metrics::SourceLabels { source })
        .set(i64::from(up));
}

#[cfg(test)]
mod tests;

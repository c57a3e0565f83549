//! Attribution's series: workload identity joined onto servers and GPUs, and its own health.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use std::sync::Arc;

use crate::{
    labels::{ReasonLabels, SourceLabels, WorkloadLabels},
    metrics::Metrics,
};

/// `llm_server_info`: one series per watched server, value 1; rules join on it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerInfoLabels {
    pub pid: u32,
    pub server: &'static str,
    pub model: String,
    pub model_version: String,
    pub tensor_parallelism: String,
    /// The GPUs the server uses (`"0,1"`) and their NVML product name; empty while unknown.
    pub gpu: String,
    pub gpu_type: String,
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

/// `inferscope_pod_gpu_assigned`: a GPU (or MIG device) the kubelet assigned to a container.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodGpuLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub gpu_uuid: String,
}

pub struct AttribMetrics {
    /// The shared counters (outside input dropped, sources up).
    pub core: Arc<Metrics>,
    pub server_info: Family<ServerInfoLabels, Gauge>,
    pub pod_gpu_assigned: Family<PodGpuLabels, Gauge>,
    pub pods: Gauge,
    pub errors: Family<SourceLabels, Counter>,
    pub dropped: Family<ReasonLabels, Counter>,
}

impl AttribMetrics {
    pub fn new(core: &Arc<Metrics>) -> Arc<Self> {
        let m = Self {
            core: core.clone(),
            server_info: Family::default(),
            pod_gpu_assigned: Family::default(),
            pods: Gauge::default(),
            errors: Family::default(),
            dropped: Family::default(),
        };
        core.register_with(|r| m.register(r));
        Arc::new(m)
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "llm_server_info",
            "A watched inference server (value 1): model, model version, tensor parallelism \
             from its command line, the GPUs it uses and their type, and its workload",
            self.server_info.clone(),
        );
        r.register(
            "inferscope_pod_gpu_assigned",
            "1 for each GPU or MIG device the kubelet assigned to a container (pod-resources API)",
            self.pod_gpu_assigned.clone(),
        );
        r.register(
            "inferscope_attribution_pods",
            "Pods of this node known from the API server",
            self.pods.clone(),
        );
        r.register(
            "inferscope_attribution_errors",
            "Failed requests to an attribution source (kube_apiserver, pod_resources)",
            self.errors.clone(),
        );
        r.register(
            "inferscope_attribution_dropped",
            "Pods or processes attribution did not keep, by limit (pod_limit, process_limit)",
            self.dropped.clone(),
        );
    }

    pub fn errors(&self, source: &'static str) {
        self.errors.get_or_create(&SourceLabels { source }).inc();
    }

    pub fn dropped(&self, reason: &'static str, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }
}

//! The `[attribution]` section of the configuration.

use std::path::PathBuf;

use serde::Deserialize;

/// The `[attribution]` section of the config file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AttributionConfig {
    /// Look processes up in Kubernetes at all (off: `node`, `pid` and `comm` labels only).
    pub enabled: bool,
    /// The node's name (the `node` label and the pods' `spec.nodeName`); default: the
    /// `NODE_NAME` environment variable (set from the downward API), else the hostname.
    pub node_name: Option<String>,
    /// The kubelet's pod-resources socket; not there at start: GPU assignments are off.
    pub pod_resources_socket: PathBuf,
    /// How often pod-resources is listed, in seconds (it has no watch).
    pub pod_resources_interval_secs: u64,
    /// Resource names whose devices are GPUs, by prefix (`nvidia.com/` covers `nvidia.com/gpu`
    /// and the MIG resources).
    pub gpu_resource_prefixes: Vec<String>,
    /// Where the pods' metadata comes from.
    pub api_server: ApiServerConfig,
    /// The pod watch is restarted with a fresh list this often, in seconds.
    pub resync_secs: u64,
    /// Pods kept; further pods are counted and get no names.
    pub max_pods: usize,
    /// Longest `namespace`, `pod` and `container` label value; longer ones are cut.
    pub max_label_len: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiServerConfig {
    /// The API server's URL; default: in-cluster, `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    /// Neither set: pod metadata is off.
    pub url: Option<String>,
    /// The service-account token (sent as a bearer token when the file exists).
    pub token_path: PathBuf,
    /// CA bundle that signs the API server's certificate.
    pub ca_path: PathBuf,
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl Default for AttributionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            node_name: None,
            pod_resources_socket: PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock"),
            pod_resources_interval_secs: 10,
            gpu_resource_prefixes: vec!["nvidia.com/".into()],
            api_server: ApiServerConfig::default(),
            resync_secs: 300,
            max_pods: 1024,
            max_label_len: 128,
        }
    }
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        Self {
            url: None,
            token_path: PathBuf::from(SERVICE_ACCOUNT).join("token"),
            ca_path: PathBuf::from(SERVICE_ACCOUNT).join("ca.crt"),
        }
    }
}

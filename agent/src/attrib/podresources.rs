//! The kubelet's pod-resources API (gRPC `v1.PodResourcesLister` on a unix socket): which
//! devices each container was assigned. Polled with `List`; it has no watch.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

/// Code generated from the vendored `k8s.io/kubelet/pkg/apis/podresources/v1/api.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("v1");
}

use proto::{pod_resources_lister_client::PodResourcesListerClient, ListPodResourcesRequest};

#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    #[error("cannot connect to the kubelet's pod-resources socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("pod-resources List failed")]
    List(#[source] tonic::Status),
}

/// (namespace, pod, container) → device ids of the GPU resources, sorted.
pub type Assignments = BTreeMap<(String, String, String), Vec<String>>;

/// Calls `List` once on the socket at `path` and keeps the devices whose resource name starts
/// with one of `prefixes` (`nvidia.com/` covers `nvidia.com/gpu` and the MIG resources).
pub async fn list(
    path: &std::path::Path,
    prefixes: &[String],
    max_pods: usize,
) -> Result<(Assignments, usize), PodResourcesError> {
    let socket = path.to_path_buf();
    // The URI is required by the API and unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|source| PodResourcesError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let resp = PodResourcesListerClient::new(channel)
        .list(ListPodResourcesRequest {})
        .await
        .map_err(PodResourcesError::List)?
        .into_inner();
    Ok(assignments(resp, prefixes, max_pods))
}

/// The GPU assignments of a `List` answer, at most `max_pods` pods; also the count of pods
/// left out.
pub fn assignments(
    resp: proto::ListPodResourcesResponse,
    prefixes: &[String],
    max_pods: usize,
) -> (Assignments, usize) {
    let mut out = Assignments::new();
    let total = resp.pod_resources.len();
    for pod in resp.pod_resources.into_iter().take(max_pods) {
        for c in pod.containers {
            let mut ids: Vec<String> = c
                .devices
                .into_iter()
                .filter(|d| prefixes.iter().any(|p| d.resource_name.starts_with(p)))
                .flat_map(|d| d.device_ids)
                .collect();
            if ids.is_empty() {
                continue;
            }
            ids.sort();
            ids.dedup();
            out.insert((pod.namespace.clone(), pod.name.clone(), c.name), ids);
        }
    }
    (out, total.saturating_sub(max_pods))
}

#[cfg(test)]
mod tests {
    use super::{proto::*, *};

    #[test]
    fn keeps_gpu_devices_per_container() {
        let dev = |r: &str, ids: &[&str]| ContainerDevices {
            resource_name: r.into(),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            topology: None,
        };
        let container = |name: &str, devices| ContainerResources {
            name: name.into(),
            devices,
            ..Default::default()
        };
        let resp = ListPodResourcesResponse {
            pod_resources: vec![
                PodResources {
                    name: "llm".into(),
                    namespace: "ml".into(),
                    containers: vec![
                        container(
                            "server",
                            vec![
                                dev("nvidia.com/gpu", &["GPU-b", "GPU-a"]),
                                dev("example.com/nic", &["eth1"]),
                                dev("nvidia.com/mig-1g.10gb", &["MIG-c"]),
                            ],
                        ),
                        container("sidecar", vec![dev("example.com/nic", &["eth2"])]),
                    ],
                },
                PodResources {
                    name: "other".into(),
                    namespace: "ml".into(),
                    containers: vec![container("c", vec![dev("nvidia.com/gpu", &["GPU-z"])])],
                },
            ],
        };
        let (a, left_out) = assignments(resp.clone(), &["nvidia.com/".into()], 10);
        assert_eq!(left_out, 0);
        assert_eq!(a.len(), 2);
        assert_eq!(
            a[&("ml".into(), "llm".into(), "server".into())],
            vec!["GPU-a", "GPU-b", "MIG-c"]
        );
        let (a, left_out) = assignments(resp, &["nvidia.com/".into()], 1);
        assert_eq!((a.len(), left_out), (1, 1));
    }
}

//! Pods of this node from the Kubernetes API server: list, then watch from the list's
//! resourceVersion until the watch times out (`resync_secs`), then list again. Only the
//! fields attribution needs are decoded; memory is bounded by `max_pods` and by a cap on
//! the size of a list response and of one watch event.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use serde::Deserialize;

use super::{Pod, PodStore};

/// Largest list response read (a node's pods are a few MiB at most).
const MAX_LIST_BYTES: usize = 64 << 20;
/// Largest single watch event.
const MAX_EVENT_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid CA certificate {path}")]
    Ca {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("request to the API server failed")]
    Request(#[source] reqwest::Error),
    #[error("the API server answered {status}")]
    Status { status: u16 },
    #[error("the API server's answer is over {limit} bytes")]
    TooLarge { limit: usize },
    #[error("cannot decode the API server's answer")]
    Decode(#[source] serde_json::Error),
    #[error("the watch ended with an error event (code {code})")]
    WatchError { code: u16 },
}

/// Where and how to reach the API server.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `https://host:port` (or `http://` in tests).
    pub url: String,
    /// The service-account token file, re-read for every request (tokens are rotated).
    pub token_path: Option<PathBuf>,
    pub ca_path: Option<PathBuf>,
    pub node: String,
    pub resync: Duration,
}

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<ApiPod>,
}

#[derive(Default, Deserialize)]
struct ListMeta {
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
}

#[derive(Deserialize)]
struct ApiPod {
    metadata: ObjectMeta,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Deserialize)]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
}

#[derive(Default, Deserialize)]
struct PodStatus {
    #[serde(rename = "containerStatuses", default)]
    containers: Vec<ContainerStatus>,
    #[serde(rename = "initContainerStatuses", default)]
    init_containers: Vec<ContainerStatus>,
    #[serde(rename = "ephemeralContainerStatuses", default)]
    ephemeral_containers: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
struct ContainerStatus {
    name: String,
    #[serde(rename = "containerID", default)]
    container_id: String,
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

impl ApiPod {
    fn into_pod(self) -> Option<(String, Pod)> {
        if self.metadata.uid.is_empty() {
            return None;
        }
        let containers = self
            .status
            .containers
            .into_iter()
            .chain(self.status.init_containers)
            .chain(self.status.ephemeral_containers)
            .filter_map(|c| {
                // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
                let id = c.container_id.rsplit("://").next()?.to_string();
                (!id.is_empty()).then_some((id, c.name))
            })
            .collect();
        Some((
            self.metadata.uid,
            Pod {
                namespace: self.metadata.namespace,
                name: self.metadata.name,
                containers,
            },
        ))
    }
}

/// Decodes a pod list: (resourceVersion, pods by UID).
pub fn decode_list(body: &[u8]) -> Result<(String, HashMap<String, Pod>), ApiError> {
    let list: PodList = serde_json::from_slice(body).map_err(ApiError::Decode)?;
    let pods = list
        .items
        .into_iter()
        .filter_map(ApiPod::into_pod)
        .collect();
    Ok((list.metadata.resource_version, pods))
}

/// What one watch line does to the store.
#[derive(Debug, PartialEq)]
pub enum Change {
    Upsert(String, Pod),
    Delete(String),
    /// A bookmark or an event of no interest: only the resourceVersion moves.
    None,
}

/// Decodes one watch line: the change and the resourceVersion it brings.
pub fn decode_event(line: &[u8]) -> Result<(Change, Option<String>), ApiError> {
    let ev: WatchEvent = serde_json::from_slice(line).map_err(ApiError::Decode)?;
    if ev.kind == "ERROR" {
        let code = ev
            .object
            .get("code")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        return Err(ApiError::WatchError {
            code: u16::try_from(code).unwrap_or(0),
        });
    }
    let pod: ApiPod = serde_json::from_value(ev.object).map_err(ApiError::Decode)?;
    let rv = Some(pod.metadata.resource_version.clone()).filter(|v| !v.is_empty());
    let change = match ev.kind.as_str() {
        "ADDED" | "MODIFIED" => match pod.into_pod() {
            Some((uid, pod)) => Change::Upsert(uid, pod),
            None => Change::None,
        },
        "DELETED" => Change::Delete(pod.metadata.uid),
        _ => Change::None,
    };
    Ok((change, rv))
}

/// The list/watch client.
pub struct Client {
    http: reqwest::Client,
    endpoint: Endpoint,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Result<Self, ApiError> {
        crate::tls::install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .http1_only();
        if let Some(path) = &endpoint.ca_path {
            let pem = std::fs::read(path).map_err(|source| ApiError::Read {
                path: path.clone(),
                source,
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|source| ApiError::Ca {
                path: path.clone(),
                source,
            })?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Self {
            http: builder.build().map_err(ApiError::Client)?,
            endpoint,
        })
    }

    fn request(&self, query: &str) -> Result<reqwest::RequestBuilder, ApiError> {
        let url = format!(
            "{}/api/v1/pods?fieldSelector=spec.nodeName%3D{}{query}",
            self.endpoint.url.trim_end_matches('/'),
            self.endpoint.node
        );
        let mut req = self.http.get(url);
        if let Some(path) = &self.endpoint.token_path {
            let token = std::fs::read_to_string(path).map_err(|source| ApiError::Read {
                path: path.clone(),
                source,
            })?;
            req = req.bearer_auth(token.trim());
        }
        Ok(req)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ApiError> {
        let resp = req.send().await.map_err(ApiError::Request)?;
        if !resp.status().is_success() {
            return Err(ApiError::Status {
                status: resp.status().as_u16(),
            });
        }
        Ok(resp)
    }

    /// Lists the node's pods into the store; returns the list's resourceVersion.
    pub async fn list(&self, store: &PodStore) -> Result<String, ApiError> {
        let req = self.request("")?.timeout(Duration::from_secs(30));
        let mut resp = self.send(req).await?;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(ApiError::Request)? {
            if body.len() + chunk.len() > MAX_LIST_BYTES {
                return Err(ApiError::TooLarge {
                    limit: MAX_LIST_BYTES,
                });
            }
            body.extend_from_slice(&chunk);
        }
        let (rv, pods) = decode_list(&body)?;
        store.replace(pods);
        Ok(rv)
    }

    /// Watches from `rv` until the server ends the watch (after `resync`) or fails.
    pub async fn watch(&self, store: &PodStore, mut rv: String) -> Result<(), ApiError> {
        let secs = self.endpoint.resync.as_secs().max(1);
        let req = self
            .request(&format!(
                "&watch=1&allowWatchBookmarks=true&resourceVersion={rv}&timeoutSeconds={secs}"
            ))?
            .timeout(self.endpoint.resync + Duration::from_secs(30));
        // 410 Gone: the resourceVersion is too old (routine after a long watch); list again.
        let mut resp = match self.send(req).await {
            Err(ApiError::Status { status: 410 }) => return Ok(()),
            r => r?,
        };
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(ApiError::Request)? {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let (change, new_rv) = match decode_event(&line) {
                    Err(ApiError::WatchError { code: 410 }) => return Ok(()),
                    r => r?,
                };
                match change {
                    Change::Upsert(uid, pod) => store.upsert(uid, pod),
                    Change::Delete(uid) => store.delete(&uid),
                    Change::None => {}
                }
                if let Some(v) = new_rv {
                    rv = v;
                }
            }
            if buf.len() > MAX_EVENT_BYTES {
                return Err(ApiError::TooLarge {
                    limit: MAX_EVENT_BYTES,
                });
            }
        }
        tracing::trace!(rv, "pod watch ended");
        Ok(())
    }
}

/// List, watch, repeat; failures back off up to 30 s and are logged on change of state only.
pub async fn run(
    endpoint: Endpoint,
    store: Arc<PodStore>,
    up: impl Fn(bool) + Send + Sync + 'static,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match Client::new(endpoint.clone()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                error = crate::error_chain(&e),
                "pod metadata from the API server is off"
            );
            up(false);
            return;
        }
    };
    let mut failing = false;
    let mut backoff = Duration::from_secs(1);
    loop {
        let result = async {
            let rv = client.list(&store).await?;
            if failing {
                tracing::info!(url = endpoint.url, "API server reachable again");
            }
            failing = false;
            up(true);
            client.watch(&store, rv).await
        };
        let result = tokio::select! {
            r = result => r,
            _ = stop.changed() => return,
        };
        match result {
            Ok(()) => {
                backoff = Duration::from_secs(1);
                // A server that ends watches at once must not make this a busy loop.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => return,
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        url = endpoint.url,
                        error = crate::error_chain(&e),
                        "cannot list/watch pods (retrying; further failures are counted)"
                    );
                }
                failing = true;
                up(false);
                store.count_error();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_lists_and_events() {
        let list = br#"{"kind":"PodList","metadata":{"resourceVersion":"42"},"items":[
            {"metadata":{"name":"a","namespace":"ns","uid":"u1","resourceVersion":"40"},
             "status":{"containerStatuses":[{"name":"srv","containerID":"containerd://abc"},
                                            {"name":"waiting"}],
                       "initContainerStatuses":[{"name":"init","containerID":"cri-o://def"}]}},
            {"metadata":{"name":"no-uid"}}]}"#;
        let (rv, pods) = decode_list(list).unwrap();
        assert_eq!(rv, "42");
        assert_eq!(pods.len(), 1);
        let a = &pods["u1"];
        assert_eq!((a.namespace.as_str(), a.name.as_str()), ("ns", "a"));
        assert_eq!(
            a.containers,
            vec![
                ("abc".to_string(), "srv".to_string()),
                ("def".to_string(), "init".to_string())
            ]
        );

        let added = br#"{"type":"ADDED","object":{"metadata":{"name":"b","namespace":"n","uid":"u2","resourceVersion":"43"},"status":{"containerStatuses":[{"name":"c","containerID":"docker://123"}]}}}"#;
        let (change, rv) = decode_event(added).unwrap();
        assert_eq!(rv.as_deref(), Some("43"));
        let Change::Upsert(uid, pod) = change else {
            panic!("{change:?}")
        };
        assert_eq!((uid.as_str(), pod.containers[0].0.as_str()), ("u2", "123"));
        let deleted =
            br#"{"type":"DELETED","object":{"metadata":{"uid":"u2","resourceVersion":"44"}}}"#;
        assert_eq!(
            decode_event(deleted).unwrap(),
            (Change::Delete("u2".into()), Some("44".into()))
        );
        let bookmark = br#"{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"45"}}}"#;
        assert_eq!(
            decode_event(bookmark).unwrap(),
            (Change::None, Some("45".into()))
        );
        let gone = br#"{"type":"ERROR","object":{"kind":"Status","code":410}}"#;
        assert!(matches!(
            decode_event(gone),
            Err(ApiError::WatchError { code: 410 })
        ));
        assert!(matches!(decode_event(b"{nope"), Err(ApiError::Decode(_))));
    }
}

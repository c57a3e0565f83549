//! Sending one OTLP request to the collector: gRPC (the generated tonic clients of
//! `opentelemetry-proto`) or HTTP/protobuf (`POST`, `application/x-protobuf`).

use opentelemetry_proto::tonic::collector::{
    logs::v1::{logs_service_client::LogsServiceClient, ExportLogsServiceRequest},
    metrics::v1::{metrics_service_client::MetricsServiceClient, ExportMetricsServiceRequest},
    trace::v1::{trace_service_client::TraceServiceClient, ExportTraceServiceRequest},
};
use prost::Message;
use tonic::{
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::config::{Protocol, Target};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read TLS file {path}")]
    TlsFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid gRPC endpoint {url}")]
    GrpcEndpoint {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("invalid header {0:?}")]
    Header(String),
    #[error("cannot build the HTTP client")]
    HttpClient(#[source] reqwest::Error),
}

/// Why an export failed; `retryable` says whether the same request may succeed later.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("gRPC export failed: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("HTTP export failed")]
    Http(#[from] reqwest::Error),
    #[error("HTTP export answered {0}")]
    HttpStatus(u16),
}

impl SendError {
    pub fn retryable(&self) -> bool {
        use tonic::Code;
        match self {
            SendError::Grpc(s) => matches!(
                s.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Cancelled
                    | Code::OutOfRange
                    | Code::DataLoss
                    | Code::Unknown
                    | Code::Internal
            ),
            SendError::Http(_) => true,
            SendError::HttpStatus(s) => matches!(s, 408 | 429 | 502 | 503 | 504),
        }
    }
}

/// One request of any signal.
pub enum Payload {
    Metrics(ExportMetricsServiceRequest),
    Traces(ExportTraceServiceRequest),
    Logs(ExportLogsServiceRequest),
}

#[derive(Clone)]
pub enum Client {
    Grpc {
        channel: Channel,
        headers: MetadataMap,
    },
    Http {
        client: reqwest::Client,
        url: String,
    },
}

impl Client {
    /// Builds the client; it connects lazily, so a collector that is down does not stop the
    /// agent from starting. Needs a Tokio runtime.
    pub fn new(t: &Target) -> Result<Self, TransportError> {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|source| TransportError::TlsFile {
                path: p.clone(),
                source,
            })
        };
        match t.protocol {
            Protocol::Grpc => {
                let bad = |source| TransportError::GrpcEndpoint {
                    url: t.url.clone(),
                    source,
                };
                let mut ep = Endpoint::from_shared(t.url.clone())
                    .map_err(bad)?
                    .timeout(t.timeout)
                    .connect_timeout(t.timeout);
                if t.url.starts_with("https://") {
                    let mut tls = ClientTlsConfig::new().with_native_roots();
                    if let Some(ca) = &t.tls.ca_file {
                        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
                    }
                    if let (Some(c), Some(k)) = (&t.tls.cert_file, &t.tls.key_file) {
                        tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
                    }
                    ep = ep.tls_config(tls).map_err(bad)?;
                }
                let mut headers = MetadataMap::new();
                for (k, v) in &t.headers {
                    let key = MetadataKey::from_bytes(k.as_bytes())
                        .map_err(|_| TransportError::Header(k.clone()))?;
                    let value = MetadataValue::try_from(v.as_str())
                        .map_err(|_| TransportError::Header(k.clone()))?;
                    headers.insert(key, value);
                }
                Ok(Client::Grpc {
                    channel: ep.connect_lazy(),
                    headers,
                })
            }
            Protocol::HttpProtobuf => {
                let mut headers = reqwest::header::HeaderMap::new();
                for (k, v) in &t.headers {
                    let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| TransportError::Header(k.clone()))?;
                    let value = reqwest::header::HeaderValue::from_str(v)
                        .map_err(|_| TransportError::Header(k.clone()))?;
                    headers.insert(name, value);
                }
                let mut b = reqwest::Client::builder()
                    .timeout(t.timeout)
                    .connect_timeout(t.timeout)
                    .default_headers(headers);
                if let Some(ca) = &t.tls.ca_file {
                    let cert = reqwest::Certificate::from_pem(&read(ca)?)
                        .map_err(TransportError::HttpClient)?;
                    b = b.add_root_certificate(cert);
                }
                if let (Some(c), Some(k)) = (&t.tls.cert_file, &t.tls.key_file) {
                    let mut pem = read(c)?;
                    pem.extend_from_slice(b"\n");
                    pem.extend_from_slice(&read(k)?);
                    let id =
                        reqwest::Identity::from_pem(&pem).map_err(TransportError::HttpClient)?;
                    b = b.identity(id);
                }
                Ok(Client::Http {
                    client: b.build().map_err(TransportError::HttpClient)?,
                    url: t.url.clone(),
                })
            }
        }
    }

    pub async fn send(&self, payload: Payload) -> Result<(), SendError> {
        match self {
            Client::Grpc { channel, headers } => {
                fn req<M>(m: M, headers: &MetadataMap) -> tonic::Request<M> {
                    let mut r = tonic::Request::new(m);
                    *r.metadata_mut() = headers.clone();
                    r
                }
                match payload {
                    Payload::Metrics(m) => {
                        MetricsServiceClient::new(channel.clone())
                            .export(req(m, headers))
                            .await?;
                    }
                    Payload::Traces(m) => {
                        TraceServiceClient::new(channel.clone())
                            .export(req(m, headers))
                            .await?;
                    }
                    Payload::Logs(m) => {
                        LogsServiceClient::new(channel.clone())
                            .export(req(m, headers))
                            .await?;
                    }
                }
                Ok(())
            }
            Client::Http { client, url } => {
                let body = match payload {
                    Payload::Metrics(m) => m.encode_to_vec(),
                    Payload::Traces(m) => m.encode_to_vec(),
                    Payload::Logs(m) => m.encode_to_vec(),
                };
                let resp = client
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(body)
                    .send()
                    .await?;
                let status = resp.status();
                // Drain the body so the connection can be reused.
                let _ = resp.bytes().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(SendError::HttpStatus(status.as_u16()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str, protocol: Protocol) -> Target {
        Target {
            url: url.into(),
            protocol,
            headers: vec![("x-tenant".into(), "a".into())],
            timeout: std::time::Duration::from_secs(1),
            tls: Default::default(),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bad_tls_files_and_headers_are_errors_at_start() {
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            let mut t = target("https://collector:4317", protocol);
            t.tls.ca_file = Some("/nonexistent/ca.pem".into());
            assert!(
                matches!(Client::new(&t), Err(TransportError::TlsFile { .. })),
                "{protocol:?}"
            );
            let mut t = target("http://collector:4317", protocol);
            t.headers = vec![("bad header".into(), "v".into())];
            assert!(
                matches!(Client::new(&t), Err(TransportError::Header(_))),
                "{protocol:?}"
            );
            assert!(Client::new(&target("http://collector:4317", protocol)).is_ok());
        }
    }

    #[test]
    fn retryable_errors() {
        assert!(SendError::HttpStatus(503).retryable());
        assert!(SendError::HttpStatus(429).retryable());
        assert!(!SendError::HttpStatus(400).retryable());
        assert!(SendError::Grpc(tonic::Status::unavailable("down")).retryable());
        assert!(!SendError::Grpc(tonic::Status::invalid_argument("bad")).retryable());
    }
}

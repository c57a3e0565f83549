//! Sending one OTLP request to the collector over gRPC or HTTP/protobuf. Spans and log
//! records go through `opentelemetry-otlp`'s exporters, handed the connection built here (so
//! that TLS and headers come from the agent's own resolved settings). Metrics are a request
//! built from the Prometheus registry (see `metrics.rs`), sent with `opentelemetry-proto`'s
//! tonic client or `reqwest`.

use std::sync::Arc;

use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::{
    error::OTelSdkError,
    logs::{LogBatch, LogExporter as _, SdkLogRecord},
    trace::{SpanData, SpanExporter as _},
    Resource,
};

use opentelemetry_proto::tonic::collector::metrics::v1::{
    metrics_service_client::MetricsServiceClient, ExportMetricsServiceRequest,
};
use prost::Message;
use tonic::{
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::config::{Protocol, Signal, Target};

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
    #[error("cannot build the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
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
    #[error("OTLP export failed: {0}")]
    Exporter(OTelSdkError),
    #[error("a payload was given to another signal's client")]
    WrongSignal,
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
            // The exporters' errors do not say whether the collector refused the data or could
            // not be reached; the attempts are bounded either way.
            SendError::Exporter(e) => !matches!(e, OTelSdkError::AlreadyShutdown),
            SendError::WrongSignal => false,
        }
    }
}

/// One request of any signal.
pub enum Payload {
    Metrics(ExportMetricsServiceRequest),
    Traces(Vec<SpanData>),
    Logs(Vec<SdkLogRecord>),
}

/// How one signal reaches the collector.
#[derive(Clone)]
pub enum Client {
    Metrics(Connection),
    Traces(Arc<opentelemetry_otlp::SpanExporter>),
    Logs(Arc<opentelemetry_otlp::LogExporter>),
}

/// The scope every span and log record is reported under.
pub fn scope() -> opentelemetry::InstrumentationScope {
    opentelemetry::InstrumentationScope::builder("inferscope")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// An `opentelemetry-otlp` exporter (`SpanExporter` or `LogExporter`: their builders have the
/// same methods but no common trait) on the agent's connection.
macro_rules! exporter {
    ($exporter:ty, $conn:expr, $t:expr, $resource:expr) => {{
        let mut e = match $conn {
            Connection::Grpc { channel, headers } => <$exporter>::builder()
                .with_tonic()
                .with_channel(channel)
                .with_metadata(headers)
                .with_timeout($t.timeout)
                .build(),
            Connection::Http { client, url } => <$exporter>::builder()
                .with_http()
                .with_http_client(client)
                .with_endpoint(url)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout($t.timeout)
                .build(),
        }
        .map_err(TransportError::Exporter)?;
        e.set_resource($resource);
        Arc::new(e)
    }};
}

impl Client {
    /// Builds the client of `signal`; it connects lazily, so a collector that is down does not
    /// stop the agent from starting. Needs a Tokio runtime.
    pub fn new(t: &Target, signal: Signal, resource: &Resource) -> Result<Self, TransportError> {
        let conn = Connection::new(t)?;
        Ok(match signal {
            Signal::Metrics => Client::Metrics(conn),
            Signal::Traces => Client::Traces(exporter!(
                opentelemetry_otlp::SpanExporter,
                conn,
                t,
                resource
            )),
            Signal::Logs => Client::Logs(exporter!(
                opentelemetry_otlp::LogExporter,
                conn,
                t,
                resource
            )),
        })
    }

    pub async fn send(&self, payload: Payload) -> Result<(), SendError> {
        match (self, payload) {
            (Client::Metrics(c), Payload::Metrics(m)) => c.send_metrics(m).await,
            (Client::Traces(e), Payload::Traces(spans)) => {
                e.export(spans).await.map_err(SendError::Exporter)
            }
            (Client::Logs(e), Payload::Logs(records)) => {
                // `LogBatch::new` is how a processor of one's own hands records to an exporter;
                // the SDK's processors would drop a full queue's records without counting them.
                let scope = scope();
                let batch: Vec<(&SdkLogRecord, &opentelemetry::InstrumentationScope)> =
                    records.iter().map(|r| (r, &scope)).collect();
                e.export(LogBatch::new(&batch))
                    .await
                    .map_err(SendError::Exporter)
            }
            _ => Err(SendError::WrongSignal),
        }
    }
}

/// A connection to the collector, with the agent's TLS settings and headers.
#[derive(Clone)]
pub enum Connection {
    Grpc {
        channel: Channel,
        headers: MetadataMap,
    },
    Http {
        client: reqwest::Client,
        url: String,
    },
}

impl Connection {
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
                Ok(Connection::Grpc {
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
                crate::tls::install_crypto_provider();
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
                Ok(Connection::Http {
                    client: b.build().map_err(TransportError::HttpClient)?,
                    url: t.url.clone(),
                })
            }
        }
    }

    async fn send_metrics(&self, m: ExportMetricsServiceRequest) -> Result<(), SendError> {
        match self {
            Connection::Grpc { channel, headers } => {
                let mut r = tonic::Request::new(m);
                *r.metadata_mut() = headers.clone();
                MetricsServiceClient::new(channel.clone()).export(r).await?;
                Ok(())
            }
            Connection::Http { client, url } => {
                let resp = client
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(m.encode_to_vec())
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
                matches!(Connection::new(&t), Err(TransportError::TlsFile { .. })),
                "{protocol:?}"
            );
            let mut t = target("http://collector:4317", protocol);
            t.headers = vec![("bad header".into(), "v".into())];
            assert!(
                matches!(Connection::new(&t), Err(TransportError::Header(_))),
                "{protocol:?}"
            );
            assert!(Connection::new(&target("http://collector:4317", protocol)).is_ok());
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

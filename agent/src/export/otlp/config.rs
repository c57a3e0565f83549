//! OTLP settings: the `[otlp]` section of the config file, completed from the standard
//! `OTEL_*` environment variables, then resolved into one [`Target`] per signal.
//!
//! Precedence, highest first: `--otlp-endpoint`, the config file (and `INFERSCOPE_OTLP__*`),
//! the `OTEL_*` variables, defaults. A per-signal endpoint beats the general one at the same
//! level; the general endpoint of a higher level beats a per-signal one of a lower level.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::env::EnvSource;

#[derive(Debug, thiserror::Error)]
pub enum OtlpConfigError {
    #[error("otlp: unsupported protocol {0:?} (grpc or http/protobuf)")]
    Protocol(String),
    #[error("otlp: invalid endpoint {url:?}: {reason}")]
    Endpoint { url: String, reason: &'static str },
    #[error("otlp: invalid value {value:?} in {var}")]
    Env { var: &'static str, value: String },
    #[error("otlp: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl Protocol {
    fn parse(s: &str) -> Result<Self, OtlpConfigError> {
        match s.trim() {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => Err(OtlpConfigError::Protocol(other.to_string())),
        }
    }
}

/// The three OTLP signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    Metrics,
    Traces,
    Logs,
}

impl Signal {
    pub const ALL: [Signal; 3] = [Signal::Metrics, Signal::Traces, Signal::Logs];

    pub fn label(self) -> &'static str {
        match self {
            Signal::Metrics => "metrics",
            Signal::Traces => "traces",
            Signal::Logs => "logs",
        }
    }

    fn env_part(self) -> &'static str {
        match self {
            Signal::Metrics => "METRICS",
            Signal::Traces => "TRACES",
            Signal::Logs => "LOGS",
        }
    }
}

/// Per-signal settings (`[otlp.metrics]`, `[otlp.traces]`, `[otlp.logs]`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SignalConfig {
    /// Export this signal (default: on whenever OTLP is on; `OTEL_<SIGNAL>_EXPORTER=none` turns
    /// it off).
    pub enabled: Option<bool>,
    /// Full URL for this signal (used as is, also over HTTP).
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub timeout_ms: Option<u64>,
}

/// TLS towards the collector. `https://` endpoints use TLS with the system roots unless
/// `ca_file` is given; `http://` endpoints are plaintext.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file of the CA that signed the collector's certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (mutual TLS), with `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// gRPC only: plaintext even for an endpoint without a scheme (`OTEL_EXPORTER_OTLP_INSECURE`).
    pub insecure: Option<bool>,
}

/// The `[otlp]` section. OTLP is off unless an endpoint is set here, by `--otlp-endpoint`,
/// or by `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// Base URL of the collector; over HTTP `/v1/metrics`, `/v1/traces`, `/v1/logs` are appended.
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (default `http/protobuf`, as the OTLP specification says).
    pub protocol: Option<String>,
    /// Headers sent with every export (`authorization`, tenant ids).
    pub headers: Option<BTreeMap<String, String>>,
    /// Time one export may take, in milliseconds (default 10000).
    pub timeout_ms: Option<u64>,
    /// How often metrics are pushed, in milliseconds (default 60000, `OTEL_METRIC_EXPORT_INTERVAL`).
    pub export_interval_ms: Option<u64>,
    /// `service.name` (default `inferscope`, `OTEL_SERVICE_NAME`).
    pub service_name: Option<String>,
    /// `k8s.cluster.name` resource attribute.
    pub cluster_name: Option<String>,
    /// `k8s.node.name` resource attribute (default: environment variable `NODE_NAME`).
    pub node_name: Option<String>,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES` adds to them).
    pub resource_attributes: Option<BTreeMap<String, String>>,
    /// Spans and log records waiting for export, per signal; beyond it new ones are dropped
    /// and counted in `inferscope_export_dropped_total{signal}`.
    pub queue_size: Option<usize>,
    /// Bytes those spans and log records may hold, per signal (default 8 MiB); beyond it new
    /// ones are dropped and counted alike (a log record carries a tenant's command line).
    pub queue_bytes: Option<usize>,
    /// Spans or log records per export request.
    pub batch_size: Option<usize>,
    /// Longest wait before a partial batch is sent, in milliseconds (default 1000).
    pub batch_timeout_ms: Option<u64>,
    /// Allocation-failure log records per second and process; further ones are counted.
    pub alloc_failure_logs_per_sec: Option<u32>,
    pub tls: TlsConfig,
    pub metrics: SignalConfig,
    pub traces: SignalConfig,
    pub logs: SignalConfig,
}

impl OtlpConfig {
    fn signal(&self, s: Signal) -> &SignalConfig {
        match s {
            Signal::Metrics => &self.metrics,
            Signal::Traces => &self.traces,
            Signal::Logs => &self.logs,
        }
    }
}

/// Where and how one signal is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// gRPC: the collector's address; HTTP: the full URL of the signal's path.
    pub url: String,
    pub protocol: Protocol,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub tls: Tls,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Everything the exporter needs, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub metrics: Option<Target>,
    pub traces: Option<Target>,
    pub logs: Option<Target>,
    pub resource: Vec<(String, String)>,
    pub export_interval: Duration,
    pub queue_size: usize,
    pub queue_bytes: usize,
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub alloc_failure_logs_per_sec: u32,
}

impl Settings {
    pub fn target(&self, s: Signal) -> Option<&Target> {
        match s {
            Signal::Metrics => self.metrics.as_ref(),
            Signal::Traces => self.traces.as_ref(),
            Signal::Logs => self.logs.as_ref(),
        }
    }
}

/// The `OTEL_*` variables that matter here, read once.
struct OtelEnv(BTreeMap<String, String>);

impl OtelEnv {
    fn read(env: &dyn EnvSource) -> Self {
        Self(
            env.vars()
                .into_iter()
                .filter(|(k, v)| (k.starts_with("OTEL_") || k == "NODE_NAME") && !v.is_empty())
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// The per-signal variable, else the general one.
    fn signal(&self, s: Signal, suffix: &str) -> Option<&str> {
        self.get(&format!("OTEL_EXPORTER_OTLP_{}_{suffix}", s.env_part()))
            .or_else(|| self.get(&format!("OTEL_EXPORTER_OTLP_{suffix}")))
    }
}

/// Host facts for the resource, passed in so tests do not depend on the machine.
#[derive(Debug, Clone, Default)]
pub struct Host {
    pub host_name: Option<String>,
}

impl Host {
    pub fn current() -> Self {
        Self {
            host_name: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        }
    }
}

/// Resolves the settings; `None` when OTLP is off (no endpoint anywhere, or
/// `OTEL_SDK_DISABLED=true`).
pub fn resolve(
    cfg: &OtlpConfig,
    env: &dyn EnvSource,
    host: &Host,
) -> Result<Option<Settings>, OtlpConfigError> {
    let env = OtelEnv::read(env);
    if env.get("OTEL_SDK_DISABLED") == Some("true") {
        return Ok(None);
    }
    let mut targets = BTreeMap::new();
    for s in Signal::ALL {
        if let Some(t) = target(cfg, &env, s)? {
            targets.insert(s.label(), t);
        }
    }
    if targets.is_empty() {
        return Ok(None);
    }
    let ms = |file: Option<u64>, var: &'static str, default: u64| -> Result<u64, _> {
        match (file, env.get(var)) {
            (Some(v), _) => Ok(v),
            (None, Some(v)) => v.trim().parse().map_err(|_| OtlpConfigError::Env {
                var,
                value: v.to_string(),
            }),
            (None, None) => Ok(default),
        }
    };
    let export_interval = ms(
        cfg.export_interval_ms,
        "OTEL_METRIC_EXPORT_INTERVAL",
        60_000,
    )?;
    if export_interval == 0 {
        return Err(OtlpConfigError::Invalid(
            "the metric export interval must be above 0".into(),
        ));
    }
    let queue_size = cfg.queue_size.unwrap_or(4096);
    let queue_bytes = cfg.queue_bytes.unwrap_or(8 * 1024 * 1024);
    let batch_size = cfg.batch_size.unwrap_or(512);
    if queue_size == 0 || queue_bytes == 0 || batch_size == 0 {
        return Err(OtlpConfigError::Invalid(
            "otlp.queue_size, otlp.queue_bytes and otlp.batch_size must be above 0".into(),
        ));
    }
    Ok(Some(Settings {
        metrics: targets.remove("metrics"),
        traces: targets.remove("traces"),
        logs: targets.remove("logs"),
        resource: resource(cfg, &env, host)?,
        export_interval: Duration::from_millis(export_interval),
        queue_size,
        queue_bytes,
        batch_size,
        batch_timeout: Duration::from_millis(cfg.batch_timeout_ms.unwrap_or(1000).max(1)),
        alloc_failure_logs_per_sec: cfg.alloc_failure_logs_per_sec.unwrap_or(10),
    }))
}

fn target(cfg: &OtlpConfig, env: &OtelEnv, s: Signal) -> Result<Option<Target>, OtlpConfigError> {
    let sc = cfg.signal(s);
    let exporter_var = format!("OTEL_{}_EXPORTER", s.env_part());
    let enabled = sc
        .enabled
        .unwrap_or_else(|| env.get(&exporter_var).is_none_or(|v| v != "none"));
    if !enabled {
        return Ok(None);
    }
    let protocol = match sc
        .protocol
        .as_deref()
        .or(cfg.protocol.as_deref())
        .or_else(|| env.signal(s, "PROTOCOL"))
    {
        Some(p) => Protocol::parse(p)?,
        None => Protocol::HttpProtobuf,
    };
    let per_signal_env = format!("OTEL_EXPORTER_OTLP_{}_ENDPOINT", s.env_part());
    // (url, is it the full URL of the signal)
    let endpoint = sc
        .endpoint
        .clone()
        .map(|u| (u, true))
        .or_else(|| cfg.endpoint.clone().map(|u| (u, false)))
        .or_else(|| env.get(&per_signal_env).map(|u| (u.to_string(), true)))
        .or_else(|| {
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|u| (u.to_string(), false))
        });
    let Some((url, full)) = endpoint else {
        return Ok(None);
    };
    let insecure = cfg.tls.insecure.unwrap_or_else(|| {
        env.signal(s, "INSECURE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    });
    let url = endpoint_url(&url, full, protocol, s, insecure)?;
    let mut headers: Vec<(String, String)> = match env.signal(s, "HEADERS") {
        Some(h) => parse_headers(h)?,
        None => Vec::new(),
    };
    for (k, v) in cfg.headers.iter().chain(sc.headers.iter()).flatten() {
        headers.retain(|(hk, _)| !hk.eq_ignore_ascii_case(k));
        headers.push((k.to_ascii_lowercase(), v.clone()));
    }
    let timeout = match sc.timeout_ms.or(cfg.timeout_ms) {
        Some(t) => t,
        None => match env.signal(s, "TIMEOUT") {
            Some(v) => v.trim().parse().map_err(|_| OtlpConfigError::Env {
                var: "OTEL_EXPORTER_OTLP_TIMEOUT",
                value: v.to_string(),
            })?,
            None => 10_000,
        },
    };
    let path = |file: &Option<PathBuf>, suffix: &str| {
        file.clone()
            .or_else(|| env.signal(s, suffix).map(PathBuf::from))
    };
    let tls = Tls {
        ca_file: path(&cfg.tls.ca_file, "CERTIFICATE"),
        cert_file: path(&cfg.tls.cert_file, "CLIENT_CERTIFICATE"),
        key_file: path(&cfg.tls.key_file, "CLIENT_KEY"),
    };
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err(OtlpConfigError::Invalid(
            "a client certificate needs its key (and the other way round)".into(),
        ));
    }
    Ok(Some(Target {
        url,
        protocol,
        headers,
        timeout: Duration::from_millis(timeout.max(1)),
        tls,
    }))
}

/// The URL a signal is sent to. A base endpoint gets `/v1/<signal>` over HTTP; gRPC uses
/// the address as is (a missing scheme means `https`, or `http` when insecure).
fn endpoint_url(
    url: &str,
    full: bool,
    protocol: Protocol,
    s: Signal,
    insecure: bool,
) -> Result<String, OtlpConfigError> {
    let url = url.trim();
    let bad = |reason| OtlpConfigError::Endpoint {
        url: url.to_string(),
        reason,
    };
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else if protocol == Protocol::Grpc {
        format!("{}://{url}", if insecure { "http" } else { "https" })
    } else {
        return Err(bad("an HTTP endpoint needs http:// or https://"));
    };
    let (scheme, rest) = with_scheme.split_once("://").unwrap_or(("", ""));
    if scheme != "http" && scheme != "https" {
        return Err(bad("the scheme must be http or https"));
    }
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("no host"));
    }
    Ok(match protocol {
        Protocol::HttpProtobuf if !full => {
            format!("{}/v1/{}", with_scheme.trim_end_matches('/'), s.label())
        }
        _ => with_scheme,
    })
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `k=v,k2=v2`, values percent-encoded (W3C baggage format).
pub fn parse_headers(raw: &str) -> Result<Vec<(String, String)>, OtlpConfigError> {
    parse_pairs(raw, "OTEL_EXPORTER_OTLP_HEADERS").map(|v| {
        v.into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect()
    })
}

fn parse_pairs(raw: &str, var: &'static str) -> Result<Vec<(String, String)>, OtlpConfigError> {
    let mut out = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(OtlpConfigError::Env {
                var,
                value: item.to_string(),
            });
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(OtlpConfigError::Env {
                var,
                value: item.to_string(),
            });
        }
        out.push((k.to_string(), percent_decode(v.trim())));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The resource: `service.name`, `service.version`, `host.name`, `k8s.node.name`,
/// `k8s.cluster.name`, then `OTEL_RESOURCE_ATTRIBUTES` and the config's attributes (last wins).
fn resource(
    cfg: &OtlpConfig,
    env: &OtelEnv,
    host: &Host,
) -> Result<Vec<(String, String)>, OtlpConfigError> {
    let mut attrs: BTreeMap<String, String> = BTreeMap::new();
    attrs.insert("service.name".into(), "inferscope".into());
    attrs.insert("service.version".into(), env!("CARGO_PKG_VERSION").into());
    if let Some(h) = &host.host_name {
        attrs.insert("host.name".into(), h.clone());
    }
    if let Some(raw) = env.get("OTEL_RESOURCE_ATTRIBUTES") {
        attrs.extend(parse_pairs(raw, "OTEL_RESOURCE_ATTRIBUTES")?);
    }
    if let Some(n) = cfg.node_name.as_deref().or(env.get("NODE_NAME")) {
        attrs.insert("k8s.node.name".into(), n.to_string());
    }
    if let Some(c) = &cfg.cluster_name {
        attrs.insert("k8s.cluster.name".into(), c.clone());
    }
    if let Some(extra) = &cfg.resource_attributes {
        attrs.extend(extra.clone());
    }
    if let Some(name) = cfg.service_name.as_deref().or(env.get("OTEL_SERVICE_NAME")) {
        attrs.insert("service.name".into(), name.to_string());
    }
    Ok(attrs.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::env;

    fn host() -> Host {
        Host {
            host_name: Some("node-a".into()),
        }
    }

    #[test]
    fn off_without_an_endpoint() {
        let s = resolve(&OtlpConfig::default(), &env(&[]), &host()).unwrap();
        assert!(s.is_none());
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ]);
        assert!(resolve(&OtlpConfig::default(), &e, &host())
            .unwrap()
            .is_none());
    }

    #[test]
    fn env_endpoint_gets_signal_paths_over_http() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9999/custom"),
            ("OTEL_LOGS_EXPORTER", "none"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20x,tenant=a",
            ),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "2500"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1500"),
        ]);
        let s = resolve(&OtlpConfig::default(), &e, &host())
            .unwrap()
            .unwrap();
        let m = s.metrics.unwrap();
        assert_eq!(m.url, "http://c:4318/v1/metrics");
        assert_eq!(m.protocol, Protocol::HttpProtobuf);
        assert_eq!(m.timeout, Duration::from_millis(2500));
        assert_eq!(
            m.headers,
            vec![
                ("authorization".to_string(), "Bearer x".to_string()),
                ("tenant".to_string(), "a".to_string())
            ]
        );
        assert_eq!(s.traces.unwrap().url, "http://t:9999/custom");
        assert!(s.logs.is_none());
        assert_eq!(s.export_interval, Duration::from_millis(1500));
    }

    #[test]
    fn flag_and_file_beat_the_environment() {
        let cfg = OtlpConfig {
            endpoint: Some("http://file:4317".into()),
            protocol: Some("grpc".into()),
            timeout_ms: Some(700),
            export_interval_ms: Some(5000),
            headers: Some([("Tenant".to_string(), "file".to_string())].into()),
            ..Default::default()
        };
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://envm:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "100"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "tenant=env,x=1"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
        ]);
        let s = resolve(&cfg, &e, &host()).unwrap().unwrap();
        let m = s.metrics.unwrap();
        assert_eq!(m.url, "http://file:4317");
        assert_eq!(m.protocol, Protocol::Grpc);
        assert_eq!(m.timeout, Duration::from_millis(700));
        assert_eq!(
            m.headers,
            vec![
                ("x".to_string(), "1".to_string()),
                ("tenant".to_string(), "file".to_string())
            ]
        );
        assert_eq!(s.export_interval, Duration::from_millis(5000));
    }

    #[test]
    fn grpc_without_scheme_and_bad_values() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
        ]);
        let s = resolve(&OtlpConfig::default(), &e, &host())
            .unwrap()
            .unwrap();
        assert_eq!(s.metrics.unwrap().url, "http://c:4317");
        for bad in [
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ],
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4318")],
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://c:4318")],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
            ],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
            ],
        ] {
            assert!(
                resolve(&OtlpConfig::default(), &env(&bad), &host()).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn tls_files_per_signal_then_general_and_the_file_first() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/env/ca.pem"),
            (
                "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE",
                "/env/metrics-ca.pem",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "/env/t.crt"),
            ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/env/t.key"),
        ]);
        let s = resolve(&OtlpConfig::default(), &e, &host())
            .unwrap()
            .unwrap();
        let (m, t, l) = (s.metrics.unwrap(), s.traces.unwrap(), s.logs.unwrap());
        assert_eq!(m.tls.ca_file, Some("/env/metrics-ca.pem".into()));
        assert_eq!(t.tls.ca_file, Some("/env/ca.pem".into()));
        assert_eq!(t.tls.cert_file, Some("/env/t.crt".into()));
        assert_eq!(t.tls.key_file, Some("/env/t.key".into()));
        assert_eq!(l.tls.cert_file, None, "mutual TLS only for traces");
        // The config file's files beat the environment's, for every signal.
        let cfg = OtlpConfig {
            tls: TlsConfig {
                ca_file: Some("/file/ca.pem".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let s = resolve(&cfg, &e, &host()).unwrap().unwrap();
        assert_eq!(s.metrics.unwrap().tls.ca_file, Some("/file/ca.pem".into()));
        // A client certificate without its key is an error at start.
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/env/c.crt"),
        ]);
        assert!(resolve(&OtlpConfig::default(), &e, &host()).is_err());
    }

    #[test]
    fn resource_attributes() {
        let cfg = OtlpConfig {
            endpoint: Some("http://c:4318".into()),
            cluster_name: Some("prod".into()),
            ..Default::default()
        };
        let e = env(&[
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod,team=ml",
            ),
            ("OTEL_SERVICE_NAME", "gpu-agent"),
            ("NODE_NAME", "gpu-node-7"),
        ]);
        let s = resolve(&cfg, &e, &host()).unwrap().unwrap();
        let get = |k: &str| {
            s.resource
                .iter()
                .find(|(a, _)| a == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("service.name"), Some("gpu-agent"));
        assert_eq!(get("service.version"), Some(env!("CARGO_PKG_VERSION")));
        assert_eq!(get("host.name"), Some("node-a"));
        assert_eq!(get("k8s.node.name"), Some("gpu-node-7"));
        assert_eq!(get("k8s.cluster.name"), Some("prod"));
        assert_eq!(get("team"), Some("ml"));
    }
}

//! Configuration: embedded defaults, then an optional TOML file, then `INFERSCOPE_*`
//! environment variables, then command-line flags. Environment variables name a key path with
//! `__` between sections (`INFERSCOPE_PROBES__STACK_SAMPLE_BYTES=16777216`); values are read as TOML
//! (numbers, booleans, arrays) and otherwise as strings. The environment reaches this module
//! through [`EnvSource`], so tests never mutate the process environment.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub const ENV_PREFIX: &str = "INFERSCOPE_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid value in environment variable {var}")]
    Env {
        var: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("environment variable {var} conflicts with another key")]
    EnvShape { var: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Otlp(#[from] crate::export::otlp::config::OtlpConfigError),
}

use crate::env::EnvSource;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the Prometheus `/metrics` and `/healthz` listener.
    pub prometheus_listen: SocketAddr,
    /// Where forensic reports are written.
    pub forensics_dir: PathBuf,
    /// CUDA driver libraries to probe in addition to the ones discovered.
    pub cuda_libs: Vec<PathBuf>,
    /// The `/proc` to read (the host's, when the agent runs in a container with it mounted).
    pub proc_root: PathBuf,
    /// eBPF probes.
    pub probes: crate::probe::ProbesConfig,
    /// GPU telemetry from NVML.
    pub nvml: crate::gpu::NvmlConfig,
    /// Forensic reports.
    pub forensics: crate::forensics::ForensicsConfig,
    /// Cardinality and memory limits.
    pub limits: crate::track::LimitsConfig,
    /// Requests timed on the wire (probe family `http`).
    pub http: crate::http::HttpConfig,
    /// GPU prices for the cost rules in deploy/prometheus/.
    pub cost: crate::gpu::CostConfig,
    /// The inference servers' own `/metrics`, scraped and re-exported.
    pub scrape: crate::scrape::ScrapeConfig,
    /// Pods, containers and their GPUs (Kubernetes).
    pub attribution: crate::attrib::AttributionConfig,
    /// OTLP export (off unless an endpoint is set; `OTEL_*` variables complete it).
    pub otlp: crate::export::otlp::config::OtlpConfig,
    /// The OTLP settings resolved from `otlp`, `--otlp-endpoint` and the `OTEL_*` variables
    /// (None: OTLP off).
    #[serde(skip)]
    pub otlp_settings: Option<crate::export::otlp::config::Settings>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            prometheus_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            forensics_dir: PathBuf::from("/var/lib/inferscope/forensics"),
            cuda_libs: Vec::new(),
            proc_root: PathBuf::from("/proc"),
            probes: Default::default(),
            nvml: Default::default(),
            forensics: Default::default(),
            limits: Default::default(),
            http: Default::default(),
            cost: Default::default(),
            scrape: Default::default(),
            attribution: Default::default(),
            otlp: Default::default(),
            otlp_settings: None,
        }
    }
}

/// Values from command-line flags, applied last.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub prometheus_listen: Option<SocketAddr>,
    pub forensics_dir: Option<PathBuf>,
    pub cuda_libs: Vec<PathBuf>,
    pub disable_probes: Vec<String>,
    pub nvml_lib: Option<PathBuf>,
    /// `--watch-port`: ports whose listeners are watched as inference servers.
    pub watch_ports: Vec<u16>,
    /// `--otlp-endpoint`: the collector (beats the config file and `OTEL_EXPORTER_OTLP_*`).
    pub otlp_endpoint: Option<String>,
}

impl Config {
    pub fn load(
        file: Option<&Path>,
        env: &dyn EnvSource,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|source| ConfigError::Parse {
                        path: path.to_path_buf(),
                        source,
                    })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        let mut config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|source| ConfigError::Parse {
                    path: file
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| "environment".into()),
                    source,
                })?;
        if let Some(addr) = overrides.prometheus_listen {
            config.prometheus_listen = addr;
        }
        if let Some(dir) = &overrides.forensics_dir {
            config.forensics_dir = dir.clone();
        }
        config.cuda_libs.extend(overrides.cuda_libs.iter().cloned());
        config
            .http
            .watch_ports
            .extend(overrides.watch_ports.iter().copied());
        config
            .probes
            .disabled
            .extend(overrides.disable_probes.iter().cloned());
        if let Some(lib) = &overrides.nvml_lib {
            config.nvml.lib = Some(lib.clone());
        }
        if let Some(url) = &overrides.otlp_endpoint {
            config.otlp.endpoint = Some(url.clone());
        }
        config.validate()?;
        config.otlp_settings = crate::export::otlp::config::resolve(
            &config.otlp,
            env,
            &crate::export::otlp::config::Host::current(),
        )?;
        Ok(config)
    }

    /// Each section's own checks; the first that fails is the answer.
    fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            self.probes.validate(),
            self.nvml.validate(),
            self.cost.validate(),
            self.scrape.validate(),
            self.forensics.validate(),
        ];
        checks
            .into_iter()
            .collect::<Result<(), String>>()
            .map_err(ConfigError::Invalid)
    }
}

fn apply_env(table: &mut toml::Table, env: &dyn EnvSource) -> Result<(), ConfigError> {
    for (var, raw) in env.vars() {
        let Some(key) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // Variables of the agent's runtime, not config keys.
        if key.is_empty() || key == "LOG" || key.starts_with("EBPF_") || key.starts_with("FAULT_") {
            continue;
        }
        let path: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
        let value = parse_env_value(&raw).map_err(|source| ConfigError::Env {
            var: var.clone(),
            source,
        })?;
        let mut node = &mut *table;
        for section in &path[..path.len() - 1] {
            let entry = node
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = entry
                .as_table_mut()
                .ok_or_else(|| ConfigError::EnvShape { var: var.clone() })?;
        }
        node.insert(path[path.len() - 1].clone(), value);
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> Result<toml::Value, toml::de::Error> {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => Ok(t.remove("v").unwrap_or(toml::Value::String(raw.into()))),
        Err(_) if !raw.trim_start().starts_with(['[', '{', '"']) => {
            Ok(toml::Value::String(raw.to_string()))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{env::env, error_chain as chain};

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load(None, &env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.prometheus_listen.to_string(), "127.0.0.1:9464");
        assert_eq!(
            c.forensics_dir,
            PathBuf::from("/var/lib/inferscope/forensics")
        );
        assert_eq!(c.probes.stack_threshold_bytes, 64 << 20);
        assert_eq!(c.probes.stack_sample_bytes, 32 << 20);
        assert_eq!(c.probes.shed_cooldown_secs, 60);
        assert_eq!(c.probes.http_budget_core_share, 0.05);
        assert_eq!(c.probes.poll_interval_ms, 5);
        assert_eq!(c.probes.http_poll_interval_ms, 200);
        assert!(
            !c.probes.run_time_stats,
            "no tax on the node's other BPF programs by default"
        );
        assert!(c.scrape.enabled);
        assert_eq!(c.scrape.interval_ms, 15_000);
        let c = Config::load(
            None,
            &env(&[("INFERSCOPE_SCRAPE__INTERVAL_MS", "200")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.scrape.interval_ms, 200);
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "prometheus_listen = \"0.0.0.0:1000\"\n[probes]\nstack_sample_bytes = 8\ndisabled = [\"cuMemHostAlloc\"]\n",
        )
        .unwrap();
        let e = env(&[
            ("INFERSCOPE_PROBES__STACK_SAMPLE_BYTES", "16"),
            ("INFERSCOPE_FORENSICS_DIR", "/tmp/f"),
            ("OTHER", "x"),
        ]);
        let flags = Overrides {
            prometheus_listen: Some("127.0.0.1:2000".parse().unwrap()),
            disable_probes: vec!["sched".into()],
            nvml_lib: Some("/opt/nvml.so".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&path), &e, &flags).unwrap();
        assert_eq!(c.prometheus_listen.to_string(), "127.0.0.1:2000");
        assert_eq!(c.probes.stack_sample_bytes, 16);
        assert_eq!(c.forensics_dir, PathBuf::from("/tmp/f"));
        assert_eq!(c.probes.disabled, vec!["cuMemHostAlloc", "sched"]);
        assert_eq!(c.nvml.lib, Some(PathBuf::from("/opt/nvml.so")));
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_key_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[probes]\nstack_sample_evry = 8\n").unwrap();
        let err = Config::load(Some(&path), &env(&[]), &Overrides::default()).unwrap_err();
        assert!(chain(&err).contains("stack_sample_evry"), "{err}");
        let err = Config::load(
            None,
            &env(&[("INFERSCOPE_NOPE", "1")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(chain(&err).contains("nope"), "{err}");
    }

    #[test]
    fn gpu_prices_by_type_with_a_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[cost]\ngpu_hour_price = 2.5\n[cost.gpu_hour_price_by_type]\n\"NVIDIA H100 80GB HBM3\" = 4.25\n",
        )
        .unwrap();
        let c = Config::load(Some(&path), &env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.cost.price_of("NVIDIA H100 80GB HBM3"), 4.25);
        assert_eq!(c.cost.price_of("NVIDIA L4"), 2.5);
        assert_eq!(Config::default().cost.price_of("NVIDIA L4"), 1.0);
    }

    #[test]
    fn bad_values_are_rejected() {
        let bad = [
            ("INFERSCOPE_PROBES__RING_BUFFER_BYTES", "5000"),
            ("INFERSCOPE_PROBES__BUDGET_CORE_SHARE", "2.0"),
            ("INFERSCOPE_PROBES__HTTP_BUDGET_CORE_SHARE", "-0.1"),
            ("INFERSCOPE_PROBES__SHED_COOLDOWN_SECS", "0"),
            ("INFERSCOPE_PROBES__POLL_INTERVAL_MS", "0"),
            ("INFERSCOPE_PROBES__HTTP_POLL_INTERVAL_MS", "0"),
            ("INFERSCOPE_PROBES__DISCOVERY_INTERVAL_MS", "0"),
            ("INFERSCOPE_PROBES__DISABLED", "[\"cuNothing\"]"),
            ("INFERSCOPE_PROMETHEUS_LISTEN", "not-an-address"),
            ("INFERSCOPE_COST__GPU_HOUR_PRICE", "-1.0"),
            ("INFERSCOPE_SCRAPE__INTERVAL_MS", "0"),
            ("INFERSCOPE_SCRAPE__PATH", "metrics"),
        ];
        for (k, v) in bad {
            assert!(
                Config::load(None, &env(&[(k, v)]), &Overrides::default()).is_err(),
                "{k}={v} accepted"
            );
        }
    }

    #[test]
    fn otlp_flag_beats_file_and_environment() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
            ("INFERSCOPE_OTLP__ENDPOINT", "http://file:4318"),
        ]);
        let c = Config::load(None, &e, &Overrides::default()).unwrap();
        let s = c.otlp_settings.unwrap();
        assert_eq!(s.metrics.unwrap().url, "http://file:4318/v1/metrics");
        let flags = Overrides {
            otlp_endpoint: Some("http://flag:4318".into()),
            ..Default::default()
        };
        let c = Config::load(None, &e, &flags).unwrap();
        assert_eq!(
            c.otlp_settings.unwrap().traces.unwrap().url,
            "http://flag:4318/v1/traces"
        );
        assert!(Config::load(None, &env(&[]), &Overrides::default())
            .unwrap()
            .otlp_settings
            .is_none());
        let bad = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
        ]);
        let err = Config::load(None, &bad, &Overrides::default()).unwrap_err();
        assert!(chain(&err).contains("carrier-pigeon"), "{err}");
    }
}

//! Configuration: embedded defaults, then an optional TOML file, then `INFERSCOPE_*`
//! environment variables, then command-line flags. Environment variables name a key path with
//! `__` between sections (`INFERSCOPE_PROBES__STACK_SAMPLE_EVERY=16`); values are read as TOML
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

/// Where environment variables come from.
pub trait EnvSource {
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl EnvSource for Vec<(String, String)> {
    fn vars(&self) -> Vec<(String, String)> {
        self.clone()
    }
}

/// An environment of `pairs`, for tests.
#[cfg(test)]
pub(crate) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

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
    pub probes: ProbesConfig,
    /// GPU telemetry from NVML.
    pub nvml: NvmlConfig,
    /// Forensic reports.
    pub forensics: ForensicsConfig,
    /// Cardinality and memory limits.
    pub limits: LimitsConfig,
    /// Requests timed on the wire (probe family `http`).
    pub http: crate::http::HttpConfig,
    /// GPU prices for the cost rules in deploy/prometheus/.
    pub cost: CostConfig,
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

/// Prices are exported per GPU (`inferscope_gpu_hour_price`) rather than kept in the
/// Prometheus rules so that one value set by the installer (Helm values → this section)
/// prices every node, and the rules stay the same everywhere.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CostConfig {
    /// Price of one GPU-hour, in any currency, for GPU types not listed below. The default
    /// 1.0 makes every cost figure read as GPU-hours until real prices are set.
    pub gpu_hour_price: f64,
    /// Price of one GPU-hour by NVML product name (`gpu_type`, e.g. "NVIDIA H100 80GB HBM3").
    pub gpu_hour_price_by_type: std::collections::BTreeMap<String, f64>,
}

impl Default for CostConfig {
    fn default() -> Self {
        Self {
            gpu_hour_price: 1.0,
            gpu_hour_price_by_type: Default::default(),
        }
    }
}

impl CostConfig {
    pub fn price_of(&self, gpu_type: &str) -> f64 {
        self.gpu_hour_price_by_type
            .get(gpu_type)
            .copied()
            .unwrap_or(self.gpu_hour_price)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// Kill switch: probe families (`cuda`, `sched`) or single CUDA symbols (`cuMemHostAlloc`,
    /// or `cuda:cuMemHostAlloc`) that are never attached.
    pub disabled: Vec<String>,
    /// One in N successful allocations records its user call stack (0: only failures do).
    pub stack_sample_every: u64,
    /// Share of one CPU core the probes may cost before the agent sheds them (0: no budget).
    pub budget_core_share: f64,
    /// Share of one CPU core the `http` family may cost before the agent detaches it until
    /// its cool-down ends (0: no budget). Its programs run on the socket syscalls of every
    /// process on the node, so the cost follows the node's syscall rate.
    pub http_budget_core_share: f64,
    /// Turn on the kernel's BPF run-time statistics (`kernel.bpf_stats_enabled`) while the
    /// agent runs, to measure what the `http` family costs. They cost every BPF program on
    /// the node two clock reads per run, so they are off unless asked for (a node running a
    /// BPF datapath pays them on every packet); off (or without CAP_SYS_ADMIN), the cost is
    /// estimated from the runs and bytes the programs count.
    pub run_time_stats: bool,
    /// How long a probe the budget shed stays off before it is re-attached and measured
    /// again, in seconds; doubled each time the same probe is shed again soon after, up to
    /// 30 minutes.
    pub shed_cooldown_secs: u64,
    /// How often the probe budget and library discovery run, in milliseconds.
    pub discovery_interval_ms: u64,
    /// Ring buffer size in bytes (a power of two, at least one page).
    pub ring_buffer_bytes: u32,
    /// Longest time an event may wait in the ring buffer before userspace reads it, in ms.
    pub poll_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ForensicsConfig {
    /// Reports kept in `forensics_dir`; the oldest go first.
    pub max_reports: usize,
    /// Bytes the reports may take in `forensics_dir`.
    pub max_bytes: u64,
    /// One report per process and kind per window, in seconds; further events are counted.
    pub window_secs: u64,
    /// How far back a report's timeline reaches, in seconds.
    pub timeline_secs: u64,
}

impl Default for ForensicsConfig {
    fn default() -> Self {
        Self {
            max_reports: 200,
            max_bytes: 64 * 1024 * 1024,
            window_secs: 60,
            timeline_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NvmlConfig {
    /// Sample GPUs through NVML (off: no GPU series, no annotations).
    pub enabled: bool,
    /// NVML library to load; default: `libnvidia-ml.so.1` from the loader's search path, then
    /// the standard driver directories.
    pub lib: Option<PathBuf>,
    /// Sampling interval in milliseconds (sub-second works; 100 ms is the practical floor).
    pub interval_ms: u64,
    /// How much sample history per GPU is kept for correlation, in seconds.
    pub history_secs: u64,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lib: None,
            interval_ms: 1000,
            history_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Processes tracked at once; events of further processes are counted and dropped.
    pub max_processes: usize,
    /// Live allocations tracked per process; beyond it bytes are still summed, pointers dropped.
    pub max_allocations_per_process: usize,
    /// Bytes the allocation ledger may hold for all processes together (one live allocation
    /// costs at most `track::ledger::ENTRY_BYTES`, 93); past it further allocations are not
    /// tracked, counted as `ledger_budget`. Worst case of the ledger: this plus
    /// `max_processes` empty process ledgers (352 bytes each): 65.4 MiB by default, where
    /// 4096 processes × 1M allocations used to allow 350 GiB.
    pub ledger_budget_bytes: usize,
    /// Longest `comm` label value.
    pub max_label_len: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            prometheus_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            forensics_dir: PathBuf::from("/var/lib/inferscope/forensics"),
            cuda_libs: Vec::new(),
            proc_root: PathBuf::from("/proc"),
            probes: ProbesConfig::default(),
            nvml: NvmlConfig::default(),
            forensics: ForensicsConfig::default(),
            limits: LimitsConfig::default(),
            http: Default::default(),
            cost: CostConfig::default(),
            scrape: Default::default(),
            attribution: Default::default(),
            otlp: Default::default(),
            otlp_settings: None,
        }
    }
}

impl Default for ProbesConfig {
    fn default() -> Self {
        Self {
            disabled: Vec::new(),
            stack_sample_every: 64,
            budget_core_share: 0.05,
            http_budget_core_share: 0.05,
            run_time_stats: false,
            shed_cooldown_secs: 60,
            discovery_interval_ms: 1000,
            ring_buffer_bytes: 8 * 1024 * 1024,
            poll_interval_ms: 5,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_processes: 4096,
            max_allocations_per_process: 262_144,
            ledger_budget_bytes: 64 * 1024 * 1024,
            max_label_len: 64,
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

    fn validate(&self) -> Result<(), ConfigError> {
        let rb = self.probes.ring_buffer_bytes;
        if rb < 4096 || !rb.is_power_of_two() {
            return Err(ConfigError::Invalid(format!(
                "probes.ring_buffer_bytes = {rb}: must be a power of two of at least 4096"
            )));
        }
        for (key, share) in [
            ("budget_core_share", self.probes.budget_core_share),
            ("http_budget_core_share", self.probes.http_budget_core_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(ConfigError::Invalid(format!(
                    "probes.{key} = {share}: must be between 0 and 1"
                )));
            }
        }
        if self.nvml.interval_ms < 10 {
            return Err(ConfigError::Invalid(format!(
                "nvml.interval_ms = {}: must be at least 10",
                self.nvml.interval_ms
            )));
        }
        if self.probes.shed_cooldown_secs == 0 {
            return Err(ConfigError::Invalid(
                "probes.shed_cooldown_secs must be above 0: a shed probe comes back after it"
                    .into(),
            ));
        }
        if self.probes.poll_interval_ms == 0 || self.probes.discovery_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "probes.poll_interval_ms and probes.discovery_interval_ms must be above 0".into(),
            ));
        }
        let prices = std::iter::once(("gpu_hour_price", &self.cost.gpu_hour_price)).chain(
            self.cost
                .gpu_hour_price_by_type
                .iter()
                .map(|(k, v)| (k.as_str(), v)),
        );
        for (what, price) in prices {
            if !price.is_finite() || *price < 0.0 {
                return Err(ConfigError::Invalid(format!(
                    "cost: price {price} for {what:?} must be a number of at least 0"
                )));
            }
        }
        let s = &self.scrape;
        if s.interval_ms < 100
            || s.timeout_ms == 0
            || s.max_bytes == 0
            || s.max_samples == 0
            || !s.path.starts_with('/')
        {
            return Err(ConfigError::Invalid(format!(
                "scrape: interval_ms = {} (at least 100), timeout_ms = {}, max_bytes = {} and max_samples = {} (above 0), path = {:?} (starting with /)",
                s.interval_ms, s.timeout_ms, s.max_bytes, s.max_samples, s.path
            )));
        }
        for name in &self.probes.disabled {
            if !crate::probe::is_known_probe(name) {
                return Err(ConfigError::Invalid(format!(
                    "probes.disabled: unknown probe {name:?} (families: cuda, sched, oom, http; or a CUDA symbol)"
                )));
            }
        }
        Ok(())
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

    use crate::error_chain as chain;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load(None, &env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.prometheus_listen.to_string(), "127.0.0.1:9464");
        assert_eq!(
            c.forensics_dir,
            PathBuf::from("/var/lib/inferscope/forensics")
        );
        assert_eq!(c.probes.stack_sample_every, 64);
        assert_eq!(c.probes.shed_cooldown_secs, 60);
        assert_eq!(c.probes.http_budget_core_share, 0.05);
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
            "prometheus_listen = \"0.0.0.0:1000\"\n[probes]\nstack_sample_every = 8\ndisabled = [\"cuMemHostAlloc\"]\n",
        )
        .unwrap();
        let e = env(&[
            ("INFERSCOPE_PROBES__STACK_SAMPLE_EVERY", "16"),
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
        assert_eq!(c.probes.stack_sample_every, 16);
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

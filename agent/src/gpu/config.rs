//! The `[nvml]` and `[cost]` sections: GPU sampling and the price of a GPU-hour.

use std::path::PathBuf;

use serde::Deserialize;

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

impl NvmlConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms < 10 {
            return Err(format!(
                "nvml.interval_ms = {}: must be at least 10",
                self.interval_ms
            ));
        }
        Ok(())
    }
}

impl CostConfig {
    pub fn validate(&self) -> Result<(), String> {
        let prices = std::iter::once(("gpu_hour_price", &self.gpu_hour_price)).chain(
            self.gpu_hour_price_by_type
                .iter()
                .map(|(k, v)| (k.as_str(), v)),
        );
        for (what, price) in prices {
            if !price.is_finite() || *price < 0.0 {
                return Err(format!(
                    "cost: price {price} for {what:?} must be a number of at least 0"
                ));
            }
        }
        Ok(())
    }
}

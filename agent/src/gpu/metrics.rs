//! NVML's series: per GPU (utilization, memory, power, energy, clocks, throttling, PCIe, ECC,
//! XID) and the sampler's own health.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};

use crate::metrics::{CounterF, GaugeF, Metrics};

/// Labels of every per-GPU series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub gpu: u32,
    pub gpu_uuid: String,
    pub gpu_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuInfoLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub driver_version: String,
    pub cuda_version: String,
    pub mig_mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuReasonLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuDirectionLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuEccLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    /// `corrected` or `uncorrected`.
    pub severity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuXidLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub xid: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuCallLabels {
    pub gpu: u32,
    pub call: &'static str,
}

pub struct GpuMetrics {
    /// The shared counters (`inferscope_source_up{source="nvml"}`).
    pub core: Arc<Metrics>,
    pub gpu_info: Family<GpuInfoLabels, Gauge>,
    pub gpu_hour_price: Family<GpuLabels, GaugeF>,
    pub gpu_utilization: Family<GpuLabels, GaugeF>,
    pub gpu_memory_utilization: Family<GpuLabels, GaugeF>,
    pub gpu_memory_used: Family<GpuLabels, Gauge>,
    pub gpu_memory_free: Family<GpuLabels, Gauge>,
    pub gpu_memory_total: Family<GpuLabels, Gauge>,
    pub gpu_power: Family<GpuLabels, GaugeF>,
    pub gpu_power_limit: Family<GpuLabels, GaugeF>,
    pub gpu_energy: Family<GpuLabels, CounterF>,
    pub gpu_temperature: Family<GpuLabels, Gauge>,
    pub gpu_sm_clock: Family<GpuLabels, Gauge>,
    pub gpu_memory_clock: Family<GpuLabels, Gauge>,
    pub gpu_throttle_active: Family<GpuReasonLabels, Gauge>,
    pub gpu_pcie_throughput: Family<GpuDirectionLabels, Gauge>,
    pub gpu_ecc_errors: Family<GpuEccLabels, Counter>,
    pub gpu_xid_errors: Family<GpuXidLabels, Counter>,
    pub gpu_idle_seconds: Family<GpuLabels, CounterF>,
    pub gpu_lost: Family<GpuLabels, Gauge>,
    pub nvml_unsupported: Family<GpuCallLabels, Gauge>,
    pub nvml_errors: Family<GpuCallLabels, Counter>,
    pub nvml_samples: Counter,
}

impl GpuMetrics {
    pub fn new(core: &Arc<Metrics>) -> Arc<Self> {
        let m = Self {
            core: core.clone(),
            gpu_info: Family::default(),
            gpu_hour_price: Family::default(),
            gpu_utilization: Family::default(),
            gpu_memory_utilization: Family::default(),
            gpu_memory_used: Family::default(),
            gpu_memory_free: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_power: Family::default(),
            gpu_power_limit: Family::default(),
            gpu_energy: Family::default(),
            gpu_temperature: Family::default(),
            gpu_sm_clock: Family::default(),
            gpu_memory_clock: Family::default(),
            gpu_throttle_active: Family::default(),
            gpu_pcie_throughput: Family::default(),
            gpu_ecc_errors: Family::default(),
            gpu_xid_errors: Family::default(),
            gpu_idle_seconds: Family::default(),
            gpu_lost: Family::default(),
            nvml_unsupported: Family::default(),
            nvml_errors: Family::default(),
            nvml_samples: Counter::default(),
        };
        core.register_with(|r| {
            r.register(
                "gpu_info",
                "GPU identity: driver and CUDA versions, MIG mode (value 1)",
                m.gpu_info.clone(),
            );
            r.register(
                "inferscope_gpu_hour_price",
                "Configured price of one hour of this GPU (cost.gpu_hour_price*), for the cost rules",
                m.gpu_hour_price.clone(),
            );
            r.register(
                "gpu_utilization",
                "Fraction of the last sample period a kernel was running (NVML), 0-1",
                m.gpu_utilization.clone(),
            );
            r.register(
                "gpu_memory_utilization",
                "Fraction of the last sample period device memory was read or written (NVML), 0-1",
                m.gpu_memory_utilization.clone(),
            );
            r.register(
                "gpu_memory_used_bytes",
                "Device memory in use (NVML)",
                m.gpu_memory_used.clone(),
            );
            r.register(
                "gpu_memory_free_bytes",
                "Device memory free (NVML)",
                m.gpu_memory_free.clone(),
            );
            r.register(
                "gpu_memory_total_bytes",
                "Device memory installed (NVML)",
                m.gpu_memory_total.clone(),
            );
            r.register(
                "gpu_power_watts",
                "Power draw (NVML)",
                m.gpu_power.clone(),
            );
            r.register(
                "gpu_power_limit_watts",
                "Enforced power limit (NVML)",
                m.gpu_power_limit.clone(),
            );
            r.register(
                "gpu_energy_joules",
                "Energy consumed since the driver was loaded (NVML)",
                m.gpu_energy.clone(),
            );
            r.register(
                "gpu_temperature_celsius",
                "GPU die temperature (NVML)",
                m.gpu_temperature.clone(),
            );
            r.register(
                "gpu_sm_clock_hertz",
                "SM clock (NVML)",
                m.gpu_sm_clock.clone(),
            );
            r.register(
                "gpu_memory_clock_hertz",
                "Memory clock (NVML)",
                m.gpu_memory_clock.clone(),
            );
            r.register(
                "gpu_throttle_active",
                "1 while a clock event (throttle) reason is active (NVML), per reason",
                m.gpu_throttle_active.clone(),
            );
            r.register(
                "gpu_pcie_throughput_bytes_per_second",
                "PCIe throughput over the last 20 ms (NVML), per direction",
                m.gpu_pcie_throughput.clone(),
            );
            r.register(
                "gpu_ecc_errors",
                "ECC errors since the driver was loaded (NVML), corrected and uncorrected",
                m.gpu_ecc_errors.clone(),
            );
            r.register(
                "gpu_xid_errors",
                "XID critical errors (NVML events), per XID code",
                m.gpu_xid_errors.clone(),
            );
            r.register(
                "gpu_idle_seconds",
                "Time the GPU spent at 0 % utilization, from the samples (idle-cost accounting)",
                m.gpu_idle_seconds.clone(),
            );
            r.register(
                "inferscope_gpu_lost",
                "1 once NVML reports the GPU lost (fallen off the bus)",
                m.gpu_lost.clone(),
            );
            r.register(
                "inferscope_nvml_unsupported",
                "1 for NVML calls the GPU or library does not support; they are no longer made",
                m.nvml_unsupported.clone(),
            );
            r.register(
                "inferscope_nvml_errors",
                "NVML calls that failed, per call",
                m.nvml_errors.clone(),
            );
            r.register(
                "inferscope_nvml_samples",
                "Sampling rounds over all GPUs",
                m.nvml_samples.clone(),
            );
        });
        Arc::new(m)
    }
}

//! The NVML sampler: opens the library, reads every GPU each interval, and publishes to the
//! metrics, the history ring and the tracker. A call a GPU does not support (or a library too
//! old to export) is reported once and not made again; a lost GPU stops its series.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use nvml_wrapper::{
    enum_wrappers::device::{Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor},
    enums::device::UsedGpuMemory,
    error::NvmlError,
    Device, Nvml,
};

use super::{
    history::GpuHistory,
    metrics::{
        GpuCallLabels, GpuDirectionLabels, GpuEccLabels, GpuInfoLabels, GpuLabels, GpuMetrics,
        GpuReasonLabels,
    },
    pids::PidMapper,
    throttle, GpuProcess, GpuProcesses, GpuSample,
};
use crate::{
    clock::monotonic_ns,
    health::Heartbeat,
    metrics::{Metrics, SourceLabels},
    proc::ProcFs,
};

const LIB: &str = "libnvidia-ml.so.1";

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot load NVML from {path}")]
    Load {
        path: String,
        #[source]
        source: NvmlError,
    },
}

/// Opens NVML: the configured library, else `libnvidia-ml.so.1` through the loader's search
/// path, else in the standard driver directories (GPU operator installs included).
pub fn open(lib: Option<&Path>) -> Result<Nvml, OpenError> {
    let mut candidates: Vec<PathBuf> = match lib {
        Some(p) => vec![p.to_path_buf()],
        None => std::iter::once(PathBuf::from(LIB))
            .chain(
                crate::probe::discover::STANDARD_DIRS
                    .iter()
                    .map(|d| Path::new(d).join(LIB)),
            )
            .collect(),
    };
    if lib.is_none() {
        candidates.dedup();
    }
    let mut last = None;
    for path in candidates {
        if path.is_absolute() && !path.exists() && lib.is_none() {
            continue;
        }
        match Nvml::builder().lib_path(OsStr::new(&path)).init() {
            Ok(nvml) => return Ok(nvml),
            Err(source) => {
                last = Some(OpenError::Load {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or(OpenError::Load {
        path: LIB.into(),
        source: NvmlError::LibraryNotFound,
    }))
}

/// The NVML readings the sampler makes; each can be found unsupported on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Call {
    Utilization,
    Memory,
    Power,
    PowerLimit,
    Energy,
    Temperature,
    SmClock,
    MemoryClock,
    Throttle,
    Pcie,
    Ecc,
    Processes,
    ProcessUtilization,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Utilization => "utilization",
            Call::Memory => "memory",
            Call::Power => "power",
            Call::PowerLimit => "power_limit",
            Call::Energy => "energy",
            Call::Temperature => "temperature",
            Call::SmClock => "sm_clock",
            Call::MemoryClock => "memory_clock",
            Call::Throttle => "clocks_event_reasons",
            Call::Pcie => "pcie",
            Call::Ecc => "ecc",
            Call::Processes => "processes",
            Call::ProcessUtilization => "process_utilization",
        }
    }
}

/// What the sampler knows about one GPU between samples.
struct Gpu {
    index: u32,
    labels: GpuLabels,
    unsupported: HashSet<Call>,
    lost: bool,
    last_energy_mj: Option<u64>,
    last_ecc: [Option<u64>; 2],
    last_ts_ns: Option<u64>,
    last_process_sample_us: u64,
}

pub struct Sampler {
    nvml: Arc<Nvml>,
    gpus: Vec<Gpu>,
    metrics: Arc<GpuMetrics>,
    history: Arc<GpuHistory>,
    /// NVML's per-process view, each sample.
    reports: Option<super::ReportSink>,
    pids: PidMapper,
}

impl Sampler {
    /// Reads the GPUs' identities and publishes `gpu_info`.
    pub fn new(
        nvml: Arc<Nvml>,
        metrics: Arc<GpuMetrics>,
        history: Arc<GpuHistory>,
        reports: Option<super::ReportSink>,
        procfs: ProcFs,
        cost: &super::CostConfig,
    ) -> Result<Self, NvmlError> {
        let driver = nvml
            .sys_driver_version()
            .unwrap_or_else(|_| "unknown".into());
        let cuda = nvml
            .sys_cuda_driver_version()
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
            .unwrap_or_else(|_| "unknown".into());
        let count = nvml.device_count()?;
        let mut gpus = Vec::new();
        for index in 0..count {
            let device = match nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(gpu = index, error = %e, "NVML cannot open GPU, skipping it");
                    continue;
                }
            };
            let labels = GpuLabels {
                gpu: index,
                gpu_uuid: device.uuid().unwrap_or_else(|_| format!("unknown-{index}")),
                gpu_type: device.name().unwrap_or_else(|_| "unknown".into()),
            };
            let mig_mode = match device.mig_mode() {
                Ok(m) if m.current == 1 => "enabled",
                Ok(_) => "disabled",
                Err(_) => "unsupported",
            };
            metrics
                .gpu_info
                .get_or_create(&GpuInfoLabels {
                    gpu: labels.clone(),
                    driver_version: driver.clone(),
                    cuda_version: cuda.clone(),
                    mig_mode,
                })
                .set(1);
            metrics
                .gpu_hour_price
                .get_or_create(&labels)
                .set(cost.price_of(&labels.gpu_type));
            tracing::info!(
                gpu = index,
                uuid = labels.gpu_uuid,
                name = labels.gpu_type,
                driver,
                cuda,
                mig_mode,
                "GPU found"
            );
            history.set_identity(index, labels.gpu_uuid.clone(), labels.gpu_type.clone());
            gpus.push(Gpu {
                index,
                labels,
                unsupported: HashSet::new(),
                lost: false,
                last_energy_mj: None,
                last_ecc: [None, None],
                last_ts_ns: None,
                last_process_sample_us: 0,
            });
        }
        Ok(Self {
            nvml,
            gpus,
            metrics,
            history,
            reports,
            pids: PidMapper::new(procfs),
        })
    }

    pub fn gpu_labels(&self) -> Vec<GpuLabels> {
        self.gpus.iter().map(|g| g.labels.clone()).collect()
    }

    /// Samples every GPU once.
    pub fn sample(&mut self) {
        let mut processes = GpuProcesses {
            ts_ns: monotonic_ns(),
            entries: Vec::new(),
        };
        let nvml = self.nvml.clone();
        let mut usage = Vec::new();
        for i in 0..self.gpus.len() {
            if self.gpus[i].lost {
                continue;
            }
            let device = match nvml.device_by_index(self.gpus[i].index) {
                Ok(d) => d,
                Err(NvmlError::GpuLost) => {
                    self.mark_lost(i);
                    continue;
                }
                Err(e) => {
                    self.count_error(i, "device", &e);
                    continue;
                }
            };
            match self.sample_gpu(i, &device, &mut processes.entries) {
                Ok(sample) => {
                    let (energy_j, busy_s) = self.publish(i, &sample);
                    if energy_j.is_some() || busy_s.is_some() {
                        usage.push(super::GpuUsage {
                            gpu: sample.gpu,
                            ts_ns: sample.ts_ns,
                            energy_j,
                            busy_s,
                            processes: processes
                                .entries
                                .iter()
                                .filter(|p| p.gpu == sample.gpu)
                                .cloned()
                                .collect(),
                        });
                    }
                    self.history.push(sample);
                }
                Err(Lost) => self.mark_lost(i),
            }
        }
        self.metrics.nvml_samples.inc();
        if let Some(report) = &self.reports {
            // A snapshot the reader has no room for is replaced next tick.
            report(super::GpuReport::Processes(processes));
            if !usage.is_empty() {
                report(super::GpuReport::Usage(usage));
            }
        }
    }

    fn sample_gpu(
        &mut self,
        i: usize,
        d: &Device,
        procs: &mut Vec<GpuProcess>,
    ) -> Result<GpuSample, Lost> {
        let gpu = self.gpus[i].index;
        let mut s = GpuSample {
            gpu,
            ts_ns: monotonic_ns(),
            ..Default::default()
        };
        if let Some(u) = self.read(i, Call::Utilization, || d.utilization_rates())? {
            s.utilization = Some(u.gpu);
            s.memory_utilization = Some(u.memory);
        }
        if let Some(m) = self.read(i, Call::Memory, || d.memory_info())? {
            s.memory_used = Some(m.used);
            s.memory_free = Some(m.free);
            s.memory_total = Some(m.total);
        }
        s.power_mw = self.read(i, Call::Power, || d.power_usage())?;
        s.power_limit_mw = self.read(i, Call::PowerLimit, || d.enforced_power_limit())?;
        s.energy_mj = self.read(i, Call::Energy, || d.total_energy_consumption())?;
        s.temperature_c = self.read(i, Call::Temperature, || {
            d.temperature(TemperatureSensor::Gpu)
        })?;
        s.sm_clock_mhz = self.read(i, Call::SmClock, || d.clock_info(Clock::SM))?;
        s.memory_clock_mhz = self.read(i, Call::MemoryClock, || d.clock_info(Clock::Memory))?;
        s.throttle = self.read(i, Call::Throttle, || {
            d.current_throttle_reasons().map(|r| r.bits())
        })?;
        if let Some((tx, rx)) = self.read(i, Call::Pcie, || {
            Ok((
                d.pcie_throughput(PcieUtilCounter::Send)?,
                d.pcie_throughput(PcieUtilCounter::Receive)?,
            ))
        })? {
            s.pcie_tx_kbs = Some(tx);
            s.pcie_rx_kbs = Some(rx);
        }
        if let Some((c, u)) = self.read(i, Call::Ecc, || {
            Ok((
                d.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate)?,
                d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate)?,
            ))
        })? {
            s.ecc_corrected = Some(c);
            s.ecc_uncorrected = Some(u);
        }
        let running = self.read(i, Call::Processes, || d.running_compute_processes())?;
        let since = self.gpus[i].last_process_sample_us;
        let utils = self
            .read(i, Call::ProcessUtilization, || {
                match d.process_utilization_stats(if since == 0 { None } else { Some(since) }) {
                    // No sample since the last one: not an error.
                    Err(NvmlError::NotFound) => Ok(Vec::new()),
                    other => other,
                }
            })?
            .unwrap_or_default();
        if let Some(newest) = utils.iter().map(|u| u.timestamp).max() {
            self.gpus[i].last_process_sample_us = newest;
        }
        // The mean of each process's samples in the interval: its share of the GPU's work.
        let mut sums: HashMap<u32, (u64, u64)> = HashMap::new();
        for u in &utils {
            let e = sums.entry(u.pid).or_default();
            e.0 += u64::from(u.sm_util);
            e.1 += 1;
        }
        let sm: HashMap<u32, u32> = sums
            .into_iter()
            .map(|(pid, (sum, n))| (pid, (sum / n.max(1)) as u32))
            .collect();
        for p in running.unwrap_or_default() {
            let Some(pid) = self.pids.host_pid(p.pid) else {
                continue;
            };
            procs.push(GpuProcess {
                pid,
                gpu,
                used_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                },
                sm_util: sm.get(&p.pid).copied(),
            });
        }
        Ok(s)
    }

    /// One NVML reading: `Ok(None)` when unsupported (now or before), `Err(Lost)` when the
    /// GPU has fallen off the bus.
    fn read<T>(
        &mut self,
        i: usize,
        call: Call,
        f: impl FnOnce() -> Result<T, NvmlError>,
    ) -> Result<Option<T>, Lost> {
        if self.gpus[i].unsupported.contains(&call) {
            return Ok(None);
        }
        match f() {
            Ok(v) => Ok(Some(v)),
            Err(NvmlError::GpuLost) => Err(Lost),
            Err(
                e @ (NvmlError::NotSupported
                | NvmlError::FailedToLoadSymbol(_)
                | NvmlError::FunctionNotFound
                | NvmlError::NoPermission),
            ) => {
                let gpu = &mut self.gpus[i];
                gpu.unsupported.insert(call);
                tracing::info!(gpu = gpu.index, call = call.name(), reason = %e, "NVML reading not available on this GPU or driver; not asked again");
                self.metrics
                    .nvml_unsupported
                    .get_or_create(&GpuCallLabels {
                        gpu: gpu.index,
                        call: call.name(),
                    })
                    .set(1);
                Ok(None)
            }
            Err(e) => {
                self.count_error(i, call.name(), &e);
                Ok(None)
            }
        }
    }

    fn count_error(&self, i: usize, call: &'static str, e: &NvmlError) {
        let gpu = self.gpus[i].index;
        let counter = self
            .metrics
            .nvml_errors
            .get_or_create(&GpuCallLabels { gpu, call });
        if counter.get() == 0 {
            tracing::warn!(gpu, call, error = %e, "NVML call failed (further failures are only counted)");
        }
        counter.inc();
    }

    /// Publishes one GPU's sample; returns its energy (J) and busy time (s) since the last.
    fn publish(&mut self, i: usize, s: &GpuSample) -> (Option<f64>, Option<f64>) {
        let m = &self.metrics;
        let gpu = &mut self.gpus[i];
        let l = &gpu.labels;
        // (energy, busy time) since the last sample.
        let mut used = (None, None);
        if let Some(u) = s.utilization {
            m.gpu_utilization.get_or_create(l).set(f64::from(u) / 100.0);
            // Created at 0 on a busy GPU too, so that idle cost is 0 there, not absent.
            let idle = m.gpu_idle_seconds.get_or_create(l);
            if let Some(last) = gpu.last_ts_ns {
                let secs = s.ts_ns.saturating_sub(last) as f64 / 1e9;
                if u == 0 {
                    idle.inc_by(secs);
                }
                used.1 = Some(f64::from(u.min(100)) / 100.0 * secs);
            }
        }
        gpu.last_ts_ns = Some(s.ts_ns);
        if let Some(u) = s.memory_utilization {
            m.gpu_memory_utilization
                .get_or_create(l)
                .set(f64::from(u) / 100.0);
        }
        for (family, v) in [
            (&m.gpu_memory_used, s.memory_used),
            (&m.gpu_memory_free, s.memory_free),
            (&m.gpu_memory_total, s.memory_total),
        ] {
            if let Some(v) = v {
                family.get_or_create(l).set(v as i64);
            }
        }
        if let Some(p) = s.power_mw {
            m.gpu_power.get_or_create(l).set(f64::from(p) / 1000.0);
        }
        if let Some(p) = s.power_limit_mw {
            m.gpu_power_limit
                .get_or_create(l)
                .set(f64::from(p) / 1000.0);
        }
        if let Some(e) = s.energy_mj {
            // A counter since driver load: the first reading counts whole, then the growth;
            // a smaller reading means the driver was reloaded.
            let delta = match gpu.last_energy_mj {
                Some(last) if e >= last => {
                    used.0 = Some((e - last) as f64 / 1000.0);
                    e - last
                }
                _ => e,
            };
            m.gpu_energy.get_or_create(l).inc_by(delta as f64 / 1000.0);
            gpu.last_energy_mj = Some(e);
        }
        if let Some(t) = s.temperature_c {
            m.gpu_temperature.get_or_create(l).set(i64::from(t));
        }
        if let Some(c) = s.sm_clock_mhz {
            m.gpu_sm_clock
                .get_or_create(l)
                .set(i64::from(c) * 1_000_000);
        }
        if let Some(c) = s.memory_clock_mhz {
            m.gpu_memory_clock
                .get_or_create(l)
                .set(i64::from(c) * 1_000_000);
        }
        if let Some(mask) = s.throttle {
            for (bit, reason) in throttle::REASONS {
                m.gpu_throttle_active
                    .get_or_create(&GpuReasonLabels {
                        gpu: l.clone(),
                        reason,
                    })
                    .set(i64::from(mask & bit != 0));
            }
        }
        for (direction, kbs) in [("tx", s.pcie_tx_kbs), ("rx", s.pcie_rx_kbs)] {
            if let Some(kbs) = kbs {
                // NVML reports KB/s (1024 bytes).
                m.gpu_pcie_throughput
                    .get_or_create(&GpuDirectionLabels {
                        gpu: l.clone(),
                        direction,
                    })
                    .set(i64::from(kbs) * 1024);
            }
        }
        for (k, (severity, v)) in [
            ("corrected", s.ecc_corrected),
            ("uncorrected", s.ecc_uncorrected),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(v) = v {
                let delta = match gpu.last_ecc[k] {
                    Some(last) if v >= last => v - last,
                    _ => v,
                };
                m.gpu_ecc_errors
                    .get_or_create(&GpuEccLabels {
                        gpu: l.clone(),
                        severity,
                    })
                    .inc_by(delta);
                gpu.last_ecc[k] = Some(v);
            }
        }
        used
    }

    /// A GPU that fell off the bus: report once, stop its series and its sampling.
    fn mark_lost(&mut self, i: usize) {
        let gpu = &mut self.gpus[i];
        gpu.lost = true;
        tracing::error!(
            gpu = gpu.index,
            uuid = gpu.labels.gpu_uuid,
            "GPU lost (NVML_ERROR_GPU_IS_LOST): its series stop; other GPUs continue"
        );
        let l = gpu.labels.clone();
        let m = &self.metrics;
        m.gpu_lost.get_or_create(&l).set(1);
        for family in [
            &m.gpu_utilization,
            &m.gpu_memory_utilization,
            &m.gpu_power,
            &m.gpu_power_limit,
        ] {
            family.remove(&l);
        }
        for family in [
            &m.gpu_memory_used,
            &m.gpu_memory_free,
            &m.gpu_memory_total,
            &m.gpu_temperature,
            &m.gpu_sm_clock,
            &m.gpu_memory_clock,
        ] {
            family.remove(&l);
        }
        m.gpu_energy.remove(&l);
        m.gpu_idle_seconds.remove(&l);
        for (_, reason) in throttle::REASONS {
            m.gpu_throttle_active.remove(&GpuReasonLabels {
                gpu: l.clone(),
                reason,
            });
        }
        for direction in ["tx", "rx"] {
            m.gpu_pcie_throughput.remove(&GpuDirectionLabels {
                gpu: l.clone(),
                direction,
            });
        }
        for severity in ["corrected", "uncorrected"] {
            m.gpu_ecc_errors.remove(&GpuEccLabels {
                gpu: l.clone(),
                severity,
            });
        }
        self.history.forget(l.gpu);
    }

    /// Samples every `interval` until `stop` is set, beating `heartbeat` after each sample.
    pub fn run(mut self, interval: Duration, stop: Arc<AtomicBool>, heartbeat: Heartbeat) {
        let mut next = Instant::now();
        while !stop.load(Ordering::Acquire) {
            self.sample();
            heartbeat.beat();
            next += interval;
            let now = Instant::now();
            if next < now {
                next = now;
            }
            // Sleep in short steps so that shutdown is prompt at long intervals.
            while !stop.load(Ordering::Acquire) && Instant::now() < next {
                std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
            }
        }
        heartbeat.done();
    }
}

struct Lost;

/// Marks the NVML source up or down.
pub fn set_source_up(metrics: &Metrics, up: bool) {
    metrics
        .source_up
        .get_or_create(&SourceLabels { source: "nvml" })
        .set(i64::from(up));
}

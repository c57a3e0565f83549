//! What NVML sampling costs: the agent's sampler in this process over the NVML double with
//! 8 simulated GPUs (CPU per GPU per sample, by thread CPU time), and the agent binary at a
//! 100 ms interval against the same binary with NVML off, side by side.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use cuda_workload::{nvml_double_path, NvmlControl};
use inferscope::{
    gpu::metrics::GpuMetrics,
    gpu::{history::GpuHistory, nvml},
    metrics::Metrics,
    proc::ProcFs,
};

use crate::agentproc::{metric_sum, thread_cpu_ns, AgentProcess};

pub const GPUS: u32 = 8;

pub struct NvmlCost {
    pub gpus: u32,
    pub samples: u64,
    /// Sampler thread CPU per GPU per sample, ns.
    pub cpu_per_gpu_sample_ns: f64,
    /// The agent at 100 ms: sampling rounds per second achieved.
    pub agent_rounds_per_s: f64,
    /// The agent's CPU share of one core at 100 ms, with NVML and without.
    pub agent_share_nvml: f64,
    pub agent_share_off: f64,
    pub seconds: f64,
}

/// Must run before anything else loads the NVML double: it reads its environment once.
pub fn measure(dir: &Path, samples: u64, seconds: f64) -> anyhow::Result<NvmlCost> {
    let control = NvmlControl::new(dir.join("nvml.control"));
    for gpu in 0..GPUS {
        control.set_gpu(gpu, "utilization", 40 + gpu)?;
        control.set_gpu(gpu, "throttle", "0x4")?;
    }
    let env = [
        (cuda_workload::ENV_GPU_COUNT, GPUS.to_string()),
        (cuda_workload::ENV_GPU_MEM, (80u64 << 30).to_string()),
        (
            cuda_workload::ENV_NVML_CONTROL,
            control.path().display().to_string(),
        ),
    ];
    for (k, v) in &env {
        // Read by the double in this process at nvmlInit; nothing else reads them.
        std::env::set_var(k, v);
    }
    let lib = nvml_double_path();
    let nvml = Arc::new(nvml::open(Some(&lib)).context("opening the NVML double")?);
    let metrics = GpuMetrics::new(&Arc::new(Metrics::new()));
    let history = Arc::new(GpuHistory::new(600));
    let mut sampler = nvml::Sampler::new(
        nvml,
        metrics,
        history,
        None,
        ProcFs::default(),
        &Default::default(),
    )
    .context("NVML sampler")?;
    for _ in 0..5 {
        sampler.sample();
    }
    let start = thread_cpu_ns();
    for _ in 0..samples {
        sampler.sample();
    }
    let cpu = thread_cpu_ns() - start;
    drop(sampler);

    let agent_env = |enabled: &str| -> Vec<(String, String)> {
        let mut e: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        e.push(("INFERSCOPE_NVML__ENABLED".into(), enabled.into()));
        e.push(("INFERSCOPE_NVML__LIB".into(), lib.display().to_string()));
        e.push(("INFERSCOPE_NVML__INTERVAL_MS".into(), "100".into()));
        e
    };
    let run = |enabled: &str| -> anyhow::Result<(f64, f64)> {
        let env = agent_env(enabled);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let agent = AgentProcess::start(&cuda_workload::Variant::Nop5.lib_path(), &env)?;
        std::thread::sleep(Duration::from_millis(300));
        let (cpu0, rounds0) = (
            agent.cpu_ns()?,
            metric_sum(&agent.metrics()?, "inferscope_nvml_samples_total"),
        );
        let t0 = std::time::Instant::now();
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let (cpu1, rounds1) = (
            agent.cpu_ns()?,
            metric_sum(&agent.metrics()?, "inferscope_nvml_samples_total"),
        );
        let wall = t0.elapsed().as_secs_f64();
        agent.stop()?;
        Ok((
            (cpu1 - cpu0) as f64 / 1e9 / wall,
            (rounds1 - rounds0) / wall,
        ))
    };
    let (share_nvml, rounds) = run("true")?;
    let (share_off, _) = run("false")?;
    Ok(NvmlCost {
        gpus: GPUS,
        samples,
        cpu_per_gpu_sample_ns: cpu as f64 / (samples * u64::from(GPUS)) as f64,
        agent_rounds_per_s: rounds,
        agent_share_nvml: share_nvml,
        agent_share_off: share_off,
        seconds,
    })
}

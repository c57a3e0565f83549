//! Simulated GPUs: the NVML double (`libnvidia-ml.so.1`, steered through its control file) and
//! the CUDA double (`libcuda.so.1`) share a state file, so NVML shows the memory the CUDA
//! double's processes hold. One [`SimGpus`] is one machine's worth of them.

use std::path::{Path, PathBuf};

use cuda_workload::{nvml_double_path, NvmlControl, ENV_NVML_CONTROL};

use crate::{Agent, Variant, Workload, WorkloadOptions};

/// `count` simulated GPUs of `mem` bytes each; their files live in a directory of their own,
/// removed on drop.
pub struct SimGpus {
    pub control: NvmlControl,
    /// The device-memory state shared by the CUDA double's processes and the NVML double.
    pub state: PathBuf,
    pub count: u32,
    pub mem: u64,
    _dir: tempfile::TempDir,
}

impl SimGpus {
    pub fn new(count: u32, mem: u64) -> SimGpus {
        let dir = tempfile::tempdir().unwrap();
        SimGpus {
            control: NvmlControl::new(dir.path().join("nvml.control")),
            state: dir.path().join("gpu.state"),
            count,
            mem,
            _dir: dir,
        }
    }

    /// The environment a process loading the CUDA double needs to see these GPUs.
    pub fn cuda_env(&self) -> Vec<(String, String)> {
        vec![
            (cuda_workload::ENV_GPU_COUNT.into(), self.count.to_string()),
            (cuda_workload::ENV_GPU_MEM.into(), self.mem.to_string()),
            (
                cuda_workload::ENV_GPU_STATE.into(),
                self.state.display().to_string(),
            ),
        ]
    }

    /// The agent's environment: [`SimGpus::cuda_env`], the NVML control file, and NVML sampled
    /// every 100 ms so that a change to the control file shows within a test's patience.
    pub fn agent_env(&self) -> Vec<(String, String)> {
        let mut env = self.cuda_env();
        env.extend([
            (
                ENV_NVML_CONTROL.into(),
                self.control.path().display().to_string(),
            ),
            ("INFERSCOPE_NVML__INTERVAL_MS".into(), "100".into()),
        ]);
        env
    }

    /// The agent on the NVML double at `nvml_lib`; `env` comes after [`SimGpus::agent_env`],
    /// so it can override it.
    pub fn agent_on(&self, nvml_lib: &Path, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let lib = nvml_lib.display().to_string();
        let mut all_args = vec!["--nvml-lib", lib.as_str()];
        all_args.extend(args);
        let own = self.agent_env();
        let mut all_env = str_pairs(&own);
        all_env.extend(env);
        Agent::start_with_env(&all_args, &all_env)
    }

    /// The agent on the NVML double.
    pub fn agent(&self, args: &[&str], env: &[(&str, &str)]) -> Agent {
        self.agent_on(&nvml_double_path(), args, env)
    }

    /// A workload on the CUDA double (push variant) using these GPUs.
    pub fn workload(&self, plan: &str) -> Workload {
        self.workload_with(plan, &[], &[])
    }

    /// A workload with `args` on its command line (ignored by it) and `env`.
    pub fn workload_with(&self, plan: &str, args: &[&str], env: &[(&str, &str)]) -> Workload {
        let opts = WorkloadOptions {
            variant: Variant::Push,
            gpus: self.count,
            gpu_mem: self.mem,
            state_file: Some(&self.state),
        };
        Workload::start_with(plan, &opts, &opts.variant.dir(), args, env)
    }
}

/// Borrowed pairs of an owned environment, as the start functions take them.
pub fn str_pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

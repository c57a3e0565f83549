//! Test fixtures for inferscope: a CUDA driver test double (`libcuda.so.1`, built from
//! `tests/cuda-double/libcuda.c` by this crate's build script) and the `cuda-workload`
//! binary, which drives that double through `cudarc` following a plan and prints its
//! own ground truth of every memory-API call it made.
//!
//! This library exposes where the double variants live and the truth types, so that
//! tests can start the workload and parse its JSON-lines output.
//!
//! It also exposes the NVML double (`libnvidia-ml.so.1`, built from
//! `tests/nvml-double/libnvml.c`): [`nvml_double_path`], [`nvml_old_double_path`] and
//! [`NvmlControl`], the writer of its control file.

mod nvml_control;

pub use nvml_control::{
    nvml_double_dir, nvml_double_path, nvml_old_double_dir, nvml_old_double_path, NvmlControl,
    DEFAULT_NVML_CTX_OVERHEAD, ENV_NVML_CONTROL, ENV_NVML_CTX_OVERHEAD, ENV_NVML_FAIL_INIT,
    NVML_UNSUPPORTED_GROUPS,
};

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Number of simulated devices (default 1, at most 64).
pub const ENV_GPU_COUNT: &str = "FAKEGPU_COUNT";
/// Bytes of memory per simulated device (default 1073741824).
pub const ENV_GPU_MEM: &str = "FAKEGPU_MEM";
/// Path of the shared device-memory state file (see the top of `libcuda.c`).
pub const ENV_GPU_STATE: &str = "FAKEGPU_STATE";
/// `FIRST:COUNT`: the first COUNT `cuMemAlloc_v2` calls return FIRST, FIRST+1, ... (codes
/// no driver defines; call them with the workload's `rawalloc` step).
pub const ENV_ALLOC_RESULTS: &str = "FAKEGPU_ALLOC_RESULTS";

/// Name of the workload binary (`target/<profile>/cuda-workload`).
pub const WORKLOAD_BIN_NAME: &str = "cuda-workload";

/// Build variant of the libcuda double.  All variants export the same symbols (except
/// [`Variant::NoVmm`]) and differ in the first instruction of every exported function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Variant {
    /// 5-byte nop (`nopl 0x0(%rax,%rax,1)`, bytes `0f 1f 44 00 00`) first.
    Nop5,
    /// `push %rbp` first.
    Push,
    /// `endbr64` first (CET / IBT).
    Endbr,
    /// Like `Push`, but without the VMM symbols (cuMemCreate, cuMemRelease, cuMemMap,
    /// cuMemUnmap, cuMemAddressReserve, cuMemAddressFree) and cuMemAllocFromPoolAsync.
    NoVmm,
}

impl Variant {
    /// All variants.
    pub const ALL: [Variant; 4] = [Variant::Nop5, Variant::Push, Variant::Endbr, Variant::NoVmm];

    /// Directory name of the variant (`nop5`, `push`, `endbr`, `novmm`).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Nop5 => "nop5",
            Variant::Push => "push",
            Variant::Endbr => "endbr",
            Variant::NoVmm => "novmm",
        }
    }

    /// Parses a variant name as returned by [`Variant::name`].
    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == name)
    }

    /// Whether this variant exports the VMM symbols and cuMemAllocFromPoolAsync.
    pub fn has_vmm(self) -> bool {
        self != Variant::NoVmm
    }

    /// See [`double_dir`].
    pub fn dir(self) -> PathBuf {
        double_dir(self)
    }

    /// Path of the `libcuda.so.1` of this variant.
    pub fn lib_path(self) -> PathBuf {
        double_dir(self).join("libcuda.so.1")
    }
}

/// Directory holding `libcuda.so.1` (and a `libcuda.so` symlink) of the given variant.
/// Put it on `LD_LIBRARY_PATH` of the process that should load the double.
pub fn double_dir(v: Variant) -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join(v.name())
}

/// Memory-API symbols the workload can call (alloc and free side).
pub const MEMORY_APIS: &[&str] = &[
    "cuMemAlloc_v2",
    "cuMemAllocPitch_v2",
    "cuMemAllocManaged",
    "cuMemAllocAsync",
    "cuMemAllocFromPoolAsync",
    "cuMemFree_v2",
    "cuMemFreeAsync",
    "cuMemAddressReserve",
    "cuMemCreate",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemRelease",
    "cuMemAddressFree",
    "cuMemAllocHost_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
];

/// Statistics of one memory-API symbol, as seen by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiStats {
    /// Number of calls.
    pub calls: u64,
    /// Number of calls that returned CUDA_SUCCESS.
    pub ok: u64,
    /// Sum of sizes of successful calls (pitch: pitch*height; cuMemMap and
    /// cuMemAddressReserve: the size argument; frees: the size freed, 0 when unknown).
    pub bytes: u64,
    /// Failed calls by error name: the `CUresult` name without the `CUDA_ERROR_`
    /// prefix, lowercased (`out_of_memory`, `invalid_value`, ...).
    #[serde(default)]
    pub failures: BTreeMap<String, u64>,
}

impl ApiStats {
    /// Total number of failed calls.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// The workload's own ground truth.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truth {
    pub pid: u32,
    /// Per memory-API symbol the workload called.
    pub apis: BTreeMap<String, ApiStats>,
    /// Bytes currently held per device ordinal by cuMemAlloc_v2 / cuMemAllocPitch_v2 /
    /// cuMemAllocManaged / cuMemAllocAsync / cuMemAllocFromPoolAsync / cuMemCreate
    /// allocations (not address reservations).  Has an entry for every device the
    /// workload initialised.  JSON keys are the ordinals as strings.
    pub live_device_bytes: BTreeMap<u32, u64>,
    /// Bytes currently held in pinned host allocations.
    pub live_host_bytes: u64,
}

impl Truth {
    /// Stats of one API (default/empty if never called).
    pub fn api(&self, name: &str) -> ApiStats {
        self.apis.get(name).cloned().unwrap_or_default()
    }
}

/// One JSON line of the workload's stdout.  (Deserialize is implemented by hand:
/// serde's untagged enums cannot read the integer map keys of [`Truth`].)
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum OutputLine {
    /// `{"ready":true,"pid":PID}`, printed before the first step.
    Ready { ready: bool, pid: u32 },
    /// `{"checkpoint":"X","truth":{...}}`.
    Checkpoint { checkpoint: String, truth: Truth },
    /// `{"final":true,"truth":{...}}`, printed after the last step.
    Final {
        #[serde(rename = "final")]
        is_final: bool,
        truth: Truth,
    },
    /// `{"skipped":"<step>","reason":"..."}`: a step that could not run, e.g. a
    /// `vmm`/`pool` step against a double without the VMM symbols.  Not in the truth.
    Skipped { skipped: String, reason: String },
}

impl<'de> Deserialize<'de> for OutputLine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        fn get<T: serde::de::DeserializeOwned, E: Error>(
            v: &serde_json::Value,
            k: &str,
        ) -> Result<T, E> {
            let x = v
                .get(k)
                .ok_or_else(|| E::custom(format!("missing field `{k}`")))?;
            T::deserialize(x).map_err(E::custom)
        }
        let v = serde_json::Value::deserialize(d)?;
        if v.get("ready").is_some() {
            Ok(OutputLine::Ready {
                ready: get(&v, "ready")?,
                pid: get(&v, "pid")?,
            })
        } else if v.get("checkpoint").is_some() {
            Ok(OutputLine::Checkpoint {
                checkpoint: get(&v, "checkpoint")?,
                truth: get(&v, "truth")?,
            })
        } else if v.get("final").is_some() {
            Ok(OutputLine::Final {
                is_final: get(&v, "final")?,
                truth: get(&v, "truth")?,
            })
        } else if v.get("skipped").is_some() {
            Ok(OutputLine::Skipped {
                skipped: get(&v, "skipped")?,
                reason: get(&v, "reason")?,
            })
        } else {
            Err(D::Error::custom(format!(
                "unknown workload output line: {v}"
            )))
        }
    }
}

impl OutputLine {
    /// Parses one stdout line.
    pub fn parse(line: &str) -> Result<OutputLine, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// The truth carried by a checkpoint or final line.
    pub fn truth(&self) -> Option<&Truth> {
        match self {
            OutputLine::Checkpoint { truth, .. } | OutputLine::Final { truth, .. } => Some(truth),
            _ => None,
        }
    }
}

/// Maps a CUresult name such as `CUDA_ERROR_OUT_OF_MEMORY` to the truth's error name
/// (`out_of_memory`).
pub fn error_name(cuda_name: &str) -> String {
    cuda_name
        .strip_prefix("CUDA_ERROR_")
        .unwrap_or(cuda_name)
        .to_ascii_lowercase()
}

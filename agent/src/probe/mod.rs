//! Loading the embedded eBPF object and attaching its programs.
//!
//! `cuda` attaches the CUDA driver uprobes per library file, `discover` finds those files,
//! `elf` reads their symbols, `budget` sheds probes that cost too much (`http_budget` the
//! `http` family), `sched` attaches the process-exit tracepoint. `floor` attaches the benchmark's reference programs (never used
//! by the agent itself).

pub mod btf;
pub mod budget;
pub mod census;
mod config;
pub mod cuda;
pub mod discover;
pub mod discovery_hooks;
pub mod elf;
pub mod floor;
pub mod http;
pub mod http_budget;
pub mod links;
pub mod manager;
pub mod metrics;
pub mod oom;
pub mod prologue;
pub mod sched;
pub mod tls;
pub mod tracefs;

pub use config::ProbesConfig;

use agent_common::{config as ebpf_config, cuda::APIS};
use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf, StackTraceMap},
    Ebpf, EbpfLoader,
};

/// The eBPF object built by `build.rs`, aligned for the ELF parser.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inferscope.bpf.o"));

pub const FAMILIES: &[&str] = &["cuda", "sched", "oom", "http", "discovery"];

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("eBPF map {name} is missing or of the wrong type")]
    Map {
        name: &'static str,
        #[source]
        source: Option<aya::maps::MapError>,
    },
    #[error("cannot load eBPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach eBPF program {name}")]
    Attach {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// Whether `name` is something `probes.disabled` can name.
pub fn is_known_probe(name: &str) -> bool {
    let name = name.strip_prefix("cuda:").unwrap_or(name);
    FAMILIES.contains(&name) || APIS.iter().any(|(_, sym, _)| *sym == name)
}

/// The loaded object with the maps each pipeline stage takes out of it.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// Records of the `cuda`, `sched` and `oom` families.
    pub events: RingBuf<MapData>,
    /// Records of the `http` family, in a ring of their own.
    pub http_events: RingBuf<MapData>,
    pub lost: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, u64>,
    pub hits: PerCpuArray<MapData, u64>,
    /// User stacks of CUDA calls, read by forensics.
    pub stacks: Option<StackTraceMap<MapData>>,
    /// Processes the CUDA return probe stops at their next out-of-memory failure
    /// (`forensics/python.rs`).
    pub freeze: Option<aya::maps::HashMap<MapData, u32, u32>>,
}

/// What the programs need to know of the running kernel, set in the object before it loads.
#[derive(Clone, Debug)]
pub struct KernelLayout {
    /// `group_dead` in `sched_process_exit`'s record (0: unknown).
    pub group_dead: u32,
    /// `task_struct.exit_code` (0: unknown).
    pub exit_code: u32,
    /// Whether the loader probe stops a process that loads a driver until the agent has
    /// attached.
    pub hold_openers: bool,
    /// From a task to its open files, for the `http` family's `close`.
    pub fd: agent_common::http::FdLayout,
}

impl KernelLayout {
    pub fn read(hold_openers: bool) -> Self {
        Self {
            group_dead: sched::group_dead_offset(),
            exit_code: sched::exit_code_offset(),
            hold_openers,
            fd: http::fd_layout(),
        }
    }
}

pub fn load(ring_buffer_bytes: u32, layout: &KernelLayout) -> Result<Loaded, ProbeError> {
    let hold = u32::from(layout.hold_openers);
    let own = std::process::id();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("EVENTS", ring_buffer_bytes)
        .map_max_entries("HTTP_EVENTS", ring_buffer_bytes)
        .override_global("GROUP_DEAD_OFFSET", &layout.group_dead, true)
        .override_global("TASK_EXIT_CODE_OFFSET", &layout.exit_code, true)
        .override_global("HOLD_OPENERS", &hold, true)
        .override_global("FD_LAYOUT", &layout.fd, true)
        .override_global("OWN_TGID", &own, true)
        .load(EBPF_OBJECT)
        .map_err(ProbeError::Load)?;
    let events = take(&mut ebpf, "EVENTS")?;
    let http_events = take(&mut ebpf, "HTTP_EVENTS")?;
    let lost = take(&mut ebpf, "EVENTS_LOST")?;
    let config = take(&mut ebpf, "CONFIG")?;
    let hits = take(&mut ebpf, "CUDA_HITS")?;
    let stacks = take(&mut ebpf, "CUDA_STACKS").ok();
    let freeze = take(&mut ebpf, "CUDA_FREEZE").ok();
    // Borrowed, not taken: the programs loaded later refer to the object's own descriptor.
    match ebpf.map("STOPPED") {
        Some(aya::maps::Map::HashMap(stopped)) => crate::held::track(stopped, &config),
        _ => tracing::warn!(
            "no STOPPED map: an agent leaving mid-attach may leave a process it held stopped"
        ),
    }
    Ok(Loaded {
        ebpf,
        events,
        http_events,
        lost,
        config,
        hits,
        stacks,
        freeze,
    })
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(ProbeError::Map { name, source: None })?;
    T::try_from(map).map_err(|e| ProbeError::Map {
        name,
        source: Some(e),
    })
}

/// Writes a run-time knob (`agent_common::config`).
pub fn set_config(map: &mut Array<MapData, u64>, index: u32, value: u64) {
    if let Err(e) = map.set(index, value, 0) {
        tracing::warn!(index, value, error = %e, "cannot update eBPF config");
    }
}

/// Initial run-time knobs.
pub fn init_config(map: &mut Array<MapData, u64>, probes: &ProbesConfig) {
    let ring_bytes = probes.ring_buffer_bytes;
    set_config(
        map,
        ebpf_config::STACK_THRESHOLD_BYTES,
        probes.stack_threshold_bytes,
    );
    set_config(
        map,
        ebpf_config::STACK_SAMPLE_BYTES,
        probes.stack_sample_bytes,
    );
    // Wake the reader early once a quarter of the ring is unread, long before it fills.
    set_config(map, ebpf_config::WAKEUP_BYTES, u64::from(ring_bytes / 4));
    set_config(
        map,
        ebpf_config::HTTP_WAKEUP_BYTES,
        u64::from(ring_bytes / 4),
    );
}

/// A second handle on the `CONFIG` map (a duplicate of its descriptor), for a ring reader to
/// move its wakeup mark (`ingest::WakeMark`); `None` when the descriptor cannot be duplicated.
pub fn config_handle(map: &Array<MapData, u64>) -> Option<Array<MapData, u64>> {
    use aya::maps::IterableMap;
    use std::os::fd::AsFd;
    let fd = map.map().fd().as_fd().try_clone_to_owned().ok()?;
    let data = MapData::from_fd(fd).ok()?;
    Array::try_from(aya::maps::Map::Array(data)).ok()
}

/// Sums a per-CPU counter slot.
/// The object's program `name`, as the kind it is loaded as.
pub(crate) fn program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, ProbeError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProbeError::MissingProgram { name })?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })
}

pub fn per_cpu_sum(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0)
        .map(|values| values.iter().sum())
        .unwrap_or(0)
}

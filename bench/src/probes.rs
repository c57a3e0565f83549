//! The probe setups the bench attaches inside its own process: the floor programs with a
//! consumer that only counts records, and the agent's `cuda` family with the agent's real
//! ingest → tracker pipeline. Each setup loads its own copy of the embedded object and
//! detaches everything when finished (the object is dropped: programs, maps and links close).

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use agent_common::{
    cuda::{stacks, stacks_index, CudaApi},
    lost,
};
use anyhow::{bail, Context};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    Ebpf,
};
use inferscope::{
    config::Config,
    gpu::history::GpuHistory,
    ingest::{self, Event},
    metrics::{Metrics, SourceLabels},
    probe::{self, cuda::CudaProbes, discover, elf, floor::FloorProbes, ProbesConfig},
    proc::ProcFs,
    track::{self, metrics::TrackMetrics, Input, Tracker},
};
use tokio::{runtime::Runtime, sync::watch};

/// What a setup delivered while it was attached.
#[derive(Clone, Copy, Debug, Default)]
pub struct Delivered {
    /// Records read by the consumer (floor) or events applied by the tracker (agent).
    pub events: u64,
    /// Reserve failures counted by the probes (`EVENTS_LOST`: cuda + stash slots).
    pub lost: u64,
    /// User stacks walked for successful allocations (sampled or over the threshold).
    pub stack_walks: u64,
}

/// The embedded object, loaded with the agent's default ring buffer and knobs.
fn load_object() -> anyhow::Result<probe::Loaded> {
    load_object_with(&Config::default().probes)
}

/// The embedded object, loaded with the ring buffer and knobs of `probes`.
fn load_object_with(probes: &ProbesConfig) -> anyhow::Result<probe::Loaded> {
    // The bench attaches no discovery hook: nothing to hold.
    let mut loaded = probe::load(probes.ring_buffer_bytes, &probe::KernelLayout::read(false))
        .context("loading the eBPF object (root and BTF needed)")?;
    probe::init_config(&mut loaded.config, probes);
    Ok(loaded)
}

fn lost_of(map: &PerCpuArray<MapData, u64>) -> u64 {
    probe::per_cpu_sum(map, lost::CUDA) + probe::per_cpu_sum(map, lost::STASH)
}

/// A thread that drains the ring buffer every millisecond and counts records: the least a
/// consumer can do.
struct Counter {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<u64>,
}

impl Counter {
    fn spawn(mut ring: RingBuf<MapData>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            loop {
                let stopping = flag.load(Ordering::Acquire);
                while ring.next().is_some() {
                    n += 1;
                }
                if stopping {
                    return n;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Self { stop, handle }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or(0)
    }
}

/// Floor programs on `cuMemAlloc_v2` and `cuMemFree_v2` of one library, with a counting
/// consumer.
pub struct FloorRun {
    ebpf: Ebpf,
    floor: FloorProbes,
    lost: PerCpuArray<MapData, u64>,
    counter: Counter,
}

impl FloorRun {
    pub fn start(lib: &Path) -> anyhow::Result<Self> {
        let loaded = load_object()?;
        let mut ebpf = loaded.ebpf;
        let mut floor = FloorProbes::load(&mut ebpf)?;
        // Each probe where the agent puts its own (past a flags-only first instruction).
        let file =
            std::fs::File::open(lib).with_context(|| format!("opening {}", lib.display()))?;
        let size = file.metadata()?.len();
        let apis = [CudaApi::MemAlloc, CudaApi::MemFree];
        let symbols = elf::read_symbols(
            &file,
            size,
            &lib.display().to_string(),
            &apis.map(|a| a.symbol()),
        )?;
        for api in apis {
            let found = symbols
                .found
                .get(api.symbol())
                .with_context(|| format!("{} not in {}", api.symbol(), lib.display()))?;
            floor
                .attach(&mut ebpf, lib, found.offset)
                .with_context(|| format!("attaching the floor to {}", api.symbol()))?;
        }
        Ok(Self {
            ebpf,
            floor,
            lost: loaded.lost,
            counter: Counter::spawn(loaded.events),
        })
    }

    pub fn finish(mut self) -> Delivered {
        self.floor.detach_all(&mut self.ebpf);
        let events = self.counter.finish();
        let lost = lost_of(&self.lost);
        drop(self.ebpf);
        Delivered {
            events,
            lost,
            stack_walks: 0,
        }
    }
}

/// The agent's ingest and tracker stages on the bench's runtime, wired as `agent::run` wires
/// them. With `timed`, a copy of `track::run`'s loop (without the exit sweep) also records,
/// for every CUDA event, CLOCK_MONOTONIC right after the tracker applied it minus the event's
/// `bpf_ktime_get_ns` stamp.
struct Pipeline {
    stop: watch::Sender<bool>,
    ingest: tokio::task::JoinHandle<std::io::Result<()>>,
    tracker: tokio::task::JoinHandle<(Tracker, Vec<u64>)>,
    metrics: Arc<Metrics>,
}

impl Pipeline {
    fn start(rt: &Runtime, ring: RingBuf<MapData>, timed: bool) -> Self {
        let config = Config::default();
        let metrics = Arc::new(Metrics::new());
        let (stop, stop_rx) = watch::channel(false);
        let (tx, rx) = inferscope::queue::channel(track::QUEUE_BYTES, Default::default());
        let ingest = rt.spawn(ingest::run(
            ring,
            Duration::from_millis(config.probes.poll_interval_ms),
            tx,
            None::<inferscope::queue::Sender<inferscope::http::tracker::Input>>,
            metrics.clone(),
            stop_rx,
            inferscope::health::Heartbeat::default(),
            // Busy throughout: a reader asleep after a quiet spell would change nothing here.
            None,
            None,
        ));
        let history = Arc::new(GpuHistory::new(config.nvml.history_secs));
        let tracker = Tracker::new(
            TrackMetrics::new(&metrics),
            ProcFs::default(),
            &config.limits,
            history,
        );
        let tracker = if timed {
            rt.spawn(timed_track(tracker, rx))
        } else {
            rt.spawn(async move {
                let beat = inferscope::health::Heartbeat::default();
                (track::run(tracker, rx, beat).await, Vec::new())
            })
        };
        Self {
            stop,
            ingest,
            tracker,
            metrics,
        }
    }

    /// Stops the reader (it drains what is left), lets the tracker drain, returns the events
    /// the tracker applied and the latencies (timed only).
    fn finish(self, rt: &Runtime) -> (u64, Vec<u64>) {
        let _ = self.stop.send(true);
        let _ = rt.block_on(self.ingest);
        let lat = rt
            .block_on(self.tracker)
            .map(|(_, l)| l)
            .unwrap_or_default();
        let events = self
            .metrics
            .events
            .get_or_create(&SourceLabels { source: "cuda" })
            .get();
        (events, lat)
    }
}

async fn timed_track(
    mut tracker: Tracker,
    mut rx: inferscope::queue::Receiver<Input>,
) -> (Tracker, Vec<u64>) {
    let mut lat = Vec::new();
    while let Some(input) = rx.recv().await {
        let Input::Events(batch) = input else {
            continue;
        };
        for ev in &batch {
            tracker.handle(ev);
            if let Event::CudaMem(e) = ev {
                lat.push(monotonic_ns().saturating_sub(e.header.ts_ns));
            }
        }
    }
    (tracker, lat)
}

pub use inferscope::clock::monotonic_ns;

/// The agent's `cuda` family on every symbol of one library, with the agent's pipeline.
pub struct AgentRun {
    ebpf: Ebpf,
    cuda: CudaProbes,
    lost: PerCpuArray<MapData, u64>,
    hits: PerCpuArray<MapData, u64>,
    pipeline: Pipeline,
}

impl AgentRun {
    pub fn start(rt: &Runtime, lib: &Path, timed: bool) -> anyhow::Result<Self> {
        Self::start_with(rt, lib, timed, &Config::default().probes)
    }

    /// The same with the knobs of `probes` (stack sampling).
    pub fn start_with(
        rt: &Runtime,
        lib: &Path,
        timed: bool,
        probes: &ProbesConfig,
    ) -> anyhow::Result<Self> {
        let loaded = load_object_with(probes)?;
        let mut ebpf = loaded.ebpf;
        let mut cuda = CudaProbes::load(&mut ebpf, &Config::default().probes.disabled)?;
        let library = discover::library_at(lib, lib.display().to_string())
            .map_err(|e| anyhow::anyhow!(inferscope::error_chain(&e)))?;
        let report = cuda.attach_library(&mut ebpf, &library);
        for api in [CudaApi::MemAlloc, CudaApi::MemFree] {
            if !report.attached.contains(&api) {
                bail!(
                    "{} not attached on {}: {:?}",
                    api.symbol(),
                    lib.display(),
                    report.failed
                );
            }
        }
        Ok(Self {
            ebpf,
            cuda,
            lost: loaded.lost,
            hits: loaded.hits,
            pipeline: Pipeline::start(rt, loaded.events, timed),
        })
    }

    /// Detaches, drains the pipeline; returns what it delivered and (timed) the latencies.
    pub fn finish(mut self, rt: &Runtime) -> (Delivered, Vec<u64>) {
        self.cuda.take_links().release();
        let (events, lat) = self.pipeline.finish(rt);
        let lost = lost_of(&self.lost);
        let stack_walks = [stacks::SAMPLED, stacks::THRESHOLD]
            .into_iter()
            .map(|why| probe::per_cpu_sum(&self.hits, stacks_index(why)))
            .sum();
        drop(self.ebpf);
        (
            Delivered {
                events,
                lost,
                stack_walks,
            },
            lat,
        )
    }
}

//! XID critical errors from NVML's event API: a counter per (GPU, XID) so a repeat of the same
//! XID is visible, and one log record per event. A failure of the event API (a GPU that falls
//! off the bus, a driver being reset) does not end the watch: it is logged once per kind, and
//! the event set is built again after a pause that doubles up to a minute.

use std::{
    collections::HashSet,
    mem::Discriminant,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use nvml_wrapper::{bitmasks::event::EventTypes, error::NvmlError, EventSet, Nvml};

use super::metrics::{GpuLabels, GpuMetrics, GpuXidLabels};
use crate::{
    events::{Notice, XidError},
    health::Heartbeat,
};

const WAIT_MS: u32 = 200;
/// The first pause before building the event set again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Where the XID events go.
struct Sinks {
    gpus: Vec<GpuLabels>,
    metrics: Arc<GpuMetrics>,
    reports: Option<super::ReportSink>,
    logs: Option<crate::queue::Sender<crate::events::Notice>>,
}

/// Errors already logged, by what failed and how: each kind is logged once.
#[derive(Default)]
struct Said(HashSet<(&'static str, Option<u32>, Discriminant<NvmlError>)>);

impl Said {
    fn warn(&mut self, what: &'static str, gpu: Option<u32>, e: &NvmlError) {
        if self.0.insert((what, gpu, std::mem::discriminant(e))) {
            tracing::warn!(what, gpu, error = %e, "XID watch: NVML call failed; retrying (further failures of this kind are not logged)");
        } else {
            tracing::debug!(what, gpu, error = %e, "XID watch: NVML call failed");
        }
    }
}

/// How one event set ended.
enum Ended {
    Stopped,
    /// No GPU offers XID events: nothing to watch, ever.
    Nothing,
    /// An NVML call failed (already logged); try again later.
    Failed,
}

/// Waits for XID events until `stop` is set. `gpus` are the labels of the GPUs to watch.
/// Beats `heartbeat` at every wait (200 ms) and while it pauses after an error.
pub fn run(
    nvml: Arc<Nvml>,
    gpus: Vec<GpuLabels>,
    metrics: Arc<GpuMetrics>,
    stop: Arc<AtomicBool>,
    reports: Option<super::ReportSink>,
    logs: Option<crate::queue::Sender<crate::events::Notice>>,
    heartbeat: Heartbeat,
) {
    let sinks = Sinks {
        gpus,
        metrics,
        reports,
        logs,
    };
    let mut said = Said::default();
    let mut unsupported = HashSet::new();
    let mut backoff = RETRY_FIRST;
    let mut failing = false;
    loop {
        heartbeat.beat();
        let started = Instant::now();
        let ended = watch(
            &nvml,
            &sinks,
            &stop,
            &heartbeat,
            &mut said,
            &mut unsupported,
            &mut failing,
        );
        match ended {
            Ended::Stopped => break,
            Ended::Nothing => {
                tracing::info!("no GPU offers XID events: XID errors not watched");
                break;
            }
            Ended::Failed => {
                failing = true;
                // A set that worked for a while starts the pauses over.
                if started.elapsed() > RETRY_MAX {
                    backoff = RETRY_FIRST;
                }
                if !pause(backoff, &stop, &heartbeat) {
                    break;
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
    heartbeat.done();
}

/// Sleeps `d` in short steps, beating; false when told to stop meanwhile.
fn pause(d: Duration, stop: &AtomicBool, heartbeat: &Heartbeat) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        heartbeat.beat();
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(u64::from(WAIT_MS))));
    }
    !stop.load(Ordering::Acquire)
}

/// Builds an event set of the GPUs that offer XID events and waits on it until told to stop
/// or a call fails.
fn watch(
    nvml: &Nvml,
    sinks: &Sinks,
    stop: &AtomicBool,
    heartbeat: &Heartbeat,
    said: &mut Said,
    unsupported: &mut HashSet<u32>,
    failing: &mut bool,
) -> Ended {
    let mut set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(NvmlError::NotSupported) => return Ended::Nothing,
        Err(e) => {
            said.warn("create_event_set", None, &e);
            return Ended::Failed;
        }
    };
    let mut watched = Vec::new();
    // A GPU that failed (rather than one that does not offer XID events): the set is built
    // again later, when there is nothing else to watch.
    let mut failed = false;
    for labels in &sinks.gpus {
        let gpu = labels.gpu;
        if unsupported.contains(&gpu) {
            continue;
        }
        let device = match nvml.device_by_index(gpu) {
            Ok(d) => d,
            Err(e) => {
                said.warn("device_by_index", Some(gpu), &e);
                failed = true;
                continue;
            }
        };
        let supported = match device.supported_event_types() {
            Ok(t) => t.contains(EventTypes::CRITICAL_XID_ERROR),
            Err(NvmlError::NotSupported) => false,
            Err(e) => {
                said.warn("supported_event_types", Some(gpu), &e);
                failed = true;
                continue;
            }
        };
        if !supported {
            tracing::info!(gpu, "XID events not supported on this GPU");
            unsupported.insert(gpu);
            continue;
        }
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                watched.push(gpu);
                s
            }
            Err(e) => {
                // Registering consumed the set; start a new one with the GPUs that worked.
                said.warn("register_events", Some(gpu), &e.error);
                failed = true;
                match rebuild(nvml, &watched) {
                    Ok(s) => s,
                    Err(e) => {
                        said.warn("register_events", None, &e);
                        return Ended::Failed;
                    }
                }
            }
        };
    }
    if watched.is_empty() {
        return if failed {
            Ended::Failed
        } else {
            Ended::Nothing
        };
    }
    if std::mem::take(failing) {
        tracing::info!(gpus = ?watched, "XID watch resumed");
    }
    wait(set, sinks, stop, heartbeat, said)
}

fn wait(
    set: EventSet<'_>,
    sinks: &Sinks,
    stop: &AtomicBool,
    heartbeat: &Heartbeat,
    said: &mut Said,
) -> Ended {
    let Sinks {
        gpus,
        metrics,
        reports,
        logs,
    } = sinks;
    while !stop.load(Ordering::Acquire) {
        heartbeat.beat();
        match set.wait(WAIT_MS) {
            Ok(event) => {
                let xid = match event.event_data {
                    Some(nvml_wrapper::enums::event::XidError::Value(v)) => v,
                    // An XID the driver could not name still counts, under code 0.
                    Some(nvml_wrapper::enums::event::XidError::Unknown) => 0,
                    None => continue,
                };
                let index = event.device.index().ok();
                let Some(labels) = gpus.iter().find(|l| Some(l.gpu) == index) else {
                    continue;
                };
                metrics
                    .gpu_xid_errors
                    .get_or_create(&GpuXidLabels {
                        gpu: labels.clone(),
                        xid,
                    })
                    .inc();
                tracing::error!(
                    gpu = labels.gpu,
                    uuid = labels.gpu_uuid,
                    xid,
                    "XID critical error"
                );
                if let Some(logs) = &logs {
                    logs.offer(Notice::Xid(XidError {
                        time_unix_nano: crate::events::now_unix_nano(),
                        gpu: labels.gpu,
                        uuid: labels.gpu_uuid.clone(),
                        xid,
                    }));
                }
                if let Some(report) = reports {
                    report(super::GpuReport::Xid {
                        gpu: labels.gpu,
                        xid,
                        ts_ns: crate::clock::monotonic_ns(),
                    });
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                said.warn("event_set_wait", None, &e);
                return Ended::Failed;
            }
        }
    }
    Ended::Stopped
}

fn rebuild<'n>(nvml: &'n Nvml, gpus: &[u32]) -> Result<EventSet<'n>, NvmlError> {
    let mut set = nvml.create_event_set()?;
    for gpu in gpus {
        let device = nvml.device_by_index(*gpu)?;
        set = device
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .map_err(|e| e.error)?;
    }
    Ok(set)
}

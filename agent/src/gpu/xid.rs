//! XID critical errors from NVML's event API: a counter per (GPU, XID) so a repeat of the same
//! XID is visible, and one log record per event.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use nvml_wrapper::{bitmasks::event::EventTypes, error::NvmlError, Nvml};
use tokio::sync::mpsc::WeakSender;

use crate::{
    export::metrics::{GpuLabels, GpuXidLabels, Metrics},
    health::Heartbeat,
};

const WAIT_MS: u32 = 200;

/// Waits for XID events until `stop` is set. `gpus` are the labels of the GPUs to watch.
/// Beats `heartbeat` at every wait (200 ms). `tracker` is weak, as the sampler's: a watcher
/// stuck in NVML must not keep the tracker's channel open.
pub fn run(
    nvml: Arc<Nvml>,
    gpus: Vec<GpuLabels>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    tracker: Option<WeakSender<crate::track::Input>>,
    logs: Option<crate::export::otlp::queue::Sink<crate::export::otlp::logs::LogItem>>,
    heartbeat: Heartbeat,
) {
    let mut set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "NVML event set unavailable: XID errors not watched");
            heartbeat.done();
            return;
        }
    };
    let mut watched = Vec::new();
    for labels in &gpus {
        let Ok(device) = nvml.device_by_index(labels.gpu) else {
            continue;
        };
        let supported = device
            .supported_event_types()
            .map(|t| t.contains(EventTypes::CRITICAL_XID_ERROR))
            .unwrap_or(false);
        if !supported {
            tracing::info!(gpu = labels.gpu, "XID events not supported on this GPU");
            continue;
        }
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => s,
            Err(e) => {
                // Registering consumed the set; start a new one with the GPUs that worked.
                tracing::warn!(gpu = labels.gpu, error = %e.error, "cannot watch XID events on this GPU");
                match rebuild(&nvml, &watched) {
                    Some(s) => s,
                    None => {
                        heartbeat.done();
                        return;
                    }
                }
            }
        };
        watched.push(labels.gpu);
    }
    if watched.is_empty() {
        heartbeat.done();
        return;
    }
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
                    logs.offer(crate::export::otlp::logs::xid(
                        labels.gpu,
                        &labels.gpu_uuid,
                        xid,
                    ));
                }
                if let Some(tx) = tracker.as_ref().and_then(WeakSender::upgrade) {
                    let _ = tx.try_send(crate::track::Input::Xid {
                        gpu: labels.gpu,
                        xid,
                        ts_ns: crate::clock::monotonic_ns(),
                    });
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::warn!(error = %e, "waiting for NVML events failed; XID watch stops");
                heartbeat.done();
                return;
            }
        }
    }
    heartbeat.done();
}

fn rebuild<'n>(nvml: &'n Nvml, gpus: &[u32]) -> Option<nvml_wrapper::EventSet<'n>> {
    let mut set = nvml.create_event_set().ok()?;
    for gpu in gpus {
        let device = nvml.device_by_index(*gpu).ok()?;
        set = device
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .ok()?;
    }
    Some(set)
}

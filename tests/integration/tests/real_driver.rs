//! Root tier on the real NVIDIA userspace driver (Debian's `libcuda1` and `libnvidia-ml1`,
//! extracted by `cargo xtask setup`; no GPU here): the agent finds and probes the real
//! `libcuda.so.535.*`, names the codes it answers, and reports the real NVML's failure to start
//! without a kernel module. The doubles prove the figures; this proves the agent meets the real
//! library's symbols, prologues and codes.

use std::path::PathBuf;

use integration::*;

/// Where `cargo xtask setup` extracts the driver's libraries (`NVIDIA_DRIVER_DIR`).
fn driver_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/nvidia-driver/usr/lib/x86_64-linux-gnu/nvidia/current");
    assert!(
        dir.join("libcuda.so.1").exists() && dir.join("libnvidia-ml.so.1").exists(),
        "the real driver is not extracted at {}: run `cargo xtask setup`",
        dir.display()
    );
    dir
}

/// The context calls the agent probes beside the memory APIs (`cuda_workload::MEMORY_APIS`):
/// together, the table in agent-common, every symbol of which the 535 library exports.
const CONTEXT_APIS: &[&str] = &[
    "cuCtxSetCurrent",
    "cuCtxPushCurrent_v2",
    "cuCtxPopCurrent_v2",
    "cuDevicePrimaryCtxRetain",
    "cuCtxCreate_v2",
];

#[root_test]
fn every_probe_attaches_to_the_real_driver_and_its_codes_are_counted() {
    let dir = driver_dir();
    let lib = std::fs::canonicalize(dir.join("libcuda.so.1")).unwrap();
    let nvml = dir.join("libnvidia-ml.so.1");
    let agent = Agent::start(&[
        "--cuda-lib",
        lib.to_str().unwrap(),
        "--nvml-lib",
        nvml.to_str().unwrap(),
    ]);
    let s = agent.wait_for("the real libcuda probed", |s| {
        s.sum("inferscope_cuda_libraries", &[]) == 1.0
    });
    let attached = s.label_values("inferscope_probe_attached", "probe");
    let symbols: Vec<&str> = cuda_workload::MEMORY_APIS
        .iter()
        .chain(CONTEXT_APIS)
        .copied()
        .collect();
    for sym in &symbols {
        assert_eq!(
            s.sum("inferscope_probe_attached", &[("probe", sym)]),
            1.0,
            "{sym} is not attached to {}:\n{}",
            lib.display(),
            agent.log()
        );
    }
    assert_eq!((attached.len(), symbols.len()), (21, 21), "{attached:?}");
    // Every entry point of this driver starts with a single-stepped `cmpl`: each probe sits on
    // the emulated `je` after it, and the calls below are still counted exactly.
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("CUDA driver probed") && l.contains("past_first_instruction=21")),
        "{log}"
    );

    // No GPU: cuInit answers no_device and every allocation not_initialized.
    let mut w = Workload::start_in("uninit size=1M count=10", &WorkloadOptions::default(), &dir);
    w.proceed();
    let truth = w.truth();
    let alloc = &truth.apis["cuMemAlloc_v2"];
    assert_eq!(
        (alloc.calls, alloc.failures.get("not_initialized").copied()),
        (10, Some(10)),
        "{truth:?}"
    );
    let s = assert_agent_sees(&agent, &truth);
    assert_eq!(
        s.sum(
            "gpu_cuda_alloc_failures_total",
            &[("api", "cuMemAlloc_v2"), ("error", "not_initialized")]
        ),
        10.0
    );
    assert!(w.wait().success());

    // The real NVML without the kernel module: the agent runs on and says why.
    assert_eq!(s.sum("inferscope_source_up", &[("source", "nvml")]), 0.0);
    let log = agent.log();
    assert!(
        log.contains("NVML unavailable") && log.contains("driver"),
        "{log}"
    );
    assert!(agent.stop().success());
}

//! Root tier: the agent samples the NVML double (a real `libnvidia-ml.so.1` loaded by the real
//! nvml-wrapper) and its series must equal the simulated values; XIDs, lost GPUs, missing
//! symbols and a missing NVML are handled; NVML's per-process view meets the ledger.

use std::path::PathBuf;

use cuda_workload::{nvml_double_path, nvml_old_double_path};
use integration::*;

const MIB: u64 = 1 << 20;
const OVERHEAD: u64 = cuda_workload::DEFAULT_NVML_CTX_OVERHEAD;

/// `count` simulated GPUs of 8 GiB, on a known driver.
fn sim_gpus(count: u32) -> SimGpus {
    let gpus = SimGpus::new(count, 8 << 30);
    gpus.control.set("driver_version", "550.54.15").unwrap();
    gpus
}

#[root_test]
fn every_series_equals_the_simulated_value() {
    let gpus = sim_gpus(2);
    let c = &gpus.control;
    for (key, v0, v1) in [
        ("utilization", 55, 0),
        ("memory_utilization", 30, 0),
        ("temperature", 71, 40),
        ("power_mw", 250_500, 90_000),
        ("power_limit_mw", 700_000, 350_000),
        ("energy_mj", 5_000_000, 1_000),
        ("sm_clock_mhz", 1755, 1980),
        ("mem_clock_mhz", 2619, 2619),
        ("pcie_tx_kbs", 1000, 0),
        ("pcie_rx_kbs", 2000, 0),
        ("ecc_corrected", 3, 0),
        ("ecc_uncorrected", 1, 0),
        ("mig", 0, 1),
    ] {
        c.set_gpu(0, key, v0).unwrap();
        c.set_gpu(1, key, v1).unwrap();
    }
    c.set_gpu(1, "name", "NVIDIA A100-SXM4-40GB").unwrap();
    let agent = gpus.agent(&["--disable-probe", "cuda"], &[]);
    let s = agent.wait_for("the simulated values", |s| {
        s.sum("gpu_temperature_celsius", &[("gpu", "0")]) == 71.0
            && s.sum("gpu_temperature_celsius", &[("gpu", "1")]) == 40.0
    });
    let l0 = [("gpu", "0")];
    let l1 = [("gpu", "1")];
    for (name, l, want) in [
        ("gpu_utilization", l0, 0.55),
        ("gpu_memory_utilization", l0, 0.30),
        ("gpu_power_watts", l0, 250.5),
        ("gpu_power_limit_watts", l0, 700.0),
        ("gpu_power_limit_watts", l1, 350.0),
        ("gpu_energy_joules_total", l0, 5000.0),
        ("gpu_sm_clock_hertz", l0, 1755e6),
        ("gpu_sm_clock_hertz", l1, 1980e6),
        ("gpu_memory_clock_hertz", l0, 2619e6),
        ("gpu_memory_total_bytes", l0, (8u64 << 30) as f64),
        ("gpu_memory_used_bytes", l0, 0.0),
        ("gpu_memory_free_bytes", l0, (8u64 << 30) as f64),
        ("gpu_idle_seconds_total", l0, 0.0),
        ("inferscope_source_up", [("source", "nvml")], 1.0),
    ] {
        assert_eq!(s.sum(name, &l), want, "{name} {l:?}\n{}", s.text);
    }
    assert!(s.sum("inferscope_nvml_samples_total", &[]) >= 1.0);
    assert_eq!(
        s.sum(
            "gpu_pcie_throughput_bytes_per_second",
            &[("gpu", "0"), ("direction", "tx")]
        ),
        1000.0 * 1024.0
    );
    assert_eq!(
        s.sum(
            "gpu_pcie_throughput_bytes_per_second",
            &[("gpu", "0"), ("direction", "rx")]
        ),
        2000.0 * 1024.0
    );
    assert_eq!(
        s.sum(
            "gpu_ecc_errors_total",
            &[("gpu", "0"), ("severity", "corrected")]
        ),
        3.0
    );
    assert_eq!(
        s.sum(
            "gpu_ecc_errors_total",
            &[("gpu", "0"), ("severity", "uncorrected")]
        ),
        1.0
    );
    // Identity labels on every GPU series, and the info series.
    assert!(
        s.has(
            "gpu_temperature_celsius",
            &[
                ("gpu", "1"),
                ("gpu_type", "NVIDIA A100-SXM4-40GB"),
                ("gpu_uuid", "GPU-00000000-1111-2222-3333-444444444401")
            ]
        ),
        "{}",
        s.text
    );
    assert!(
        s.has(
            "gpu_info",
            &[
                ("gpu", "0"),
                ("gpu_type", "NVIDIA H100 80GB HBM3"),
                ("driver_version", "550.54.15"),
                ("cuda_version", "12.4"),
                ("mig_mode", "disabled")
            ]
        ),
        "{}",
        s.text
    );
    assert!(
        s.has("gpu_info", &[("gpu", "1"), ("mig_mode", "enabled")]),
        "{}",
        s.text
    );

    // Counters follow the device's counters; an idle GPU accumulates idle time.
    c.set_gpu(0, "energy_mj", 5_500_000).unwrap();
    c.set_gpu(0, "ecc_corrected", 5).unwrap();
    let s = agent.wait_for("counters to move", |s| {
        s.sum("gpu_energy_joules_total", &l0) == 5500.0
            && s.sum(
                "gpu_ecc_errors_total",
                &[("gpu", "0"), ("severity", "corrected")],
            ) == 5.0
            && s.sum("gpu_idle_seconds_total", &l1) > 0.2
    });
    assert_eq!(s.sum("gpu_idle_seconds_total", &l0), 0.0);
    assert!(agent.stop().success());
}

#[root_test]
fn throttle_reasons_decode_for_every_bit() {
    const REASONS: [&str; 9] = [
        "idle",
        "applications_clocks_setting",
        "sw_power_cap",
        "hw_slowdown",
        "sync_boost",
        "sw_thermal_slowdown",
        "hw_thermal_slowdown",
        "hw_power_brake_slowdown",
        "display_clock_setting",
    ];
    let gpus = sim_gpus(1);
    gpus.control.set_gpu(0, "throttle", "0x1ff").unwrap();
    let agent = gpus.agent(&["--disable-probe", "cuda"], &[]);
    agent.wait_for("all reasons active", |s| {
        REASONS
            .iter()
            .all(|r| s.sum("gpu_throttle_active", &[("gpu", "0"), ("reason", r)]) == 1.0)
    });
    for (bit, reason) in REASONS.iter().enumerate() {
        gpus.control
            .set_gpu(0, "throttle", format!("{:#x}", 1u64 << bit))
            .unwrap();
        // Exactly this reason, and no other, must show (a wrong decoding never settles).
        agent.wait_for(reason, |s| {
            REASONS.iter().all(|r| {
                let want = if r == reason { 1.0 } else { 0.0 };
                s.sum("gpu_throttle_active", &[("gpu", "0"), ("reason", r)]) == want
            })
        });
    }
    assert!(agent.stop().success());
}

#[root_test]
fn an_xid_becomes_a_counter_increment_and_a_log_record() {
    let gpus = sim_gpus(2);
    let agent = gpus.agent(&["--disable-probe", "cuda"], &[]);
    gpus.control.inject_xid(1, 79).unwrap();
    gpus.control.inject_xid(1, 79).unwrap();
    gpus.control.inject_xid(0, 48).unwrap();
    let s = agent.wait_for("the XIDs", |s| {
        s.sum("gpu_xid_errors_total", &[("gpu", "1"), ("xid", "79")]) == 2.0
            && s.sum("gpu_xid_errors_total", &[("gpu", "0"), ("xid", "48")]) == 1.0
    });
    assert_eq!(s.sum("gpu_xid_errors_total", &[]), 3.0);
    let log = agent.log();
    let xid_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("XID critical error"))
        .collect();
    assert_eq!(xid_lines.len(), 3, "{log}");
    assert!(
        xid_lines
            .iter()
            .any(|l| l.contains("gpu=1") && l.contains("xid=79")),
        "{log}"
    );
    assert!(agent.stop().success());
}

#[root_test]
fn an_allocation_failure_carries_the_gpu_state_of_its_instant() {
    let gpus = sim_gpus(1);
    let c = &gpus.control;
    c.set_gpu(0, "utilization", 87).unwrap();
    c.set_gpu(0, "temperature", 83).unwrap();
    c.set_gpu(0, "throttle", "0x40").unwrap();
    let agent = gpus.agent(
        &[
            "--cuda-lib",
            &Variant::Push.lib_path().display().to_string(),
        ],
        &[],
    );
    agent.wait_for("the GPU state", |s| {
        s.sum("gpu_temperature_celsius", &[("gpu", "0")]) == 83.0
    });
    let mut w = gpus.workload("alloc dev=0 size=1073741824 count=2; checkpoint name=held; exhaust dev=0 size=2147483648; checkpoint name=oom");
    w.proceed();
    w.truth();
    // The memory now in use (2 GiB + the context) is sampled before the failure happens.
    agent.wait_for("memory in use", |s| {
        s.sum("gpu_memory_used_bytes", &[("gpu", "0")]) == (2 * 1024 * MIB + OVERHEAD) as f64
    });
    w.proceed();
    let oom = w.truth();
    assert_eq!(
        oom.api("cuMemAlloc_v2").failures.get("out_of_memory"),
        Some(&1)
    );
    // After the failure the GPU cools down; the failure keeps the state of its instant.
    c.set_gpu(0, "temperature", 40).unwrap();
    let line = eventually(
        "the failure's log line",
        std::time::Duration::from_secs(15),
        || {
            agent
                .log()
                .lines()
                .find(|l| l.contains("CUDA call failed") && l.contains("out_of_memory"))
                .map(str::to_string)
        },
    );
    for part in [
        "utilization 87%",
        "temperature 83 C",
        "throttle hw_thermal_slowdown",
        "memory ",
    ] {
        assert!(line.contains(part), "{part:?} not in {line}");
    }
    // 2 GiB held and the context: 2.50 of 8 GiB when the 2 GiB request... failed.
    assert!(line.contains("memory 2.50/8.00 GiB"), "{line}");
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn nvml_per_process_memory_meets_the_ledger() {
    let gpus = sim_gpus(1);
    let agent = gpus.agent(
        &[
            "--cuda-lib",
            &Variant::Push.lib_path().display().to_string(),
        ],
        &[],
    );
    let mut w = gpus.workload("alloc dev=0 size=1048576 count=3; checkpoint name=held");
    w.proceed();
    let truth = w.truth();
    let pid = truth.pid.to_string();
    gpus.control
        .set(&format!("gpu.0.proc_sm_util.{pid}"), 42)
        .unwrap();
    let s = agent.wait_for("NVML's view of the workload", |s| {
        s.sum(
            "gpu_process_memory_used_bytes",
            &[("pid", &pid), ("gpu", "0")],
        ) == (3 * MIB + OVERHEAD) as f64
            && s.sum(
                "gpu_process_memory_overhead_bytes",
                &[("pid", &pid), ("gpu", "0")],
            ) == OVERHEAD as f64
            && s.sum("gpu_process_sm_utilization", &[("pid", &pid), ("gpu", "0")]) == 0.42
    });
    assert_eq!(
        s.sum(
            "gpu_process_memory_allocated_bytes",
            &[("pid", &pid), ("gpu", "0")]
        ),
        (3 * MIB) as f64
    );
    assert_eq!(
        s.sum("gpu_memory_used_bytes", &[("gpu", "0")]),
        (3 * MIB + OVERHEAD) as f64
    );
    w.proceed();
    assert!(w.wait().success());
    agent.wait_for("the process to leave both views", |s| {
        !s.has("gpu_process_memory_used_bytes", &[("pid", &pid)])
            && !s.has("gpu_process_memory_overhead_bytes", &[("pid", &pid)])
    });
    assert!(agent.stop().success());
}

#[root_test]
fn a_context_created_before_the_agent_is_placed_on_the_gpu_nvml_sees() {
    let gpus = sim_gpus(2);
    // The context on GPU 1 is created before the agent exists; the probes never see it.
    let mut w = gpus.workload("alloc dev=1 size=1048576 count=1; checkpoint name=before; alloc dev=1 size=2097152 count=2; checkpoint name=after");
    w.proceed();
    let before = w.truth();
    let pid = before.pid.to_string();
    let agent = gpus.agent(&[], &[]);
    agent.wait_for("discovery and NVML's view", |s| {
        s.sum("inferscope_probe_attached", &[("probe", "cuMemAlloc_v2")]) == 1.0
            && s.has(
                "gpu_process_memory_used_bytes",
                &[("pid", &pid), ("gpu", "1")],
            )
    });
    w.proceed();
    w.truth();
    let s = agent.wait_for("the new allocations on GPU 1", |s| {
        s.sum(
            "gpu_process_memory_allocated_bytes",
            &[("pid", &pid), ("gpu", "1")],
        ) == (4 * MIB) as f64
    });
    assert!(
        !s.has(
            "gpu_process_memory_allocated_bytes",
            &[("pid", &pid), ("gpu", "0")]
        ),
        "{}",
        s.text
    );
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn a_lost_gpu_stops_its_series_and_the_others_continue() {
    let gpus = sim_gpus(2);
    let agent = gpus.agent(&["--disable-probe", "cuda"], &[]);
    agent.wait_for("both GPUs", |s| {
        s.has("gpu_temperature_celsius", &[("gpu", "1")])
    });
    gpus.control.set_gpu(1, "lost", 1).unwrap();
    agent.wait_for("GPU 1 to be reported lost", |s| {
        s.sum("inferscope_gpu_lost", &[("gpu", "1")]) == 1.0
            && !s.has("gpu_temperature_celsius", &[("gpu", "1")])
    });
    gpus.control.set_gpu(0, "temperature", 66).unwrap();
    let s = agent.wait_for("GPU 0 to go on", |s| {
        s.sum("gpu_temperature_celsius", &[("gpu", "0")]) == 66.0
    });
    assert!(!s.has("gpu_utilization", &[("gpu", "1")]));
    assert!(!s.has("gpu_throttle_active", &[("gpu", "1")]));
    let log = agent.log();
    assert_eq!(log.matches("GPU lost").count(), 1, "{log}");
    assert!(agent.stop().success());
}

#[root_test]
fn without_nvml_the_agent_runs_and_says_so() {
    let gpus = sim_gpus(1);
    for (lib, env) in [
        (
            nvml_double_path(),
            vec![(cuda_workload::ENV_NVML_FAIL_INIT, "1")],
        ),
        (PathBuf::from("/nonexistent/libnvidia-ml.so.1"), vec![]),
    ] {
        let agent = gpus.agent_on(&lib, &["--disable-probe", "cuda"], &env);
        let s = agent.scrape();
        assert_eq!(
            s.sum("inferscope_source_up", &[("source", "nvml")]),
            0.0,
            "{}",
            s.text
        );
        assert!(!s.has("gpu_temperature_celsius", &[]));
        let log = agent.log();
        assert_eq!(log.matches("NVML unavailable").count(), 1, "{log}");
        assert!(agent.stop().success());
    }
}

#[root_test]
fn readings_a_driver_lacks_are_reported_once_and_skipped() {
    let gpus = sim_gpus(2);
    gpus.control.set_gpu(0, "unsupported", "ecc,pcie").unwrap();
    // An old driver library: no energy counter, no clock event reasons, no process samples.
    let agent = gpus.agent_on(&nvml_old_double_path(), &["--disable-probe", "cuda"], &[]);
    let s = agent.wait_for("the unsupported readings", |s| {
        ["energy", "clocks_event_reasons", "process_utilization"]
            .iter()
            .all(|c| s.sum("inferscope_nvml_unsupported", &[("gpu", "1"), ("call", c)]) == 1.0)
            && s.sum(
                "inferscope_nvml_unsupported",
                &[("gpu", "0"), ("call", "ecc")],
            ) == 1.0
            && s.sum(
                "inferscope_nvml_unsupported",
                &[("gpu", "0"), ("call", "pcie")],
            ) == 1.0
    });
    assert!(!s.has("gpu_energy_joules_total", &[]));
    assert!(!s.has("gpu_ecc_errors_total", &[("gpu", "0")]));
    assert!(s.has("gpu_ecc_errors_total", &[("gpu", "1")]));
    assert!(s.has("gpu_temperature_celsius", &[("gpu", "0")]));
    // Many samples later, still one log line per (GPU, reading).
    std::thread::sleep(std::time::Duration::from_millis(800));
    let log = agent.log();
    let energy = log
        .lines()
        .filter(|l| {
            l.contains("not asked again") && l.contains("call=\"energy\"") && l.contains("gpu=1")
        })
        .count();
    assert_eq!(energy, 1, "{log}");
    assert_eq!(agent.scrape().sum("inferscope_nvml_errors_total", &[]), 0.0);
    assert!(agent.stop().success());
}

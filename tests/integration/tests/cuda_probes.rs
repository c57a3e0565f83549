//! Root tier: the real agent attaches its eBPF uprobes to the CUDA driver double and its
//! figures must equal the workload's own ground truth.

use integration::*;

const MIB: u64 = 1 << 20;

/// Every memory API, two devices, threads switching contexts, failures of two kinds.
const FULL_PLAN: &str = "alloc dev=0 size=1048576 count=10; alloc dev=1 size=3145728 count=4; \
    pitch dev=0 width=1000 height=30 count=2; managed dev=1 size=65536 count=3; \
    async dev=0 size=4096 count=5; pool dev=1 size=8192 count=2; vmm dev=1 size=2097152 count=2; \
    host size=8192 count=2; hostalloc size=16384 count=1; \
    threads n=4 devs=0,1 size=131072 count=6; \
    free count=3; badfree count=2; zero dev=0 count=1; checkpoint name=live; \
    exhaust dev=0 size=134217728; checkpoint name=oom";

fn ld_lib_arg(v: Variant) -> String {
    v.lib_path().display().to_string()
}

#[root_test]
fn agent_started_before_matches_ground_truth_exactly() {
    let agent = Agent::start(&["--cuda-lib", &ld_lib_arg(Variant::Push)]);
    let mut w = Workload::start(FULL_PLAN, &WorkloadOptions::default());
    w.proceed();
    let live = w.truth();
    assert!(live.live_device_bytes[&0] > 10 * MIB && live.live_device_bytes[&1] > 12 * MIB);
    assert!(live.api("cuMemCreate").ok == 2 && live.api("cuMemFree_v2").failed() == 2);
    let s = assert_agent_sees(&agent, &live);
    assert_eq!(s.sum("gpu_cuda_unknown_frees_total", &[]), 0.0);
    assert_eq!(s.sum("inferscope_events_lost_total", &[]), 0.0);

    w.proceed();
    let oom = w.truth();
    assert_eq!(
        oom.api("cuMemAlloc_v2").failures.get("out_of_memory"),
        Some(&1)
    );
    assert_agent_sees(&agent, &oom);

    // The failure is logged once, with a user stack id for forensics.
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("CUDA call failed") && l.contains("out_of_memory"))
        .unwrap_or_else(|| panic!("no failure log line:\n{log}"));
    assert!(line.contains(&format!("pid={}", oom.pid)), "{line}");
    let stack_id: i64 = line
        .split("stack_id=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no stack id in {line}"));
    assert!(stack_id >= 0, "failure without a stack: {line}");

    // The process ends: its ledger and series go with it.
    w.proceed();
    let pid = oom.pid.to_string();
    assert!(w.wait().success());
    agent.wait_for("the ledger of the exited process to be released", |s| {
        !s.has("gpu_process_memory_allocated_bytes", &[("pid", &pid)])
            && s.sum("inferscope_tracked_processes", &[]) == 0.0
    });
    assert!(agent.stop().success());
}

/// The truth of what happened between two checkpoints.
fn delta(after: &Truth, before: &Truth) -> Truth {
    let mut out = after.clone();
    for (api, stats) in out.apis.iter_mut() {
        let b = before.api(api);
        stats.calls -= b.calls;
        stats.ok -= b.ok;
        stats.bytes -= b.bytes;
        for (error, n) in stats.failures.iter_mut() {
            *n -= b.failures.get(error).copied().unwrap_or(0);
        }
    }
    out
}

#[root_test]
fn agent_started_after_the_workload_discovers_it_and_counts_from_then_on() {
    let plan = "alloc dev=0 size=1048576 count=4; checkpoint name=before; \
                free count=2; alloc dev=0 size=2097152 count=3; checkpoint name=after";
    let opts = WorkloadOptions {
        gpus: 1,
        ..Default::default()
    };
    let mut w = Workload::start(plan, &opts);
    w.proceed();
    let before = w.truth();
    // No --cuda-lib: the agent must find the library through the workload's mappings.
    let agent = Agent::start(&[]);
    agent.wait_for("the mapped library to be attached", |s| {
        s.sum("inferscope_cuda_libraries", &[]) == 1.0
            && s.sum("inferscope_probe_attached", &[("probe", "cuMemAlloc_v2")]) == 1.0
    });
    w.proceed();
    let after = w.truth();
    let mut seen = delta(&after, &before);
    // The ledger holds what it saw allocated; the two frees are of allocations it never saw.
    seen.live_device_bytes = [(0, 3 * 2 * MIB)].into();
    let s = assert_agent_sees(&agent, &seen);
    assert_eq!(
        s.sum("gpu_cuda_unknown_frees_total", &[("api", "cuMemFree_v2")]),
        2.0
    );
    assert_eq!(
        s.sum(
            "gpu_process_allocations",
            &[("pid", &after.pid.to_string()), ("gpu", "0")]
        ),
        3.0
    );
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn a_process_killed_mid_run_releases_its_ledger() {
    let agent = Agent::start(&["--cuda-lib", &ld_lib_arg(Variant::Nop5)]);
    let opts = WorkloadOptions {
        variant: Variant::Nop5,
        gpus: 1,
        ..Default::default()
    };
    let mut w = Workload::start(
        "alloc dev=0 size=1048576 count=5; checkpoint name=held; kill",
        &opts,
    );
    w.proceed();
    let held = w.truth();
    assert_agent_sees(&agent, &held);
    let pid = held.pid.to_string();
    w.proceed();
    let status = w.wait();
    assert!(
        !status.success(),
        "the workload should have died of SIGKILL"
    );
    agent.wait_for("the killed process's ledger to be released", |s| {
        !s.has("gpu_process_memory_allocated_bytes", &[("pid", &pid)])
            && s.sum("inferscope_tracked_processes", &[]) == 0.0
            && s.sum("inferscope_events_total", &[("source", "sched")]) >= 1.0
    });
    assert!(agent.stop().success());
}

#[root_test]
fn a_library_without_the_vmm_symbols_is_probed_for_what_it_has() {
    let agent = Agent::start(&["--cuda-lib", &ld_lib_arg(Variant::NoVmm)]);
    let s = agent.scrape();
    for sym in [
        "cuMemCreate",
        "cuMemMap",
        "cuMemRelease",
        "cuMemAllocFromPoolAsync",
    ] {
        assert_eq!(
            s.sum("inferscope_probe_attached", &[("probe", sym)]),
            0.0,
            "{sym}"
        );
    }
    for sym in [
        "cuMemAlloc_v2",
        "cuMemFree_v2",
        "cuMemAllocHost_v2",
        "cuCtxSetCurrent",
    ] {
        assert_eq!(
            s.sum("inferscope_probe_attached", &[("probe", sym)]),
            1.0,
            "{sym}"
        );
    }
    let log = agent.log();
    assert!(
        log.contains("missing") && log.contains("cuMemCreate"),
        "{log}"
    );
    let opts = WorkloadOptions {
        variant: Variant::NoVmm,
        gpus: 1,
        ..Default::default()
    };
    let mut w = Workload::start(
        "alloc dev=0 size=4096 count=3; free count=1; host size=4096 count=1; checkpoint name=x",
        &opts,
    );
    w.proceed();
    let truth = w.truth();
    assert_agent_sees(&agent, &truth);
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn two_processes_on_one_library_file_are_kept_apart() {
    // Given explicitly and found mapped by both processes: still attached once.
    let agent = Agent::start(&["--cuda-lib", &ld_lib_arg(Variant::Push)]);
    let state = tempfile::NamedTempFile::new().unwrap();
    let opts = WorkloadOptions {
        gpus: 1,
        gpu_mem: 64 * MIB,
        state_file: Some(state.path()),
        ..Default::default()
    };
    let mut a = Workload::start(
        "alloc dev=0 size=1048576 count=10; checkpoint name=a",
        &opts,
    );
    let mut b = Workload::start(
        "alloc dev=0 size=2097152 count=3; exhaust dev=0 size=8388608; checkpoint name=b",
        &opts,
    );
    a.proceed();
    let ta = a.truth();
    b.proceed();
    let tb = b.truth();
    // The two share one simulated GPU: b ran out where the sum of both reached 64 MiB.
    let held = ta.live_device_bytes[&0] + tb.live_device_bytes[&0];
    assert!(held <= 64 * MIB && held > 48 * MIB, "held {held}");
    let mut both = tb.clone();
    for (api, stats) in &ta.apis {
        let e = both.apis.entry(api.clone()).or_default();
        e.calls += stats.calls;
        e.ok += stats.ok;
        e.bytes += stats.bytes;
    }
    let s = agent.wait_for("both processes", |s| mismatch(s, &both).is_none());
    assert!(mismatch(&s, &ta).is_some_and(|m| m.contains("calls")));
    for t in [&ta, &tb] {
        let pid = t.pid.to_string();
        assert_eq!(
            s.sum(
                "gpu_process_memory_allocated_bytes",
                &[("pid", &pid), ("gpu", "0")]
            ),
            t.live_device_bytes[&0] as f64
        );
    }
    // Discovery has seen both mappings by now; still one library file, attached once.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(agent.scrape().sum("inferscope_cuda_libraries", &[]), 1.0);
    a.proceed();
    b.proceed();
    assert!(a.wait().success() && b.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn the_kill_switch_keeps_a_symbol_unprobed() {
    let agent = Agent::start(&[
        "--cuda-lib",
        &ld_lib_arg(Variant::Push),
        "--disable-probe",
        "cuMemFree_v2",
    ]);
    let opts = WorkloadOptions {
        gpus: 1,
        ..Default::default()
    };
    let mut w = Workload::start(
        "alloc dev=0 size=1048576 count=3; free count=3; checkpoint name=x",
        &opts,
    );
    w.proceed();
    let truth = w.truth();
    let pid = truth.pid.to_string();
    let s = agent.wait_for("the allocations", |s| {
        s.sum("gpu_cuda_alloc_calls_total", &[("api", "cuMemAlloc_v2")]) == 3.0
    });
    assert_eq!(
        s.sum("inferscope_probe_attached", &[("probe", "cuMemFree_v2")]),
        0.0
    );
    assert_eq!(s.sum("gpu_cuda_frees_total", &[]), 0.0);
    // Frees unseen: the ledger still holds the three allocations.
    assert_eq!(
        s.sum(
            "gpu_process_memory_allocated_bytes",
            &[("pid", &pid), ("gpu", "0")]
        ),
        3.0 * MIB as f64
    );
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());

    // A whole family off: no library probed at all.
    let agent = Agent::start(&[
        "--cuda-lib",
        &ld_lib_arg(Variant::Push),
        "--disable-probe",
        "cuda",
    ]);
    assert_eq!(agent.scrape().sum("inferscope_cuda_libraries", &[]), 0.0);
    assert!(agent.stop().success());
}

/// The budget's shedding order (agent-common's `Role`): stack sampling, pinned host, VMM
/// address ranges, context, frees, allocations.
fn shed_rank(probe: &str) -> u8 {
    match probe {
        "stack_sampling" => 0,
        "cuMemAllocHost_v2" | "cuMemHostAlloc" | "cuMemFreeHost" => 1,
        "cuMemAddressReserve" | "cuMemAddressFree" | "cuMemMap" | "cuMemUnmap" => 2,
        p if p.starts_with("cuCtx") || p == "cuDevicePrimaryCtxRetain" => 3,
        "cuMemFree_v2" | "cuMemFreeAsync" | "cuMemRelease" => 4,
        _ => 5,
    }
}

#[root_test]
fn the_probe_budget_sheds_cheap_information_first() {
    // endbr64 first: every hit is single-stepped (~15 µs here), so a busy workload passes
    // a 0.2 % budget quickly.
    let agent = Agent::start_with_env(
        &["--cuda-lib", &ld_lib_arg(Variant::Endbr)],
        &[
            ("INFERSCOPE_PROBES__BUDGET_CORE_SHARE", "0.002"),
            ("INFERSCOPE_PROBES__DISCOVERY_INTERVAL_MS", "200"),
            // Small allocations sampled often enough that there is stack sampling to shed.
            ("INFERSCOPE_PROBES__STACK_SAMPLE_BYTES", "4096"),
        ],
    );
    let opts = WorkloadOptions {
        variant: Variant::Endbr,
        gpus: 1,
        ..Default::default()
    };
    let mut w = Workload::start(
        "host size=4096 count=1; threads n=2 devs=0 size=4096 count=4000; sleep ms=600; \
         host size=4096 count=400; threads n=2 devs=0 size=4096 count=4000; sleep ms=600; checkpoint name=x",
        &opts,
    );
    w.proceed();
    let s = agent.wait_for("probes to be shed", |s| {
        s.sum("inferscope_probe_shed", &[("probe", "stack_sampling")]) == 1.0
            && s.sum("inferscope_probe_shed", &[("probe", "cuMemAllocHost_v2")]) >= 1.0
    });
    // Shed per library (the agent may find other processes' libraries too): each library
    // has the probe either attached or shed.
    let probe = [("probe", "cuMemAllocHost_v2")];
    assert_eq!(
        s.sum("inferscope_probe_attached", &probe) + s.sum("inferscope_probe_shed", &probe),
        s.sum("inferscope_cuda_libraries", &[]),
        "{}",
        s.text
    );
    // Cheapest information first, allocation probes last. Each tick sheds in rank order the
    // probes that had hits in its window (shedding one without hits saves nothing), so across
    // ticks a probe that only then got busy can follow a costlier rank: stack sampling goes
    // first, an allocation probe is not the first api shed, and nothing follows one.
    let log = agent.log();
    let order: Vec<u8> = log
        .lines()
        .filter(|l| l.contains("probe budget exceeded, shedding probe"))
        // This test's library (others the machine's processes map are shed in their turn).
        .filter(|l| l.contains("library=\"*\"") || l.contains(&ld_lib_arg(Variant::Endbr)))
        .filter_map(|l| l.split("probe=\"").nth(1)?.split('"').next())
        .map(shed_rank)
        .collect();
    assert!(
        order.len() >= 2 && order[0] == 0 && order[1] < 5,
        "{order:?}\n{log}"
    );
    if let Some(first_alloc) = order.iter().position(|r| *r == 5) {
        assert_eq!(first_alloc, order.len() - 1, "{order:?}\n{log}");
    }
    w.truth();
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

/// Waits for the process's ledger to hold exactly what the workload holds: with its
/// allocation or free probe off, its bytes or allocation count would be off.
fn assert_ledger_exact(agent: &Agent, truth: &Truth, allocations: u64) {
    let pid = truth.pid.to_string();
    let l = [("pid", pid.as_str()), ("gpu", "0")];
    let expected = |s: &Scrape| {
        s.sum("gpu_process_memory_allocated_bytes", &l) == truth.live_device_bytes[&0] as f64
            && s.sum("gpu_process_allocations", &l) == allocations as f64
    };
    agent.wait_for("the workload's ledger, exact", expected);
    // Nothing more arrives late.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s = agent.scrape();
    assert!(expected(&s), "the ledger moved on:\n{}", s.text);
}

/// Whether the agent's log has a line with every one of `parts`.
fn logged(agent: &Agent, parts: &[&str]) -> bool {
    agent
        .log()
        .lines()
        .any(|l| parts.iter().all(|p| l.contains(p)))
}

#[root_test]
fn the_budget_sheds_a_hot_library_alone_and_brings_its_probes_back() {
    // Two copies of the double: a tenant's library (endbr64 first: every hit is single-stepped,
    // so a loop passes a 0.2 % budget at once) and the driver everyone else uses. The agent
    // may find other processes' libraries too: the checks name these two files.
    let hot_dir = tempfile::tempdir().unwrap();
    let quiet_dir = tempfile::tempdir().unwrap();
    let hot_lib = hot_dir.path().join("libcuda.so.1");
    let quiet_lib = quiet_dir.path().join("libcuda.so.1");
    std::fs::copy(Variant::Endbr.lib_path(), &hot_lib).unwrap();
    std::fs::copy(Variant::Push.lib_path(), &quiet_lib).unwrap();
    let (hot_lib, quiet_lib) = (
        hot_lib.display().to_string(),
        quiet_lib.display().to_string(),
    );
    let agent = Agent::start_with_env(
        &["--cuda-lib", &hot_lib, "--cuda-lib", &quiet_lib],
        &[
            ("INFERSCOPE_PROBES__BUDGET_CORE_SHARE", "0.002"),
            ("INFERSCOPE_PROBES__DISCOVERY_INTERVAL_MS", "200"),
            ("INFERSCOPE_PROBES__SHED_COOLDOWN_SECS", "4"),
        ],
    );
    agent.wait_for("both libraries to be probed", |_| {
        [&hot_lib, &quiet_lib].iter().all(|lib| {
            logged(
                &agent,
                &["CUDA driver probed", &format!("library=\"{lib}\"")],
            )
        })
    });
    // The budget measures a probe from its first tick on: let that pass.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let opts = WorkloadOptions {
        gpus: 1,
        ..Default::default()
    };
    let mut hot = Workload::start_in(
        "threads n=2 devs=0 size=4096 count=4000; checkpoint name=burst",
        &opts,
        hot_dir.path(),
    );
    hot.proceed();
    let s = agent.wait_for("the allocation probe to be shed", |s| {
        s.sum("inferscope_probe_shed", &[("probe", "cuMemAlloc_v2")]) >= 1.0
    });
    // Shed on the hot file only: the other keeps its probes (until now, every library lost
    // them).
    assert!(
        s.sum("inferscope_probe_attached", &[("probe", "cuMemAlloc_v2")]) >= 1.0,
        "{}",
        s.text
    );
    let hot_shed = [
        "shedding probe",
        "probe=\"cuMemAlloc_v2\"",
        &format!("library=\"{hot_lib}\""),
    ];
    assert!(logged(&agent, &hot_shed), "{}", agent.log());
    hot.truth();

    // A quiet process on the other file is counted exactly while the hot one is shed.
    let quiet_plan = "alloc dev=0 size=1048576 count=3; free count=1; checkpoint name=q";
    let mut quiet = Workload::start_in(quiet_plan, &opts, quiet_dir.path());
    quiet.proceed();
    let truth = quiet.truth();
    assert_eq!(truth.live_device_bytes[&0], 2 * MIB);
    assert_ledger_exact(&agent, &truth, 2);
    quiet.proceed();
    assert!(quiet.wait().success());

    // The burst is over: after the cool-down the hot file's probes come back.
    hot.proceed();
    assert!(hot.wait().success());
    agent.wait_for("the hot library's probes to be re-attached", |s| {
        logged(
            &agent,
            &[
                "probe re-attached",
                "probe=\"cuMemAlloc_v2\"",
                &format!("library=\"{hot_lib}\""),
            ],
        ) && s.sum("inferscope_probe_shed", &[]) == 0.0
    });
    let log = agent.log();
    for line in log.lines().filter(|l| l.contains("shedding probe")) {
        assert!(
            !line.contains(&quiet_lib),
            "the quiet library was shed: {line}"
        );
    }

    // And a new process on the once-hot file is counted exactly again.
    let mut again = Workload::start_in(quiet_plan, &opts, hot_dir.path());
    again.proceed();
    let truth = again.truth();
    assert_ledger_exact(&agent, &truth, 2);
    again.proceed();
    assert!(again.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn a_full_ring_buffer_loses_events_visibly_never_silently() {
    // One page of ring and a slow reader: a burst must overflow it.
    let agent = Agent::start_with_env(
        &["--cuda-lib", &ld_lib_arg(Variant::Nop5)],
        &[
            ("INFERSCOPE_PROBES__RING_BUFFER_BYTES", "4096"),
            ("INFERSCOPE_PROBES__POLL_INTERVAL_MS", "1000"),
            ("INFERSCOPE_PROBES__BUDGET_CORE_SHARE", "0"),
        ],
    );
    let opts = WorkloadOptions {
        variant: Variant::Nop5,
        gpus: 1,
        ..Default::default()
    };
    let mut w = Workload::start(
        "threads n=2 devs=0 size=4096 count=5000; checkpoint name=x",
        &opts,
    );
    w.proceed();
    let truth = w.truth();
    let calls = truth.api("cuMemAlloc_v2").calls + truth.api("cuMemFree_v2").calls;
    assert_eq!(calls, 15_000);
    let s = agent.wait_for("every call to be either delivered or counted lost", |s| {
        let seen = s.sum("gpu_cuda_alloc_calls_total", &[]) + s.sum("gpu_cuda_frees_total", &[]);
        let lost = s.sum("inferscope_events_lost_total", &[("source", "cuda")]);
        seen + lost == calls as f64
    });
    assert!(
        s.sum("inferscope_events_lost_total", &[("source", "cuda")]) > 0.0,
        "a 4 KiB ring should have overflowed"
    );
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn many_short_lived_processes_leave_no_ledger_behind() {
    let agent = Agent::start(&["--cuda-lib", &ld_lib_arg(Variant::Nop5)]);
    let workload = bin(cuda_workload::WORKLOAD_BIN_NAME);
    const PROCS: usize = 400;
    // Batches of 8 at a time; each allocates twice and exits without freeing.
    for batch in 0..PROCS / 8 {
        let children: Vec<_> = (0..8)
            .map(|_| {
                std::process::Command::new(&workload)
                    .args(["--plan", "alloc dev=0 size=4096 count=2"])
                    .env("LD_LIBRARY_PATH", Variant::Nop5.dir())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("batch {batch}: {e}"))
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
    }
    let s = agent.wait_for("every exited process to be released", |s| {
        s.sum("gpu_cuda_alloc_calls_total", &[("api", "cuMemAlloc_v2")]) == (2 * PROCS) as f64
            && s.sum("inferscope_tracked_processes", &[]) == 0.0
    });
    assert!(
        !s.has("gpu_process_memory_allocated_bytes", &[]),
        "{}",
        s.text
    );
    assert_eq!(s.sum("inferscope_events_lost_total", &[]), 0.0);
    // Nor a trace in the kernel: the per-thread and per-process map entries (contexts, current
    // devices, reported drivers) went with their owners.
    let left: Vec<_> = inferscope::probe::census::entries()
        .unwrap()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(agent.stop().success());
}

#[root_test]
fn a_library_replaced_on_disk_is_still_probed_through_the_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libcuda.so.1");
    std::fs::copy(Variant::Push.lib_path(), &lib).unwrap();
    let opts = WorkloadOptions {
        gpus: 1,
        ..Default::default()
    };
    let mut w = Workload::start_in(
        "alloc dev=0 size=1048576 count=2; checkpoint name=before; alloc dev=0 size=1048576 count=5; checkpoint name=after",
        &opts,
        dir.path(),
    );
    w.proceed();
    let before = w.truth();
    // A driver upgrade: the file is replaced while the process keeps the old one mapped.
    let new = dir.path().join("libcuda.so.1.new");
    std::fs::copy(Variant::Push.lib_path(), &new).unwrap();
    std::fs::rename(&new, &lib).unwrap();
    let agent = Agent::start(&[]);
    agent.wait_for("the deleted mapping to be attached", |s| {
        s.sum("inferscope_probe_attached", &[("probe", "cuMemAlloc_v2")]) >= 1.0
    });
    w.proceed();
    let after = w.truth();
    let pid = after.pid.to_string();
    let s = agent.wait_for("the new allocations", |s| {
        s.sum("gpu_process_memory_allocated_bytes", &[("pid", &pid)]) == (5 * MIB) as f64
    });
    assert_eq!(
        s.sum("gpu_cuda_alloc_calls_total", &[("api", "cuMemAlloc_v2")]),
        (after.api("cuMemAlloc_v2").calls - before.api("cuMemAlloc_v2").calls) as f64
    );
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn result_codes_no_driver_defines_share_the_other_label() {
    let agent = Agent::start(&["--cuda-lib", &ld_lib_arg(Variant::Push)]);
    // 300 calls return 1000..1299, then the GPU runs out of memory for real.
    let opts = WorkloadOptions {
        gpus: 1,
        ..Default::default()
    };
    let mut w = Workload::start_with(
        "rawalloc size=1M count=300; exhaust dev=0 size=256M; checkpoint name=done",
        &opts,
        &Variant::Push.dir(),
        &[],
        &[(cuda_workload::ENV_ALLOC_RESULTS, "1000:300")],
    );
    w.proceed();
    let truth = w.truth();
    let alloc = truth.api("cuMemAlloc_v2");
    assert_eq!(alloc.failures.len(), 301, "{alloc:?}");
    assert_eq!(alloc.failures.get("out_of_memory"), Some(&1));
    let api = [("api", "cuMemAlloc_v2")];
    let s = agent.wait_for("every failure", |s| {
        s.sum("gpu_cuda_alloc_failures_total", &api) == 301.0
    });
    let errors: std::collections::BTreeSet<&str> = s
        .text
        .lines()
        .filter(|l| l.starts_with("gpu_cuda_alloc_failures_total{") && l.contains("cuMemAlloc_v2"))
        .filter_map(|l| l.split("error=\"").nth(1)?.split('"').next())
        .collect();
    assert!(errors.len() <= 10, "error values {errors:?}");
    let failures = |error: &str| {
        s.sum(
            "gpu_cuda_alloc_failures_total",
            &[("api", "cuMemAlloc_v2"), ("error", error)],
        )
    };
    assert_eq!(failures("other"), 300.0, "{}", s.text);
    assert_eq!(failures("out_of_memory"), 1.0, "{}", s.text);
    assert_eq!(
        s.sum(
            "inferscope_dropped_total",
            &[("what", "error_label"), ("reason", "unknown_code")]
        ),
        300.0
    );
    // One log line for all the unknown codes (with the first one's number), one for the OOM.
    let log = agent.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CUDA call failed") && l.contains(&format!("pid={}", truth.pid)))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[0].contains("code=1000"), "{lines:#?}");
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

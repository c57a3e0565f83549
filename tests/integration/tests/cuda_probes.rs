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

#[test]
fn agent_started_before_matches_ground_truth_exactly() {
    if !root_tier() {
        return;
    }
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
    assert_eq!(oom.api("cuMemAlloc_v2").failures.get("out_of_memory"), Some(&1));
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

//! Root tier: an agent that dies — SIGKILL, or a panic — leaves nothing attached (the kernel
//! detaches every uprobe and tracepoint as its descriptors close), and the CUDA process it was
//! probing runs on, its calls answered as before.

use std::time::Duration;

use integration::*;

fn agent_probing_a_workload(env: &[(&str, &str)]) -> (Agent, Workload) {
    let agent = Agent::start_with_env(
        &[
            "--cuda-lib",
            &Variant::Push.lib_path().display().to_string(),
        ],
        env,
    );
    let mut w = Workload::start(
        "alloc dev=0 size=1048576 count=4; checkpoint name=probed; \
         alloc dev=0 size=1048576 count=4; free count=8; checkpoint name=after",
        &WorkloadOptions::default(),
    );
    w.proceed();
    let truth = w.truth();
    assert_agent_sees(&agent, &truth);
    (agent, w)
}

/// After the agent is gone, the workload's next calls succeed as its own truth says.
fn workload_runs_on(mut w: Workload) {
    w.proceed();
    let after = w.truth();
    let alloc = after.api("cuMemAlloc_v2");
    assert_eq!((alloc.calls, alloc.ok), (8, 8), "{after:?}");
    assert_eq!(after.api("cuMemFree_v2").ok, 8);
    w.proceed();
    assert!(w.wait().success());
}

#[root_test]
fn sigkill_leaves_no_probe_attached() {
    let (agent, w) = agent_probing_a_workload(&[]);
    let (status, _) = agent.end_with(libc::SIGKILL, Duration::from_secs(30));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    workload_runs_on(w);
}

#[root_test]
fn a_panic_ends_the_agent_and_leaves_no_probe_attached() {
    let (agent, w) = agent_probing_a_workload(&[("INFERSCOPE_FAULT_PANIC_AFTER_MS", "3000")]);
    let (status, log) = agent.end_with(0, Duration::from_secs(30));
    assert_eq!(status.code(), Some(70), "{log}");
    assert!(
        log.contains("injected panic") && log.contains("panic, exiting"),
        "{log}"
    );
    workload_runs_on(w);
}

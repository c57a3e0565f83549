//! Root tier: liveness that means something. Every long-running stage beats a heartbeat,
//! idle or not; a stage stuck in a call (here the NVML sampler, in an NVML call that the
//! NVML double makes block as a wedged driver would) turns `/healthz` 503 naming it, while
//! `/metrics` is still served; SIGTERM ends the agent within 5 s all the same, with status 0
//! and nothing attached. The XID watcher survives NVML errors and resumes.

use std::time::{Duration, Instant};

use integration::*;

/// Longer than the shortest heartbeat deadline (10 s): stages that only wait must beat.
const IDLE: Duration = Duration::from_secs(12);
/// The agent's promise: SIGTERM to exit.
const EXIT_BOUND: Duration = Duration::from_secs(5);

fn healthz(agent: &Agent) -> (u16, String) {
    http_get(agent.port, "/healthz").expect("GET /healthz")
}

/// Hangs the sampler in `nvmlDeviceGetTemperature` and waits until it is in that call (its
/// sample count stops moving). Returns when the hang was set.
fn hang_the_sampler(gpus: &SimGpus, agent: &Agent) -> Instant {
    agent.wait_for("a first sample", |s| {
        s.sum("gpu_temperature_celsius", &[("gpu", "0")]) == 35.0
    });
    let hung = Instant::now();
    gpus.control.set_gpu(0, "hang", "temperature").unwrap();
    let mut last = -1.0;
    eventually(
        "the sampler to stop sampling",
        Duration::from_secs(10),
        || {
            let n = agent.scrape().sum("inferscope_nvml_samples_total", &[]);
            let still = n == last;
            last = n;
            std::thread::sleep(Duration::from_millis(500));
            still.then_some(())
        },
    );
    hung
}

#[root_test]
fn a_hung_stage_turns_healthz_503_naming_it() {
    let gpus = SimGpus::new(1, 8 << 30);
    let agent = gpus.agent(&["--disable-probe", "cuda"], &[]);

    // Idle for longer than the shortest deadline: every stage still beats.
    std::thread::sleep(IDLE);
    let (status, body) = healthz(&agent);
    assert!(
        status == 200 && body.starts_with("ok\n"),
        "{body}\n{}",
        agent.log()
    );

    let hung = hang_the_sampler(&gpus, &agent);
    let body = eventually("/healthz to fail", Duration::from_secs(30), || {
        let (status, body) = healthz(&agent);
        (status == 503).then_some(body)
    });
    // The sampler's deadline is 10 s (its interval here is 100 ms): not before.
    assert!(hung.elapsed() >= Duration::from_secs(9), "{body}");
    assert!(
        body.starts_with("stalled: nvml-sampler (no heartbeat for "),
        "{body}"
    );
    assert_eq!(
        body.matches("stalled:").count(),
        1,
        "only the sampler: {body}"
    );
    // The rest of the agent works on: /metrics is served, and the XID watcher still counts.
    gpus.control.inject_xid(0, 43).unwrap();
    agent.wait_for("the XID", |s| {
        s.sum("gpu_xid_errors_total", &[("gpu", "0"), ("xid", "43")]) == 1.0
    });

    // Released, it beats again.
    gpus.control.remove("gpu.0.hang").unwrap();
    eventually("/healthz to recover", Duration::from_secs(10), || {
        (healthz(&agent).0 == 200).then_some(())
    });
    assert!(agent.stop_within(EXIT_BOUND).0.success());
}

#[root_test]
fn sigterm_exits_within_5_s_with_a_stage_hung() {
    let gpus = SimGpus::new(1, 8 << 30);
    let agent = gpus.agent(&["--disable-probe", "cuda"], &[]);
    hang_the_sampler(&gpus, &agent);
    let (status, log) = agent.stop_within(EXIT_BOUND);
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("stage did not stop in time") && l.contains("nvml-sampler")),
        "the stuck stage is named:\n{log}"
    );
    assert!(log.contains("probes detached"), "{log}");
}

#[root_test]
fn the_xid_watch_retries_after_errors_and_resumes() {
    let gpus = SimGpus::new(2, 8 << 30);
    let agent = gpus.agent(&["--disable-probe", "cuda"], &[]);
    agent.wait_for("both GPUs", |s| {
        s.has("gpu_temperature_celsius", &[("gpu", "1")])
    });
    // Both GPUs fall off the bus: the event wait fails, and so does every rebuild.
    gpus.control.set_gpu(0, "lost", 1).unwrap();
    gpus.control.set_gpu(1, "lost", 1).unwrap();
    let failures = |log: &str, level: &str| {
        log.lines()
            .filter(|l| l.contains(level) && l.contains("XID watch: NVML call failed"))
            .count()
    };
    eventually("two retries", Duration::from_secs(20), || {
        (failures(&agent.log(), "DEBUG") >= 2).then_some(())
    });
    // One warning per kind (the wait, then each GPU's lookup), however often it retries.
    let log = agent.log();
    assert_eq!(failures(&log, "WARN"), 3, "{log}");
    assert_eq!(
        healthz(&agent).0,
        200,
        "the watcher beats while it waits to retry"
    );

    gpus.control.set_gpu(0, "lost", 0).unwrap();
    eventually("the watch to resume", Duration::from_secs(30), || {
        agent.log().contains("XID watch resumed").then_some(())
    });
    gpus.control.inject_xid(0, 31).unwrap();
    agent.wait_for("the XID after the errors", |s| {
        s.sum("gpu_xid_errors_total", &[("gpu", "0"), ("xid", "31")]) == 1.0
    });
    assert!(agent.stop_within(EXIT_BOUND).0.success());
}

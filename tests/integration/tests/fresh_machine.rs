//! Root tier: the agent on a machine as a new user has it. tracefs is not mounted on fresh VMs
//! and many minimal images; the agent mounts it itself where it may, and where it may not, the
//! families that need it are left out and the others run on. Each agent here runs in a mount
//! namespace of its own where tracefs (and debugfs, under which the kernel would mount it
//! again) is unmounted, so the host's mounts are never touched.

use integration::*;

/// A wrapper that execs its arguments in a private mount namespace without tracefs. It fails
/// (exit 3) rather than test the wrong thing when tracefs is still reachable.
fn without_tracefs(then: &[&str]) -> Vec<String> {
    let script = "for m in /sys/kernel/debug/tracing /sys/kernel/tracing /sys/kernel/debug; do \
                  while mountpoint -q $m; do umount -l $m || exit 2; done; done; \
                  if [ -e /sys/kernel/tracing/events ] || [ -e /sys/kernel/debug/tracing/events ]; \
                  then echo 'tracefs still mounted' >&2; exit 3; fi; exec \"$@\"";
    let mut w: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ]
    .map(String::from)
    .to_vec();
    w.extend(then.iter().map(|s| s.to_string()));
    w
}

/// `setpriv` arguments that exec the agent as root holding only the DaemonSet's default
/// capabilities: no CAP_SYS_ADMIN, so no mount.
const WITHOUT_SYS_ADMIN: &[&str] = &[
    "setpriv",
    "--no-new-privs",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all,+bpf,+perfmon,+sys_resource,+sys_ptrace,+kill",
    "--",
];

/// The agent, probing the driver double, started by `then` (or directly) without tracefs.
fn agent_without_tracefs(then: &[&str]) -> Agent {
    let wrapper = without_tracefs(then);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    Agent::start_under(
        &wrapper,
        &[
            "--cuda-lib",
            &Variant::Push.lib_path().display().to_string(),
        ],
        &[],
    )
}

fn family_up(s: &Scrape, family: &str) -> f64 {
    s.sum("inferscope_probe_family_up", &[("family", family)])
}

#[root_test]
fn tracefs_unmounted_the_agent_mounts_it_and_every_family_runs() {
    let agent = agent_without_tracefs(&[]);
    let (status, body) = http_get(agent.port, "/healthz").expect("healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let s = agent.scrape();
    for family in ["cuda", "sched", "oom", "http", "discovery"] {
        assert_eq!(family_up(&s, family), 1.0, "{family}:\n{}", agent.log());
    }
    assert!(
        agent.log().contains("tracefs was not mounted: mounted it"),
        "{}",
        agent.log()
    );
    // The sched family works: a CUDA process's exit releases its ledger.
    let mut w = Workload::start(
        "alloc dev=0 size=4096 count=3; checkpoint name=held",
        &WorkloadOptions::default(),
    );
    w.proceed();
    let truth = w.truth();
    assert_agent_sees(&agent, &truth);
    w.proceed();
    assert!(w.wait().success());
    agent.wait_for("the exit to release the ledger (sched family)", |s| {
        s.sum("inferscope_tracked_processes", &[]) == 0.0
    });
    assert!(agent.stop().success());
}

/// Without CAP_SYS_ADMIN the agent can neither mount tracefs nor, on Linux 6.16+ (and the
/// stable kernels patched in mid-2025), attach uprobes. It starts all the same, says for each
/// family why it is not running, in one log line each and in `/healthz`, and runs on with
/// what works: the CUDA probes where the kernel still lets CAP_PERFMON attach uprobes.
#[root_test]
fn without_cap_sys_admin_the_agent_runs_and_names_what_is_missing() {
    let agent = agent_without_tracefs(WITHOUT_SYS_ADMIN);
    let (status, body) = http_get(agent.port, "/healthz").expect("healthz");
    assert_eq!(status, 200, "{body}");
    let mut lines = body.lines();
    assert_eq!(lines.next(), Some("ok"), "{body}");
    let degraded: Vec<&str> = lines.collect();
    for (line, family) in degraded.iter().zip(["sched", "oom", "http", "discovery"]) {
        assert!(
            line.starts_with(&format!("degraded: {family} (tracefs is not mounted"))
                && line.contains("mount -t tracefs nodev /sys/kernel/tracing"),
            "{line}"
        );
    }
    let s = agent.scrape();
    for family in ["sched", "oom", "http", "discovery"] {
        assert_eq!(family_up(&s, family), 0.0, "{family}");
    }
    let log = agent.log();
    assert_eq!(
        log.matches("probe family not started").count(),
        4,
        "one line per family:\n{log}"
    );
    let mut w = Workload::start(
        "alloc dev=0 size=1048576 count=4; free count=2; checkpoint name=held",
        &WorkloadOptions::default(),
    );
    w.proceed();
    let truth = w.truth();
    if family_up(&s, "cuda") == 1.0 {
        // The CUDA probes see every call all the same.
        assert_eq!(degraded.len(), 4, "{body}");
        assert_agent_sees(&agent, &truth);
    } else {
        assert_eq!(degraded.len(), 5, "{body}");
        assert!(
            degraded[4]
                .starts_with("degraded: cuda (the kernel refuses uprobes without CAP_SYS_ADMIN")
                && degraded[4].contains("Permission denied"),
            "{body}"
        );
        assert_eq!(
            log.matches("no CUDA probe attached").count(),
            1,
            "one line, not one per symbol:\n{log}"
        );
        assert!(!log.contains("attach failed"), "{log}");
    }
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

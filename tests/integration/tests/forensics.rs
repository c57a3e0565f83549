//! Root tier: forensic reports for a CUDA out-of-memory, a crash of a process holding GPU
//! memory and a real host OOM kill, read back through `inferscope forensics`.

use std::{path::Path, process::Command, time::Duration};

use integration::{reports::*, *};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The agent on `gpu` and the CUDA double.
fn start_agent(gpu: &SimGpus) -> Agent {
    let lib = Variant::Push.lib_path().display().to_string();
    // Every successful allocation carries its stack in these tests: each one's bytes reach
    // the byte sampler's next pick.
    gpu.agent(
        &["--cuda-lib", &lib],
        &[("INFERSCOPE_PROBES__STACK_SAMPLE_BYTES", "1")],
    )
}

fn frames(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Stacks by bytes: every allocation at or above the threshold carries its stack, whatever
/// the sampler; with the sampler off none below it does, and the report says why.
#[root_test]
fn every_allocation_at_or_above_the_threshold_has_its_stack() {
    let gpu = SimGpus::new(1, 1 << 30);
    let lib = Variant::Push.lib_path().display().to_string();
    let agent = gpu.agent(
        &["--cuda-lib", &lib],
        &[
            (
                "INFERSCOPE_PROBES__STACK_THRESHOLD_BYTES",
                &(8 * MIB).to_string(),
            ),
            ("INFERSCOPE_PROBES__STACK_SAMPLE_BYTES", "0"),
        ],
    );
    // Below, at and above the threshold (8 MiB), then 128 MiB until the GPU is full.
    let mut w = gpu.workload(
        "alloc dev=0 size=1048576 count=6; alloc dev=0 size=8388607 count=2; \
         alloc dev=0 size=8388608 count=3; alloc dev=0 size=33554432 count=2; sleep ms=500; \
         exhaust dev=0 size=134217728; checkpoint name=oom",
    );
    w.proceed();
    let truth = w.truth();
    let large = 3 + 2 + (truth.api("cuMemAlloc_v2").ok - 13);
    let l = reports(&agent, 1);
    let r = show(
        &agent.dir.path().join("forensics"),
        l[0]["id"].as_str().unwrap(),
    );
    let rows = r["allocations"]["largest"].as_array().unwrap();
    assert_eq!(rows.len() as u64, large + 2 + 6, "{rows:?}");
    for row in rows {
        let bytes = row["bytes"].as_u64().unwrap();
        if bytes >= 8 * MIB {
            assert_eq!(row["stack_status"], "walked", "{row}");
            let f = frames(&row["stack"]);
            assert!(f.iter().any(|f| f.contains("Workload")), "{row}");
        } else {
            assert_eq!(row["stack_status"], "not_sampled", "{row}");
            assert!(row["stack"].as_array().unwrap().is_empty(), "{row}");
        }
    }
    // The text says why a row has no stack.
    let (ok, text, _) = cli(
        &agent.dir.path().join("forensics"),
        &["show", l[0]["id"].as_str().unwrap()],
    );
    assert!(
        ok && text.contains("(stack not sampled: below the threshold)"),
        "{text}"
    );
    // Every walk counted by why: one per large allocation, none sampled, the failure's own.
    let s = agent.wait_for("the stack walks counted", |s| {
        s.sum("inferscope_cuda_stacks_total", &[("why", "threshold")]) >= large as f64
            && s.sum("inferscope_cuda_stacks_total", &[("why", "failure")]) >= 1.0
    });
    let walks = |why| s.sum("inferscope_cuda_stacks_total", &[("why", why)]);
    assert_eq!(walks("threshold"), large as f64, "{}", s.text);
    assert_eq!(walks("sampled"), 0.0, "{}", s.text);
    assert_eq!(walks("missed"), 0.0, "{}", s.text);
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn a_cuda_oom_report_holds_the_ground_truth() {
    let gpu = SimGpus::new(1, 1 << 30);
    gpu.control.set_gpu(0, "temperature", 77).unwrap();
    gpu.control.set_gpu(0, "throttle", "0x4").unwrap();
    let agent = start_agent(&gpu);
    agent.wait_for("NVML", |s| s.sum("gpu_temperature_celsius", &[]) == 77.0);
    let mut w = gpu.workload(
        "alloc dev=0 size=104857600 count=3; async dev=0 size=1048576 count=4; sleep ms=2500; \
         exhaust dev=0 size=134217728; checkpoint name=oom",
    );
    w.proceed();
    let truth = w.truth();
    let live_count = 3 + 4 + (truth.api("cuMemAlloc_v2").ok - 3);
    let live_bytes = truth.live_device_bytes[&0];

    let l = reports(&agent, 1);
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0]["kind"], "cuda");
    assert_eq!(l[0]["pid"], truth.pid);
    let r = show(
        &agent.dir.path().join("forensics"),
        l[0]["id"].as_str().unwrap(),
    );
    assert_eq!(r["schema_version"], 1);
    assert_eq!(r["process"]["comm"], "cuda-workload");
    assert!(r["process"]["cmdline"].as_str().unwrap().contains("--plan"));
    assert_eq!(r["cuda"]["api"], "cuMemAlloc_v2");
    assert_eq!(r["cuda"]["requested_bytes"], 128 * MIB);
    assert_eq!(r["cuda"]["error"], "out_of_memory");
    let a = &r["allocations"];
    assert_eq!(a["count"], live_count, "{a}");
    assert_eq!(a["bytes"], live_bytes, "{a}");
    assert_eq!(a["largest"][0]["bytes"], 128 * MIB);
    assert_eq!(a["largest"].as_array().unwrap().len(), live_count as usize);
    assert_eq!(a["largest"][live_count as usize - 1]["bytes"], MIB);
    // The failing call's stack, and a sampled allocation's, name the workload's code.
    let failing = frames(&r["cuda"]["stack"]);
    assert!(
        failing
            .iter()
            .any(|f| f.contains("Workload") && f.contains("run")),
        "{failing:?}"
    );
    let sampled = frames(&a["largest"][0]["stack"]);
    assert!(
        sampled.iter().any(|f| f.contains("Workload")),
        "{sampled:?}"
    );
    // The GPU as NVML showed it at that instant.
    assert_eq!(r["gpu"]["temperature_c"], 77);
    assert_eq!(r["gpu"]["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(r["gpu"]["throttle_reasons"][0], "sw_power_cap");
    assert_eq!(r["gpu_processes"][0]["pid"], truth.pid);
    assert_eq!(r["gpu_processes"][0]["ledger_bytes"], live_bytes);
    assert!(!r["timeline"]["gpu"].as_array().unwrap().is_empty());
    let summary = r["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("cuMemAlloc_v2 of 128.0 MiB failed on GPU 0 (1.00 GiB)"),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("in {live_count} allocations")),
        "{summary}"
    );

    let dir = agent.dir.path().join("forensics");
    let id = l[0]["id"].as_str().unwrap();
    let (ok, html, _) = cli(&dir, &["show", id, "--format", "html"]);
    assert!(ok && html.contains("<svg id=\"timeline\"") && html.contains("class=\"series\""));
    assert!(
        !html.contains("http://")
            || html
                .matches("http://")
                .all(|_| html.contains("xmlns=\"http://www.w3.org/2000/svg\""))
    );
    render_in_chromium(&html);
    let (ok, text, _) = cli(&dir, &["show", id]);
    assert!(ok && text.starts_with(summary), "{text}");
    let s = agent.scrape();
    assert_eq!(s.sum("llm_oom_events_total", &[("kind", "cuda")]), 1.0);
    assert_eq!(
        s.sum("inferscope_forensics_reports_total", &[("kind", "cuda")]),
        1.0
    );
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn a_storm_of_failures_gives_one_report_per_process_and_counts_the_rest() {
    let gpu = SimGpus::new(1, 1 << 30);
    let agent = start_agent(&gpu);
    let plan = vec!["exhaust dev=0 size=268435456"; 40].join("; ") + "; checkpoint name=x";
    let mut a = gpu.workload(&plan);
    let mut b = gpu.workload(&plan);
    a.proceed();
    b.proceed();
    let (ta, tb) = (a.truth(), b.truth());
    let failures = ta.api("cuMemAlloc_v2").failed() + tb.api("cuMemAlloc_v2").failed();
    assert_eq!(failures, 80);
    let s = agent.wait_for("every failure counted", |s| {
        s.sum("llm_oom_events_total", &[("kind", "cuda")]) == 80.0
    });
    assert_eq!(
        s.sum("inferscope_forensics_suppressed_total", &[("kind", "cuda")]),
        78.0
    );
    let l = reports(&agent, 2);
    assert_eq!(l.len(), 2);
    let mut pids: Vec<u64> = l.iter().map(|r| r["pid"].as_u64().unwrap()).collect();
    pids.sort();
    let mut want = vec![u64::from(ta.pid), u64::from(tb.pid)];
    want.sort();
    assert_eq!(pids, want);
    a.proceed();
    b.proceed();
    assert!(a.wait().success() && b.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn a_gpu_process_that_dies_holding_memory_gets_a_crash_report() {
    let gpu = SimGpus::new(1, 1 << 30);
    let agent = start_agent(&gpu);
    let mut killed = gpu.workload("alloc dev=0 size=8388608 count=5; checkpoint name=held; kill");
    let mut failed =
        gpu.workload("alloc dev=0 size=4194304 count=2; checkpoint name=held; exit code=3");
    let mut clean = gpu.workload("alloc dev=0 size=4194304 count=1; checkpoint name=held");
    killed.proceed();
    failed.proceed();
    clean.proceed();
    let tk = killed.truth();
    let tf = failed.truth();
    clean.truth();
    agent.wait_for("the ledgers", |s| {
        s.sum("inferscope_tracked_processes", &[]) == 3.0
    });
    killed.proceed();
    failed.proceed();
    clean.proceed();
    assert!(!killed.wait().success());
    assert_eq!(failed.wait().code(), Some(3));
    assert!(clean.wait().success());
    let l = reports(&agent, 2);
    std::thread::sleep(Duration::from_millis(500));
    let l2 = list(&agent.dir.path().join("forensics"));
    assert_eq!(l2.len(), 2, "a clean exit makes no report: {l2:?}");
    let by_pid = |pid: u32| {
        l.iter()
            .find(|r| r["pid"] == pid)
            .unwrap_or_else(|| panic!("no report for {pid}: {l:?}"))
    };
    let dir = agent.dir.path().join("forensics");
    let k = show(&dir, by_pid(tk.pid)["id"].as_str().unwrap());
    assert_eq!(k["kind"], "gpu_process_crash");
    assert_eq!(k["exit"]["signal"], 9);
    assert_eq!(k["exit"]["signal_name"], "SIGKILL");
    assert_eq!(k["allocations"]["bytes"], 40 * MIB);
    assert_eq!(k["allocations"]["count"], 5);
    assert!(k["summary"]
        .as_str()
        .unwrap()
        .contains("was killed by SIGKILL holding GPU memory"));
    let f = show(&dir, by_pid(tf.pid)["id"].as_str().unwrap());
    assert_eq!(f["exit"]["exit_code"], 3);
    assert_eq!(f["exit"]["signal"], Value::Null);
    assert_eq!(f["allocations"]["bytes"], 8 * MIB);
    assert_eq!(
        agent
            .scrape()
            .sum("llm_oom_events_total", &[("kind", "gpu_process_crash")]),
        2.0
    );
    assert!(agent.stop().success());
}

/// A memory cgroup (v1) with a limit, removed on drop.
struct MemCgroup(std::path::PathBuf);

impl MemCgroup {
    fn new(limit: u64) -> MemCgroup {
        let root = Path::new("/sys/fs/cgroup/memory");
        let (base, limit_file) = if root.join("memory.limit_in_bytes").exists() {
            (root.to_path_buf(), "memory.limit_in_bytes")
        } else {
            (Path::new("/sys/fs/cgroup").to_path_buf(), "memory.max")
        };
        let dir = base.join(format!("inferscope-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a memory cgroup");
        std::fs::write(dir.join(limit_file), limit.to_string()).expect("set the limit");
        MemCgroup(dir)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[root_test]
fn a_host_oom_kill_is_reported_with_the_victim_and_its_cgroup() {
    let agent = Agent::start(&["--disable-probe", "cuda"]);
    let cg = MemCgroup::new(64 * MIB);
    // The child joins the cgroup, then allocates (and touches) memory until the kernel kills it.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec python3 -c 'a=[]\nwhile True: a.append(bytearray(8<<20))'",
        cg.0.display()
    );
    let mut child = Command::new("sh").args(["-c", &script]).spawn().unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "the OOM killer should have killed it"
    );
    let l = reports(&agent, 1);
    let r = l
        .iter()
        .find(|r| r["pid"] == pid)
        .unwrap_or_else(|| panic!("no report for {pid}: {l:?}"));
    assert_eq!(r["kind"], "host_oom_kill");
    assert_eq!(r["comm"], "python3");
    let full = show(
        &agent.dir.path().join("forensics"),
        r["id"].as_str().unwrap(),
    );
    let h = &full["host_oom"];
    let rss = h["anon_rss_bytes"].as_u64().unwrap();
    assert!(rss > 32 * MIB && rss <= 64 * MIB, "{h}");
    // The victim's cgroup is read from /proc as the event arrives; a victim already gone by
    // then, or exiting (v1 shows an exiting process in the root cgroup), has none, and then no
    // cgroup figures are claimed (never the root cgroup's).
    let cgroup = full["process"]["cgroup"].as_str().unwrap();
    if cgroup.is_empty() {
        assert_eq!(h["cgroup_limit_bytes"], Value::Null, "{h}");
    } else {
        assert!(cgroup.contains("inferscope-test-"), "{cgroup}");
        assert_eq!(h["cgroup_limit_bytes"], 64 * MIB, "{h}");
    }
    assert!(h["node_memory_total_bytes"].as_u64().unwrap() > 0);
    assert!(!h["largest_processes"].as_array().unwrap().is_empty());
    assert!(full["summary"]
        .as_str()
        .unwrap()
        .starts_with("the kernel OOM killer killed pid"));
    assert!(
        agent
            .scrape()
            .sum("llm_oom_events_total", &[("kind", "host_oom_kill")])
            >= 1.0
    );
    assert!(agent.stop().success());
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[root_test]
fn secrets_on_a_command_line_reach_no_report_output_or_log() {
    // Unique, so that no other text on the machine can contain them by chance.
    let nonce = format!(
        "{}{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let key = format!("sk-live-{nonce}");
    let token = format!("hf_tok{nonce}");
    let password = format!("pw{nonce}");
    let env_token = format!("hf_env{nonce}");
    let secrets = [&key, &token, &password, &env_token];
    let gpu = SimGpus::new(1, 1 << 30);
    let agent = start_agent(&gpu);
    let model = format!("https://user:{password}@hub.example/org/m");
    let hf_token = format!("--hf-token={token}");
    let env_line = format!("HF_TOKEN={env_token}");
    let mut w = gpu.workload_with(
        "alloc dev=0 size=1048576 count=2; exhaust dev=0 size=134217728; checkpoint name=oom",
        &["--model", &model, &hf_token, &env_line, "--api-key", &key],
        &[("HF_TOKEN", &env_token)],
    );
    w.proceed();
    let truth = w.truth();
    let l = reports(&agent, 1);
    assert_eq!(l[0]["pid"], truth.pid);
    let dir = agent.dir.path().join("forensics");
    let id = l[0]["id"].as_str().unwrap();
    let r = show(&dir, id);
    let cmdline = r["process"]["cmdline"].as_str().unwrap();
    assert!(
        cmdline.ends_with(
            "--model https://user:***@hub.example/org/m --hf-token=*** HF_TOKEN=*** --api-key ***"
        ),
        "{cmdline}"
    );
    let clean = |what: &str, text: &str| {
        for s in secrets {
            assert!(!text.contains(s.as_str()), "{what} holds {s}:\n{text}");
        }
    };
    // Every file the agent wrote, and its mode.
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    for f in &files {
        clean(
            &f.display().to_string(),
            &std::fs::read_to_string(f).unwrap(),
        );
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    assert_eq!(mode(&dir), 0o700);
    for format in ["text", "json", "html"] {
        let (ok, out, err) = cli(&dir, &["show", id, "--format", format]);
        assert!(ok, "{err}");
        clean(&format!("show --format {format}"), &(out + &err));
    }
    for format in ["text", "json"] {
        let (ok, out, err) = cli(&dir, &["list", "--format", format]);
        assert!(ok, "{err}");
        clean(&format!("list --format {format}"), &(out + &err));
    }
    w.proceed();
    assert!(w.wait().success());
    let log = agent.log();
    assert!(log.contains("forensic report written"), "{log}");
    assert!(agent.stop().success());
    clean("the agent's log", &log);
}

/// A tmpfs of `size` on `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "cannot mount a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    /// Fills it up: writes until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let chunk = [0u8; 4096];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[root_test]
fn a_full_disk_leaves_no_temporary_file_and_counts_the_failure() {
    let gpu = SimGpus::new(1, 1 << 30);
    let agent = start_agent(&gpu);
    let dir = agent.dir.path().join("forensics");
    let disk = Tmpfs::mount(&dir, "64k");
    disk.fill();
    let mut w = gpu.workload(
        "alloc dev=0 size=1048576 count=2; exhaust dev=0 size=134217728; checkpoint name=oom",
    );
    w.proceed();
    w.truth();
    let s = agent.wait_for("the failed write counted", |s| {
        s.sum("inferscope_forensics_errors_total", &[("kind", "write")]) == 1.0
    });
    assert_eq!(
        s.sum("inferscope_forensics_reports_total", &[("kind", "cuda")]),
        1.0
    );
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["filler"], "nothing but the filler is left");
    assert!(
        agent.log().contains("forensic report kept in memory only"),
        "{}",
        agent.log()
    );
    // Room again: the next report is written.
    std::fs::remove_file(dir.join("filler")).unwrap();
    let mut w2 = gpu.workload("exhaust dev=0 size=134217728; checkpoint name=oom");
    w2.proceed();
    let t2 = w2.truth();
    let l = reports(&agent, 1);
    assert_eq!(l[0]["pid"], t2.pid);
    w.proceed();
    w2.proceed();
    assert!(w.wait().success() && w2.wait().success());
    drop(disk);
    assert!(agent.stop().success());
}

#[test]
fn the_cli_skips_damaged_files_and_reports_an_unknown_id() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.json"), b"{\"schema_version\":1,").unwrap();
    let (ok, out, err) = cli(dir.path(), &["list"]);
    assert!(ok, "{err}");
    assert!(out.contains("no reports"), "{out}");
    assert!(err.contains("broken.json"), "{err}");
    let (ok, _, err) = cli(dir.path(), &["show", "nope"]);
    assert!(!ok && err.contains("no report with id nope"), "{err}");
}

#[test]
fn the_cli_prints_no_control_character_a_process_chose() {
    let dir = tempfile::tempdir().unwrap();
    // A process may name itself (prctl) and its arguments as it likes.
    let report = serde_json::json!({
        "schema_version": 1, "id": "20260101T000000000Z-cuda-7-1", "kind": "cuda",
        "time": "2026-01-01T00:00:00.000Z", "time_unix_ms": 1,
        "summary": "pid 7 (ev\u{1b}]0;pwned\u{7}il) failed\nfake: all good\u{202e}",
        "process": {"pid": 7, "comm": "ev\u{1b}[2Jil\u{9b}31m", "cmdline": "x\r\u{7f}y", "cgroup": ""},
        "gpu": null, "cuda": null, "exit": null, "host_oom": null, "xid": null,
        "allocations": null, "gpu_processes": [],
        "timeline": {"window_seconds": 0, "gpu": [], "processes": [], "failures": []},
        "suppressed_before": 0
    });
    std::fs::write(
        dir.path().join("20260101T000000000Z-cuda-7-1.json"),
        report.to_string(),
    )
    .unwrap();
    let raw = |c: char| c.is_control() && c != '\n' || c == '\u{202e}';
    for args in [
        &["list"][..],
        &["list", "--format", "json"],
        &["show", "20260101T000000000Z-cuda-7-1"],
        &["show", "20260101T000000000Z-cuda-7-1", "--format", "json"],
        &["show", "20260101T000000000Z-cuda-7-1", "--format", "html"],
    ] {
        let (ok, out, err) = cli(dir.path(), args);
        assert!(ok, "{args:?}: {err}");
        assert!(
            !out.chars().any(raw),
            "{args:?} printed a control character: {out:?}"
        );
        assert!(
            !out.lines().any(|l| l.starts_with("fake")),
            "{args:?}: {out}"
        );
    }
    let (_, out, _) = cli(dir.path(), &["show", "20260101T000000000Z-cuda-7-1"]);
    assert!(out.contains("ev\\x1b[2Jil\\u{9b}31m"), "{out}");
    let (_, out, _) = cli(
        dir.path(),
        &["show", "20260101T000000000Z-cuda-7-1", "--format", "json"],
    );
    let back: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(back["process"]["comm"], report["process"]["comm"]);
}

/// Renders the HTML report in headless Chromium: the browser's DOM must hold the chart, and
/// the screenshot must show it (the event marker's red and a series' colour are painted).
fn render_in_chromium(html: &str) {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    std::fs::write(&page, html).unwrap();
    if let Some(keep) = std::env::var_os("KEEP_REPORT_HTML") {
        std::fs::write(keep, html).unwrap();
    }
    let url = format!("file://{}", page.display());
    let chromium = |extra: &[&str]| {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium (Debian package `chromium`, installed by cargo xtask setup)")
    };
    let dom = chromium(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("<svg id=\"timeline\"") && dom.contains("<polyline"),
        "{dom}"
    );
    let png = dir.path().join("report.png");
    let shot = chromium(&[
        &format!("--screenshot={}", png.display()),
        "--window-size=1000,1200",
    ]);
    assert!(
        png.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let has = |rgb: [u8; 3]| {
        buf[..info.buffer_size()]
            .chunks(px)
            .any(|p| p[..3].iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 12))
    };
    let any = |f: &dyn Fn(i32, i32, i32) -> bool| {
        buf[..info.buffer_size()]
            .chunks(px)
            .any(|p| f(i32::from(p[0]), i32::from(p[1]), i32::from(p[2])))
    };
    assert!(has([0xd6, 0x27, 0x28]), "the event marker is not painted");
    // The first process series is blue (#1f77b4); antialiasing shifts exact values.
    assert!(
        any(&|r, g, b| b > 150 && b > r + 80 && b > g + 30),
        "the process series is not painted"
    );
}

#[root_test]
fn a_cuda_oom_report_shows_the_requests_in_flight_on_the_servers() {
    let server = OpenAiServer::start("busy");
    let gpu = SimGpus::new(1, 1 << 30);
    let port = server.port.to_string();
    let lib = Variant::Push.lib_path().display().to_string();
    let agent = gpu.agent(&["--cuda-lib", &lib, "--watch-port", &port], &[]);
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    // Three slow streamed requests stay in flight (100 tokens at 100 ms).
    let (conns, body) = server.slow_streams("busy", 3);
    agent.wait_for("the requests in flight", |s| {
        s.sum("llm_requests_in_flight", &[("model", "busy")]) == 3.0
    });
    // Let the once-a-second record see them, then run out of memory.
    std::thread::sleep(Duration::from_millis(1500));
    let mut w = gpu.workload("exhaust dev=0 size=268435456; checkpoint name=oom");
    w.proceed();
    w.truth();
    let l = reports(&agent, 1);
    let r = show(
        &agent.dir.path().join("forensics"),
        l[0]["id"].as_str().unwrap(),
    );
    let server_pid = server.child.id();
    let series = r["timeline"]["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["pid"] == server_pid)
        .unwrap_or_else(|| panic!("no request series for the server: {}", r["timeline"]));
    let last = series["points"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last[1], 3, "{series}");
    assert_eq!(
        last[2],
        3 * body.len() as u64,
        "request body bytes in flight: {series}"
    );
    let summary = r["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("3 requests in flight on pid {server_pid}")),
        "{summary}"
    );
    drop(conns);
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn a_cuda_oom_report_names_the_request_behind_it_and_those_that_failed_after() {
    let gpu = SimGpus::new(1, 1 << 30);
    let lib = Variant::Push.lib_path().display().to_string();
    // A FastAPI server holding 256 MiB of the 1 GiB GPU, as its weights.
    let server = OpenAiServer::start_with_env(
        "busy",
        &["--cuda-lib", &lib, "--cuda-mem", "268435456"],
        &str_pairs(&gpu.cuda_env()),
    );
    // The http ring read every 8 s: the request that arrives just before the failure is in
    // the report only because the report asks for the ring to be read (it waits 600 ms at
    // most), and so are those that failed in the window after it.
    let agent = gpu.agent(
        &["--cuda-lib", &lib, "--watch-port", &server.port.to_string()],
        &[
            ("INFERSCOPE_FORENSICS__AFTER_FAILURE_SECS", "3"),
            ("INFERSCOPE_PROBES__HTTP_POLL_INTERVAL_MS", "8000"),
        ],
    );
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    // Three streams (300 tokens at 100 ms), older than the trigger window (2 s) by the failure.
    let started = std::time::Instant::now();
    let (conns, _) = server.streams("busy", 3, 300, 100);
    agent.wait_for("the streams in flight", |s| {
        s.sum("llm_requests_in_flight", &[]) == 3.0
    });
    std::thread::sleep(Duration::from_millis(2500));
    // Then a large request whose handler asks for 2 GiB: the driver fails, the server answers
    // 500; then another request fails.
    let prompt = "word ".repeat(2000);
    let big = format!(
        r#"{{"model":"busy","max_tokens":512,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    let status = request(server.port, "x-cuda-alloc: 2147483648\r\n", &big);
    assert!(status.starts_with("HTTP/1.1 500"), "{status}");
    // Tokens the streams can have sent by the failure: one each 100 ms since they started.
    let most = started.elapsed().as_millis() as u64 / 100 + 1;
    let small = r#"{"model":"busy","max_tokens":4,"messages":[{"role":"user","content":"x"}]}"#;
    let status = request(server.port, "x-error: 500\r\n", small);
    assert!(status.starts_with("HTTP/1.1 500"), "{status}");

    let dir = agent.dir.path().join("forensics");
    let l = reports(&agent, 1);
    let id = l[0]["id"].as_str().unwrap().to_string();
    let r = show(&dir, &id);
    assert_eq!(r["process"]["pid"], server.pid());
    let q = &r["requests"];
    assert_eq!(q["servers"][0], server.pid(), "{q}");
    let rows = q["in_flight"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{q}");
    // The streams: oldest first, streaming for 25 tokens or more, not the trigger.
    for row in &rows[..3] {
        assert_eq!(row["state"], "streaming", "{row}");
        let tokens = row["tokens_so_far"].as_u64().unwrap();
        assert!(
            (most.saturating_sub(15)..=most).contains(&tokens),
            "{row}, at most {most}"
        );
        assert_eq!(row["likely_trigger"], false, "{row}");
        assert_eq!(row["max_tokens"], 300, "{row}");
        assert!(
            row["arrived_seconds_before"].as_f64().unwrap() > 2.0,
            "{row}"
        );
        // Their client is on this node: this test's process, outside any pod.
        assert_eq!(row["client_process"]["pid"], std::process::id(), "{row}");
        assert!(row["client_process"]["pod"].is_null(), "{row}");
    }
    // The large request: just arrived, no token yet, its size and limit, the trigger.
    let t = &rows[3];
    assert_eq!(t["likely_trigger"], true, "{t}");
    assert_eq!(t["state"], "waiting_first_token", "{t}");
    assert_eq!(t["prompt_bytes"], big.len() as u64, "{t}");
    assert_eq!(t["max_tokens"], 512, "{t}");
    assert!(t["arrived_seconds_before"].as_f64().unwrap() < 2.0, "{t}");
    assert!(
        t["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{t}"
    );
    assert!(
        t["trigger_reason"]
            .as_str()
            .unwrap()
            .contains("had no token yet"),
        "{t}"
    );
    assert!(
        r["summary"]
            .as_str()
            .unwrap()
            .contains("likely trigger: a busy request"),
        "{}",
        r["summary"]
    );
    // After the window (3 s), the report is rewritten with what failed in it: the large
    // request and the next one, both 500; the streams had not ended.
    let r = eventually(
        "the report completed after the window",
        Duration::from_secs(15),
        || {
            let r = show(&dir, &id);
            (r["requests"]["after_complete"] == true).then_some(r)
        },
    );
    let q = &r["requests"];
    let failed = q["failed_after"].as_array().unwrap();
    assert_eq!(failed.len(), 2, "{q}");
    assert!(failed.iter().all(|f| f["outcome"] == "HTTP 500"), "{q}");
    assert_eq!(failed[0]["prompt_bytes"], big.len() as u64, "{q}");
    assert_eq!(q["in_flight"][3]["outcome"], "HTTP 500", "{q}");
    assert_eq!(
        q["in_flight"][0]["outcome"], "not ended in the window",
        "{q}"
    );
    let s = agent.scrape();
    assert_eq!(
        s.sum("inferscope_forensics_requests_failed_after_total", &[]),
        2.0,
        "{}",
        s.text
    );
    let (ok, text, _) = cli(&dir, &["show", &id]);
    assert!(ok && text.contains("TRIGGER?"), "{text}");
    assert!(
        text.contains(&format!("(pid {} ", std::process::id())),
        "{text}"
    );
    let (ok, html, _) = cli(&dir, &["show", &id, "--format", "html"]);
    assert!(ok && html.contains("Requests at the failure"), "{html}");
    drop(conns);
    assert!(agent.stop().success());
}

#[root_test]
fn a_cuda_oom_in_python_reports_the_python_stack_of_the_failing_call() {
    let gpu = SimGpus::new(1, 1 << 30);
    let lib = Variant::Push.lib_path().display().to_string();
    let agent = gpu.agent(&["--cuda-lib", &lib], &[]);
    let mut w = NestedOom::start(&gpu, &lib, false);
    w.go();

    let dir = agent.dir.path().join("forensics");
    let l = reports(&agent, 1);
    let id = l[0]["id"].as_str().unwrap();
    let r = show(&dir, id);
    assert_eq!(r["process"]["pid"], w.child.id());
    let p = &r["python"];
    assert!(p["error"].is_null(), "{p}");
    assert!(p["read_ms_after_failure"].as_f64().unwrap() > 0.0, "{p}");
    // Its first call into the driver was the failing one: nothing was armed ahead, so the
    // stacks were read where the thread waited afterwards.
    assert_eq!(p["frozen"], false, "{p}");
    let frames = w.failing_frames(
        p,
        &["allocate_kv_cache", "build_engine", "serve", "<module>"],
    );
    // The innermost is the failed allocation's line, or the next one where the thread waits.
    assert!(
        [&w.lines["ALLOC"], &w.lines["HOLD"]].contains(&&frames[0]["line"]),
        "{p} {}",
        w.lines
    );
    // Beside the failing call's native stack in the HTML page, and in the text.
    let (ok, html, _) = cli(&dir, &["show", id, "--format", "html"]);
    assert!(
        ok && html.contains("Python stacks")
            && html.contains("allocate_kv_cache (")
            && html.contains("Python (the failing thread)"),
        "{html}"
    );
    let (ok, text, _) = cli(&dir, &["show", id]);
    assert!(
        ok && text.contains("python stacks, read") && text.contains("after the failure"),
        "{text}"
    );
    w.finish();
    assert!(agent.stop().success());
}

/// A Python process the agent already knows (it allocated before) is stopped at its
/// out-of-memory failure, as the call returns, and continued once its stacks are read: the
/// report has the stack of the failing call even though the thread handled the error and moved
/// on at once. It is armed again after `forensics.python_freeze_every_secs`.
#[root_test]
fn a_python_process_is_stopped_at_its_oom_so_the_stack_is_the_failing_one() {
    let gpu = SimGpus::new(1, 1 << 30);
    let lib = Variant::Push.lib_path().display().to_string();
    let agent = gpu.agent(
        &["--cuda-lib", &lib],
        &[("INFERSCOPE_FORENSICS__PYTHON_FREEZE_EVERY_SECS", "2")],
    );
    let mut w = NestedOom::start(&gpu, &lib, true);
    // Its warm-up allocation gave it a ledger; its interpreter is found and it is armed.
    agent.wait_for("the Python process to be armed", |s| {
        s.sum("inferscope_forensics_python_armed", &[]) == 1.0
    });
    w.go();

    let dir = agent.dir.path().join("forensics");
    let l = reports(&agent, 1);
    let r = show(&dir, l[0]["id"].as_str().unwrap());
    assert_eq!(r["process"]["pid"], w.child.id());
    let p = &r["python"];
    assert!(p["error"].is_null(), "{p}");
    assert_eq!(p["frozen"], true, "{p}");
    // Read while stopped at the failing call: its exact line, not recover() where the thread
    // went next.
    let frames = w.failing_frames(
        p,
        &["allocate_kv_cache", "build_engine", "serve", "<module>"],
    );
    assert_eq!(frames[0]["line"], w.lines["ALLOC"], "{p}");
    let s = agent.scrape();
    assert_eq!(
        s.sum(
            "inferscope_forensics_python_frozen_total",
            &[("how", "record")]
        ),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.sum(
            "inferscope_forensics_python_frozen_total",
            &[("how", "watchdog")]
        ),
        0.0
    );
    assert_eq!(
        s.sum("inferscope_forensics_python_stopped_seconds_count", &[]),
        1.0
    );
    let (ok, text, _) = cli(&dir, &["show", l[0]["id"].as_str().unwrap()]);
    assert!(ok && text.contains("read at the failing call"), "{text}");
    // Continued: it handled the error and says so from recover().
    assert_eq!(w.oom_line(), "oom 2", "CUDA_ERROR_OUT_OF_MEMORY expected");
    // Armed again once the interval has passed.
    agent.wait_for("the process to be armed again", |s| {
        s.sum("inferscope_forensics_python_armed", &[]) == 1.0
    });
    w.finish();
    agent.wait_for("the exited process to be disarmed", |s| {
        s.sum("inferscope_forensics_python_armed", &[]) == 0.0
    });
    assert!(agent.stop().success());
}

/// `tests/servers/nested_oom.py` on the CUDA double.
struct NestedOom {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    stdin: Option<std::process::ChildStdin>,
    lines: Value,
    move_on: bool,
}

impl NestedOom {
    fn start(gpu: &SimGpus, lib: &str, move_on: bool) -> Self {
        use std::io::BufRead;
        let mut cmd = Command::new("python3");
        cmd.arg(servers_dir().join("nested_oom.py"))
            .arg(lib)
            .arg((2u64 << 30).to_string());
        if move_on {
            cmd.arg("move-on");
        }
        let mut child = cmd
            .envs(gpu.cuda_env())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let lines: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line}"));
        let stdin = child.stdin.take();
        Self {
            child,
            out,
            stdin,
            lines,
            move_on,
        }
    }

    /// Makes the failing call; without `move-on`, waits for the workload to report it.
    fn go(&mut self) {
        use std::io::Write;
        self.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        if !self.move_on {
            assert_eq!(
                self.oom_line(),
                "oom 2",
                "CUDA_ERROR_OUT_OF_MEMORY expected"
            );
        }
    }

    fn oom_line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// The failing thread's frames, first in the report, innermost first: `names`, each in
    /// the workload's file, the callers at their calls' lines.
    fn failing_frames(&self, p: &Value, names: &[&str]) -> Vec<Value> {
        let t = &p["threads"][0];
        assert_eq!(t["failing"], true, "{p}");
        let frames = t["frames"].as_array().unwrap().clone();
        let seen: Vec<&str> = frames
            .iter()
            .map(|f| f["function"].as_str().unwrap())
            .collect();
        assert_eq!(seen, names, "{p}");
        assert!(
            frames
                .iter()
                .all(|f| f["file"].as_str().unwrap().ends_with("nested_oom.py")),
            "{p}"
        );
        assert_eq!(frames[1]["line"], self.lines["CALL_ALLOC"], "{p}");
        assert_eq!(frames[2]["line"], self.lines["CALL_BUILD"], "{p}");
        assert_eq!(frames[3]["line"], self.lines["CALL_SERVE"], "{p}");
        frames
    }

    fn finish(mut self) {
        drop(self.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}

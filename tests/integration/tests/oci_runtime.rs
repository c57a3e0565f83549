//! Root tier: the agent in a real OCI runtime (Debian's `runc`, containerd's default) with exactly the DaemonSet's
//! security context, read from the rendered chart (deploy/manifests/inferscope.yaml): its
//! capabilities and nothing else, no new privileges, the seccomp profile its init container
//! installs (itself run the same way, with no capability), a read-only root filesystem, the
//! host's pid namespace, its own network namespace, and the chart's mounts and config. The
//! root filesystem is assembled here from the agent's binary and the libraries it links (no
//! image can be pulled), as the distroless image holds them.
//!
//! Shown: it probes a CUDA workload on the host and serves what it saw; it ends on SIGTERM
//! leaving nothing loaded; with a capability taken away it says which, and what that costs.

use std::{
    io::Read,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration::*;
use serde_json::{json, Value};

/// The rendered chart: the DaemonSet's pod spec and the ConfigMap's config.toml.
struct Chart {
    pod: Value,
    config_toml: String,
    entrypoint: Vec<String>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Chart {
    fn load() -> Chart {
        let text = std::fs::read_to_string(repo().join("deploy/manifests/inferscope.yaml"))
            .expect("deploy/manifests/inferscope.yaml");
        let docs = yaml_docs(&text);
        let find = |kind: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind)
                .unwrap_or_else(|| panic!("no {kind} in the rendered chart"))
        };
        let pod = find("DaemonSet")["spec"]["template"]["spec"].clone();
        let config_toml = find("ConfigMap")["data"]["config.toml"]
            .as_str()
            .expect("config.toml")
            .to_string();
        // The image's entrypoint, from its recipe: what a container without `command` runs.
        let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
        let entrypoint = dockerfile
            .lines()
            .find_map(|l| l.strip_prefix("ENTRYPOINT "))
            .expect("ENTRYPOINT in deploy/Dockerfile");
        let entrypoint = serde_json::from_str(entrypoint).expect("ENTRYPOINT as a JSON array");
        Chart {
            pod,
            config_toml,
            entrypoint,
        }
    }

    fn container(&self, list: &str, name: &str) -> Value {
        self.pod[list]
            .as_array()
            .unwrap_or_else(|| panic!("no {list}"))
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {list} {name}"))
            .clone()
    }

    fn volume(&self, name: &str) -> &Value {
        self.pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    }
}

/// Where each of the pod's volumes comes from on this machine: the node's own paths for
/// /proc, /sys and cgroups; directories of the test for the kubelet's, the driver's (the NVML
/// double) and the pod's own volumes.
struct Node {
    dir: tempfile::TempDir,
    nvml_dir: PathBuf,
}

impl Node {
    fn new() -> Node {
        let nvml_dir = Variant::Push
            .lib_path()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("nvml");
        assert!(nvml_dir.join("libnvidia-ml.so.1").exists(), "{nvml_dir:?}");
        Node {
            dir: tempfile::tempdir().unwrap(),
            nvml_dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// The host path behind a volume, and whether it is a fresh tmpfs.
    fn source(&self, chart: &Chart, volume: &str) -> PathBuf {
        let v = chart.volume(volume);
        if let Some(host) = v["hostPath"]["path"].as_str() {
            return match host {
                "/proc" | "/sys/kernel/btf" | "/sys/kernel/tracing" | "/sys/fs/cgroup" => {
                    PathBuf::from(host)
                }
                h if h.ends_with("/seccomp") => self.path("kubelet/seccomp"),
                h if h.contains("pod-resources") => self.path("kubelet/pod-resources"),
                h if h.starts_with("/var/lib/inferscope") => self.path("forensics"),
                h if h.contains("nvidia") || h.contains("-linux-gnu") => self.nvml_dir.clone(),
                other => panic!("volume {volume}: hostPath {other} has no stand-in here"),
            };
        }
        if v.get("configMap").is_some() {
            let dir = self.path("config");
            std::fs::write(dir.join("config.toml"), &chart.config_toml).unwrap();
            return dir;
        }
        if v.get("emptyDir").is_some() {
            return self.path(&format!("empty/{volume}"));
        }
        panic!("volume {volume}: {v}")
    }
}

/// A root filesystem like the image's: the binary at /inferscope, the libraries it and the
/// NVML library link, the mount points, and nothing else (no shell).
fn rootfs(dir: &Path, nvml_dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    let agent = bin("inferscope");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(&agent, root.join("inferscope")).unwrap();
    for object in [agent.as_path(), &nvml_dir.join("libnvidia-ml.so.1")] {
        let out = Command::new("ldd").arg(object).output().expect("ldd");
        for lib in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        {
            let to = root.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(lib, &to).unwrap();
        }
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\n",
    )
    .unwrap();
    root
}

/// One container of the pod as an OCI runtime configuration.
fn oci_config(
    chart: &Chart,
    container: &Value,
    node: &Node,
    root: &Path,
    capabilities: &[String],
) -> Value {
    let sc = &container["securityContext"];
    assert_eq!(
        sc["privileged"], false,
        "the chart runs the agent unprivileged"
    );
    assert_eq!(sc["runAsUser"], 0);
    let caps: Vec<String> = capabilities.iter().map(|c| format!("CAP_{c}")).collect();
    let mut args: Vec<String> = match container["command"].as_array() {
        Some(c) => c.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
        None => chart.entrypoint.clone(),
    };
    args.extend(
        container["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().unwrap().to_string()),
    );
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap();
        let value = match e["value"].as_str() {
            Some(v) => v.to_string(),
            // The downward API: the node's and pod's names.
            None => format!("test-{}", name.to_lowercase()),
        };
        env.push(format!("{name}={value}"));
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap();
        let dest = m["mountPath"].as_str().unwrap();
        let mut options = vec!["rbind", "rprivate"];
        if m["readOnly"] == true {
            options.push("ro");
        }
        mounts.push(json!({
            "destination": dest,
            "type": "bind",
            "source": node.source(chart, name),
            "options": options,
        }));
    }
    let mut namespaces = vec![
        json!({"type": "mount"}),
        json!({"type": "network"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "cgroup"}),
    ];
    if chart.pod["hostPID"] != true {
        namespaces.push(json!({"type": "pid"}));
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    });
    match sc["seccompProfile"]["type"].as_str() {
        Some("Localhost") => {
            let file = node
                .path("kubelet/seccomp")
                .join(sc["seccompProfile"]["localhostProfile"].as_str().unwrap());
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
                panic!("{}: {e} (the init container installs it)", file.display())
            });
            linux["seccomp"] = serde_json::from_str(&text).expect("profile JSON");
        }
        // The runtime's own default: runc has none of its own; the chart gives the init
        // container this one only.
        Some("RuntimeDefault") => {}
        other => panic!("seccompProfile {other:?}: the chart ships Localhost"),
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": sc["runAsUser"], "gid": 0},
            "args": args,
            "env": env,
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "noNewPrivileges": sc["allowPrivilegeEscalation"] == false,
        },
        "root": {"path": root, "readonly": sc["readOnlyRootFilesystem"] == true},
        "hostname": "inferscope-test",
        "mounts": mounts,
        "linux": linux,
    })
}

/// The capabilities a container spec adds (having dropped all).
fn added_capabilities(container: &Value) -> Vec<String> {
    let c = &container["securityContext"]["capabilities"];
    assert_eq!(c["drop"], json!(["ALL"]));
    c["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// A container run by runc, killed and deleted when dropped.
struct Container {
    id: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Container {
    fn start(config: &Value, bundle: &Path, name: &str) -> Container {
        std::fs::create_dir_all(bundle).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(config).unwrap(),
        )
        .unwrap();
        let id = format!("inferscope-test-{name}-{}", std::process::id());
        let log = bundle.join("output.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("runc")
            .args(["run", "--no-pivot", "--bundle"])
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("runc (run `cargo xtask setup`)");
        Container {
            id,
            child: Some(child),
            log,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The container's first process, once runc has started it.
    fn pid(&mut self) -> u32 {
        let start = Instant::now();
        loop {
            let out = Command::new("runc")
                .args(["state", &self.id])
                .output()
                .unwrap();
            if let Ok(state) = serde_json::from_slice::<Value>(&out.stdout) {
                if state["status"] == "running" {
                    return state["pid"].as_u64().unwrap() as u32;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("container ended ({status}):\n{}", self.output());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the container to end; its exit code.
    fn wait(&mut self, bound: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > bound {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("runc")
            .args(["kill", &self.id, signal])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.signal("KILL");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
    }
}

/// An HTTP GET from inside the network namespace of `pid` (the pod's: the agent listens
/// there, not on the host).
fn get_in_netns(pid: u32, port: u16, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
        // SAFETY: setns on this thread alone, with a namespace descriptor that stays open for
        // the call; the thread ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        http_get(port, &path)
    })
    .join()
    .unwrap()
}

/// The pod: the init container installs the profile, then the agent's container starts.
struct Pod {
    chart: Chart,
    /// The pod's directories, kept until the pod ends.
    node: Node,
    port: u16,
    agent: Container,
}

impl Pod {
    fn start(capabilities: impl FnOnce(Vec<String>) -> Vec<String>) -> Pod {
        let chart = Chart::load();
        let node = Node::new();
        let root = rootfs(node.dir.path(), &node.nvml_dir);
        let init = chart.container("initContainers", "seccomp-profile");
        let caps = &init["securityContext"]["capabilities"];
        assert_eq!(caps["drop"], json!(["ALL"]));
        assert!(
            caps["add"].is_null(),
            "the init container holds no capability"
        );
        let mut installer = Container::start(
            &oci_config(&chart, &init, &node, &root, &[]),
            &node.dir.path().join("bundle-init"),
            "init",
        );
        assert_eq!(
            installer.wait(Duration::from_secs(30)),
            Some(0),
            "init container:\n{}",
            installer.output()
        );
        let container = chart.container("containers", "agent");
        let caps = grantable(capabilities(added_capabilities(&container)));
        let port = container["ports"][0]["containerPort"].as_u64().unwrap() as u16;
        let agent = Container::start(
            &oci_config(&chart, &container, &node, &root, &caps),
            &node.dir.path().join("bundle-agent"),
            "agent",
        );
        Pod {
            chart,
            node,
            port,
            agent,
        }
    }

    fn get(&mut self, path: &str) -> Option<(u16, String)> {
        let pid = self.agent.pid();
        get_in_netns(pid, self.port, path)
    }

    fn wait_ready(&mut self) -> String {
        let start = Instant::now();
        loop {
            if let Some((200, body)) = self.get("/healthz") {
                return body;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "agent not ready:\n{}",
                self.agent.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn scrape(&mut self) -> Scrape {
        let (status, text) = self.get("/metrics").expect("/metrics");
        assert_eq!(status, 200, "{text}");
        Scrape::parse(&text)
    }
}

/// Of `caps`, those this test's own process holds (a runtime cannot grant more). Some
/// machines' root lacks `CAP_SYS_RESOURCE`, which the agent needs only on kernels before 5.11
/// (RLIMIT_MEMLOCK); any other shortfall fails the test.
fn grantable(caps: Vec<String>) -> Vec<String> {
    let held = u64::from_str_radix(&status_line(std::process::id(), "CapEff"), 16).unwrap();
    let (granted, missing): (Vec<String>, Vec<String>) = caps
        .into_iter()
        .partition(|c| held & capability_mask(std::slice::from_ref(c)) != 0);
    assert!(
        missing.iter().all(|c| c == "SYS_RESOURCE"),
        "this process lacks {missing:?}: the container cannot hold the chart's capabilities"
    );
    if !missing.is_empty() {
        eprintln!("this machine's root lacks {missing:?}: the container runs without");
    }
    granted
}

/// The forensic report of `pid`, from the pod's forensics volume, once written; it must be
/// private to root (0600).
fn report_of(pod: &Pod, pid: u32) -> Value {
    use std::os::unix::fs::PermissionsExt;
    let dir = pod.node.dir.path().join("forensics");
    let start = Instant::now();
    loop {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(report) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if report["process"]["pid"] == pid {
                let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", path.display());
                return report;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no report of {pid} in {}:\n{}",
            dir.display(),
            pod.agent.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The process's line of `/proc/<pid>/status` named `key`.
fn status_line(pid: u32, key: &str) -> String {
    let mut text = String::new();
    std::fs::File::open(format!("/proc/{pid}/status"))
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key} not in status"))
        .trim()
        .to_string()
}

fn capability_mask(names: &[String]) -> u64 {
    names.iter().fold(0, |m, n| m | 1u64 << capability_bit(n))
}

#[root_test]
fn the_charts_security_context_probes_a_cuda_workload_and_ends_clean() {
    ensure_host_tracefs();
    let mut pod = Pod::start(|caps| caps);
    let health = pod.wait_ready();
    assert_eq!(health, "ok\n", "every family runs:\n{}", pod.agent.output());

    // It runs as the chart says: the profile's filter, no new privileges, exactly the
    // chart's capabilities, in the host's pid namespace.
    let pid = pod.agent.pid();
    assert_eq!(status_line(pid, "Seccomp"), "2", "filter mode");
    assert_eq!(status_line(pid, "NoNewPrivs"), "1");
    let caps = grantable(added_capabilities(
        &pod.chart.container("containers", "agent"),
    ));
    let want = format!("{:016x}", capability_mask(&caps));
    assert_eq!(status_line(pid, "CapEff"), want);
    assert_eq!(status_line(pid, "CapBnd"), want);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(
        comm.trim(),
        "inferscope",
        "the container's process is the agent"
    );

    // A CUDA process on the host, found by discovery alone (the chart names no library),
    // that runs its GPU out of memory: the agent writes a forensic report, its stacks
    // symbolized through the process's own files.
    let mut w = Workload::start(
        "alloc dev=0 size=1048576 count=3; free count=1; exhaust dev=0 size=268435456; \
         checkpoint name=held",
        &WorkloadOptions::default(),
    );
    let start = Instant::now();
    while pod.scrape().sum("inferscope_cuda_libraries", &[]) < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the workload's driver was never probed:\n{}",
            pod.agent.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    w.proceed();
    let truth = w.truth();
    let start = Instant::now();
    loop {
        let s = pod.scrape();
        match mismatch(&s, &truth) {
            None => break,
            Some(m) if start.elapsed() > Duration::from_secs(30) => {
                panic!("{m}\n{}\nagent:\n{}", s.text, pod.agent.output())
            }
            Some(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let report = report_of(&pod, truth.pid);
    assert_eq!(report["cuda"]["error"], "out_of_memory", "{report}");
    assert_eq!(report["process"]["comm"], "cuda-workload");
    let stack: Vec<&str> = report["cuda"]["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect();
    assert!(
        stack.iter().any(|f| f.contains("Workload")),
        "symbolized inside the container: {stack:?}"
    );
    let s = pod.scrape();
    for family in ["cuda", "sched", "oom", "http"] {
        assert_eq!(
            s.sum("inferscope_probe_family_up", &[("family", family)]),
            1.0,
            "{family}"
        );
    }

    // SIGTERM, as the kubelet sends it: the agent ends within the pod's grace period (past
    // it the kubelet kills) and leaves nothing loaded.
    let programs = program_ids(pid);
    let grace = pod.chart.pod["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    pod.agent.signal("TERM");
    let code = pod.agent.wait(Duration::from_secs(grace));
    assert_eq!(code, Some(0), "{}", pod.agent.output());
    assert_no_probe_programs(&programs);
    w.proceed();
    assert!(w.wait().success());
}

#[root_test]
fn without_sys_ptrace_the_agent_says_what_it_cannot_see() {
    ensure_host_tracefs();
    let mut pod = Pod::start(|caps| caps.into_iter().filter(|c| c != "SYS_PTRACE").collect());
    let health = pod.wait_ready();
    let line = health
        .lines()
        .find(|l| l.starts_with("degraded: cuda ("))
        .unwrap_or_else(|| panic!("no degraded cuda line:\n{health}"));
    assert!(line.contains("no CAP_SYS_PTRACE"), "{line}");
    let log = pod.agent.output();
    assert_eq!(
        log.matches("no CAP_SYS_PTRACE").count(),
        1,
        "said once in the log:\n{log}"
    );
    assert!(log.contains("WARN"), "{log}");
}

#[root_test]
fn without_cap_bpf_nor_sys_admin_the_agent_refuses_in_one_line() {
    ensure_host_tracefs();
    let mut pod = Pod::start(|caps| {
        caps.into_iter()
            .filter(|c| c != "BPF" && c != "SYS_ADMIN")
            .collect()
    });
    let code = pod.agent.wait(Duration::from_secs(30));
    let out = pod.agent.output();
    assert_eq!(code, Some(1), "{out}");
    let last = out.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "inferscope: cannot load eBPF programs: the agent holds neither CAP_BPF nor \
         CAP_SYS_ADMIN (add the BPF capability to its container, see docs/install.md)",
        "{out}"
    );
}

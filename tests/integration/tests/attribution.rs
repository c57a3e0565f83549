//! Root tier: attribution on real cgroups. The test creates kubepods-style cgroups (v1 with the
//! cgroupfs driver's layout, v2 with the systemd driver's), moves workloads into them, serves
//! the kubelet's pod-resources API (gRPC on a unix socket, from the published proto) and a
//! stand-in of the API server's pod list/watch, and checks that the agent's per-process
//! series name their namespace, pod and container, that GPU assignments are exported, and
//! that everything about a pod goes when the pod does. Outside Kubernetes the same series
//! keep their process labels only and the log says so once.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Query, State},
    http::HeaderMap,
    response::IntoResponse,
    routing::get,
    Router,
};
use integration::*;
use serde_json::Value;
use tokio_stream::StreamExt;

mod podresources {
    #![allow(clippy::all)]
    tonic::include_proto!("v1");
}

use podresources::{
    pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer},
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};

const MIB: u64 = 1 << 20;
const NODE: &str = "node-under-test";
const TOKEN: &str = "service-account-token-for-the-test";
const GPU0: &str = "GPU-00000000-1111-2222-3333-444444444400";
const MIG: &str = "MIG-5c6d7e8f-0000-1111-2222-333344445555";

// ------------------------------------------------------------------ cgroups

/// A cgroup the test created (with the parents it had to create), removed on drop after its
/// processes are moved back to the hierarchy's root; so a failing test leaves nothing behind.
struct Cgroup {
    root: PathBuf,
    created: Vec<PathBuf>,
    leaf: PathBuf,
}

impl Cgroup {
    fn create(root: &Path, rel: &str) -> Cgroup {
        let mut created = Vec::new();
        let mut dir = root.to_path_buf();
        for part in rel.split('/') {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
                created.push(dir.clone());
            }
        }
        Cgroup {
            root: root.to_path_buf(),
            created,
            leaf: dir,
        }
    }

    fn procs(&self) -> PathBuf {
        self.leaf.join("cgroup.procs")
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.procs(), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", self.leaf.display()));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            for _ in 0..100 {
                let pids = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in pids.lines() {
                    let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
                }
                // Shared parents (`kubepods`) stay while another test's cgroups are in them.
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => break,
                }
            }
        }
    }
}

/// Mount points of the cgroup v1 memory hierarchy and of the unified (v2) hierarchy.
fn hierarchies() -> Option<(PathBuf, PathBuf)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let (mut v1, mut v2) = (None, None);
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        match f[2] {
            "cgroup" if f[3].split(',').any(|o| o == "memory") => v1 = Some(PathBuf::from(f[1])),
            "cgroup2" => v2 = Some(PathBuf::from(f[1])),
            _ => {}
        }
    }
    Some((v1?, v2?))
}

/// A unique pod UID and container id for this run.
fn ids(tag: u32) -> (String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let pid = std::process::id();
    let uid = format!(
        "{pid:08x}-{tag:04x}-4000-8000-{:012x}",
        nanos & 0xffff_ffff_ffff
    );
    let cid = format!("{pid:08x}{tag:08x}{nanos:016x}").repeat(2);
    (uid, cid)
}

// ------------------------------------------------------------------ the kubelet's socket

#[derive(Clone, Default)]
struct Kubelet {
    pods: Arc<Mutex<Vec<PodResources>>>,
}

#[tonic::async_trait]
impl PodResourcesLister for Kubelet {
    async fn list(
        &self,
        _: tonic::Request<ListPodResourcesRequest>,
    ) -> Result<tonic::Response<ListPodResourcesResponse>, tonic::Status> {
        let pod_resources = self.pods.lock().unwrap().clone();
        Ok(tonic::Response::new(ListPodResourcesResponse {
            pod_resources,
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _: tonic::Request<AllocatableResourcesRequest>,
    ) -> Result<tonic::Response<AllocatableResourcesResponse>, tonic::Status> {
        Ok(tonic::Response::new(AllocatableResourcesResponse::default()))
    }

    async fn get(
        &self,
        req: tonic::Request<GetPodResourcesRequest>,
    ) -> Result<tonic::Response<GetPodResourcesResponse>, tonic::Status> {
        let r = req.into_inner();
        let pod = self
            .pods
            .lock()
            .unwrap()
            .iter()
            .find(|p| p.name == r.pod_name && p.namespace == r.pod_namespace)
            .cloned()
            .ok_or_else(|| tonic::Status::not_found("no such pod"))?;
        Ok(tonic::Response::new(GetPodResourcesResponse {
            pod_resources: Some(pod),
        }))
    }
}

fn pod_resources(
    ns: &str,
    pod: &str,
    container: &str,
    resource: &str,
    ids: &[&str],
) -> PodResources {
    PodResources {
        name: pod.into(),
        namespace: ns.into(),
        containers: vec![ContainerResources {
            name: container.into(),
            devices: vec![ContainerDevices {
                resource_name: resource.into(),
                device_ids: ids.iter().map(|s| s.to_string()).collect(),
                topology: None,
            }],
            ..Default::default()
        }],
    }
}

// ------------------------------------------------------------------ the API server's pods

/// The pods of the API server stand-in, its watchers, and what its clients sent.
#[derive(Clone)]
struct ApiServer {
    pods: Arc<Mutex<(u64, Vec<serde_json::Value>)>>,
    events: tokio::sync::broadcast::Sender<String>,
    /// (Authorization header, fieldSelector, is a watch) of every request.
    seen: Arc<Mutex<Vec<(String, String, bool)>>>,
}

fn pod_json(
    ns: &str,
    name: &str,
    uid: &str,
    container: &str,
    id: &str,
    rv: u64,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": rv.to_string(),
                     "labels": {"app": name}},
        "spec": {"nodeName": NODE, "containers": [{"name": container, "image": "x"}]},
        "status": {"phase": "Running", "containerStatuses": [
            {"name": "istio-proxy", "containerID": format!("containerd://{}", "e".repeat(64))},
            {"name": container, "containerID": id}]}
    })
}

impl ApiServer {
    fn new() -> ApiServer {
        ApiServer {
            pods: Arc::default(),
            events: tokio::sync::broadcast::channel(64).0,
            seen: Arc::default(),
        }
    }

    /// Adds or removes a pod the way the real one does: a new resourceVersion, a watch event.
    fn change(&self, kind: &str, pod: impl FnOnce(u64) -> serde_json::Value) {
        let mut state = self.pods.lock().unwrap();
        state.0 += 1;
        let pod = pod(state.0);
        let uid = pod["metadata"]["uid"].clone();
        state.1.retain(|p| p["metadata"]["uid"] != uid);
        if kind != "DELETED" {
            state.1.push(pod.clone());
        }
        let event = serde_json::json!({"type": kind, "object": pod});
        let _ = self.events.send(format!("{event}\n"));
    }

    fn requests(&self, watch: bool) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.2 == watch)
            .count()
    }

    /// Ends the watches the way the real one does when their resourceVersion is too old.
    fn expire(&self) {
        let gone = serde_json::json!({"type": "ERROR", "object":
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410}});
        let _ = self.events.send(format!("{gone}\n"));
    }
}

async fn pods(
    State(api): State<ApiServer>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let selector = q.get("fieldSelector").cloned().unwrap_or_default();
    let watch = q.get("watch").is_some_and(|w| w == "1" || w == "true");
    // Subscribed before the request is counted: a counted watch gets every later event.
    let rx = api.events.subscribe();
    api.seen.lock().unwrap().push((auth, selector, watch));
    if watch {
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(|r| r.ok())
            .map(Ok::<_, Infallible>);
        return Body::from_stream(stream).into_response();
    }
    let state = api.pods.lock().unwrap();
    let list = serde_json::json!({
        "kind": "PodList", "apiVersion": "v1",
        "metadata": {"resourceVersion": state.0.to_string()},
        "items": state.1,
    });
    list.to_string().into_response()
}

/// Runs the gRPC and HTTP stand-ins on their own runtime for the test's duration.
struct Stands {
    _rt: tokio::runtime::Runtime,
    api_addr: SocketAddr,
}

fn start_stands(kubelet: Kubelet, socket: &Path, api: ApiServer) -> Stands {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let api_addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/api/v1/pods", get(pods))
        .with_state(api);
    rt.spawn(async move { axum::serve(listener, app).await });
    let uds = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(socket).unwrap()
    };
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(kubelet))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(uds)),
    );
    Stands { _rt: rt, api_addr }
}

// ------------------------------------------------------------------ helpers

/// The label sets of `name`'s series for `pid`.
fn series_of(s: &Scrape, name: &str, pid: u32) -> Vec<HashMap<String, String>> {
    let pid = pid.to_string();
    s.series
        .get(name)
        .into_iter()
        .flatten()
        .map(|(labels, _)| labels.iter().cloned().collect::<HashMap<_, _>>())
        .filter(|l| l.get("pid") == Some(&pid))
        .collect()
}

/// Every series of `pid` in `name` carries exactly these workload labels (absent = None).
fn workload_is(s: &Scrape, name: &str, pid: u32, want: [Option<&str>; 4]) -> bool {
    let series = series_of(s, name, pid);
    !series.is_empty()
        && series.iter().all(|l| {
            ["node", "namespace", "pod", "container"]
                .iter()
                .zip(want)
                .all(|(k, v)| l.get(*k).map(String::as_str) == v)
        })
}

/// Warning and error lines of the log about attribution's sources.
fn attribution_complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .filter(|l| {
            ["pod", "API server", "attribution", "kubelet"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect()
}

/// One simulated GPU of 8 GiB, GPU0, shared by the workloads and the agent.
fn sim_gpu() -> SimGpus {
    let gpu = SimGpus::new(1, 8 << 30);
    gpu.control.set("driver_version", "550.54.15").unwrap();
    gpu.control.set_gpu(0, "uuid", GPU0).unwrap();
    gpu
}

fn start_agent(gpu: &SimGpus, extra_env: &[(&str, String)]) -> Agent {
    let cuda = Variant::Push.lib_path().display().to_string();
    let env: Vec<(&str, &str)> = extra_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    gpu.agent(&["--cuda-lib", &cuda], &env)
}

/// The TGI stand-in, placed in `cgroup` before it runs (so discovery finds it there).
struct Tgi(Child);

/// `cmd` run in `cgroup` from its first instruction.
fn spawn_in(cgroup: &Cgroup, mut cmd: Command) -> Child {
    let procs = std::ffi::CString::new(cgroup.procs().display().to_string()).unwrap();
    // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("{:?}: {e}", cmd.get_program()))
}

impl Tgi {
    fn start_in(cgroup: &Cgroup) -> Tgi {
        let port = free_port();
        let mut cmd = Command::new(bin("text-generation-router"));
        cmd.args(["--port", &port.to_string(), "--model-id", "org/llm-7b"])
            .args(["--revision", "r2024", "--num-shard", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_in(cgroup, cmd);
        eventually("the TGI stand-in", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Tgi(child)
    }
}

impl Drop for Tgi {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ------------------------------------------------------------------ tests

#[root_test]
fn pods_name_the_series_of_their_processes_until_they_go() {
    let Some((v1, v2)) = hierarchies() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "attribution test needs a cgroup v1 memory hierarchy and a cgroup v2 hierarchy"
        );
        eprintln!("skipping: no cgroup v1 memory hierarchy beside a cgroup v2 one");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (uid_a, cid_a) = ids(1);
    let (uid_b, cid_b) = ids(2);

    // Pod A (cgroup v1, cgroupfs driver, containerd) is there from the start; pod B (cgroup
    // v2, systemd driver, CRI-O) appears in the API server only through the watch.
    let api = ApiServer::new();
    api.change("ADDED", |rv| {
        pod_json(
            "team-a",
            "llm-a",
            &uid_a,
            "server",
            &format!("containerd://{cid_a}"),
            rv,
        )
    });
    let kubelet = Kubelet::default();
    *kubelet.pods.lock().unwrap() = vec![
        pod_resources("team-a", "llm-a", "server", "nvidia.com/gpu", &[GPU0]),
        pod_resources("team-b", "llm-b", "vllm", "nvidia.com/mig-1g.10gb", &[MIG]),
    ];
    let socket = dir.path().join("kubelet.sock");
    let stands = start_stands(kubelet.clone(), &socket, api.clone());
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();

    let gpu = sim_gpu();
    let agent = start_agent(
        &gpu,
        &[
            (
                "INFERSCOPE_ATTRIBUTION__API_SERVER__URL",
                format!("http://{}", stands.api_addr),
            ),
            (
                "INFERSCOPE_ATTRIBUTION__API_SERVER__TOKEN_PATH",
                token.display().to_string(),
            ),
            (
                "INFERSCOPE_ATTRIBUTION__POD_RESOURCES_SOCKET",
                socket.display().to_string(),
            ),
            (
                "INFERSCOPE_ATTRIBUTION__POD_RESOURCES_INTERVAL_SECS",
                "1".into(),
            ),
            ("INFERSCOPE_ATTRIBUTION__NODE_NAME", NODE.into()),
            // Long enough that only the watch can bring pod B and take pod A away.
            ("INFERSCOPE_ATTRIBUTION__RESYNC_SECS", "3600".into()),
        ],
    );
    eventually("the agent's pod watch", Duration::from_secs(15), || {
        (api.requests(true) > 0).then_some(())
    });
    {
        let seen = api.seen.lock().unwrap();
        assert!(
            seen.iter()
                .all(|(auth, selector, _)| auth == &format!("Bearer {TOKEN}")
                    && selector == &format!("spec.nodeName={NODE}")),
            "requests without the token or the node's field selector: {seen:?}"
        );
    }

    let cg_a = Cgroup::create(&v1, &format!("kubepods/burstable/pod{uid_a}/{cid_a}"));
    let cg_b = Cgroup::create(
        &v2,
        &format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{cid_b}.scope",
            uid_b.replace('-', "_")
        ),
    );
    let plan = "alloc dev=0 size=1048576 count=3; checkpoint name=held";
    let mut wa = gpu.workload(plan);
    let mut wb = gpu.workload(plan);
    cg_a.add(wa.pid);
    cg_b.add(wb.pid);
    let tgi = Tgi::start_in(&cg_a);
    let tgi_pid = tgi.0.id();
    wa.proceed();
    wb.proceed();
    let (ta, tb) = (wa.truth(), wb.truth());
    let a_labels = [Some(NODE), Some("team-a"), Some("llm-a"), Some("server")];
    let s = agent.wait_for("pod A's processes and GPU named", |s| {
        workload_is(s, "gpu_process_memory_allocated_bytes", ta.pid, a_labels)
            && workload_is(s, "gpu_process_allocations", ta.pid, a_labels)
            && workload_is(s, "gpu_process_memory_used_bytes", ta.pid, a_labels)
            && workload_is(s, "gpu_process_memory_overhead_bytes", ta.pid, a_labels)
            && s.has(
                "inferscope_pod_gpu_assigned",
                &[
                    ("namespace", "team-a"),
                    ("pod", "llm-a"),
                    ("container", "server"),
                    ("gpu_uuid", GPU0),
                ],
            )
            && workload_is(s, "llm_server_info", tgi_pid, a_labels)
    });
    assert_eq!(
        s.sum(
            "gpu_process_memory_allocated_bytes",
            &[("pid", &ta.pid.to_string())]
        ),
        (3 * MIB) as f64,
        "one series per process and GPU, with the ledger's bytes"
    );
    assert!(s.has(
        "llm_server_info",
        &[
            ("pid", &tgi_pid.to_string()),
            ("server", "tgi"),
            ("model", "org/llm-7b"),
            ("model_version", "r2024"),
            ("tensor_parallelism", "2")
        ]
    ));
    assert!(s.has(
        "inferscope_pod_gpu_assigned",
        &[
            ("namespace", "team-b"),
            ("pod", "llm-b"),
            ("container", "vllm"),
            ("gpu_uuid", MIG)
        ]
    ));
    // Pod B is not known to the API server yet: its process has the node only (the kubelet's
    // GPU for it is a MIG device NVML does not show, and GPU0 is pod A's, a pod of another UID).
    agent.wait_for("pod B's process with the node only", |s| {
        workload_is(
            s,
            "gpu_process_memory_allocated_bytes",
            tb.pid,
            [Some(NODE), None, None, None],
        ) && workload_is(
            s,
            "gpu_process_memory_used_bytes",
            tb.pid,
            [Some(NODE), None, None, None],
        )
    });

    // The watch expires (410 Gone): the agent lists again and watches on, without complaint.
    let (lists, watches) = (api.requests(false), api.requests(true));
    api.expire();
    eventually(
        "a new list and watch after 410 Gone",
        Duration::from_secs(15),
        || (api.requests(false) > lists && api.requests(true) > watches).then_some(()),
    );

    // Pod B arrives through the watch: the process's series move to its names, none stay behind.
    api.change("ADDED", |rv| {
        pod_json(
            "team-b",
            "llm-b",
            &uid_b,
            "vllm",
            &format!("cri-o://{cid_b}"),
            rv,
        )
    });
    let b_labels = [Some(NODE), Some("team-b"), Some("llm-b"), Some("vllm")];
    let s = agent.wait_for("pod B's process named", |s| {
        workload_is(s, "gpu_process_memory_allocated_bytes", tb.pid, b_labels)
            && workload_is(s, "gpu_process_memory_used_bytes", tb.pid, b_labels)
    });
    assert_eq!(
        s.sum(
            "gpu_process_memory_allocated_bytes",
            &[("pid", &tb.pid.to_string())]
        ),
        (3 * MIB) as f64
    );

    // Pod A goes: its processes end, its cgroups go, the kubelet and the API server forget it.
    drop(tgi);
    wa.proceed();
    assert!(wa.wait().success());
    drop(cg_a);
    kubelet.pods.lock().unwrap().retain(|p| p.name != "llm-a");
    api.change("DELETED", |rv| {
        pod_json(
            "team-a",
            "llm-a",
            &uid_a,
            "server",
            &format!("containerd://{cid_a}"),
            rv,
        )
    });
    let s = agent.wait_for("everything about pod A gone", |s| {
        !s.text.contains("pod=\"llm-a\"")
    });
    assert!(workload_is(
        &s,
        "gpu_process_memory_allocated_bytes",
        tb.pid,
        b_labels
    ));
    assert!(!v1.join(format!("kubepods/burstable/pod{uid_a}")).exists());

    wb.proceed();
    assert!(wb.wait().success());
    drop(cg_b);
    let log = agent.log();
    assert!(
        attribution_complaints(&log).is_empty(),
        "attribution warnings in a healthy run:\n{log}"
    );
    assert!(agent.stop().success());
}

/// A CUDA out-of-memory report names the pod, namespace and container of the failing server
/// (what `kubectl` needs to find it), and those of a streaming client in another pod on this
/// node (cgroup v2, systemd driver, CRI-O).
#[root_test]
fn an_oom_report_names_the_pod_of_its_server_and_of_a_client_on_this_node() {
    use integration::reports::{reports, request, show};
    let Some((_, v2)) = hierarchies() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "attribution test needs a cgroup v1 memory hierarchy and a cgroup v2 hierarchy"
        );
        eprintln!("skipping: no cgroup v1 memory hierarchy beside a cgroup v2 one");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (uid, cid) = ids(3);
    let (server_uid, server_cid) = ids(4);
    let api = ApiServer::new();
    api.change("ADDED", |rv| {
        pod_json(
            "llm",
            "server-0",
            &server_uid,
            "server",
            &format!("cri-o://{server_cid}"),
            rv,
        )
    });
    api.change("ADDED", |rv| {
        pod_json(
            "clients",
            "loadgen",
            &uid,
            "client",
            &format!("cri-o://{cid}"),
            rv,
        )
    });
    let socket = dir.path().join("kubelet.sock");
    let stands = start_stands(Kubelet::default(), &socket, api.clone());
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();

    let gpu = SimGpus::new(1, 1 << 30);
    let lib = Variant::Push.lib_path().display().to_string();
    let server = OpenAiServer::start_with_env(
        "busy",
        &["--cuda-lib", &lib, "--cuda-mem", "268435456"],
        &str_pairs(&gpu.cuda_env()),
    );
    // In its pod before the agent starts.
    let server_cg = Cgroup::create(
        &v2,
        &format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{server_cid}.scope",
            server_uid.replace('-', "_")
        ),
    );
    server_cg.add(server.pid());
    let port = server.port.to_string();
    let api_url = format!("http://{}", stands.api_addr);
    let token_path = token.display().to_string();
    let socket_path = socket.display().to_string();
    let agent = gpu.agent(
        &["--cuda-lib", &lib, "--watch-port", &port],
        &[
            ("INFERSCOPE_ATTRIBUTION__API_SERVER__URL", api_url.as_str()),
            (
                "INFERSCOPE_ATTRIBUTION__API_SERVER__TOKEN_PATH",
                token_path.as_str(),
            ),
            (
                "INFERSCOPE_ATTRIBUTION__POD_RESOURCES_SOCKET",
                socket_path.as_str(),
            ),
            ("INFERSCOPE_ATTRIBUTION__NODE_NAME", NODE),
        ],
    );
    agent.wait_for("the server to be watched", |s| {
        s.sum("inferscope_http_watched_processes", &[]) >= 1.0
    });
    eventually("the agent's pod watch", Duration::from_secs(15), || {
        (api.requests(true) > 0).then_some(())
    });

    // The client: a stream of 100 tokens at 100 ms, read to its end, from inside the pod.
    let cg = Cgroup::create(
        &v2,
        &format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{cid}.scope",
            uid.replace('-', "_")
        ),
    );
    let script = r#"
import socket, sys
body = b'{"model":"busy","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"x"}]}'
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-token-ms: 100\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
while c.recv(65536):
    pass
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script, &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut client = spawn_in(&cg, cmd);
    agent.wait_for("the client's stream in flight", |s| {
        s.sum("llm_requests_in_flight", &[]) == 1.0
    });
    // A few tokens into it.
    std::thread::sleep(Duration::from_millis(600));
    let big = r#"{"model":"busy","max_tokens":8,"messages":[{"role":"user","content":"x"}]}"#;
    let status = request(server.port, "x-cuda-alloc: 2147483648\r\n", big);
    assert!(status.starts_with("HTTP/1.1 500"), "{status}");

    let dir = agent.dir.path().join("forensics");
    let l = reports(&agent, 1);
    let r = show(&dir, l[0]["id"].as_str().unwrap());
    let p = &r["process"];
    assert_eq!(p["pid"], server.pid());
    assert_eq!(
        (&p["namespace"], &p["pod"], &p["container"]),
        (
            &Value::from("llm"),
            &Value::from("server-0"),
            &Value::from("server")
        ),
        "{p}"
    );
    let rows = r["requests"]["in_flight"].as_array().unwrap().clone();
    let row = rows
        .iter()
        .find(|row| row["client_process"]["pid"] == client.id())
        .unwrap_or_else(|| panic!("no row names the client {}: {rows:?}", client.id()));
    let c = &row["client_process"];
    assert_eq!(
        (&c["namespace"], &c["pod"], &c["container"], &c["comm"]),
        (
            &Value::from("clients"),
            &Value::from("loadgen"),
            &Value::from("client"),
            &Value::from("python3")
        ),
        "{row}"
    );
    assert_eq!(row["state"], "streaming", "{row}");
    let (ok, text, _) = integration::reports::cli(&dir, &["show", l[0]["id"].as_str().unwrap()]);
    assert!(
        ok && text.contains("pod      llm/server-0 container server"),
        "{text}"
    );
    let _ = client.kill();
    let _ = client.wait();
    drop(server);
    drop(cg);
    drop(server_cg);
    assert!(agent.stop().success());
}

#[root_test]
fn without_the_api_server_pod_resources_names_a_pod_process_by_its_gpu() {
    let Some((_, v2)) = hierarchies() else {
        assert!(std::env::var_os("CI").is_none(), "no cgroup v2 hierarchy");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (uid, cid) = ids(3);
    let kubelet = Kubelet::default();
    // Two containers with a GPU each: the process is on GPU0 (NVML), so it is llm-c's.
    *kubelet.pods.lock().unwrap() = vec![
        pod_resources("team-c", "llm-c", "server", "nvidia.com/gpu", &[GPU0]),
        pod_resources(
            "team-d",
            "llm-d",
            "server",
            "nvidia.com/gpu",
            &["GPU-not-this-one"],
        ),
    ];
    let socket = dir.path().join("kubelet.sock");
    let _stands = start_stands(kubelet, &socket, ApiServer::new());
    let gpu = sim_gpu();
    let agent = start_agent(
        &gpu,
        &[
            (
                "INFERSCOPE_ATTRIBUTION__POD_RESOURCES_SOCKET",
                socket.display().to_string(),
            ),
            (
                "INFERSCOPE_ATTRIBUTION__POD_RESOURCES_INTERVAL_SECS",
                "1".into(),
            ),
            ("INFERSCOPE_ATTRIBUTION__NODE_NAME", NODE.into()),
        ],
    );
    let cg = Cgroup::create(
        &v2,
        &format!(
            "kubepods.slice/kubepods-pod{}.slice/cri-containerd-{cid}.scope",
            uid.replace('-', "_")
        ),
    );
    let mut w = gpu.workload("alloc dev=0 size=1048576 count=1; checkpoint name=held");
    cg.add(w.pid);
    w.proceed();
    let t = w.truth();
    let want = [Some(NODE), Some("team-c"), Some("llm-c"), Some("server")];
    agent.wait_for("the process named by its GPU", |s| {
        workload_is(s, "gpu_process_memory_allocated_bytes", t.pid, want)
            && workload_is(s, "gpu_process_memory_used_bytes", t.pid, want)
    });
    w.proceed();
    assert!(w.wait().success());
    drop(cg);
    let log = agent.log();
    assert!(!log.contains("not in Kubernetes"), "{log}");
    assert!(attribution_complaints(&log).is_empty(), "{log}");
    assert!(agent.stop().success());
}

#[root_test]
fn outside_kubernetes_series_keep_process_labels_and_the_log_says_so_once() {
    let gpu = sim_gpu();
    let dir = tempfile::tempdir().unwrap();
    // Nothing of Kubernetes here: no API server in config or environment, no kubelet socket.
    let agent = start_agent(
        &gpu,
        &[(
            "INFERSCOPE_ATTRIBUTION__POD_RESOURCES_SOCKET",
            dir.path().join("absent.sock").display().to_string(),
        )],
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let node = [Some(host.trim()), None, None, None];
    let mut w = gpu.workload("alloc dev=0 size=1048576 count=2; checkpoint name=held");
    w.proceed();
    let t = w.truth();
    let s = agent.wait_for("the workload's series", |s| {
        workload_is(s, "gpu_process_memory_allocated_bytes", t.pid, node)
            && workload_is(s, "gpu_process_memory_used_bytes", t.pid, node)
    });
    assert_eq!(
        s.sum(
            "gpu_process_memory_allocated_bytes",
            &[("pid", &t.pid.to_string())]
        ),
        (2 * MIB) as f64
    );
    assert!(!s.series.contains_key("inferscope_pod_gpu_assigned"));
    // Several refresh rounds later, the one line is still the only one.
    let samples = s.sum("inferscope_nvml_samples_total", &[]);
    agent.wait_for("a few more NVML rounds", |s| {
        s.sum("inferscope_nvml_samples_total", &[]) >= samples + 30.0
    });
    let log = agent.log();
    assert_eq!(
        log.matches("not in Kubernetes").count(),
        1,
        "expected one line saying attribution is off:\n{log}"
    );
    assert!(
        attribution_complaints(&log).is_empty(),
        "attribution warnings outside Kubernetes:\n{log}"
    );
    w.proceed();
    assert!(w.wait().success());
    assert!(agent.stop().success());
}

#[root_test]
fn unreachable_sources_are_logged_once_and_counted() {
    let gpu = sim_gpu();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on the port; the "socket" is a plain file.
    let closed = free_port();
    let socket = dir.path().join("kubelet.sock");
    std::fs::write(&socket, "not a socket").unwrap();
    let agent = start_agent(
        &gpu,
        &[
            (
                "INFERSCOPE_ATTRIBUTION__API_SERVER__URL",
                format!("http://127.0.0.1:{closed}"),
            ),
            (
                "INFERSCOPE_ATTRIBUTION__POD_RESOURCES_SOCKET",
                socket.display().to_string(),
            ),
            (
                "INFERSCOPE_ATTRIBUTION__POD_RESOURCES_INTERVAL_SECS",
                "1".into(),
            ),
        ],
    );
    let s = agent.wait_for("several failures of each source", |s| {
        s.sum(
            "inferscope_attribution_errors_total",
            &[("source", "kube_apiserver")],
        ) >= 3.0
            && s.sum(
                "inferscope_attribution_errors_total",
                &[("source", "pod_resources")],
            ) >= 3.0
    });
    for source in ["kube_apiserver", "pod_resources"] {
        assert_eq!(
            s.sum("inferscope_source_up", &[("source", source)]),
            0.0,
            "{source}"
        );
    }
    let log = agent.log();
    assert_eq!(log.matches("cannot list/watch pods").count(), 1, "{log}");
    assert_eq!(log.matches("pod-resources List failed").count(), 1, "{log}");
    assert!(!log.contains("not in Kubernetes"), "{log}");
    assert!(agent.stop().success());
}

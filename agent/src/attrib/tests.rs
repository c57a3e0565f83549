use super::*;

const UID: &str = "11111111-2222-3333-4444-555555555555";

fn cid(c: char) -> String {
    c.to_string().repeat(64)
}

/// A proc tree with `pid` in the systemd-driver cgroup of pod `UID`, container `cid('a')`.
fn proc_tree(pids: &[(u32, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (pid, cgroup) in pids {
        let p = dir.path().join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("cgroup"), cgroup).unwrap();
    }
    dir
}

fn pod_cgroup(container: &str) -> String {
    format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container}.scope\n",
        UID.replace('-', "_")
    )
}

fn attributor(dir: &tempfile::TempDir, max_label_len: usize, max_processes: usize) -> Attributor {
    let config = AttributionConfig {
        max_label_len,
        max_pods: 2,
        ..Default::default()
    };
    Attributor::new(
        "node-1".into(),
        &config,
        max_processes,
        ProcFs::new(dir.path()),
        super::metrics::AttribMetrics::new(&Arc::new(Metrics::new())),
    )
}

fn pod(name: &str) -> Pod {
    Pod {
        namespace: "inference".into(),
        name: name.into(),
        containers: vec![(cid('a'), "server".into()), (cid('b'), "sidecar".into())],
    }
}

#[test]
fn a_process_gets_its_pod_container_and_gpus() {
    let dir = proc_tree(&[(10, pod_cgroup(&cid('a'))), (11, "0::/user.slice\n".into())]);
    let a = attributor(&dir, 128, 100);
    a.pods().upsert(UID.into(), pod("llm-0"));
    a.set_assignments(Assignments::from([(
        ("inference".into(), "llm-0".into(), "server".into()),
        vec!["GPU-1".into(), "MIG-2".into()],
    )]));
    let id = a.lookup(10);
    assert_eq!(
        id.labels,
        WorkloadLabels {
            node: "node-1".into(),
            namespace: "inference".into(),
            pod: "llm-0".into(),
            container: "server".into(),
        }
    );
    assert_eq!(id.pod_uid.as_deref(), Some(UID));
    assert_eq!(id.container_id, Some(cid('a')));
    assert_eq!(id.gpus, vec!["GPU-1", "MIG-2"]);
    // Not in a pod, and gone: the node only.
    for pid in [11, 12] {
        let id = a.lookup(pid);
        assert_eq!(id.labels.node, "node-1");
        assert_eq!((id.labels.pod.as_str(), id.pod_uid.as_deref()), ("", None));
    }
}

#[test]
fn long_values_are_cut_on_a_character_boundary() {
    let dir = proc_tree(&[(10, pod_cgroup(&cid('a')))]);
    let a = attributor(&dir, 5, 100);
    a.pods().upsert(
        UID.into(),
        Pod {
            namespace: "namespace".into(),
            name: "pödname".into(),
            containers: vec![(cid('a'), "container".into())],
        },
    );
    let l = a.labels(10);
    assert_eq!(
        (l.namespace.as_str(), l.pod.as_str(), l.container.as_str()),
        ("names", "pödn", "conta")
    );
    assert_eq!(l.node, "node-");
    assert_eq!(truncate("ab", 10), "ab");
}

#[test]
fn the_cache_follows_pods_and_processes_on_refresh() {
    let dir = proc_tree(&[(10, pod_cgroup(&cid('b'))), (20, pod_cgroup(&cid('a')))]);
    let a = attributor(&dir, 128, 1);
    // Pod not known yet: node only, cached.
    assert_eq!(a.labels(10).pod, "");
    // Listed since: resolved at once, not at the next refresh.
    a.pods().upsert(UID.into(), pod("llm-0"));
    assert_eq!(a.labels(10).container, "sidecar");
    assert_eq!(lock(&a.cache)[&10].labels.pod, "llm-0");
    a.refresh();
    assert_eq!(a.labels(10).container, "sidecar");
    // Over the process limit: resolved, not cached, counted.
    assert_eq!(a.labels(20).container, "server");
    assert!(a
        .metrics
        .core
        .encode()
        .contains("inferscope_attribution_dropped_total{reason=\"process_limit\"} 1"));
    // The pod goes: names go at the next refresh; the process goes: its entry goes.
    a.pods().delete(UID);
    a.refresh();
    assert_eq!(a.labels(10).pod, "");
    std::fs::remove_dir_all(dir.path().join("10")).unwrap();
    a.refresh();
    assert!(lock(&a.cache).is_empty());
}

#[test]
fn the_pod_store_is_bounded() {
    let dir = proc_tree(&[]);
    let a = attributor(&dir, 128, 100);
    let store = a.pods();
    store.replace(HashMap::from([
        ("u1".to_string(), pod("a")),
        ("u2".to_string(), pod("b")),
        ("u3".to_string(), pod("c")),
    ]));
    assert_eq!(store.len(), 2);
    store.upsert("u4".into(), pod("d"));
    assert_eq!(store.len(), 2);
    let text = a.metrics.core.encode();
    assert!(
        text.contains("inferscope_attribution_dropped_total{reason=\"pod_limit\"} 2"),
        "{text}"
    );
    assert!(text.contains("inferscope_attribution_pods 2"), "{text}");
}

#[test]
fn series_about_workloads_follow_their_sources() {
    let dir = proc_tree(&[(10, pod_cgroup(&cid('a')))]);
    let a = attributor(&dir, 128, 100);
    a.pods().upsert(UID.into(), pod("llm-0"));
    let key = |c: &str| ("inference".to_string(), "llm-0".to_string(), c.to_string());
    a.set_assignments(Assignments::from([(key("server"), vec!["GPU-1".into()])]));
    a.set_servers(&HashMap::from([(
        10,
        Server {
            kind: "vllm",
            model: Some("llama".into()),
            model_version: Some("rev1".into()),
            tensor_parallelism: Some(2),
            ..Default::default()
        },
    )]));
    let text = a.metrics.core.encode();
    for line in [
        "inferscope_pod_gpu_assigned{namespace=\"inference\",pod=\"llm-0\",container=\"server\",gpu_uuid=\"GPU-1\"} 1",
        "llm_server_info{pid=\"10\",server=\"vllm\",model=\"llama\",model_version=\"rev1\",tensor_parallelism=\"2\",gpu=\"\",gpu_type=\"\",node=\"node-1\",namespace=\"inference\",pod=\"llm-0\",container=\"server\"} 1",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    a.set_assignments(Assignments::from([(key("sidecar"), vec!["GPU-2".into()])]));
    a.set_servers(&HashMap::new());
    let text = a.metrics.core.encode();
    assert!(!text.contains("GPU-1"), "{text}");
    assert!(
        text.contains("container=\"sidecar\",gpu_uuid=\"GPU-2\"} 1"),
        "{text}"
    );
    assert!(!text.contains("llm_server_info{"), "{text}");
}

#[test]
fn node_name_precedence() {
    assert_eq!(node_name(Some("cfg"), Some("env".into())), "cfg");
    assert_eq!(node_name(None, Some("env".into())), "env");
    let host = node_name(None, Some(String::new()));
    assert_eq!(
        host,
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim()
    );
}

#[test]
fn without_the_api_server_a_pod_process_is_named_by_its_gpus() {
    use crate::gpu::{GpuProcess, GpuProcesses};
    let dir = proc_tree(&[(10, pod_cgroup(&cid('a'))), (11, "0::/user.slice\n".into())]);
    let a = attributor(&dir, 128, 100);
    a.set_gpu_uuids([(0, "GPU-0".to_string()), (1, "GPU-1".to_string())]);
    let key = |p: &str, c: &str| ("ml".to_string(), p.to_string(), c.to_string());
    let mut assigned = Assignments::from([
        (key("p1", "c1"), vec!["GPU-0".to_string()]),
        (
            key("p2", "c2"),
            vec!["GPU-1".to_string(), "GPU-2".to_string()],
        ),
    ]);
    a.set_assignments(assigned.clone());
    let on = |pid, gpu| GpuProcess {
        pid,
        gpu,
        used_bytes: Some(1),
        sm_util: None,
    };
    a.note_gpu_processes(&GpuProcesses {
        ts_ns: 0,
        entries: vec![on(10, 1), on(11, 0)],
    });
    let id = a.lookup(10);
    assert_eq!(
        (
            id.labels.namespace.as_str(),
            id.labels.pod.as_str(),
            id.labels.container.as_str()
        ),
        ("ml", "p2", "c2")
    );
    assert_eq!(id.gpus, vec!["GPU-1", "GPU-2"]);
    assert_eq!(a.labels(11).pod, "", "not in a pod: never matched by GPU");
    // A pod the API server knows under another UID is not this process's.
    a.pods().upsert(
        "99999999-2222-3333-4444-555555555555".into(),
        Pod {
            namespace: "ml".into(),
            name: "p2".into(),
            containers: Vec::new(),
        },
    );
    a.refresh();
    assert_eq!(a.labels(10).pod, "");
    a.pods().delete("99999999-2222-3333-4444-555555555555");
    a.refresh();
    assert_eq!(a.labels(10).pod, "p2");
    // A shared GPU matches two containers: no names rather than a guess.
    assigned.insert(key("p3", "c3"), vec!["GPU-1".to_string()]);
    a.set_assignments(assigned);
    a.refresh();
    assert_eq!(a.labels(10).pod, "");
    // The API server's word wins over the GPU match.
    a.pods().upsert(UID.into(), pod("llm-0"));
    a.refresh();
    assert_eq!(a.labels(10).pod, "llm-0");
}

#[test]
fn a_server_uses_its_assigned_gpus_else_those_of_its_descendants() {
    use crate::gpu::{GpuProcess, GpuProcesses};
    // 10: the API server (in the pod); 20: its engine (a child, comm with a space and a
    // parenthesis); 30: a tensor-parallel worker below the engine; 40: someone else's.
    let dir = proc_tree(&[
        (10, "0::/user.slice\n".into()),
        (20, "0::/user.slice\n".into()),
        (30, "0::/user.slice\n".into()),
        (40, "0::/user.slice\n".into()),
    ]);
    for (pid, comm, ppid) in [
        (10, "vllm", 1),
        (20, "VLLM::Engine) x", 10),
        (30, "worker", 20),
        (40, "python3", 1),
    ] {
        let stat = crate::proc::fixture::stat(pid, comm, ppid, 0);
        std::fs::write(dir.path().join(pid.to_string()).join("stat"), stat).unwrap();
    }
    let a = attributor(&dir, 128, 100);
    a.set_gpu_uuids([
        (0, "GPU-0".to_string()),
        (1, "GPU-1".to_string()),
        (2, "GPU-2".to_string()),
    ]);
    let on = |pid, gpu| GpuProcess {
        pid,
        gpu,
        used_bytes: Some(1),
        sm_util: None,
    };
    assert!(a.server_gpus(10).is_empty(), "no GPU use seen yet");
    a.note_gpu_processes(&GpuProcesses {
        ts_ns: 0,
        entries: vec![on(30, 1), on(20, 0), on(40, 2), on(20, 1)],
    });
    assert_eq!(
        a.server_gpus(10),
        vec![0, 1],
        "engine and worker, not pid 40"
    );
    assert_eq!(a.server_gpus(40), vec![2]);
    // llm_server_info names them, with their type, as soon as NVML shows them.
    let gpu = |i: u32, t: &str| crate::gpu::metrics::GpuLabels {
        gpu: i,
        gpu_uuid: format!("GPU-{i}"),
        gpu_type: t.into(),
    };
    a.set_gpus(&[
        gpu(0, "NVIDIA H100"),
        gpu(1, "NVIDIA H100"),
        gpu(2, "NVIDIA L4"),
    ]);
    a.set_servers(&HashMap::from([(10, Server::default())]));
    let text = a.metrics.core.encode();
    assert!(
        text.contains("gpu=\"0,1\",gpu_type=\"NVIDIA H100\""),
        "{text}"
    );
    a.note_gpu_processes(&GpuProcesses {
        ts_ns: 1,
        entries: vec![on(30, 1), on(20, 2)],
    });
    let text = a.metrics.core.encode();
    assert!(
        text.contains("gpu=\"1,2\",gpu_type=\"NVIDIA H100,NVIDIA L4\""),
        "{text}"
    );
    assert!(
        !text.contains("gpu=\"0,1\""),
        "the old series is gone\n{text}"
    );

    // In a pod, the kubelet's assignment is the answer (NVML names the UUIDs).
    let dir = proc_tree(&[(10, pod_cgroup(&cid('a')))]);
    let a = attributor(&dir, 128, 100);
    a.set_gpu_uuids([(0, "GPU-0".to_string()), (3, "GPU-3".to_string())]);
    a.pods().upsert(UID.into(), pod("llm-0"));
    a.set_assignments(Assignments::from([(
        ("inference".into(), "llm-0".into(), "server".into()),
        vec!["GPU-3".into(), "GPU-0".into()],
    )]));
    assert_eq!(a.server_gpus(10), vec![0, 3]);
}

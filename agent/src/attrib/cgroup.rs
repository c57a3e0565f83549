//! Where a process runs, from its cgroup path: the container id and, under Kubernetes, the pod
//! UID and QoS class. Both cgroup drivers (cgroupfs, systemd), both cgroup versions, and the
//! runtimes' naming (containerd, CRI-O, Docker) are read the same way: the path is split into
//! segments and each segment is matched on its own, so nesting (kind or k3s inside Docker)
//! does not matter.

use crate::proc::ProcessCGroup;

/// The Kubernetes QoS class, from the cgroup level the pod sits under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// What a cgroup path says about the process in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// The path the identity was read from.
    pub path: String,
    /// The pod UID with dashes (`0f1e…-…`), under `kubepods`.
    pub pod_uid: Option<String>,
    /// The container id (64 hex digits), without runtime prefix.
    pub container_id: Option<String>,
    /// `containerd`, `cri-o` or `docker` where the path names the runtime.
    pub runtime: Option<&'static str>,
    pub qos: Option<Qos>,
}

impl CgroupIdentity {
    fn is_container(&self) -> bool {
        self.pod_uid.is_some() || self.container_id.is_some()
    }
}

/// Reads `/proc/<pid>/cgroup`: the first hierarchy whose path names a pod or a container,
/// the unified (v2) one first, then the v1 controllers in file order; a process in no
/// container gets the unified path (else the first one) and no ids.
pub fn from_cgroups(groups: &[ProcessCGroup]) -> CgroupIdentity {
    let v2 = groups.iter().rfind(|g| g.controllers.is_empty());
    let v1 = groups.iter().filter(|g| !g.controllers.is_empty());
    let mut fallback = None;
    for g in v2.into_iter().chain(v1) {
        let id = from_path(&g.pathname);
        if id.is_container() {
            return id;
        }
        fallback.get_or_insert(id);
    }
    fallback.unwrap_or_default()
}

/// Reads one cgroup path.
pub fn from_path(path: &str) -> CgroupIdentity {
    let mut id = CgroupIdentity {
        path: path.to_string(),
        ..Default::default()
    };
    let mut under_kubepods = false;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if let Some(rest) = seg.strip_prefix("kubepods") {
            under_kubepods = true;
            // systemd: kubepods.slice, kubepods-burstable.slice,
            // kubepods-burstable-pod<uid_with_underscores>.slice
            let rest = rest.strip_suffix(".slice").unwrap_or(rest);
            let (qos, pod) = match rest.find("pod") {
                Some(i) => (&rest[..i], Some(&rest[i + 3..])),
                None => (rest, None),
            };
            if let Some(q) = qos_of(qos.trim_matches('-')) {
                id.qos = Some(q);
            }
            if let Some(uid) = pod.and_then(pod_uid) {
                id.pod_uid = Some(uid);
                id.qos.get_or_insert(Qos::Guaranteed);
            }
            continue;
        }
        if under_kubepods {
            // cgroupfs: /kubepods/burstable/pod<uid>/<container>
            if let Some(q) = qos_of(seg) {
                id.qos = Some(q);
                continue;
            }
            if let Some(uid) = seg.strip_prefix("pod").and_then(pod_uid) {
                id.pod_uid = Some(uid);
                id.qos.get_or_insert(Qos::Guaranteed);
                continue;
            }
        }
        if let Some((runtime, cid)) = container_segment(seg) {
            id.container_id = Some(cid.to_string());
            id.runtime = runtime.or(id.runtime);
        } else if seg == "docker" {
            id.runtime = Some("docker");
        }
    }
    id
}

fn qos_of(s: &str) -> Option<Qos> {
    match s {
        "burstable" => Some(Qos::Burstable),
        "besteffort" => Some(Qos::BestEffort),
        _ => None,
    }
}

/// A pod UID as the kubelet writes it in cgroup names: with dashes (cgroupfs) or underscores
/// (systemd, where a dash separates slice levels).
fn pod_uid(raw: &str) -> Option<String> {
    let uid = raw.replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    ok.then_some(uid)
}

/// A container's own cgroup: `cri-containerd-<id>.scope`, `crio-<id>.scope`, `crio-<id>`,
/// `docker-<id>.scope`, or the bare `<id>` (cgroupfs driver, Docker's `/docker/<id>`).
fn container_segment(seg: &str) -> Option<(Option<&'static str>, &str)> {
    let seg = seg.strip_suffix(".scope").unwrap_or(seg);
    let (runtime, id) = if let Some(id) = seg.strip_prefix("cri-containerd-") {
        (Some("containerd"), id)
    } else if let Some(id) = seg.strip_prefix("crio-") {
        (Some("cri-o"), id)
    } else if let Some(id) = seg.strip_prefix("docker-") {
        (Some("docker"), id)
    } else {
        (None, seg)
    };
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some((runtime, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> CgroupIdentity {
        from_cgroups(&crate::proc::parse_cgroups(text))
    }

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const UID_: &str = "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0";

    fn cid() -> String {
        "ab12".repeat(16)
    }

    fn check(path: &str, uid: Option<&str>, runtime: Option<&str>, qos: Option<Qos>) {
        let id = from_path(path);
        assert_eq!(id.pod_uid.as_deref(), uid, "{path}");
        assert_eq!(id.container_id, Some(cid()), "{path}");
        assert_eq!(id.runtime, runtime, "{path}");
        assert_eq!(id.qos, qos, "{path}");
    }

    #[test]
    fn cgroupfs_driver() {
        let c = cid();
        check(
            &format!("/kubepods/burstable/pod{UID}/{c}"),
            Some(UID),
            None,
            Some(Qos::Burstable),
        );
        check(
            &format!("/kubepods/besteffort/pod{UID}/{c}"),
            Some(UID),
            None,
            Some(Qos::BestEffort),
        );
        check(
            &format!("/kubepods/pod{UID}/{c}"),
            Some(UID),
            None,
            Some(Qos::Guaranteed),
        );
        check(
            &format!("/kubepods/burstable/pod{UID}/crio-{c}"),
            Some(UID),
            Some("cri-o"),
            Some(Qos::Burstable),
        );
    }

    #[test]
    fn systemd_driver() {
        let c = cid();
        check(
            &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{c}.scope"),
            Some(UID),
            Some("containerd"),
            Some(Qos::Burstable),
        );
        check(
            &format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{c}.scope"),
            Some(UID),
            Some("cri-o"),
            Some(Qos::BestEffort),
        );
        check(
            &format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{c}.scope"),
            Some(UID),
            Some("docker"),
            Some(Qos::Guaranteed),
        );
    }

    #[test]
    fn docker_outside_kubernetes_and_nesting() {
        let c = cid();
        check(&format!("/docker/{c}"), None, Some("docker"), None);
        check(
            &format!("/system.slice/docker-{c}.scope"),
            None,
            Some("docker"),
            None,
        );
        // kind: a node container whose kubelet uses cgroupfs inside it.
        let host = "ff".repeat(32);
        check(
            &format!("/docker/{host}/kubepods/burstable/pod{UID}/{c}"),
            Some(UID),
            Some("docker"),
            Some(Qos::Burstable),
        );
    }

    #[test]
    fn not_a_container() {
        for path in [
            "/",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods/podnope/x",
            "",
        ] {
            let id = from_path(path);
            assert_eq!((id.pod_uid, id.container_id), (None, None), "{path}");
        }
        // The pod's own cgroup (a process in the pause sandbox parent): the pod, no container.
        let id = from_path(&format!("/kubepods/burstable/pod{UID}"));
        assert_eq!(id.pod_uid.as_deref(), Some(UID));
        assert_eq!(id.container_id, None);
    }

    #[test]
    fn proc_cgroup_v1_v2_and_hybrid() {
        let c = cid();
        let v1 = format!(
            "12:pids:/\n11:memory:/kubepods/burstable/pod{UID}/{c}\n1:name=systemd:/\n0::/\n"
        );
        let id = parse(&v1);
        assert_eq!(id.pod_uid.as_deref(), Some(UID));
        assert_eq!(id.container_id, Some(c.clone()));
        let v2 = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{c}.scope\n"
        );
        let id = parse(&v2);
        assert_eq!(id.pod_uid.as_deref(), Some(UID));
        assert_eq!(id.runtime, Some("containerd"));
        // Hybrid: the unified hierarchy is read first.
        let other = "cd".repeat(32);
        let hybrid = format!("4:memory:/docker/{other}\n0::/system.slice/docker-{c}.scope\n");
        assert_eq!(parse(&hybrid).container_id, Some(c));
        // No container anywhere: the unified path, no ids; garbage: nothing.
        let plain = parse("3:cpu:/a\n0::/user.slice\n");
        assert_eq!(plain.path, "/user.slice");
        assert_eq!(plain.container_id, None);
        assert_eq!(parse("garbage\n\n"), CgroupIdentity::default());
    }
}

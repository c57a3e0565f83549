//! Where a server's `/metrics` is: the ports it listens on (the `--port` of its command line
//! first), in its own network namespace. The agent shares the host's pid namespace, not the
//! pods' network namespaces: a connection to a pod's server is made from a short-lived thread
//! that enters the server's namespace (`setns`); the socket stays in it after the thread ends.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    time::Duration,
};

use crate::{
    proc::ProcFs,
    servers::{self as discover, Server},
};

/// The labels added to every series scraped from a target, and to the series derived from
/// it: the server, and the workload it runs in (node, namespace, pod, container, where known;
/// the same labels as the agent's per-process series, so rules can join on them).
///
/// `gpu` names the GPUs the server uses (`"0"`, or `"0,1"` for a tensor-parallel server: one
/// series per server, not per GPU, so sums over servers stay right); left out while unknown.
pub fn target_labels(
    server: &str,
    pid: u32,
    port: u16,
    gpus: &[u32],
    workload: &crate::labels::WorkloadLabels,
) -> Vec<(&'static str, String)> {
    let mut labels = vec![
        ("server", server.to_string()),
        ("pid", pid.to_string()),
        ("port", port.to_string()),
    ];
    if !gpus.is_empty() {
        labels.push(("gpu", crate::attrib::Attributor::gpu_list(gpus)));
    }
    for (name, value) in [
        ("node", &workload.node),
        ("namespace", &workload.namespace),
        ("pod", &workload.pod),
        ("container", &workload.container),
    ] {
        if !value.is_empty() {
            labels.push((name, value.clone()));
        }
    }
    labels
}

/// Addresses to try for a server's `/metrics`, best first: the listening sockets, the one on
/// its command line's `--port` first; a wildcard bind is reached on loopback.
pub fn candidates(procfs: &ProcFs, pid: u32, argv: &[String]) -> Vec<SocketAddr> {
    let preferred: Option<u16> =
        discover::option(argv, &["--port", "-p"]).and_then(|p| p.parse().ok());
    let mut out: Vec<SocketAddr> = discover::listening(procfs, pid)
        .into_iter()
        .map(|(ip, port)| {
            let ip = match ip {
                IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            SocketAddr::new(ip, port)
        })
        .collect();
    // IPv4 before IPv6 for the same port, then the preferred port first.
    out.sort_by_key(|a| (Some(a.port()) != preferred, a.port(), a.is_ipv6()));
    out.dedup_by_key(|a| a.port());
    out
}

/// The model a server serves per its command line, for servers found by port.
pub fn model(server: &Server, argv: &[String]) -> Option<String> {
    server
        .model
        .clone()
        .or_else(|| discover::option(argv, &["--served-model-name", "--model-id", "--model"]))
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot open the network namespace of pid {pid}")]
    Namespace {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot enter the network namespace of pid {pid} (no CAP_SYS_ADMIN) nor connect to \
         its pod address {addr} (a server listening on loopback only is out of reach)"
    )]
    PodAddress {
        pid: u32,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the connecting thread could not be started or panicked")]
    Thread,
}

/// Connects to `addr` as seen from the network namespace of `pid` (blocking, up to
/// `timeout`).
pub fn connect(
    procfs: &ProcFs,
    pid: u32,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let ns_path = procfs.root().join(pid.to_string()).join("ns/net");
    let ns =
        std::fs::File::open(&ns_path).map_err(|source| ConnectError::Namespace { pid, source })?;
    let same = match (ns.metadata(), std::fs::metadata("/proc/thread-self/ns/net")) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    };
    let plain = move || {
        TcpStream::connect_timeout(&addr, timeout)
            .map_err(|source| ConnectError::Connect { addr, source })
    };
    if same {
        return plain();
    }
    // A thread of its own: its namespace changes, and it ends with the connection made.
    let entered = std::thread::Builder::new()
        .name("scrape-connect".into())
        .spawn(move || {
            // SAFETY: setns on a descriptor we own; affects only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(ConnectError::Namespace {
                    pid,
                    source: std::io::Error::last_os_error(),
                });
            }
            plain()
        })
        .map_err(|_| ConnectError::Thread)?
        .join()
        .map_err(|_| ConnectError::Thread)?;
    match entered {
        // Without CAP_SYS_ADMIN (the shipped DaemonSet) the namespace cannot be entered: a
        // server bound to every address of its pod is reached on the pod's address instead.
        Err(ConnectError::Namespace { source, .. })
            if source.raw_os_error() == Some(libc::EPERM) && addr.ip().is_loopback() =>
        {
            let ip = pod_address(procfs, pid).ok_or(ConnectError::Namespace { pid, source })?;
            let addr = SocketAddr::new(ip, addr.port());
            TcpStream::connect_timeout(&addr, timeout).map_err(|source| ConnectError::PodAddress {
                pid,
                addr,
                source,
            })
        }
        other => other,
    }
}

/// The first IPv4 address of the process's network namespace that is not loopback (the pod's
/// address), from its `/proc/<pid>/net/fib_trie`.
pub fn pod_address(procfs: &ProcFs, pid: u32) -> Option<IpAddr> {
    let text =
        std::fs::read_to_string(procfs.root().join(pid.to_string()).join("net/fib_trie")).ok()?;
    local_address(&text)
}

/// In `fib_trie`, a local address is a leaf (`|-- a.b.c.d`) followed by `/32 host LOCAL`.
fn local_address(fib_trie: &str) -> Option<IpAddr> {
    let mut leaf: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            leaf = ip.parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(ip) = leaf.filter(|ip| !ip.is_loopback()) {
                return Some(IpAddr::V4(ip));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_labels_name_the_workload_where_known() {
        let outside = target_labels("vllm", 7, 8000, &[], &Default::default());
        assert_eq!(
            outside,
            [
                ("server", "vllm".to_string()),
                ("pid", "7".into()),
                ("port", "8000".into())
            ]
        );
        let workload = crate::labels::WorkloadLabels {
            node: "n1".into(),
            namespace: "llm".into(),
            pod: "vllm-0".into(),
            container: String::new(),
        };
        let inside = target_labels("vllm", 7, 8000, &[0, 1], &workload);
        assert_eq!(
            inside[3..],
            [
                ("gpu", "0,1".to_string()),
                ("node", "n1".into()),
                ("namespace", "llm".into()),
                ("pod", "vllm-0".into())
            ]
        );
    }

    #[test]
    fn prefers_the_command_line_port_and_reaches_wildcards_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("7");
        std::fs::create_dir_all(p.join("fd")).unwrap();
        std::fs::create_dir_all(p.join("net")).unwrap();
        // 0.0.0.0:5557 (zmq), 0.0.0.0:8000 (API), 10.0.0.5:9000
        std::fs::write(
            p.join("net/tcp"),
            "h\n 0: 00000000:15B5 00000000:0000 0A 0:0 0:0 0 0 0 11 1\n 1: 00000000:1F40 00000000:0000 0A 0:0 0:0 0 0 0 12 1\n 2: 0500000A:2328 00000000:0000 0A 0:0 0:0 0 0 0 13 1\n",
        )
        .unwrap();
        for (fd, ino) in [(3, 11), (4, 12), (5, 13)] {
            std::os::unix::fs::symlink(format!("socket:[{ino}]"), p.join(format!("fd/{fd}")))
                .unwrap();
        }
        let procfs = ProcFs::new(dir.path());
        let argv: Vec<String> = ["vllm", "serve", "m", "--port", "8000"]
            .map(String::from)
            .into();
        let got = candidates(&procfs, 7, &argv);
        let want: Vec<SocketAddr> = ["127.0.0.1:8000", "127.0.0.1:5557", "10.0.0.5:9000"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        let server = Server {
            kind: "openai-compatible",
            model: None,
            ..Default::default()
        };
        let argv: Vec<String> = ["python3", "x.py", "--model=abc"].map(String::from).into();
        assert_eq!(model(&server, &argv).as_deref(), Some("abc"));
    }

    #[test]
    fn finds_the_pods_address_in_fib_trie() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n\
     +-- 127.0.0.0/8 2 0 2\n        +-- 127.0.0.0/31 1 0 0\n           |-- 127.0.0.0\n\
              /8 host LOCAL\n           |-- 127.0.0.1\n              /32 host LOCAL\n\
     +-- 10.244.1.0/24 2 0 2\n           |-- 10.244.1.0\n              /24 link UNICAST\n\
           |-- 10.244.1.17\n              /32 host LOCAL\n        |-- 10.244.1.255\n\
           /32 link BROADCAST\n";
        assert_eq!(local_address(trie), Some("10.244.1.17".parse().unwrap()));
        assert_eq!(
            local_address(
                "|-- 127.0.0.1\n   /32 host LOCAL\n|-- 10.0.0.255\n /32 link BROADCAST\n"
            ),
            None
        );
    }

    #[test]
    fn connects_in_the_agents_own_namespace() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let procfs = ProcFs::new("/proc");
        let s = connect(&procfs, std::process::id(), addr, Duration::from_secs(2)).unwrap();
        assert_eq!(s.peer_addr().unwrap(), addr);
        assert!(matches!(
            connect(&procfs, u32::MAX, addr, Duration::from_secs(1)),
            Err(ConnectError::Namespace { .. })
        ));
    }
}

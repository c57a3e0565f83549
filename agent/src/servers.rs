//! Which processes are inference servers: recognised by their command line (vLLM, TGI,
//! SGLang, llama.cpp's server, Triton) or listening on a port given with `--watch-port`; and
//! which of their sockets are connections accepted before the agent started (seeded into the
//! probes' connection map so that the next request on them is seen).

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use crate::proc::{ProcFs, TcpNetEntry, TcpState};

/// A watched server process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Server {
    /// `vllm`, `tgi`, `sglang`, `llamacpp`, `triton`, or `openai-compatible` (found by port).
    pub kind: &'static str,
    /// The model it serves according to its command line (the `model` label of requests
    /// that do not name one): the served model name where one is given.
    pub model: Option<String>,
    /// The model's revision (`--revision`, `--model-revision`).
    pub model_version: Option<String>,
    /// Tensor parallel size (vLLM `--tensor-parallel-size`/`-tp`, SGLang `--tp-size`/`--tp`,
    /// TGI `--num-shard`).
    pub tensor_parallelism: Option<u32>,
    /// Its lowest listening TCP port, once the watcher has looked (`server.port` of spans).
    pub port: Option<u16>,
    /// A model worker behind a server's front end (TGI's shards, `text-generation-server
    /// serve`): the calls it answers are the front end's batches (`Prefill`, `Decode`, over a
    /// Unix socket), not users' requests, and are counted apart (`llm_engine_*`).
    pub engine: bool,
}

/// Adds what every server's command line may say besides the model: revision and tensor
/// parallelism (the option names do not collide across the servers).
fn with_details(mut s: Server, argv: &[String]) -> Server {
    s.model_version = option(argv, &["--revision", "--model-revision"]);
    s.tensor_parallelism = option(
        argv,
        &[
            "--tensor-parallel-size",
            "-tp",
            "--tp-size",
            "--tp",
            "--num-shard",
        ],
    )
    .and_then(|v| v.parse().ok());
    s
}

/// The outermost watched server among `pid` and its ancestors (a walk of at most 32 parents):
/// the server a process belongs to, so that an engine process a server spawned (vLLM's engine
/// core, TGI's shards and router under its launcher) is taken with the server above it.
pub fn outermost(
    pid: u32,
    watched: &dyn Fn(u32) -> bool,
    parent: &dyn Fn(u32) -> Option<u32>,
) -> Option<u32> {
    let mut found = None;
    let mut p = pid;
    for _ in 0..32 {
        if watched(p) {
            found = Some(p);
        }
        match parent(p) {
            Some(up) if up > 1 && up != p => p = up,
            _ => break,
        }
    }
    found
}

/// Recognises an inference server from its argv.
pub fn classify(argv: &[String]) -> Option<Server> {
    classify_kind(argv).map(|s| with_details(s, argv))
}

fn classify_kind(argv: &[String]) -> Option<Server> {
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
    let argv0 = argv.first().map(|a| base(a)).unwrap_or_default();
    let has = |s: &str| argv.iter().any(|a| a == s);
    let opt = |names: &[&str]| -> Option<String> {
        for (i, a) in argv.iter().enumerate() {
            for n in names {
                if a == n {
                    if let Some(v) = argv.get(i + 1) {
                        return Some(v.clone());
                    }
                }
                if let Some(v) = a.strip_prefix(&format!("{n}=")) {
                    return Some(v.to_string());
                }
            }
        }
        None
    };
    let served = || opt(&["--served-model-name"]);
    let python_module =
        |m: &str| argv.windows(2).any(|w| w[0] == "-m" && w[1] == m) || argv.iter().any(|a| a == m);
    if python_module("vllm.entrypoints.openai.api_server")
        || ((argv0 == "vllm" || argv.get(1).is_some_and(|a| base(a) == "vllm")) && has("serve"))
    {
        let positional = after_serve(argv);
        let model = served().or_else(|| opt(&["--model"])).or(positional);
        return Some(Server {
            port: None,
            kind: "vllm",
            model,
            ..Default::default()
        });
    }
    // TGI's launcher starts each shard as the Python console script `text-generation-server
    // serve MODEL --uds-path ...`: its interpreter comes first on the command line.
    let shard = [argv.first(), argv.get(1)]
        .into_iter()
        .flatten()
        .any(|a| base(a) == "text-generation-server");
    if shard && has("serve") {
        let model = after_serve(argv);
        return Some(Server {
            kind: "tgi",
            model,
            engine: true,
            ..Default::default()
        });
    }
    if argv0 == "text-generation-router" || argv0 == "text-generation-launcher" {
        return Some(Server {
            port: None,
            kind: "tgi",
            model: served().or_else(|| opt(&["--model-id", "--tokenizer-name"])),
            ..Default::default()
        });
    }
    if python_module("sglang.launch_server") {
        return Some(Server {
            port: None,
            kind: "sglang",
            model: served().or_else(|| opt(&["--model-path", "--model"])),
            ..Default::default()
        });
    }
    if argv0 == "llama-server" {
        let model = opt(&["--alias", "-a"]).or_else(|| {
            opt(&["--model", "-m"]).map(|p| {
                let file = base(&p);
                file.strip_suffix(".gguf").unwrap_or(&file).to_string()
            })
        });
        return Some(Server {
            port: None,
            kind: "llamacpp",
            model,
            ..Default::default()
        });
    }
    if argv0 == "tritonserver" {
        return Some(Server {
            port: None,
            kind: "triton",
            model: None,
            ..Default::default()
        });
    }
    None
}

/// The positional argument after `serve` (`vllm serve MODEL`, `text-generation-server serve
/// MODEL`).
fn after_serve(argv: &[String]) -> Option<String> {
    argv.iter()
        .position(|a| a == "serve")
        .and_then(|i| argv.get(i + 1))
        .filter(|a| !a.starts_with('-'))
        .cloned()
}

/// A process whose command line contains one of the configured matchers (`http.match_commands`)
/// is watched as an OpenAI-compatible server; the model comes from the usual options.
pub fn matched(argv: &[String], matchers: &[String]) -> Option<Server> {
    matched_kind(argv, matchers).map(|s| with_details(s, argv))
}

fn matched_kind(argv: &[String], matchers: &[String]) -> Option<Server> {
    let line = argv.join(" ");
    if !matchers
        .iter()
        .any(|m| !m.is_empty() && line.contains(m.as_str()))
    {
        return None;
    }
    Some(openai_compatible(argv))
}

/// A server of no known kind: the model from the usual options.
fn openai_compatible(argv: &[String]) -> Server {
    Server {
        kind: "openai-compatible",
        model: option(argv, &["--served-model-name", "--model", "--model-id"]),
        ..Default::default()
    }
}

/// The value of the first of `names` on the command line (`--name value` or `--name=value`).
pub fn option(argv: &[String], names: &[&str]) -> Option<String> {
    argv.iter().enumerate().find_map(|(i, a)| {
        for n in names {
            if a == n {
                return argv.get(i + 1).cloned();
            }
            if let Some(v) = a.strip_prefix(&format!("{n}=")) {
                return Some(v.to_string());
            }
        }
        None
    })
}

/// The process's arguments, secrets masked: the model, revision and port taken from them
/// become labels and scrape targets.
pub fn argv(procfs: &ProcFs, pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(procfs.root().join(pid.to_string()).join("cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(crate::redact::argv(&args))
}

/// The process's socket descriptors: fd → socket inode.
pub fn socket_fds(procfs: &ProcFs, pid: u32) -> Vec<(u32, u64)> {
    let dir = procfs.root().join(pid.to_string()).join("fd");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, socket_inode(&target)?))
        })
        .collect()
}

fn socket_inode(target: &Path) -> Option<u64> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Established connections on the process's listening ports: (fd) to seed.
pub fn accepted_fds(procfs: &ProcFs, pid: u32) -> Vec<u32> {
    let sockets = procfs.tcp(Some(pid));
    let fds = socket_fds(procfs, pid);
    let by_inode: HashMap<u64, &TcpNetEntry> = sockets.iter().map(|s| (s.inode, s)).collect();
    let ports: HashSet<u16> = fds
        .iter()
        .filter_map(|(_, ino)| by_inode.get(ino))
        .filter(|s| s.state == TcpState::Listen)
        .map(|s| s.local_address.port())
        .collect();
    fds.iter()
        .filter(|(_, ino)| {
            by_inode.get(ino).is_some_and(|s| {
                s.state == TcpState::Established && ports.contains(&s.local_address.port())
            })
        })
        .map(|(fd, _)| *fd)
        .collect()
}

/// Connections the process accepted on the Unix sockets it listens on (TGI's shards serve
/// its router on one): a connected stream socket bearing the path of one of its listeners.
pub fn accepted_unix_fds(procfs: &ProcFs, pid: u32) -> Vec<u32> {
    unix_accepted(&procfs.unix(pid), &socket_fds(procfs, pid))
}

fn unix_accepted(table: &[crate::proc::UnixSocket], fds: &[(u32, u64)]) -> Vec<u32> {
    const SOCK_STREAM: u16 = 1;
    const SS_CONNECTED: u8 = 3;
    let by_inode: HashMap<u64, &crate::proc::UnixSocket> =
        table.iter().map(|s| (s.inode, s)).collect();
    let held = || {
        fds.iter()
            .filter_map(|(fd, ino)| Some((*fd, *by_inode.get(ino)?)))
    };
    let listened: HashSet<&str> = held()
        .filter(|(_, s)| s.listening)
        .filter_map(|(_, s)| s.path.as_deref())
        .collect();
    held()
        .filter(|(_, s)| {
            s.socket_type == SOCK_STREAM
                && s.state == SS_CONNECTED
                && !s.listening
                && s.path.as_deref().is_some_and(|p| listened.contains(p))
        })
        .map(|(fd, _)| fd)
        .collect()
}

/// The lowest TCP port the process listens on.
pub fn listening_port(procfs: &ProcFs, pid: u32) -> Option<u16> {
    let sockets = procfs.tcp(Some(pid));
    let inodes: HashSet<u64> = socket_fds(procfs, pid).iter().map(|(_, i)| *i).collect();
    sockets
        .iter()
        .filter(|s| s.state == TcpState::Listen && inodes.contains(&s.inode))
        .map(|s| s.local_address.port())
        .min()
}

/// Pids that hold a socket listening on one of `ports`, in every network namespace: each
/// namespace's sockets are read once, through one of its processes (`net/tcp{,6}` shows the
/// reader's namespace), and only the processes of a namespace with such a listener have their
/// descriptors looked at. Returns them with the number of socket tables read.
pub fn listeners(procfs: &ProcFs, ports: &[u16]) -> (HashSet<u32>, u64) {
    let mut out = HashSet::new();
    if ports.is_empty() {
        return (out, 0);
    }
    let mut by_ns: HashMap<u64, Vec<u32>> = HashMap::new();
    for pid in procfs.pids() {
        if let Some(ns) = procfs.net_ns(pid) {
            by_ns.entry(ns).or_default().push(pid);
        }
    }
    let mut tables = 0;
    for pids in by_ns.values() {
        let Some(&first) = pids.first() else { continue };
        tables += 1;
        let inodes: HashSet<u64> = procfs
            .tcp(Some(first))
            .into_iter()
            .filter(|s| s.state == TcpState::Listen && ports.contains(&s.local_address.port()))
            .map(|s| s.inode)
            .collect();
        if inodes.is_empty() {
            continue;
        }
        out.extend(pids.iter().copied().filter(|pid| {
            socket_fds(procfs, *pid)
                .iter()
                .any(|(_, ino)| inodes.contains(ino))
        }));
    }
    (out, tables)
}

/// Most client addresses [`clients`] looks for at once.
pub const MAX_CLIENTS: usize = 64;

/// The processes on this node holding the client end of connections a server process `server`
/// accepted from `peers` (the addresses it saw): each network namespace's TCP tables are read
/// once, through one of its processes, for a socket whose local address is a peer's, and only
/// the processes of a namespace holding one have their descriptors looked at. A loopback
/// address names a socket of the server's own namespace only (another namespace's loopback is
/// another network). Peers past [`MAX_CLIENTS`] are not looked for; a peer on another node
/// is not found.
pub fn clients(
    procfs: &ProcFs,
    server: u32,
    peers: &[std::net::SocketAddr],
) -> HashMap<std::net::SocketAddr, u32> {
    let canon = |a: std::net::SocketAddr| (a.ip().to_canonical(), a.port());
    let wanted: HashMap<_, std::net::SocketAddr> = peers
        .iter()
        .take(MAX_CLIENTS)
        .map(|p| (canon(*p), *p))
        .collect();
    let mut out = HashMap::new();
    if wanted.is_empty() {
        return out;
    }
    let server_ns = procfs.net_ns(server);
    let mut by_ns: HashMap<u64, Vec<u32>> = HashMap::new();
    for pid in procfs.pids() {
        if let Some(ns) = procfs.net_ns(pid) {
            by_ns.entry(ns).or_default().push(pid);
        }
    }
    for (ns, pids) in &by_ns {
        let Some(&first) = pids.first() else { continue };
        let own = Some(*ns) == server_ns;
        let inodes: HashMap<u64, std::net::SocketAddr> = procfs
            .tcp(Some(first))
            .into_iter()
            .filter(|s| s.state != TcpState::Listen)
            .filter_map(|s| {
                let key = canon(s.local_address);
                let peer = wanted.get(&key)?;
                (own || !key.0.is_loopback()).then_some((s.inode, *peer))
            })
            .collect();
        if inodes.is_empty() {
            continue;
        }
        for pid in pids {
            for (_, ino) in socket_fds(procfs, *pid) {
                if let Some(peer) = inodes.get(&ino) {
                    // Shared by a parent and its child: the first found is as good.
                    out.entry(*peer).or_insert(*pid);
                }
            }
        }
    }
    out
}

/// Ports (and bound addresses) the process listens on, from its own network namespace.
pub fn listening(procfs: &ProcFs, pid: u32) -> Vec<(std::net::IpAddr, u16)> {
    let by_inode: HashMap<u64, TcpNetEntry> = procfs
        .tcp(Some(pid))
        .into_iter()
        .filter(|s| s.state == TcpState::Listen)
        .map(|s| (s.inode, s))
        .collect();
    let mut out: Vec<(std::net::IpAddr, u16)> = socket_fds(procfs, pid)
        .iter()
        .filter_map(|(_, ino)| by_inode.get(ino))
        .map(|s| (s.local_address.ip(), s.local_address.port()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The servers the `http` watcher found on its last scan, for other stages (the server
/// metrics scraper) that need the same list without scanning `/proc` again.
#[derive(Debug, Default)]
pub struct ServerBoard {
    servers: std::sync::RwLock<HashMap<u32, Server>>,
    /// Bumped at each publish: readers that follow the list look at it only when it changed.
    generation: std::sync::atomic::AtomicU64,
    /// Rung when the set of processes changes (the probe manager sleeps on it).
    wake: std::sync::OnceLock<std::sync::Arc<crate::wake::Wake>>,
}

impl ServerBoard {
    pub fn publish(&self, servers: &HashMap<u32, Server>) {
        let mut current = self.servers.write().unwrap_or_else(|e| e.into_inner());
        let changed =
            current.len() != servers.len() || servers.keys().any(|pid| !current.contains_key(pid));
        *current = servers.clone();
        drop(current);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        if let (true, Some(w)) = (changed, self.wake.get()) {
            w.ring();
        }
    }

    /// Has `wake` rung whenever a process joins or leaves the list.
    pub fn wake_on_change(&self, wake: std::sync::Arc<crate::wake::Wake>) {
        let _ = self.wake.set(wake);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn snapshot(&self) -> HashMap<u32, Server> {
        self.servers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What a scan read of other processes' files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    pub cmdline: u64,
    pub net_tcp: u64,
}

/// Every watched server now: by command line (pids already classified are not read again:
/// `seen` caches each pid's verdict), then by port.
pub fn scan(
    procfs: &ProcFs,
    ports: &[u16],
    matchers: &[String],
    seen: &mut HashMap<u32, Option<Server>>,
) -> (HashMap<u32, Server>, Reads) {
    let pids: HashSet<u32> = procfs.pids().collect();
    seen.retain(|pid, _| pids.contains(pid));
    let mut reads = Reads::default();
    for pid in &pids {
        if !seen.contains_key(pid) {
            reads.cmdline += 1;
            seen.insert(*pid, verdict(procfs, *pid, matchers));
        }
    }
    let mut out: HashMap<u32, Server> = seen
        .iter()
        .filter_map(|(pid, s)| Some((*pid, s.clone()?)))
        .collect();
    let (listening, tables) = listeners(procfs, ports);
    reads.net_tcp += tables;
    for pid in listening {
        out.entry(pid).or_insert_with(|| {
            reads.cmdline += 1;
            by_port(argv(procfs, pid).as_deref().unwrap_or_default())
        });
    }
    (out, reads)
}

/// The process as its command line shows it: a server of a known kind, one the matchers
/// name, or none.
pub fn verdict(procfs: &ProcFs, pid: u32, matchers: &[String]) -> Option<Server> {
    argv(procfs, pid).and_then(|a| classify(&a).or_else(|| matched(&a, matchers)))
}

/// A server found only by its port: the model and details still come from the usual
/// options of its command line, when it has them.
pub fn by_port(argv: &[String]) -> Server {
    with_details(openai_compatible(argv), argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn recognises_servers() {
        let cases = [
            ("/usr/bin/python3 /usr/local/bin/vllm serve meta-llama/Llama-3-8B --port 8000", "vllm", Some("meta-llama/Llama-3-8B")),
            ("python3 -m vllm.entrypoints.openai.api_server --model m1 --served-model-name alias", "vllm", Some("alias")),
            ("text-generation-router --model-id bigscience/bloom --port 80", "tgi", Some("bigscience/bloom")),
            ("/usr/bin/text-generation-launcher --model-id=x/y", "tgi", Some("x/y")),
            ("python -m sglang.launch_server --model-path Qwen/Qwen2-7B", "sglang", Some("Qwen/Qwen2-7B")),
            ("./llama-server -m /models/llama-7b.Q4.gguf --port 8080", "llamacpp", Some("llama-7b.Q4")),
            ("/opt/tritonserver/bin/tritonserver --model-repository=/m", "triton", None),
            ("/opt/conda/bin/python3.11 /opt/conda/bin/text-generation-server serve bigscience/bloom-560m --uds-path /tmp/text-generation-server", "tgi", Some("bigscience/bloom-560m")),
        ];
        for (cmd, kind, model) in cases {
            let s = classify(&v(cmd)).unwrap_or_else(|| panic!("{cmd}"));
            assert_eq!((s.kind, s.model.as_deref()), (kind, model), "{cmd}");
            assert_eq!(s.engine, cmd.contains("text-generation-server"), "{cmd}");
        }
        for cmd in [
            "bash",
            "python3 serve.py",
            "vim vllm",
            "grep sglang.launch_server2",
            "text-generation-server download-weights x/y",
        ] {
            assert_eq!(classify(&v(cmd)), None, "{cmd}");
        }
    }

    #[test]
    fn seeds_connections_from_a_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("42");
        std::fs::create_dir_all(p.join("fd")).unwrap();
        std::fs::create_dir_all(p.join("net")).unwrap();
        std::fs::write(p.join("net/tcp"), "header\n 0: 0100007F:1F90 00000000:0000 0A 0:0 0:0 0 0 0 100 1\n 1: 0100007F:1F90 0100007F:C350 01 0:0 0:0 0 0 0 101 1\n 2: 0100007F:C351 0100007F:1F91 01 0:0 0:0 0 0 0 102 1\n").unwrap();
        std::os::unix::fs::symlink("socket:[100]", p.join("fd/3")).unwrap();
        std::os::unix::fs::symlink("socket:[101]", p.join("fd/7")).unwrap();
        std::os::unix::fs::symlink("socket:[102]", p.join("fd/8")).unwrap();
        std::os::unix::fs::symlink("/dev/null", p.join("fd/0")).unwrap();
        std::fs::write(p.join("cmdline"), b"llama-server\0--alias\0tiny\0").unwrap();
        let procfs = ProcFs::new(dir.path());
        assert_eq!(accepted_fds(&procfs, 42), vec![7]);
        assert_eq!(
            listening(&procfs, 42),
            vec![("127.0.0.1".parse().unwrap(), 8080)]
        );
        let mut seen = HashMap::new();
        let (servers, reads) = scan(&procfs, &[], &[], &mut seen);
        assert_eq!(reads.cmdline, 1);
        assert_eq!(scan(&procfs, &[], &[], &mut seen).1.cmdline, 0, "read once");
        assert_eq!(servers[&42].model.as_deref(), Some("tiny"));
    }

    #[test]
    fn seeds_the_connections_accepted_on_its_unix_listeners() {
        let table = crate::proc::unix_table(concat!(
            "Num       RefCount Protocol Flags    Type St Inode Path\n",
            // Its listener, the connection it accepted (the listener's path), its own client
            // end of another server's socket, another process's accepted connection, a
            // datagram socket bound to the same path, a connected socket with no path.
            "0000000000000001: 00000002 00000000 00010000 0001 01 500 /tmp/text-generation-server-0\n",
            "0000000000000002: 00000003 00000000 00000000 0001 03 501 /tmp/text-generation-server-0\n",
            "0000000000000003: 00000003 00000000 00000000 0001 03 502 /run/other.sock\n",
            "0000000000000004: 00000003 00000000 00000000 0001 03 503 /tmp/text-generation-server-0\n",
            "0000000000000005: 00000002 00000000 00000000 0002 03 504 /tmp/text-generation-server-0\n",
            "0000000000000006: 00000003 00000000 00000000 0001 03 505\n",
            "garbage line\n",
            "0000000000000007: 00000003 00000000 00000000 0001 03 506 /tmp/a path with spaces\n",
        ));
        assert_eq!(table.len(), 7, "{table:?}");
        assert_eq!(table[6].path.as_deref(), Some("/tmp/a path with spaces"));
        let fds = [(3, 500), (4, 501), (5, 502), (6, 504), (7, 505), (8, 999)];
        assert_eq!(unix_accepted(&table, &fds), vec![4]);
        // Without its listener the connection is nobody's to seed.
        assert!(unix_accepted(&table, &fds[1..]).is_empty());
    }

    /// A process of the fake tree in network namespace `ns` with `tcp` as its table and
    /// `sockets` among its descriptors.
    fn process(root: &Path, pid: u32, ns: u64, tcp: &str, sockets: &[u64]) {
        let p = root.join(pid.to_string());
        std::fs::create_dir_all(p.join("fd")).unwrap();
        std::fs::create_dir_all(p.join("net")).unwrap();
        std::fs::create_dir_all(p.join("ns")).unwrap();
        std::os::unix::fs::symlink(format!("net:[{ns}]"), p.join("ns/net")).unwrap();
        std::fs::write(p.join("net/tcp"), format!("header\n{tcp}")).unwrap();
        for (fd, ino) in sockets.iter().enumerate() {
            std::os::unix::fs::symlink(format!("socket:[{ino}]"), p.join(format!("fd/{}", fd + 3)))
                .unwrap();
        }
    }

    #[test]
    fn the_client_end_of_a_connection_is_found_in_its_namespace() {
        let dir = tempfile::tempdir().unwrap();
        // Namespace 1: the server (8080) and a client on loopback (50000).
        let ns1 = " 0: 0100007F:1F90 00000000:0000 0A 0:0 0:0 0 0 0 100 1\n 1: 0100007F:1F90 0100007F:C350 01 0:0 0:0 0 0 0 101 1\n 2: 0100007F:C350 0100007F:1F90 01 0:0 0:0 0 0 0 102 1\n";
        process(dir.path(), 42, 1, ns1, &[100, 101]);
        process(dir.path(), 43, 1, ns1, &[102]);
        // Namespace 2 (a pod): another loopback 50000, which is not the server's client, and
        // 10.0.0.5:40000 connected to the server's pod address.
        let ns2 = " 0: 0100007F:C350 0100007F:1F90 01 0:0 0:0 0 0 0 200 1\n 1: 0500000A:9C40 0600000A:1F90 01 0:0 0:0 0 0 0 201 1\n";
        process(dir.path(), 50, 2, ns2, &[200]);
        process(dir.path(), 51, 2, ns2, &[201]);
        let procfs = ProcFs::new(dir.path());
        let loopback: std::net::SocketAddr = "127.0.0.1:50000".parse().unwrap();
        // As a dual-stack listener sees an IPv4 peer.
        let mapped: std::net::SocketAddr = "[::ffff:10.0.0.5]:40000".parse().unwrap();
        let gone: std::net::SocketAddr = "10.0.0.9:1234".parse().unwrap();
        let found = clients(&procfs, 42, &[loopback, mapped, gone]);
        assert_eq!(found.get(&loopback), Some(&43));
        assert_eq!(found.get(&mapped), Some(&51));
        assert_eq!(found.get(&gone), None);
        assert_eq!(found.len(), 2);
    }

    #[test]
    fn secrets_on_a_command_line_reach_no_label() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("42");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join("cmdline"),
            b"vllm\0serve\0https://u:pw1@hub.example/m\0--api-key\0sk-2\0--port\08000\0",
        )
        .unwrap();
        let procfs = ProcFs::new(dir.path());
        let a = argv(&procfs, 42).unwrap();
        assert!(
            !a.join(" ").contains("pw1") && !a.join(" ").contains("sk-2"),
            "{a:?}"
        );
        assert_eq!(option(&a, &["--port"]).as_deref(), Some("8000"));
        let (servers, _) = scan(&procfs, &[], &[], &mut HashMap::new());
        assert_eq!(
            servers[&42].model.as_deref(),
            Some("https://u:***@hub.example/m")
        );
    }

    #[test]
    fn reads_revision_and_tensor_parallelism() {
        let cases = [
            (
                "vllm serve org/m --revision abc123 --tensor-parallel-size 4",
                Some("abc123"),
                Some(4),
            ),
            (
                "python3 -m vllm.entrypoints.openai.api_server --model m -tp=2 --model-revision v2",
                Some("v2"),
                Some(2),
            ),
            (
                "text-generation-launcher --model-id m --revision main --num-shard 8",
                Some("main"),
                Some(8),
            ),
            (
                "python -m sglang.launch_server --model-path m --tp-size 2",
                None,
                Some(2),
            ),
            (
                "python -m sglang.launch_server --model-path m --tp 4 --revision=r1",
                Some("r1"),
                Some(4),
            ),
            ("vllm serve m --tensor-parallel-size four", None, None),
            ("./llama-server -m /models/x.gguf", None, None),
        ];
        for (cmd, version, tp) in cases {
            let s = classify(&v(cmd)).unwrap_or_else(|| panic!("{cmd}"));
            assert_eq!(
                (s.model_version.as_deref(), s.tensor_parallelism),
                (version, tp),
                "{cmd}"
            );
        }
        let s = matched(&v("my.py --revision r --tp-size 2"), &["my.py".into()]).unwrap();
        assert_eq!(
            (s.model_version.as_deref(), s.tensor_parallelism),
            (Some("r"), Some(2))
        );
    }

    #[test]
    fn the_board_rings_its_wake_when_a_process_joins_or_leaves() {
        let readable = |w: &crate::wake::Wake| {
            use std::os::fd::AsRawFd;
            let mut pfd = libc::pollfd {
                fd: w.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            w.clear();
            n > 0
        };
        let board = ServerBoard::default();
        let wake = std::sync::Arc::new(crate::wake::Wake::new().unwrap());
        board.wake_on_change(wake.clone());
        let one: HashMap<u32, Server> = [(7, by_port(&[]))].into();
        let two: HashMap<u32, Server> = [(7, by_port(&[])), (8, by_port(&[]))].into();
        let other: HashMap<u32, Server> = [(9, by_port(&[]))].into();
        board.publish(&one);
        assert!(readable(&wake), "joined");
        board.publish(&one);
        assert!(!readable(&wake), "the same processes");
        board.publish(&two);
        assert!(readable(&wake), "another joined");
        board.publish(&one);
        assert!(readable(&wake), "one left");
        board.publish(&other);
        assert!(readable(&wake), "as many, not the same");
        assert_eq!(board.generation(), 5);
    }

    #[test]
    fn a_server_found_by_port_takes_its_model_from_its_command_line() {
        let s = by_port(&v(
            "python3 server.py --port 9000 --model org/m --revision r7 --tensor-parallel-size 2",
        ));
        assert_eq!(s.kind, "openai-compatible");
        assert_eq!(s.model.as_deref(), Some("org/m"));
        assert_eq!(s.model_version.as_deref(), Some("r7"));
        assert_eq!(s.tensor_parallelism, Some(2));
        assert_eq!(by_port(&[]).model, None);
    }

    #[test]
    fn config_matchers_watch_other_servers() {
        let m = vec!["my_server.py".to_string()];
        let s = matched(
            &v("python3 /srv/my_server.py --served-model-name m1 --port 8000"),
            &m,
        )
        .unwrap();
        assert_eq!(s.kind, "openai-compatible");
        assert_eq!(s.model.as_deref(), Some("m1"));
        assert!(matched(&v("python3 other.py"), &m).is_none());
        assert!(
            matched(&v("anything"), &[String::new()]).is_none(),
            "an empty matcher matches nothing"
        );
    }
}

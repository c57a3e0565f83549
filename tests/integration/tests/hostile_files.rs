//! Root tier: a tenant's files cannot steer, hang or bloat the agent. Tenants here are Python
//! processes that map a `libcuda.so*` (the agent discovers them as it would a server) and then
//! set traps: a process that `chroot`s after mapping, with an absolute symlink planted where
//! the agent resolves the mapping's path, pointing at a FIFO or at a file of the host; a
//! 3 GiB sparse `libcuda.so.1` of which one page is mapped.

use std::{
    ffi::CString,
    io::{BufRead, BufReader},
    os::unix::{ffi::OsStrExt, fs::symlink},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration::*;

/// Maps `lib` with `dlopen` (or one page of it with `mmap` when `mmap` is set), optionally
/// `chroot`s into `root`, says `ready` and sleeps.
const TENANT: &str = r#"
import ctypes, mmap, os, sys, time
lib, root, how = sys.argv[1], sys.argv[2], sys.argv[3]
if how == "mmap":
    f = open(lib, "rb")
    m = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ)
else:
    ctypes.CDLL(lib)
if root != "-":
    os.chroot(root)
    os.chdir("/")
print("ready", flush=True)
time.sleep(600)
"#;

struct Tenant(Child);

impl Tenant {
    fn start(lib: &Path, root: Option<&Path>, how: &str) -> Tenant {
        let root = root.map_or("-".to_string(), |r| r.display().to_string());
        let mut child = Command::new("python3")
            .args(["-c", TENANT])
            .arg(lib)
            .arg(root)
            .arg(how)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the tenant did not start");
        Tenant(child)
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A copy of the CUDA driver double under `dir`, not at a path any other test probes.
fn driver_copy(dir: &Path) -> PathBuf {
    let lib_dir = dir.join("drv");
    std::fs::create_dir_all(&lib_dir).unwrap();
    let lib = lib_dir.join("libcuda.so.1");
    std::fs::copy(Variant::Push.lib_path(), &lib).unwrap();
    lib
}

/// Watches `path` for opens (inotify), to prove the agent never opened it.
struct OpenWatch(i32);

impl OpenWatch {
    fn new(path: &Path) -> OpenWatch {
        // SAFETY: plain syscalls on a path we own.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let wd =
            unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS) };
        assert!(wd >= 0, "inotify_add_watch {}", path.display());
        OpenWatch(fd)
    }

    fn events(&self) -> isize {
        let mut buf = [0u8; 4096];
        // SAFETY: reading into our own buffer.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        n.max(0)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// SIGTERM, and the agent must be gone promptly with status 0 and nothing left loaded. A
/// trapped agent never ends; an untrapped one spends its shutdown detaching, which the kernel
/// serialises at about 80 ms per probe on the CI's nested VM (67 probes, 5.4 s), so the bound
/// is that cost with room (other drivers the machine's processes map add to it), not a
/// benchmark.
fn stop_promptly(agent: Agent) {
    let start = Instant::now();
    let status = agent.stop();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "shutdown took {:?}",
        start.elapsed()
    );
    assert!(status.success(), "{status}");
}

#[root_test]
fn symlinks_planted_after_a_chroot_are_never_followed_out() {
    let dir = tempfile::tempdir().unwrap();
    let lib = driver_copy(dir.path());
    let fifo = dir.path().join("host-fifo");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let host_file = dir.path().join("host-secret");
    std::fs::write(&host_file, b"a host file no tenant may make the agent read").unwrap();
    let watch = OpenWatch::new(&host_file);
    let fifo_watch = OpenWatch::new(&fifo);

    // Two tenants, each chrooted into its own root, where the path of the mapping (as the
    // agent's maps read names it) is an absolute symlink to the FIFO or the host file.
    let mut tenants = Vec::new();
    for (name, target) in [("a", &fifo), ("b", &host_file)] {
        let root = dir.path().join(format!("root-{name}"));
        let planted = root.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
        symlink(target, &planted).unwrap();
        tenants.push(Tenant::start(&lib, Some(&root), "dlopen"));
    }

    // Started after the tenants: its first discovery, before /healthz turns 200, meets them.
    let agent = Agent::start(&[]);
    let s = agent.wait_for(
        "the chrooted tenants' driver to be probed (map_files)",
        |s| {
            s.sum("inferscope_cuda_libraries", &[]) >= 1.0
                && s.sum("inferscope_probe_attached", &[("probe", "cuMemAlloc_v2")]) >= 1.0
        },
    );
    assert_eq!(s.sum("inferscope_dropped_total", &[]), 0.0, "{}", s.text);
    assert_eq!(watch.events(), 0, "the agent opened the host file");
    assert_eq!(fifo_watch.events(), 0, "the agent opened the FIFO");
    let (status, body) = http_get(agent.port, "/healthz").expect("healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    stop_promptly(agent);
    drop(tenants);
}

#[root_test]
fn without_map_files_a_planted_link_is_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let lib = driver_copy(dir.path());
    let host_file = dir.path().join("host-secret");
    std::fs::write(&host_file, b"host").unwrap();
    let watch = OpenWatch::new(&host_file);
    // In the tenant's root the mapping's path leads to another regular file, and map_files
    // is closed to an agent without CAP_SYS_ADMIN / CAP_CHECKPOINT_RESTORE: nothing is
    // probed, and the refusal is counted.
    let root = dir.path().join("root");
    let planted = root.join(lib.strip_prefix("/").unwrap());
    std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
    std::fs::write(&planted, b"a regular file that is not the mapped one").unwrap();
    let tenant = Tenant::start(&lib, Some(&root), "dlopen");
    let caps = "--bounding-set=-all,+bpf,+perfmon,+sys_resource,+sys_ptrace";
    ensure_host_tracefs();
    let agent = Agent::start_under(
        &[
            "setpriv",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            caps,
            "--",
        ],
        &[],
        &[],
    );
    agent.wait_for("the tenant's library to be refused", |s| {
        s.sum(
            "inferscope_dropped_total",
            &[("what", "cuda_library"), ("reason", "not_the_mapped_file")],
        ) >= 1.0
    });
    assert_eq!(watch.events(), 0);
    let log = agent.log();
    // Other processes of the machine may map drivers the agent probes; this one's is not.
    let lib_name = lib.display().to_string();
    assert!(
        !log.lines()
            .any(|l| l.contains("CUDA driver probed") && l.contains(&lib_name)),
        "{log}"
    );
    assert_eq!(
        log.matches("is not probed").count(),
        1,
        "logged once:\n{log}"
    );
    stop_promptly(agent);
    drop(tenant);
}

#[root_test]
fn a_3_gib_sparse_driver_keeps_the_agent_small() {
    let dir = tempfile::tempdir().unwrap();
    let lib = driver_copy(dir.path());
    // The real double, padded to 3 GiB with a hole: a valid library the agent probes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lib)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    let tenant = Tenant::start(&lib, None, "mmap");
    let agent = Agent::start(&[]);
    agent.wait_for("the sparse driver to be probed", |s| {
        s.sum("inferscope_probe_attached", &[("probe", "cuMemAlloc_v2")]) >= 1.0
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    assert!(peak_kib < 128 * 1024, "peak RSS {peak_kib} KiB");
    stop_promptly(agent);
    drop(tenant);
}

//! Readers of `/proc`, rooted at a configurable path so tests can use captured trees. The
//! formats are parsed by the `procfs` crate; what is read, and how much, stays decided here: a
//! maps text is bounded, a process's files are read through one handle on its directory, and
//! in the files of many lines a line procfs rejects costs that line, never the file. A
//! process's executable mappings are captured with their files opened, inside its root, so
//! that its stacks can be symbolized after it is gone.

use std::{
    collections::HashMap,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
};

use procfs::{
    net::TcpNetEntries,
    process::{MMPermissions, MMapPath, MemoryMaps, Process},
    FromBufRead, FromBufReadSI, ProcessCGroups,
};
pub use procfs::{
    net::{TcpNetEntry, TcpState},
    process::Stat,
    ProcessCGroup,
};

use crate::tenant_file::{self, FileId, TenantFile};

#[derive(Clone, Debug)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::new("/proc")
    }
}

/// The most of a maps text read: a process with more mappings than this names its libraries
/// in the first ones, and the rest cannot make the agent allocate.
const MAPS_MAX: u64 = 16 << 20;

impl ProcFs {
    /// `/proc/<pid>/maps`, at most [`MAPS_MAX`] bytes of it; `None` when it cannot be read.
    pub fn maps(&self, pid: u32) -> Option<Vec<u8>> {
        read_maps(&self.root.join(pid.to_string()))
    }

    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A handle on the process's directory: the files read through it are the same process's
    /// even if the pid is reused meanwhile.
    fn process(&self, pid: u32) -> Option<Process> {
        Process::new_with_root(self.root.join(pid.to_string())).ok()
    }

    /// The process's `comm`, or `None` when it is gone.
    pub fn comm(&self, pid: u32) -> Option<String> {
        let raw = std::fs::read_to_string(self.root.join(pid.to_string()).join("comm")).ok()?;
        Some(raw.trim_end_matches('\n').to_string())
    }

    pub fn alive(&self, pid: u32) -> bool {
        self.root.join(pid.to_string()).exists()
    }

    /// `/proc/<pid>/stat`, or `None` when the process is gone.
    pub fn stat(&self, pid: u32) -> Option<Stat> {
        self.process(pid)?.stat().ok()
    }

    /// The parent's pid.
    pub fn ppid(&self, pid: u32) -> Option<u32> {
        u32::try_from(self.stat(pid)?.ppid).ok()
    }

    /// The innermost of the process's pids (`NSpid` of `/proc/<pid>/status`): its pid in the
    /// pid namespace it runs in.
    pub fn innermost_pid(&self, pid: u32) -> Option<u32> {
        let status = self.process(pid)?.status().ok()?;
        u32::try_from(*status.nspid?.last()?).ok()
    }

    /// `/proc/<pid>/cgroup`; `None` when the process is gone.
    pub fn cgroups(&self, pid: u32) -> Option<Vec<ProcessCGroup>> {
        cgroups_of(&self.process(pid)?)
    }

    /// The cgroup the process's memory is accounted to ([`memory_cgroup`]), empty when the
    /// process is gone or cannot be told. On a v1 hierarchy the kernel shows an exiting
    /// process (an OOM victim being killed, say) in the root cgroup, `/`: that answer is
    /// believed only of a process that is not exiting.
    pub fn memory_cgroup(&self, pid: u32) -> String {
        let Some(process) = self.process(pid) else {
            return String::new();
        };
        let Some(groups) = cgroups_of(&process) else {
            return String::new();
        };
        let (path, v1) = memory_path(&groups);
        if path == "/" && v1 && process.stat().ok().map(|s| exiting(&s)) != Some(false) {
            return String::new();
        }
        path
    }

    /// Whether the process is exiting (`PF_EXITING` in the flags of `/proc/<pid>/stat`).
    pub fn exiting(&self, pid: u32) -> Option<bool> {
        Some(exiting(&self.stat(pid)?))
    }

    /// TCP sockets (`net/tcp` and `net/tcp6`) of the network namespace of `pid`, the agent's
    /// own when `pid` is `None`.
    pub fn tcp(&self, pid: Option<u32>) -> Vec<TcpNetEntry> {
        let dir = match pid {
            Some(p) => self.root.join(p.to_string()).join("net"),
            None => self.root.join("net"),
        };
        let mut all = Vec::new();
        for f in ["tcp", "tcp6"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(f)) {
                all.extend(tcp_table(&text));
            }
        }
        all
    }

    /// Unix sockets (`net/unix`) of the network namespace of `pid`: at most
    /// [`UNIX_TABLE_MAX`] bytes of the table are read.
    pub fn unix(&self, pid: u32) -> Vec<UnixSocket> {
        let path = self.root.join(pid.to_string()).join("net/unix");
        let mut text = String::new();
        if std::fs::File::open(path)
            .and_then(|f| f.take(UNIX_TABLE_MAX).read_to_string(&mut text))
            .is_err()
        {
            return Vec::new();
        }
        unix_table(&text)
    }

    /// The inode of the process's network namespace (`ns/net`), which names it.
    pub fn net_ns(&self, pid: u32) -> Option<u64> {
        let link = std::fs::read_link(self.root.join(pid.to_string()).join("ns/net")).ok()?;
        link.to_str()?
            .strip_prefix("net:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    }

    /// Whether thread `tid` of process `pid` is stopped (state `T` or `t`); `None` when it is
    /// gone.
    pub fn thread_stopped(&self, pid: u32, tid: u32) -> Option<bool> {
        let path = self
            .root
            .join(pid.to_string())
            .join("task")
            .join(tid.to_string())
            .join("stat");
        let text = std::fs::read(path).ok()?;
        // The state follows the last `)`: the command name in between may hold anything.
        let close = text.iter().rposition(|&b| b == b')')?;
        let state = *text.get(close + 2)?;
        Some(matches!(state, b'T' | b't'))
    }

    /// Numeric entries of the proc root.
    pub fn pids(&self) -> impl Iterator<Item = u32> {
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
    }
}

fn exiting(stat: &Stat) -> bool {
    const PF_EXITING: u32 = 0x4;
    stat.flags & PF_EXITING != 0
}

fn cgroups_of(process: &Process) -> Option<Vec<ProcessCGroup>> {
    let mut text = String::new();
    process
        .open_relative("cgroup")
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    Some(parse_cgroups(&text))
}

/// The lines of a `/proc/<pid>/cgroup` text.
pub fn parse_cgroups(text: &str) -> Vec<ProcessCGroup> {
    text.lines()
        .filter_map(|l| ProcessCGroups::from_buf_read(l.as_bytes()).ok())
        .flat_map(|g| g.0)
        .collect()
}

/// The cgroup a process's memory is accounted to: the v1 memory controller's path if there
/// is one, else the v2 path.
pub fn memory_cgroup(groups: &[ProcessCGroup]) -> String {
    memory_path(groups).0
}

/// [`memory_cgroup`], and whether it is the v1 memory controller's.
fn memory_path(groups: &[ProcessCGroup]) -> (String, bool) {
    let mut v2 = None;
    for g in groups {
        if g.controllers.iter().any(|c| c == "memory") {
            return (g.pathname.clone(), true);
        }
        if g.controllers.is_empty() {
            v2 = Some(g.pathname.clone());
        }
    }
    (v2.unwrap_or_default(), false)
}

/// The container id in a cgroup path (Docker, containerd, CRI-O; systemd and cgroupfs
/// drivers): the last 64-hex-digit run in the path.
pub fn container_id(path: &str) -> Option<String> {
    path.split(['/', '-', '.', ':'])
        .rev()
        .find(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
}

/// The sockets of a `/proc/net/tcp` or `tcp6` text (its first line is the header).
pub fn tcp_table(text: &str) -> Vec<TcpNetEntry> {
    let si = procfs::current_system_info();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            // procfs reads a whole table, header first: each line gets an empty one.
            TcpNetEntries::from_buf_read((&b"\n"[..]).chain(l.as_bytes()), si).ok()
        })
        .flat_map(|t| t.0)
        .collect()
}

/// Most bytes of a namespace's Unix socket table read (some 40,000 sockets).
pub const UNIX_TABLE_MAX: u64 = 4 << 20;

/// A line of `/proc/net/unix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixSocket {
    pub inode: u64,
    /// `SOCK_STREAM` (1), `SOCK_DGRAM` (2), `SOCK_SEQPACKET` (5).
    pub socket_type: u16,
    /// `SS_UNCONNECTED` (1) … `SS_CONNECTED` (3).
    pub state: u8,
    /// Listening (`__SO_ACCEPTCON` in the flags).
    pub listening: bool,
    /// The bound path (abstract names start with `@`). An accepted socket shows its
    /// listener's.
    pub path: Option<String>,
}

/// The sockets of a `/proc/net/unix` text (its first line is the header); a line that does
/// not parse is skipped. procfs's parser drops the flags, which tell a listener apart.
pub fn unix_table(text: &str) -> Vec<UnixSocket> {
    const ACCEPTCON: u32 = 0x10000;
    text.lines()
        .skip(1)
        .filter_map(|mut l| {
            // Num RefCount Protocol Flags Type St Inode [Path]; a path may hold spaces.
            for _ in 0..3 {
                token(&mut l)?;
            }
            let flags = u32::from_str_radix(token(&mut l)?, 16).ok()?;
            let socket_type = u16::from_str_radix(token(&mut l)?, 16).ok()?;
            let state = u8::from_str_radix(token(&mut l)?, 16).ok()?;
            let inode = token(&mut l)?.parse().ok()?;
            let path = l.trim_start();
            Some(UnixSocket {
                inode,
                socket_type,
                state,
                listening: flags & ACCEPTCON != 0,
                path: (!path.is_empty()).then(|| path.to_string()),
            })
        })
        .collect()
}

/// The next space-separated token of `line`, which is left after it.
fn token<'a>(line: &mut &'a str) -> Option<&'a str> {
    let l = line.trim_start_matches(' ');
    let end = l.find(' ').unwrap_or(l.len());
    let (t, rest) = l.split_at(end);
    *line = rest;
    (!t.is_empty()).then_some(t)
}

/// `<proc_pid>/maps` (`proc_pid` being `/proc/<pid>` or a captured tree's), bounded.
pub fn read_maps(proc_pid: &Path) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(proc_pid.join("maps"))
        .ok()?
        .take(MAPS_MAX)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// A mapping of a file, as its `/proc/<pid>/maps` line names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMapping {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    pub offset: u64,
    /// Device and inode, as the line names them.
    pub id: FileId,
    /// The path as the process sees it, without the ` (deleted)` suffix (and, procfs
    /// trimming it, without whitespace at its ends).
    pub path: String,
    /// The file was deleted (or replaced) since it was mapped: only `map_files` reaches it.
    pub deleted: bool,
}

impl FileMapping {
    /// `start-end` as `map_files` names the mapping (no leading zeros, which it refuses).
    pub fn range(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }
}

/// One maps line → the file mapping it describes; `None` for anonymous and pseudo mappings
/// (`[heap]`, `[vdso]`, ...), an inverted range, and a line procfs does not parse.
pub fn file_mapping(line: &str) -> Option<FileMapping> {
    // procfs slices a `/SYSV` name (a SysV shared memory segment) at fixed byte offsets and
    // a `[stack:` one at its last byte, and panics where that is no character boundary; a
    // tenant names its own files `/SYSV`.
    let name = line.splitn(6, ' ').nth(5).unwrap_or("").trim();
    if (name.starts_with("/SYSV") && name.get(5..13).is_none())
        || (name.starts_with("[stack:") && !name.is_ascii())
    {
        return None;
    }
    let m = MemoryMaps::from_buf_read(line.as_bytes())
        .ok()?
        .0
        .into_iter()
        .next()?;
    let MMapPath::Path(path) = m.pathname else {
        return None;
    };
    // The line was text, so is the path.
    let path = path.to_str()?;
    let (start, end) = m.address;
    if !path.starts_with('/') || start > end {
        return None;
    }
    let (path, deleted) = match path.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (path, false),
    };
    let major = u32::try_from(m.dev.0).ok()?;
    let minor = u32::try_from(m.dev.1).ok()?;
    Some(FileMapping {
        start,
        end,
        executable: m.perms.contains(MMPermissions::EXECUTE),
        offset: m.offset,
        id: FileId {
            dev: libc::makedev(major, minor),
            ino: m.inode,
        },
        path: path.to_string(),
        deleted,
    })
}

/// One executable file mapping of a process, with the mapped file as it was opened at
/// capture: what symbolizing its stacks needs after the process is gone.
#[derive(Clone, Debug)]
pub struct ExecMapping {
    pub map: FileMapping,
    /// The mapped file, opened at capture; `None` when it could not be (its frames then
    /// name the module and offset only).
    pub file: Option<Arc<TenantFile>>,
}

impl PartialEq for ExecMapping {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl Eq for ExecMapping {}

/// The executable mappings of the process at `proc_pid` (`/proc/<pid>`), each file opened
/// once inside the process's root (else through `map_files`); files that cannot be opened
/// safely are left unopened. Opened inside the root with device and inode checked
/// ([`crate::tenant_file`]), a tenant's path cannot name a host file for the agent to read.
pub fn capture_exec_maps(proc_pid: &Path) -> Vec<ExecMapping> {
    let Some(raw) = read_maps(proc_pid) else {
        return Vec::new();
    };
    let mut maps = parse_exec_maps(&String::from_utf8_lossy(&raw));
    let mut opened: HashMap<FileId, Option<Arc<TenantFile>>> = HashMap::new();
    let root = proc_pid.join("root");
    for ExecMapping { map: m, file } in &mut maps {
        *file = opened
            .entry(m.id)
            .or_insert_with(|| {
                let by_path = (!m.deleted)
                    .then(|| tenant_file::open_in_root(&root, &m.path, Some(m.id)).ok())
                    .flatten();
                by_path
                    .or_else(|| tenant_file::open_mapping(proc_pid, &m.range(), Some(m.id)).ok())
                    .map(Arc::new)
            })
            .clone();
    }
    maps
}

/// Executable file mappings of a `/proc/<pid>/maps` text, their files not opened.
pub fn parse_exec_maps(text: &str) -> Vec<ExecMapping> {
    text.lines()
        .filter_map(file_mapping)
        .filter(|m| m.executable)
        .map(|map| ExecMapping { map, file: None })
        .collect()
}

/// Files of captured proc trees, as the kernel writes them.
#[cfg(test)]
pub mod fixture {
    /// A `/proc/<pid>/stat` line: every field the kernel writes, the named ones as given.
    pub fn stat(pid: u32, comm: &str, ppid: u32, flags: u32) -> String {
        format!(
            "{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 {flags} 100 0 0 0 0 0 0 0 20 0 1 0 \
             1124491 3133440 374 18446744073709551615 1 1 1 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 \
             1 1 1 1 1 1 1 0\n"
        )
    }

    /// A `/proc/<pid>/status` text with the fields the kernel always writes.
    pub fn status(name: &str, nspid: &str) -> String {
        format!(
            "Name:\t{name}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t1\nNgid:\t0\nPid:\t1\n\
             PPid:\t0\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t64\n\
             Groups:\t \nNStgid:\t{nspid}\nNSpid:\t{nspid}\nThreads:\t1\nSigQ:\t0/96367\n\
             SigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n\
             SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n\
             SigCgt:\t0000000000000000\nCapInh:\t0000000000000000\n\
             CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exiting_process_in_the_v1_root_has_no_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let procfs = ProcFs::new(dir.path());
        let v1_root = "12:memory:/\n0::/user.slice\n";
        for (pid, cgroup, flags, want) in [
            // Killed by the OOM killer: exiting, shown in the v1 root.
            (1, v1_root, 4194564, ""),
            // Really in the root cgroup, alive.
            (2, v1_root, 4194560, "/"),
            (3, "12:memory:/job\n", 4194564, "/job"),
            // v2 keeps the real path of an exiting process.
            (4, "0::/\n", 4194564, "/"),
        ] {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("cgroup"), cgroup).unwrap();
            std::fs::write(p.join("stat"), fixture::stat(pid, "py (x)", 1, flags)).unwrap();
            assert_eq!(procfs.memory_cgroup(pid), want, "pid {pid}");
        }
        assert_eq!(procfs.memory_cgroup(99), "", "gone");
        std::fs::remove_file(dir.path().join("1/stat")).unwrap();
        assert_eq!(procfs.memory_cgroup(1), "", "cannot be told");
    }

    #[test]
    fn finds_the_memory_cgroup_and_container() {
        let v1 = "12:memory:/kubepods/burstable/pod1/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n3:cpu:/x\n0::/\n";
        assert!(memory_cgroup(&parse_cgroups(v1)).starts_with("/kubepods/burstable/pod1/"));
        let v2 = "0::/kubepods.slice/kubepods-pod2.slice/cri-containerd-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.scope\n";
        let path = memory_cgroup(&parse_cgroups(v2));
        assert_eq!(container_id(&path).unwrap(), "a".repeat(64));
        assert_eq!(container_id("/user.slice"), None);
        assert_eq!(memory_cgroup(&parse_cgroups("garbage")), "");
        // A line that does not parse costs that line only; a path may hold colons.
        let groups = parse_cgroups("x:memory:/bad\n\n4:memory:/a:b\n");
        assert_eq!(memory_cgroup(&groups), "/a:b");
    }

    #[test]
    fn the_parent_is_read_past_a_comm_with_spaces_and_parentheses() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("20");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("stat"), fixture::stat(20, "a) S 99 (b", 10, 4)).unwrap();
        let procfs = ProcFs::new(dir.path());
        assert_eq!(procfs.ppid(20), Some(10));
        assert_eq!(procfs.exiting(20), Some(true));
        assert_eq!(procfs.stat(20).unwrap().comm, "a) S 99 (b");
        std::fs::write(p.join("stat"), "20 (truncated").unwrap();
        assert_eq!(procfs.ppid(20), None);
        assert_eq!(procfs.ppid(21), None, "gone");
    }

    #[test]
    fn reads_this_process() {
        let procfs = ProcFs::default();
        let me = std::process::id();
        assert_eq!(procfs.ppid(me), Some(std::os::unix::process::parent_id()));
        assert_eq!(procfs.exiting(me), Some(false));
        assert!(procfs.innermost_pid(me).is_some());
        assert!(!procfs.cgroups(me).unwrap().is_empty());
    }

    #[test]
    fn reads_the_innermost_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("5000");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("status"), fixture::status("x (y)", "5000\t7")).unwrap();
        let procfs = ProcFs::new(dir.path());
        assert_eq!(procfs.innermost_pid(5000), Some(7));
        std::fs::write(p.join("status"), "Name:\tx\nNSpid:\t5000\t7\n").unwrap();
        assert_eq!(procfs.innermost_pid(5000), None, "not the kernel's status");
    }

    #[test]
    fn parses_tcp_tables_line_by_line() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 20 4 30 10 -1\n garbage\n   2: 0100007F:1F91 00000000:0000 0D 0:0 0:0 0 0 0 12347 1\n   3: 0100007F:1F92 00000000:0000 0A 0:0 0:0 0 0 0 12348 1\n";
        let s = tcp_table(text);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(
            (s[0].local_address.to_string(), &s[0].state, s[0].inode),
            ("127.0.0.1:8080".into(), &TcpState::Listen, 12345)
        );
        assert_eq!(s[1].state, TcpState::Established);
        // An unknown state costs its line only.
        assert_eq!(s[2].local_address.port(), 0x1F92);
        let v6 = "sl local rem st\n 0: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 7 1\n \
                  1: 0000000000000000FFFF00000100007F:1F41 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 8 1\n";
        let s6 = tcp_table(v6);
        assert_eq!(s6[0].local_address.to_string(), "[::1]:8000");
        assert_eq!(s6[1].local_address.to_string(), "[::ffff:127.0.0.1]:8001");
        assert!(tcp_table("header only\n").is_empty());
    }

    #[test]
    fn parses_file_mappings() {
        let m = file_mapping("7f00-7f10 r-xp 00001000 fd:01 42 /opt/drv/libcuda.so.1").unwrap();
        assert_eq!(
            m,
            FileMapping {
                start: 0x7f00,
                end: 0x7f10,
                executable: true,
                offset: 0x1000,
                id: FileId {
                    dev: libc::makedev(0xfd, 1),
                    ino: 42
                },
                path: "/opt/drv/libcuda.so.1".into(),
                deleted: false,
            }
        );
        // The kernel pads before the name; map_files names ranges without leading zeros.
        let d = file_mapping(
            "00400000-00452000 r--p 00000000 08:10 9                          /x/a b.so (deleted)",
        )
        .unwrap();
        assert!(d.deleted && !d.executable && d.path == "/x/a b.so", "{d:?}");
        assert_eq!(d.range(), "400000-452000");
        for bad in [
            "7f00-7f10 rw-p 00000000 00:00 0 ",
            "7f00-7f10 r-xp 00000000 00:00 0                          [vdso]",
            "7f00-7f10 r-xp 00000000 00:00 0 [stack:é",
            "7f00-7f10 r-xp 00000000 00:00 0 [anon:x]",
            "7f00-7f10 r-xp 00000000 fd:01 42 /SYSV",
            "7f00-7f10 r-xp 00000000 fd:01 42 /SYSVaé",
            "7f00-7f10 r-xp 00000000 fd:01 42 /SYSV0000002a (deleted)",
            "7f00-7f10 r-xp 00000000 fd:01 x /a/b.so",
            "7f00-7f10 r-xp 00000000 zz:01 42 /a/b.so",
            "7f00-7f10 r-xp 00000000 -1:01 42 /a/b.so",
            "7f00 r-xp 00000000 fd:01 42 /a/b.so",
            "7f10-7f00 r-xp 00000000 fd:01 42 /a/b.so",
            "7f00-7f10 r-xp 00000000 fd:01 42 b.so",
            "7f00-7f10 r-xp 00000000 fd:01 42 anon_inode:[perf_event]",
            "Size:  4 kB",
            "garbage",
            "",
        ] {
            assert_eq!(file_mapping(bad), None, "{bad}");
        }
    }

    #[test]
    fn parses_executable_mappings() {
        let maps = parse_exec_maps(
            "5600-5700 r--p 00000000 fd:01 1 /usr/bin/x\n\
             5700-5800 r-xp 00001000 fd:01 1 /usr/bin/x\n\
             7f00-7f10 r-xp 00000000 00:00 0 [vdso]\n\
             7f10-7f20 r-xp 00002000 fd:01 2 /opt/lib/libcuda.so.1 (deleted)\n\
             garbage\n",
        );
        assert_eq!(
            maps,
            vec![
                ExecMapping {
                    map: FileMapping {
                        start: 0x5700,
                        end: 0x5800,
                        executable: true,
                        offset: 0x1000,
                        path: "/usr/bin/x".into(),
                        deleted: false,
                        id: FileId {
                            dev: libc::makedev(0xfd, 1),
                            ino: 1
                        },
                    },
                    file: None,
                },
                ExecMapping {
                    map: FileMapping {
                        start: 0x7f10,
                        end: 0x7f20,
                        executable: true,
                        offset: 0x2000,
                        path: "/opt/lib/libcuda.so.1".into(),
                        deleted: true,
                        id: FileId {
                            dev: libc::makedev(0xfd, 1),
                            ino: 2
                        },
                    },
                    file: None,
                },
            ]
        );
    }

    #[test]
    fn captures_open_the_processs_own_files_never_a_hosts() {
        use std::os::unix::fs::{symlink, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let proc_pid = dir.path().join("77");
        std::fs::create_dir_all(proc_pid.join("root/opt")).unwrap();
        std::fs::write(proc_pid.join("root/opt/app"), b"tenant code").unwrap();
        let host = dir.path().join("host-lib");
        std::fs::write(&host, b"host code").unwrap();
        symlink(&host, proc_pid.join("root/opt/evil")).unwrap();
        let line = |path: &Path, name: &str| {
            let m = std::fs::metadata(path).unwrap();
            format!(
                "1000-2000 r-xp 00000000 {:x}:{:x} {} /opt/{name}\n",
                libc::major(m.dev()),
                libc::minor(m.dev()),
                m.ino()
            )
        };
        let maps = line(&proc_pid.join("root/opt/app"), "app") + &line(&host, "evil");
        std::fs::write(proc_pid.join("maps"), maps).unwrap();
        let captured = capture_exec_maps(&proc_pid);
        assert_eq!(captured.len(), 2);
        let app = captured[0]
            .file
            .as_ref()
            .expect("the tenant's own file opens");
        assert_eq!(std::fs::read(app.fd_path()).unwrap(), b"tenant code");
        // The maps line names the host file's inode, but inside the tenant's root the path
        // leads nowhere: not opened (and no map_files in a captured tree).
        assert!(captured[1].file.is_none());
    }
}

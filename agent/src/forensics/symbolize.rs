//! User call stacks: the probes store instruction pointers in the `CUDA_STACKS` map; here
//! they become frames (function, file and line where debug info exists, module and offset
//! otherwise) with blazesym. Addresses are turned into file offsets with the process's
//! executable mappings as captured at the trigger, so a process that is gone by the time the
//! report is written (it crashed, or exited right after its OOM) still gets named frames.
//!
//! The files are the process's own, opened at the trigger inside its root with device and
//! inode checked ([`crate::tenant_file`]), and symbolized through those descriptors: frames of
//! a container resolve against its files, never against files of the same name on the host,
//! and a tenant's path cannot name a host file for the agent to read.

use std::{collections::HashMap, path::Path, sync::Arc};

use aya::maps::{MapData, StackTraceMap};
use blazesym::symbolize::{
    source::{Elf, Source},
    Input, Symbolized, Symbolizer,
};

use super::report::Frame;
use crate::{
    proc::FileMapping,
    tenant_file::{self, FileId, TenantFile},
};

/// One executable file mapping of a process (`/proc/<pid>/maps`).
#[derive(Clone, Debug)]
pub struct Mapping {
    pub map: FileMapping,
    /// The mapped file, opened at capture; `None` when it could not be (its frames then
    /// name the module and offset only).
    pub file: Option<Arc<TenantFile>>,
}

impl PartialEq for Mapping {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl Eq for Mapping {}

/// The executable mappings of the process at `proc_pid` (`/proc/<pid>`), each file opened
/// once inside the process's root (else through `map_files`); files that cannot be opened
/// safely are left unopened.
pub fn capture(proc_pid: &Path) -> Vec<Mapping> {
    let Some(raw) = crate::proc::read_maps(proc_pid) else {
        return Vec::new();
    };
    let mut maps = parse_maps(&String::from_utf8_lossy(&raw));
    let mut opened: HashMap<FileId, Option<Arc<TenantFile>>> = HashMap::new();
    let root = proc_pid.join("root");
    for Mapping { map: m, file } in &mut maps {
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

/// Executable file mappings of a `/proc/<pid>/maps` text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(crate::proc::file_mapping)
        .filter(|m| m.executable)
        .map(|map| Mapping { map, file: None })
        .collect()
}

pub struct Stacks {
    map: Option<StackTraceMap<MapData>>,
    symbolizer: Symbolizer,
    cache: HashMap<(u32, i32), Vec<Frame>>,
}

impl Stacks {
    pub fn new(map: Option<StackTraceMap<MapData>>) -> Self {
        Self {
            map,
            symbolizer: Symbolizer::new(),
            cache: HashMap::new(),
        }
    }

    /// The frames of stack `id` captured in process `pid` (empty when unknown).
    pub fn frames(&mut self, pid: u32, id: i32, maps: &[Mapping]) -> Vec<Frame> {
        if id < 0 {
            return Vec::new();
        }
        if let Some(f) = self.cache.get(&(pid, id)) {
            return f.clone();
        }
        let Some(map) = &self.map else {
            return Vec::new();
        };
        let Ok(trace) = map.get(&(id as u32), 0) else {
            return Vec::new();
        };
        let ips: Vec<u64> = trace
            .frames()
            .iter()
            .map(|f| f.ip)
            .filter(|ip| *ip != 0)
            .collect();
        let frames = ips
            .iter()
            .map(|ip| self.frame(*ip, maps))
            .collect::<Vec<_>>();
        if self.cache.len() > 4096 {
            self.cache.clear();
        }
        self.cache.insert((pid, id), frames.clone());
        frames
    }

    fn frame(&self, ip: u64, maps: &[Mapping]) -> Frame {
        let mut frame = Frame {
            address: ip,
            function: None,
            module: None,
            file: None,
            line: None,
            offset: None,
        };
        let Some(Mapping { map: m, file }) =
            maps.iter().find(|m| ip >= m.map.start && ip < m.map.end)
        else {
            return frame;
        };
        let file_offset = ip - m.start + m.offset;
        frame.module = Some(m.path.clone());
        frame.offset = Some(file_offset);
        let Some(file) = file else {
            return frame;
        };
        let src = Source::Elf(Elf::new(file.fd_path()));
        let Ok(mut syms) = self
            .symbolizer
            .symbolize(&src, Input::FileOffset(&[file_offset]))
        else {
            return frame;
        };
        if let Some(Symbolized::Sym(sym)) = syms.pop() {
            frame.function = Some(sym.name.to_string());
            if let Some(c) = &sym.code_info {
                let file = c.file.to_string_lossy();
                frame.file = Some(match &c.dir {
                    Some(d) => d.join(&*file).display().to_string(),
                    None => file.into_owned(),
                });
                frame.line = c.line;
            }
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_executable_mappings() {
        let maps = parse_maps(
            "5600-5700 r--p 00000000 fd:01 1 /usr/bin/x\n\
             5700-5800 r-xp 00001000 fd:01 1 /usr/bin/x\n\
             7f00-7f10 r-xp 00000000 00:00 0 [vdso]\n\
             7f10-7f20 r-xp 00002000 fd:01 2 /opt/lib/libcuda.so.1 (deleted)\n\
             garbage\n",
        );
        assert_eq!(
            maps,
            vec![
                Mapping {
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
                Mapping {
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
        let captured = capture(&proc_pid);
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

    #[test]
    fn names_a_function_of_this_test_binary() {
        let maps = capture(Path::new("/proc/self"));
        assert!(maps.iter().all(|m| m.file.is_some()), "{maps:?}");
        let stacks = Stacks::new(None);
        let ip = names_a_function_of_this_test_binary as *const () as u64;
        let frame = stacks.frame(ip, &maps);
        let name = frame.function.unwrap_or_default();
        assert!(
            name.contains("names_a_function_of_this_test_binary"),
            "{name:?}"
        );
        assert!(frame.module.unwrap().contains("inferscope"));
    }
}

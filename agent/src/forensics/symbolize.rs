//! User call stacks: the probes store instruction pointers in the `CUDA_STACKS` map; here
//! they become frames (function, file and line where debug info exists, module and offset
//! otherwise) with blazesym. Addresses are turned into file offsets with the process's
//! executable mappings as captured at the trigger, so a process that is gone by the time the
//! report is written (it crashed, or exited right after its OOM) still gets named frames.

use std::collections::HashMap;

use aya::maps::{MapData, StackTraceMap};
use blazesym::symbolize::{
    source::{Elf, Source},
    Input, Symbolized, Symbolizer,
};

use super::report::Frame;

/// One executable file mapping of a process (`/proc/<pid>/maps`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub path: String,
}

/// Executable file mappings of a `/proc/<pid>/maps` text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            let _dev = f.next()?;
            let _inode = f.next()?;
            let path = f.collect::<Vec<_>>().join(" ");
            if !perms.contains('x') || !path.starts_with('/') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                offset,
                path: path.trim_end_matches(" (deleted)").to_string(),
            })
        })
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
        let Some(m) = maps.iter().find(|m| ip >= m.start && ip < m.end) else {
            return frame;
        };
        let file_offset = ip - m.start + m.offset;
        frame.module = Some(m.path.clone());
        frame.offset = Some(file_offset);
        let src = Source::Elf(Elf::new(&m.path));
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
                    start: 0x5700,
                    end: 0x5800,
                    offset: 0x1000,
                    path: "/usr/bin/x".into()
                },
                Mapping {
                    start: 0x7f10,
                    end: 0x7f20,
                    offset: 0x2000,
                    path: "/opt/lib/libcuda.so.1".into()
                },
            ]
        );
    }

    #[test]
    fn names_a_function_of_this_test_binary() {
        let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
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

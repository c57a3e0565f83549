//! User call stacks: the probes store instruction pointers in the `CUDA_STACKS` map; here
//! they become frames (function, file and line where debug info exists, module and offset
//! otherwise) with blazesym. Addresses are turned into file offsets with the process's
//! executable mappings as the tracker captured them at the trigger
//! ([`crate::proc::capture_exec_maps`]), so a process that is gone by the time the report is
//! written (it crashed, or exited right after its OOM) still gets named frames.
//!
//! The files are the process's own, opened at the trigger inside its root with device and
//! inode checked ([`crate::tenant_file`]), and symbolized through those descriptors: frames of
//! a container resolve against its files, never against files of the same name on the host,
//! and a tenant's path cannot name a host file for the agent to read.

use std::collections::HashMap;

use aya::maps::{MapData, StackTraceMap};
use blazesym::symbolize::{
    source::{Elf, Source},
    Input, Symbolized, Symbolizer,
};

use super::report::Frame;
use crate::proc::ExecMapping;

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
    pub fn frames(&mut self, pid: u32, id: i32, maps: &[ExecMapping]) -> Vec<Frame> {
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

    fn frame(&self, ip: u64, maps: &[ExecMapping]) -> Frame {
        let mut frame = Frame {
            address: ip,
            function: None,
            module: None,
            file: None,
            line: None,
            offset: None,
        };
        let Some(ExecMapping { map: m, file }) =
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
    use std::path::Path;

    use super::*;
    use crate::proc::capture_exec_maps;

    #[test]
    fn names_a_function_of_this_test_binary() {
        let maps = capture_exec_maps(Path::new("/proc/self"));
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

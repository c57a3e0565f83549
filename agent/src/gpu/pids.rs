//! NVML reports the pids the driver sees. Where they are not pids of the agent's `/proc`
//! (the agent or the workload in another pid namespace), the host pid is the process whose
//! innermost `NSpid` is the reported pid and that maps a CUDA driver library.

use std::collections::HashMap;

use crate::proc::ProcFs;

pub struct PidMapper {
    procfs: ProcFs,
    cache: HashMap<u32, u32>,
}

impl PidMapper {
    pub fn new(procfs: ProcFs) -> Self {
        Self {
            procfs,
            cache: HashMap::new(),
        }
    }

    /// The pid in the agent's `/proc` of the process NVML reports as `pid`.
    pub fn host_pid(&mut self, pid: u32) -> Option<u32> {
        if let Some(host) = self.cache.get(&pid) {
            if self.procfs.alive(*host) {
                return Some(*host);
            }
            self.cache.remove(&pid);
        }
        let host = if self.maps_cuda(pid) {
            Some(pid)
        } else {
            self.by_nspid(pid)
        }?;
        self.cache.insert(pid, host);
        Some(host)
    }

    fn maps_cuda(&self, pid: u32) -> bool {
        self.procfs
            .maps(pid)
            .is_some_and(|m| m.windows(7).any(|w| w == b"libcuda"))
    }

    fn by_nspid(&self, pid: u32) -> Option<u32> {
        let mut found = None;
        for host in self.procfs.pids() {
            if self.procfs.innermost_pid(host) == Some(pid) && host != pid && self.maps_cuda(host) {
                if found.is_some() {
                    // Ambiguous: two containers each have a process with that pid.
                    return None;
                }
                found = Some(host);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(root: &std::path::Path, pid: u32, nspid: &str, cuda: bool) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("status"), crate::proc::fixture::status("x", nspid)).unwrap();
        let maps = if cuda {
            "7f-8f r-xp 0 fd:01 9 /usr/lib/libcuda.so.1\n"
        } else {
            ""
        };
        std::fs::write(dir.join("maps"), maps).unwrap();
    }

    #[test]
    fn maps_namespaced_pids_to_host_pids() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        proc(root, 4242, "4242", true); // a host process using CUDA
        proc(root, 5000, "5000\t7", true); // container process, pid 7 inside
        proc(root, 7, "7", false); // an unrelated host pid 7
        proc(root, 6000, "6000\t8", true); // two containers with a pid 8 each
        proc(root, 6001, "6001\t8", true);
        let mut m = PidMapper::new(ProcFs::new(root));
        assert_eq!(m.host_pid(4242), Some(4242));
        assert_eq!(m.host_pid(7), Some(5000));
        assert_eq!(m.host_pid(8), None, "ambiguous");
        assert_eq!(m.host_pid(9), None);
    }
}

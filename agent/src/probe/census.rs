//! Entries in the agent's per-process and per-thread BPF maps, counted by map id from any
//! process (as `bpftool map dump` would), so that the bench and the tests can show a churn of
//! processes leaves nothing behind in the kernel. The agent itself never walks its maps.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::loaded_maps;

/// The agent's maps keyed by process, thread or connection (names as the kernel keeps them,
/// 15 bytes at most).
pub const PER_PROCESS: &[&str] = &[
    "DRIVER_REPORTED",
    "HTTP_WATCHED",
    "HTTP_CONNS",
    "CUDA_STASH",
    "CUDA_CTX_DEVICE",
    "CUDA_THREAD_CTX",
    "CUDA_PROCESSES",
    "CUDA_FAIL_STACK",
    "CUDA_FREEZE",
    "TLS_REPORTED",
    "TLS_CALLS",
    "TLS_SSL_FD",
    "TLS_LAST_READ",
    "STOPPED",
];

#[derive(Debug, thiserror::Error)]
pub enum CensusError {
    #[error("cannot list the loaded BPF maps")]
    Map(#[source] aya::maps::MapError),
    #[error("cannot walk a BPF map's keys")]
    Walk(#[source] std::io::Error),
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The `bpf_attr` of `BPF_MAP_*_ELEM` and `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// Entries per map name in [`PER_PROCESS`], summed over every loaded map of that name.
pub fn entries() -> Result<BTreeMap<&'static str, u64>, CensusError> {
    let mut out: BTreeMap<&'static str, u64> = PER_PROCESS.iter().map(|n| (*n, 0)).collect();
    for info in loaded_maps() {
        let info = info.map_err(CensusError::Map)?;
        let Some(name) = info
            .name_as_str()
            .and_then(|n| PER_PROCESS.iter().find(|p| **p == n))
        else {
            continue;
        };
        let fd = info.fd().map_err(CensusError::Map)?;
        *out.entry(name).or_default() += count_keys(
            fd.as_fd().as_raw_fd(),
            info.key_size() as usize,
            info.max_entries(),
        )?;
    }
    Ok(out)
}

/// Walks the keys of a hash map. Deletions during the walk restart it at the first key, so the
/// walk stops after `max_entries` steps whatever happens.
fn count_keys(fd: i32, key_size: usize, max_entries: u32) -> Result<u64, CensusError> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut n = 0u64;
    let mut first = true;
    while n <= u64::from(max_entries) {
        let attr = ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: a valid attr for this command; both buffers are key_size bytes and live
        // across the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const ElemAttr,
                size_of::<ElemAttr>(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(n);
            }
            return Err(CensusError::Walk(e));
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(n)
}

//! `/proc/<pid>/maps` lines as the agent parses them, on arbitrary text: a tenant names its
//! files (spaces, newlines excepted, ` (deleted)` suffixes, `/SYSV…`, anything else) and the
//! kernel prints them there. Every reader runs: the line parser over procfs
//! (`proc::file_mapping`), driver discovery (`probe::discover::parse_maps_line`) and the
//! forensic mappings (`proc::parse_exec_maps`).
//!
//! Besides "no panic" (procfs itself panics on some names; the agent must keep them from it),
//! it checks: a file mapping's path is absolute, its range is not inverted, and printing it
//! back as a maps line reads back the same; a driver mapping names a `libcuda.so*` and agrees
//! with the file mapping of its line; a forensic mapping is executable.
//! Seeds: `fuzz/seeds/proc_maps`.

#![no_main]

use inferscope::{
    probe::discover::{is_cuda_driver, parse_maps_line},
    proc::{file_mapping, parse_exec_maps, FileMapping},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let Some(m) = file_mapping(line) else {
            assert_eq!(parse_maps_line(42, line), None, "{line:?}");
            continue;
        };
        assert!(m.path.starts_with('/') && m.start <= m.end, "{line:?}");
        let printed = print(&m);
        assert_eq!(file_mapping(&printed).as_ref(), Some(&m), "{printed:?}");
        let Some(d) = parse_maps_line(42, line) else {
            assert!(!is_cuda_driver(&m.path), "{line:?}");
            continue;
        };
        assert!(is_cuda_driver(&d.path), "{line:?}");
        assert_eq!(
            (d.pid, &d.range, d.id, &d.path, d.deleted),
            (42, &m.range(), m.id, &m.path, m.deleted)
        );
    }
    for m in parse_exec_maps(&text) {
        assert!(m.map.executable && m.map.path.starts_with('/'));
        assert!(m.map.start <= m.map.end, "{m:?}");
    }
});

/// The line the kernel would print for `m`.
fn print(m: &FileMapping) -> String {
    format!(
        "{} r{}p {:08x} {:x}:{:x} {} {}{}",
        m.range(),
        if m.executable { "-x" } else { "--" },
        m.offset,
        libc_major(m.id.dev),
        libc_minor(m.id.dev),
        m.id.ino,
        m.path,
        if m.deleted { " (deleted)" } else { "" }
    )
}

// glibc's gnu_dev_major/minor, as `libc::major`/`minor` compute them.
fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

//! `/proc/<pid>/maps` lines as the agent parses them, on arbitrary text: a tenant names its
//! files (spaces, newlines excepted, ` (deleted)` suffixes, anything else) and the kernel
//! prints them there. Both readers run: driver discovery (`probe::discover::parse_maps_line`)
//! and the forensic mappings (`forensics::symbolize::parse_maps`).
//!
//! Besides "no panic", it checks: a driver mapping's path is absolute and names a
//! `libcuda.so*`, its range parses, and printing it back as a maps line reads back the same;
//! a forensic mapping is executable, absolute, and its range is not inverted.
//! Seeds: `fuzz/seeds/proc_maps`.

#![no_main]

use inferscope::{
    forensics::symbolize::parse_maps,
    probe::discover::{is_cuda_driver, parse_maps_line},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let Some(m) = parse_maps_line(42, line) else {
            continue;
        };
        assert_eq!(m.pid, 42);
        assert!(
            m.path.starts_with('/') && is_cuda_driver(&m.path),
            "{line:?}"
        );
        let (start, end) = m.range.split_once('-').expect("range");
        assert!(u64::from_str_radix(start, 16).is_ok() && u64::from_str_radix(end, 16).is_ok());
        let printed = format!(
            "{} r-xp 00000000 {:x}:{:x} {} {}{}",
            m.range,
            libc_major(m.id.dev),
            libc_minor(m.id.dev),
            m.id.ino,
            m.path,
            if m.deleted { " (deleted)" } else { "" }
        );
        assert_eq!(
            parse_maps_line(42, &printed).as_ref(),
            Some(&m),
            "{printed:?}"
        );
    }
    for m in parse_maps(&text) {
        assert!(m.path.starts_with('/'));
        assert!(m.start <= m.end, "{m:?}");
    }
});

// glibc's gnu_dev_major/minor, as `libc::major`/`minor` compute them.
fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

//! The agent's ELF symbol reader (`inferscope::probe::elf`) on arbitrary bytes, as a tenant's
//! `libcuda.so*` would hand it: through a file read with positioned reads and a byte budget
//! (`BoundedFile`, what the agent uses), and from memory.
//!
//! Besides "no panic", it checks what attaching relies on: what the in-memory reader finds,
//! the bounded one finds at the same offsets (the budget changes what can be read, never what
//! is found), every offset lies inside the file, and the bounded reader never reads more than
//! its budget.
//! Seeds: `fuzz/seeds/elf_symbols` (the CUDA driver double, stripped).

#![no_main]

use std::io::Write;

use inferscope::probe::elf::{parse_symbols, BoundedFile};
use libfuzzer_sys::fuzz_target;

const WANTED: &[&str] = &["cuMemAlloc_v2", "cuMemFree_v2", "cuMemCreate", "cuInit"];
const BUDGET: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // ELF structures are read in place and must be aligned, as a file's pages are; the
    // fuzzer's buffer is not.
    let mut words = vec![0u64; data.len().div_ceil(8)];
    // SAFETY: the words hold at least `data.len()` bytes.
    let aligned =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), data.len()) };
    aligned.copy_from_slice(data);
    let data: &[u8] = aligned;
    let in_memory = parse_symbols(data, WANTED);
    let mut file = tempfile::tempfile().expect("temp file");
    file.write_all(data).expect("write");
    let reader = BoundedFile::new(&file, data.len() as u64, BUDGET);
    let bounded = parse_symbols(&reader, WANTED);
    assert!(reader.spent(BUDGET) <= BUDGET);
    for found in [&in_memory, &bounded].into_iter().flatten() {
        for (name, sym) in &found.found {
            assert!(WANTED.contains(&name.as_str()));
            assert!(sym.offset < data.len() as u64, "{name} at {}", sym.offset);
        }
    }
    // Within the budget, every symbol found in memory is found through
    // the file at the same offset. Not the converse: each positioned read lands in a fresh
    // aligned buffer, so tables at odd offsets, refused (or skipped) in place, are read
    // through the file.
    if let (Ok(a), false) = (in_memory, reader.exhausted()) {
        match bounded {
            Ok(b) => {
                for (name, sym) in &a.found {
                    assert_eq!(b.found.get(name), Some(sym), "{name}");
                }
            }
            Err(e) => panic!("read in memory, not through the file: {e}"),
        }
    }
});

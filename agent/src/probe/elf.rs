//! What a CUDA driver library offers: which probed symbols it exports, where each lies in the
//! file (the offset the uprobe is attached at), and how the kernel will have to handle a
//! breakpoint on its first instruction (which sets its probe cost).
//!
//! The file is a tenant's: it is read through the descriptor the agent checked, with
//! positioned reads of only what the symbol lookup needs (headers, the dynamic symbol and
//! string tables, 8 bytes at each wanted symbol), never mapped (a tenant truncating a mapped
//! file would kill the agent with SIGBUS) and never read whole, within [`READ_BUDGET`] bytes.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    fs::File,
    ops::Range,
    os::unix::fs::FileExt,
};

use object::{Object, ObjectSection, ObjectSymbol, ReadRef};

/// Bytes one library may make the agent read (a real libcuda's tables are well under 2 MiB).
pub const READ_BUDGET: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("{path} is not an ELF shared object (or its tables exceed the read budget)")]
    Parse {
        path: String,
        #[source]
        source: object::Error,
    },
}

/// A file read on demand, within a byte budget. Slices handed out live as long as the reader.
pub struct BoundedFile<'f> {
    file: &'f File,
    len: u64,
    left: Cell<u64>,
    /// A read was refused for want of budget.
    exhausted: Cell<bool>,
    /// Buffers never move or drop while `self` lives, so slices into them stay valid. `u64`
    /// words keep them 8-aligned, as the ELF structures read in place require.
    bufs: RefCell<Vec<Box<[u64]>>>,
}

impl<'f> BoundedFile<'f> {
    pub fn new(file: &'f File, len: u64, budget: u64) -> Self {
        Self {
            file,
            len,
            left: Cell::new(budget),
            exhausted: Cell::new(false),
            bufs: RefCell::new(Vec::new()),
        }
    }

    /// Bytes read so far.
    pub fn spent(&self, budget: u64) -> u64 {
        budget - self.left.get()
    }

    /// Whether a read was refused because the budget was spent.
    pub fn exhausted(&self) -> bool {
        self.exhausted.get()
    }

    fn read(&self, offset: u64, size: u64) -> Result<&[u8], ()> {
        let end = offset.checked_add(size).ok_or(())?;
        if end > self.len {
            return Err(());
        }
        if size > self.left.get() {
            self.exhausted.set(true);
            return Err(());
        }
        self.left.set(self.left.get() - size);
        let n = usize::try_from(size).map_err(|_| ())?;
        let mut words = vec![0u64; n.div_ceil(8)].into_boxed_slice();
        // SAFETY: the words are plain memory of at least `n` bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), n) };
        self.file.read_exact_at(bytes, offset).map_err(|_| ())?;
        let ptr = words.as_ptr().cast::<u8>();
        self.bufs.borrow_mut().push(words);
        // SAFETY: the buffer is kept in `bufs` until `self` drops and never written again.
        Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
    }
}

impl<'a> ReadRef<'a> for &'a BoundedFile<'_> {
    fn len(self) -> Result<u64, ()> {
        Ok(self.len)
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        if size == 0 {
            // Empty, but aligned like the others: an empty table is still cast in place.
            static EMPTY: [u64; 1] = [0];
            // SAFETY: zero bytes of a static.
            return Ok(unsafe { std::slice::from_raw_parts(EMPTY.as_ptr().cast::<u8>(), 0) });
        }
        self.read(offset, size)
    }

    fn read_bytes_at_until(self, range: Range<u64>, delimiter: u8) -> Result<&'a [u8], ()> {
        // Names are short (one is read per symbol of the table): look 64 bytes ahead, then
        // further, up to 4 KiB as object's own reader does.
        let limit = range.end.checked_sub(range.start).ok_or(())?.min(4096);
        let mut size = 64;
        loop {
            let size_now = size.min(limit);
            let bytes = self.read(range.start, size_now)?;
            if let Some(end) = bytes.iter().position(|b| *b == delimiter) {
                return Ok(&bytes[..end]);
            }
            if size_now == limit {
                return Err(());
            }
            size *= 8;
        }
    }
}

/// How the kernel executes the instruction a uprobe replaces (kernel 6.x, x86-64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstInstruction {
    /// `nopl 0x0(%rax,%rax,1)`: the kernel optimizes the probe into a call.
    Nop5,
    /// `push %reg`: emulated without leaving the kernel.
    Emulated,
    /// Anything else (`endbr64`, `mov`, `sub`): single-stepped out of line.
    SingleStep,
}

impl FirstInstruction {
    pub fn classify(code: &[u8]) -> Self {
        match code {
            [0x0f, 0x1f, 0x44, 0x00, 0x00, ..] => Self::Nop5,
            [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..] => Self::Emulated,
            _ => Self::SingleStep,
        }
    }

    /// Entry-probe cost per hit in nanoseconds, measured on a nested VM of the CI kind
    /// (`docs/performance.md`); a conservative estimate for bare metal.
    pub fn entry_cost_ns(self) -> u64 {
        match self {
            Self::Nop5 => 180,
            Self::Emulated => 435,
            Self::SingleStep => 15_000,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nop5 => "nop5",
            Self::Emulated => "emulated",
            Self::SingleStep => "single_step",
        }
    }
}

/// A wanted symbol of a library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoundSymbol {
    /// File offset where the uprobe goes: the symbol's first byte, or the instruction after
    /// a flags-only one (`probe::prologue`).
    pub offset: u64,
    /// The kind of the probed instruction.
    pub first: FirstInstruction,
    /// Bytes between the symbol's start and the probe.
    pub skip: u64,
    /// The function its code calls first, when it is a wrapper (`probe::prologue::first_call`)
    /// around a function of the same file.
    pub call: Option<Callee>,
}

/// The function a wrapper calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Callee {
    /// File offset where a uprobe on it goes (its first byte, or past a flags-only one).
    pub offset: u64,
    /// The kind of the probed instruction.
    pub first: FirstInstruction,
    /// The argument that holds an address in the wrapper's frame (an out parameter).
    pub frame_arg: Option<u8>,
}

/// Dynamic symbols of interest found in a library.
#[derive(Debug, Default)]
pub struct LibrarySymbols {
    pub found: HashMap<String, FoundSymbol>,
}

/// Reads the wanted symbols of `file` (`size` bytes long, from `fstat`); `path` is for errors.
pub fn read_symbols(
    file: &File,
    size: u64,
    path: &str,
    wanted: &[&str],
) -> Result<LibrarySymbols, ElfError> {
    let reader = BoundedFile::new(file, size, READ_BUDGET);
    parse_symbols(&reader, wanted).map_err(|source| ElfError::Parse {
        path: path.to_string(),
        source,
    })
}

/// Virtual addresses of the wanted defined dynamic symbols of `file` (data symbols too, which
/// have no bytes in the file when they live in `.bss`).
pub fn read_addresses(
    file: &File,
    size: u64,
    path: &str,
    wanted: &[&str],
) -> Result<HashMap<String, u64>, ElfError> {
    let reader = BoundedFile::new(file, size, READ_BUDGET);
    parse_addresses(&reader, wanted).map_err(|source| ElfError::Parse {
        path: path.to_string(),
        source,
    })
}

pub fn parse_addresses<'a, R: ReadRef<'a>>(
    data: R,
    wanted: &[&str],
) -> Result<HashMap<String, u64>, object::Error> {
    let file = object::File::parse(data)?;
    Ok(file
        .dynamic_symbols()
        .filter(|sym| sym.is_definition())
        .filter_map(|sym| {
            let name = sym.name().ok()?;
            wanted
                .contains(&name)
                .then(|| (name.to_string(), sym.address()))
        })
        .collect())
}

pub fn parse_symbols<'a, R: ReadRef<'a>>(
    data: R,
    wanted: &[&str],
) -> Result<LibrarySymbols, object::Error> {
    let file = object::File::parse(data)?;
    // Known to the parse just done; an unknown length admits no symbol.
    let file_len = data.len().unwrap_or(0);
    let mut out = LibrarySymbols::default();
    for sym in file.dynamic_symbols() {
        if !sym.is_definition() {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if !wanted.contains(&name) {
            continue;
        }
        // The file offset as the kernel wants it for a uprobe: the address's distance into
        // its section, from the section's place in the file.
        let Some(offset) = sym
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
            .and_then(|section| {
                let (start, len) = section.file_range()?;
                let into = sym.address().checked_sub(section.address())?;
                (into < len).then_some(start.checked_add(into)?)
            })
            .filter(|offset| *offset < file_len)
        else {
            continue;
        };
        // The function's bytes (its size, at most a window), for where its probe goes.
        let len = match sym.size() {
            0 => super::prologue::WINDOW as u64,
            n => n.min(super::prologue::WINDOW as u64),
        };
        let len = len.min(file_len - offset);
        let code = data.read_bytes_at(offset, len).ok();
        let placement = code
            .map(|code| super::prologue::place(code, sym.address()))
            .unwrap_or(super::prologue::Placement {
                skip: 0,
                first: FirstInstruction::SingleStep,
            });
        let call = code
            .and_then(|code| super::prologue::first_call(code, sym.address()))
            .and_then(|w| callee(&file, data, file_len, w));
        out.found.insert(
            name.to_string(),
            FoundSymbol {
                offset: offset + placement.skip,
                first: placement.first,
                skip: placement.skip,
                call,
            },
        );
    }
    Ok(out)
}

/// Where the function a wrapper calls lies in the file, and how a probe on it is hit.
fn callee<'a, R: ReadRef<'a>>(
    file: &object::File<'a, R>,
    data: R,
    file_len: u64,
    wrapper: super::prologue::Wrapper,
) -> Option<Callee> {
    let address = wrapper.callee;
    let offset = file.sections().find_map(|section| {
        let into = address.checked_sub(section.address())?;
        let (start, len) = section.file_range()?;
        (into < len && into < section.size()).then_some(start.checked_add(into)?)
    })?;
    let len = (super::prologue::WINDOW as u64).min(file_len.checked_sub(offset)?);
    let code = data.read_bytes_at(offset, len).ok()?;
    let placement = super::prologue::place(code, address);
    Some(Callee {
        offset: offset + placement.skip,
        first: placement.first,
        frame_arg: wrapper.frame_arg,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn classifies_first_instructions() {
        assert_eq!(
            FirstInstruction::classify(&[0x0f, 0x1f, 0x44, 0, 0]),
            FirstInstruction::Nop5
        );
        assert_eq!(
            FirstInstruction::classify(&[0x55, 0x48]),
            FirstInstruction::Emulated
        );
        assert_eq!(
            FirstInstruction::classify(&[0x41, 0x57]),
            FirstInstruction::Emulated
        );
        assert_eq!(
            FirstInstruction::classify(&[0xf3, 0x0f, 0x1e, 0xfa]),
            FirstInstruction::SingleStep
        );
        assert_eq!(
            FirstInstruction::classify(&[]),
            FirstInstruction::SingleStep
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_symbols(&b"not an elf at all"[..], &["cuMemAlloc_v2"]).is_err());
        assert!(parse_symbols(&[0x7f, b'E', b'L', b'F', 2, 1, 1][..], &["x"]).is_err());
    }

    fn libc() -> &'static Path {
        // libc is on every machine this runs on and exports malloc.
        [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib64/libc.so.6",
            "/lib64/libc.so.6",
        ]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("no libc.so.6 found")
    }

    #[test]
    fn reads_only_the_tables_and_the_symbols_bytes() {
        let data = std::fs::read(libc()).unwrap();
        let file = File::open(libc()).unwrap();
        let reader = BoundedFile::new(&file, data.len() as u64, READ_BUDGET);
        let syms = parse_symbols(&reader, &["malloc", "free"]).unwrap();
        let spent = reader.spent(READ_BUDGET);
        assert!(
            spent < data.len() as u64 / 4,
            "read {spent} of {} bytes",
            data.len()
        );
        // The same answer as reading the whole file, offsets included.
        let whole = parse_symbols(&data[..], &["malloc", "free"]).unwrap();
        assert_eq!(syms.found, whole.found);
        let malloc = syms.found["malloc"];
        assert_eq!(
            &data[malloc.offset as usize..malloc.offset as usize + 8],
            reader.read_bytes_at(malloc.offset, 8).unwrap()
        );
    }

    #[test]
    fn a_budget_too_small_for_the_tables_is_an_error() {
        let file = File::open(libc()).unwrap();
        let size = file.metadata().unwrap().len();
        let reader = BoundedFile::new(&file, size, 4096);
        assert!(parse_symbols(&reader, &["malloc"]).is_err());
        assert!(reader.spent(4096) <= 4096);
    }

    #[test]
    fn a_huge_sparse_file_is_read_in_kilobytes() {
        // A real library padded to 3 GiB with a hole: only its tables are read.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libcuda.so.1");
        std::fs::copy(libc(), &path).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(3 << 30).unwrap();
        let file = File::open(&path).unwrap();
        let syms = read_symbols(&file, 3 << 30, "x", &["malloc"]).unwrap();
        assert!(syms.found.contains_key("malloc"));
        // Zeros claiming to be anything are refused cheaply.
        std::fs::write(&path, b"").unwrap();
        f.set_len(3 << 30).unwrap();
        assert!(read_symbols(&file, 3 << 30, "x", &["malloc"]).is_err());
    }

    #[test]
    fn finds_symbols_of_a_real_library() {
        let file = File::open(libc()).unwrap();
        let size = file.metadata().unwrap().len();
        let syms = read_symbols(&file, size, "libc", &["malloc", "no_such_symbol"]).unwrap();
        assert!(syms.found.contains_key("malloc"));
        assert!(!syms.found.contains_key("no_such_symbol"));
    }
}

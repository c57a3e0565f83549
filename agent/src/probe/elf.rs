//! What a CUDA driver library offers: which probed symbols it exports, and how the kernel will
//! have to handle a breakpoint on each symbol's first instruction (which sets its probe cost).

use std::{collections::HashMap, path::Path};

use object::{Object, ObjectSection, ObjectSymbol};

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF shared object")]
    Parse {
        path: String,
        #[source]
        source: object::Error,
    },
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

/// Dynamic symbols of interest found in a library.
#[derive(Debug, Default)]
pub struct LibrarySymbols {
    pub found: HashMap<String, FirstInstruction>,
}

pub fn read_symbols(path: &Path, wanted: &[&str]) -> Result<LibrarySymbols, ElfError> {
    let data = std::fs::read(path).map_err(|source| ElfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_symbols(&data, wanted).map_err(|source| ElfError::Parse {
        path: path.display().to_string(),
        source,
    })
}

pub fn parse_symbols(data: &[u8], wanted: &[&str]) -> Result<LibrarySymbols, object::Error> {
    let file = object::File::parse(data)?;
    let mut out = LibrarySymbols::default();
    for sym in file.dynamic_symbols() {
        if !sym.is_definition() {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if !wanted.contains(&name) {
            continue;
        }
        let first = sym
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
            .and_then(|section| {
                let bytes = section.data().ok()?;
                let start = usize::try_from(sym.address().checked_sub(section.address())?).ok()?;
                bytes.get(start..start.checked_add(8)?.min(bytes.len()))
            })
            .map(FirstInstruction::classify)
            .unwrap_or(FirstInstruction::SingleStep);
        out.found.insert(name.to_string(), first);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
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
        assert!(parse_symbols(b"not an elf at all", &["cuMemAlloc_v2"]).is_err());
        assert!(parse_symbols(&[0x7f, b'E', b'L', b'F', 2, 1, 1], &["x"]).is_err());
    }

    #[test]
    fn finds_symbols_of_a_real_library() {
        // libc is on every machine this runs on and exports malloc.
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib64/libc.so.6",
            "/lib64/libc.so.6",
        ]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("no libc.so.6 found");
        let syms = read_symbols(libc, &["malloc", "no_such_symbol"]).unwrap();
        assert!(syms.found.contains_key("malloc"));
        assert!(!syms.found.contains_key("no_such_symbol"));
    }
}

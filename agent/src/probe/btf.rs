//! Field offsets of kernel structures, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), for the programs that follow kernel pointers (`file` →
//! `f_path.dentry` → `d_name.name`, ...): they are handed the offsets of this kernel in a map
//! instead of compiled-in ones, so one object runs on every kernel with BTF. aya reads BTF for
//! its own relocations but keeps its types private, and the format is small: a header, a type
//! section of variable-length records, a string section.
//!
//! Only what lookups need is kept: every struct and union by name, with its members (name,
//! type, bit offset), and enough of the other kinds to follow a member's type through
//! typedefs and qualifiers.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("BTF is {len} bytes, shorter than its header says")]
    Short { len: usize },
    #[error("not BTF (magic {magic:#x})")]
    Magic { magic: u16 },
    #[error("BTF type kind {kind} is unknown")]
    UnknownKind { kind: u32 },
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {structure} has no member {member}")]
    NoMember { structure: String, member: String },
    #[error("{0} is a bitfield, not a byte-addressable member")]
    Bitfield(String),
}

const MAGIC: u16 = 0xeb9f;

// Kinds (include/uapi/linux/btf.h).
const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const FLOAT: u32 = 16;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    ty: u32,
    /// Offset in bits from the start of the enclosing struct.
    bit_offset: u32,
    bitfield: bool,
}

#[derive(Clone, Debug)]
enum Type {
    /// Struct or union.
    Composite(Vec<Member>),
    /// Typedef, const, volatile, restrict, type tag: the type they qualify.
    Alias(u32),
    Other,
}

/// The structs and unions of one BTF blob.
pub struct Btf {
    strings: Vec<u8>,
    /// Type id → type (id 0 is `void`).
    types: Vec<Type>,
    /// Names of structs and unions → their ids (the first of a name wins: kernel BTF names
    /// each struct once).
    by_name: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Self, std::io::Error> {
        let bytes = std::fs::read("/sys/kernel/btf/vmlinux")?;
        Self::parse(&bytes).map_err(std::io::Error::other)
    }

    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        let short = || BtfError::Short { len: b.len() };
        let magic = u16::from_le_bytes(
            b.get(0..2)
                .ok_or_else(short)?
                .try_into()
                .map_err(|_| short())?,
        );
        if magic != MAGIC {
            return Err(BtfError::Magic { magic });
        }
        let hdr_len = u32_at(b, 4).ok_or_else(short)? as usize;
        let field = |i: usize| u32_at(b, 8 + 4 * i).map(|v| v as usize).ok_or_else(short);
        let (type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?);
        let types_at = hdr_len.checked_add(type_off).ok_or_else(short)?;
        let type_bytes = b
            .get(types_at..types_at.checked_add(type_len).ok_or_else(short)?)
            .ok_or_else(short)?;
        let strs_at = hdr_len.checked_add(str_off).ok_or_else(short)?;
        let strings = b
            .get(strs_at..strs_at.checked_add(str_len).ok_or_else(short)?)
            .ok_or_else(short)?
            .to_vec();
        let mut btf = Btf {
            strings,
            types: vec![Type::Other],
            by_name: HashMap::new(),
        };
        let mut at = 0;
        while at < type_bytes.len() {
            let word = |i: usize| u32_at(type_bytes, at + 4 * i).ok_or_else(short);
            let (name, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31 == 1;
            at += 12;
            let (ty, extra) = match kind {
                INT => (Type::Other, 4),
                PTR | FWD | FUNC | FLOAT => (Type::Other, 0),
                ARRAY => (Type::Other, 12),
                STRUCT | UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for m in 0..vlen {
                        let w =
                            |i: usize| u32_at(type_bytes, at + 12 * m + 4 * i).ok_or_else(short);
                        let offset = w(2)?;
                        // With kflag, the high 8 bits are a bitfield's size.
                        let (bit_offset, bitfield) = if kflag {
                            (offset & 0x00ff_ffff, offset >> 24 != 0)
                        } else {
                            (offset, false)
                        };
                        members.push(Member {
                            name: w(0)?,
                            ty: w(1)?,
                            bit_offset,
                            bitfield,
                        });
                    }
                    (Type::Composite(members), 12 * vlen)
                }
                ENUM => (Type::Other, 8 * vlen),
                ENUM64 => (Type::Other, 12 * vlen),
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => (Type::Alias(size_or_type), 0),
                FUNC_PROTO => (Type::Other, 8 * vlen),
                VAR => (Type::Other, 4),
                DATASEC => (Type::Other, 12 * vlen),
                DECL_TAG => (Type::Other, 4),
                kind => return Err(BtfError::UnknownKind { kind }),
            };
            at += extra;
            if matches!(ty, Type::Composite(_)) && name != 0 {
                let id = btf.types.len() as u32;
                btf.by_name
                    .entry(btf.string(name).to_string())
                    .or_insert(id);
            }
            btf.types.push(ty);
        }
        if at != type_bytes.len() {
            return Err(short());
        }
        Ok(btf)
    }

    fn string(&self, at: u32) -> &str {
        let rest = self.strings.get(at as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias(to) => id = *to,
                t => return Some(t),
            }
        }
        None
    }

    /// Bit offset of `member` in `members`, looking into anonymous structs and unions.
    fn find(&self, members: &[Member], member: &str, depth: u32) -> Option<(u32, bool)> {
        for m in members {
            if self.string(m.name) == member {
                return Some((m.bit_offset, m.bitfield));
            }
        }
        if depth > 8 {
            return None;
        }
        members
            .iter()
            .filter(|m| m.name == 0)
            .find_map(|m| match self.resolve(m.ty) {
                Some(Type::Composite(inner)) => self
                    .find(inner, member, depth + 1)
                    .map(|(off, bf)| (m.bit_offset + off, bf)),
                _ => None,
            })
    }

    /// Byte offset of `path` (`f_path.dentry`: members of nested structs, by value) in
    /// struct `structure`.
    pub fn offset(&self, structure: &str, path: &str) -> Result<u32, BtfError> {
        let mut id = *self
            .by_name
            .get(structure)
            .ok_or_else(|| BtfError::NoStruct(structure.into()))?;
        let mut bits = 0;
        for member in path.split('.') {
            let no_member = || BtfError::NoMember {
                structure: structure.into(),
                member: path.into(),
            };
            let Some(Type::Composite(members)) = self.resolve(id) else {
                return Err(no_member());
            };
            let (off, bitfield) = self.find(members, member, 0).ok_or_else(no_member)?;
            if bitfield || off % 8 != 0 {
                return Err(BtfError::Bitfield(format!("{structure}.{path}")));
            }
            bits += off;
            // The member's own type, for the next step of the path.
            id = members
                .iter()
                .find(|m| self.string(m.name) == member)
                .map(|m| m.ty)
                .or_else(|| self.anonymous_type_of(members, member))
                .ok_or_else(no_member)?;
        }
        Ok(bits / 8)
    }

    /// The type of a member found inside an anonymous struct or union.
    fn anonymous_type_of(&self, members: &[Member], member: &str) -> Option<u32> {
        members.iter().filter(|m| m.name == 0).find_map(|m| {
            let Some(Type::Composite(inner)) = self.resolve(m.ty) else {
                return None;
            };
            inner
                .iter()
                .find(|i| self.string(i.name) == member)
                .map(|i| i.ty)
                .or_else(|| self.anonymous_type_of(inner, member))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob with `struct qstr { union { struct { u32 hash; u32 len; }; u64 hash_len; };
    /// const char *name; }` and `struct dentry { int flags; struct qstr d_name; }`.
    fn blob() -> Vec<u8> {
        let mut strings =
            b"\0qstr\0hash\0len\0hash_len\0name\0dentry\0d_name\0flags\0int\0".to_vec();
        let s = |name: &str, strings: &mut Vec<u8>| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .unwrap_or_else(|| {
                    let at = strings.len() as u32;
                    strings.extend_from_slice(name.as_bytes());
                    strings.push(0);
                    at
                })
        };
        let mut t = Vec::new();
        let mut ty = |words: &[u32]| {
            for w in words {
                t.extend_from_slice(&w.to_le_bytes());
            }
        };
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        // 1: int
        ty(&[s("int", &mut strings), info(INT, 0), 4, 32]);
        // 2: anonymous struct { hash; len; }
        ty(&[0, info(STRUCT, 2), 8]);
        ty(&[s("hash", &mut strings), 1, 0]);
        ty(&[s("len", &mut strings), 1, 32]);
        // 3: anonymous union { struct; hash_len; }
        ty(&[0, info(UNION, 2), 8]);
        ty(&[0, 2, 0]);
        ty(&[s("hash_len", &mut strings), 1, 0]);
        // 4: pointer to int (the name)
        ty(&[0, info(PTR, 0), 1]);
        // 5: struct qstr { union; name; }
        ty(&[s("qstr", &mut strings), info(STRUCT, 2), 16]);
        ty(&[0, 3, 0]);
        ty(&[s("name", &mut strings), 4, 64]);
        // 6: typedef-free const struct qstr
        ty(&[0, info(CONST, 0), 5]);
        // 7: struct dentry { flags; d_name; }
        ty(&[s("dentry", &mut strings), info(STRUCT, 2), 24]);
        ty(&[s("flags", &mut strings), 1, 0]);
        ty(&[s("d_name", &mut strings), 6, 64]);
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn offsets_through_nested_and_anonymous_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset("qstr", "name"), Ok(8));
        assert_eq!(
            btf.offset("qstr", "len"),
            Ok(4),
            "inside the anonymous union"
        );
        assert_eq!(btf.offset("dentry", "d_name"), Ok(8));
        assert_eq!(
            btf.offset("dentry", "d_name.name"),
            Ok(16),
            "through a const"
        );
        assert_eq!(
            btf.offset("dentry", "d_inode"),
            Err(BtfError::NoMember {
                structure: "dentry".into(),
                member: "d_inode".into()
            })
        );
        assert_eq!(
            btf.offset("inode", "i_ino"),
            Err(BtfError::NoStruct("inode".into()))
        );
    }

    #[test]
    fn bad_blobs_are_errors() {
        let b = blob();
        for n in [0, 2, 10, 30, b.len() - 1] {
            assert!(Btf::parse(&b[..n]).is_err(), "{n} bytes");
        }
        let mut bad = b.clone();
        bad[0] = 0;
        assert!(matches!(Btf::parse(&bad), Err(BtfError::Magic { .. })));
    }

    /// The running kernel's own BTF (world-readable), as the probes will use it.
    #[test]
    fn the_kernel_describes_the_structures_the_probes_follow() {
        let Ok(btf) = Btf::kernel() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "no /sys/kernel/btf/vmlinux"
            );
            return;
        };
        for (s, path) in [
            ("file", "f_path.dentry"),
            ("file", "f_inode"),
            ("dentry", "d_name.name"),
            ("inode", "i_ino"),
            ("inode", "i_sb"),
            ("super_block", "s_dev"),
        ] {
            let off = btf
                .offset(s, path)
                .unwrap_or_else(|e| panic!("{s}.{path}: {e}"));
            assert!(off < 4096, "{s}.{path} at {off}");
        }
        assert_ne!(
            btf.offset("file", "f_path.dentry").unwrap(),
            btf.offset("file", "f_inode").unwrap()
        );
    }

    /// The walk from a task to its open files that the `http` family's `close` takes
    /// (`super::super::http::fd_layout`): `fdtable` starts with `max_fds`, then the array.
    #[test]
    fn the_kernel_describes_the_walk_to_a_file() {
        if Btf::kernel().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "no /sys/kernel/btf/vmlinux"
            );
            return;
        }
        let l = super::super::http::fd_layout();
        assert_eq!(l.known, 1, "{l:?}");
        assert_eq!((l.fdt_max_fds, l.fdt_fd), (0, 8), "{l:?}");
        assert!(l.task_files > 0 && l.task_files < 16384, "{l:?}");
        assert!(l.files_fdt > 0 && l.files_fdt < 1024, "{l:?}");
    }
}

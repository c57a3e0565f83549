//! HPACK (RFC 7541): header blocks decoded with the dynamic table each direction builds. On a
//! connection seen from its start the table is exact. On one picked up mid-way the table's
//! older entries are unknown, but the numbering is not: index 62 is always the newest entry,
//! so every entry inserted since the agent joined resolves exactly (an append-only window of
//! the insertions seen), and a reference past the window is an unknown field, counted, never
//! guessed. A dynamic table size update to 0 empties the table, after which it is exact again.
//! Huffman-coded strings are decoded by `loona-hpack`.

use std::collections::VecDeque;

/// Table size a direction starts with (RFC 9113 §6.5.2, `SETTINGS_HEADER_TABLE_SIZE`).
const DEFAULT_MAX: usize = 4096;
/// Bytes of entries kept where the table's real size is unknown (the window of a direction
/// picked up mid-way). Entries past it are referenced as unknown.
const WINDOW_CAP: usize = 64 * 1024;
/// Longest string kept from a field; longer ones are cut (their name or value is then not
/// one the agent compares with anything).
const MAX_STRING: usize = 8 * 1024;
/// Fields per block; the rest are skipped (and inserted as unknown, keeping the numbering).
const MAX_FIELDS: usize = 128;

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// A decoded field. `None`: a reference to an entry older than the agent's window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// A decoded field as the decoder hands it over: borrowed from the table or the block, so that
/// only the fields the caller keeps are copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldRef<'a> {
    pub name: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

impl FieldRef<'_> {
    pub fn to_owned(self) -> Field {
        Field {
            name: self.name.map(<[u8]>::to_vec),
            value: self.value.map(<[u8]>::to_vec),
        }
    }
}

/// What went wrong with a block (the label of `inferscope_http_bad_input_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HpackError {
    /// Not HPACK: a bad integer, a string past the block, bad Huffman, an index past an
    /// exact table.
    Malformed,
}

/// A name and a value, lent by the table.
type PairRef<'a> = (&'a [u8], &'a [u8]);

#[derive(Clone, Debug)]
struct Entry {
    name: Option<Vec<u8>>,
    value: Vec<u8>,
    /// RFC 7541 §4.1: name + value + 32 (the name's length guessed as 0 when unknown).
    size: usize,
}

/// One direction's dynamic table.
#[derive(Debug)]
pub struct Table {
    /// Newest first.
    entries: VecDeque<Entry>,
    size: usize,
    /// The table's maximum size, when known (always on a direction seen from its start).
    max: Option<usize>,
    /// Whether `entries` is the whole table (else older entries exist that the agent never
    /// saw).
    exact: bool,
    huffman: Huffman,
}

/// `loona-hpack`'s decoder, which has no `Debug`.
struct Huffman(loona_hpack::huffman::HuffmanDecoder);

impl std::fmt::Debug for Huffman {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Huffman")
    }
}

impl Table {
    /// A direction seen from its start.
    pub fn new() -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max: Some(DEFAULT_MAX),
            exact: true,
            huffman: Huffman(loona_hpack::huffman::HuffmanDecoder::new()),
        }
    }

    /// A direction picked up mid-way: only what is inserted from now on is known.
    pub fn joined() -> Self {
        Self {
            max: None,
            exact: false,
            ..Self::new()
        }
    }

    /// A block was lost (a hole in a HEADERS frame): an unknown number of insertions happened,
    /// so no index can be trusted until the table is emptied.
    pub fn lose(&mut self) {
        self.entries.clear();
        self.size = 0;
        self.exact = false;
        self.max = None;
    }

    pub fn exact(&self) -> bool {
        self.exact
    }

    /// Bytes this table holds (approximately).
    pub fn state_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| {
                size_of::<Entry>() + e.value.capacity() + e.name.as_ref().map_or(0, Vec::capacity)
            })
            .sum::<usize>()
            + self.entries.capacity() * size_of::<Entry>()
    }

    /// Decodes one whole header block, calling `f` for each field. Stops at the first
    /// malformed representation (the table is then lost: what followed it is unknown).
    pub fn decode(
        &mut self,
        block: &[u8],
        f: &mut impl FnMut(FieldRef<'_>),
    ) -> Result<DecodeStats, HpackError> {
        let r = self.decode_inner(block, f);
        if r.is_err() {
            self.lose();
        }
        r
    }

    fn decode_inner(
        &mut self,
        mut b: &[u8],
        f: &mut impl FnMut(FieldRef<'_>),
    ) -> Result<DecodeStats, HpackError> {
        let mut stats = DecodeStats::default();
        let mut fields = 0;
        while let Some(&first) = b.first() {
            if first & 0x80 != 0 {
                let (index, rest) = integer(b, 7)?;
                b = rest;
                let field = match self.lookup(index)? {
                    Some((name, value)) => FieldRef {
                        name: Some(name),
                        value: Some(value),
                    },
                    None => {
                        stats.unknown += 1;
                        FieldRef {
                            name: None,
                            value: None,
                        }
                    }
                };
                fields += 1;
                if fields <= MAX_FIELDS {
                    f(field);
                }
            } else if first & 0xe0 == 0x20 {
                let (size, rest) = integer(b, 5)?;
                b = rest;
                self.resize(size);
            } else {
                let (indexing, prefix) = if first & 0x40 != 0 {
                    (true, 6)
                } else {
                    (false, 4)
                };
                let (index, rest) = integer(b, prefix)?;
                b = rest;
                let literal_name = if index == 0 {
                    let (name, rest) = self.string(b)?;
                    b = rest;
                    Some(name)
                } else {
                    None
                };
                let (value, rest) = self.string(b)?;
                b = rest;
                fields += 1;
                let keep = fields <= MAX_FIELDS;
                if indexing {
                    // The table keeps its own copy of the name: taken once, lent to `f`.
                    let name = match literal_name {
                        Some(name) => Some(name),
                        None => self.indexed_name(index, &mut stats)?.map(<[u8]>::to_vec),
                    };
                    if keep {
                        f(FieldRef {
                            name: name.as_deref(),
                            value: Some(&value),
                        });
                    }
                    self.insert(name, value);
                } else {
                    let name = match &literal_name {
                        Some(name) => Some(name.as_slice()),
                        None => self.indexed_name(index, &mut stats)?,
                    };
                    if keep {
                        f(FieldRef {
                            name,
                            value: Some(&value),
                        });
                    }
                }
            }
        }
        Ok(stats)
    }

    /// The name of entry `index`, for a literal field that names it; an entry older than the
    /// window is counted as unknown.
    fn indexed_name(
        &self,
        index: u64,
        stats: &mut DecodeStats,
    ) -> Result<Option<&[u8]>, HpackError> {
        let name = self.lookup(index)?.map(|(name, _)| name);
        if name.is_none() {
            stats.unknown += 1;
        }
        Ok(name)
    }

    /// Static or dynamic entry `index` (1-based); `None` when it is older than the window.
    fn lookup(&self, index: u64) -> Result<Option<PairRef<'_>>, HpackError> {
        let index = usize::try_from(index).map_err(|_| HpackError::Malformed)?;
        if index == 0 {
            return Err(HpackError::Malformed);
        }
        if let Some((name, value)) = STATIC.get(index - 1) {
            return Ok(Some((name.as_bytes(), value.as_bytes())));
        }
        match self.entries.get(index - STATIC.len() - 1) {
            Some(e) => Ok(e.name.as_deref().map(|name| (name, e.value.as_slice()))),
            None if self.exact => Err(HpackError::Malformed),
            None => Ok(None),
        }
    }

    fn insert(&mut self, name: Option<Vec<u8>>, value: Vec<u8>) {
        let size = name.as_ref().map_or(0, Vec::len) + value.len() + 32;
        if self.max.is_some_and(|max| size > max) {
            // RFC 7541 §4.4: an entry larger than the table empties it.
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.entries.push_front(Entry { name, value, size });
        self.size += size;
        self.evict();
    }

    fn resize(&mut self, max: u64) {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        self.max = Some(max);
        if max == 0 {
            // Every entry, seen or not, is gone: the table is known again.
            self.exact = true;
        }
        self.evict();
    }

    /// Evicts as the encoder does (oldest first, down to the table's size), and past
    /// [`WINDOW_CAP`] bytes whatever the table's size: entries the encoder still has that the
    /// agent drops make the table a window.
    fn evict(&mut self) {
        let max = self.max.unwrap_or(usize::MAX);
        while self.size > max.min(WINDOW_CAP) {
            if self.size <= max {
                self.exact = false;
            }
            let Some(e) = self.entries.pop_back() else {
                break;
            };
            self.size -= e.size;
        }
    }

    /// A string literal (RFC 7541 §5.2), cut to [`MAX_STRING`].
    fn string<'b>(&mut self, b: &'b [u8]) -> Result<(Vec<u8>, &'b [u8]), HpackError> {
        let huffman = b.first().is_some_and(|x| x & 0x80 != 0);
        let (len, rest) = integer(b, 7)?;
        let len = usize::try_from(len).map_err(|_| HpackError::Malformed)?;
        if len > rest.len() {
            return Err(HpackError::Malformed);
        }
        let (raw, rest) = rest.split_at(len);
        let mut s = if huffman {
            self.huffman
                .0
                .decode(&raw[..raw.len().min(MAX_STRING)])
                .or_else(|_| {
                    // A cut Huffman string may end mid-symbol: decode what can be.
                    if raw.len() > MAX_STRING {
                        Ok(Vec::new())
                    } else {
                        Err(HpackError::Malformed)
                    }
                })?
        } else {
            raw[..raw.len().min(MAX_STRING)].to_vec()
        };
        s.truncate(MAX_STRING);
        Ok((s, rest))
    }
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

/// What one block held besides its fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// References to entries older than the window.
    pub unknown: u32,
}

/// An integer with an `n`-bit prefix (RFC 7541 §5.1), at most 62 bits.
fn integer(b: &[u8], n: u8) -> Result<(u64, &[u8]), HpackError> {
    let (&first, mut rest) = b.split_first().ok_or(HpackError::Malformed)?;
    let mask = (1u16 << n) as u8 - 1;
    let mut v = u64::from(first & mask);
    if v < u64::from(mask) {
        return Ok((v, rest));
    }
    let mut shift = 0u32;
    loop {
        let (&byte, r) = rest.split_first().ok_or(HpackError::Malformed)?;
        rest = r;
        if shift > 56 {
            return Err(HpackError::Malformed);
        }
        v += u64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok((v, rest));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(t: &mut Table, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        t.decode(block, &mut |f| {
            let s = |v: Option<&[u8]>| {
                v.map_or_else(
                    || "?".to_string(),
                    |v| String::from_utf8_lossy(v).into_owned(),
                )
            };
            out.push((s(f.name), s(f.value)));
        })
        .unwrap();
        out
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// RFC 7541 C.4: requests with Huffman coding, one table across three blocks.
    #[test]
    fn rfc_7541_c4() {
        let mut t = Table::new();
        let b1 = hex("828684418cf1e3c2e5f23a6ba0ab90f4ff");
        assert_eq!(
            fields(&mut t, &b1),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let b2 = hex("828684be5886a8eb10649cbf");
        assert_eq!(
            fields(&mut t, &b2),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        let b3 = hex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf");
        assert_eq!(
            fields(&mut t, &b3),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(t.size, 164);
    }

    /// RFC 7541 C.5: responses with a 256-byte table and evictions.
    #[test]
    fn rfc_7541_c5_evictions() {
        let mut t = Table::new();
        t.resize(256);
        fields(&mut t, &hex("4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d"));
        assert_eq!(t.size, 222);
        let second = fields(&mut t, &hex("4803333037c1c0bf"));
        assert_eq!(second[0], (":status".into(), "307".into()));
        assert_eq!(
            second[3],
            ("location".into(), "https://www.example.com".into())
        );
        assert_eq!(t.size, 222);
    }

    #[test]
    fn a_joined_table_resolves_what_it_saw_and_counts_the_rest() {
        let mut t = Table::joined();
        // Literal with incremental indexing, new name: grpc path.
        let mut block = vec![0x40, 5];
        block.extend_from_slice(b":path");
        block.push(14);
        block.extend_from_slice(b"/pkg.Svc/Infer");
        assert_eq!(
            fields(&mut t, &block),
            pairs(&[(":path", "/pkg.Svc/Infer")])
        );
        // 62 is what was just inserted; 63 predates the agent.
        let mut unknown = 0;
        let stats = t
            .decode(&[0x80 | 62, 0x80 | 63], &mut |f| {
                if f.name.is_none() {
                    unknown += 1;
                }
            })
            .unwrap();
        assert_eq!((stats.unknown, unknown), (1, 1));
        // On an exact table the same reference is malformed.
        let mut exact = Table::new();
        assert_eq!(
            exact.decode(&[0x80 | 62], &mut |_| {}),
            Err(HpackError::Malformed)
        );
        // A size update to 0 makes the joined table exact.
        t.decode(&[0x20], &mut |_| {}).unwrap();
        assert!(t.exact());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678_u32;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let block: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            let mut t = Table::joined();
            let _ = t.decode(&block, &mut |_| {});
            let mut t = Table::new();
            let _ = t.decode(&block, &mut |_| {});
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}

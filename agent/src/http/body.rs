//! HTTP/1.1 message bodies over a captured byte stream that may have holes: the probes copy
//! the first N bytes of each syscall, so a write longer than N leaves bytes the agent knows
//! the length of but not the content. Framing (`Content-Length`, chunked, until close) still
//! advances over holes where it can; a hole where framing bytes should be is a desync.

/// How a message body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size(Vec<u8>),
    Data(u64),
    /// The CRLF after chunk data: bytes still to skip.
    DataEnd(u8),
    /// Trailer section after the last chunk: the current line.
    Trailer(Vec<u8>),
}

/// What a piece of input did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of the piece (captured bytes only) that belong to this body.
    pub consumed: usize,
    /// The body ended inside this piece.
    pub done: bool,
    /// The framing cannot be followed (bad chunk line, hole over framing bytes).
    pub desync: bool,
}

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 1024;

#[derive(Clone, Debug)]
pub struct Body {
    framing: Framing,
    remaining: u64,
    chunk: Chunk,
}

impl Body {
    pub fn new(framing: Framing) -> Self {
        let remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self {
            framing,
            remaining,
            chunk: Chunk::Size(Vec::new()),
        }
    }

    /// Bytes of buffer this body holds (a chunk-size or trailer line, at most [`MAX_LINE`]).
    pub fn state_bytes(&self) -> usize {
        match &self.chunk {
            Chunk::Size(l) | Chunk::Trailer(l) => l.capacity(),
            _ => 0,
        }
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    pub fn is_empty(&self) -> bool {
        matches!(self.framing, Framing::None | Framing::Length(0))
    }

    /// Feeds captured bytes; decoded body bytes go to `sink`.
    pub fn feed(&mut self, data: &[u8], sink: &mut impl FnMut(&[u8])) -> Fed {
        match self.framing {
            Framing::None => Fed {
                done: true,
                ..Fed::default()
            },
            Framing::UntilClose => {
                sink(data);
                Fed {
                    consumed: data.len(),
                    ..Fed::default()
                }
            }
            Framing::Length(_) => {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                sink(&data[..n]);
                self.remaining -= n as u64;
                Fed {
                    consumed: n,
                    done: self.remaining == 0,
                    desync: false,
                }
            }
            Framing::Chunked => self.feed_chunked(data, sink),
        }
    }

    /// Accounts `len` bytes that were moved but not captured. Returns the bytes of the hole
    /// that belong to this body and whether the body ended inside it, or None on desync.
    pub fn hole(&mut self, len: u64) -> Option<(u64, bool)> {
        match self.framing {
            Framing::None => Some((0, true)),
            Framing::UntilClose => Some((len, false)),
            Framing::Length(_) => {
                let n = self.remaining.min(len);
                self.remaining -= n;
                Some((n, self.remaining == 0))
            }
            Framing::Chunked => match &mut self.chunk {
                Chunk::Data(rest) if *rest >= len => {
                    *rest -= len;
                    if *rest == 0 {
                        self.chunk = Chunk::DataEnd(2);
                    }
                    Some((len, false))
                }
                _ => None,
            },
        }
    }

    fn feed_chunked(&mut self, data: &[u8], sink: &mut impl FnMut(&[u8])) -> Fed {
        let mut i = 0;
        while i < data.len() {
            match &mut self.chunk {
                Chunk::Size(line) => {
                    let Some(nl) = memchr::memchr(b'\n', &data[i..]) else {
                        line.extend_from_slice(&data[i..]);
                        if line.len() > MAX_LINE {
                            return desync(data.len());
                        }
                        return Fed {
                            consumed: data.len(),
                            ..Fed::default()
                        };
                    };
                    // A size line whole in this piece is read where it lies: a buffer (an
                    // allocation per chunk) only for one split across pieces.
                    let size = if line.is_empty() {
                        parse_chunk_size(&data[i..i + nl])
                    } else {
                        line.extend_from_slice(&data[i..i + nl]);
                        parse_chunk_size(line)
                    };
                    i += nl + 1;
                    let Some(size) = size else {
                        return desync(i);
                    };
                    self.chunk = if size == 0 {
                        Chunk::Trailer(Vec::new())
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(rest) => {
                    let n = (*rest).min((data.len() - i) as u64) as usize;
                    sink(&data[i..i + n]);
                    i += n;
                    *rest -= n as u64;
                    if *rest == 0 {
                        self.chunk = Chunk::DataEnd(2);
                    }
                }
                Chunk::DataEnd(left) => {
                    let b = data[i];
                    i += 1;
                    if b == b'\n' || *left == 1 {
                        self.chunk = Chunk::Size(Vec::new());
                    } else if b == b'\r' {
                        *left = 1;
                    } else {
                        return desync(i);
                    }
                }
                Chunk::Trailer(line) => {
                    let Some(nl) = data[i..].iter().position(|&b| b == b'\n') else {
                        line.extend_from_slice(&data[i..]);
                        if line.len() > MAX_LINE {
                            return desync(data.len());
                        }
                        return Fed {
                            consumed: data.len(),
                            ..Fed::default()
                        };
                    };
                    line.extend_from_slice(&data[i..i + nl]);
                    i += nl + 1;
                    if line.iter().all(|&b| b == b'\r') {
                        return Fed {
                            consumed: i,
                            done: true,
                            desync: false,
                        };
                    }
                    line.clear();
                }
            }
        }
        Fed {
            consumed: data.len(),
            ..Fed::default()
        }
    }
}

fn desync(consumed: usize) -> Fed {
    Fed {
        consumed,
        done: false,
        desync: true,
    }
}

/// `1a3f;ext=1\r` → 0x1a3f.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let end = line
        .iter()
        .position(|&b| b == b';' || b == b'\r' || b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let hex = &line[..end];
    if hex.is_empty() || hex.len() > 15 {
        return None;
    }
    let mut v = 0u64;
    for &b in hex {
        let d = (b as char).to_digit(16)?;
        v = v * 16 + u64::from(d);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(body: &mut Body, pieces: &[&[u8]]) -> (Vec<u8>, Fed) {
        let mut out = Vec::new();
        let mut last = Fed::default();
        for p in pieces {
            last = body.feed(p, &mut |b| out.extend_from_slice(b));
            if last.done || last.desync {
                break;
            }
        }
        (out, last)
    }

    #[test]
    fn chunked_across_pieces() {
        let mut b = Body::new(Framing::Chunked);
        let (out, fed) = run(
            &mut b,
            &[
                b"5\r\nhel",
                b"lo\r\n6;x=y\r\n wor",
                b"ld\r\n0\r\n",
                b"\r\nNEXT",
            ],
        );
        assert_eq!(out, b"hello world");
        assert!(fed.done);
        assert_eq!(fed.consumed, 2);
    }

    #[test]
    fn length_and_holes() {
        let mut b = Body::new(Framing::Length(10));
        assert_eq!(b.feed(b"abc", &mut |_| {}).consumed, 3);
        assert_eq!(b.hole(5), Some((5, false)));
        let fed = b.feed(b"xyzNEXT", &mut |_| {});
        assert_eq!((fed.consumed, fed.done), (2, true));
        let mut c = Body::new(Framing::Chunked);
        c.feed(b"100\r\nab", &mut |_| {});
        assert_eq!(c.hole(254), Some((254, false)));
        assert!(c.feed(b"\r\n0\r\n\r\n", &mut |_| {}).done);
        let mut d = Body::new(Framing::Chunked);
        assert_eq!(d.hole(3), None);
    }

    #[test]
    fn bad_chunk_lines_desync() {
        let mut b = Body::new(Framing::Chunked);
        assert!(b.feed(b"zz\r\n", &mut |_| {}).desync);
        let mut b = Body::new(Framing::Chunked);
        assert!(b.feed(&[b'1'; 2000], &mut |_| {}).desync);
    }
}

//! HTTP/2 frames (RFC 9113 §4) as one direction of a connection carries them, read from the
//! records the probes deliver: each record is the first bytes of one syscall's buffer and the
//! length of the part not captured (a hole). Frame headers are read whole; payloads are handed
//! on in pieces as they arrive, a hole as a count of unknown bytes, so that a large DATA frame
//! costs nothing to skip. A hole over a frame header loses the framing: the reader waits for a
//! record that starts with frames again ([`starts_frames`]).

/// What a client sends first on a connection (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const PRIORITY: u8 = 2;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PUSH_PROMISE: u8 = 5;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

const HEAD_LEN: usize = 9;

/// A frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    pub fn parse(b: &[u8; HEAD_LEN]) -> Self {
        Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// Whether this header could begin a frame of a well-behaved peer: a known type on the
    /// kind of stream it belongs to, and a length the type allows. What tells frames from
    /// other bytes where the stream is picked up mid-way.
    pub fn plausible(&self) -> bool {
        let on_connection = self.stream == 0;
        match self.kind {
            DATA | HEADERS | CONTINUATION | PUSH_PROMISE => !on_connection,
            PRIORITY => !on_connection && self.len == 5,
            RST_STREAM => !on_connection && self.len == 4,
            SETTINGS => on_connection && self.len.is_multiple_of(6),
            PING => on_connection && self.len == 8,
            GOAWAY => on_connection && self.len >= 8,
            WINDOW_UPDATE => self.len == 4,
            _ => false,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Whether a record (`data`, the captured start of `len` bytes) starts at a frame boundary:
/// every header in it is plausible and they chain through the record, the last frame ending
/// at or past its end. One header alone (a record of 9 bytes) is not enough to say.
pub fn starts_frames(data: &[u8], len: u64) -> bool {
    let mut at = 0u64;
    let mut frames = 0;
    while at < len {
        let Some(b) = data.get(at as usize..at as usize + HEAD_LEN) else {
            // The next header is in the hole: what was seen decides.
            return frames > 0;
        };
        let head = Head::parse(b.try_into().expect("9 bytes"));
        if !head.plausible() {
            return false;
        }
        frames += 1;
        at += (HEAD_LEN as u64) + u64::from(head.len);
    }
    frames > 1 || (frames == 1 && len > HEAD_LEN as u64)
}

/// What the reader hands on.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A frame header was read; its payload follows in `Payload` pieces (none when empty).
    Head(Head),
    /// Payload bytes of the current frame from `offset`: captured, or a hole of `n` bytes.
    Payload {
        head: Head,
        offset: u32,
        bytes: Option<&'a [u8]>,
        n: u32,
        /// This piece ends the frame.
        last: bool,
    },
    /// The framing was lost (a hole over a header, or bytes that are not frames).
    Lost,
}

#[derive(Debug)]
enum State {
    /// Waiting for the client preface (the inbound side of a connection seen from its start).
    Preface {
        matched: usize,
    },
    Header {
        buf: [u8; HEAD_LEN],
        have: usize,
    },
    Payload {
        head: Head,
        done: u32,
    },
    /// Waiting for a record that starts with frames.
    Lost,
}

/// One direction of a connection.
#[derive(Debug)]
pub struct Reader {
    state: State,
}

impl Reader {
    /// The client's side of a connection seen from its start: the preface, then frames.
    pub fn client() -> Self {
        Self {
            state: State::Preface { matched: 0 },
        }
    }

    /// The server's side of a connection seen from its start: frames.
    pub fn server() -> Self {
        Self {
            state: State::Header {
                buf: [0; HEAD_LEN],
                have: 0,
            },
        }
    }

    /// A direction picked up mid-way: frames from the first record that starts with them.
    pub fn joined() -> Self {
        Self { state: State::Lost }
    }

    pub fn lost(&self) -> bool {
        matches!(self.state, State::Lost)
    }

    /// Reads one record: `data` captured, then a hole of `hole` bytes. Calls `f` for every
    /// piece, in order.
    pub fn record(&mut self, data: &[u8], hole: u64, f: &mut impl FnMut(Piece<'_>)) {
        if matches!(self.state, State::Lost) {
            if !starts_frames(data, data.len() as u64 + hole) {
                return;
            }
            self.state = State::Header {
                buf: [0; HEAD_LEN],
                have: 0,
            };
        }
        let mut data = data;
        while !data.is_empty() {
            let used = self.bytes(data, f);
            data = &data[used..];
        }
        let mut hole = hole;
        while hole > 0 {
            match &mut self.state {
                State::Payload { head, done } => {
                    let head = *head;
                    let left = u64::from(head.len - *done);
                    let n = left.min(hole) as u32;
                    let offset = *done;
                    *done += n;
                    hole -= u64::from(n);
                    let last = *done == head.len;
                    if last {
                        self.next_header();
                    }
                    f(Piece::Payload {
                        head,
                        offset,
                        bytes: None,
                        n,
                        last,
                    });
                }
                State::Lost => return,
                State::Preface { .. } | State::Header { .. } => {
                    self.state = State::Lost;
                    f(Piece::Lost);
                    return;
                }
            }
        }
    }

    fn next_header(&mut self) {
        self.state = State::Header {
            buf: [0; HEAD_LEN],
            have: 0,
        };
    }

    /// Consumes a prefix of `data` (at least one byte); returns how much.
    fn bytes(&mut self, data: &[u8], f: &mut impl FnMut(Piece<'_>)) -> usize {
        match &mut self.state {
            State::Lost => data.len(),
            State::Preface { matched } => {
                let want = &PREFACE[*matched..];
                let n = want.len().min(data.len());
                if data[..n] != want[..n] {
                    self.state = State::Lost;
                    f(Piece::Lost);
                    return data.len();
                }
                *matched += n;
                if *matched == PREFACE.len() {
                    self.next_header();
                }
                n
            }
            State::Header { buf, have } => {
                let n = (HEAD_LEN - *have).min(data.len());
                buf[*have..*have + n].copy_from_slice(&data[..n]);
                *have += n;
                if *have == HEAD_LEN {
                    let head = Head::parse(buf);
                    if !head.plausible() {
                        self.state = State::Lost;
                        f(Piece::Lost);
                        return n;
                    }
                    f(Piece::Head(head));
                    if head.len == 0 {
                        self.next_header();
                    } else {
                        self.state = State::Payload { head, done: 0 };
                    }
                }
                n
            }
            State::Payload { head, done } => {
                let head = *head;
                let n = ((head.len - *done) as usize).min(data.len());
                let offset = *done;
                *done += n as u32;
                let last = *done == head.len;
                if last {
                    self.next_header();
                }
                f(Piece::Payload {
                    head,
                    offset,
                    bytes: Some(&data[..n]),
                    n: n as u32,
                    last,
                });
                n
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn pieces(r: &mut Reader, data: &[u8], hole: u64) -> Vec<String> {
        let mut out = Vec::new();
        r.record(data, hole, &mut |p| {
            out.push(match p {
                Piece::Head(h) => format!("head {} {} {}", h.kind, h.stream, h.len),
                Piece::Payload {
                    offset,
                    bytes,
                    n,
                    last,
                    ..
                } => format!(
                    "payload {offset} {} {n}{}",
                    if bytes.is_some() { "bytes" } else { "hole" },
                    if last { " last" } else { "" }
                ),
                Piece::Lost => "lost".into(),
            })
        });
        out
    }

    #[test]
    fn frames_split_across_records_and_holes() {
        let mut r = Reader::client();
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(SETTINGS, 0, 0, &[0; 6]));
        wire.extend(frame(HEADERS, END_HEADERS, 1, b"abc"));
        wire.extend(frame(DATA, END_STREAM, 1, &[7; 100]));
        // The preface and half a header in one record.
        assert_eq!(
            pieces(&mut r, &wire[..PREFACE.len() + 4], 0),
            Vec::<String>::new()
        );
        let rest = &wire[PREFACE.len() + 4..];
        // The DATA frame's last 60 bytes were not captured.
        assert_eq!(
            pieces(&mut r, &rest[..rest.len() - 60], 60),
            [
                "head 4 0 6",
                "payload 0 bytes 6 last",
                "head 1 1 3",
                "payload 0 bytes 3 last",
                "head 0 1 100",
                "payload 0 bytes 40",
                "payload 40 hole 60 last"
            ]
        );
        // A hole over the next header: lost, then found again at a record of frames.
        assert_eq!(pieces(&mut r, &[], 20), ["lost"]);
        assert_eq!(pieces(&mut r, &[1, 2, 3], 0), Vec::<String>::new());
        let ping = frame(PING, 0, 0, &[0; 8]);
        assert_eq!(
            pieces(&mut r, &ping, 0),
            ["head 6 0 8", "payload 0 bytes 8 last"]
        );
    }

    #[test]
    fn http1_and_garbage_are_not_frames() {
        assert!(!starts_frames(
            b"POST /v1/chat/completions HTTP/1.1\r\n",
            37
        ));
        assert!(!starts_frames(b"HTTP/1.1 200 OK\r\n", 17));
        assert!(!starts_frames(&[0; 9], 9));
        let two = [
            frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]),
            frame(PING, 0, 0, &[0; 8]),
        ]
        .concat();
        assert!(starts_frames(&two, two.len() as u64));
        // A DATA frame of 16 KiB whose tail is a hole.
        let data = frame(DATA, 0, 3, &[0; 100]);
        assert!(starts_frames(&data, 9 + 16384));
        let mut client = Reader::client();
        assert_eq!(pieces(&mut client, b"GET / HTTP/1.1\r\n", 0), ["lost"]);
    }
}

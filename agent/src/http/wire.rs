//! A watched connection, whichever protocol it speaks: HTTP/1.x ([`super::conn`]) or HTTP/2
//! and gRPC ([`super::h2`]). A connection seen from its accept is HTTP/2 when the client's
//! first bytes are the HTTP/2 preface, TLS when they are a TLS handshake record; one picked up
//! mid-way is decided by its first record that starts like any of them (a request line, a run
//! of plausible frames, a TLS record). TLS the agent cannot read is counted once and ignored.

use super::{
    conn::{self, ErrorType, Output},
    h2::{self, frame},
};

#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "most connections are HTTP/1: kept inline, as before; the undecided states are brief"
)]
pub enum Wire {
    /// Accepted while watched; nothing read yet.
    Fresh {
        ts: u64,
    },
    /// Older than the agent and not yet recognised.
    Joined {
        ts: u64,
    },
    H1(conn::Conn),
    H2(Box<h2::Conn>),
    /// Encrypted: nothing to parse.
    Tls {
        ts: u64,
    },
}

/// Whether a record starts with a TLS record header (RFC 8446 §5.1): a content type from
/// change_cipher_spec to application_data, a 3.x version, a length a record may have.
/// `handshake_only`: only a handshake record (what a client sends first).
fn starts_tls(data: &[u8], handshake_only: bool) -> bool {
    let [kind, 3, minor, hi, lo, ..] = *data else {
        return false;
    };
    let kinds = if handshake_only {
        0x16..=0x16
    } else {
        0x14..=0x17
    };
    kinds.contains(&kind) && minor <= 4 && u16::from_be_bytes([hi, lo]) <= 16384 + 2048
}

impl Wire {
    pub fn new(ts: u64) -> Self {
        Wire::Fresh { ts }
    }

    pub fn joined(ts: u64) -> Self {
        Wire::Joined { ts }
    }

    pub fn last_ns(&self) -> u64 {
        match self {
            Wire::Fresh { ts } | Wire::Joined { ts } | Wire::Tls { ts } => *ts,
            Wire::H1(c) => c.last_ns,
            Wire::H2(c) => c.last_ns,
        }
    }

    /// Decides the protocol from a record, where it is still open.
    fn decide(&mut self, inbound: bool, data: &[u8], len: u64, out: &mut Vec<Output>) {
        match *self {
            Wire::Fresh { ts } => {
                let n = data.len().min(frame::PREFACE.len());
                if inbound {
                    *self = if n > 0 && data[..n] == frame::PREFACE[..n] {
                        Wire::H2(Box::new(h2::Conn::new(ts)))
                    } else if starts_tls(data, true) {
                        out.push(Output::Bad(conn::Bad::TlsUnsupported));
                        Wire::Tls { ts }
                    } else {
                        Wire::H1(conn::Conn::new(ts))
                    };
                } else if frame::starts_frames(data, len) {
                    // An HTTP/2 server may send its SETTINGS before it reads the preface.
                    *self = Wire::H2(Box::new(h2::Conn::new(ts)));
                }
            }
            Wire::Joined { ts } => {
                if starts_tls(data, false) {
                    out.push(Output::Bad(conn::Bad::TlsUnsupported));
                    *self = Wire::Tls { ts };
                } else if frame::starts_frames(data, len) {
                    *self = Wire::H2(Box::new(h2::Conn::joined(ts)));
                } else if conn::Conn::starts_message(inbound, data) {
                    *self = Wire::H1(conn::Conn::joined(ts));
                }
            }
            Wire::H1(_) | Wire::H2(_) | Wire::Tls { .. } => {}
        }
    }

    /// One record: `data` captured of `len` bytes (the rest a hole).
    pub fn record(&mut self, ts: u64, inbound: bool, data: &[u8], len: u64, out: &mut Vec<Output>) {
        self.decide(inbound, data, len, out);
        let hole = len.saturating_sub(data.len() as u64);
        match self {
            Wire::Fresh { ts: last } | Wire::Joined { ts: last } | Wire::Tls { ts: last } => {
                *last = ts
            }
            Wire::H1(c) => {
                if inbound {
                    c.read(ts, data, out);
                    c.read_hole(ts, hole, out);
                } else {
                    c.write(ts, data, out);
                    c.write_hole(ts, hole, out);
                }
            }
            Wire::H2(c) => {
                if inbound {
                    c.read(ts, data, hole, out);
                } else {
                    c.write(ts, data, hole, out);
                }
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        match self {
            Wire::H1(c) => c.in_flight(),
            Wire::H2(c) => c.in_flight(),
            _ => 0,
        }
    }

    pub fn in_flight_bytes(&self) -> u64 {
        match self {
            Wire::H1(c) => c.in_flight_bytes(),
            Wire::H2(c) => c.in_flight_bytes(),
            _ => 0,
        }
    }

    /// Bytes of parser state (an HTTP/1 connection's own figure includes its inline size).
    pub fn state_bytes(&self) -> usize {
        match self {
            Wire::H1(c) => c.state_bytes(),
            Wire::H2(c) => size_of::<Wire>() + c.state_bytes(),
            _ => size_of::<Wire>(),
        }
    }

    pub fn shed(&mut self, ts: u64, out: &mut Vec<Output>) {
        match self {
            Wire::H1(c) => c.shed(ts, out),
            Wire::H2(c) => c.shed(ts, out),
            _ => {}
        }
    }

    pub fn close(&mut self, ts: u64, out: &mut Vec<Output>) {
        match self {
            Wire::H1(c) => c.close(ts, out),
            Wire::H2(c) => c.close(ts, out),
            _ => {}
        }
    }

    pub fn abandon(&mut self, ts: u64, error: ErrorType, out: &mut Vec<Output>) {
        match self {
            Wire::H1(c) => c.abandon(ts, error, out),
            Wire::H2(c) => c.abandon(ts, error, out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(out: &[Output]) -> Vec<conn::Bad> {
        out.iter()
            .filter_map(|o| match o {
                Output::Bad(b) => Some(*b),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn protocols_are_told_apart() {
        let hello = [0x16, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
        let mut out = Vec::new();
        let mut w = Wire::new(0);
        w.record(1, true, &hello, 205, &mut out);
        w.record(2, false, &[0x16, 3, 3, 0, 90, 2], 95, &mut out);
        w.record(3, true, &[0x17, 3, 3, 1, 0, 9, 9], 261, &mut out);
        assert!(matches!(w, Wire::Tls { .. }));
        assert_eq!(bad(&out), [conn::Bad::TlsUnsupported]);
        assert_eq!(w.last_ns(), 3);

        // Picked up mid-way: application data records.
        let mut out = Vec::new();
        let mut w = Wire::joined(0);
        w.record(1, false, &[0x17, 3, 3, 0, 40, 1, 2, 3], 45, &mut out);
        assert_eq!(bad(&out), [conn::Bad::TlsUnsupported]);

        // Plain HTTP/1 and HTTP/2 stay what they are.
        let mut out = Vec::new();
        let mut w = Wire::new(0);
        let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        w.record(1, true, req, req.len() as u64, &mut out);
        assert!(matches!(w, Wire::H1(_)) && out.is_empty());
        let mut w = Wire::new(0);
        w.record(1, true, frame::PREFACE, 24, &mut out);
        assert!(matches!(w, Wire::H2(_)) && out.is_empty());
        // A server's SETTINGS before the client's preface.
        let mut w = Wire::new(0);
        let settings = [0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
        w.record(1, false, &settings, 15, &mut out);
        assert!(matches!(w, Wire::H2(_)) && out.is_empty());
    }
}

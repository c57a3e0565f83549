//! A watched connection, whichever protocol it speaks: HTTP/1.x ([`super::conn`]) or HTTP/2
//! and gRPC ([`super::h2`]), in clear or inside TLS. A connection seen from its accept is
//! HTTP/2 when the client's first bytes are the HTTP/2 preface, TLS when they are a TLS
//! handshake record; one picked up mid-way is decided by its first record that starts like any
//! of them (a request line, a run of plausible frames, a TLS record).
//!
//! TLS the server terminates with the OpenSSL it maps reaches the parser as plaintext records
//! (`probe::tls`): from the first of them the connection is parsed from its plaintext, decided
//! afresh, and its socket bytes are ignored. A TLS connection that never yields plaintext is
//! counted as `tls_unsupported` once: when it ends, or when it has carried
//! [`CIPHER_READS_UNSUPPORTED`] encrypted reads without plaintext.

use super::{
    conn::{self, ErrorType, Output},
    h2::{self, frame},
};

/// Encrypted reads of a TLS connection, without plaintext from the server's OpenSSL in between,
/// after which its TLS is counted as unreadable. A TLS 1.3 client's `Finished` and its first
/// request may come in two reads before the `SSL_read` that returns the request.
pub const CIPHER_READS_UNSUPPORTED: u8 = 3;

#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "most connections are HTTP/1: kept inline, as before; the undecided states are brief"
)]
enum Proto {
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
    /// Encrypted, no plaintext (yet): nothing to parse. `joined`: picked up mid-way.
    Tls {
        ts: u64,
        joined: bool,
    },
}

/// What is known of the connection's TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// No TLS record seen.
    Clear,
    /// TLS records and no plaintext: `reads` encrypted reads of application data so far;
    /// `counted` once reported. The client's records are followed one after the other: `left`
    /// bytes of the current one are still to come (OpenSSL's socket BIO reads a record's
    /// 5-byte header and its body apart, and a body may begin with any byte); `synced` until a
    /// header was not where one should be (then it is counted only when it ends).
    Cipher {
        reads: u8,
        counted: bool,
        left: u64,
        synced: bool,
    },
    /// The server's OpenSSL gives the plaintext: socket bytes are ignored.
    Plain,
}

#[derive(Debug)]
pub struct Wire {
    proto: Proto,
    tls: Tls,
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
        Self {
            proto: Proto::Fresh { ts },
            tls: Tls::Clear,
        }
    }

    pub fn joined(ts: u64) -> Self {
        Self {
            proto: Proto::Joined { ts },
            tls: Tls::Clear,
        }
    }

    pub fn last_ns(&self) -> u64 {
        match &self.proto {
            Proto::Fresh { ts } | Proto::Joined { ts } | Proto::Tls { ts, .. } => *ts,
            Proto::H1(c) => c.last_ns,
            Proto::H2(c) => c.last_ns,
        }
    }

    /// Decides the protocol from a record, where it is still open.
    fn decide(&mut self, inbound: bool, data: &[u8], len: u64) {
        match self.proto {
            Proto::Fresh { ts } => {
                let n = data.len().min(frame::PREFACE.len());
                if inbound {
                    self.proto = if n > 0 && data[..n] == frame::PREFACE[..n] {
                        Proto::H2(Box::new(h2::Conn::new(ts)))
                    } else if self.tls != Tls::Plain && starts_tls(data, true) {
                        Proto::Tls { ts, joined: false }
                    } else {
                        Proto::H1(conn::Conn::new(ts))
                    };
                } else if frame::starts_frames(data, len) {
                    // An HTTP/2 server may send its SETTINGS before it reads the preface.
                    self.proto = Proto::H2(Box::new(h2::Conn::new(ts)));
                }
            }
            Proto::Joined { ts } => {
                if self.tls != Tls::Plain && starts_tls(data, false) {
                    self.proto = Proto::Tls { ts, joined: true };
                } else if frame::starts_frames(data, len) {
                    self.proto = Proto::H2(Box::new(h2::Conn::joined(ts)));
                } else if conn::Conn::starts_message(inbound, data) {
                    self.proto = Proto::H1(conn::Conn::joined(ts));
                }
            }
            Proto::H1(_) | Proto::H2(_) | Proto::Tls { .. } => {}
        }
        if matches!(self.proto, Proto::Tls { .. }) && self.tls == Tls::Clear {
            self.tls = Tls::Cipher {
                reads: 0,
                counted: false,
                left: 0,
                synced: true,
            };
        }
    }

    /// One record: `data` captured of `len` bytes (the rest a hole); `plain` when it is the
    /// plaintext of the server's OpenSSL rather than the socket's bytes.
    pub fn record(
        &mut self,
        ts: u64,
        inbound: bool,
        data: &[u8],
        len: u64,
        plain: bool,
        out: &mut Vec<Output>,
    ) {
        if plain && self.tls != Tls::Plain {
            // The first plaintext: the protocol is decided again, from it.
            if let Proto::Tls { joined, .. } = self.proto {
                self.proto = if joined {
                    Proto::Joined { ts }
                } else {
                    Proto::Fresh { ts }
                };
            }
            self.tls = Tls::Plain;
        } else if !plain && self.tls == Tls::Plain {
            // Ciphertext of a connection read in plaintext.
            return;
        }
        self.decide(inbound, data, len);
        let hole = len.saturating_sub(data.len() as u64);
        match &mut self.proto {
            Proto::Fresh { ts: last } | Proto::Joined { ts: last } => *last = ts,
            Proto::Tls { ts: last, .. } => {
                *last = ts;
                if inbound && self.starts_app_record(data, len) {
                    self.cipher_read(out);
                }
            }
            Proto::H1(c) => {
                if inbound {
                    c.read(ts, data, out);
                    c.read_hole(ts, hole, out);
                } else {
                    c.write(ts, data, out);
                    c.write_hole(ts, hole, out);
                }
            }
            Proto::H2(c) => {
                if inbound {
                    c.read(ts, data, hole, out);
                } else {
                    c.write(ts, data, hole, out);
                }
            }
        }
    }

    /// Follows the client's records through an inbound read of `len` bytes (`data` captured):
    /// whether an application-data record starts in it.
    fn starts_app_record(&mut self, data: &[u8], len: u64) -> bool {
        let Tls::Cipher { left, synced, .. } = &mut self.tls else {
            return false;
        };
        let mut at = 0u64;
        let mut app = false;
        while *synced && at < len {
            if *left > 0 {
                let take = (*left).min(len - at);
                *left -= take;
                at += take;
                continue;
            }
            let header = usize::try_from(at)
                .ok()
                .and_then(|i| data.get(i..i.checked_add(5)?));
            match header {
                Some(h) if starts_tls(h, false) => {
                    app |= h[0] == 0x17;
                    *left = 5 + u64::from(u16::from_be_bytes([h[3], h[4]]));
                }
                // Not captured, split between reads, or not a header: lost track.
                _ => *synced = false,
            }
        }
        app
    }

    /// An encrypted read of application data with no plaintext yet.
    fn cipher_read(&mut self, out: &mut Vec<Output>) {
        if let Tls::Cipher { reads, counted, .. } = &mut self.tls {
            *reads = reads.saturating_add(1);
            if *reads >= CIPHER_READS_UNSUPPORTED && !*counted {
                *counted = true;
                out.push(Output::Bad(conn::Bad::TlsUnsupported));
            }
        }
    }

    /// The connection ends: TLS that never gave plaintext is counted now.
    fn ended(&mut self, out: &mut Vec<Output>) {
        if let Tls::Cipher { counted, .. } = &mut self.tls {
            if !*counted {
                *counted = true;
                out.push(Output::Bad(conn::Bad::TlsUnsupported));
            }
        }
    }

    /// The requests in flight.
    pub fn each_in_flight(&self, f: &mut dyn FnMut(&conn::Exchange)) {
        match &self.proto {
            Proto::H1(c) => c.each_in_flight(f),
            Proto::H2(c) => c.each_in_flight(f),
            _ => {}
        }
    }

    /// The output events so far of the exchanges being answered, with the model each named.
    pub fn tokens_in_flight(&self, f: &mut dyn FnMut(Option<&str>, u64)) {
        match &self.proto {
            Proto::H1(c) => c.tokens_in_flight(f),
            Proto::H2(c) => c.tokens_in_flight(f),
            _ => {}
        }
    }

    pub fn in_flight(&self) -> usize {
        match &self.proto {
            Proto::H1(c) => c.in_flight(),
            Proto::H2(c) => c.in_flight(),
            _ => 0,
        }
    }

    pub fn in_flight_bytes(&self) -> u64 {
        match &self.proto {
            Proto::H1(c) => c.in_flight_bytes(),
            Proto::H2(c) => c.in_flight_bytes(),
            _ => 0,
        }
    }

    /// Bytes of parser state (an HTTP/1 connection's own figure includes its inline size).
    pub fn state_bytes(&self) -> usize {
        match &self.proto {
            Proto::H1(c) => c.state_bytes() + size_of::<Tls>(),
            Proto::H2(c) => size_of::<Wire>() + c.state_bytes(),
            _ => size_of::<Wire>(),
        }
    }

    pub fn shed(&mut self, ts: u64, out: &mut Vec<Output>) {
        match &mut self.proto {
            Proto::H1(c) => c.shed(ts, out),
            Proto::H2(c) => c.shed(ts, out),
            _ => {}
        }
    }

    pub fn close(&mut self, ts: u64, out: &mut Vec<Output>) {
        self.ended(out);
        match &mut self.proto {
            Proto::H1(c) => c.close(ts, out),
            Proto::H2(c) => c.close(ts, out),
            _ => {}
        }
    }

    pub fn abandon(&mut self, ts: u64, error: ErrorType, out: &mut Vec<Output>) {
        // Dropped while the probes were off: not known to have ended unread.
        if !matches!(error, ErrorType::Untracked) {
            self.ended(out);
        }
        match &mut self.proto {
            Proto::H1(c) => c.abandon(ts, error, out),
            Proto::H2(c) => c.abandon(ts, error, out),
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

    fn finished(out: &[Output]) -> usize {
        out.iter()
            .filter(|o| matches!(o, Output::Finished(_)))
            .count()
    }

    const HELLO: [u8; 11] = [0x16, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
    const APP_DATA: [u8; 7] = [0x17, 3, 3, 1, 0, 9, 9];

    #[test]
    fn protocols_are_told_apart() {
        let mut out = Vec::new();
        let mut w = Wire::new(0);
        w.record(1, true, &HELLO, 205, false, &mut out);
        w.record(2, false, &[0x16, 3, 3, 0, 90, 2], 95, false, &mut out);
        w.record(3, true, &APP_DATA, 261, false, &mut out);
        assert!(matches!(w.proto, Proto::Tls { joined: false, .. }));
        assert_eq!(w.last_ns(), 3);
        // Counted when it ends without plaintext, once.
        assert!(bad(&out).is_empty());
        w.close(4, &mut out);
        w.close(5, &mut out);
        assert_eq!(bad(&out), [conn::Bad::TlsUnsupported]);

        // Picked up mid-way: application data records; counted after the third read, before
        // it ends.
        let mut out = Vec::new();
        let mut w = Wire::joined(0);
        w.record(1, false, &[0x17, 3, 3, 0, 40, 1, 2, 3], 45, false, &mut out);
        assert!(matches!(w.proto, Proto::Tls { joined: true, .. }));
        for ts in 2..2 + u64::from(CIPHER_READS_UNSUPPORTED) {
            assert!(bad(&out).is_empty());
            w.record(ts, true, &APP_DATA, 261, false, &mut out);
        }
        assert_eq!(bad(&out), [conn::Bad::TlsUnsupported]);
        w.abandon(9, ErrorType::Timeout, &mut out);
        assert_eq!(bad(&out), [conn::Bad::TlsUnsupported]);

        // OpenSSL's socket BIO reads each record's header and its body apart, and a body may
        // begin with 0x17: only headers count. The client's `Finished` and two requests are
        // two reads of application data, then plaintext.
        let mut out = Vec::new();
        let mut w = Wire::new(0);
        w.record(1, true, &HELLO[..5], 5, false, &mut out);
        w.record(2, true, &HELLO[5..], 200, false, &mut out);
        for ts in [3, 5] {
            w.record(ts, true, &[0x17, 3, 3, 0, 53], 5, false, &mut out);
            w.record(ts + 1, true, &[0x17; 53], 53, false, &mut out);
        }
        assert!(bad(&out).is_empty());
        // A header not captured whole: lost track, counted only when it ends.
        w.record(7, true, &[0x17, 3, 3], 58, false, &mut out);
        w.record(8, true, &[0x17, 3, 3, 0, 53], 5, false, &mut out);
        w.record(9, true, &[0x17, 3, 3, 0, 53], 5, false, &mut out);
        assert!(bad(&out).is_empty());
        w.close(10, &mut out);
        assert_eq!(bad(&out), [conn::Bad::TlsUnsupported]);

        // Dropped while the probes were off: not counted.
        let mut out = Vec::new();
        let mut w = Wire::new(0);
        w.record(1, true, &HELLO, 205, false, &mut out);
        w.abandon(2, ErrorType::Untracked, &mut out);
        assert!(out.is_empty());

        // Plain HTTP/1 and HTTP/2 stay what they are.
        let mut out = Vec::new();
        let mut w = Wire::new(0);
        let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        w.record(1, true, req, req.len() as u64, false, &mut out);
        assert!(matches!(w.proto, Proto::H1(_)) && out.is_empty());
        let mut w = Wire::new(0);
        w.record(1, true, frame::PREFACE, 24, false, &mut out);
        assert!(matches!(w.proto, Proto::H2(_)) && out.is_empty());
        // A server's SETTINGS before the client's preface.
        let mut w = Wire::new(0);
        let settings = [0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
        w.record(1, false, &settings, 15, false, &mut out);
        assert!(matches!(w.proto, Proto::H2(_)) && out.is_empty());
    }

    /// The server's OpenSSL plaintext takes over from the handshake's records: the exchange is
    /// parsed from it, the socket's ciphertext around it is ignored, nothing is counted as
    /// unsupported.
    #[test]
    fn plaintext_replaces_the_ciphertext() {
        let req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        for joined in [false, true] {
            let mut out = Vec::new();
            let mut w = if joined {
                Wire::joined(0)
            } else {
                Wire::new(0)
            };
            let first: &[u8] = if joined { &APP_DATA } else { &HELLO };
            w.record(1, true, first, 205, false, &mut out);
            w.record(2, true, &APP_DATA, 90, false, &mut out);
            w.record(3, true, req, req.len() as u64, true, &mut out);
            assert_eq!(w.tls, Tls::Plain);
            // Encrypted bytes of the same exchange, as the socket carried them.
            w.record(4, false, &APP_DATA, 300, false, &mut out);
            w.record(5, false, resp, resp.len() as u64, true, &mut out);
            for ts in 6..12 {
                w.record(ts, true, &APP_DATA, 261, false, &mut out);
            }
            // The ignored records leave no trace, not even their time.
            assert_eq!(w.last_ns(), 5);
            w.close(20, &mut out);
            assert_eq!(finished(&out), 1, "joined {joined}: {out:?}");
            assert!(bad(&out).is_empty(), "joined {joined}: {out:?}");
        }

        // HTTP/2 inside TLS: the preface arrives as plaintext.
        let mut out = Vec::new();
        let mut w = Wire::new(0);
        w.record(1, true, &HELLO, 205, false, &mut out);
        w.record(2, true, frame::PREFACE, 24, true, &mut out);
        assert!(matches!(w.proto, Proto::H2(_)));
    }
}

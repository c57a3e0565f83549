//! A watched connection, whichever protocol it speaks: HTTP/1.x ([`super::conn`]) or HTTP/2
//! and gRPC ([`super::h2`]). A connection seen from its accept is HTTP/2 when the client's
//! first bytes are the HTTP/2 preface; one picked up mid-way is decided by its first record
//! that starts like either (a request line, or a run of plausible frames).

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
            Wire::Fresh { ts } | Wire::Joined { ts } => *ts,
            Wire::H1(c) => c.last_ns,
            Wire::H2(c) => c.last_ns,
        }
    }

    /// Decides the protocol from a record, where it is still open.
    fn decide(&mut self, inbound: bool, data: &[u8], len: u64) {
        match *self {
            Wire::Fresh { ts } => {
                let n = data.len().min(frame::PREFACE.len());
                if inbound {
                    *self = if n > 0 && data[..n] == frame::PREFACE[..n] {
                        Wire::H2(Box::new(h2::Conn::new(ts)))
                    } else {
                        Wire::H1(conn::Conn::new(ts))
                    };
                } else if frame::starts_frames(data, len) {
                    // An HTTP/2 server may send its SETTINGS before it reads the preface.
                    *self = Wire::H2(Box::new(h2::Conn::new(ts)));
                }
            }
            Wire::Joined { ts } => {
                if frame::starts_frames(data, len) {
                    *self = Wire::H2(Box::new(h2::Conn::joined(ts)));
                } else if conn::Conn::starts_message(inbound, data) {
                    *self = Wire::H1(conn::Conn::joined(ts));
                }
            }
            Wire::H1(_) | Wire::H2(_) => {}
        }
    }

    /// One record: `data` captured of `len` bytes (the rest a hole).
    pub fn record(&mut self, ts: u64, inbound: bool, data: &[u8], len: u64, out: &mut Vec<Output>) {
        self.decide(inbound, data, len);
        let hole = len.saturating_sub(data.len() as u64);
        match self {
            Wire::Fresh { ts: last } | Wire::Joined { ts: last } => *last = ts,
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

//! gRPC on HTTP/2 streams: the length-prefixed messages of each direction (a compressed flag
//! and a 4-byte length before each message), counted across DATA frames and holes; status
//! codes by name; and the model named by the inference APIs that carry one, read from the
//! first request message's protobuf fields without the schema.

/// Bytes of a stream's first request message kept to read the model from.
pub const PEEK: usize = 512;

/// The `:path` prefixes of the inference services whose requests name their model in field 1
/// of the first message (`string model_name = 1`), each checked against its published proto
/// in the tests:
/// - KServe v2 / Triton `inference.GRPCInferenceService`: `ModelInfer`, `ModelStreamInfer`
///   (`ModelInferRequest.model_name`), `ModelReady`, `ModelMetadata` (`name = 1`).
const MODEL_IN_FIELD_1: &[&str] = &[
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ModelMetadata",
];

/// Whether requests to `path` name their model in field 1 of their first message.
pub fn names_model(path: &str) -> bool {
    MODEL_IN_FIELD_1.contains(&path)
}

/// `grpc-status` codes as `error_type` values (`grpc_` and the code's name).
pub fn status_label(code: u32) -> &'static str {
    match code {
        0 => "grpc_ok",
        1 => "grpc_cancelled",
        2 => "grpc_unknown",
        3 => "grpc_invalid_argument",
        4 => "grpc_deadline_exceeded",
        5 => "grpc_not_found",
        6 => "grpc_already_exists",
        7 => "grpc_permission_denied",
        8 => "grpc_resource_exhausted",
        9 => "grpc_failed_precondition",
        10 => "grpc_aborted",
        11 => "grpc_out_of_range",
        12 => "grpc_unimplemented",
        13 => "grpc_internal",
        14 => "grpc_unavailable",
        15 => "grpc_data_loss",
        16 => "grpc_unauthenticated",
        _ => "grpc_other",
    }
}

/// Whether the first bytes of a stream's first DATA frame (`frame` bytes of data in all)
/// are a gRPC message prefix: a compressed flag of 0 or 1 and a length that the frame holds
/// exactly, or that runs past it (a message split across frames), under gRPC's default limit.
pub fn looks_like_message(first: &[u8], frame: u32) -> bool {
    let Some(prefix) = first.get(..5) else {
        return false;
    };
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    prefix[0] <= 1 && len <= 4 * 1024 * 1024 && u64::from(len) + 5 >= u64::from(frame)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Prefix {
        buf: [u8; 5],
        have: u8,
    },
    Body {
        left: u64,
        compressed: bool,
    },
    /// A hole covered a prefix: messages are no longer counted on this stream.
    Lost,
}

/// One direction's messages on one stream.
#[derive(Clone, Debug)]
pub struct Messages {
    state: State,
    /// Messages whose prefix was read.
    pub count: u64,
    /// The first message's first bytes (when uncompressed), for [`string_field`].
    pub first: Vec<u8>,
}

impl Default for Messages {
    fn default() -> Self {
        Self {
            state: State::Prefix {
                buf: [0; 5],
                have: 0,
            },
            count: 0,
            first: Vec::new(),
        }
    }
}

impl Messages {
    pub fn lost(&self) -> bool {
        matches!(self.state, State::Lost)
    }

    pub fn state_bytes(&self) -> usize {
        self.first.capacity()
    }

    /// Feeds DATA payload: captured bytes, or a hole of `n` bytes. Returns how many messages
    /// began in it.
    pub fn feed(&mut self, bytes: Option<&[u8]>, n: u64) -> u32 {
        let mut started = 0;
        match bytes {
            None => {
                let mut n = n;
                while n > 0 {
                    match &mut self.state {
                        State::Body { left, .. } => {
                            let k = (*left).min(n);
                            *left -= k;
                            n -= k;
                            if *left == 0 {
                                self.state = State::Prefix {
                                    buf: [0; 5],
                                    have: 0,
                                };
                            }
                        }
                        State::Prefix { .. } => {
                            self.state = State::Lost;
                            return started;
                        }
                        State::Lost => return started,
                    }
                }
            }
            Some(mut b) => {
                while !b.is_empty() {
                    match &mut self.state {
                        State::Prefix { buf, have } => {
                            let k = (5 - *have as usize).min(b.len());
                            buf[*have as usize..*have as usize + k].copy_from_slice(&b[..k]);
                            *have += k as u8;
                            b = &b[k..];
                            if *have == 5 {
                                let compressed = buf[0] & 1 != 0;
                                let left =
                                    u64::from(u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]));
                                self.count += 1;
                                started += 1;
                                self.state = if left == 0 {
                                    State::Prefix {
                                        buf: [0; 5],
                                        have: 0,
                                    }
                                } else {
                                    State::Body { left, compressed }
                                };
                            }
                        }
                        State::Body { left, compressed } => {
                            let k = (*left).min(b.len() as u64) as usize;
                            if self.count == 1 && !*compressed && self.first.len() < PEEK {
                                let room = PEEK - self.first.len();
                                self.first.extend_from_slice(&b[..k.min(room)]);
                            }
                            *left -= k as u64;
                            b = &b[k..];
                            if *left == 0 {
                                self.state = State::Prefix {
                                    buf: [0; 5],
                                    have: 0,
                                };
                            }
                        }
                        State::Lost => return started,
                    }
                }
            }
        }
        started
    }
}

/// A length-delimited field `field` at the top level of protobuf `msg` (the first occurrence
/// wholly inside the bytes given), read without the schema.
pub fn string_field(msg: &[u8], field: u32) -> Option<&[u8]> {
    let mut b = msg;
    while !b.is_empty() {
        let (key, rest) = varint(b)?;
        b = rest;
        let number = key >> 3;
        match key & 7 {
            0 => b = varint(b)?.1,
            1 => b = b.get(8..)?,
            5 => b = b.get(4..)?,
            2 => {
                let (len, rest) = varint(b)?;
                let len = usize::try_from(len).ok()?;
                let value = rest.get(..len)?;
                if number == u64::from(field) {
                    return Some(value);
                }
                b = &rest[len..];
            }
            _ => return None,
        }
    }
    None
}

fn varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn messages_across_pieces_and_holes() {
        let mut m = Messages::default();
        let wire = [message(b"\x0a\x05llama"), message(&[1; 300]), message(b"")].concat();
        // The first prefix split in two, the second message's body partly a hole.
        assert_eq!(m.feed(Some(&wire[..3]), 3), 0);
        assert_eq!(m.feed(Some(&wire[3..20]), 17), 2);
        assert_eq!(m.feed(None, 200), 0);
        assert_eq!(m.feed(Some(&wire[220..]), (wire.len() - 220) as u64), 1);
        assert_eq!(m.count, 3);
        assert_eq!(string_field(&m.first, 1), Some(&b"llama"[..]));
        // A hole over a prefix: counting stops.
        assert_eq!(m.feed(None, 7), 0);
        assert!(m.lost());
        assert_eq!(m.feed(Some(&message(b"x")), 6), 0);
    }

    #[test]
    fn protobuf_fields_without_the_schema() {
        // varint field 3, fixed64 field 4, then string field 1.
        let mut msg = vec![0x18, 0x96, 0x01, 0x21, 0, 0, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(b"\x0a\x03abc");
        assert_eq!(string_field(&msg, 1), Some(&b"abc"[..]));
        assert_eq!(string_field(&msg, 2), None);
        assert_eq!(string_field(&msg[..msg.len() - 1], 1), None);
        assert_eq!(string_field(&[0xff; 20], 1), None);
    }
}

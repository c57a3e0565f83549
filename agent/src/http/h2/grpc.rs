//! gRPC on HTTP/2 streams: the length-prefixed messages of each direction (a compressed flag
//! and a 4-byte length before each message), counted across DATA frames and holes; status
//! codes by name; and the model named by the inference APIs that carry one, read from the
//! first request message's protobuf fields without the schema.

/// Bytes of a stream's first request message kept to read the model from.
pub const PEEK: usize = 512;
/// Bytes of it kept where a batch is read from it (`crate::http::engine`): a TGI `Decode`
/// names every request of the batch (some 2 bytes each).
pub const BATCH_PEEK: usize = 4096;

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

/// Reads token counts from one response message of a service that carries them.
pub type UsageReader = fn(&[u8]) -> Option<(u64, u64)>;

/// The response messages that carry token counts, by `:path`:
/// - SGLang's scheduler (`sglang.grpc.scheduler.SglangScheduler/Generate`, the gRPC mode
///   behind its model gateway): `GenerateResponse { oneof response { GenerateStreamChunk
///   chunk = 2; GenerateComplete complete = 3; ... } }`, a chunk with cumulative
///   `prompt_tokens = 2`, `completion_tokens = 3`, the completion with `prompt_tokens = 3`,
///   `completion_tokens = 4`. The last message that carries them gives the call's usage.
/// - vLLM's engine (`vllm.grpc.engine.VllmEngine/Generate`, its gRPC mode behind the same
///   router): `GenerateResponse` with the same field numbers (`vllm_engine.proto`).
pub fn usage_reader(path: &str) -> Option<UsageReader> {
    match path {
        "/sglang.grpc.scheduler.SglangScheduler/Generate"
        | "/vllm.grpc.engine.VllmEngine/Generate" => Some(generate_response_usage),
        _ => None,
    }
}

fn generate_response_usage(msg: &[u8]) -> Option<(u64, u64)> {
    if let Some(chunk) = field_prefix(msg, 2) {
        return Some((varint_field(chunk, 2)?, varint_field(chunk, 3)?));
    }
    let complete = field_prefix(msg, 3)?;
    Some((varint_field(complete, 3)?, varint_field(complete, 4)?))
}

/// Bytes of a response message kept to read its token counts from.
const USAGE_PEEK: usize = 1024;

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
    /// How many of them are kept.
    peek: usize,
    /// The first message's length, from its prefix.
    first_len: Option<u64>,
    /// Reads token counts from each message (see [`usage_reader`]).
    usage_reader: Option<UsageReader>,
    /// The current message's first bytes, for `usage_reader`.
    current: Vec<u8>,
    /// (prompt, completion) from the last message that carried them.
    pub usage: Option<(u64, u64)>,
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
            peek: PEEK,
            first_len: None,
            usage_reader: None,
            current: Vec::new(),
            usage: None,
        }
    }
}

impl Messages {
    /// Messages whose token counts `reader` reads.
    pub fn with_usage(reader: Option<UsageReader>) -> Self {
        Self {
            usage_reader: reader,
            ..Self::default()
        }
    }

    /// Messages whose first one is kept up to `peek` bytes.
    pub fn with_peek(peek: usize) -> Self {
        Self {
            peek,
            ..Self::default()
        }
    }

    /// Whether [`Messages::first`] holds the whole first message.
    pub fn first_whole(&self) -> bool {
        self.first_len == Some(self.first.len() as u64)
    }

    pub fn lost(&self) -> bool {
        matches!(self.state, State::Lost)
    }

    pub fn state_bytes(&self) -> usize {
        self.first.capacity() + self.current.capacity()
    }

    /// The current message's bytes kept so far are all there will be: read its counts.
    fn message_done(&mut self) {
        if let Some(read) = self.usage_reader {
            if let Some(u) = read(&self.current) {
                self.usage = Some(u);
            }
        }
        self.current.clear();
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
                                self.message_done();
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
                                if self.count == 1 && !compressed {
                                    self.first_len = Some(left);
                                }
                                self.current.clear();
                                self.state = if left == 0 {
                                    self.message_done();
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
                            if self.count == 1 && !*compressed && self.first.len() < self.peek {
                                let room = self.peek - self.first.len();
                                self.first.extend_from_slice(&b[..k.min(room)]);
                            }
                            if self.usage_reader.is_some()
                                && !*compressed
                                && self.current.len() < USAGE_PEEK
                            {
                                let room = USAGE_PEEK - self.current.len();
                                self.current.extend_from_slice(&b[..k.min(room)]);
                            }
                            *left -= k as u64;
                            b = &b[k..];
                            if *left == 0 {
                                self.state = State::Prefix {
                                    buf: [0; 5],
                                    have: 0,
                                };
                                self.message_done();
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

/// A top-level protobuf field's value, as far as the bytes given hold it.
enum Value<'a> {
    Varint(u64),
    /// A length-delimited value; `whole` when all of it is inside the bytes.
    Bytes {
        bytes: &'a [u8],
        whole: bool,
    },
}

/// The value of the first top-level field numbered `field` in protobuf `msg`, read without
/// the schema. Fields before it must lie wholly inside `msg`; the one found may be cut.
fn find(msg: &[u8], field: u32) -> Option<Value<'_>> {
    let mut b = msg;
    while !b.is_empty() {
        let (key, rest) = varint(b)?;
        let found = key >> 3 == u64::from(field);
        b = rest;
        match key & 7 {
            0 => {
                let (v, rest) = varint(b)?;
                if found {
                    return Some(Value::Varint(v));
                }
                b = rest;
            }
            1 => b = b.get(8..)?,
            5 => b = b.get(4..)?,
            2 => {
                let (len, rest) = varint(b)?;
                let len = usize::try_from(len).ok()?;
                if found {
                    return Some(Value::Bytes {
                        bytes: &rest[..len.min(rest.len())],
                        whole: len <= rest.len(),
                    });
                }
                b = rest.get(len..)?;
            }
            _ => return None,
        }
    }
    None
}

/// A length-delimited field `field` at the top level of protobuf `msg`, when it lies wholly
/// inside the bytes given.
pub fn string_field(msg: &[u8], field: u32) -> Option<&[u8]> {
    match find(msg, field)? {
        Value::Bytes { bytes, whole: true } => Some(bytes),
        _ => None,
    }
}

/// A length-delimited field `field`, as far as `msg` holds it (a message kept only in part
/// still yields its leading fields).
fn field_prefix(msg: &[u8], field: u32) -> Option<&[u8]> {
    match find(msg, field)? {
        Value::Bytes { bytes, .. } => Some(bytes),
        Value::Varint(_) => None,
    }
}

/// Every value of the length-delimited field `field` at the top level of `msg` (a repeated
/// message field), or `None` unless all of `msg` is well-formed protobuf that it holds whole.
pub fn repeated(msg: &[u8], field: u32) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut b = msg;
    while !b.is_empty() {
        let (key, rest) = varint(b)?;
        b = match key & 7 {
            0 => varint(rest)?.1,
            1 => rest.get(8..)?,
            5 => rest.get(4..)?,
            2 => {
                let (len, rest) = varint(rest)?;
                let len = usize::try_from(len).ok()?;
                let value = rest.get(..len)?;
                if key >> 3 == u64::from(field) {
                    out.push(value);
                }
                &rest[len..]
            }
            _ => return None,
        };
    }
    Some(out)
}

/// Varint field `field` at the top level of `msg`.
pub fn varint_field(msg: &[u8], field: u32) -> Option<u64> {
    match find(msg, field)? {
        Value::Varint(v) => Some(v),
        Value::Bytes { .. } => None,
    }
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

    /// SGLang's `GenerateResponse` (and vLLM's), encoded by the field numbers of their protos.
    #[test]
    fn sglang_usage_from_chunks_and_the_completion() {
        // chunk = 2 { token_ids = 1 [packed 5, 6]; prompt_tokens = 2: 12; completion_tokens = 3: 2 }
        let chunk = [0x12, 0x08, 0x0a, 0x02, 5, 6, 0x10, 12, 0x18, 2];
        let mut msg = vec![0x0a, 0x02, b'r', b'1'];
        msg.extend_from_slice(&chunk);
        assert_eq!(generate_response_usage(&msg), Some((12, 2)));
        // complete = 3 { output_ids = 1 [packed, 300 ids of 2 bytes]; finish_reason = 2;
        // prompt_tokens = 3: 12; completion_tokens = 4: 300 }
        let mut inner = vec![0x0a, 0xd8, 0x04];
        inner.extend(std::iter::repeat_n([0x80, 0x02], 300).flatten());
        inner.extend_from_slice(&[0x12, 4, b's', b't', b'o', b'p', 0x18, 12, 0x20, 0xac, 0x02]);
        assert_eq!(inner.len(), 614);
        let mut done = vec![0x1a, 0xe6, 0x04]; // field 3, 614 bytes
        done.extend_from_slice(&inner);
        assert_eq!(generate_response_usage(&done), Some((12, 300)));
        // Through the reader, the counts of the last message that had them.
        let reader = usage_reader("/sglang.grpc.scheduler.SglangScheduler/Generate");
        let mut m = Messages::with_usage(reader);
        let wire = [message(&msg), message(&done)].concat();
        m.feed(Some(&wire), wire.len() as u64);
        assert_eq!((m.count, m.usage), (2, Some((12, 300))));
        // A completion cut short keeps the chunk's counts.
        let mut m = Messages::with_usage(reader);
        let cut = message(&done);
        m.feed(Some(&message(&msg)), 19);
        m.feed(Some(&cut[..100]), 100);
        m.feed(None, (cut.len() - 100) as u64);
        assert_eq!(m.usage, Some((12, 2)));
        // vLLM's engine answers the same layout; other services are not read.
        assert!(usage_reader("/vllm.grpc.engine.VllmEngine/Generate").is_some());
        assert!(usage_reader("/llm.Generator/Generate").is_none());
    }

    #[test]
    fn the_first_message_is_known_whole_or_not() {
        let body = [7u8; 40];
        let mut m = Messages::with_peek(32);
        m.feed(Some(&message(&body)), 45);
        assert_eq!((m.first.len(), m.first_whole()), (32, false));
        let mut m = Messages::with_peek(64);
        m.feed(Some(&message(&body)[..20]), 20);
        assert!(!m.first_whole());
        m.feed(Some(&message(&body)[20..]), 25);
        assert!(m.first_whole());
        // A hole in it: never whole.
        let mut m = Messages::with_peek(64);
        m.feed(Some(&message(&body)[..20]), 20);
        m.feed(None, 25);
        assert!(!m.first_whole());
    }

    #[test]
    fn repeated_fields_only_from_a_message_held_whole() {
        // { 1: "ab", 2: 5, 1: "c", 3: fixed64, 4: fixed32 }
        let msg = [
            0x0A, 2, b'a', b'b', 0x10, 5, 0x0A, 1, b'c', 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x25, 1, 2,
            3, 4,
        ];
        assert_eq!(repeated(&msg, 1), Some(vec![&b"ab"[..], &b"c"[..]]));
        assert_eq!(repeated(&msg, 9), Some(vec![]));
        for cut in 1..msg.len() {
            if ![4, 6, 9, 18].contains(&cut) {
                assert_eq!(repeated(&msg[..cut], 1), None, "cut at {cut}");
            }
        }
        assert_eq!(repeated(&[0x0B], 1), None, "group wire type");
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

//! One HTTP/2 connection as the server sees it: the client's frames (requests) read, the
//! server's (responses) written, each stream an [`Exchange`]. gRPC streams count their
//! messages: a response message is a token event (server-streaming TTFT is the first
//! response message, time per output token the gaps between them), and `grpc-status` in the
//! trailers ends the exchange.

use std::collections::HashMap;

use super::{
    frame::{self, Head, Piece, Reader},
    grpc::{self, Messages},
    hpack::{Field, FieldRef, HpackError, Table},
};
use crate::http::{
    conn::{clip, Bad, ErrorType, Exchange, Output, Protocol},
    engine,
    payload::{self, Sse},
};

/// Longest header block kept (across CONTINUATION frames); a longer one is lost with the
/// table it would have updated.
const MAX_BLOCK: usize = 64 * 1024;
/// Streams followed at once on one connection; further ones are counted and ignored.
pub const MAX_STREAMS: usize = 256;
const MAX_ROUTE: usize = 128;
/// Body bytes kept per plain HTTP/2 exchange and direction (the request JSON names its
/// model in its first bytes; a non-streamed answer's `usage`).
const MAX_BODY: usize = 16 * 1024;
const MAX_MODEL: usize = 256;

/// A header block being gathered.
#[derive(Debug, Default)]
struct Block {
    /// The stream of the HEADERS frame that opened it (0: none open).
    stream: u32,
    end_stream: bool,
    ts: u64,
    buf: Vec<u8>,
    /// The current HEADERS frame's payload (padding and priority not yet stripped).
    frame: Vec<u8>,
    /// Part of it was not captured.
    lost: bool,
}

#[derive(Debug)]
struct Stream {
    x: Exchange,
    req: Messages,
    resp: Messages,
    grpc: bool,
    /// Some of its header fields named table entries older than the agent: its content type
    /// is unknown (gRPC is then told by its first DATA frame) and so may its status be.
    unknown_fields: bool,
    /// Pad length of the DATA frame being read (None until its first byte, or unpadded).
    pad: Option<u8>,
    /// A plain HTTP/2 exchange's bodies (for the request's `model`, a response's `usage`),
    /// their first bytes, and whether they were kept whole.
    req_body: Body,
    resp_body: Body,
    /// A plain HTTP/2 response that is an event stream: its events are the token events.
    sse: Option<Sse>,
}

/// The first [`MAX_BODY`] bytes of a body.
#[derive(Debug, Default)]
struct Body {
    bytes: Vec<u8>,
    /// Bytes were lost (a hole, or past the cap).
    cut: bool,
}

impl Body {
    fn keep(&mut self, piece: Option<&[u8]>) {
        match piece {
            Some(b) if self.bytes.len() + b.len() <= MAX_BODY => self.bytes.extend_from_slice(b),
            _ => self.cut = true,
        }
    }
}

/// A direction's encoder's table and the block being gathered.
#[derive(Debug)]
struct Decoding {
    table: Table,
    block: Block,
}

impl Decoding {
    fn new(table: Table) -> Self {
        Self {
            table,
            block: Block::default(),
        }
    }

    fn state_bytes(&self) -> usize {
        self.table.state_bytes() + self.block.buf.capacity() + self.block.frame.capacity()
    }
}

#[derive(Debug)]
pub struct Conn {
    /// The client's frames (read by the server) and the server's (written).
    inp_frames: Reader,
    out_frames: Reader,
    st: State,
    pub last_ns: u64,
}

/// Everything but the framing: what a frame piece is applied to, at once.
#[derive(Debug)]
struct State {
    inp: Decoding,
    out: Decoding,
    streams: HashMap<u32, Stream>,
}

impl Conn {
    /// A connection seen from its start (the client preface not yet read).
    pub fn new(ts: u64) -> Self {
        Self {
            inp_frames: Reader::client(),
            out_frames: Reader::server(),
            st: State {
                inp: Decoding::new(Table::new()),
                out: Decoding::new(Table::new()),
                streams: HashMap::new(),
            },
            last_ns: ts,
        }
    }

    /// A connection older than the agent: frames from the first record that starts with
    /// them, tables as windows of what is inserted from now on.
    pub fn joined(ts: u64) -> Self {
        Self {
            inp_frames: Reader::joined(),
            out_frames: Reader::joined(),
            st: State {
                inp: Decoding::new(Table::joined()),
                out: Decoding::new(Table::joined()),
                streams: HashMap::new(),
            },
            last_ns: ts,
        }
    }

    /// The requests in flight: every stream whose request was read.
    pub fn each_in_flight(&self, f: &mut dyn FnMut(&crate::http::conn::Exchange)) {
        for s in self.st.streams.values().filter(|s| s.x.received) {
            f(&s.x);
        }
    }

    /// The output events so far of each stream being answered, with the model it named.
    pub fn tokens_in_flight(&self, f: &mut dyn FnMut(Option<&str>, u64)) {
        for s in self.st.streams.values().filter(|s| s.x.token_events > 0) {
            f(s.x.model.as_deref(), s.x.token_events);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.st.streams.values().filter(|s| s.x.received).count()
    }

    pub fn in_flight_bytes(&self) -> u64 {
        self.st
            .streams
            .values()
            .filter(|s| s.x.received)
            .map(|s| s.x.request_bytes)
            .sum()
    }

    pub fn state_bytes(&self) -> usize {
        let st = &self.st;
        size_of::<Conn>()
            + st.inp.state_bytes()
            + st.out.state_bytes()
            + st.streams.capacity() * (size_of::<Stream>() + 8)
            + st.streams
                .values()
                .map(|s| {
                    s.x.state_bytes() - size_of::<Exchange>()
                        + s.req.state_bytes()
                        + s.resp.state_bytes()
                        + s.req_body.bytes.capacity()
                        + s.resp_body.bytes.capacity()
                        + s.sse.as_ref().map_or(0, Sse::state_bytes)
                })
                .sum::<usize>()
    }

    /// Bytes the server read: `data` captured, then a hole of `hole` bytes.
    pub fn read(&mut self, ts: u64, data: &[u8], hole: u64, out: &mut Vec<Output>) {
        self.last_ns = ts;
        let st = &mut self.st;
        self.inp_frames
            .record(data, hole, &mut |p| st.piece(true, ts, p, out));
    }

    /// Bytes the server wrote.
    pub fn write(&mut self, ts: u64, data: &[u8], hole: u64, out: &mut Vec<Output>) {
        self.last_ns = ts;
        let st = &mut self.st;
        self.out_frames
            .record(data, hole, &mut |p| st.piece(false, ts, p, out));
    }

    /// The connection closed: every stream still open ends as `connection_reset`.
    pub fn close(&mut self, ts: u64, out: &mut Vec<Output>) {
        self.st.abandon(ts, ErrorType::ConnectionReset, out);
    }

    pub fn abandon(&mut self, ts: u64, error: ErrorType, out: &mut Vec<Output>) {
        self.st.abandon(ts, error, out);
    }

    /// Frees the connection's state: open streams end as `untracked`, and the tables are lost
    /// (so it goes on as a connection picked up mid-way).
    pub fn shed(&mut self, ts: u64, out: &mut Vec<Output>) {
        let st = &mut self.st;
        st.abandon(ts, ErrorType::Untracked, out);
        st.streams = HashMap::new();
        for dec in [&mut st.inp, &mut st.out] {
            dec.table.lose();
            dec.block = Block::default();
        }
    }
}

impl State {
    /// Applies one piece of a direction's frames.
    fn piece(&mut self, inbound: bool, ts: u64, p: Piece<'_>, out: &mut Vec<Output>) {
        let dec = if inbound {
            &mut self.inp
        } else {
            &mut self.out
        };
        let mut events = Vec::new();
        match p {
            Piece::Lost => {
                // A block may have been cut short with the framing: the table is unknown.
                dec.table.lose();
                dec.block = Block::default();
                events.push(Event::Bad(Bad::H2FramingLost));
            }
            Piece::Head(h) => on_head(dec, &mut self.streams, ts, h, &mut events),
            Piece::Payload {
                head,
                offset,
                bytes,
                n,
                last,
            } => on_payload(
                dec,
                &mut self.streams,
                inbound,
                ts,
                head,
                offset,
                bytes,
                n,
                last,
                &mut events,
            ),
        }
        for e in events {
            self.apply(inbound, ts, e, out);
        }
    }

    fn apply(&mut self, inbound: bool, ts: u64, e: Event, out: &mut Vec<Output>) {
        match e {
            Event::Bad(b) => out.push(Output::Bad(b)),
            Event::Headers {
                stream,
                end_stream,
                block_ts,
                fields,
                unknown,
            } => {
                if unknown > 0 {
                    out.push(Output::Bad(Bad::HpackUnknownReference));
                }
                if inbound {
                    self.request_headers(stream, end_stream, block_ts, fields, out);
                } else {
                    self.response_headers(stream, end_stream, block_ts, fields, ts, out);
                }
            }
            Event::Data { stream, end_stream } => {
                if inbound {
                    if end_stream {
                        self.request_end(stream, ts, out);
                    }
                } else if end_stream {
                    self.finish(stream, ts, None, out);
                }
            }
            Event::Reset { stream } => {
                self.finish(stream, ts, Some(ErrorType::ConnectionReset), out)
            }
        }
    }

    fn request_headers(
        &mut self,
        stream: u32,
        end_stream: bool,
        ts: u64,
        fields: Vec<Field>,
        out: &mut Vec<Output>,
    ) {
        if let Some(s) = self.streams.get(&stream) {
            // Request trailers.
            if end_stream && !s.x.received {
                self.request_end(stream, ts, out);
            }
            return;
        }
        if stream.is_multiple_of(2) {
            return; // not a client's stream
        }
        if self.streams.len() >= MAX_STREAMS {
            out.push(Output::Bad(Bad::TooManyStreams));
            return;
        }
        let mut x = Exchange {
            start_ns: ts,
            protocol: Protocol::H2,
            ..Exchange::default()
        };
        let mut grpc = false;
        let unknown_fields = fields.iter().any(|f| f.name.is_none());
        for f in &fields {
            let (Some(name), Some(value)) = (&f.name, &f.value) else {
                continue;
            };
            let value = String::from_utf8_lossy(value);
            match name.as_slice() {
                b":method" => x.method = clip(&value, 16),
                b":path" => x.route = clip(&value, MAX_ROUTE),
                b"content-type" => grpc = value.starts_with("application/grpc"),
                b"traceparent" => {
                    x.traceparent = crate::http::traceparent::TraceParent::parse(value.as_bytes())
                        .map(Box::new);
                }
                _ => {}
            }
        }
        if grpc {
            x.protocol = Protocol::Grpc;
            x.stream = true;
        }
        let usage = grpc::usage_reader(&x.route);
        let req = if engine::method(&x.route) == "Decode" {
            Messages::with_peek(grpc::BATCH_PEEK)
        } else {
            Messages::default()
        };
        self.streams.insert(
            stream,
            Stream {
                x,
                req,
                resp: Messages::with_usage(usage),
                grpc,
                unknown_fields,
                pad: None,
                req_body: Body::default(),
                resp_body: Body::default(),
                sse: None,
            },
        );
        if end_stream {
            self.request_end(stream, ts, out);
        }
    }

    /// The request was read in full (or its response began first: a bidirectional stream).
    fn request_end(&mut self, stream: u32, ts: u64, out: &mut Vec<Output>) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.x.received {
            return;
        }
        s.x.received = true;
        s.x.request_end_ns = ts;
        if s.grpc && s.x.model.is_none() && grpc::names_model(&s.x.route) {
            s.x.model = grpc::string_field(&s.req.first, 1)
                .filter(|m| !m.is_empty())
                .map(|m| clip(&String::from_utf8_lossy(m), MAX_MODEL));
        }
        s.x.request_messages = s.req.count;
        if s.grpc && s.req.first_whole() && engine::method(&s.x.route) == "Decode" {
            s.x.engine_batch = engine::decode_batch(&s.req.first);
        }
        if !s.grpc && !s.req_body.bytes.is_empty() {
            let meta = payload::request_meta(&s.req_body.bytes, !s.req_body.cut);
            s.x.model = meta.model;
            s.x.stream = meta.stream.unwrap_or(false);
            s.x.max_tokens = meta.max_tokens;
            s.req_body = Body::default();
        }
        out.push(Output::Received {
            model: s.x.model.clone(),
        });
    }

    fn response_headers(
        &mut self,
        stream: u32,
        end_stream: bool,
        block_ts: u64,
        fields: Vec<Field>,
        ts: u64,
        out: &mut Vec<Output>,
    ) {
        if !self.streams.contains_key(&stream) {
            return; // a stream older than the agent
        }
        self.request_end(stream, block_ts, out);
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        let mut grpc_status = None;
        s.unknown_fields |= fields.iter().any(|f| f.name.is_none());
        for f in &fields {
            let (Some(name), Some(value)) = (&f.name, &f.value) else {
                continue;
            };
            match name.as_slice() {
                b":status" => {
                    s.x.status = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                }
                b"grpc-status" => {
                    grpc_status = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u32>().ok());
                }
                b"content-type" if !s.grpc && value.starts_with(b"text/event-stream") => {
                    s.sse = Some(Sse::default());
                    s.x.stream = true;
                }
                _ => {}
            }
        }
        s.x.first_byte_out_ns.get_or_insert(block_ts);
        if grpc_status.is_some() {
            s.x.grpc_status = grpc_status;
        }
        if end_stream {
            self.finish(stream, ts, None, out);
        }
    }

    /// Ends a stream: its exchange is finished, with `error` or what its status says.
    fn finish(&mut self, stream: u32, ts: u64, error: Option<ErrorType>, out: &mut Vec<Output>) {
        let Some(mut s) = self.streams.remove(&stream) else {
            return;
        };
        let x = &mut s.x;
        x.end_ns = ts;
        x.request_messages = s.req.count;
        x.response_messages = s.resp.count;
        if let Some((prompt, completion)) = s.resp.usage {
            x.usage.prompt = Some(prompt);
            x.usage.completion = Some(completion);
        }
        if !s.grpc {
            x.usage = match &s.sse {
                Some(sse) => sse.usage,
                None => payload::body_usage(&s.resp_body.bytes, !s.resp_body.cut),
            };
        }
        x.grpc_status_unread = s.grpc && x.grpc_status.is_none() && s.unknown_fields;
        x.error = error.or_else(|| match (x.grpc_status, x.status) {
            (Some(code), _) if code != 0 => Some(ErrorType::Grpc(code.min(255) as u8)),
            (_, Some(429)) => Some(ErrorType::RateLimited),
            (_, Some(400..=499)) => Some(ErrorType::Http4xx),
            (_, Some(500..)) => Some(ErrorType::Http5xx),
            (None, Some(_)) if s.grpc && !s.unknown_fields => {
                // A gRPC response must end with a status: without one the call failed.
                Some(ErrorType::Grpc(2))
            }
            _ => None,
        });
        if x.error == Some(ErrorType::Http4xx) && payload::is_context_length(&s.resp_body.bytes) {
            x.error = Some(ErrorType::ContextLength);
        }
        out.push(Output::Finished(Box::new(s.x)));
    }

    fn abandon(&mut self, ts: u64, error: ErrorType, out: &mut Vec<Output>) {
        let mut ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.finish(id, ts, Some(error), out);
        }
    }
}

/// What a frame piece says, applied at once.
#[derive(Debug)]
enum Event {
    Bad(Bad),
    Headers {
        stream: u32,
        end_stream: bool,
        block_ts: u64,
        fields: Vec<Field>,
        unknown: u32,
    },
    Data {
        stream: u32,
        end_stream: bool,
    },
    Reset {
        stream: u32,
    },
}

fn on_head(
    dec: &mut Decoding,
    streams: &mut HashMap<u32, Stream>,
    ts: u64,
    h: Head,
    events: &mut Vec<Event>,
) {
    match h.kind {
        frame::HEADERS => {
            dec.block = Block {
                stream: h.stream,
                end_stream: h.has(frame::END_STREAM),
                ts,
                ..Block::default()
            };
            if h.len == 0 {
                end_of_headers_frame(dec, h, events);
            }
        }
        frame::CONTINUATION if h.len == 0 && h.has(frame::END_HEADERS) => {
            decode_block(dec, events);
        }
        frame::DATA => {
            if let Some(s) = streams.get_mut(&h.stream) {
                s.pad = None;
                if h.len == 0 {
                    data_done(h, events);
                }
            }
        }
        frame::RST_STREAM => events.push(Event::Reset { stream: h.stream }),
        _ => {}
    }
}

#[expect(clippy::too_many_arguments, reason = "one frame piece, unpacked")]
fn on_payload(
    dec: &mut Decoding,
    streams: &mut HashMap<u32, Stream>,
    inbound: bool,
    ts: u64,
    h: Head,
    offset: u32,
    bytes: Option<&[u8]>,
    n: u32,
    last: bool,
    events: &mut Vec<Event>,
) {
    match h.kind {
        frame::HEADERS | frame::CONTINUATION => {
            if dec.block.stream != h.stream {
                // A CONTINUATION of a block the agent did not see begin.
                return;
            }
            let target = if h.kind == frame::HEADERS {
                &mut dec.block.frame
            } else {
                &mut dec.block.buf
            };
            match bytes {
                Some(b) if target.len() + b.len() <= MAX_BLOCK => target.extend_from_slice(b),
                _ => dec.block.lost = true,
            }
            if last {
                if h.kind == frame::HEADERS {
                    end_of_headers_frame(dec, h, events);
                } else if h.has(frame::END_HEADERS) {
                    decode_block(dec, events);
                }
            }
        }
        frame::DATA => {
            let Some(s) = streams.get_mut(&h.stream) else {
                return;
            };
            let (start, end) = data_range(s, h, offset, bytes, n);
            let payload = u64::from(end.saturating_sub(start));
            if !s.grpc && s.unknown_fields && inbound && start == u32::from(h.has(frame::PADDED)) {
                // Headers named from entries the agent never saw: a request whose first DATA
                // frame starts with a gRPC message prefix that fits the frame is gRPC.
                if let Some(b) = bytes {
                    let b = &b[(start - offset) as usize..(end - offset) as usize];
                    if grpc::looks_like_message(b, h.len - start) {
                        s.grpc = true;
                        s.x.protocol = Protocol::Grpc;
                        s.x.stream = true;
                    }
                }
            }
            if inbound {
                s.x.request_bytes += payload;
            }
            if s.grpc && payload > 0 {
                let piece = bytes.map(|b| &b[(start - offset) as usize..(end - offset) as usize]);
                let messages = if inbound { &mut s.req } else { &mut s.resp };
                let started = messages.feed(piece, payload);
                if !inbound {
                    s.x.first_byte_out_ns.get_or_insert(ts);
                    for _ in 0..started {
                        s.x.token_at(ts);
                    }
                }
            } else if payload > 0 {
                let piece = bytes.map(|b| &b[(start - offset) as usize..(end - offset) as usize]);
                if inbound {
                    s.req_body.keep(piece);
                } else {
                    s.x.first_byte_out_ns.get_or_insert(ts);
                    match (&mut s.sse, piece) {
                        (Some(sse), Some(b)) => {
                            let x = &mut s.x;
                            sse.feed(b, &mut |ev| {
                                if ev.token {
                                    x.token_at(ts);
                                }
                            });
                        }
                        (Some(sse), None) => sse.hole(),
                        (None, piece) => s.resp_body.keep(piece),
                    }
                }
            }
            if last {
                data_done(h, events);
            }
        }
        _ => {}
    }
}

/// The part of a DATA frame piece that is data (RFC 9113 §6.1: a pad length byte first
/// and padding last when PADDED), as offsets into the frame's payload.
fn data_range(s: &mut Stream, h: Head, offset: u32, bytes: Option<&[u8]>, n: u32) -> (u32, u32) {
    let (mut start, mut end) = (offset, offset + n);
    if h.has(frame::PADDED) {
        if offset == 0 {
            s.pad = Some(bytes.and_then(|b| b.first().copied()).unwrap_or(0));
            start = 1;
        }
        let pad = u32::from(s.pad.unwrap_or(0));
        end = end.min(h.len.saturating_sub(pad));
    }
    (start.min(end), end)
}

fn data_done(h: Head, events: &mut Vec<Event>) {
    if h.has(frame::END_STREAM) {
        events.push(Event::Data {
            stream: h.stream,
            end_stream: true,
        });
    }
}

/// A HEADERS frame was read whole: its fragment (padding and priority stripped) starts the
/// block.
fn end_of_headers_frame(dec: &mut Decoding, h: Head, events: &mut Vec<Event>) {
    let frame = std::mem::take(&mut dec.block.frame);
    let mut fragment: &[u8] = &frame;
    let mut pad = 0usize;
    if h.has(frame::PADDED) {
        match fragment.split_first() {
            Some((&p, rest)) => {
                pad = usize::from(p);
                fragment = rest;
            }
            None => dec.block.lost = true,
        }
    }
    if h.has(frame::PRIORITY_FLAG) {
        fragment = fragment.get(5..).unwrap_or_else(|| {
            dec.block.lost = true;
            &[]
        });
    }
    if pad > fragment.len() {
        dec.block.lost = true;
    } else {
        fragment = &fragment[..fragment.len() - pad];
    }
    dec.block.buf.extend_from_slice(fragment);
    if h.has(frame::END_HEADERS) {
        decode_block(dec, events);
    }
}

fn decode_block(dec: &mut Decoding, events: &mut Vec<Event>) {
    let block = std::mem::take(&mut dec.block);
    if block.stream == 0 {
        return;
    }
    if block.lost {
        dec.table.lose();
        events.push(Event::Bad(Bad::HeaderTruncated));
        return;
    }
    let mut fields = Vec::new();
    // Only what the exchange reads is copied out of the table (and unknown fields, which say
    // a block was not fully read).
    let keep = |f: &FieldRef<'_>| {
        f.name.is_none_or(|n| {
            matches!(
                n,
                b":method"
                    | b":path"
                    | b":status"
                    | b"content-type"
                    | b"traceparent"
                    | b"grpc-status"
            )
        })
    };
    match dec.table.decode(&block.buf, &mut |f| {
        if keep(&f) {
            fields.push(f.to_owned());
        }
    }) {
        Ok(stats) => events.push(Event::Headers {
            stream: block.stream,
            end_stream: block.end_stream,
            block_ts: block.ts,
            fields,
            unknown: stats.unknown,
        }),
        Err(HpackError::Malformed) => events.push(Event::Bad(Bad::HpackMalformed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::h2::frame::{
        CONTINUATION, DATA, END_HEADERS, END_STREAM, HEADERS, PADDED, PREFACE, RST_STREAM, SETTINGS,
    };

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Literal fields with incremental indexing, new names.
    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, value) in fields {
            b.push(0x40);
            b.push(name.len() as u8);
            b.extend_from_slice(name.as_bytes());
            b.push(value.len() as u8);
            b.extend_from_slice(value.as_bytes());
        }
        b
    }

    fn message(body: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    const INFER: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

    fn request(stream: u32) -> Vec<u8> {
        let h = block(&[
            (":method", "POST"),
            (":path", INFER),
            ("content-type", "application/grpc"),
        ]);
        let mut body = b"\x0a\x05llama".to_vec();
        body.extend_from_slice(b"\x12\x011");
        [
            frame(HEADERS, END_HEADERS, stream, &h),
            frame(DATA, END_STREAM, stream, &message(&body)),
        ]
        .concat()
    }

    fn finished(out: &[Output]) -> Vec<&Exchange> {
        out.iter()
            .filter_map(|o| match o {
                Output::Finished(x) => Some(&**x),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_server_streaming_grpc_call_is_timed_by_its_messages() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        // The server's SETTINGS before the client's preface.
        c.write(1, &frame(SETTINGS, 0, 0, &[]), 0, &mut out);
        let mut inp = PREFACE.to_vec();
        inp.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
        inp.extend(request(1));
        c.read(10, &inp, 0, &mut out);
        assert_eq!(
            out,
            [Output::Received {
                model: Some("llama".into())
            }]
        );
        out.clear();
        let status = block(&[(":status", "200"), ("content-type", "application/grpc")]);
        c.write(20, &frame(HEADERS, END_HEADERS, 1, &status), 0, &mut out);
        for ts in [30, 40, 50] {
            c.write(
                ts,
                &frame(DATA, 0, 1, &message(b"\x0a\x03tok")),
                0,
                &mut out,
            );
        }
        // The trailers reuse the table: `grpc-status` is inserted, then indexed next time.
        let trailers = block(&[("grpc-status", "0")]);
        c.write(
            60,
            &frame(HEADERS, END_HEADERS | END_STREAM, 1, &trailers),
            0,
            &mut out,
        );
        let x = finished(&out);
        assert_eq!(x.len(), 1, "{out:?}");
        let x = x[0];
        assert_eq!(
            (
                x.protocol,
                x.route.as_str(),
                x.model.as_deref(),
                x.status,
                x.grpc_status
            ),
            (Protocol::Grpc, INFER, Some("llama"), Some(200), Some(0))
        );
        assert_eq!(
            (
                x.start_ns,
                x.request_end_ns,
                x.first_token_ns,
                x.end_ns,
                x.error
            ),
            (10, 10, Some(30), 60, None)
        );
        assert_eq!(x.token_gaps_ns, [10, 10]);
        assert_eq!((x.request_messages, x.response_messages), (1, 3));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn streams_on_one_connection_are_kept_apart() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        let mut inp = PREFACE.to_vec();
        inp.extend(request(1));
        inp.extend(request(3));
        c.read(10, &inp, 0, &mut out);
        assert_eq!(c.in_flight(), 2);
        out.clear();
        let status = block(&[(":status", "200")]);
        // Stream 3 answers first, with a resource-exhausted status in a trailers-only block.
        let fail = [0x80 | 62]; // `:status: 200`, just inserted
        let mut fail_block = fail.to_vec();
        fail_block.extend(block(&[("grpc-status", "8")]));
        c.write(20, &frame(HEADERS, END_HEADERS, 1, &status), 0, &mut out);
        c.write(
            21,
            &frame(HEADERS, END_HEADERS | END_STREAM, 3, &fail_block),
            0,
            &mut out,
        );
        c.write(30, &frame(DATA, 0, 1, &message(b"a")), 0, &mut out);
        // The client cancels stream 1.
        c.read(40, &frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]), 0, &mut out);
        let x = finished(&out);
        assert_eq!(x.len(), 2);
        assert_eq!(
            (x[0].grpc_status, x[0].error),
            (Some(8), Some(ErrorType::Grpc(8)))
        );
        assert_eq!(x[0].error.unwrap().label(), "grpc_resource_exhausted");
        assert_eq!(
            (x[1].first_token_ns, x[1].error),
            (Some(30), Some(ErrorType::ConnectionReset))
        );
    }

    #[test]
    fn a_connection_older_than_the_agent_resolves_what_it_saw_inserted() {
        let mut c = Conn::joined(0);
        let mut out = Vec::new();
        // Mid-stream bytes first: ignored until a record starts with frames.
        c.read(1, b"\x00\x00\x00\x05hello", 0, &mut out);
        assert!(out.is_empty());
        // A request whose `:path` was inserted before the agent (index 63) and one that
        // inserts it now.
        let old = [0x83, 0x80 | 63];
        let new = block(&[
            (":path", "/pkg.Svc/Generate"),
            ("content-type", "application/grpc"),
        ]);
        let inp = [
            frame(HEADERS, END_HEADERS | END_STREAM, 5, &old),
            frame(HEADERS, END_HEADERS | END_STREAM, 7, &new),
        ]
        .concat();
        c.read(10, &inp, 0, &mut out);
        assert!(
            out.contains(&Output::Bad(Bad::HpackUnknownReference)),
            "{out:?}"
        );
        // Index 63 now names the `:path` just inserted (62 is `content-type`).
        let again = [0x83, 0x80 | 63, 0x80 | 62];
        c.read(
            11,
            &frame(HEADERS, END_HEADERS | END_STREAM, 9, &again),
            0,
            &mut out,
        );
        out.clear();
        let status = block(&[(":status", "200")]);
        for s in [5, 7, 9] {
            c.write(20, &frame(HEADERS, END_HEADERS, s, &status), 0, &mut out);
            c.write(
                30,
                &frame(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    s,
                    &block(&[("grpc-status", "0")]),
                ),
                0,
                &mut out,
            );
        }
        let routes: Vec<&str> = finished(&out).iter().map(|x| x.route.as_str()).collect();
        assert_eq!(routes, ["", "/pkg.Svc/Generate", "/pkg.Svc/Generate"]);
    }

    #[test]
    fn a_call_named_only_by_old_entries_is_told_grpc_by_its_messages() {
        // grpcio's client after its first call: every field indexed, most from before the
        // agent; the status in the trailers too.
        let mut c = Conn::joined(0);
        let mut out = Vec::new();
        let unknown = [0x80 | 67, 0x80 | 66, 0x83, 0x86, 0x80 | 63, 0x80 | 62];
        let inp = [
            frame(HEADERS, END_HEADERS, 3, &unknown),
            frame(DATA, END_STREAM, 3, &message(b"6 15 25")),
        ]
        .concat();
        c.read(10, &inp, 0, &mut out);
        c.write(
            20,
            &frame(HEADERS, END_HEADERS, 3, &[0x88, 0x80 | 64]),
            0,
            &mut out,
        );
        for ts in [30, 45] {
            c.write(ts, &frame(DATA, 0, 3, &message(b"tok")), 0, &mut out);
        }
        c.write(
            50,
            &frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0x80 | 62]),
            0,
            &mut out,
        );
        let x = finished(&out);
        assert_eq!(x.len(), 1, "{out:?}");
        assert_eq!(
            (
                x[0].protocol,
                x[0].status,
                x[0].error,
                x[0].token_events,
                x[0].first_token_ns
            ),
            (Protocol::Grpc, Some(200), None, 2, Some(30))
        );
        assert_eq!(x[0].request_messages, 1);
        // An HTTP/2 request whose body is not a gRPC message stays `h2`.
        let mut c = Conn::joined(0);
        let mut out = Vec::new();
        let inp = [
            frame(HEADERS, END_HEADERS, 1, &unknown),
            frame(DATA, END_STREAM, 1, b"{\"model\":\"m\"}"),
        ]
        .concat();
        c.read(10, &inp, 0, &mut out);
        c.write(
            20,
            &frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x88]),
            0,
            &mut out,
        );
        assert_eq!(finished(&out)[0].protocol, Protocol::H2);
    }

    #[test]
    fn a_plain_http2_chat_stream_is_timed_by_its_events() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        let h = block(&[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("content-type", "application/json"),
        ]);
        let body =
            br#"{"model":"llama","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let mut inp = PREFACE.to_vec();
        inp.extend(frame(HEADERS, END_HEADERS, 1, &h));
        inp.extend(frame(DATA, END_STREAM, 1, body));
        c.read(10, &inp, 0, &mut out);
        assert_eq!(
            out,
            [Output::Received {
                model: Some("llama".into())
            }]
        );
        out.clear();
        let status = block(&[(":status", "200"), ("content-type", "text/event-stream")]);
        c.write(20, &frame(HEADERS, END_HEADERS, 1, &status), 0, &mut out);
        let event = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        for ts in [30, 40, 55] {
            c.write(ts, &frame(DATA, 0, 1, event), 0, &mut out);
        }
        let usage = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n";
        c.write(60, &frame(DATA, END_STREAM, 1, usage), 0, &mut out);
        let x = finished(&out);
        assert_eq!(x.len(), 1, "{out:?}");
        let x = x[0];
        assert_eq!(
            (x.protocol, x.model.as_deref(), x.stream, x.status, x.error),
            (Protocol::H2, Some("llama"), true, Some(200), None)
        );
        assert_eq!(
            (x.first_token_ns, x.token_gaps_ns.clone(), x.end_ns),
            (Some(30), vec![10, 15], 60)
        );
        assert_eq!((x.usage.prompt, x.usage.completion), (Some(7), Some(3)));
    }

    #[test]
    fn padding_continuations_and_holes() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        let h = block(&[
            (":method", "POST"),
            (":path", INFER),
            ("content-type", "application/grpc"),
        ]);
        let (a, b) = h.split_at(10);
        let mut padded = vec![3];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        let mut inp = PREFACE.to_vec();
        inp.extend(frame(HEADERS, PADDED, 1, &padded));
        inp.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        c.read(10, &inp, 0, &mut out);
        // The request's message, its tail a hole; then END_STREAM.
        let msg = message(&[b'x'; 100]);
        c.read(11, &frame(DATA, 0, 1, &msg)[..20], 9 + 105 - 20, &mut out);
        c.read(12, &frame(DATA, END_STREAM, 1, &[]), 0, &mut out);
        assert_eq!(out, [Output::Received { model: None }]);
        out.clear();
        c.close(13, &mut out);
        let x = finished(&out);
        assert_eq!(
            (x[0].request_bytes, x[0].request_messages, x[0].error),
            (105, 1, Some(ErrorType::ConnectionReset))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for round in 0..300 {
            let mut c = if round % 2 == 0 {
                Conn::new(0)
            } else {
                Conn::joined(0)
            };
            let mut out = Vec::new();
            for i in 0..20u64 {
                let len = (next() % 200) as usize;
                let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if i % 5 == 0 {
                    data = [
                        frame(HEADERS, END_HEADERS, 1, &data),
                        frame(DATA, 0, 1, &data),
                    ]
                    .concat();
                }
                let hole = u64::from(next() % 3) * 50;
                if next() % 2 == 0 {
                    c.read(i, &data, hole, &mut out);
                } else {
                    c.write(i, &data, hole, &mut out);
                }
                assert!(c.st.streams.len() <= MAX_STREAMS);
            }
            c.close(100, &mut out);
            assert_eq!(c.in_flight(), 0);
        }
    }
}

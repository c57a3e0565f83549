//! One watched connection: HTTP/1.1 requests read by the server, responses it writes, paired
//! in order (keep-alive and pipelining), with the instants the metrics are made of. Input is
//! what the probes captured: each syscall's first bytes and its full length; a part that was
//! not captured is a hole the framing skips where it can.

use std::collections::VecDeque;

use super::{
    body::{Body, Framing},
    payload::{self, Sse, Usage},
};

/// Longest header block accepted (across records).
const MAX_HEAD: usize = 16 * 1024;
/// Body bytes kept for metadata (request JSON, non-streamed response, error message).
const MAX_BODY: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
const MAX_ROUTE: usize = 64;
/// Requests received and not answered kept per connection (pipelining depth).
const MAX_PENDING: usize = 64;
/// Longest method kept (httparse accepts any token).
const MAX_METHOD: usize = 16;
/// Token gaps kept per exchange for the TPOT histogram (8 bytes each); further gaps are
/// counted in [`Exchange::token_gaps_dropped`], so an endless stream holds 32 KiB of them.
pub const MAX_TOKEN_GAPS: usize = 4096;

/// What a connection speaks (the `protocol` label).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    #[default]
    Http1,
    H2,
    Grpc,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2 => "h2",
            Self::Grpc => "grpc",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorType {
    Http4xx,
    Http5xx,
    RateLimited,
    ContextLength,
    Timeout,
    ConnectionReset,
    /// The agent stopped following the connection: its state went past the per-connection
    /// cap or the http state budget (counted in `inferscope_dropped_total`).
    Untracked,
    /// A gRPC call ended with this non-zero `grpc-status`.
    Grpc(u8),
}

impl ErrorType {
    pub fn label(self) -> &'static str {
        match self {
            Self::Http4xx => "http_4xx",
            Self::Http5xx => "http_5xx",
            Self::RateLimited => "rate_limited",
            Self::ContextLength => "context_length",
            Self::Timeout => "timeout",
            Self::ConnectionReset => "connection_reset",
            Self::Untracked => "untracked",
            Self::Grpc(code) => super::h2::grpc::status_label(u32::from(code)),
        }
    }
}

/// Bad input, by kind (the label of `inferscope_http_bad_input_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bad {
    /// Bytes that are not an HTTP/1.x request or response.
    NotHttp,
    /// A header block longer than the capture or than the limit.
    HeaderTruncated,
    /// Chunked framing that cannot be followed.
    BadFraming,
    /// A response with no request to pair it with.
    UnmatchedResponse,
    /// An SSE event over the size limit.
    EventTooLarge,
    /// More pipelined requests than kept.
    PipelineOverflow,
    /// A `traceparent` header that is not a valid W3C trace context (ignored).
    BadTraceparent,
    /// HTTP/2 frames could not be followed (a hole over a frame header, or bytes that are not
    /// frames): the connection's streams are lost until a record starts with frames again.
    H2FramingLost,
    /// An HPACK reference to a table entry inserted before the agent joined the connection
    /// (the field is unknown, not guessed).
    HpackUnknownReference,
    /// A header block that is not HPACK (its table is lost).
    HpackMalformed,
    /// More concurrent HTTP/2 streams on one connection than followed.
    TooManyStreams,
    /// A connection that speaks TLS the agent cannot read (encrypted by a library it does not
    /// probe): counted once per connection, its bytes ignored.
    TlsUnsupported,
}

impl Bad {
    pub fn label(self) -> &'static str {
        match self {
            Self::NotHttp => "not_http",
            Self::HeaderTruncated => "header_truncated",
            Self::BadFraming => "bad_framing",
            Self::UnmatchedResponse => "unmatched_response",
            Self::EventTooLarge => "event_too_large",
            Self::PipelineOverflow => "pipeline_overflow",
            Self::BadTraceparent => "bad_traceparent",
            Self::H2FramingLost => "h2_framing_lost",
            Self::HpackUnknownReference => "hpack_unknown_reference",
            Self::HpackMalformed => "hpack_malformed",
            Self::TooManyStreams => "too_many_streams",
            Self::TlsUnsupported => "tls_unsupported",
        }
    }
}

/// One request and its response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exchange {
    pub method: String,
    pub route: String,
    pub model: Option<String>,
    /// The request asked for a stream, or the response was an event stream.
    pub stream: bool,
    pub status: Option<u16>,
    /// First byte in.
    pub start_ns: u64,
    /// Last byte in.
    pub request_end_ns: u64,
    pub first_byte_out_ns: Option<u64>,
    pub first_token_ns: Option<u64>,
    pub last_token_ns: Option<u64>,
    /// Gaps between consecutive token events, the first [`MAX_TOKEN_GAPS`] of them.
    pub token_gaps_ns: Vec<u64>,
    /// Gaps past [`MAX_TOKEN_GAPS`], not kept (`token_gaps_ns.len() + token_gaps_dropped`
    /// is `token_events - 1`).
    pub token_gaps_dropped: u64,
    pub token_events: u64,
    /// Last byte out (or the instant the exchange was given up).
    pub end_ns: u64,
    pub usage: Usage,
    pub error: Option<ErrorType>,
    /// The request was read in full (and counted in flight).
    pub received: bool,
    /// Bytes of the request body (the prompt's size on the wire).
    pub request_bytes: u64,
    /// Most tokens the request lets the server generate, when its body says.
    pub max_tokens: Option<u64>,
    /// The caller's trace context, when the request carried a valid `traceparent` (boxed:
    /// most requests carry none).
    pub traceparent: Option<Box<super::traceparent::TraceParent>>,
    pub protocol: Protocol,
    /// gRPC: the call's `grpc-status`.
    pub grpc_status: Option<u32>,
    /// gRPC: its response's header fields named HPACK entries inserted before the agent
    /// started, and no `grpc-status` was read: the status was there, but is unknown.
    pub grpc_status_unread: bool,
    /// A model worker's batch step: the requests in it (`super::engine::decode_batch`).
    pub engine_batch: Option<u64>,
    /// gRPC: length-prefixed messages each way.
    pub request_messages: u64,
    pub response_messages: u64,
}

impl Exchange {
    /// Heap and inline bytes this exchange holds (approximately: capacities).
    pub fn state_bytes(&self) -> usize {
        size_of::<Exchange>()
            + self.method.capacity()
            + self.route.capacity()
            + self.model.as_ref().map_or(0, String::capacity)
            + self.token_gaps_ns.capacity() * size_of::<u64>()
            + self
                .traceparent
                .as_ref()
                .map_or(0, |_| size_of::<super::traceparent::TraceParent>())
    }

    /// A Prometheus scrape of the server's own metrics (the agent's scraper's or anyone's):
    /// parsed to keep requests and responses paired, never counted as an inference request.
    pub fn is_monitoring(&self) -> bool {
        self.method == "GET" && self.route.split('?').next() == Some("/metrics")
    }

    /// A token event (an SSE event, a streamed gRPC message) at `ts`.
    pub fn token_at(&mut self, ts: u64) {
        token(self, ts);
    }

    /// Output tokens: `usage` when the response had it, else counted stream events.
    pub fn output_tokens(&self) -> Option<u64> {
        self.usage
            .completion
            .or((self.stream && self.status.is_some()).then_some(self.token_events))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// A request was read in full (it is in flight until `Finished`).
    Received {
        model: Option<String>,
    },
    Finished(Box<Exchange>),
    Bad(Bad),
}

#[derive(Debug)]
enum In {
    Head(Vec<u8>),
    Body {
        body: Body,
        buf: Vec<u8>,
        complete: bool,
    },
    Desync,
}

#[derive(Debug)]
enum Out {
    Head(Vec<u8>),
    Body {
        body: Body,
        sse: Option<Sse>,
        buf: Vec<u8>,
        complete: bool,
    },
    Desync,
}

#[derive(Debug)]
pub struct Conn {
    inp: In,
    out: Out,
    /// The request being read.
    reading: Option<Exchange>,
    /// Requests read in full, waiting for their response.
    pending: VecDeque<Exchange>,
    /// The exchange whose response is being written (None: a response nobody asked for).
    writing: Option<Exchange>,
    /// Instant of the last record (for expiry).
    pub last_ns: u64,
}

const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
];

impl Conn {
    /// A connection seen from its start (accepted while the agent watched).
    pub fn new(ts: u64) -> Self {
        Self {
            inp: In::Head(Vec::new()),
            out: Out::Head(Vec::new()),
            reading: None,
            pending: VecDeque::new(),
            writing: None,
            last_ns: ts,
        }
    }

    /// Whether a record starts an HTTP/1.x message: a request line read, a status line
    /// written.
    pub fn starts_message(inbound: bool, data: &[u8]) -> bool {
        if inbound {
            METHODS.iter().any(|m| data.starts_with(m))
        } else {
            data.starts_with(b"HTTP/1.")
        }
    }

    /// A connection that existed before the agent: both directions wait for the start of
    /// a message at a record boundary.
    pub fn joined(ts: u64) -> Self {
        Self {
            inp: In::Desync,
            out: Out::Desync,
            ..Self::new(ts)
        }
    }

    /// The requests in flight: the one being answered, then those waiting behind it.
    pub fn each_in_flight(&self, f: &mut dyn FnMut(&Exchange)) {
        self.writing.iter().chain(&self.pending).for_each(f);
    }

    /// The output events so far of the exchange being answered, with the model its request
    /// named (the requests waiting behind it have none yet).
    pub fn tokens_in_flight(&self, f: &mut dyn FnMut(Option<&str>, u64)) {
        if let Some(x) = self.writing.as_ref().filter(|x| x.token_events > 0) {
            f(x.model.as_deref(), x.token_events);
        }
    }

    /// Requests in flight on this connection (read, not answered in full).
    pub fn in_flight(&self) -> usize {
        self.pending.len() + usize::from(self.writing.is_some())
    }

    /// Bytes of parser state this connection holds (approximately: buffer capacities, the
    /// exchanges it keeps, itself). What the tracker charges to the http state budget.
    pub fn state_bytes(&self) -> usize {
        let inp = match &self.inp {
            In::Head(buf) => buf.capacity(),
            In::Body { body, buf, .. } => body.state_bytes() + buf.capacity(),
            In::Desync => 0,
        };
        let out = match &self.out {
            Out::Head(buf) => buf.capacity(),
            Out::Body { body, sse, buf, .. } => {
                body.state_bytes() + sse.as_ref().map_or(0, Sse::state_bytes) + buf.capacity()
            }
            Out::Desync => 0,
        };
        let exchanges: usize = self
            .reading
            .iter()
            .chain(self.writing.as_ref())
            .chain(self.pending.iter())
            .map(|x| x.state_bytes() - size_of::<Exchange>())
            .sum();
        size_of::<Conn>() + inp + out + exchanges + self.pending.capacity() * size_of::<Exchange>()
    }

    /// Gives up following the connection to free its state: open exchanges end as
    /// `untracked`, both directions wait for the start of the next message.
    pub fn shed(&mut self, ts: u64, out: &mut Vec<Output>) {
        self.abandon(ts, ErrorType::Untracked, out);
        self.pending = VecDeque::new();
    }

    /// Body bytes of the requests in flight on this connection.
    pub fn in_flight_bytes(&self) -> u64 {
        self.pending
            .iter()
            .chain(self.writing.as_ref())
            .map(|x| x.request_bytes)
            .sum()
    }

    /// Bytes read by the server (the captured part of one record; see [`Conn::read_hole`]).
    pub fn read(&mut self, ts: u64, data: &[u8], out: &mut Vec<Output>) {
        self.last_ns = ts;
        if matches!(self.inp, In::Desync) && METHODS.iter().any(|m| data.starts_with(m)) {
            self.inp = In::Head(Vec::new());
        }
        let mut data = data;
        while !data.is_empty() {
            let used = self.read_some(ts, data, out);
            if used == 0 {
                break; // defensive: every state consumes input or changes
            }
            data = &data[used..];
        }
    }

    fn read_some(&mut self, ts: u64, data: &[u8], out: &mut Vec<Output>) -> usize {
        match &mut self.inp {
            In::Desync => data.len(),
            In::Head(buf) => {
                if buf.is_empty() {
                    self.reading = Some(Exchange {
                        start_ns: ts,
                        ..Exchange::default()
                    });
                }
                let before = buf.len();
                let take = data.len().min(MAX_HEAD + 1 - before.min(MAX_HEAD));
                buf.extend_from_slice(&data[..take]);
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let method = req.method.unwrap_or("");
                        let path = req.path.unwrap_or("");
                        let route = path.split('?').next().unwrap_or("");
                        let framing = request_framing(req.headers);
                        let x = self.reading.get_or_insert_with(Exchange::default);
                        x.method = clip(method, MAX_METHOD);
                        x.route = clip(route, MAX_ROUTE);
                        if let Some(v) = header(req.headers, "traceparent") {
                            x.traceparent = super::traceparent::TraceParent::parse(v).map(Box::new);
                            if x.traceparent.is_none() {
                                out.push(Output::Bad(Bad::BadTraceparent));
                            }
                        }
                        let used = n - before;
                        let body = Body::new(framing);
                        if body.is_empty() {
                            self.inp = In::Head(Vec::new());
                            self.request_done(ts, &[], true, out);
                        } else {
                            self.inp = In::Body {
                                body,
                                buf: Vec::new(),
                                complete: true,
                            };
                        }
                        used
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => take,
                    Ok(httparse::Status::Partial) => {
                        self.bad_in(Bad::HeaderTruncated, out);
                        data.len()
                    }
                    Err(_) => {
                        self.bad_in(Bad::NotHttp, out);
                        data.len()
                    }
                }
            }
            In::Body {
                body,
                buf,
                complete,
            } => {
                let reading = &mut self.reading;
                let fed = body.feed(data, &mut |b| {
                    if let Some(x) = reading.as_mut() {
                        x.request_bytes += b.len() as u64;
                    }
                    keep(buf, complete, b)
                });
                if fed.desync {
                    self.bad_in(Bad::BadFraming, out);
                    return data.len();
                }
                if fed.done {
                    let (buf, complete) = (std::mem::take(buf), *complete);
                    self.inp = In::Head(Vec::new());
                    self.request_done(ts, &buf, complete, out);
                }
                fed.consumed
            }
        }
    }

    /// `len` bytes read that were not captured.
    pub fn read_hole(&mut self, ts: u64, len: u64, out: &mut Vec<Output>) {
        if len == 0 {
            return;
        }
        match &mut self.inp {
            In::Desync => {}
            In::Head(buf) if buf.is_empty() => self.inp = In::Desync,
            In::Head(_) => self.bad_in(Bad::HeaderTruncated, out),
            In::Body {
                body,
                buf,
                complete,
            } => match body.hole(len) {
                None => self.bad_in(Bad::BadFraming, out),
                Some((n, done)) => {
                    *complete = false;
                    // The body's size counts what was not captured too.
                    if let Some(x) = self.reading.as_mut() {
                        x.request_bytes += n;
                    }
                    if done {
                        let buf = std::mem::take(buf);
                        // Whatever followed in the hole (a pipelined request) is lost.
                        self.inp = if n < len {
                            In::Desync
                        } else {
                            In::Head(Vec::new())
                        };
                        self.request_done(ts, &buf, false, out);
                    }
                }
            },
        }
    }

    fn bad_in(&mut self, bad: Bad, out: &mut Vec<Output>) {
        out.push(Output::Bad(bad));
        self.inp = In::Desync;
        self.reading = None;
    }

    fn request_done(&mut self, ts: u64, body: &[u8], complete: bool, out: &mut Vec<Output>) {
        let Some(mut x) = self.reading.take() else {
            return;
        };
        x.request_end_ns = ts;
        if !body.is_empty() {
            let meta = payload::request_meta(body, complete);
            x.model = meta.model;
            x.stream = meta.stream.unwrap_or(false);
            x.max_tokens = meta.max_tokens;
        }
        if x.route.ends_with("_stream") {
            x.stream = true;
        }
        if self.pending.len() >= MAX_PENDING {
            out.push(Output::Bad(Bad::PipelineOverflow));
            return;
        }
        if !x.is_monitoring() {
            x.received = true;
            out.push(Output::Received {
                model: x.model.clone(),
            });
        }
        self.pending.push_back(x);
    }

    /// Bytes written by the server.
    pub fn write(&mut self, ts: u64, data: &[u8], out: &mut Vec<Output>) {
        self.last_ns = ts;
        if matches!(self.out, Out::Desync) && data.starts_with(b"HTTP/1.") {
            self.out = Out::Head(Vec::new());
        }
        let mut data = data;
        while !data.is_empty() {
            let used = self.write_some(ts, data, out);
            if used == 0 {
                break; // defensive: every state consumes input or changes
            }
            data = &data[used..];
        }
    }

    fn write_some(&mut self, ts: u64, data: &[u8], out: &mut Vec<Output>) -> usize {
        match &mut self.out {
            Out::Desync => data.len(),
            Out::Head(buf) => {
                if buf.is_empty() && self.writing.is_none() {
                    self.writing = self.pending.pop_front().or_else(|| self.reading.take());
                    match &mut self.writing {
                        Some(x) => x.first_byte_out_ns = Some(ts),
                        None => out.push(Output::Bad(Bad::UnmatchedResponse)),
                    }
                }
                let before = buf.len();
                let take = data.len().min(MAX_HEAD + 1 - before.min(MAX_HEAD));
                buf.extend_from_slice(&data[..take]);
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let used = n - before;
                        let status = resp.code.unwrap_or(0);
                        if (100..200).contains(&status) {
                            // Informational (100 Continue): the real response follows.
                            buf.clear();
                            return used;
                        }
                        let head = self.writing.as_ref().is_some_and(|x| x.method == "HEAD");
                        let framing = response_framing(status, head, resp.headers);
                        let sse = header(resp.headers, "content-type")
                            .is_some_and(|v| contains_ci(v, b"text/event-stream"));
                        if let Some(x) = &mut self.writing {
                            x.status = Some(status);
                            x.stream |= sse;
                        }
                        let body = Body::new(framing);
                        if body.is_empty() {
                            self.out = Out::Head(Vec::new());
                            self.response_done(ts, &[], true, out);
                        } else {
                            self.out = Out::Body {
                                body,
                                sse: sse.then(Sse::default),
                                buf: Vec::new(),
                                complete: true,
                            };
                        }
                        used
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => take,
                    Ok(httparse::Status::Partial) => {
                        self.bad_out(ts, Bad::HeaderTruncated, out);
                        data.len()
                    }
                    Err(_) => {
                        self.bad_out(ts, Bad::NotHttp, out);
                        data.len()
                    }
                }
            }
            Out::Body {
                body,
                sse,
                buf,
                complete,
            } => {
                let writing = &mut self.writing;
                let mut overflow = 0;
                let fed = body.feed(data, &mut |b| match sse {
                    Some(sse) => {
                        overflow += sse.feed(b, &mut |ev| {
                            if let Some(x) = writing.as_mut() {
                                if ev.token {
                                    token(x, ts);
                                }
                            }
                        })
                    }
                    None => keep(buf, complete, b),
                });
                for _ in 0..overflow {
                    out.push(Output::Bad(Bad::EventTooLarge));
                }
                if fed.desync {
                    self.bad_out(ts, Bad::BadFraming, out);
                    return data.len();
                }
                if fed.done {
                    let buf = std::mem::take(buf);
                    let complete = *complete;
                    if let (Some(x), Some(sse)) = (self.writing.as_mut(), sse.as_ref()) {
                        x.usage = sse.usage;
                    }
                    self.out = Out::Head(Vec::new());
                    self.response_done(ts, &buf, complete, out);
                }
                fed.consumed
            }
        }
    }

    /// `len` bytes written that were not captured.
    pub fn write_hole(&mut self, ts: u64, len: u64, out: &mut Vec<Output>) {
        if len == 0 {
            return;
        }
        match &mut self.out {
            Out::Desync => {}
            Out::Head(buf) if buf.is_empty() => self.out = Out::Desync,
            Out::Head(_) => self.bad_out(ts, Bad::HeaderTruncated, out),
            Out::Body {
                body,
                sse,
                buf,
                complete,
            } => match body.hole(len) {
                None => self.bad_out(ts, Bad::BadFraming, out),
                Some((n, done)) => {
                    *complete = false;
                    if let Some(sse) = sse {
                        sse.hole();
                    }
                    if done {
                        let buf = std::mem::take(buf);
                        if let (Some(x), Some(sse)) = (self.writing.as_mut(), sse.as_ref()) {
                            x.usage = sse.usage;
                        }
                        self.out = if n < len {
                            Out::Desync
                        } else {
                            Out::Head(Vec::new())
                        };
                        self.response_done(ts, &buf, false, out);
                    }
                }
            },
        }
    }

    /// The response cannot be followed: the exchange ends here with what is known.
    fn bad_out(&mut self, ts: u64, bad: Bad, out: &mut Vec<Output>) {
        out.push(Output::Bad(bad));
        self.out = Out::Desync;
        if let Some(mut x) = self.writing.take() {
            x.end_ns = ts;
            if x.status.is_some() {
                out.push(Output::Finished(Box::new(x)));
            } else {
                // No status: it cannot be counted as a request of any code; still not in flight.
                x.error = Some(ErrorType::ConnectionReset);
                out.push(Output::Finished(Box::new(x)));
            }
        }
    }

    fn response_done(&mut self, ts: u64, body: &[u8], complete: bool, out: &mut Vec<Output>) {
        let Some(mut x) = self.writing.take() else {
            return;
        };
        x.end_ns = ts;
        if !x.stream || x.usage == Usage::default() {
            let u = payload::body_usage(body, complete);
            x.usage.prompt = x.usage.prompt.or(u.prompt);
            x.usage.completion = x.usage.completion.or(u.completion);
        }
        x.error = match x.status {
            Some(429) => Some(ErrorType::RateLimited),
            Some(s @ 400..=499) => {
                if (s == 400 || s == 413 || s == 422) && payload::is_context_length(body) {
                    Some(ErrorType::ContextLength)
                } else {
                    Some(ErrorType::Http4xx)
                }
            }
            Some(500..) => Some(ErrorType::Http5xx),
            _ => None,
        };
        out.push(Output::Finished(Box::new(x)));
    }

    /// The server closed the connection (or its process ended): a response delimited by the
    /// close ends well; everything else still open ends as `connection_reset`.
    pub fn close(&mut self, ts: u64, out: &mut Vec<Output>) {
        if let Out::Body { body, buf, .. } = &mut self.out {
            if body.hole(0).is_some() && matches!(framing_of(body), Framing::UntilClose) {
                let buf = std::mem::take(buf);
                let end = self.last_ns;
                self.response_done(end, &buf, true, out);
            }
        }
        self.abandon(ts, ErrorType::ConnectionReset, out);
    }

    /// Ends every exchange still open with `error`.
    pub fn abandon(&mut self, ts: u64, error: ErrorType, out: &mut Vec<Output>) {
        for mut x in self
            .writing
            .take()
            .into_iter()
            .chain(self.pending.drain(..))
        {
            x.end_ns = ts;
            x.error = Some(error);
            out.push(Output::Finished(Box::new(x)));
        }
        self.reading = None;
        self.inp = In::Desync;
        self.out = Out::Desync;
    }
}

fn framing_of(body: &Body) -> Framing {
    body.framing()
}

fn token(x: &mut Exchange, ts: u64) {
    if let Some(last) = x.last_token_ns {
        if x.token_gaps_ns.len() < MAX_TOKEN_GAPS {
            x.token_gaps_ns.push(ts.saturating_sub(last));
        } else {
            x.token_gaps_dropped += 1;
        }
    } else {
        x.first_token_ns = Some(ts);
    }
    x.last_token_ns = Some(ts);
    x.token_events += 1;
}

fn keep(buf: &mut Vec<u8>, complete: &mut bool, b: &[u8]) {
    if buf.len() + b.len() > MAX_BODY {
        *complete = false;
        let room = MAX_BODY - buf.len();
        buf.extend_from_slice(&b[..room]);
    } else {
        buf.extend_from_slice(b);
    }
}

pub(crate) fn clip(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fn chunked(headers: &[httparse::Header]) -> bool {
    header(headers, "transfer-encoding").is_some_and(|v| contains_ci(v, b"chunked"))
}

fn content_length(headers: &[httparse::Header]) -> Option<u64> {
    std::str::from_utf8(header(headers, "content-length")?)
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn request_framing(headers: &[httparse::Header]) -> Framing {
    if chunked(headers) {
        Framing::Chunked
    } else {
        match content_length(headers) {
            Some(n) => Framing::Length(n),
            None => Framing::None,
        }
    }
}

fn response_framing(status: u16, head: bool, headers: &[httparse::Header]) -> Framing {
    if head || status == 204 || status == 304 {
        Framing::None
    } else if chunked(headers) {
        Framing::Chunked
    } else {
        match content_length(headers) {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(out: &[Output]) -> Vec<&Exchange> {
        out.iter()
            .filter_map(|o| match o {
                Output::Finished(x) => Some(&**x),
                _ => None,
            })
            .collect()
    }

    fn bad(out: &[Output]) -> Vec<Bad> {
        out.iter()
            .filter_map(|o| match o {
                Output::Bad(b) => Some(*b),
                _ => None,
            })
            .collect()
    }

    const REQ: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 34\r\n\r\n{\"model\":\"llama\",\"stream\":true}   ";

    #[test]
    fn streamed_chat_with_timings() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        c.read(1000, &REQ[..30], &mut out);
        c.read(2000, &REQ[30..], &mut out);
        assert_eq!(
            out,
            vec![Output::Received {
                model: Some("llama".into())
            }]
        );
        c.write(3000, b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n", &mut out);
        let ev = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
        c.write(
            4000,
            ev("data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n").as_bytes(),
            &mut out,
        );
        c.write(
            5000,
            ev("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n").as_bytes(),
            &mut out,
        );
        // Two events in one write, then one split over two writes.
        let two = ev("data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"c\"}}]}\n\n");
        c.write(7000, two.as_bytes(), &mut out);
        c.write(
            8000,
            ev("data: {\"choices\":[{\"delta\":").as_bytes(),
            &mut out,
        );
        c.write(9500, ev("{\"content\":\"d\"}}]}\n\n").as_bytes(), &mut out);
        c.write(
            9600,
            format!("{}0\r\n\r\n", ev("data: [DONE]\n\n")).as_bytes(),
            &mut out,
        );
        let f = finished(&out);
        assert_eq!(f.len(), 1);
        let x = f[0];
        assert_eq!(x.status, Some(200));
        assert_eq!(x.route, "/v1/chat/completions");
        assert!(x.stream);
        assert_eq!((x.start_ns, x.request_end_ns), (1000, 2000));
        assert_eq!(x.first_byte_out_ns, Some(3000));
        assert_eq!(x.first_token_ns, Some(5000));
        assert_eq!(x.token_gaps_ns, vec![2000, 0, 2500]);
        assert_eq!(x.end_ns, 9600);
        assert_eq!(x.output_tokens(), Some(4));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn keep_alive_pipelining_and_errors() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        let mut two = REQ.to_vec();
        two.extend_from_slice(b"GET /health HTTP/1.1\r\n\r\n");
        c.read(10, &two, &mut out);
        assert_eq!(c.in_flight(), 2);
        let body = br#"{"error":{"message":"This model's maximum context length is 4096 tokens"}}"#;
        let resp = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let mut w = resp.into_bytes();
        w.extend_from_slice(body);
        w.extend_from_slice(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n");
        c.write(20, &w, &mut out);
        let f = finished(&out);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].error, Some(ErrorType::ContextLength));
        assert_eq!(f[1].error, Some(ErrorType::RateLimited));
        assert_eq!(f[1].route, "/health");
    }

    #[test]
    fn metrics_scrapes_are_paired_but_not_inference_requests() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        let mut two = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        two.extend_from_slice(REQ);
        c.read(10, &two, &mut out);
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Output::Received { .. }))
                .count(),
            1
        );
        c.write(
            20,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nx HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n",
            &mut out,
        );
        let f = finished(&out);
        assert_eq!(f.len(), 2);
        assert!(f[0].is_monitoring() && !f[0].received);
        assert!(!f[1].is_monitoring() && f[1].received);
        assert_eq!(f[1].status, Some(500));
    }

    #[test]
    fn holes_and_resets() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        c.read(1, REQ, &mut out);
        // A long non-streamed body: only its start was captured; usage is lost, framing holds.
        c.write(
            2,
            b"HTTP/1.1 200 OK\r\ncontent-length: 10000\r\n\r\n{\"id\":",
            &mut out,
        );
        c.write_hole(2, 10000 - 6, &mut out);
        assert_eq!(finished(&out).len(), 1);
        // The next request on the connection is followed again.
        out.clear();
        c.read(3, REQ, &mut out);
        c.write(4, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n", &mut out);
        c.close(5, &mut out);
        let f = finished(&out);
        assert_eq!(f[0].error, Some(ErrorType::ConnectionReset));
        assert_eq!(f[0].status, Some(200));
    }

    #[test]
    fn garbage_is_counted_and_recovers_at_the_next_request() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        c.read(1, b"\x16\x03\x01\x02\x00 TLS hello", &mut out);
        c.read(2, b"more garbage\r\n\r\n", &mut out);
        assert_eq!(bad(&out), vec![Bad::NotHttp]);
        c.read(3, REQ, &mut out);
        c.write(
            4,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            &mut out,
        );
        assert_eq!(finished(&out).len(), 1);
        // A header block longer than the capture.
        let mut c = Conn::new(0);
        out.clear();
        c.read(1, b"POST / HTTP/1.1\r\nX-Big: aaaa", &mut out);
        c.read_hole(1, 10_000, &mut out);
        assert_eq!(bad(&out), vec![Bad::HeaderTruncated]);
        // Joined mid-stream: the tail of an old response is ignored, then all is followed.
        let mut c = Conn::joined(0);
        out.clear();
        c.write(1, b"data: {\"choices\":[{\"text\":\"x\"}]}\n\n", &mut out);
        c.read(2, REQ, &mut out);
        c.write(
            3,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            &mut out,
        );
        assert_eq!(finished(&out).len(), 1);
        assert!(bad(&out).is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seeds: [&[u8]; 4] = [
            REQ,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"data: {}\n\n",
            b"5\r\nhello\r\n0\r\n\r\n",
        ];
        for _ in 0..2000 {
            let mut c = if next() % 2 == 0 {
                Conn::new(0)
            } else {
                Conn::joined(0)
            };
            let mut out = Vec::new();
            for step in 0..20u64 {
                let mut buf = seeds[(next() % 4) as usize].to_vec();
                for _ in 0..(next() % 8) {
                    let i = (next() as usize) % buf.len();
                    buf[i] = next() as u8;
                }
                let cut = (next() as usize) % (buf.len() + 1);
                match next() % 5 {
                    0 => c.read(step, &buf[..cut], &mut out),
                    1 => c.write(step, &buf[..cut], &mut out),
                    2 => c.read_hole(step, next() % 5000, &mut out),
                    3 => c.write_hole(step, next() % 5000, &mut out),
                    _ => c.write(step, &buf, &mut out),
                }
            }
            c.close(99, &mut out);
            assert_eq!(c.in_flight(), 0);
        }
    }

    /// Bytes the parser may hold for one connection whatever it is fed: the buffers' caps
    /// (a header block or a kept body per direction, an SSE line and event, a chunk line),
    /// the exchanges, itself.
    const BOUND: usize = 2 * MAX_BODY + 2 * 64 * 1024 + 2048 + 2 * 8 * MAX_TOKEN_GAPS + 4096;

    #[test]
    fn a_huge_header_block_is_cut_at_the_cap() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        c.read(1, b"POST / HTTP/1.1\r\nX-Pad: ", &mut out);
        for i in 0..10_000 {
            c.read(i, b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", &mut out);
            assert!(c.state_bytes() < 2 * MAX_HEAD + 4096, "{}", c.state_bytes());
        }
        assert_eq!(bad(&out), vec![Bad::HeaderTruncated]);
        assert!(c.state_bytes() < 4096, "{}", c.state_bytes());
    }

    #[test]
    fn an_sse_event_of_a_million_data_lines_stays_bounded() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        c.read(1, REQ, &mut out);
        c.write(
            2,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            &mut out,
        );
        let lines = b"data: {\"choices\":[{\"text\":\"x\"}]}\n".repeat(1000);
        let chunk = [format!("{:x}\r\n", lines.len()).as_bytes(), &lines, b"\r\n"].concat();
        for i in 0..1000 {
            c.write(3 + i, &chunk, &mut out);
            assert!(c.state_bytes() < BOUND, "{}", c.state_bytes());
        }
        // The event ends: it is counted as too large, not parsed.
        c.write(2000, b"2\r\n\n\n\r\n0\r\n\r\n", &mut out);
        assert_eq!(bad(&out), vec![Bad::EventTooLarge]);
        assert_eq!(finished(&out).len(), 1);
    }

    #[test]
    fn an_endless_stream_keeps_a_bounded_number_of_token_gaps() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        c.read(1, REQ, &mut out);
        c.write(
            2,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n",
            &mut out,
        );
        let events = b"data: {\"choices\":[{\"text\":\"x\"}]}\n\n".repeat(100);
        for i in 0..1000 {
            c.write(3 + i, &events, &mut out);
            assert!(c.state_bytes() < BOUND, "{}", c.state_bytes());
        }
        c.close(5000, &mut out);
        let f = finished(&out);
        assert_eq!(f[0].token_events, 100_000);
        assert_eq!(f[0].token_gaps_ns.len(), MAX_TOKEN_GAPS);
        assert_eq!(
            f[0].token_gaps_ns.len() as u64 + f[0].token_gaps_dropped,
            99_999
        );
    }
}

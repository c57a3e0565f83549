//! What the agent reads out of bodies: the request's `model` and `stream`, the response's
//! `usage`, Server-Sent Events and whether each carries output. Text is looked at in memory
//! and dropped: nothing here keeps prompt or completion content.

use serde::de::IgnoredAny;
use serde::Deserialize;

/// Request metadata from a JSON body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestMeta {
    pub model: Option<String>,
    pub stream: Option<bool>,
    /// Most tokens the request lets the server generate: OpenAI's `max_tokens` or
    /// `max_completion_tokens`, TGI's `parameters.max_new_tokens`.
    pub max_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct RequestJson<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    /// TGI's `/generate_stream` takes `inputs` and `parameters`.
    #[serde(default)]
    parameters: Option<Parameters>,
}

#[derive(Deserialize)]
struct Parameters {
    #[serde(default)]
    max_new_tokens: Option<u64>,
}

/// Longest model name kept.
const MAX_MODEL: usize = 128;

/// `complete`: the body was captured whole (no holes, not cut). A complete body is parsed as
/// JSON; otherwise, or when that fails, the top-level keys are looked for in the text.
pub fn request_meta(body: &[u8], complete: bool) -> RequestMeta {
    if complete {
        if let Ok(j) = serde_json::from_slice::<RequestJson>(body) {
            return RequestMeta {
                model: j.model.map(|m| clip(&m)),
                stream: j.stream,
                max_tokens: j
                    .max_completion_tokens
                    .or(j.max_tokens)
                    .or(j.parameters.and_then(|p| p.max_new_tokens)),
            };
        }
    }
    RequestMeta {
        model: scan_string(body, b"\"model\"").map(|m| clip(&m)),
        stream: scan_bool(body, b"\"stream\""),
        max_tokens: scan_u64(body, b"\"max_completion_tokens\"")
            .or_else(|| scan_u64(body, b"\"max_tokens\""))
            .or_else(|| scan_u64(body, b"\"max_new_tokens\"")),
    }
}

fn clip(s: &str) -> String {
    let mut end = s.len().min(MAX_MODEL);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Position just after `key` followed by optional blanks and `:`, for an occurrence of `key`
/// that is a JSON key (a quote inside a JSON string is always escaped, so an unescaped
/// `"model"` is structural).
fn after_key(body: &[u8], key: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = find(&body[from..], key) {
        let at = from + p;
        let escaped = at > 0 && body[at - 1] == b'\\';
        let mut i = at + key.len();
        while i < body.len() && body[i].is_ascii_whitespace() {
            i += 1;
        }
        if !escaped && i < body.len() && body[i] == b':' {
            i += 1;
            while i < body.len() && body[i].is_ascii_whitespace() {
                i += 1;
            }
            return Some(i);
        }
        from = at + 1;
    }
    None
}

fn scan_string(body: &[u8], key: &[u8]) -> Option<String> {
    let i = after_key(body, key)?;
    if body.get(i) != Some(&b'"') {
        return None;
    }
    let rest = &body[i + 1..];
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok().map(str::to_string)
}

fn scan_bool(body: &[u8], key: &[u8]) -> Option<bool> {
    let i = after_key(body, key)?;
    let rest = &body[i..];
    if rest.starts_with(b"true") {
        Some(true)
    } else if rest.starts_with(b"false") {
        Some(false)
    } else {
        None
    }
}

fn scan_u64(body: &[u8], key: &[u8]) -> Option<u64> {
    let i = after_key(body, key)?;
    let digits = body[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[i..i + digits]).ok()?.parse().ok()
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Token counts a response reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
}

impl Usage {
    fn merge(&mut self, other: Usage) {
        self.prompt = other.prompt.or(self.prompt);
        self.completion = other.completion.or(self.completion);
    }
}

#[derive(Deserialize, Default)]
struct UsageJson {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct DetailsJson {
    #[serde(default)]
    generated_tokens: Option<u64>,
}

/// Whether a string is non-empty, read without keeping it: an escaped one is not unescaped
/// into an allocation of its own.
#[derive(Default)]
struct NonEmpty(bool);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = NonEmpty;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, v: &str) -> Result<NonEmpty, E> {
                Ok(NonEmpty(!v.is_empty()))
            }
        }
        d.deserialize_str(Visit)
    }
}

fn nonempty(s: &Option<NonEmpty>) -> bool {
    s.as_ref().is_some_and(|s| s.0)
}

/// Whether any of a list of `choices` carries output, read one by one without collecting
/// them (this runs on every streamed event).
#[derive(Default)]
struct AnyOutput(bool);

impl<'de> Deserialize<'de> for AnyOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = AnyOutput;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<AnyOutput, A::Error> {
                let mut any = false;
                while let Some(c) = seq.next_element::<Choice>()? {
                    any |= nonempty(&c.text)
                        || c.delta.is_some_and(|d| {
                            nonempty(&d.content)
                                || nonempty(&d.reasoning_content)
                                || d.tool_calls.is_some()
                        });
                }
                Ok(AnyOutput(any))
            }
        }
        d.deserialize_seq(Visit)
    }
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<NonEmpty>,
    #[serde(default)]
    reasoning_content: Option<NonEmpty>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<NonEmpty>,
}

#[derive(Deserialize)]
struct Token {
    #[serde(default)]
    text: Option<NonEmpty>,
    #[serde(default)]
    special: bool,
}

#[derive(Deserialize)]
struct EventJson {
    #[serde(default)]
    choices: Option<AnyOutput>,
    #[serde(default)]
    usage: Option<UsageJson>,
    #[serde(default)]
    token: Option<Token>,
    #[serde(default)]
    details: Option<DetailsJson>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// One SSE event's `data`, read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventInfo {
    /// Carries output (text, reasoning or tool-call deltas; a non-special TGI token).
    pub token: bool,
    pub usage: Usage,
    pub done: bool,
    pub error: bool,
}

pub fn event_info(data: &[u8]) -> EventInfo {
    let trimmed = data.trim_ascii();
    if trimmed == b"[DONE]" {
        return EventInfo {
            done: true,
            ..Default::default()
        };
    }
    if let Some(info) = super::event_skim::skim(trimmed) {
        return info;
    }
    // Checked once as a whole: parsing from a `str` spares serde_json validating every string
    // and key on its own (a JSON text is UTF-8, so nothing valid is lost).
    match std::str::from_utf8(trimmed) {
        Ok(text) => parsed_event_info(text),
        Err(_) => EventInfo::default(),
    }
}

/// [`event_info`] of an event's JSON through serde_json: what the quicker reading
/// ([`super::event_skim::skim`]) answers where it answers at all, and the answer elsewhere.
pub fn parsed_event_info(text: &str) -> EventInfo {
    let Ok(j) = serde_json::from_str::<EventJson>(text) else {
        return EventInfo::default();
    };
    let mut token = j.choices.is_some_and(|c| c.0);
    if let Some(t) = &j.token {
        token |= !t.special && nonempty(&t.text);
    }
    let mut usage = Usage::default();
    if let Some(u) = j.usage {
        usage = Usage {
            prompt: u.prompt_tokens,
            completion: u.completion_tokens,
        };
    }
    if let Some(d) = j.details {
        usage.completion = usage.completion.or(d.generated_tokens);
    }
    EventInfo {
        token,
        usage,
        done: false,
        error: j.error.is_some(),
    }
}

/// `usage` of a whole (non-streamed) response body; looked for in the text when the body is
/// not complete JSON.
pub fn body_usage(body: &[u8], complete: bool) -> Usage {
    if complete {
        if let Ok(j) = serde_json::from_slice::<EventJson>(body) {
            let mut u = Usage::default();
            if let Some(x) = j.usage {
                u = Usage {
                    prompt: x.prompt_tokens,
                    completion: x.completion_tokens,
                };
            }
            if let Some(d) = j.details {
                u.completion = u.completion.or(d.generated_tokens);
            }
            return u;
        }
    }
    Usage {
        prompt: scan_u64(body, b"\"prompt_tokens\""),
        completion: scan_u64(body, b"\"completion_tokens\"")
            .or_else(|| scan_u64(body, b"\"generated_tokens\"")),
    }
}

/// Whether an error body says the input was over the model's context length (the messages
/// of vLLM, SGLang, TGI, llama.cpp and OpenAI's error code).
pub fn is_context_length(body: &[u8]) -> bool {
    const NEEDLES: &[&[u8]] = &[
        b"maximum context length",
        b"context length",
        b"context_length_exceeded",
        b"exceeds the available context size",
        b"must be <=",
    ];
    let lower: Vec<u8> = body.iter().map(u8::to_ascii_lowercase).collect();
    NEEDLES.iter().any(|n| find(&lower, n).is_some())
}

/// Splits a Server-Sent Events stream into events (across any piece boundaries) and hands
/// each event's joined `data` to a callback. Lines are bounded; an over-long event is dropped
/// and counted by the caller.
#[derive(Debug, Default)]
pub struct Sse {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    overflow: bool,
    pub usage: Usage,
}

/// Longest SSE event kept for parsing.
const MAX_EVENT: usize = 64 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SseOut {
    pub tokens: u32,
    pub overflow: u32,
    pub done: bool,
}

impl Sse {
    /// Feeds decoded body bytes; `on_event` gets each finished event's info.
    pub fn feed<'a>(&mut self, mut bytes: &'a [u8], on_event: &mut impl FnMut(EventInfo)) -> u32 {
        let mut overflows = 0;
        // The event's one `data` value while it lies whole in `bytes`: a token event written
        // in one call is read where it lies, never copied (one copy per event was a tenth of
        // the SSE reading). Copied to `data` when anything else comes first.
        let mut inplace: Option<&'a [u8]> = None;
        while !bytes.is_empty() {
            let Some(i) = memchr::memchr(b'\n', bytes) else {
                if self.line.len() + bytes.len() > MAX_EVENT {
                    self.overflow = true;
                } else {
                    self.line.extend_from_slice(bytes);
                }
                break;
            };
            let part = &bytes[..i];
            bytes = &bytes[i + 1..];
            if self.line.is_empty() && part.len() <= MAX_EVENT {
                self.whole_line(part, &mut inplace, &mut overflows, on_event);
                continue;
            }
            // Only a line split across pieces is joined in `line`, whose buffer is kept for
            // the next.
            self.keep(&mut inplace);
            let mut kept = std::mem::take(&mut self.line);
            if kept.len() + part.len() > MAX_EVENT {
                self.overflow = true;
            } else {
                kept.extend_from_slice(part);
            }
            self.line(&kept, &mut overflows, on_event);
            kept.clear();
            self.line = kept;
        }
        self.keep(&mut inplace);
        overflows
    }

    /// A line that lies whole in the piece being fed.
    fn whole_line<'a>(
        &mut self,
        line: &'a [u8],
        inplace: &mut Option<&'a [u8]>,
        overflows: &mut u32,
        on_event: &mut impl FnMut(EventInfo),
    ) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match (inplace.take(), line.strip_prefix(b"data:")) {
            (Some(data), _) if line.is_empty() => {
                self.event(data, on_event);
                self.has_data = false;
                return;
            }
            (None, Some(v)) if !self.has_data && !self.overflow => {
                *inplace = Some(v.strip_prefix(b" ").unwrap_or(v));
                self.has_data = true;
                return;
            }
            (data, _) => *inplace = data,
        }
        self.keep(inplace);
        self.line(line, overflows, on_event);
    }

    /// The event's data read in place so far, copied where the next line can join it.
    fn keep(&mut self, inplace: &mut Option<&[u8]>) {
        if let Some(data) = inplace.take() {
            self.data.extend_from_slice(data);
        }
    }

    fn event(&mut self, data: &[u8], on_event: &mut impl FnMut(EventInfo)) {
        let info = event_info(data);
        self.usage.merge(info.usage);
        on_event(info);
    }

    fn line(&mut self, line: &[u8], overflows: &mut u32, on_event: &mut impl FnMut(EventInfo)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.overflow {
                *overflows += 1;
            } else if self.has_data {
                let data = std::mem::take(&mut self.data);
                self.event(&data, on_event);
                self.data = data;
            }
            self.data.clear();
            self.has_data = false;
            self.overflow = false;
        } else if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            let sep = usize::from(self.has_data);
            // Past the limit nothing more is kept, not even the separators: an event of
            // endless `data:` lines holds at most MAX_EVENT bytes.
            if self.overflow || self.data.len() + sep + v.len() > MAX_EVENT {
                self.overflow = true;
            } else {
                if sep == 1 {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(v);
            }
            self.has_data = true;
        }
        // `event:`, `id:`, `retry:` and comments carry nothing the agent needs.
    }

    /// Bytes of buffer this parser holds (at most twice [`MAX_EVENT`]).
    pub fn state_bytes(&self) -> usize {
        self.line.capacity() + self.data.capacity()
    }

    /// A hole in the stream: the event being read is lost.
    pub fn hole(&mut self) {
        self.line.clear();
        self.data.clear();
        self.has_data = false;
        self.overflow = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_metadata() {
        let m = request_meta(br#"{"messages":[{"role":"user","content":"say \"model\": x"}],"model":"llama","stream":true}"#, true);
        assert_eq!(m.model.as_deref(), Some("llama"));
        assert_eq!(m.stream, Some(true));
        // Cut body: scanned; the escaped key in the prompt is not taken.
        let m = request_meta(
            br#"{"prompt":"\"model\": \"evil\"","model" : "m2", "stream":false, "x": ["#,
            false,
        );
        assert_eq!(m.model.as_deref(), Some("m2"));
        assert_eq!(m.stream, Some(false));
        assert_eq!(
            request_meta(b"\x00\xff garbage", true),
            RequestMeta::default()
        );
    }

    #[test]
    fn the_most_tokens_a_request_asks_for() {
        let max = |body: &str, complete| request_meta(body.as_bytes(), complete).max_tokens;
        assert_eq!(max(r#"{"model":"m","max_tokens":256}"#, true), Some(256));
        // The newer name wins over the deprecated one.
        assert_eq!(
            max(r#"{"max_tokens":10,"max_completion_tokens":20}"#, true),
            Some(20)
        );
        assert_eq!(
            max(r#"{"inputs":"x","parameters":{"max_new_tokens":64}}"#, true),
            Some(64)
        );
        assert_eq!(max(r#"{"model":"m"}"#, true), None);
        // A cut body is scanned; a prompt quoting the key is not taken for it.
        assert_eq!(
            max(
                r#"{"prompt":"\"max_tokens\": 9","max_tokens": 77, "messages": ["#,
                false
            ),
            Some(77)
        );
        // Not a number: none, never a panic.
        assert_eq!(max(r#"{"max_tokens":"lots"}"#, false), None);
        assert_eq!(max(r#"{"max_tokens":-1}"#, true), None);
    }

    #[test]
    fn sse_events_across_pieces() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"text\":\"lo\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
            "data:{\"token\":{\"id\":1,\"text\":\"x\",\"special\":false}}\n\n",
            "data:{\"token\":{\"id\":2,\"text\":\"</s>\",\"special\":true},\"details\":{\"generated_tokens\":3}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for split in [1, 3, 7, 50, stream.len()] {
            let mut sse = Sse::default();
            let mut events = Vec::new();
            for piece in stream.chunks(split) {
                sse.feed(piece, &mut |e| events.push(e));
            }
            let tokens = events.iter().filter(|e| e.token).count();
            assert_eq!(tokens, 3, "split {split}");
            assert!(events.last().unwrap().done);
            assert_eq!(sse.usage.prompt, Some(7));
            assert_eq!(sse.usage.completion, Some(3));
        }
    }

    #[test]
    fn an_event_reads_the_same_in_place_or_joined_across_pieces() {
        // Events read where they lie, events of several `data:` lines, comments and fields
        // between, CRLF: every split in two must give the events of the whole.
        let stream = concat!(
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"text\":\"a\"}]}\n\n",
            "event: x\ndata: {\"choices\":\ndata: [{\"text\":\"b\"}]}\r\n\r\n",
            "data:{\"token\":{\"text\":\"c\",\"special\":false}}\nid: 4\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\n",
            "data: not json\n\ndata: [DONE]\n\n",
        )
        .as_bytes();
        let read = |pieces: &[&[u8]]| {
            let mut sse = Sse::default();
            let mut events = Vec::new();
            for p in pieces {
                sse.feed(p, &mut |e| events.push(e));
            }
            (events, sse.usage)
        };
        let whole = read(&[stream]);
        assert_eq!(whole.0.iter().filter(|e| e.token).count(), 3);
        assert_eq!(whole.0.len(), 6);
        assert!(whole.0[5].done);
        assert_eq!(whole.1.completion, Some(5));
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let split = read(&[a, b]);
            assert_eq!((&split.0, split.1), (&whole.0, whole.1), "cut at {cut}");
        }
    }

    #[test]
    fn an_over_long_line_is_dropped_however_it_arrives() {
        let long = format!(
            "data: {{\"choices\":[{{\"text\":\"{}\"}}]}}\n\n",
            "x".repeat(MAX_EVENT)
        );
        let next = b"data: {\"choices\":[{\"text\":\"y\"}]}\n\n";
        let stream = [long.as_bytes(), next].concat();
        for split in [7, 4096, stream.len()] {
            let mut sse = Sse::default();
            let mut events = Vec::new();
            let mut overflows = 0;
            for piece in stream.chunks(split) {
                overflows += sse.feed(piece, &mut |e| events.push(e));
                assert!(sse.state_bytes() <= 4 * MAX_EVENT, "split {split}");
            }
            assert_eq!(overflows, 1, "split {split}");
            assert_eq!(events.len(), 1, "split {split}");
            assert!(events[0].token, "split {split}");
        }
    }

    #[test]
    fn usage_and_errors() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}"#;
        assert_eq!(
            body_usage(body, true),
            Usage {
                prompt: Some(5),
                completion: Some(9)
            }
        );
        assert_eq!(body_usage(&body[20..], false).completion, Some(9));
        assert!(is_context_length(
            br#"{"message":"This model's maximum context length is 2048 tokens."}"#
        ));
        assert!(!is_context_length(br#"{"message":"bad role"}"#));
    }

    #[test]
    fn which_events_carry_output() {
        let token = |json: &str| event_info(json.as_bytes()).token;
        // OpenAI chat (vLLM, SGLang, llama.cpp): the role-only first delta is not output.
        assert!(!token(
            r#"{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#
        ));
        assert!(token(
            r#"{"choices":[{"index":0,"delta":{"content":" tok"}}]}"#
        ));
        assert!(token(r#"{"choices":[{"delta":{"content":"\n"}}]}"#));
        assert!(token(r#"{"choices":[{"delta":{"content":"\u00e9"}}]}"#));
        assert!(token(
            r#"{"choices":[{"delta":{"content":null,"reasoning_content":"hmm"}}]}"#
        ));
        assert!(token(
            r#"{"choices":[{"delta":{"content":null,"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#
        ));
        assert!(!token(
            r#"{"choices":[{"delta":{"content":null,"tool_calls":null}}]}"#
        ));
        // Completions; several choices (n > 1): any of them.
        assert!(token(r#"{"choices":[{"text":"a"}]}"#));
        assert!(token(
            r#"{"choices":[{"delta":{"content":""}},{"delta":{"content":"b"}}]}"#
        ));
        assert!(!token(r#"{"choices":[]}"#));
        // The last event: usage, no output.
        let last = event_info(
            br#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#,
        );
        assert_eq!(
            last,
            EventInfo {
                usage: Usage {
                    prompt: Some(5),
                    completion: Some(7)
                },
                ..Default::default()
            }
        );
        // TGI: special tokens are not output.
        assert!(token(r#"{"token":{"id":1,"text":" a","special":false}}"#));
        assert!(!token(r#"{"token":{"id":2,"text":"</s>","special":true}}"#));
        assert!(event_info(br#"{"error":{"message":"x"}}"#).error);
        assert!(!event_info(br#"{"error":null}"#).error);
        // Malformed or of another shape: nothing.
        assert_eq!(
            event_info(br#"{"choices":[{"delta":{"content":"x"#),
            EventInfo::default()
        );
        assert_eq!(
            event_info(br#"{"choices":{"delta":{"content":"x"}}}"#),
            EventInfo::default()
        );
        assert_eq!(event_info(b"\xff\xfe"), EventInfo::default());
        assert!(event_info(b" [DONE] ").done);
    }
}

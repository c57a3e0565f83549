//! The few fields of a streamed event's JSON that the agent needs (see
//! [`super::payload::event_info`]), read in one pass that builds nothing.
//!
//! Why by hand: every token event of every stream is read (64 a request in the bench), and on
//! TGI's 134-byte token event serde_json took 230 ns into the derived struct and 175 ns only to
//! skip it as `IgnoredAny`; gjson and sonic-rs (without SIMD on the baseline target) were
//! slower still. This pass takes about a fifth of that.
//!
//! It answers only for what it reads whole and plainly: valid JSON in valid UTF-8 whose keys
//! have no escapes, whose strings have no `\u` escapes, whose known fields have the types
//! serde_json's reading accepts, each once. For anything else it returns `None` and the caller
//! reads the event with serde_json, whose answer defines the result: the fuzz target
//! `event_skim` checks that the two agree wherever this one answers, and that it answers for
//! UTF-8 only. UTF-8 is checked here, character by character and only past ASCII: outside
//! strings such a byte is not JSON, and checking every event whole first cost about 7 % as
//! much again as this pass.

use super::payload::{EventInfo, Usage};

/// Deepest nesting read; deeper events go to serde_json (its own limit is 128).
const MAX_DEPTH: u32 = 32;

/// `None` anywhere below: not read here, the caller falls back.
type Skimmed<T> = Option<T>;

/// The JSON of an event's `data`: the fields [`EventInfo`] is made of, or `None`.
pub fn skim(json: &[u8]) -> Skimmed<EventInfo> {
    let mut s = Cursor { b: json, i: 0 };
    if s.peek()? != b'{' {
        return None;
    }
    let mut output = false;
    let mut token = false;
    let mut usage = Usage::default();
    let mut generated = None;
    let mut error = false;
    s.fields(
        &[b"choices", b"token", b"usage", b"details", b"error"],
        1,
        |s, field| {
            if s.null()? {
                return Some(());
            }
            match field {
                0 => s.array(|s| {
                    output |= s.choice()?;
                    Some(())
                })?,
                1 => token = s.token()?,
                2 => usage = s.usage()?,
                3 => generated = s.details()?,
                _ => {
                    s.skip(1)?;
                    error = true;
                }
            }
            Some(())
        },
    )?;
    s.ws();
    if s.i != s.b.len() {
        return None;
    }
    usage.completion = usage.completion.or(generated);
    Some(EventInfo {
        token: output || token,
        usage,
        done: false,
        error,
    })
}

/// Where the run of plain ASCII string bytes from `i` ends: at a quote, a backslash, a control
/// character or a byte past ASCII, or at the end. Eight bytes at a time (strings are most of
/// an event), with the byte-wise tests for a zero byte and a byte below 0x20 of
/// <https://graphics.stanford.edu/~seander/bithacks.html#ValueInWord>, whose lowest flagged
/// byte is always a true one.
fn plain_run(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    while let Some(word) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        let flagged = zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            | (x.wrapping_sub(ONES * 0x20) & !x & HIGH)
            | (x & HIGH);
        if flagged != 0 {
            return i + (flagged.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < b.len() && !matches!(b[i], b'"' | b'\\' | 0..=0x1f | 0x80..) {
        i += 1;
    }
    i
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Skimmed<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Skimmed<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    fn literal(&mut self, word: &[u8]) -> Skimmed<()> {
        self.ws();
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// Reads a `null` if one is next.
    fn null(&mut self) -> Skimmed<bool> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(true);
        }
        Some(false)
    }

    /// A string's raw bytes between its quotes, and whether it had escapes.
    fn string(&mut self) -> Skimmed<(&'a [u8], bool)> {
        self.eat(b'"')?;
        let start = self.i;
        let b = self.b;
        let mut i = start;
        let mut escaped = false;
        loop {
            i = plain_run(b, i);
            match *b.get(i)? {
                b'"' => {
                    self.i = i + 1;
                    return Some((&b[start..i], escaped));
                }
                b'\\' => {
                    // `\u` escapes (whose surrogates serde_json checks) are left to it.
                    if !matches!(
                        b.get(i + 1)?,
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't'
                    ) {
                        return None;
                    }
                    escaped = true;
                    i += 2;
                }
                // A character past ASCII, checked as UTF-8 where it lies.
                lead @ 0x80.. => {
                    let n = match lead {
                        0xc2..=0xdf => 2,
                        0xe0..=0xef => 3,
                        0xf0..=0xf4 => 4,
                        _ => return None,
                    };
                    std::str::from_utf8(b.get(i..i + n)?).ok()?;
                    i += n;
                }
                // A control character, which JSON does not allow raw in a string.
                _ => return None,
            }
        }
    }

    fn digits(&mut self) -> Skimmed<()> {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.b.get(self.i) {
            self.i += 1;
        }
        (self.i > start).then_some(())
    }

    /// A number, as JSON's grammar has it; its digits when it is a non-negative integer.
    fn number(&mut self) -> Skimmed<Option<&'a [u8]>> {
        self.ws();
        let start = self.i;
        let negative = self.b.get(self.i) == Some(&b'-');
        if negative {
            self.i += 1;
        }
        match self.b.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits()?,
            _ => return None,
        }
        let int_end = self.i;
        let mut integer = !negative;
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            self.digits()?;
            integer = false;
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
                self.i += 1;
            }
            self.digits()?;
            integer = false;
        }
        if !integer {
            return Some(None);
        }
        Some(Some(&self.b[start..int_end]))
    }

    /// `{ "key": value, … }`, each value read by `value` with its (unescaped) key.
    fn object(&mut self, mut value: impl FnMut(&mut Self, &'a [u8]) -> Skimmed<()>) -> Skimmed<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let (key, escaped) = self.string()?;
            if escaped {
                return None;
            }
            self.eat(b':')?;
            value(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `[ value, … ]`, each read by `value`.
    fn array(&mut self, mut value: impl FnMut(&mut Self) -> Skimmed<()>) -> Skimmed<()> {
        self.eat(b'[')?;
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            value(self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Any value, read to its end and kept nowhere.
    fn skip(&mut self, depth: u32) -> Skimmed<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' if depth < MAX_DEPTH => self.object(|s, _| s.skip(depth + 1)),
            b'[' if depth < MAX_DEPTH => self.array(|s| s.skip(depth + 1)),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number().map(drop),
            _ => None,
        }
    }

    /// A string or `null`: whether it is a non-empty string.
    fn nonempty(&mut self) -> Skimmed<bool> {
        if self.null()? {
            return Some(false);
        }
        Some(!self.string()?.0.is_empty())
    }

    /// An integer for a `u64` field (from 0 to `u64::MAX`), or `null`.
    fn count(&mut self) -> Skimmed<Option<u64>> {
        if self.null()? {
            return Some(None);
        }
        let digits = self.number()??;
        Some(Some(std::str::from_utf8(digits).ok()?.parse().ok()?))
    }

    fn boolean(&mut self) -> Skimmed<bool> {
        match self.peek()? {
            b't' => self.literal(b"true").map(|()| true),
            b'f' => self.literal(b"false").map(|()| false),
            _ => None,
        }
    }

    /// `{ … }` whose fields named in `known` are read by `value` (with the name's index),
    /// each at most once (serde's derived structs refuse a field given twice: the reading falls
    /// back), every other field skipped at `depth`.
    fn fields(
        &mut self,
        known: &[&[u8]],
        depth: u32,
        mut value: impl FnMut(&mut Self, usize) -> Skimmed<()>,
    ) -> Skimmed<()> {
        let mut seen = 0u32;
        self.object(|s, key| match known.iter().position(|k| *k == key) {
            Some(field) if seen & (1 << field) == 0 => {
                seen |= 1 << field;
                value(s, field)
            }
            Some(_) => None,
            None => s.skip(depth),
        })
    }

    /// One of OpenAI's `choices`: whether it carries output (text, reasoning or tool calls).
    fn choice(&mut self) -> Skimmed<bool> {
        let mut any = false;
        self.fields(&[b"text", b"delta"], 2, |s, field| {
            any |= match field {
                0 => s.nonempty()?,
                _ => !s.null()? && s.delta()?,
            };
            Some(())
        })?;
        Some(any)
    }

    fn delta(&mut self) -> Skimmed<bool> {
        let mut any = false;
        self.fields(
            &[b"content", b"reasoning_content", b"tool_calls"],
            3,
            |s, field| {
                if field < 2 {
                    any |= s.nonempty()?;
                } else if !s.null()? {
                    s.skip(3)?;
                    any = true;
                }
                Some(())
            },
        )?;
        Some(any)
    }

    /// TGI's `token`: whether it is output (non-special, non-empty text).
    fn token(&mut self) -> Skimmed<bool> {
        let (mut text, mut special) = (false, false);
        self.fields(&[b"text", b"special"], 2, |s, field| {
            match field {
                0 => text = s.nonempty()?,
                _ => special = s.boolean()?,
            }
            Some(())
        })?;
        Some(text && !special)
    }

    fn usage(&mut self) -> Skimmed<Usage> {
        let mut usage = Usage::default();
        self.fields(&[b"prompt_tokens", b"completion_tokens"], 2, |s, field| {
            match field {
                0 => usage.prompt = s.count()?,
                _ => usage.completion = s.count()?,
            }
            Some(())
        })?;
        Some(usage)
    }

    /// TGI's `details`: its `generated_tokens`.
    fn details(&mut self) -> Skimmed<Option<u64>> {
        let mut generated = None;
        self.fields(&[b"generated_tokens"], 2, |s, _| {
            generated = s.count()?;
            Some(())
        })?;
        Some(generated)
    }
}

#[cfg(test)]
mod tests {
    use super::super::payload::parsed_event_info;
    use super::*;

    /// Answered here, and as serde_json answers.
    fn same(json: &str) -> EventInfo {
        let got = skim(json.as_bytes()).unwrap_or_else(|| panic!("not skimmed: {json}"));
        assert_eq!(got, parsed_event_info(json), "{json}");
        got
    }

    /// Left to serde_json.
    fn left(json: &str) {
        assert_eq!(skim(json.as_bytes()), None, "{json}");
    }

    #[test]
    fn reads_the_servers_token_events() {
        let tgi = r#"{"details":null,"generated_text":null,"index":12,"token":{"id":1011,"logprob":-0.5,"special":false,"text":" tok11"},"top_tokens":null}"#;
        assert!(same(tgi).token);
        let special =
            r#"{"index":3,"token":{"id":2,"text":"</s>","logprob":-1e-3,"special":true}}"#;
        assert!(!same(special).token);
        let oai = r#"{"id":"chatcmpl-9f2c","object":"chat.completion.chunk","created":1733590000,"model":"m","choices":[{"index":0,"delta":{"content":" a \"quoted\"\n word"},"logprobs":null,"finish_reason":null}]}"#;
        assert!(same(oai).token);
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert!(!same(role).token);
        assert!(same(r#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#).token);
        assert!(same(r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#).token);
        assert!(!same(r#"{"choices":[{"delta":{"tool_calls":null}}]}"#).token);
        assert!(same(r#"{"choices":[{"text":"x","index":0}]}"#).token);
        assert!(!same(r#"{"choices":[]}"#).token);
    }

    #[test]
    fn reads_usage_details_and_errors() {
        let last = same(
            r#"{"choices":[],"usage":{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7}}"#,
        );
        assert_eq!(
            last.usage,
            Usage {
                prompt: Some(12),
                completion: Some(7)
            }
        );
        let tgi = same(
            r#"{"token":{"text":"x","special":false},"generated_text":"abc","details":{"finish_reason":"length","generated_tokens":3,"seed":null}}"#,
        );
        assert_eq!(tgi.usage.completion, Some(3));
        assert!(tgi.token);
        assert!(same(r#"{"error":{"message":"boom","code":500}}"#).error);
        assert!(!same(r#"{"error":null}"#).error);
        assert_eq!(
            same(r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":null}}"#)
                .usage
                .prompt,
            Some(u64::MAX)
        );
        same(" { } ");
    }

    #[test]
    fn leaves_what_it_does_not_read_whole_to_serde_json() {
        // Escapes it does not read, a field twice, types serde_json refuses, bad JSON.
        left(r#"{"token":{"text":"\u00e9","special":false}}"#);
        left(r#"{"\u0074oken":{"text":"x"}}"#);
        left(r#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#);
        left(r#"{"choices":null,"choices":[]}"#);
        left(r#"{"usage":{"prompt_tokens":-1}}"#);
        left(r#"{"usage":{"prompt_tokens":1.0}}"#);
        left(r#"{"usage":{"prompt_tokens":18446744073709551616}}"#);
        left(r#"{"token":{"special":null}}"#);
        left(r#"{"token":{"text":5}}"#);
        left(r#"{"choices":[null]}"#);
        left(r#"{"choices":{"delta":{}}}"#);
        left(r#"{"a":01}"#);
        left(r#"{"a":1,}"#);
        left(r#"{"a":[1,]}"#);
        left(r#"{"a":1} x"#);
        left("{\"a\":\"tab\there\"}");
        left(r#"[1,2]"#);
        left(r#"{"a":"#);
    }

    #[test]
    fn reads_text_past_ascii_and_only_valid_utf8() {
        // Token text in any script (two-, three- and four-byte characters), keys too.
        assert!(same(r#"{"token":{"text":"é","special":false}}"#).token);
        assert!(same(r#"{"choices":[{"delta":{"content":"日本語 🙂 ok"}}]}"#).token);
        assert!(!same(r#"{"choices":[{"delta":{"content":""}}],"ключ":"значение"}"#).token);
        // Not UTF-8: a lone continuation byte, a truncated sequence, an overlong encoding, a
        // surrogate, past U+10FFFF; and a byte past ASCII outside a string. Left to the
        // caller, whose check of the whole refuses them.
        for bad in [
            &b"{\"token\":{\"text\":\"\x80\"}}"[..],
            b"{\"token\":{\"text\":\"\xe6\x97\"}}",
            b"{\"token\":{\"text\":\"\xc0\xaf\"}}",
            b"{\"token\":{\"text\":\"\xed\xa0\x80\"}}",
            b"{\"token\":{\"text\":\"\xf4\x90\x80\x80\"}}",
            b"{\"token\":{\"text\":\"x\"}}\xc3\xa9",
        ] {
            assert_eq!(skim(bad), None, "{bad:?}");
            assert_eq!(super::super::payload::event_info(bad), EventInfo::default());
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(100), "]".repeat(100));
        left(&deep);
        let shallow = format!(r#"{{"a":{}1{}}}"#, "[".repeat(20), "]".repeat(20));
        same(&shallow);
    }
}

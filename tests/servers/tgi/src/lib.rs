//! A blocking HTTP/1.1 client for the TGI stand-in (`text-generation-router`, this crate's
//! binary), for the root-tier tests and the bench: keep-alive connections, raw sockets,
//! each response timed here (time to first token event, gaps between token events, latency)
//! so that the agent's wire timings can be compared with what a client saw.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

/// What one request looked like from the client.
#[derive(Clone, Debug, Default)]
pub struct Timed {
    pub status: u16,
    /// Request sent → first token event received (streamed responses).
    pub ttft: Option<Duration>,
    /// Between consecutive token events.
    pub gaps: Vec<Duration>,
    /// Request sent → last byte of the response received.
    pub latency: Duration,
    /// Token events (streamed), non-special tokens only.
    pub token_events: u64,
    /// `details.generated_tokens`, when the response had it.
    pub generated_tokens: Option<u64>,
    /// The response body (non-streamed) or the concatenated event data (streamed).
    pub body: Vec<u8>,
}

/// One keep-alive connection.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// A request: route `/generate` or `/generate_stream` and TGI's parameters.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub stream: bool,
    pub inputs: &'a str,
    pub max_new_tokens: u64,
    pub details: bool,
    /// Extra headers (`x-ttft-ms`, `x-token-ms`, `x-error`).
    pub headers: Vec<(&'a str, String)>,
}

impl<'a> Request<'a> {
    pub fn new(stream: bool, max_new_tokens: u64) -> Self {
        Self {
            stream,
            inputs: "What is Deep Learning?",
            max_new_tokens,
            details: false,
            headers: Vec::new(),
        }
    }

    pub fn details(mut self) -> Self {
        self.details = true;
        self
    }

    pub fn header(mut self, name: &'a str, value: impl ToString) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    /// The whole request, as written on the socket.
    pub fn bytes(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "inputs": self.inputs,
            "parameters": {"max_new_tokens": self.max_new_tokens, "details": self.details},
        })
        .to_string();
        let path = if self.stream {
            "/generate_stream"
        } else {
            "/generate"
        };
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Client {
    pub fn connect(port: u16) -> io::Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    fn line(&mut self) -> io::Result<String> {
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(l.trim_end_matches(['\r', '\n']).to_string())
    }

    /// Sends the request and reads its response in full, timing it.
    pub fn send(&mut self, req: &Request) -> io::Result<Timed> {
        let bytes = req.bytes();
        let t0 = Instant::now();
        self.writer.write_all(&bytes)?;
        let status_line = self.line()?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("status line {status_line:?}")))?;
        let (mut length, mut chunked, mut sse) = (None, false, false);
        loop {
            let l = self.line()?;
            if l.is_empty() {
                break;
            }
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => length = v.parse::<usize>().ok(),
                "transfer-encoding" => chunked = v.contains("chunked"),
                "content-type" => sse = v.contains("text/event-stream"),
                _ => {}
            }
        }
        let mut out = Timed {
            status,
            ..Timed::default()
        };
        let mut events = Events::default();
        let mut last_token: Option<Instant> = None;
        let mut on_data = |data: &[u8], at: Instant, out: &mut Timed| {
            if !sse {
                out.body.extend_from_slice(data);
                return;
            }
            events.feed(data, &mut |ev| {
                out.body.extend_from_slice(ev);
                out.body.push(b'\n');
                let Ok(j) = serde_json::from_slice::<serde_json::Value>(ev) else {
                    return;
                };
                if let Some(n) = j["details"]["generated_tokens"].as_u64() {
                    out.generated_tokens = Some(n);
                }
                let t = &j["token"];
                let text = t["text"].as_str().unwrap_or("");
                if !t.is_object() || t["special"].as_bool() == Some(true) || text.is_empty() {
                    return;
                }
                out.token_events += 1;
                match last_token {
                    None => out.ttft = Some(at - t0),
                    Some(prev) => out.gaps.push(at - prev),
                }
                last_token = Some(at);
            });
        };
        if chunked {
            loop {
                let size_line = self.line()?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| bad(format!("chunk size {size_line:?}")))?;
                if size == 0 {
                    // Trailers, then the blank line.
                    while !self.line()?.is_empty() {}
                    break;
                }
                let mut data = vec![0; size];
                self.reader.read_exact(&mut data)?;
                let at = Instant::now();
                let mut crlf = [0; 2];
                self.reader.read_exact(&mut crlf)?;
                on_data(&data, at, &mut out);
            }
        } else {
            let n = length.ok_or_else(|| bad("neither content-length nor chunked"))?;
            let mut data = vec![0; n];
            self.reader.read_exact(&mut data)?;
            on_data(&data, Instant::now(), &mut out);
        }
        out.latency = t0.elapsed();
        if !sse {
            if let Ok(j) = serde_json::from_slice::<serde_json::Value>(&out.body) {
                out.generated_tokens = j["details"]["generated_tokens"].as_u64();
            }
        }
        Ok(out)
    }
}

/// Splits Server-Sent Events across reads; hands each event's `data` to a callback.
#[derive(Default)]
struct Events {
    pending: Vec<u8>,
}

impl Events {
    fn feed(&mut self, data: &[u8], on_event: &mut impl FnMut(&[u8])) {
        self.pending.extend_from_slice(data);
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let ev: Vec<u8> = self.pending.drain(..end + 2).collect();
            for line in ev.split(|&b| b == b'\n') {
                if let Some(d) = line.strip_prefix(b"data:") {
                    on_event(d.strip_prefix(b" ").unwrap_or(d));
                }
            }
        }
    }
}

//! The agent's HTTP/2 and gRPC connection parser (`inferscope::http::wire::Wire`, which
//! decides the protocol and hands HTTP/2 to `inferscope::http::h2::Conn`: frames, HPACK,
//! gRPC messages) on arbitrary input cut into syscall-sized records with holes, as the probes
//! deliver it.
//!
//! Input: segments separated by the two bytes `\n#`. A segment's first byte says what it is:
//! `<` bytes read by the server, `>` bytes written by it, each followed by a hole of
//! `second byte × 13` bytes; `{` and `}` the same as plaintext from the server's OpenSSL (a TLS
//! connection's socket bytes are ignored from the first of them); `c` the connection closes. A
//! first segment `j` starts a connection older than the agent. Seeds: `fuzz/seeds/http2`.
//!
//! Each segment's payload also goes to `inferscope::http::engine::decode_batch` (protobuf read
//! without the schema).
//!
//! Besides "no panic": every request counted in flight is finished exactly once by the
//! close, token timings are consistent, and the state stays within its caps.

#![no_main]

use inferscope::http::{conn::Output, wire::Wire};
use libfuzzer_sys::fuzz_target;

fn segments(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .windows(2)
            .position(|w| w == b"\n#")
            .unwrap_or(rest.len());
        let seg = &rest[..end];
        rest = rest.get(end + 2..).unwrap_or(&[]);
        Some(seg)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut c = if data.first() == Some(&b'j') {
        Wire::joined(0)
    } else {
        Wire::new(0)
    };
    let mut out = Vec::new();
    let mut ts = 0u64;
    for seg in segments(data) {
        let Some((&op, rest)) = seg.split_first() else {
            continue;
        };
        ts += 1000;
        let (hole, payload) = match rest.split_first() {
            Some((&h, p)) => (u64::from(h) * 13, p),
            None => (0, rest),
        };
        let len = payload.len() as u64 + hole;
        // The protobuf walk behind a TGI `Decode`'s batch, on the raw bytes too: a route the
        // fuzzer rarely builds.
        let _ = inferscope::http::engine::decode_batch(payload);
        match op {
            b'<' => c.record(ts, true, payload, len, false, &mut out),
            b'>' => c.record(ts, false, payload, len, false, &mut out),
            b'{' => c.record(ts, true, payload, len, true, &mut out),
            b'}' => c.record(ts, false, payload, len, true, &mut out),
            b'c' => c.close(ts, &mut out),
            _ => c.record(ts, op % 2 == 0, seg, seg.len() as u64, false, &mut out),
        }
        assert!(
            c.state_bytes() <= 4 * 1024 * 1024,
            "parser state past its caps: {} bytes",
            c.state_bytes()
        );
    }
    c.close(ts + 1, &mut out);
    assert_eq!(c.in_flight(), 0, "requests left in flight after close");
    let received = out
        .iter()
        .filter(|o| matches!(o, Output::Received { .. }))
        .count();
    let mut finished_received = 0;
    for o in &out {
        let Output::Finished(x) = o else { continue };
        finished_received += usize::from(x.received);
        assert!(x.end_ns >= x.start_ns, "ends before it starts: {x:?}");
        assert_eq!(
            x.token_gaps_ns.len() as u64 + x.token_gaps_dropped,
            x.token_events.saturating_sub(1),
            "gaps do not match token events: {x:?}"
        );
    }
    assert_eq!(
        received, finished_received,
        "in-flight accounting: {received} received, {finished_received} finished"
    );
});

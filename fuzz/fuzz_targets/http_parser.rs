//! The agent's HTTP/1.1 + SSE connection parser (`inferscope::http::conn::Conn`) on
//! arbitrary input, as the probes would deliver it: what the server read and wrote, cut into
//! syscall-sized pieces at arbitrary points, with uncaptured holes, a close, or an abandon.
//!
//! Input: segments separated by NUL bytes. A segment's first byte says what it is, the rest
//! is its payload:
//! - `<` bytes read by the server; `>` bytes written by it (any other first byte: read when
//!   even, written when odd, the whole segment being the payload);
//! - `h` / `H` + decimal length: a read / write hole (bytes moved but not captured);
//! - `c`: the connection closes; `a`: its open exchanges are abandoned (timeout).
//!
//! Each segment advances the clock by its first byte (µs). Seeds: `fuzz/seeds/http_parser`.
//!
//! Besides "no panic", it checks what the metrics rely on: every request counted in flight
//! (`Received`) is finished exactly once by the close, token timings are consistent, and the
//! clock never runs backwards within an exchange, and the connection's state stays within
//! its buffers' caps.

#![no_main]

use inferscope::http::{
    conn::{Conn, Output},
    payload,
};
use libfuzzer_sys::fuzz_target;

fn hole_len(digits: &[u8]) -> u64 {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(digits.len() as u64 * 97)
        % (1 << 20)
}

fuzz_target!(|data: &[u8]| {
    // The record decoder on the raw bytes, too.
    let _ = inferscope::ingest::decode(data);
    let mut c = if data.first() == Some(&b'j') {
        Conn::joined(0)
    } else {
        Conn::new(0)
    };
    let mut out = Vec::new();
    let mut ts = 0u64;
    for seg in data.split(|&b| b == 0) {
        let Some((&op, rest)) = seg.split_first() else {
            continue;
        };
        ts += u64::from(op) * 1000;
        match op {
            b'<' => c.read(ts, rest, &mut out),
            b'>' => c.write(ts, rest, &mut out),
            b'h' => c.read_hole(ts, hole_len(rest), &mut out),
            b'H' => c.write_hole(ts, hole_len(rest), &mut out),
            b'c' => c.close(ts, &mut out),
            b'a' => c.abandon(ts, inferscope::http::conn::ErrorType::Timeout, &mut out),
            _ if op % 2 == 0 => c.read(ts, seg, &mut out),
            _ => c.write(ts, seg, &mut out),
        }
        assert!(
            c.state_bytes() <= 1024 * 1024,
            "parser state past its caps: {} bytes",
            c.state_bytes()
        );
        // The body readers on their own, as they see bodies and events.
        let _ = payload::request_meta(rest, op % 2 == 0);
        let _ = payload::event_info(rest);
        let _ = payload::body_usage(rest, op % 2 == 1);
        let _ = payload::is_context_length(rest);
    }
    ts += 1;
    c.close(ts, &mut out);
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
            x.first_token_ns.is_some(),
            x.token_events > 0,
            "first token without token events: {x:?}"
        );
        assert_eq!(
            x.token_gaps_ns.len() as u64 + x.token_gaps_dropped,
            x.token_events.saturating_sub(1),
            "gaps do not match token events: {x:?}"
        );
        if let (Some(first), Some(last)) = (x.first_token_ns, x.last_token_ns) {
            assert!(
                first <= last && x.start_ns <= first,
                "token instants: {x:?}"
            );
        }
    }
    assert_eq!(
        received, finished_received,
        "in-flight accounting: {received} received, {finished_received} finished"
    );
});

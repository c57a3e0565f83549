//! Calls a server's front end makes to its model workers: TGI's router batches requests and
//! sends each batch to its shards over a Unix socket (`generate.v3.TextGenerationService`:
//! `Prefill` for a new batch, then one `Decode` per generated token of the batch). They are not
//! users' requests: counting them as `llm_requests` would count every token step as a
//! request, so they become `llm_engine_*` series of their own, by method, where the time of
//! each `Prefill` and `Decode` is the shards' time per batch step as the router saw it.

use super::{conn::Exchange, h2::grpc};

/// The methods of TGI's shard service (every version of `generate.proto`): a fixed set, so
/// that a worker answering anything else cannot grow the series.
const METHODS: &[&str] = &[
    "Prefill",
    "Decode",
    "FilterBatch",
    "ClearCache",
    "Warmup",
    "Info",
    "Health",
    "ServiceDiscovery",
];

/// The `method` label of a call to `route` (its `:path`): one of [`METHODS`]; `other` for
/// another path; `unknown` where the path was not read (an HPACK reference to an entry
/// inserted before the agent started, on a channel older than it).
pub fn method(route: &str) -> &'static str {
    if route.is_empty() {
        return "unknown";
    }
    let Some((service, name)) = route.trim_start_matches('/').split_once('/') else {
        return "other";
    };
    let tgi = service
        .strip_prefix("generate.v")
        .and_then(|s| s.split_once('.'))
        .is_some_and(|(v, rest)| {
            !v.is_empty()
                && v.bytes().all(|b| b.is_ascii_digit())
                && rest == "TextGenerationService"
        });
    match METHODS.iter().find(|m| **m == name) {
        Some(m) if tgi => m,
        _ => "other",
    }
}

/// The requests of the batch step a `Decode` call carries, from its first message kept whole:
/// `DecodeRequest { repeated CachedBatch batches = 1 }`, each `CachedBatch { uint64 id = 1;
/// repeated uint64 request_ids = 2; uint32 size = 3; ... }` (several when the router merged a
/// new batch in), their sizes summed. A `Prefill` carries its requests' prompts before its
/// size, past what is kept of a message: its batch is not read.
pub fn decode_batch(msg: &[u8]) -> Option<u64> {
    grpc::repeated(msg, 1)?
        .into_iter()
        .map(|batch| grpc::varint_field(batch, 3))
        .sum()
}

/// The `status` label: `ok`, a gRPC error code (`grpc_internal`, ...), `unknown` where the
/// status named an HPACK entry older than the agent, else how the call ended without one
/// (`connection_reset`, `timeout`, `untracked`, or `none`).
pub fn status(x: &Exchange) -> &'static str {
    match x.grpc_status {
        Some(0) => "ok",
        Some(code) => grpc::status_label(code),
        None if x.grpc_status_unread && x.error.is_none() => "unknown",
        None => x.error.map_or("none", |e| e.label()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_of_tgi_shards_and_nothing_else() {
        for (route, want) in [
            ("/generate.v3.TextGenerationService/Decode", "Decode"),
            ("/generate.v2.TextGenerationService/Prefill", "Prefill"),
            (
                "/generate.v10.TextGenerationService/FilterBatch",
                "FilterBatch",
            ),
            ("/generate.v3.TextGenerationService/Nope", "other"),
            ("/generate.vx.TextGenerationService/Decode", "other"),
            ("/generate.v.TextGenerationService/Decode", "other"),
            ("/generate.v3.TextGenerationServiceX/Decode", "other"),
            ("/llm.Generator/Decode", "other"),
            ("/Decode", "other"),
            ("", "unknown"),
        ] {
            assert_eq!(method(route), want, "{route}");
        }
    }

    #[test]
    fn decode_batches_are_summed() {
        // Two CachedBatch { id, request_ids (packed), size, max_tokens }: 3 and 2 requests.
        let a = [0x08, 1, 0x12, 3, 10, 11, 12, 0x18, 3, 0x20, 0x80, 0x01];
        let b = [0x08, 2, 0x12, 2, 13, 14, 0x18, 2];
        let mut msg = vec![0x0A, a.len() as u8];
        msg.extend_from_slice(&a);
        msg.extend_from_slice(&[0x0A, b.len() as u8]);
        msg.extend_from_slice(&b);
        assert_eq!(decode_batch(&msg), Some(5));
        // Cut: unknown, not the first batch alone.
        assert_eq!(decode_batch(&msg[..msg.len() - 1]), None);
        // A batch without its size: unknown.
        assert_eq!(decode_batch(&[0x0A, 2, 0x08, 1]), None);
        assert_eq!(decode_batch(&[]), Some(0));
    }

    #[test]
    fn status_from_grpc_else_from_how_the_call_ended() {
        let mut x = Exchange::default();
        assert_eq!(status(&x), "none");
        x.grpc_status_unread = true;
        assert_eq!(status(&x), "unknown");
        x.error = Some(super::super::conn::ErrorType::ConnectionReset);
        assert_eq!(status(&x), "connection_reset");
        x.grpc_status = Some(13);
        assert_eq!(status(&x), "grpc_internal");
        x.grpc_status = Some(0);
        assert_eq!(status(&x), "ok");
    }
}

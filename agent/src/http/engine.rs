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

//! A stand-in for Hugging Face TGI's router (`text-generation-router`), on TGI's own stack
//! (axum + hyper), for the `http` probe tests and the bench. It speaks TGI's API:
//!
//! - `POST /generate` `{"inputs": "...", "parameters": {"max_new_tokens": N, "details": true}}`
//!   → `{"generated_text": "...", "details": {"finish_reason": "length", "generated_tokens": N,
//!   ...}}` (`details` only when asked);
//! - `POST /generate_stream`, same body → Server-Sent Events, one per token:
//!   `data:{"index":i,"token":{"id":..,"text":..,"logprob":..,"special":false},
//!   "generated_text":null,"details":null}`; the last one carries `generated_text` (and
//!   `details` when asked);
//! - `GET /health`, `GET /info`.
//!
//! Timing per server (`--ttft-ms`, `--token-ms`) or per request (headers `x-ttft-ms`,
//! `x-token-ms`); `x-error: 429 | 500 | context` answers with TGI's error instead. Inputs
//! over `--max-total-tokens` (words + `max_new_tokens`) get TGI's 422 validation error.
//! The binary is named as TGI's router, so the agent recognises it by its command line
//! (`--model-id` is the served model).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
    Router,
};
use clap::Parser;
use serde::Deserialize;
use serde_json::json;

#[derive(Parser, Debug, Clone)]
#[command(name = "text-generation-router")]
struct Args {
    #[arg(long, default_value_t = 3000)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    hostname: String,
    #[arg(long, default_value = "stand-in/tgi")]
    model_id: String,
    /// Delay before the first token.
    #[arg(long, default_value_t = 20.0)]
    ttft_ms: f64,
    /// Delay between tokens.
    #[arg(long, default_value_t = 5.0)]
    token_ms: f64,
    /// Input words + `max_new_tokens` above this get TGI's validation error (422).
    #[arg(long, default_value_t = 2048)]
    max_total_tokens: u64,
    /// Set TCP_NODELAY on accepted connections. Off by default, as in `axum::serve` (and so
    /// in TGI's router): with Nagle on, the kernel may hold a small write (an SSE token)
    /// until the client acknowledges the previous one, so the client sees it later than the
    /// server wrote it.
    #[arg(long)]
    tcp_nodelay: bool,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// The model's revision, as TGI takes it (only read from the command line by the agent).
    #[arg(long)]
    revision: Option<String>,
    /// Shards (tensor parallelism), as TGI's launcher takes it (read by the agent only).
    #[arg(long)]
    num_shard: Option<u32>,
}

#[derive(Deserialize)]
struct GenerateRequest {
    inputs: String,
    #[serde(default)]
    parameters: Parameters,
}

#[derive(Deserialize, Default)]
struct Parameters {
    max_new_tokens: Option<u64>,
    #[serde(default)]
    details: bool,
}

const DEFAULT_MAX_NEW_TOKENS: u64 = 20;

fn main() {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build().expect("tokio runtime");
    rt.block_on(serve(args));
}

async fn serve(args: Args) {
    let addr: SocketAddr = format!("{}:{}", args.hostname, args.port)
        .parse()
        .expect("--hostname and --port make an address");
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let nodelay = args.tcp_nodelay;
    let listener = listener.tap_io(move |tcp| {
        if nodelay {
            let _ = tcp.set_nodelay(true);
        }
    });
    let state = Arc::new(args);
    let app = Router::new()
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/info", get(info))
        .with_state(state);
    axum::serve(listener, app).await.expect("serve");
}

async fn info(State(args): State<Arc<Args>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "model_id": args.model_id,
            "max_total_tokens": args.max_total_tokens,
            "router": "text-generation-router",
            "version": "stand-in",
        }),
    )
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// TGI's error body (boxed: a `Response` is large for a `Result`'s error).
fn error(status: StatusCode, message: &str, kind: &str) -> Box<Response> {
    Box::new(json_response(
        status,
        &json!({ "error": message, "error_type": kind }),
    ))
}

/// The request's timing and size, or the error TGI would answer with.
struct Plan {
    ttft: Duration,
    pace: Duration,
    tokens: u64,
    details: bool,
}

fn plan(args: &Args, headers: &HeaderMap, body: &Bytes) -> Result<Plan, Box<Response>> {
    let ms = |name: &str, default: f64| -> Duration {
        let v = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(default);
        Duration::from_secs_f64(v.max(0.0) / 1000.0)
    };
    match headers.get("x-error").and_then(|v| v.to_str().ok()) {
        Some("429") => {
            return Err(error(
                StatusCode::TOO_MANY_REQUESTS,
                "Model is overloaded",
                "overloaded",
            ))
        }
        Some("500") => {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Request failed during generation: stand-in error",
                "generation",
            ))
        }
        Some("context") => {
            return Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!(
                    "Input validation error: `inputs` tokens + `max_new_tokens` must be <= {}. \
                     Given: {} `inputs` tokens and 20 `max_new_tokens`",
                    args.max_total_tokens, args.max_total_tokens
                ),
                "validation",
            ))
        }
        _ => {}
    }
    let req: GenerateRequest = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("Failed to deserialize the JSON body into the target type: {e}"),
            "validation",
        )
    })?;
    let inputs = req.inputs.split_whitespace().count() as u64;
    if inputs == 0 {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Input validation error: `inputs` cannot be empty",
            "validation",
        ));
    }
    let tokens = req
        .parameters
        .max_new_tokens
        .unwrap_or(DEFAULT_MAX_NEW_TOKENS);
    if tokens == 0 {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Input validation error: `max_new_tokens` must be strictly positive",
            "validation",
        ));
    }
    if inputs + tokens > args.max_total_tokens {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "Input validation error: `inputs` tokens + `max_new_tokens` must be <= {}. \
                 Given: {inputs} `inputs` tokens and {tokens} `max_new_tokens`",
                args.max_total_tokens
            ),
            "validation",
        ));
    }
    Ok(Plan {
        ttft: ms("x-ttft-ms", args.ttft_ms),
        pace: ms("x-token-ms", args.token_ms),
        tokens,
        details: req.parameters.details,
    })
}

fn token_text(i: u64) -> String {
    format!(" tok{i}")
}

fn generated_text(n: u64) -> String {
    (0..n).map(token_text).collect()
}

async fn generate(State(args): State<Arc<Args>>, headers: HeaderMap, body: Bytes) -> Response {
    let p = match plan(&args, &headers, &body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    tokio::time::sleep(p.ttft + p.pace * (p.tokens - 1) as u32).await;
    let mut out = json!({ "generated_text": generated_text(p.tokens) });
    if p.details {
        out["details"] = json!({
            "finish_reason": "length",
            "generated_tokens": p.tokens,
            "seed": null,
            "prefill": [],
            "tokens": (0..p.tokens).map(|i| json!({
                "id": 1000 + i, "text": token_text(i), "logprob": -0.5, "special": false
            })).collect::<Vec<_>>(),
        });
    }
    json_response(StatusCode::OK, &out)
}

async fn generate_stream(
    State(args): State<Arc<Args>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = match plan(&args, &headers, &body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let events = futures_util::stream::unfold(0u64, move |i| async move {
        if i >= p.tokens {
            return None;
        }
        tokio::time::sleep(if i == 0 { p.ttft } else { p.pace }).await;
        let last = i + 1 == p.tokens;
        let mut ev = json!({
            "index": i + 1,
            "token": { "id": 1000 + i, "text": token_text(i), "logprob": -0.5, "special": false },
            "generated_text": null,
            "details": null,
            "top_tokens": null,
        });
        if last {
            ev["generated_text"] = json!(generated_text(p.tokens));
            if p.details {
                ev["details"] = json!({
                    "finish_reason": "length",
                    "generated_tokens": p.tokens,
                    "seed": null,
                });
            }
        }
        let bytes = Bytes::from(format!("data:{ev}\n\n"));
        Some((Ok::<_, Infallible>(bytes), i + 1))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

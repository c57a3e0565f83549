//! `tonic-llm serve PORT`: a server-streaming `llm.Generator/Generate` on tonic, each stream
//! timed as its request asks. `tonic-llm timing PORT N`: N calls on one channel from tonic's
//! client, each timed here; prints `[{ttft_ms, gaps_ms, latency_ms}, ...]` as JSON.
//! `tonic-llm load PORT REQUESTS CONCURRENCY TOKENS`: the bench's load, streams multiplexed
//! on one channel.

use std::{pin::Pin, time::Duration, time::Instant};

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

pub mod llm {
    tonic::include_proto!("llm");
}

use llm::{
    generator_client::GeneratorClient,
    generator_server::{Generator, GeneratorServer},
    GenerateRequest, Token,
};

struct Service;

type Tokens = Pin<Box<dyn Stream<Item = Result<Token, Status>> + Send>>;

#[tonic::async_trait]
impl Generator for Service {
    type GenerateStream = Tokens;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let r = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(u64::from(r.first_ms))).await;
            for i in 0..r.tokens {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(u64::from(r.gap_ms))).await;
                }
                let token = Token {
                    text: format!("token-{i}"),
                };
                if tx.send(Ok(token)).await.is_err() {
                    return;
                }
            }
            if r.status != 0 {
                let code = tonic::Code::from_i32(r.status as i32);
                let _ = tx.send(Err(Status::new(code, "stopped"))).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

async fn serve(port: u16) -> Result<(), Box<dyn std::error::Error>> {
    // TCP_NODELAY, as TGI's and vLLM's servers set it: without it a token written while the
    // headers are unacknowledged waits for the client's delayed ACK.
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(GeneratorServer::new(Service))
        .serve(([127, 0, 0, 1], port).into())
        .await?;
    Ok(())
}

async fn timing(port: u16, n: u32) -> Result<(), Box<dyn std::error::Error>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let mut client = GeneratorClient::new(channel);
    let mut out = Vec::new();
    for i in 0..n {
        let start = Instant::now();
        let mut stream = client
            .generate(GenerateRequest {
                model: "tonic".into(),
                tokens: 6,
                gap_ms: 15 + 5 * i,
                first_ms: 25,
                status: 0,
            })
            .await?
            .into_inner();
        let mut arrivals = Vec::new();
        while let Some(token) = stream.next().await {
            token?;
            arrivals.push(Instant::now());
        }
        let end = Instant::now();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        out.push(serde_json::json!({
            "ttft_ms": ms(arrivals[0] - start),
            "gaps_ms": arrivals.windows(2).map(|w| ms(w[1] - w[0])).collect::<Vec<_>>(),
            "latency_ms": ms(end - start),
        }));
    }
    println!("{}", serde_json::Value::Array(out));
    Ok(())
}

/// `requests` calls of `tokens` messages, `concurrency` streams at once on one channel (as gRPC
/// clients multiplex); prints `{latency_ms: [...], ttft_ms: [...], wall_ms}`.
async fn load(
    port: u16,
    requests: u32,
    concurrency: u32,
    tokens: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = GeneratorClient::new(channel.clone());
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < requests {
                let t0 = Instant::now();
                let mut stream = client
                    .generate(GenerateRequest {
                        model: "tonic".into(),
                        tokens,
                        gap_ms: 1,
                        first_ms: 10,
                        status: 0,
                    })
                    .await?
                    .into_inner();
                let (mut first, mut got) = (None, 0);
                while let Some(token) = stream.next().await {
                    token?;
                    first.get_or_insert_with(|| t0.elapsed());
                    got += 1;
                }
                if got != tokens {
                    return Err(Status::internal(format!("{got} of {tokens} tokens")));
                }
                out.push((t0.elapsed(), first.unwrap_or_default()));
            }
            Ok::<_, Status>(out)
        }));
    }
    let (mut latency, mut ttft) = (Vec::new(), Vec::new());
    for t in tasks {
        for (l, f) in t.await?? {
            latency.push(l.as_secs_f64() * 1000.0);
            ttft.push(f.as_secs_f64() * 1000.0);
        }
    }
    let wall = start.elapsed().as_secs_f64() * 1000.0;
    println!(
        "{}",
        serde_json::json!({ "latency_ms": latency, "ttft_ms": ttft, "wall_ms": wall })
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = |i: usize| -> u16 {
        args.get(i)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let result = match args.get(1).map(String::as_str) {
        Some("serve") => serve(port(2)).await,
        Some("timing") => {
            let n = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(4);
            timing(port(2), n).await
        }
        Some("load") => {
            let arg = |i: usize| -> u32 {
                args.get(i)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage())
            };
            load(port(2), arg(3), arg(4), arg(5)).await
        }
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("tonic-llm: {e}");
        std::process::exit(1);
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: tonic-llm serve PORT | tonic-llm timing PORT N | tonic-llm load PORT REQUESTS CONCURRENCY TOKENS"
    );
    std::process::exit(2);
}

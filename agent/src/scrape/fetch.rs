//! One `GET /metrics` over a connected socket (hyper's HTTP/1.1 client), bounded in time and
//! in body size.

use std::{net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Connect(#[from] super::target::ConnectError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP error")]
    Http(#[source] hyper::Error),
    #[error("answered status {0}")]
    Status(u16),
    #[error("body larger than {0} bytes")]
    Oversized(usize),
    #[error("body is not UTF-8")]
    NotText,
}

impl FetchError {
    /// The `reason` label of `inferscope_scrape_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Connect(_) => "connect",
            FetchError::Timeout(_) => "timeout",
            FetchError::Http(_) | FetchError::Status(_) => "http",
            FetchError::Oversized(_) => "oversized",
            FetchError::NotText => "parse",
        }
    }
}

/// GETs `path` from `addr` over `stream` (already connected, in the server's namespace).
pub async fn get(
    stream: std::net::TcpStream,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    max_bytes: usize,
) -> Result<String, FetchError> {
    tokio::time::timeout(timeout, get_inner(stream, addr, path, max_bytes))
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

async fn get_inner(
    stream: std::net::TcpStream,
    addr: SocketAddr,
    path: &str,
    max_bytes: usize,
) -> Result<String, FetchError> {
    let io_error =
        |e| FetchError::Connect(super::target::ConnectError::Connect { addr, source: e });
    stream.set_nonblocking(true).map_err(io_error)?;
    let stream = tokio::net::TcpStream::from_std(stream).map_err(io_error)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(FetchError::Http)?;
    // The connection is driven beside the request; it ends when the sender is dropped.
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        // The text format every server speaks (vLLM's prometheus_client would otherwise
        // answer OpenMetrics to a client that asks for it).
        .header(hyper::header::ACCEPT, "text/plain;version=0.0.4")
        .header(
            hyper::header::USER_AGENT,
            concat!("inferscope/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|_| FetchError::Status(0))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(FetchError::Http)?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(FetchError::Status(status));
        }
        let declared = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_bytes as u64) {
            return Err(FetchError::Oversized(max_bytes));
        }
        let body = Limited::new(response.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => FetchError::Http(*e),
                Err(_) => FetchError::Oversized(max_bytes),
            })?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| FetchError::NotText)
    }
    .await;
    drop(sender);
    driver.abort();
    result
}

//! The accept loop of `serve` and `router`: HTTP/1.1 connections served by hyper with a cap on open
//! connections, a header-read timeout, limits on the request head, and a graceful shutdown that stops
//! accepting and lets open connections finish.
//!
//! `axum::serve` has none of these limits: a client that sends half a request head holds its connection
//! forever, any number of them can, and a head may be ~400 KB. Here a connection must send a whole request
//! head within `header_read_timeout` of opening (or of its last response), the head may have at most
//! `max_header_bytes` and `max_headers` fields (beyond: 431 and the connection closes), and at most
//! `max_connections` are served at once; the next ones wait in the kernel's listen queue until one closes.

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// hyper's own default count of header fields (kept on the stack; another count costs a heap allocation per
/// request).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// The smallest head limit hyper accepts: its read buffer is at least this large.
pub const MIN_HEADER_BYTES: usize = 8192;

/// hyper's default read-buffer limit.
const HYPER_READ_BUFFER: usize = 8192 + 4096 * 100;

/// Limits on connections and request heads.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    /// Most connections served at once; more wait in the listen queue.
    pub max_connections: usize,
    /// A connection must send a whole request head this long after it opens (or after its last response).
    pub header_read_timeout: Duration,
    /// Largest request head (request line and header fields), in bytes; at least [`MIN_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            max_headers: DEFAULT_MAX_HEADERS,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the open connections to finish
/// (in-flight requests complete; idle keep-alive connections close).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: &ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's read buffer (~400 KB by default) must hold the largest head.
        .max_buf_size(limits.max_header_bytes.max(HYPER_READ_BUFFER))
        .max_header_size(limits.max_header_bytes.max(MIN_HEADER_BYTES));
    if limits.max_headers != DEFAULT_MAX_HEADERS {
        builder.max_headers(limits.max_headers.max(1));
    }
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Take a slot before accepting: past the cap, new connections wait in the listen queue.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

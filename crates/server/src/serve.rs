//! The accept loop: HTTP/1.1 connections served by hyper with a header-read timeout and a cap on open
//! connections, and a graceful shutdown that stops accepting and lets open connections finish.
//!
//! `axum::serve` has neither limit: a client that sends half a request head holds its connection forever,
//! and any number of them can. Here a connection must send a whole request head within
//! `header_read_timeout` of opening (or of its last response), and at most `max_connections` are served at
//! once; the next ones wait in the kernel's listen queue until one closes.

use crate::{router, AppState};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Serves `state` on `listener` until `shutdown` completes, then waits for the open connections to finish
/// (in-flight requests complete; idle keep-alive connections close).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let header_read_timeout = state.options.header_read_timeout;
    // Idle models past their TTL unload by themselves.
    let models = state.models.clone();
    let ttl = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            models.unload_idle(std::time::Instant::now()).await;
        }
    });
    let slots = Arc::new(Semaphore::new(state.options.max_connections.max(1)));
    let app = router(state);
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
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    ttl.abort();
    graceful.shutdown().await;
    Ok(())
}

//! The server's accept loop (`mlx_serving_http::serve`: connection cap, header-read timeout, head limits,
//! graceful shutdown), with idle models unloaded past their TTL while it runs.

use crate::{router, AppState};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves `state` on `listener` until `shutdown` completes, then waits for the open connections to finish
/// (in-flight requests complete; idle keep-alive connections close).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.options.conn.clone();
    // Idle models past their TTL unload by themselves.
    let models = state.models.clone();
    let ttl = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            models.unload_idle(std::time::Instant::now()).await;
        }
    });
    let app = router(state);
    let out = mlx_serving_http::serve(listener, app, &limits, shutdown).await;
    ttl.abort();
    out
}

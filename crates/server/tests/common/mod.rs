//! Shared by the server's integration tests.

use mlx_serving_server::{router, AppState};
use std::net::SocketAddr;
use std::sync::Arc;

/// Serves `state` on a free loopback port from a runtime of its own thread; returns the address.
pub fn serve(state: Arc<AppState>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, router(state)).await.unwrap();
        });
    });
    addr
}

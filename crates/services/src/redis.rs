//! The response cache in Redis (#22): shared by every instance pointed at the same server. GET, and SET with
//! an expiry, on our own RESP client ([`crate::resp`]), every operation bounded by a timeout in milliseconds.
//! When Redis is down or slow an operation fails at once (the server answers from the engine); the outage is
//! logged once, and the connection is tried again at most once a second until Redis is back.

use crate::cache::{BoxFuture, CacheBackend, CacheError, CacheStats};
use crate::resp::{Reply, RespClient};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub struct RedisCache {
    client: RespClient,
    ttl: Duration,
    entries_written: AtomicU64,
}

impl RedisCache {
    /// `url` as `redis://HOST:PORT` (the port defaults to 6379); `timeout` bounds each operation, `ttl` each
    /// entry's life. Nothing is connected until the first operation.
    pub fn new(url: &str, timeout: Duration, ttl: Duration) -> Result<Arc<Self>, CacheError> {
        let client = RespClient::new(url, timeout, "response cache").map_err(|e| CacheError(e.0))?;
        Ok(Arc::new(Self { client, ttl, entries_written: AtomicU64::new(0) }))
    }

    async fn command(&self, args: &[&[u8]]) -> Result<Reply, CacheError> {
        self.client.command(args).await.map_err(|e| CacheError(e.0))
    }
}

impl CacheBackend for RedisCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<[u8]>>, CacheError>> {
        Box::pin(async move {
            match self.command(&[b"GET", key.as_bytes()]).await? {
                Reply::Bulk(v) => Ok(Some(v.into())),
                Reply::Nil => Ok(None),
                other => Err(CacheError(format!("GET answered {other:?}"))),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Arc<[u8]>) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let ms = self.ttl.as_millis().max(1).to_string();
            match self.command(&[b"SET", key.as_bytes(), &value, b"PX", ms.as_bytes()]).await? {
                Reply::Status(_) => {
                    self.entries_written.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                _ => Err(CacheError("SET did not answer OK".into())),
            }
        })
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    /// Redis keeps the entries: their count and size are its own (`INFO keyspace`), and its `maxmemory`
    /// policy evicts; nothing local to report.
    fn stats(&self) -> CacheStats {
        CacheStats::default()
    }

    fn is_local(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A server that accepts and never answers: every one of five concurrent operations gives up within about
    /// one timeout (waiting for the connection counts against it), instead of queueing one timeout after another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_server_does_not_queue_requests() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = std::thread::spawn(move || listener.incoming().take(2).filter_map(Result::ok).collect::<Vec<_>>());
        let c =
            RedisCache::new(&format!("redis://127.0.0.1:{port}"), Duration::from_millis(200), Duration::from_secs(1))
                .unwrap();
        let t0 = Instant::now();
        let ops: Vec<_> = (0..5)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.get("k").await.is_err() })
            })
            .collect();
        for op in ops {
            assert!(op.await.unwrap(), "a silent server is an error");
        }
        assert!(t0.elapsed() < Duration::from_millis(600), "{:?}", t0.elapsed());
        drop(held);
    }
}

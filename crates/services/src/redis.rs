//! The response cache in Redis (#22): shared by every instance pointed at the same server. A small RESP client
//! of our own (GET, and SET with an expiry) over one connection, with every operation bounded by a timeout in
//! milliseconds. When Redis is down or slow an operation fails at once (the server answers from the engine);
//! the outage is logged once, and the connection is tried again at most once a second until Redis is back.

use crate::cache::{BoxFuture, CacheBackend, CacheError, CacheStats};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// Values larger than this are refused (a reply claiming more is a protocol error).
const MAX_VALUE_BYTES: usize = 64 << 20;

/// Between connection attempts while Redis is down.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct RedisCache {
    addr: String,
    timeout: Duration,
    ttl: Duration,
    /// The connection, and whether a command on it was cut off by the timeout mid-way (then its next reply
    /// would be the old one: it is replaced).
    conn: tokio::sync::Mutex<(Option<BufStream<TcpStream>>, bool)>,
    down: AtomicBool,
    /// No connection attempt before this instant (while down).
    retry_at: std::sync::Mutex<Instant>,
    entries_written: AtomicU64,
}

/// A reply we use.
enum Reply {
    Ok,
    Nil,
    Bulk(Vec<u8>),
}

impl RedisCache {
    /// `url` as `redis://HOST:PORT` (the port defaults to 6379); `timeout` bounds each operation, `ttl` each
    /// entry's life. Nothing is connected until the first operation.
    pub fn new(url: &str, timeout: Duration, ttl: Duration) -> Result<Arc<Self>, CacheError> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| CacheError(format!("`{url}`: a Redis URL starts with redis://")))?;
        let host_port = rest.trim_end_matches('/');
        if host_port.is_empty() || host_port.contains(['/', '@', '?']) {
            return Err(CacheError(format!("`{url}`: expected redis://HOST:PORT (no database, user or options)")));
        }
        let addr = if host_port.contains(':') { host_port.to_string() } else { format!("{host_port}:6379") };
        Ok(Arc::new(Self {
            addr,
            timeout,
            ttl,
            conn: tokio::sync::Mutex::new((None, false)),
            down: AtomicBool::new(false),
            retry_at: std::sync::Mutex::new(Instant::now()),
            entries_written: AtomicU64::new(0),
        }))
    }

    /// Runs one command on the connection (opening it first if needed), within the timeout. Any failure drops
    /// the connection and marks Redis down.
    async fn command(&self, args: &[&[u8]]) -> Result<Reply, CacheError> {
        if self.down.load(Ordering::Relaxed)
            && Instant::now() < *self.retry_at.lock().unwrap_or_else(|e| e.into_inner())
        {
            return Err(CacheError(format!("redis at {} is down", self.addr)));
        }
        // The timeout covers waiting for the connection too: under load behind a slow Redis, requests give up
        // after `timeout` rather than queueing.
        let result = tokio::time::timeout(self.timeout, async {
            let mut guard = self.conn.lock().await;
            let (conn, cut) = &mut *guard;
            if std::mem::replace(cut, true) {
                *conn = None;
            }
            // A connection kept from before may be dead (Redis restarted): one more try on a fresh one.
            for attempt in 0..2 {
                let fresh = conn.is_none();
                if fresh {
                    *conn = Some(BufStream::new(TcpStream::connect(&self.addr).await?));
                }
                let c = conn.as_mut().expect("connected above");
                let reply = async {
                    c.write_all(&encode(args)).await?;
                    c.flush().await?;
                    read_reply(c).await
                }
                .await;
                match reply {
                    Err(_) if !fresh && attempt == 0 => *conn = None,
                    Err(e) => {
                        *conn = None;
                        *cut = false;
                        return Err(e);
                    }
                    ok => {
                        *cut = false;
                        return ok;
                    }
                }
            }
            unreachable!("the second attempt always returns")
        })
        .await;
        let result = match result {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(CacheError(format!("redis at {}: {e}", self.addr))),
            Err(_) => Err(CacheError(format!("redis at {}: no answer within {:?}", self.addr, self.timeout))),
        };
        match &result {
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(addr = %self.addr, "redis is back; the response cache is shared again");
                }
            }
            Err(e) => {
                *self.retry_at.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now() + RETRY_INTERVAL;
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "redis is unreachable; answering from the engine until it is back");
                }
            }
        }
        result
    }
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn read_reply(c: &mut BufStream<TcpStream>) -> std::io::Result<Reply> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut line = Vec::new();
    c.read_until(b'\n', &mut line).await?;
    if !line.ends_with(b"\r\n") {
        return Err(bad("connection closed mid-reply".into()));
    }
    let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    match line[0] {
        b'+' => Ok(Reply::Ok),
        b'-' => Err(bad(format!("error reply: {text}"))),
        b'$' => {
            let n: i64 = text.parse().map_err(|_| bad(format!("bad bulk length `{text}`")))?;
            if n < 0 {
                return Ok(Reply::Nil);
            }
            let n = n as usize;
            if n > MAX_VALUE_BYTES {
                return Err(bad(format!("a {n}-byte value")));
            }
            let mut buf = vec![0u8; n + 2];
            c.read_exact(&mut buf).await?;
            buf.truncate(n);
            Ok(Reply::Bulk(buf))
        }
        other => Err(bad(format!("unexpected reply type {:?}", other as char))),
    }
}

impl CacheBackend for RedisCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<[u8]>>, CacheError>> {
        Box::pin(async move {
            match self.command(&[b"GET", key.as_bytes()]).await? {
                Reply::Bulk(v) => Ok(Some(v.into())),
                Reply::Nil => Ok(None),
                Reply::Ok => Err(CacheError("GET answered a status".into())),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Arc<[u8]>) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let ms = self.ttl.as_millis().max(1).to_string();
            match self.command(&[b"SET", key.as_bytes(), &value, b"PX", ms.as_bytes()]).await? {
                Reply::Ok => {
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

    #[test]
    fn urls_and_commands() {
        let ms = Duration::from_millis(5);
        assert_eq!(RedisCache::new("redis://127.0.0.1:7000", ms, ms).unwrap().addr, "127.0.0.1:7000");
        assert_eq!(RedisCache::new("redis://cache.local/", ms, ms).unwrap().addr, "cache.local:6379");
        for bad in ["http://x:1", "redis://", "redis://u:p@h:1", "redis://h:1/2"] {
            assert!(RedisCache::new(bad, ms, ms).is_err(), "{bad}");
        }
        assert_eq!(encode(&[b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec());
    }

    /// Nothing listens: an operation fails within its timeout, and the next one fails at once (no new attempt
    /// within the retry interval).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_server_fails_fast() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let c =
            RedisCache::new(&format!("redis://127.0.0.1:{port}"), Duration::from_millis(200), Duration::from_secs(1))
                .unwrap();
        let t0 = Instant::now();
        assert!(c.get("k").await.is_err());
        assert!(c.put("k", b"v"[..].into()).await.is_err());
        assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());
        assert!(c.down.load(Ordering::Relaxed));
    }

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

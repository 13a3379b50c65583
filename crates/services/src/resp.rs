//! A small Redis client of our own: RESP2 commands over one TCP connection, every command bounded by a
//! timeout. When Redis is down or slow a command fails at once; the outage is logged once, and the
//! connection is tried again at most once a second until Redis is back. Used by the response cache and the
//! instance registry.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// Values larger than this are refused (a reply claiming more is a protocol error).
const MAX_VALUE_BYTES: usize = 64 << 20;
/// Arrays longer than this are refused.
const MAX_ARRAY_LEN: usize = 1 << 20;

/// Between connection attempts while Redis is down.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RedisError(pub String);

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Reply>),
}

#[derive(Debug)]
pub struct RespClient {
    addr: String,
    timeout: Duration,
    /// What this client is for, in log lines.
    purpose: &'static str,
    /// The connection, and whether a command on it was cut off by the timeout mid-way (then its next reply
    /// would be the old one: it is replaced).
    conn: tokio::sync::Mutex<(Option<BufStream<TcpStream>>, bool)>,
    down: AtomicBool,
    /// No connection attempt before this instant (while down).
    retry_at: Mutex<Instant>,
}

impl RespClient {
    /// `url` as `redis://HOST:PORT` (the port defaults to 6379); `timeout` bounds each command. Nothing is
    /// connected until the first command.
    pub fn new(url: &str, timeout: Duration, purpose: &'static str) -> Result<Self, RedisError> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| RedisError(format!("`{url}`: a Redis URL starts with redis://")))?;
        let host_port = rest.trim_end_matches('/');
        if host_port.is_empty() || host_port.contains(['/', '@', '?']) {
            return Err(RedisError(format!("`{url}`: expected redis://HOST:PORT (no database, user or options)")));
        }
        let addr = if host_port.contains(':') { host_port.to_string() } else { format!("{host_port}:6379") };
        Ok(Self {
            addr,
            timeout,
            purpose,
            conn: tokio::sync::Mutex::new((None, false)),
            down: AtomicBool::new(false),
            retry_at: Mutex::new(Instant::now()),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the last command failed.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Runs one command on the connection (opening it first if needed), within the timeout. Any failure drops
    /// the connection and marks Redis down; an error reply (`-ERR ...`) is an error too.
    pub async fn command(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        if self.is_down() && Instant::now() < *self.retry_at.lock().unwrap_or_else(|e| e.into_inner()) {
            return Err(RedisError(format!("redis at {} is down", self.addr)));
        }
        // The timeout covers waiting for the connection too: under load behind a slow Redis, callers give up
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
            Ok(Ok(Ok(reply))) => Ok(reply),
            // Redis answered, with an error: it is up.
            Ok(Ok(Err(message))) => {
                self.up();
                return Err(RedisError(format!("redis at {}: {message}", self.addr)));
            }
            Ok(Err(e)) => Err(RedisError(format!("redis at {}: {e}", self.addr))),
            Err(_) => Err(RedisError(format!("redis at {}: no answer within {:?}", self.addr, self.timeout))),
        };
        match &result {
            Ok(_) => self.up(),
            Err(e) => {
                *self.retry_at.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now() + RETRY_INTERVAL;
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, purpose = self.purpose, "redis is unreachable; going on without it");
                }
            }
        }
        result
    }

    fn up(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(addr = %self.addr, purpose = self.purpose, "redis is back");
        }
    }
}

/// A command as a RESP array of bulk strings.
pub(crate) fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

type ReplyFuture<'a> = Pin<Box<dyn Future<Output = std::io::Result<Result<Reply, String>>> + Send + 'a>>;

/// One reply: the outer error is the connection's (it is dropped), the inner one Redis's error reply.
fn read_reply<S: tokio::io::AsyncBufRead + Unpin + Send>(c: &mut S) -> ReplyFuture<'_> {
    Box::pin(async move {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let mut line = Vec::new();
        c.read_until(b'\n', &mut line).await?;
        if !line.ends_with(b"\r\n") || line.len() < 3 {
            return Err(bad("connection closed mid-reply".into()));
        }
        let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        let len = |max: usize| -> std::io::Result<Option<usize>> {
            let n: i64 = text.parse().map_err(|_| bad(format!("bad length `{text}`")))?;
            match n {
                n if n < 0 => Ok(None),
                n if n as u64 > max as u64 => Err(bad(format!("a reply of length {n}"))),
                n => Ok(Some(n as usize)),
            }
        };
        Ok(Ok(match line[0] {
            b'+' => Reply::Status(text.clone()),
            b'-' => return Ok(Err(text.clone())),
            b':' => Reply::Int(text.parse().map_err(|_| bad(format!("bad integer `{text}`")))?),
            b'$' => match len(MAX_VALUE_BYTES)? {
                None => Reply::Nil,
                Some(n) => {
                    let mut buf = vec![0u8; n + 2];
                    c.read_exact(&mut buf).await?;
                    buf.truncate(n);
                    Reply::Bulk(buf)
                }
            },
            b'*' => match len(MAX_ARRAY_LEN)? {
                None => Reply::Nil,
                Some(n) => {
                    let mut items = Vec::with_capacity(n.min(1024));
                    for _ in 0..n {
                        match read_reply(c).await? {
                            Ok(r) => items.push(r),
                            Err(e) => return Ok(Err(e)),
                        }
                    }
                    Reply::Array(items)
                }
            },
            other => return Err(bad(format!("unexpected reply type {:?}", other as char))),
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_commands() {
        let ms = Duration::from_millis(5);
        assert_eq!(RespClient::new("redis://127.0.0.1:7000", ms, "t").unwrap().addr(), "127.0.0.1:7000");
        assert_eq!(RespClient::new("redis://cache.local/", ms, "t").unwrap().addr(), "cache.local:6379");
        for bad in ["http://x:1", "redis://", "redis://u:p@h:1", "redis://h:1/2"] {
            assert!(RespClient::new(bad, ms, "t").is_err(), "{bad}");
        }
        assert_eq!(encode(&[b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec());
    }

    #[tokio::test]
    async fn replies_parse() {
        let parse = |bytes: &'static [u8]| async move {
            let mut r = tokio::io::BufReader::new(bytes);
            read_reply(&mut r).await
        };
        assert_eq!(parse(b"+OK\r\n").await.unwrap(), Ok(Reply::Status("OK".into())));
        assert_eq!(parse(b":42\r\n").await.unwrap(), Ok(Reply::Int(42)));
        assert_eq!(parse(b"$-1\r\n").await.unwrap(), Ok(Reply::Nil));
        assert_eq!(parse(b"$3\r\nabc\r\n").await.unwrap(), Ok(Reply::Bulk(b"abc".to_vec())));
        assert_eq!(parse(b"-ERR nope\r\n").await.unwrap(), Err("ERR nope".into()));
        assert_eq!(
            parse(b"*2\r\n$1\r\n0\r\n*2\r\n$1\r\na\r\n$-1\r\n").await.unwrap(),
            Ok(Reply::Array(vec![
                Reply::Bulk(b"0".to_vec()),
                Reply::Array(vec![Reply::Bulk(b"a".to_vec()), Reply::Nil])
            ]))
        );
        assert!(parse(b"$5\r\nab").await.is_err(), "cut off");
        assert!(parse(b"*99999999999\r\n").await.is_err(), "too long an array");
        assert!(parse(b"?\r\n").await.is_err());
    }

    /// Nothing listens: a command fails within its timeout, and the next one fails at once (no new attempt
    /// within the retry interval).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_server_fails_fast() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let c = RespClient::new(&format!("redis://127.0.0.1:{port}"), Duration::from_millis(200), "t").unwrap();
        let t0 = Instant::now();
        assert!(c.command(&[b"GET", b"k"]).await.is_err());
        assert!(c.command(&[b"GET", b"k"]).await.is_err());
        assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());
        assert!(c.is_down());
    }
}

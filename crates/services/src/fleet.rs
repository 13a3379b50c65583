//! The instance registry in Redis, shared by `serve --register` (which writes its own entry on a heartbeat)
//! and `router --redis-url` (which reads them all). One key per instance, `mlx-serving:instance:<url>`, whose
//! value is the instance's JSON record and whose expiry (three heartbeats) removes an instance that stopped
//! or died without saying so; a clean stop deletes the key at once.

use crate::resp::{RedisError, Reply, RespClient};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Every instance key starts with this.
pub const KEY_PREFIX: &str = "mlx-serving:instance:";

/// What an instance says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Where the router reaches it (`--advertise-url`).
    pub url: String,
    /// Model ids it serves.
    pub models: Vec<String>,
}

/// An instance's own entry.
#[derive(Debug)]
pub struct Registration {
    client: RespClient,
    key: String,
    ttl: Duration,
}

impl Registration {
    /// Registers `url` in the Redis at `redis_url`; each [`beat`](Self::beat) keeps the entry for `ttl`.
    pub fn new(redis_url: &str, url: &str, ttl: Duration) -> Result<Self, RedisError> {
        let client = RespClient::new(redis_url, Duration::from_secs(1), "instance registry")?;
        Ok(Self { client, key: format!("{KEY_PREFIX}{url}"), ttl })
    }

    /// Writes (or refreshes) the entry.
    pub async fn beat(&self, record: &InstanceRecord) -> Result<(), RedisError> {
        let value = serde_json::to_vec(record).map_err(|e| RedisError(e.to_string()))?;
        let ms = self.ttl.as_millis().max(1).to_string();
        match self.client.command(&[b"SET", self.key.as_bytes(), &value, b"PX", ms.as_bytes()]).await? {
            Reply::Status(_) => Ok(()),
            other => Err(RedisError(format!("SET answered {other:?}"))),
        }
    }

    /// Removes the entry (a clean stop).
    pub async fn leave(&self) -> Result<(), RedisError> {
        self.client.command(&[b"DEL", self.key.as_bytes()]).await.map(|_| ())
    }
}

/// Reads every registered instance.
#[derive(Debug)]
pub struct Directory {
    client: RespClient,
}

impl Directory {
    pub fn new(redis_url: &str, timeout: Duration) -> Result<Self, RedisError> {
        Ok(Self { client: RespClient::new(redis_url, timeout, "instance registry")? })
    }

    /// Every instance's record now (SCAN over the prefix, then MGET); entries that are not valid records are
    /// skipped.
    pub async fn list(&self) -> Result<Vec<InstanceRecord>, RedisError> {
        let pattern = format!("{KEY_PREFIX}*");
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut cursor = b"0".to_vec();
        // SCAN returns every key present throughout; bounded in case of a misbehaving server.
        for _ in 0..10_000 {
            let reply =
                self.client.command(&[b"SCAN", &cursor, b"MATCH", pattern.as_bytes(), b"COUNT", b"1000"]).await?;
            let Reply::Array(mut parts) = reply else { return Err(RedisError(format!("SCAN answered {reply:?}"))) };
            let (Some(Reply::Array(found)), Some(Reply::Bulk(next))) = (parts.pop(), parts.pop()) else {
                return Err(RedisError("SCAN answered something else than [cursor, keys]".into()));
            };
            keys.extend(found.into_iter().filter_map(|k| if let Reply::Bulk(k) = k { Some(k) } else { None }));
            if next == b"0" {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for chunk in keys.chunks(500) {
            let mut args: Vec<&[u8]> = vec![b"MGET"];
            args.extend(chunk.iter().map(|k| k.as_slice()));
            let Reply::Array(values) = self.client.command(&args).await? else {
                return Err(RedisError("MGET did not answer an array".into()));
            };
            out.extend(values.into_iter().filter_map(|v| match v {
                Reply::Bulk(b) => serde_json::from_slice::<InstanceRecord>(&b).ok(),
                _ => None,
            }));
        }
        Ok(out)
    }
}

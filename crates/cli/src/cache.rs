//! `cache:` in `runtime.yaml` and the `--response-cache`, `--cache-path`, `--redis-url` and `--no-coalescing`
//! flags of `serve` (#22): request coalescing (on by default: it never changes an answer) and the response
//! cache (off by default), built into the server's options.

use anyhow::{bail, Result};
use clap::Args;
use mlx_serving_services::{CacheBackend, CacheLimits, DiskCache, MemoryCache, RedisCache};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// `memory`, `disk` or `redis`; none (the default): no response cache.
    pub response_cache: Option<String>,
    /// The disk cache's directory.
    pub path: PathBuf,
    /// The Redis server of the `redis` cache, `redis://HOST:PORT`.
    pub redis_url: Option<String>,
    /// Bound on each Redis operation; past it the request is answered from the engine.
    pub redis_timeout_ms: f64,
    /// Bounds of the cache (for `redis`: the TTL only; Redis's own `maxmemory` policy bounds its size).
    pub max_entries: usize,
    pub max_mb: u64,
    pub ttl_seconds: f64,
    /// Identical deterministic requests in flight share one generation.
    pub coalescing: bool,
    /// Requests under different API keys may share generations and cached answers (off: a tenant never sees
    /// another's answers, nor learns of their prompts from timing).
    pub shared_across_keys: bool,
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            response_cache: None,
            path: PathBuf::from("cache"),
            redis_url: None,
            redis_timeout_ms: 50.0,
            max_entries: 10_000,
            max_mb: 256,
            ttl_seconds: 3600.0,
            coalescing: true,
            shared_across_keys: false,
        }
    }
}

impl CacheSection {
    pub fn validate(&self) -> Result<()> {
        match self.response_cache.as_deref() {
            None | Some("memory" | "disk") => {}
            Some("redis") if self.redis_url.is_none() => {
                bail!("cache.redis_url: the redis cache needs redis://HOST:PORT")
            }
            Some("redis") => {}
            Some(other) => bail!("cache.response_cache: must be `memory`, `disk` or `redis`, got `{other}`"),
        }
        if !(self.redis_timeout_ms.is_finite() && (1.0..=60_000.0).contains(&self.redis_timeout_ms)) {
            bail!("cache.redis_timeout_ms: must be between 1 and 60000, got {}", self.redis_timeout_ms);
        }
        if self.max_entries == 0 || self.max_mb == 0 {
            bail!("cache.max_entries and cache.max_mb: must be at least 1");
        }
        if !(self.ttl_seconds.is_finite() && self.ttl_seconds > 0.0 && self.ttl_seconds <= 1e9) {
            bail!("cache.ttl_seconds: must be a number of seconds between 0 and 1e9, got {}", self.ttl_seconds);
        }
        Ok(())
    }

    fn limits(&self) -> CacheLimits {
        CacheLimits {
            max_entries: self.max_entries,
            max_bytes: self.max_mb << 20,
            ttl: Duration::from_secs_f64(self.ttl_seconds),
        }
    }

    /// The response cache's backend, opened; `None` when the cache is off.
    pub fn backend(&self) -> Result<Option<Arc<dyn CacheBackend>>> {
        self.validate()?;
        Ok(match self.response_cache.as_deref() {
            Some("memory") => Some(Arc::new(MemoryCache::new(self.limits()))),
            Some("disk") => Some(Arc::new(
                DiskCache::open(&self.path, self.limits()).map_err(|e| anyhow::anyhow!("cache.path: {e}"))?,
            )),
            Some("redis") => {
                let url = self.redis_url.as_deref().unwrap_or_default();
                let timeout = Duration::from_secs_f64(self.redis_timeout_ms / 1e3);
                Some(
                    RedisCache::new(url, timeout, self.limits().ttl)
                        .map_err(|e| anyhow::anyhow!("cache.redis_url: {e}"))?,
                )
            }
            _ => None,
        })
    }
}

/// The cache flags of `serve`.
#[derive(Args, Clone, Debug, Default)]
pub struct CacheArgs {
    /// Keep finished deterministic answers and serve repeats from them: `memory`, `disk` or `redis`
    /// [cache.response_cache; default: off].
    #[arg(long, env = "MLX_SERVING_RESPONSE_CACHE")]
    pub response_cache: Option<String>,
    /// The disk cache's directory [cache.path; default ./cache].
    #[arg(long, env = "MLX_SERVING_CACHE_PATH")]
    pub cache_path: Option<PathBuf>,
    /// The Redis server of the redis cache [cache.redis_url].
    #[arg(long, env = "MLX_SERVING_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Run identical in-flight requests separately [cache.coalescing = false].
    #[arg(long, env = "MLX_SERVING_NO_COALESCING")]
    pub no_coalescing: bool,
}

impl CacheArgs {
    pub fn apply(&self, c: &mut CacheSection) {
        if self.response_cache.is_some() {
            c.response_cache = self.response_cache.clone();
        }
        if let Some(p) = &self.cache_path {
            c.path = p.clone();
        }
        if self.redis_url.is_some() {
            c.redis_url = self.redis_url.clone();
        }
        if self.no_coalescing {
            c.coalescing = false;
        }
    }
}

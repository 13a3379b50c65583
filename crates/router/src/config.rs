//! The router's settings (`router.yaml`; flags override it in the CLI).

use crate::experiments::{ExperimentConfig, FlagConfig};
use crate::slo::SloConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a request picks its instance among those that serve its model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyName {
    RoundRobin,
    /// Fewest requests in flight at the router.
    #[default]
    LeastOutstanding,
    /// In proportion to each instance's `weight` (smooth weighted round robin).
    Weighted,
    /// Session affinity: the request's `user` field (or the affinity header) hashed to an instance
    /// (rendezvous hashing: a user moves only when its instance leaves).
    ConsistentHash,
    /// To the instance most likely to hold the prompt's prefix in its KV cache, unless loads are uneven.
    CacheAware,
}

impl PolicyName {
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// One instance given in the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Its base URL, e.g. `http://10.0.0.5:8080`.
    pub url: String,
    /// Share of traffic under the `weighted` policy.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// `cache_aware`'s knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheAwareConfig {
    /// Prompt characters per block of the router's prefix index.
    pub block_chars: usize,
    /// Blocks remembered per instance (least recently routed forgotten first).
    pub max_blocks_per_instance: usize,
    /// Route by cache when at least this share of the prompt's blocks are on one instance; below, to the
    /// least loaded instance.
    pub match_threshold: f64,
    /// Loads count as uneven (then: least outstanding) when the busiest instance has more than this many
    /// requests in flight beyond the idlest...
    pub balance_abs_threshold: usize,
    /// ...and more than this many times the idlest's.
    pub balance_rel_threshold: f64,
}

impl Default for CacheAwareConfig {
    fn default() -> Self {
        Self {
            block_chars: 64,
            max_blocks_per_instance: 1 << 16,
            match_threshold: 0.5,
            balance_abs_threshold: 8,
            balance_rel_threshold: 1.5,
        }
    }
}

/// A circuit breaker per instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures (refused connections, 5xx) that open it.
    pub failures: u32,
    /// Open this long, then one trial request (half-open): success closes it, failure opens it again.
    pub cooldown_seconds: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failures: 3, cooldown_seconds: 5.0 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    pub host: String,
    pub port: u16,
    /// Instances known from the start (more register themselves in Redis).
    pub backends: Vec<BackendConfig>,
    /// The default policy.
    pub policy: PolicyName,
    /// Policies for particular models (by the request's `model`).
    pub model_policies: BTreeMap<String, PolicyName>,
    /// Instances registered by `serve --register` are read from here.
    pub redis_url: Option<String>,
    /// Each instance's `/health` and `/v1/models` are read this often.
    pub health_interval_seconds: f64,
    /// A connection to an instance not made in this time counts as refused.
    pub connect_timeout_seconds: f64,
    /// Other instances tried after a failure that reached no client byte (refused, 5xx, 429).
    pub max_retries: usize,
    pub breaker: BreakerConfig,
    pub cache_aware: CacheAwareConfig,
    /// A header whose value keys session affinity when the body has no `user`.
    pub affinity_header: String,
    pub max_body_bytes: usize,
    /// Most client connections served at once; more wait in the listen queue.
    pub max_connections: usize,
    /// A client connection must send a whole request head this long after it opens (or its last response).
    pub header_read_timeout_seconds: f64,
    /// Largest request head (request line and header fields), in bytes (larger: 431).
    pub max_header_bytes: usize,
    /// Most header fields in one request (more: 431).
    pub max_headers: usize,
    /// Canary rollouts and A/B tests, each over the requests for one model.
    pub experiments: Vec<ExperimentConfig>,
    /// Feature flags: on for a percentage of users.
    pub flags: Vec<FlagConfig>,
    /// Service-level objectives per model, with their remediations.
    pub slo: Vec<SloConfig>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8081,
            backends: Vec::new(),
            policy: PolicyName::default(),
            model_policies: BTreeMap::new(),
            redis_url: None,
            health_interval_seconds: 1.0,
            connect_timeout_seconds: 1.0,
            max_retries: 2,
            breaker: BreakerConfig::default(),
            cache_aware: CacheAwareConfig::default(),
            affinity_header: "x-session-id".into(),
            max_body_bytes: 8 << 20,
            max_connections: 1024,
            header_read_timeout_seconds: 10.0,
            max_header_bytes: 64 << 10,
            max_headers: mlx_serving_http::DEFAULT_MAX_HEADERS,
            experiments: Vec::new(),
            flags: Vec::new(),
            slo: Vec::new(),
        }
    }
}

impl RouterConfig {
    /// The client connections' limits.
    pub fn conn_limits(&self) -> mlx_serving_http::ConnLimits {
        mlx_serving_http::ConnLimits {
            max_connections: self.max_connections,
            header_read_timeout: std::time::Duration::from_secs_f64(self.header_read_timeout_seconds),
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
        }
    }

    /// The first problem with these settings, naming its key.
    pub fn validate(&self) -> Result<(), String> {
        for (i, b) in self.backends.iter().enumerate() {
            if !(b.url.starts_with("http://") || b.url.starts_with("https://")) {
                return Err(format!("backends[{i}].url: expected http://HOST:PORT, got `{}`", b.url));
            }
            if b.weight == 0 {
                return Err(format!("backends[{i}].weight: must be at least 1"));
            }
        }
        for (key, v, min) in [
            ("health_interval_seconds", self.health_interval_seconds, 0.05),
            ("connect_timeout_seconds", self.connect_timeout_seconds, 0.01),
            ("breaker.cooldown_seconds", self.breaker.cooldown_seconds, 0.01),
            ("header_read_timeout_seconds", self.header_read_timeout_seconds, 0.01),
        ] {
            if !(v.is_finite() && v >= min && v <= 1e6) {
                return Err(format!("{key}: must be a number of seconds from {min} to 1e6, got {v}"));
            }
        }
        if self.breaker.failures == 0 {
            return Err("breaker.failures: must be at least 1".into());
        }
        let c = &self.cache_aware;
        if c.block_chars == 0 || c.max_blocks_per_instance == 0 {
            return Err("cache_aware: block_chars and max_blocks_per_instance must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&c.match_threshold) {
            return Err(format!("cache_aware.match_threshold: must be from 0 to 1, got {}", c.match_threshold));
        }
        if !(c.balance_rel_threshold.is_finite() && c.balance_rel_threshold >= 1.0) {
            return Err("cache_aware.balance_rel_threshold: must be at least 1".into());
        }
        if let Some(u) = &self.redis_url {
            if !u.starts_with("redis://") {
                return Err(format!("redis_url: expected redis://HOST:PORT, got `{u}`"));
            }
        }
        if self.max_body_bytes == 0 {
            return Err("max_body_bytes: must be at least 1".into());
        }
        if self.max_connections == 0 || self.max_headers == 0 {
            return Err("max_connections and max_headers: must be at least 1".into());
        }
        if self.max_header_bytes < mlx_serving_http::MIN_HEADER_BYTES {
            return Err(format!(
                "max_header_bytes: must be at least {}, got {}",
                mlx_serving_http::MIN_HEADER_BYTES,
                self.max_header_bytes
            ));
        }
        for (i, e) in self.experiments.iter().enumerate() {
            e.validate()?;
            if self.experiments[..i].iter().any(|o| o.name == e.name || o.model == e.model) {
                return Err(format!("experiments[{}]: names and models are one experiment each", e.name));
            }
            for b in e.arms.iter().flat_map(|a| &a.backends) {
                if !(b.starts_with("http://") || b.starts_with("https://")) {
                    return Err(format!("experiments[{}]: backend `{b}` is not an http(s) URL", e.name));
                }
            }
        }
        for (i, o) in self.slo.iter().enumerate() {
            o.validate()?;
            if self.slo[..i].iter().any(|x| x.model == o.model) {
                return Err(format!("slo[{}]: one SLO per model", o.model));
            }
        }
        for (i, f) in self.flags.iter().enumerate() {
            if !(0.0..=100.0).contains(&f.percent) {
                return Err(format!("flags[{i}].percent: from 0 to 100, got {}", f.percent));
            }
            if self.flags[..i].iter().any(|o| o.name == f.name) {
                return Err(format!("flags[{i}].name: `{}` twice", f.name));
            }
            if let Some(target) = &f.arm {
                let found = target.split_once('/').is_some_and(|(exp, arm)| {
                    self.experiments.iter().any(|e| e.name == exp && e.arms.iter().any(|a| a.name == arm))
                });
                if !found {
                    return Err(format!("flags[{i}].arm: `{target}` is not EXPERIMENT/ARM of a configured experiment"));
                }
            }
        }
        Ok(())
    }
}

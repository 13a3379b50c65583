//! The operational layers between the HTTP front ends and the engines (DESIGN.md §2): the model registry,
//! which loads models on demand and unloads them by memory budget, model count and idle time (the server's
//! loader and endpoints are in `mlx_serving_server::models` and `admin`); request coalescing; and the
//! response cache's backends (#22); our Redis client ([`resp`]) and the fleet's instance registry in Redis
//! ([`fleet`]); per-key rate limits ([`ratelimit`]).

pub mod cache;
pub mod coalesce;
pub mod fleet;
pub mod ratelimit;
pub mod redis;
pub mod registry;
pub mod resp;

pub use cache::{CacheBackend, CacheError, CacheLimits, CacheStats, DiskCache, MemoryCache};
pub use coalesce::{Coalescer, Join, Publisher, Subscription};
pub use ratelimit::{RateLimiter, RateLimits, Refusal};
pub use redis::RedisCache;
pub use registry::{Counts, Lease, Limits, Loader, ModelInfo, ModelSpec, Registry, RegistryError, State, MAX_MODELS};

#[cfg(test)]
mod tests;

//! Per-key rate limits: requests and tokens per minute, each a token bucket per API key (or one for all
//! clients when the server has no keys). A bucket holds a minute's allowance and refills continuously.
//!
//! Requests: each takes one from its key's bucket; an empty bucket refuses (429) with the time until one is
//! back. Tokens: a generation request is charged, when admitted, its prompt tokens plus `max_tokens` for every
//! choice (OpenAI's rule: the budget is spent by what a request may use); a key whose balance is not positive
//! is refused until it refills. The balance may go negative, so a single request larger than a minute's
//! allowance still runs once and then waits out its debt instead of being refused forever.
//!
//! Buckets are bounded: past [`MAX_KEYS`], full ones (keys idle for a minute) are forgotten, which changes
//! nothing since a new bucket starts full.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys tracked at once (beyond: idle ones are dropped; if none is idle, the oldest entries go).
pub const MAX_KEYS: usize = 100_000;

/// The limits every key gets; `None`: no limit of that kind.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RateLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

impl RateLimits {
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }
}

/// Why a request was refused and when to come back.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub retry_after: Duration,
    pub message: String,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    requests: f64,
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    buckets: Mutex<HashMap<u64, Bucket>>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        Self { limits, buckets: Mutex::new(HashMap::new()) }
    }

    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    fn rpm(&self) -> f64 {
        self.limits.requests_per_minute.map_or(f64::INFINITY, f64::from)
    }

    fn tpm(&self) -> f64 {
        self.limits.tokens_per_minute.map_or(f64::INFINITY, |t| t as f64)
    }

    /// The key's bucket refilled up to `now`.
    fn bucket<'a>(&self, map: &'a mut HashMap<u64, Bucket>, key: u64, now: Instant) -> &'a mut Bucket {
        if map.len() >= MAX_KEYS && !map.contains_key(&key) {
            let (rpm, tpm) = (self.rpm(), self.tpm());
            map.retain(|_, b| {
                let dt = now.saturating_duration_since(b.last).as_secs_f64() / 60.0;
                refill(b.requests, dt, rpm) < rpm || refill(b.tokens, dt, tpm) < tpm
            });
            if map.len() >= MAX_KEYS {
                map.clear();
            }
        }
        let (rpm, tpm) = (self.rpm(), self.tpm());
        let b = map.entry(key).or_insert(Bucket { requests: rpm, tokens: tpm, last: now });
        let minutes = now.saturating_duration_since(b.last).as_secs_f64() / 60.0;
        b.requests = refill(b.requests, minutes, rpm);
        b.tokens = refill(b.tokens, minutes, tpm);
        b.last = b.last.max(now);
        b
    }

    /// Admits one request of `key` at `now` (taking one from its request bucket), or refuses it.
    pub fn admit(&self, key: u64, now: Instant) -> Result<(), Refusal> {
        if self.limits.is_unlimited() {
            return Ok(());
        }
        let (rpm, tpm) = (self.rpm(), self.tpm());
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = self.bucket(&mut map, key, now);
        if b.tokens <= 0.0 {
            let wait = (1.0 - b.tokens) / tpm * 60.0;
            let message = format!("rate limit reached: {} tokens per minute for this API key", tpm as u64);
            return Err(Refusal { retry_after: Duration::from_secs_f64(wait), message });
        }
        if b.requests < 1.0 {
            let wait = (1.0 - b.requests) / rpm * 60.0;
            let message = format!("rate limit reached: {} requests per minute for this API key", rpm as u64);
            return Err(Refusal { retry_after: Duration::from_secs_f64(wait), message });
        }
        b.requests -= 1.0;
        Ok(())
    }

    /// Charges `key` the tokens an admitted request may use.
    pub fn charge(&self, key: u64, tokens: u64, now: Instant) {
        if self.limits.tokens_per_minute.is_none() {
            return;
        }
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        self.bucket(&mut map, key, now).tokens -= tokens as f64;
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A balance `v` after `minutes` at `per_minute` (its cap); an unlimited one stays unlimited.
fn refill(v: f64, minutes: f64, per_minute: f64) -> f64 {
    if per_minute.is_infinite() {
        per_minute
    } else {
        (v + minutes * per_minute).min(per_minute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_refill_continuously_per_key() {
        let r = RateLimiter::new(RateLimits { requests_per_minute: Some(3), tokens_per_minute: None });
        let t = Instant::now();
        for _ in 0..3 {
            assert!(r.admit(1, t).is_ok());
        }
        let refused = r.admit(1, t).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(20), "one request back in a third of a minute");
        assert!(refused.message.contains("3 requests per minute"));
        assert!(r.admit(2, t).is_ok(), "another key has its own bucket");
        assert!(r.admit(1, t + Duration::from_secs(19)).is_err());
        assert!(r.admit(1, t + Duration::from_secs(20)).is_ok());
        assert!(r.admit(1, t + Duration::from_secs(20)).is_err());
        // A long idle time refills to the minute's allowance, no more.
        let later = t + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(r.admit(1, later).is_ok());
        }
        assert!(r.admit(1, later).is_err());
    }

    #[test]
    fn tokens_are_charged_and_a_debt_is_waited_out() {
        let r = RateLimiter::new(RateLimits { requests_per_minute: None, tokens_per_minute: Some(600) });
        let t = Instant::now();
        assert!(r.admit(7, t).is_ok());
        r.charge(7, 500, t);
        assert!(r.admit(7, t).is_ok(), "100 tokens left");
        // Larger than what is left (and than a minute's allowance): admitted, then a debt of 1000.
        r.charge(7, 1100, t);
        let refused = r.admit(7, t).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs_f64(1001.0 / 600.0 * 60.0));
        assert!(r.admit(7, t + Duration::from_secs(100)).is_err());
        assert!(r.admit(7, t + Duration::from_secs(101)).is_ok());
        assert!(r.admit(8, t).is_ok(), "other keys are not charged");
    }

    #[test]
    fn no_limits_tracks_nothing() {
        let r = RateLimiter::new(RateLimits::default());
        for _ in 0..1000 {
            assert!(r.admit(1, Instant::now()).is_ok());
            r.charge(1, 1 << 40, Instant::now());
        }
        assert_eq!(r.tracked(), 0);
    }
}

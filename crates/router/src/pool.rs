//! The instances behind the router: each with its health (from `/health` probes), the models it serves
//! (from its `/v1/models`), its requests in flight at the router, a circuit breaker and counters.

use crate::config::BreakerConfig;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Where an instance came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The configuration (stays until the router stops).
    Static,
    /// The Redis registry (leaves when its entry expires).
    Registered,
}

/// A circuit breaker: closed (counting consecutive failures), open until a time, then half-open (one trial).
#[derive(Debug)]
pub enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial: bool },
}

impl Breaker {
    pub fn state_name(&self) -> &'static str {
        match self {
            Self::Closed { .. } => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen { .. } => "half_open",
        }
    }

    /// Whether a request may go now (taking the half-open trial if that is what it is).
    fn admit(&mut self, now: Instant) -> bool {
        match *self {
            Self::Closed { .. } => true,
            Self::Open { until } if now >= until => {
                *self = Self::HalfOpen { trial: true };
                true
            }
            Self::Open { .. } => false,
            Self::HalfOpen { trial: true } => false,
            Self::HalfOpen { trial: false } => {
                *self = Self::HalfOpen { trial: true };
                true
            }
        }
    }

    /// Whether a request could go now, without taking anything.
    fn would_admit(&self, now: Instant) -> bool {
        match *self {
            Self::Closed { .. } | Self::HalfOpen { trial: false } => true,
            Self::Open { until } => now >= until,
            Self::HalfOpen { trial: true } => false,
        }
    }

    fn record(&mut self, ok: bool, cfg: &BreakerConfig, now: Instant) {
        let open = || Self::Open { until: now + Duration::from_secs_f64(cfg.cooldown_seconds) };
        *self = match (&*self, ok) {
            (_, true) => Self::Closed { failures: 0 },
            (Self::Closed { failures }, false) if failures + 1 < cfg.failures => {
                Self::Closed { failures: failures + 1 }
            }
            (Self::Open { until }, false) => Self::Open { until: *until },
            _ => open(),
        };
    }
}

/// Counters of one instance, for `/metrics`.
#[derive(Debug, Default)]
pub struct InstanceStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub retries_from: AtomicU64,
    /// 429s it answered.
    pub busy: AtomicU64,
    /// Sum and count of times to the first byte of the response (headers; for streams the first chunk), µs.
    pub ttfb_us_sum: AtomicU64,
    pub ttfb_count: AtomicU64,
}

#[derive(Debug)]
pub struct Instance {
    /// Base URL without a trailing slash.
    pub url: String,
    pub weight: u32,
    pub source: Source,
    /// Model ids it serves (empty until its first `/v1/models` answer).
    pub models: RwLock<Vec<String>>,
    /// The last probe's verdict (new instances count as healthy until probed).
    pub healthy: AtomicBool,
    /// An SLO finds it slower than its peers: it gets a tenth of its share.
    pub degraded: AtomicBool,
    pub outstanding: AtomicUsize,
    /// Requests running and waiting on the instance at its last probe (from every client, not only us).
    pub load: AtomicUsize,
    pub breaker: Mutex<Breaker>,
    pub stats: InstanceStats,
    /// Registered instances: when their registry entry was last seen.
    pub seen: Mutex<Instant>,
}

impl Instance {
    pub fn new(url: &str, weight: u32, source: Source) -> Arc<Self> {
        Arc::new(Self {
            url: url.trim_end_matches('/').to_string(),
            weight: weight.max(1),
            source,
            models: RwLock::new(Vec::new()),
            healthy: AtomicBool::new(true),
            degraded: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            load: AtomicUsize::new(0),
            breaker: Mutex::new(Breaker::Closed { failures: 0 }),
            stats: InstanceStats::default(),
            seen: Mutex::new(Instant::now()),
        })
    }

    pub fn serves(&self, model: Option<&str>) -> bool {
        let models = self.models.read().unwrap();
        match model {
            // Not yet known: it may serve it (its answer says otherwise).
            _ if models.is_empty() => true,
            Some(m) => models.iter().any(|x| x == m),
            None => true,
        }
    }

    /// Healthy and its breaker would let a request through now.
    pub fn available(&self, now: Instant) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.breaker.lock().unwrap().would_admit(now)
    }

    /// Takes the breaker's permission for one request (false: it is open, or its half-open trial is taken).
    pub fn admit(&self, now: Instant) -> bool {
        self.breaker.lock().unwrap().admit(now)
    }

    pub fn record(&self, ok: bool, cfg: &BreakerConfig) {
        self.breaker.lock().unwrap().record(ok, cfg, Instant::now());
        if !ok {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A 429: the instance is up but full (its breaker counts that as a sign of life, not a failure).
    pub fn record_busy(&self) {
        self.breaker.lock().unwrap().record(true, &BreakerConfig::default(), Instant::now());
        self.stats.busy.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One request in flight on an instance.
#[derive(Debug)]
pub struct InFlight(pub Arc<Instance>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// All instances.
#[derive(Debug, Default)]
pub struct Pool {
    instances: RwLock<Vec<Arc<Instance>>>,
}

impl Pool {
    pub fn all(&self) -> Vec<Arc<Instance>> {
        self.instances.read().unwrap().clone()
    }

    /// Adds an instance (a URL already present is kept, and for a registered one marked as seen).
    pub fn add(&self, url: &str, weight: u32, source: Source) -> Arc<Instance> {
        let url = url.trim_end_matches('/');
        let mut list = self.instances.write().unwrap();
        if let Some(i) = list.iter().find(|i| i.url == url) {
            *i.seen.lock().unwrap() = Instant::now();
            return i.clone();
        }
        let i = Instance::new(url, weight, source);
        list.push(i.clone());
        i
    }

    /// Removes registered instances not seen since `before`; returns their URLs.
    pub fn expire(&self, before: Instant) -> Vec<String> {
        let mut gone = Vec::new();
        self.instances.write().unwrap().retain(|i| {
            let keep = i.source == Source::Static || *i.seen.lock().unwrap() >= before;
            if !keep {
                gone.push(i.url.clone());
            }
            keep
        });
        gone
    }

    /// The instances a request for `model` may go to now, in pool order, without those in `skip`.
    pub fn candidates(&self, model: Option<&str>, skip: &[String]) -> Vec<Arc<Instance>> {
        let now = Instant::now();
        self.all().into_iter().filter(|i| !skip.contains(&i.url) && i.serves(model) && i.available(now)).collect()
    }

    /// Whether any instance (healthy or not) says it serves `model`, or none has said anything yet.
    pub fn knows(&self, model: &str) -> bool {
        let all = self.all();
        all.iter().all(|i| i.models.read().unwrap().is_empty()) || all.iter().any(|i| i.serves(Some(model)))
    }
}

/// Reads every instance's `/health` and `/v1/models` once.
pub async fn probe_all(pool: &Pool, client: &reqwest::Client, timeout: Duration) {
    let all = pool.all();
    let probes = all.iter().map(|i| probe(i, client, timeout));
    futures_util::future::join_all(probes).await;
}

async fn probe(i: &Instance, client: &reqwest::Client, timeout: Duration) {
    let ok = match client.get(format!("{}/health", i.url)).timeout(timeout).send().await {
        Ok(r) if r.status().is_success() => {
            // The instance's own load (all its clients, not only this router's): requests running and waiting.
            if let Ok(v) = r.bytes().await.map(|b| serde_json::from_slice::<serde_json::Value>(&b)) {
                let n = |k: &str| v.as_ref().ok().and_then(|v| v.get(k)?.as_u64()).unwrap_or(0);
                i.load.store((n("running") + n("waiting")) as usize, Ordering::Relaxed);
            }
            true
        }
        _ => false,
    };
    let was = i.healthy.swap(ok, Ordering::Relaxed);
    if was != ok {
        tracing::info!(instance = %i.url, healthy = ok, "instance health changed");
    }
    if !ok {
        return;
    }
    let models = async {
        let r = client.get(format!("{}/v1/models", i.url)).timeout(timeout).send().await.ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
        let ids = v.get("data")?.as_array()?.iter().filter_map(|m| m.get("id")?.as_str().map(String::from));
        Some(ids.collect::<Vec<_>>())
    };
    if let Some(m) = models.await {
        *i.models.write().unwrap() = m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let cfg = BreakerConfig { failures: 2, cooldown_seconds: 0.05 };
        let i = Instance::new("http://a", 1, Source::Static);
        let now = Instant::now();
        assert!(i.admit(now));
        i.record(false, &cfg);
        assert!(i.available(Instant::now()), "one failure of two: still closed");
        i.record(false, &cfg);
        assert!(!i.available(Instant::now()), "open after two");
        assert!(!i.admit(Instant::now()));
        std::thread::sleep(Duration::from_millis(60));
        let later = Instant::now();
        assert!(i.available(later));
        assert!(i.admit(later), "half-open: one trial");
        assert!(!i.admit(later), "only one trial at a time");
        assert_eq!(i.breaker.lock().unwrap().state_name(), "half_open");
        i.record(false, &cfg);
        assert!(!i.available(Instant::now()), "a failed trial opens it again");
        std::thread::sleep(Duration::from_millis(60));
        assert!(i.admit(Instant::now()));
        i.record(true, &cfg);
        assert_eq!(i.breaker.lock().unwrap().state_name(), "closed");
        assert!(i.admit(Instant::now()) && i.admit(Instant::now()), "closed: no limit");
    }

    #[test]
    fn pool_candidates_expiry_and_models() {
        let p = Pool::default();
        let a = p.add("http://a/", 1, Source::Static);
        let b = p.add("http://b", 1, Source::Registered);
        assert!(Arc::ptr_eq(&a, &p.add("http://a", 3, Source::Static)), "the same URL is one instance");
        *a.models.write().unwrap() = vec!["m1".into()];
        *b.models.write().unwrap() = vec!["m2".into()];
        let urls = |v: Vec<Arc<Instance>>| v.iter().map(|i| i.url.clone()).collect::<Vec<_>>();
        assert_eq!(urls(p.candidates(Some("m1"), &[])), ["http://a"]);
        assert_eq!(urls(p.candidates(None, &[])), ["http://a", "http://b"]);
        assert_eq!(urls(p.candidates(None, &["http://a".into()])), ["http://b"]);
        assert!(p.knows("m2") && !p.knows("m3"));
        b.healthy.store(false, Ordering::Relaxed);
        assert!(p.candidates(Some("m2"), &[]).is_empty(), "unhealthy instances are not candidates");
        {
            let _g = a.start();
            assert_eq!(a.outstanding.load(Ordering::Relaxed), 1);
        }
        assert_eq!(a.outstanding.load(Ordering::Relaxed), 0);
        let cut = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(p.expire(cut), ["http://b"], "a registered instance not seen since leaves; a static one stays");
        assert_eq!(urls(p.all()), ["http://a"]);
    }
}

//! `mlx-serving router`: one OpenAI-compatible API in front of many `mlx-serving serve` instances.
//!
//! Owns the instance pool (static from the configuration, probed for health and models), the routing
//! policies (round robin, least outstanding, weighted, consistent hashing, cache-aware), retries with a
//! circuit breaker per instance, and the router's own `/health`, `/metrics` and `/admin/instances`.
//! Requests are forwarded as bytes: the router reads only what routing needs (model, user, prompt text).
//! Must not know about: engines, models' tensors, tokenizers.

pub mod config;
pub mod experiments;
pub mod policy;
pub mod pool;
pub mod proxy;
pub mod slo;
pub mod stats;

pub use config::{BackendConfig, PolicyName, RouterConfig};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use experiments::Experiment;
use mlx_serving_services::fleet::Directory;
use policy::{Policies, Reason};
use pool::{Pool, Source};
use serde_json::{json, Value};
use slo::SloMonitor;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The router's own counters.
#[derive(Debug, Default)]
pub struct RouterMetrics {
    pub retries: AtomicU64,
    pub no_instance: AtomicU64,
    pub broken_streams: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub balanced: AtomicU64,
    /// Requests without a user so far (each its own user for experiments and flags).
    pub anonymous: AtomicU64,
    /// Turns of the one-in-ten that degraded instances still get.
    pub degraded_turn: AtomicU64,
}

impl RouterMetrics {
    fn count_reason(&self, r: Reason) {
        let c = match r {
            Reason::Policy => return,
            Reason::CacheHit => &self.cache_hits,
            Reason::CacheMiss => &self.cache_misses,
            Reason::Balance => &self.balanced,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the router's handlers share.
#[derive(Debug)]
pub struct Router {
    pub cfg: RouterConfig,
    pub pool: Pool,
    pub policies: Policies,
    pub metrics: RouterMetrics,
    pub experiments: Vec<Experiment>,
    pub slos: Vec<SloMonitor>,
    client: reqwest::Client,
    /// Instances registered by `serve --register`, when `redis_url` is set.
    directory: Option<Directory>,
    /// Whether the last registry read failed (logged once per outage).
    registry_down: AtomicBool,
    started: std::time::SystemTime,
}

impl Router {
    pub fn new(cfg: RouterConfig) -> Result<Arc<Self>, String> {
        cfg.validate()?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs_f64(cfg.connect_timeout_seconds))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("no HTTP client: {e}"))?;
        let pool = Pool::default();
        for b in &cfg.backends {
            pool.add(&b.url, b.weight, Source::Static);
        }
        let experiments: Vec<Experiment> = cfg.experiments.iter().cloned().map(Experiment::new).collect();
        for url in experiments.iter().flat_map(|e| e.arms.iter().flat_map(|a| &a.backends)) {
            pool.add(url, 1, Source::Static);
        }
        let directory = match &cfg.redis_url {
            Some(u) => Some(Directory::new(u, Duration::from_secs(1)).map_err(|e| format!("redis_url: {e}"))?),
            None => None,
        };
        let slos = cfg.slo.iter().cloned().map(SloMonitor::new).collect();
        Ok(Arc::new(Self {
            cfg,
            pool,
            policies: Policies::default(),
            metrics: RouterMetrics::default(),
            experiments,
            slos,
            client,
            directory,
            registry_down: AtomicBool::new(false),
            started: std::time::SystemTime::now(),
        }))
    }

    /// Reads the registry (registered instances join; those whose entries are gone leave), probes every
    /// instance once (health and models) and forgets departed ones in the prefix index. While Redis is
    /// unreachable the registered instances stay as they were.
    pub async fn probe(&self) {
        if let Some(dir) = &self.directory {
            let t = Instant::now();
            match dir.list().await {
                Ok(records) => {
                    for rec in records {
                        let i = self.pool.add(&rec.url, 1, Source::Registered);
                        let mut models = i.models.write().unwrap();
                        if models.is_empty() {
                            *models = rec.models;
                        }
                    }
                    for url in self.pool.expire(t) {
                        tracing::info!(instance = %url, "instance left the registry");
                    }
                    if self.registry_down.swap(false, Ordering::Relaxed) {
                        tracing::info!("the instance registry is readable again");
                    }
                }
                Err(e) => {
                    if !self.registry_down.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "cannot read the instance registry; keeping the instances known");
                    }
                }
            }
        }
        let timeout = Duration::from_secs_f64(self.cfg.health_interval_seconds.max(0.5));
        pool::probe_all(&self.pool, &self.client, timeout).await;
        let urls: Vec<String> = self.pool.all().iter().map(|i| i.url.clone()).collect();
        self.policies.retain(&urls);
    }
}

impl Router {
    /// Re-judges every SLO: marks the instances to degrade, and alerts on each change of verdict.
    pub fn check_slos(&self) {
        let mut degraded: Vec<String> = Vec::new();
        for s in &self.slos {
            if let Some(c) = s.evaluate(Instant::now()) {
                if s.cfg.remediation.contains(&slo::Remedy::Alert) {
                    match c.ok {
                        true => tracing::info!(model = %c.model, "SLO met again: {}", c.body),
                        false => tracing::warn!(model = %c.model, "SLO violated: {}", c.body),
                    }
                    if let Some(url) = s.cfg.webhook_url.clone() {
                        let req = self
                            .client
                            .post(url)
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(c.body.to_string())
                            .timeout(Duration::from_secs(2));
                        tokio::spawn(async move {
                            if let Err(e) = req.send().await {
                                tracing::warn!(error = %e.without_url(), "SLO webhook failed");
                            }
                        });
                    }
                }
            }
            degraded.extend(s.degraded());
        }
        for i in self.pool.all() {
            i.degraded.store(degraded.contains(&i.url), Ordering::Relaxed);
        }
    }
}

/// The router's HTTP app.
pub fn app(r: Arc<Router>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/admin/instances", get(instances))
        .route("/admin/experiments", get(experiments_list))
        .route("/admin/experiments/{name}", get(experiment_one))
        .route("/admin/slo", get(slo_report))
        .fallback(proxy::forward)
        .with_state(r)
}

/// Serves the router on `listener` until `shutdown` resolves, probing instances in the background.
pub async fn run(
    r: Arc<Router>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let prober = r.clone();
    let probes = tokio::spawn(async move {
        let every = Duration::from_secs_f64(prober.cfg.health_interval_seconds);
        loop {
            prober.probe().await;
            for e in &prober.experiments {
                e.evaluate(Instant::now());
            }
            prober.check_slos();
            tokio::time::sleep(every).await;
        }
    });
    let limits = r.cfg.conn_limits();
    let out = mlx_serving_http::serve(listener, app(r), &limits, shutdown).await;
    probes.abort();
    out
}

async fn health(State(r): State<Arc<Router>>) -> Response {
    let now = Instant::now();
    let all = r.pool.all();
    let up = all.iter().filter(|i| i.available(now)).count();
    let status = if up > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        status,
        Json(json!({"status": if up > 0 { "ok" } else { "no_instances" }, "instances": all.len(), "available": up})),
    )
        .into_response()
}

/// The models of every healthy instance, each once, with how many instances serve it.
async fn models(State(r): State<Arc<Router>>) -> Response {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for i in r.pool.all().iter().filter(|i| i.healthy.load(Ordering::Relaxed)) {
        for m in i.models.read().unwrap().iter() {
            match seen.iter_mut().find(|(id, _)| id == m) {
                Some((_, n)) => *n += 1,
                None => seen.push((m.clone(), 1)),
            }
        }
    }
    let created = r.started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let data: Vec<Value> = seen
        .into_iter()
        .map(|(id, n)| json!({"id": id, "object": "model", "created": created, "owned_by": "mlx-serving", "instances": n}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn instances(State(r): State<Arc<Router>>) -> Response {
    let list: Vec<Value> = r
        .pool
        .all()
        .iter()
        .map(|i| {
            let s = &i.stats;
            json!({
                "url": i.url,
                "source": match i.source { Source::Static => "static", Source::Registered => "registered" },
                "weight": i.weight,
                "healthy": i.healthy.load(Ordering::Relaxed),
                "breaker": i.breaker.lock().unwrap().state_name(),
                "models": *i.models.read().unwrap(),
                "outstanding": i.outstanding.load(Ordering::Relaxed),
                "load": i.load.load(Ordering::Relaxed),
                "requests": s.requests.load(Ordering::Relaxed),
                "errors": s.errors.load(Ordering::Relaxed),
                "busy": s.busy.load(Ordering::Relaxed),
                "prefix_blocks": r.policies.index.lock().unwrap().blocks(&i.url),
            })
        })
        .collect();
    Json(json!({"instances": list})).into_response()
}

async fn slo_report(State(r): State<Arc<Router>>) -> Response {
    Json(json!({"slo": r.slos.iter().map(SloMonitor::report).collect::<Vec<_>>()})).into_response()
}

async fn experiments_list(State(r): State<Arc<Router>>) -> Response {
    Json(json!({"experiments": r.experiments.iter().map(Experiment::report).collect::<Vec<_>>()})).into_response()
}

async fn experiment_one(State(r): State<Arc<Router>>, Path(name): Path<String>) -> Response {
    match r.experiments.iter().find(|e| e.cfg.name == name) {
        Some(e) => Json(e.report()).into_response(),
        None => proxy::error(StatusCode::NOT_FOUND, &format!("no experiment `{name}`"), "not_found"),
    }
}

async fn metrics(State(r): State<Arc<Router>>) -> Response {
    let mut out = String::new();
    let m = &r.metrics;
    for (name, help, v) in [
        ("router_retries_total", "Requests sent again to another instance", &m.retries),
        ("router_no_instance_total", "Requests answered 503: no instance available", &m.no_instance),
        ("router_broken_streams_total", "Answers cut off by an instance failing mid-way", &m.broken_streams),
        ("router_cache_aware_hits_total", "cache_aware: routed to the instance holding the prefix", &m.cache_hits),
        ("router_cache_aware_misses_total", "cache_aware: no instance held enough of the prefix", &m.cache_misses),
        ("router_cache_aware_balanced_total", "cache_aware: loads uneven, routed to the least loaded", &m.balanced),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
    }
    let all = r.pool.all();
    type Field = fn(&pool::Instance) -> f64;
    let per: [(&str, &str, &str, Field); 11] = [
        ("router_instance_degraded", "gauge", "1 while an SLO gives the instance a tenth of its share", |i| {
            i.degraded.load(Ordering::Relaxed) as u8 as f64
        }),
        ("router_instance_up", "gauge", "1 if the last health probe passed", |i| {
            i.healthy.load(Ordering::Relaxed) as u8 as f64
        }),
        ("router_instance_breaker_open", "gauge", "1 if the circuit breaker is open or half-open", |i| {
            (i.breaker.lock().unwrap().state_name() != "closed") as u8 as f64
        }),
        ("router_instance_outstanding", "gauge", "Requests in flight through the router", |i| {
            i.outstanding.load(Ordering::Relaxed) as f64
        }),
        ("router_instance_load", "gauge", "Requests running and waiting on the instance (its last /health)", |i| {
            i.load.load(Ordering::Relaxed) as f64
        }),
        ("router_instance_requests_total", "counter", "Requests sent", |i| {
            i.stats.requests.load(Ordering::Relaxed) as f64
        }),
        ("router_instance_errors_total", "counter", "Refused connections, 5xx and broken answers", |i| {
            i.stats.errors.load(Ordering::Relaxed) as f64
        }),
        ("router_instance_busy_total", "counter", "429 answers", |i| i.stats.busy.load(Ordering::Relaxed) as f64),
        (
            "router_instance_retries_total",
            "counter",
            "Requests that failed here and were sent to another instance",
            |i| i.stats.retries_from.load(Ordering::Relaxed) as f64,
        ),
        ("router_instance_first_byte_seconds_sum", "counter", "Time to the answer's first chunk, summed", |i| {
            i.stats.ttfb_us_sum.load(Ordering::Relaxed) as f64 / 1e6
        }),
        ("router_instance_first_byte_seconds_count", "counter", "Answers timed", |i| {
            i.stats.ttfb_count.load(Ordering::Relaxed) as f64
        }),
    ];
    for (name, kind, help, f) in per {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for i in &all {
            let _ = writeln!(out, "{name}{{instance=\"{}\"}} {}", i.url, f(i));
        }
    }
    let _ = writeln!(out, "# HELP router_slo_ok 1 while the model's SLO holds\n# TYPE router_slo_ok gauge");
    for s in &r.slos {
        let _ = writeln!(out, "router_slo_ok{{model=\"{}\"}} {}", s.cfg.model, s.ok() as u8);
    }
    let _ = writeln!(out, "# HELP router_slo_violations_total Times the SLO went from met to missed\n# TYPE router_slo_violations_total counter");
    for s in &r.slos {
        let _ = writeln!(
            out,
            "router_slo_violations_total{{model=\"{}\"}} {}",
            s.cfg.model,
            s.violations.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP router_slo_shed_total Low-priority requests refused while the SLO was missed\n# TYPE router_slo_shed_total counter");
    for s in &r.slos {
        let _ = writeln!(out, "router_slo_shed_total{{model=\"{}\"}} {}", s.cfg.model, s.shed.load(Ordering::Relaxed));
    }
    let _ = writeln!(out, "# HELP router_experiment_canary_share Percent of the experiment's traffic on the canary");
    let _ = writeln!(out, "# TYPE router_experiment_canary_share gauge");
    for e in r.experiments.iter().filter(|e| e.cfg.kind == experiments::ExperimentKind::Canary) {
        let _ = writeln!(out, "router_experiment_canary_share{{experiment=\"{}\"}} {}", e.cfg.name, e.canary_share());
    }
    // Latency per arm over the current stage's samples, as a summary's quantiles.
    for (name, field) in [("router_arm_ttft_seconds", "ttft_seconds"), ("router_arm_itl_seconds", "itl_seconds")] {
        let _ = writeln!(out, "# HELP {name} Each experiment arm's {field} this stage\n# TYPE {name} summary");
        for e in &r.experiments {
            let report = e.report();
            for a in report["arms"].as_array().into_iter().flatten() {
                let arm = a["name"].as_str().unwrap_or("");
                for (q, key) in [("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")] {
                    let v = a[field][key].as_f64().unwrap_or(0.0);
                    let _ = writeln!(out, "{name}{{experiment=\"{}\",arm=\"{arm}\",quantile=\"{q}\"}} {v}", e.cfg.name);
                }
                let n = a[field]["n"].as_u64().unwrap_or(0);
                let _ = writeln!(out, "{name}_count{{experiment=\"{}\",arm=\"{arm}\"}} {n}", e.cfg.name);
            }
        }
    }
    for (name, field) in [("router_arm_requests_total", "requests"), ("router_arm_errors_total", "errors")] {
        let _ =
            writeln!(out, "# HELP {name} Requests answered by each experiment arm ({field})\n# TYPE {name} counter");
        for e in &r.experiments {
            let report = e.report();
            for a in report["arms"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{name}{{experiment=\"{}\",arm=\"{}\"}} {}",
                    e.cfg.name,
                    a["name"].as_str().unwrap_or(""),
                    a[field]
                );
            }
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

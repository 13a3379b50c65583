//! `mlx-serving bench`: drives any OpenAI-compatible server over HTTP and reports what serving users care
//! about: time to first token, inter-token latency, time per output token, end-to-end latency, throughput
//! and errors by kind.
//!
//! With several endpoints, they are driven in turn (A, B, A, B, ... one round each) so that drift on a noisy
//! machine hits all alike, and the report gives each endpoint's ratio to the first, per round and pooled.
//! Knows nothing about the engine: it only speaks HTTP.

pub mod client;
pub mod dataset;
pub mod stats;

use anyhow::{bail, Context, Result};
use client::{stream_request, Outcome};
use dataset::{Item, SplitMix};
use serde::Serialize;
use serde_json::{json, Value};
use stats::{Dist, EndpointLevel, Ratio};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How requests are offered to the server.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// A closed loop: this many requests in flight at all times.
    Concurrency(usize),
    /// An open loop: Poisson arrivals at this many requests per second (optionally capped in flight).
    RequestRate { rate: f64, max_concurrency: Option<usize> },
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Concurrency(c) => write!(f, "concurrency {c}"),
            Load::RequestRate { rate, max_concurrency: None } => write!(f, "{rate} req/s"),
            Load::RequestRate { rate, max_concurrency: Some(c) } => write!(f, "{rate} req/s (≤ {c} in flight)"),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetSpec {
    Builtin,
    File(PathBuf),
    /// Prompts over this many shared documents of `input_len` tokens (default 512): see
    /// [`dataset::shared_prefix`].
    SharedPrefix(usize),
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchConfig {
    pub urls: Vec<String>,
    pub model: Option<String>,
    pub dataset: DatasetSpec,
    pub num_prompts: usize,
    /// Fraction of the requests (after the first) that repeat an earlier request's prompt exactly, the rest
    /// being the dataset's prompts in order: a workload for caches and request coalescing.
    pub duplicate_ratio: f64,
    /// One run per entry (a sweep when there are several).
    pub loads: Vec<Load>,
    pub max_tokens: usize,
    /// Synthetic prompts of about this many tokens instead of the dataset.
    pub input_len: Option<usize>,
    /// `/v1/chat/completions` (true) or `/v1/completions`.
    pub chat: bool,
    pub ignore_eos: bool,
    pub temperature: f64,
    /// Requests sent to each endpoint before measuring, not counted.
    pub warmup: usize,
    pub seed: u64,
    /// Each endpoint runs each load this many times, interleaved with the other endpoints.
    pub rounds: usize,
    #[serde(with = "secs")]
    pub timeout: Duration,
    #[serde(skip)]
    pub progress: bool,
    /// Fields added to every request body of the constrained endpoints (e.g. a `response_format`).
    pub constraint: Option<Value>,
    /// With `constraint`: measure each URL twice, plain and constrained (side by side, rounds interleaved);
    /// without it every endpoint is constrained.
    pub constraint_ab: bool,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// An endpoint as resolved at start.
#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    pub url: String,
    pub model: String,
    #[serde(skip)]
    request_url: String,
    /// Fields added to each request body (`BenchConfig::constraint`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LevelReport {
    pub load: Load,
    pub endpoints: Vec<EndpointLevel>,
    /// Each endpoint after the first against the first.
    pub ratios: Vec<Ratio>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub tool: String,
    pub started_unix: u64,
    pub config: BenchConfig,
    pub endpoints: Vec<Endpoint>,
    pub levels: Vec<LevelReport>,
}

/// `http://host:port`, `http://host:port/`, or `http://host:port/v1` → the server root.
fn base_url(url: &str) -> Result<String> {
    if !url.starts_with("http://") && !url.starts_with("https://") {
        bail!("--url {url}: expected http://host:port");
    }
    let u = url.trim_end_matches('/');
    Ok(u.strip_suffix("/v1").unwrap_or(u).to_string())
}

async fn resolve_endpoint(client: &reqwest::Client, url: &str, model: Option<&str>, chat: bool) -> Result<Endpoint> {
    let base = base_url(url)?;
    let model = match model {
        Some(m) => m.to_string(),
        None => {
            let resp = client
                .get(format!("{base}/v1/models"))
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .with_context(|| format!("{base}: GET /v1/models (pass --model to skip)"))?;
            if !resp.status().is_success() {
                bail!("{base}: GET /v1/models answered {} (pass --model to skip)", resp.status());
            }
            let v: Value = serde_json::from_slice(&resp.bytes().await?)
                .with_context(|| format!("{base}: /v1/models is not JSON"))?;
            v["data"][0]["id"]
                .as_str()
                .with_context(|| format!("{base}: /v1/models lists no model; pass --model"))?
                .to_string()
        }
    };
    let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
    Ok(Endpoint { request_url: format!("{base}{path}"), url: base, model, extra: None })
}

/// The body of request `index`: with several comma-separated model names, requests go to them in turn.
fn request_body(cfg: &BenchConfig, ep: &Endpoint, item: &Item, index: usize) -> Value {
    let models: Vec<&str> = ep.model.split(',').collect();
    let mut body = json!({
        "model": models[index % models.len()],
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if cfg.chat {
        body["messages"] = json!(item.messages);
    } else {
        body["prompt"] = json!(item.prompt);
    }
    if cfg.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if let (Some(Value::Object(extra)), Some(b)) = (&ep.extra, body.as_object_mut()) {
        b.extend(extra.clone());
    }
    body
}

/// The endpoints to measure: each resolved URL, constrained (`cfg.constraint`), or plain then constrained
/// (`cfg.constraint_ab`; the constrained one labelled `URL +constraint`).
fn with_constraints(cfg: &BenchConfig, resolved: Vec<Endpoint>) -> Vec<Endpoint> {
    let Some(extra) = &cfg.constraint else { return resolved };
    let constrained = |ep: &Endpoint| Endpoint {
        url: if cfg.constraint_ab { format!("{} +constraint", ep.url) } else { ep.url.clone() },
        extra: Some(extra.clone()),
        ..ep.clone()
    };
    resolved
        .iter()
        .flat_map(|ep| if cfg.constraint_ab { vec![ep.clone(), constrained(ep)] } else { vec![constrained(ep)] })
        .collect()
}

/// The prompts, in the (seeded) order every endpoint and round will send them.
pub fn workload(cfg: &BenchConfig) -> Result<Vec<Item>> {
    let mut rng = SplitMix::new(cfg.seed);
    let mut items = match (cfg.input_len, &cfg.dataset) {
        (len, DatasetSpec::SharedPrefix(groups)) => {
            dataset::shared_prefix(len.unwrap_or(512), *groups, cfg.num_prompts.max(1), &mut rng)
        }
        (Some(len), _) => dataset::synthetic(len, cfg.num_prompts.max(1), &mut rng),
        (None, DatasetSpec::Builtin) => dataset::builtin(),
        (None, DatasetSpec::File(p)) => dataset::from_jsonl(p)?,
    };
    for i in (1..items.len()).rev() {
        items.swap(i, rng.below(i + 1));
    }
    let mut out: Vec<Item> = Vec::with_capacity(cfg.num_prompts);
    let mut fresh = 0;
    for i in 0..cfg.num_prompts {
        if i > 0 && cfg.duplicate_ratio > 0.0 && rng.next_f64() < cfg.duplicate_ratio {
            out.push(out[rng.below(i)].clone());
        } else {
            out.push(items[fresh % items.len()].clone());
            fresh += 1;
        }
    }
    Ok(out)
}

struct Progress {
    on: bool,
    label: String,
    total: usize,
    done: AtomicUsize,
}

impl Progress {
    fn tick(&self) {
        let d = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if self.on {
            let width = 30;
            let filled = d * width / self.total.max(1);
            eprint!("\r{} [{}{}] {d}/{}", self.label, "#".repeat(filled), " ".repeat(width - filled), self.total);
            if d == self.total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    }
}

/// Runs the whole workload once against one endpoint; returns the outcomes and the wall time.
async fn run_once(
    client: &reqwest::Client,
    cfg: &BenchConfig,
    ep: &Endpoint,
    items: &[Item],
    load: Load,
    progress: Arc<Progress>,
) -> (Vec<Outcome>, Duration) {
    let bodies: Arc<Vec<Value>> =
        Arc::new(items.iter().enumerate().map(|(i, it)| request_body(cfg, ep, it, i)).collect());
    let url: Arc<str> = ep.request_url.clone().into();
    let start = Instant::now();
    let mut tasks = Vec::new();
    match load {
        Load::Concurrency(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..c.max(1) {
                let (client, bodies, url, next, progress) =
                    (client.clone(), bodies.clone(), url.clone(), next.clone(), progress.clone());
                let timeout = cfg.timeout;
                tasks.push(tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= bodies.len() {
                            return mine;
                        }
                        mine.push((i, stream_request(&client, &url, &bodies[i], timeout).await));
                        progress.tick();
                    }
                }));
            }
        }
        Load::RequestRate { rate, max_concurrency } => {
            let mut rng = SplitMix::new(cfg.seed ^ 0x5EED);
            let limit = Arc::new(tokio::sync::Semaphore::new(max_concurrency.unwrap_or(usize::MAX >> 4).max(1)));
            let mut at = Duration::ZERO;
            for i in 0..bodies.len() {
                at += Duration::from_secs_f64(rng.exp(rate));
                tokio::time::sleep_until((start + at).into()).await;
                let Ok(permit) = limit.clone().acquire_owned().await else { break };
                let (client, bodies, url, progress) = (client.clone(), bodies.clone(), url.clone(), progress.clone());
                let timeout = cfg.timeout;
                tasks.push(tokio::spawn(async move {
                    let o = stream_request(&client, &url, &bodies[i], timeout).await;
                    drop(permit);
                    progress.tick();
                    vec![(i, o)]
                }));
            }
        }
    }
    let mut all: Vec<(usize, Outcome)> = Vec::with_capacity(bodies.len());
    for t in tasks {
        if let Ok(v) = t.await {
            all.extend(v);
        }
    }
    let wall = start.elapsed();
    all.sort_by_key(|(i, _)| *i);
    (all.into_iter().map(|(_, o)| o).collect(), wall)
}

/// Resolves the endpoints, warms them up, and runs every load for every round, endpoints in turn.
pub async fn run(cfg: BenchConfig) -> Result<Report> {
    if cfg.urls.is_empty() {
        bail!("give at least one --url");
    }
    if cfg.num_prompts == 0 || cfg.rounds == 0 || cfg.loads.is_empty() {
        bail!("--num-prompts, --rounds and the load levels must be positive");
    }
    let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // A fresh connection per request: servers differ in how long they keep idle connections (llama-server
    // closes them), and a request sent on a connection the server is closing fails for reasons that have
    // nothing to do with serving. Connecting over loopback costs well under a millisecond.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("HTTP client")?;
    let mut endpoints = Vec::new();
    for u in &cfg.urls {
        endpoints.push(resolve_endpoint(&client, u, cfg.model.as_deref(), cfg.chat).await?);
    }
    let endpoints = with_constraints(&cfg, endpoints);
    let items = workload(&cfg)?;
    for ep in &endpoints {
        // At least one warm-up request per model, so that loads are not measured.
        let warmup = cfg.warmup.max(ep.model.split(',').count());
        for (i, item) in items.iter().cycle().take(warmup).enumerate() {
            let o = stream_request(&client, &ep.request_url, &request_body(&cfg, ep, item, i), cfg.timeout).await;
            if let Some(e) = o.error {
                eprintln!("warm-up request to {} failed: {e}", ep.url);
            }
        }
    }
    let show = cfg.progress && std::io::stderr().is_terminal();
    let mut levels = Vec::new();
    for &load in &cfg.loads {
        // runs[endpoint][round]
        let mut runs: Vec<Vec<(Vec<Outcome>, Duration)>> = vec![Vec::new(); endpoints.len()];
        for round in 0..cfg.rounds {
            for (e, ep) in endpoints.iter().enumerate() {
                let progress = Arc::new(Progress {
                    on: show,
                    label: format!("{} · {load} · round {}/{}", ep.url, round + 1, cfg.rounds),
                    total: items.len(),
                    done: AtomicUsize::new(0),
                });
                runs[e].push(run_once(&client, &cfg, ep, &items, load, progress).await);
            }
        }
        let summaries: Vec<EndpointLevel> =
            endpoints.iter().zip(&runs).map(|(ep, r)| stats::summarize(&ep.url, r)).collect();
        let ratios = summaries.iter().skip(1).map(|b| stats::ratio(&summaries[0], b)).collect();
        levels.push(LevelReport { load, endpoints: summaries, ratios });
    }
    Ok(Report {
        tool: format!("mlx-serving bench {}", env!("CARGO_PKG_VERSION")),
        started_unix,
        config: cfg,
        endpoints,
        levels,
    })
}

fn ms(d: &Dist) -> String {
    if d.n == 0 {
        "–".into()
    } else {
        format!("{:.1}", d.p50)
    }
}

/// One row per endpoint per level, then the ratio rows; as a Markdown table or aligned text.
pub fn render_table(report: &Report, markdown: bool) -> String {
    let header = [
        "load",
        "endpoint",
        "ok",
        "errors",
        "out tok/s",
        "req/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "TPOT p50",
        "E2E p50",
        "tokens from",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for level in &report.levels {
        for e in &level.endpoints {
            let errors = if e.errors.is_empty() {
                "0".to_string()
            } else {
                e.errors.iter().map(|(k, v)| format!("{k}×{v}")).collect::<Vec<_>>().join(" ")
            };
            rows.push(vec![
                level.load.to_string(),
                e.url.clone(),
                e.completed.to_string(),
                errors,
                format!("{:.1}", e.output_throughput),
                format!("{:.2}", e.request_throughput),
                ms(&e.ttft_ms),
                if e.ttft_ms.n == 0 { "–".into() } else { format!("{:.1}", e.ttft_ms.p99) },
                ms(&e.itl_ms),
                ms(&e.tpot_ms),
                ms(&e.e2e_ms),
                e.token_count_source.clone(),
            ]);
        }
        for r in &level.ratios {
            let f = |name: &str| {
                r.metrics.get(name).map_or("–".to_string(), |m| {
                    if m.rounds > 1 {
                        format!("{:.2}× ({:.2}–{:.2})", m.median, m.min, m.max)
                    } else {
                        format!("{:.2}×", m.median)
                    }
                })
            };
            rows.push(vec![
                level.load.to_string(),
                format!("{} / {}", r.endpoint, r.baseline),
                String::new(),
                String::new(),
                f("output_throughput"),
                f("request_throughput"),
                f("ttft_p50_ms"),
                f("ttft_p99_ms"),
                f("itl_p50_ms"),
                f("tpot_p50_ms"),
                f("e2e_p50_ms"),
                String::new(),
            ]);
        }
    }
    let mut out = String::new();
    if markdown {
        out.push_str(&format!("| {} |\n", header.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
        for r in &rows {
            out.push_str(&format!("| {} |\n", r.join(" | ")));
        }
    } else {
        let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: Vec<String>| {
            cells
                .iter()
                .zip(&width)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        out.push_str(&line(header.iter().map(|s| s.to_string()).collect()));
        out.push('\n');
        for r in rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out.push_str("times in ms; ratios are endpoint / first endpoint, median over rounds (min–max)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalized() {
        assert_eq!(base_url("http://h:1/v1/").unwrap(), "http://h:1");
        assert_eq!(base_url("http://h:1").unwrap(), "http://h:1");
        assert!(base_url("h:1").is_err());
    }

    #[test]
    fn a_duplicate_ratio_repeats_earlier_prompts() {
        let cfg = |ratio: f64| BenchConfig {
            urls: vec![],
            model: None,
            dataset: DatasetSpec::Builtin,
            num_prompts: 400,
            duplicate_ratio: ratio,
            loads: vec![],
            max_tokens: 8,
            input_len: Some(16),
            chat: true,
            ignore_eos: false,
            temperature: 0.0,
            warmup: 0,
            seed: 3,
            rounds: 1,
            timeout: Duration::from_secs(1),
            progress: false,
            constraint: None,
            constraint_ab: false,
        };
        let key = |i: &Item| format!("{i:?}");
        let distinct = |w: &[Item]| w.iter().map(key).collect::<std::collections::HashSet<_>>().len();
        let none = workload(&cfg(0.0)).unwrap();
        assert_eq!(distinct(&none), 400, "synthetic prompts are all different");
        let half = workload(&cfg(0.5)).unwrap();
        let repeats = 400 - distinct(&half);
        assert!((160..=240).contains(&repeats), "about half repeat: {repeats}");
        // Each repeat is of an earlier prompt; the fresh ones follow the dataset's order.
        for (i, it) in half.iter().enumerate() {
            assert!(i == 0 || half[..i].iter().any(|e| key(e) == key(it)) || none.iter().any(|e| key(e) == key(it)));
        }
        assert_eq!(key(&half[0]), key(&none[0]));
    }
}

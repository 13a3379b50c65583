//! Prometheus metrics under the `mlx_serving:` prefix, named as vLLM names them so existing dashboards
//! carry over. Request-level series are recorded by the output drivers; engine gauges are read from the
//! engine's published counters when `/metrics` is scraped.

use mlx_serving_engine::EngineHandle;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A histogram with fixed upper bounds (seconds) and atomic counts.
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus the overflow (`+Inf`) bucket; not cumulative.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0) }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| secs <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

// vLLM's bucket bounds.
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const E2E_BUCKETS: &[f64] = &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0];
const LOAD_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Speculative decoding's counters, under vLLM's names: steps that verified drafts, draft tokens verified,
/// accepted, and accepted by position (positions up to the last one ever accepted).
fn speculation(x: &mut Exposition, labels: &str, st: &mlx_serving_engine::EngineStats) {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let counter = "counter";
    x.sample(
        ["mlx_serving:spec_decode_num_drafts", "Sequence steps that verified draft tokens.", counter],
        labels,
        get(&st.spec_drafts),
    );
    x.sample(
        ["mlx_serving:spec_decode_num_draft_tokens", "Draft tokens verified.", counter],
        labels,
        get(&st.spec_draft_tokens),
    );
    x.sample(
        ["mlx_serving:spec_decode_num_accepted_tokens", "Draft tokens accepted.", counter],
        labels,
        get(&st.spec_accepted_tokens),
    );
    let per_pos = &st.spec_accepted_per_position;
    let last = per_pos.iter().rposition(|c| get(c) > 0).unwrap_or(0);
    for (i, c) in per_pos.iter().enumerate().take(last + 1) {
        x.sample(
            [
                "mlx_serving:spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted, by position among a step's drafts (0 = the first).",
                counter,
            ],
            &format!("{labels},position=\"{i}\""),
            get(c),
        );
    }
    x.sample(
        ["mlx_serving:spec_decode_propose_seconds", "Time spent proposing draft tokens.", counter],
        labels,
        get(&st.spec_propose_micros) as f64 / 1e6,
    );
}

/// The finish reasons `request_success_total` is split by.
pub const FINISH_REASONS: [&str; 4] = ["stop", "length", "abort", "tool_calls"];

/// The series of one configured model. They outlive its loads and unloads, so counters only grow.
pub struct ModelMetrics {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Indexed like `FINISH_REASONS`.
    success: [AtomicU64; 4],
    /// Requests that ended in an error (engine step failure, deadline).
    pub failed: AtomicU64,
    pub loads: AtomicU64,
    pub load_failures: AtomicU64,
    pub unloads: AtomicU64,
    pub load_seconds: Histogram,
    /// Requests that joined another request's generation instead of running their own.
    pub coalesced: AtomicU64,
    /// Images in accepted chat requests (decoded and preprocessed).
    pub images: AtomicU64,
}

impl Default for ModelMetrics {
    fn default() -> Self {
        Self {
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            success: Default::default(),
            failed: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            load_failures: AtomicU64::new(0),
            unloads: AtomicU64::new(0),
            load_seconds: Histogram::new(LOAD_BUCKETS),
            coalesced: AtomicU64::new(0),
            images: AtomicU64::new(0),
        }
    }
}

impl ModelMetrics {
    pub fn finished(&self, reason: &str) {
        if let Some(i) = FINISH_REASONS.iter().position(|&r| r == reason) {
            self.success[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Server-wide series (HTTP responses by status, the response cache).
#[derive(Default)]
pub struct Metrics {
    /// HTTP responses by status code (only codes seen).
    responses: Mutex<Vec<(u16, u64)>>,
    /// Response-cache lookups that found an answer, that did not, and backend operations that failed.
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_errors: AtomicU64,
    /// Requests refused by a key's rate limit.
    pub rate_limited: AtomicU64,
}

/// One model as `/metrics` shows it: its registry entry, its series, and its engine while loaded.
pub struct ModelView<'a> {
    pub info: &'a mlx_serving_services::ModelInfo,
    pub metrics: &'a ModelMetrics,
    pub engine: Option<&'a EngineHandle>,
}

/// A Prometheus text exposition built family by family: each family's `HELP` and `TYPE` once, then the
/// samples of every model.
#[derive(Default)]
struct Exposition {
    families: Vec<(String, String)>,
}

impl Exposition {
    fn family(&mut self, name: &str, help: &str, kind: &str) -> &mut String {
        let i = match self.families.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                self.families.push((name.into(), format!("# HELP {name} {help}\n# TYPE {name} {kind}\n")));
                self.families.len() - 1
            }
        };
        &mut self.families[i].1
    }

    fn sample(&mut self, [name, help, kind]: [&str; 3], labels: &str, v: impl std::fmt::Display) {
        let out = self.family(name, help, kind);
        let _ = match labels {
            "" => writeln!(out, "{name} {v}"),
            _ => writeln!(out, "{name}{{{labels}}} {v}"),
        };
    }

    /// `counts` has one count per bound plus the overflow (not cumulative).
    fn histogram(
        &mut self,
        [name, help]: [&str; 2],
        labels: &str,
        bounds: &[f64],
        counts: &[AtomicU64],
        sum: &AtomicU64,
    ) {
        let out = self.family(name, help, "histogram");
        let mut cum = 0;
        for (i, b) in bounds.iter().enumerate() {
            cum += counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cum}");
        }
        cum += counts[bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cum}");
        let sum = sum.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {cum}");
    }

    fn hist(&mut self, name_help: [&str; 2], labels: &str, h: &Histogram) {
        self.histogram(name_help, labels, h.bounds, &h.counts, &h.sum_micros);
    }

    fn finish(self) -> String {
        self.families.into_iter().map(|(_, text)| text).collect()
    }
}

impl Metrics {
    pub fn response(&self, status: u16) {
        let mut r = self.responses.lock().unwrap_or_else(|e| e.into_inner());
        match r.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => {
                r.push((status, 1));
                r.sort_unstable();
            }
        }
    }

    /// The Prometheus text exposition: every model's series labelled with its name (engine series only while
    /// it is loaded), the registry's, and the HTTP responses.
    /// `cache`: the response cache's counts, when it is on (and its entries, when they are local: a shared Redis
    /// keeps its own).
    pub fn render(&self, models: &[ModelView], cache: Option<Option<mlx_serving_services::CacheStats>>) -> String {
        let mut x = Exposition::default();
        let loaded = models.iter().filter(|m| m.engine.is_some()).count();
        x.sample(["mlx_serving:models_loaded", "Models loaded now.", "gauge"], "", loaded);
        for m in models {
            render_model(&mut x, m);
        }
        x.sample(
            [
                "mlx_serving:rate_limited_requests_total",
                "Requests refused by an API key's rate limit (429).",
                "counter",
            ],
            "",
            self.rate_limited.load(Ordering::Relaxed),
        );
        if let Some(c) = cache {
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let counter = "counter";
            x.sample(
                ["mlx_serving:response_cache_hits_total", "Requests answered from the response cache.", counter],
                "",
                get(&self.cache_hits),
            );
            x.sample(
                [
                    "mlx_serving:response_cache_misses_total",
                    "Cacheable requests not found in the response cache.",
                    counter,
                ],
                "",
                get(&self.cache_misses),
            );
            x.sample(
                ["mlx_serving:response_cache_errors_total", "Response-cache backend operations that failed.", counter],
                "",
                get(&self.cache_errors),
            );
            if let Some(c) = c {
                x.sample(
                    ["mlx_serving:response_cache_evictions_total", "Entries evicted from the response cache.", counter],
                    "",
                    c.evictions,
                );
                x.sample(
                    ["mlx_serving:response_cache_entries", "Entries in the response cache.", "gauge"],
                    "",
                    c.entries,
                );
                x.sample(["mlx_serving:response_cache_bytes", "Bytes in the response cache.", "gauge"], "", c.bytes);
            }
        }
        let name = "mlx_serving:http_responses_total";
        let fam = x.family(name, "HTTP responses by status code.", "counter");
        for (status, n) in self.responses.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(fam, "{name}{{status=\"{status}\"}} {n}");
        }
        x.finish()
    }
}

fn render_model(x: &mut Exposition, m: &ModelView) {
    let name = m.info.name.replace('\\', "\\\\").replace('"', "\\\"");
    let labels = format!("model_name=\"{name}\"");
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (gauge, counter) = ("gauge", "counter");
    x.sample(
        ["mlx_serving:model_loaded", "1 while the model is loaded.", gauge],
        &labels,
        u8::from(m.engine.is_some()),
    );
    x.sample(
        ["mlx_serving:model_memory_bytes", "Bytes the model takes (weights and KV cache); 0 unloaded.", gauge],
        &labels,
        m.info.memory,
    );
    x.sample(["mlx_serving:model_requests_in_flight", "Requests holding the model.", gauge], &labels, m.info.in_flight);
    let mm = m.metrics;
    x.sample(["mlx_serving:model_loads_total", "Loads of the model.", counter], &labels, get(&mm.loads));
    x.sample(["mlx_serving:model_load_failures_total", "Failed loads.", counter], &labels, get(&mm.load_failures));
    x.sample(["mlx_serving:model_unloads_total", "Unloads of the model.", counter], &labels, get(&mm.unloads));
    x.hist(["mlx_serving:model_load_seconds", "Time to load the model."], &labels, &mm.load_seconds);
    x.sample(
        ["mlx_serving:coalesced_requests_total", "Requests that joined an identical request's generation.", counter],
        &labels,
        get(&mm.coalesced),
    );
    if let Some(engine) = m.engine {
        let st = engine.stats();
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as f64;
        x.sample(
            ["mlx_serving:num_requests_running", "Requests in the running batch.", gauge],
            &labels,
            load(&st.running),
        );
        x.sample(
            ["mlx_serving:num_requests_waiting", "Requests waiting to be scheduled.", gauge],
            &labels,
            load(&st.waiting) + load(&st.pending),
        );
        let kv = st.kv_usage_ppm.load(Ordering::Relaxed) as f64 / 1e6;
        x.sample(
            ["mlx_serving:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", gauge],
            &labels,
            kv,
        );
        // Engine counters restart with each load of the model.
        x.sample(
            ["mlx_serving:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", counter],
            &labels,
            get(&st.prefix_queries),
        );
        x.sample(
            ["mlx_serving:prefix_cache_hits", "Prompt tokens found in the prefix cache.", counter],
            &labels,
            get(&st.prefix_hits),
        );
        x.sample(
            ["mlx_serving:num_preemptions", "Requests preempted to free KV blocks.", counter],
            &labels,
            get(&st.preemptions),
        );
        x.sample(
            [
                "mlx_serving:constrained_requests_total",
                "Requests with an output constraint (JSON schema, regex, choice, grammar, tool calls).",
                counter,
            ],
            &labels,
            get(&st.constrained_requests),
        );
        x.sample(
            [
                "mlx_serving:constraint_failures_total",
                "Constrained requests ended because their constraint failed or allowed no token.",
                counter,
            ],
            &labels,
            get(&st.constraint_failures),
        );
        x.histogram(
            ["mlx_serving:constraint_mask_seconds", "Time to compute one sequence's allowed-token mask for one step."],
            &labels,
            &mlx_serving_engine::MASK_TIME_BUCKETS,
            &st.mask_time_counts,
            &st.mask_time_micros,
        );
        speculation(x, &labels, st);
        x.histogram(
            [
                "mlx_serving:vision_encoder_seconds",
                "Time to encode one image with the vision encoder (encoder-cache hits not counted).",
            ],
            &labels,
            &mlx_serving_engine::ENCODER_TIME_BUCKETS,
            &st.encoder_time_counts,
            &st.encoder_time_micros,
        );
    }
    x.sample(
        ["mlx_serving:images_processed_total", "Images received in requests, decoded and preprocessed.", counter],
        &labels,
        get(&mm.images),
    );
    x.sample(["mlx_serving:prompt_tokens_total", "Prompt tokens processed.", counter], &labels, get(&mm.prompt_tokens));
    x.sample(
        ["mlx_serving:generation_tokens_total", "Tokens generated.", counter],
        &labels,
        get(&mm.generation_tokens),
    );
    let help = ["mlx_serving:request_success_total", "Finished requests by finish reason.", counter];
    for (i, r) in FINISH_REASONS.iter().enumerate() {
        x.sample(help, &format!("{labels},finished_reason=\"{r}\""), get(&mm.success[i]));
    }
    x.sample(
        ["mlx_serving:request_failure_total", "Requests that ended in an error.", counter],
        &labels,
        get(&mm.failed),
    );
    x.hist(["mlx_serving:time_to_first_token_seconds", "Time to first token."], &labels, &mm.ttft);
    x.hist(["mlx_serving:inter_token_latency_seconds", "Time between output tokens."], &labels, &mm.itl);
    x.hist(["mlx_serving:e2e_request_latency_seconds", "Request latency, arrival to finish."], &labels, &mm.e2e);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_sum_in_seconds() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(3));
        let mut x = Exposition::default();
        x.hist(["x", "help"], "m=\"a\"", &h);
        let out = x.finish();
        assert!(out.contains("x_bucket{m=\"a\",le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{m=\"a\"} 3.55\n"), "{out}");
        assert!(out.contains("x_count{m=\"a\"} 3\n"), "{out}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn each_family_is_described_once_with_every_models_samples() {
        use mlx_serving_services::{ModelInfo, State};
        let info = |name: &str, memory| ModelInfo {
            name: name.into(),
            aliases: vec![],
            state: if memory > 0 { State::Loaded } else { State::Unloaded },
            pinned: false,
            ttl: None,
            memory,
            load_time: None,
            last_use: None,
            in_flight: 0,
        };
        let (a, b) = (info("a", 5), info("b\"q", 0));
        let (ma, mb) = (ModelMetrics::default(), ModelMetrics::default());
        ma.finished("stop");
        mb.loads.fetch_add(2, Ordering::Relaxed);
        let m = Metrics::default();
        m.response(200);
        let views =
            [ModelView { info: &a, metrics: &ma, engine: None }, ModelView { info: &b, metrics: &mb, engine: None }];
        let out = m.render(&views, None);
        for family in [
            "mlx_serving:model_loads_total",
            "mlx_serving:request_success_total",
            "mlx_serving:time_to_first_token_seconds",
        ] {
            assert_eq!(out.matches(&format!("# TYPE {family} ")).count(), 1, "{family}: {out}");
        }
        assert!(out.contains("mlx_serving:models_loaded 0\n"), "{out}");
        assert!(out.contains("mlx_serving:model_memory_bytes{model_name=\"a\"} 5\n"), "{out}");
        assert!(out.contains("mlx_serving:model_loads_total{model_name=\"b\\\"q\"} 2\n"), "{out}");
        assert!(
            out.contains("mlx_serving:request_success_total{model_name=\"a\",finished_reason=\"stop\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("mlx_serving:http_responses_total{status=\"200\"} 1\n"), "{out}");
        // A family's samples follow its own header, before the next family's.
        let lines: Vec<&str> = out.lines().collect();
        let at = |p: &str| lines.iter().position(|l| l.starts_with(p)).unwrap();
        assert!(at("# TYPE mlx_serving:model_loads_total") < at("mlx_serving:model_loads_total{model_name=\"b"));
        assert!(
            at("mlx_serving:model_loads_total{model_name=\"b") < at("# HELP mlx_serving:model_load_failures_total")
        );
    }
}

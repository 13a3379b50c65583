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

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        render_histogram(out, [name, help, labels], self.bounds, &self.counts, &self.sum_micros);
    }
}

/// A histogram's exposition: `counts` has one count per bound plus the overflow (not cumulative).
fn render_histogram(
    out: &mut String,
    [name, help, labels]: [&str; 3],
    bounds: &[f64],
    counts: &[AtomicU64],
    sum: &AtomicU64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
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

// vLLM's bucket bounds.
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const E2E_BUCKETS: &[f64] = &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0];

/// The finish reasons `request_success_total` is split by.
pub const FINISH_REASONS: [&str; 4] = ["stop", "length", "abort", "tool_calls"];

pub struct Metrics {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Indexed like `FINISH_REASONS`.
    success: [AtomicU64; 4],
    /// Requests that ended in an error (engine step failure, deadline).
    pub failed: AtomicU64,
    /// HTTP responses by status code (only codes seen).
    responses: Mutex<Vec<(u16, u64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            success: Default::default(),
            failed: AtomicU64::new(0),
            responses: Mutex::new(Vec::new()),
        }
    }
}

impl Metrics {
    pub fn finished(&self, reason: &str) {
        if let Some(i) = FINISH_REASONS.iter().position(|&r| r == reason) {
            self.success[i].fetch_add(1, Ordering::Relaxed);
        }
    }

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

    /// The Prometheus text exposition of every series, each labelled with the model name.
    pub fn render(&self, engine: &EngineHandle, model: &str) -> String {
        let model = model.replace('\\', "\\\\").replace('"', "\\\"");
        let labels = format!("model_name=\"{model}\"");
        let mut out = String::with_capacity(8192);
        let st = engine.stats();
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP mlx_serving:{name} {help}\n# TYPE mlx_serving:{name} gauge");
            let _ = writeln!(out, "mlx_serving:{name}{{{labels}}} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP mlx_serving:{name} {help}\n# TYPE mlx_serving:{name} counter");
            let _ = writeln!(out, "mlx_serving:{name}{{{labels}}} {v}");
        };
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as f64;
        gauge(&mut out, "num_requests_running", "Requests in the running batch.", load(&st.running));
        gauge(
            &mut out,
            "num_requests_waiting",
            "Requests waiting to be scheduled.",
            load(&st.waiting) + load(&st.pending),
        );
        let kv = st.kv_usage_ppm.load(Ordering::Relaxed) as f64 / 1e6;
        gauge(&mut out, "kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", kv);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            get(&st.prefix_queries),
        );
        counter(&mut out, "prefix_cache_hits", "Prompt tokens found in the prefix cache.", get(&st.prefix_hits));
        counter(&mut out, "num_preemptions", "Requests preempted to free KV blocks.", get(&st.preemptions));
        counter(&mut out, "prompt_tokens_total", "Prompt tokens processed.", get(&self.prompt_tokens));
        counter(&mut out, "generation_tokens_total", "Tokens generated.", get(&self.generation_tokens));
        let _ = writeln!(
            out,
            "# HELP mlx_serving:request_success_total Finished requests by finish reason.\n# TYPE mlx_serving:request_success_total counter"
        );
        for (i, r) in FINISH_REASONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "mlx_serving:request_success_total{{{labels},finished_reason=\"{r}\"}} {}",
                get(&self.success[i])
            );
        }
        counter(&mut out, "request_failure_total", "Requests that ended in an error.", get(&self.failed));
        counter(
            &mut out,
            "constrained_requests_total",
            "Requests with an output constraint (JSON schema, regex, choice, grammar, tool calls).",
            get(&st.constrained_requests),
        );
        counter(
            &mut out,
            "constraint_failures_total",
            "Constrained requests ended because their constraint failed or allowed no token.",
            get(&st.constraint_failures),
        );
        render_histogram(
            &mut out,
            [
                "mlx_serving:constraint_mask_seconds",
                "Time to compute one sequence's allowed-token mask for one step.",
                &labels,
            ],
            &mlx_serving_engine::MASK_TIME_BUCKETS,
            &st.mask_time_counts,
            &st.mask_time_micros,
        );
        self.ttft.render(&mut out, "mlx_serving:time_to_first_token_seconds", "Time to first token.", &labels);
        self.itl.render(&mut out, "mlx_serving:inter_token_latency_seconds", "Time between output tokens.", &labels);
        self.e2e.render(
            &mut out,
            "mlx_serving:e2e_request_latency_seconds",
            "Request latency, arrival to finish.",
            &labels,
        );
        let _ = writeln!(
            out,
            "# HELP mlx_serving:http_responses_total HTTP responses by status code.\n# TYPE mlx_serving:http_responses_total counter"
        );
        for (status, n) in self.responses.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "mlx_serving:http_responses_total{{{labels},status=\"{status}\"}} {n}");
        }
        out
    }
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
        let mut out = String::new();
        h.render(&mut out, "x", "help", "m=\"a\"");
        assert!(out.contains("x_bucket{m=\"a\",le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{m=\"a\"} 3.55\n"), "{out}");
        assert!(out.contains("x_count{m=\"a\"} 3\n"), "{out}");
        assert_eq!(h.count(), 3);
    }
}

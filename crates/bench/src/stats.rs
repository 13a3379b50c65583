//! Outcomes → distributions, per-endpoint summaries and ratios between endpoints.

use crate::client::Outcome;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Mean and percentiles (linear interpolation between order statistics) of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Dist {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Dist {
    pub fn of(mut xs: Vec<f64>) -> Self {
        if xs.is_empty() {
            return Self::default();
        }
        xs.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let pos = p * (xs.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
        };
        Self { n: xs.len(), mean: xs.iter().sum::<f64>() / xs.len() as f64, p50: q(0.5), p90: q(0.9), p99: q(0.99) }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One round of one endpoint at one load.
#[derive(Clone, Debug, Serialize)]
pub struct RoundSummary {
    pub duration_s: f64,
    pub completed: usize,
    pub failed: usize,
    pub output_throughput: f64,
    pub request_throughput: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub tpot_p50_ms: f64,
    pub e2e_p50_ms: f64,
}

/// One endpoint at one load, all rounds pooled.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointLevel {
    pub url: String,
    pub completed: usize,
    pub failed: usize,
    /// Failed requests by kind: `http_<status>`, `connect`, `timeout`, `stream_broken`, `stream_error`.
    pub errors: BTreeMap<String, usize>,
    /// Wall time of all rounds together.
    pub duration_s: f64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Output tokens of completed requests per second.
    pub output_throughput: f64,
    /// Prompt tokens of completed requests, as the server's usage reported them (0 where it gave none).
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    /// Where output token counts came from: `usage` (the server's), `chunks` (counted text events), `mixed`,
    /// or `none` (no request completed).
    pub token_count_source: String,
    pub ttft_ms: Dist,
    /// Gaps between successive text events.
    pub itl_ms: Dist,
    /// Per request: (e2e − TTFT) / (output tokens − 1).
    pub tpot_ms: Dist,
    pub e2e_ms: Dist,
    pub rounds: Vec<RoundSummary>,
}

fn round_summary(outcomes: &[Outcome], wall: Duration) -> RoundSummary {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
    let secs = wall.as_secs_f64().max(1e-9);
    let out_tokens: usize = ok.iter().map(|o| o.output_tokens).sum();
    let ttft = Dist::of(ok.iter().filter_map(|o| o.ttft.map(ms)).collect());
    RoundSummary {
        duration_s: wall.as_secs_f64(),
        completed: ok.len(),
        failed: outcomes.len() - ok.len(),
        output_throughput: out_tokens as f64 / secs,
        request_throughput: ok.len() as f64 / secs,
        ttft_p50_ms: ttft.p50,
        ttft_p99_ms: ttft.p99,
        itl_p50_ms: Dist::of(ok.iter().flat_map(|o| o.itl.iter().copied().map(ms)).collect()).p50,
        tpot_p50_ms: Dist::of(ok.iter().filter_map(|o| tpot(o)).collect()).p50,
        e2e_p50_ms: Dist::of(ok.iter().map(|o| ms(o.e2e)).collect()).p50,
    }
}

fn tpot(o: &Outcome) -> Option<f64> {
    let ttft = o.ttft?;
    (o.output_tokens > 1).then(|| ms(o.e2e.saturating_sub(ttft)) / (o.output_tokens - 1) as f64)
}

/// Pools every round of one endpoint at one load.
pub fn summarize(url: &str, rounds: &[(Vec<Outcome>, Duration)]) -> EndpointLevel {
    let all: Vec<&Outcome> = rounds.iter().flat_map(|(o, _)| o).collect();
    let ok: Vec<&Outcome> = all.iter().copied().filter(|o| o.error.is_none()).collect();
    let mut errors = BTreeMap::new();
    for o in &all {
        if let Some(e) = &o.error {
            *errors.entry(e.clone()).or_insert(0) += 1;
        }
    }
    let duration: f64 = rounds.iter().map(|(_, w)| w.as_secs_f64()).sum();
    let total_output_tokens: usize = ok.iter().map(|o| o.output_tokens).sum();
    let from_usage = ok.iter().filter(|o| o.tokens_from_usage).count();
    let token_count_source = match from_usage {
        _ if ok.is_empty() => "none",
        n if n == ok.len() => "usage",
        0 => "chunks",
        _ => "mixed",
    };
    EndpointLevel {
        url: url.to_string(),
        completed: ok.len(),
        failed: all.len() - ok.len(),
        errors,
        duration_s: duration,
        request_throughput: ok.len() as f64 / duration.max(1e-9),
        output_throughput: total_output_tokens as f64 / duration.max(1e-9),
        total_input_tokens: ok.iter().filter_map(|o| o.prompt_tokens).sum(),
        total_output_tokens,
        token_count_source: token_count_source.into(),
        ttft_ms: Dist::of(ok.iter().filter_map(|o| o.ttft.map(ms)).collect()),
        itl_ms: Dist::of(ok.iter().flat_map(|o| o.itl.iter().copied().map(ms)).collect()),
        tpot_ms: Dist::of(ok.iter().filter_map(|o| tpot(o)).collect()),
        e2e_ms: Dist::of(ok.iter().map(|o| ms(o.e2e)).collect()),
        rounds: rounds.iter().map(|(o, w)| round_summary(o, *w)).collect(),
    }
}

/// The spread of one metric's per-round ratios, and the ratio of the pooled values.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct RatioStat {
    pub pooled: f64,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub rounds: usize,
}

/// `endpoint` / `baseline` for each metric (higher is better for throughputs, lower for latencies).
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub endpoint: String,
    pub baseline: String,
    pub metrics: BTreeMap<String, RatioStat>,
}

pub fn ratio(a: &EndpointLevel, b: &EndpointLevel) -> Ratio {
    type Get = fn(&RoundSummary) -> f64;
    let per_round: [(&str, Get, f64, f64); 7] = [
        ("output_throughput", |r| r.output_throughput, a.output_throughput, b.output_throughput),
        ("request_throughput", |r| r.request_throughput, a.request_throughput, b.request_throughput),
        ("ttft_p50_ms", |r| r.ttft_p50_ms, a.ttft_ms.p50, b.ttft_ms.p50),
        ("ttft_p99_ms", |r| r.ttft_p99_ms, a.ttft_ms.p99, b.ttft_ms.p99),
        ("itl_p50_ms", |r| r.itl_p50_ms, a.itl_ms.p50, b.itl_ms.p50),
        ("tpot_p50_ms", |r| r.tpot_p50_ms, a.tpot_ms.p50, b.tpot_ms.p50),
        ("e2e_p50_ms", |r| r.e2e_p50_ms, a.e2e_ms.p50, b.e2e_ms.p50),
    ];
    let mut metrics = BTreeMap::new();
    for (name, get, pa, pb) in per_round {
        let rs: Vec<f64> =
            a.rounds.iter().zip(&b.rounds).filter(|(ra, _)| get(ra) > 0.0).map(|(ra, rb)| get(rb) / get(ra)).collect();
        if rs.is_empty() || pa <= 0.0 {
            continue;
        }
        let d = Dist::of(rs.clone());
        let min = rs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        metrics.insert(name.to_string(), RatioStat { pooled: pb / pa, median: d.p50, min, max, rounds: rs.len() });
    }
    Ratio { endpoint: b.url.clone(), baseline: a.url.clone(), metrics }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let d = Dist::of((1..=101).map(|x| x as f64).collect());
        assert_eq!((d.n, d.mean, d.p50, d.p90, d.p99), (101, 51.0, 51.0, 91.0, 100.0));
        let d = Dist::of(vec![10.0, 20.0]);
        assert_eq!(d.p50, 15.0);
        assert_eq!(Dist::of(vec![]).n, 0);
    }

    fn outcome(ttft_ms: u64, gaps_ms: &[u64], tokens: usize, error: Option<&str>) -> Outcome {
        let ttft = Duration::from_millis(ttft_ms);
        let itl: Vec<Duration> = gaps_ms.iter().map(|&g| Duration::from_millis(g)).collect();
        Outcome {
            error: error.map(String::from),
            ttft: Some(ttft),
            e2e: ttft + itl.iter().sum::<Duration>(),
            itl,
            output_tokens: tokens,
            prompt_tokens: Some(7),
            tokens_from_usage: true,
        }
    }

    #[test]
    fn summaries_count_only_completed_requests_and_group_errors() {
        let round = vec![
            outcome(100, &[10, 10, 10], 4, None),
            outcome(200, &[20, 20, 20], 4, None),
            outcome(0, &[], 0, Some("http_500")),
            outcome(0, &[], 0, Some("stream_broken")),
            outcome(0, &[], 0, Some("http_500")),
        ];
        let s = summarize("a", &[(round, Duration::from_secs(2))]);
        assert_eq!((s.completed, s.failed, s.total_output_tokens, s.total_input_tokens), (2, 3, 8, 14));
        assert_eq!(s.errors.get("http_500"), Some(&2));
        assert_eq!(s.errors.get("stream_broken"), Some(&1));
        assert_eq!(s.output_throughput, 4.0);
        assert_eq!(s.ttft_ms.p50, 150.0);
        assert_eq!(s.tpot_ms.p50, 15.0);
        assert_eq!(s.token_count_source, "usage");
    }

    #[test]
    fn ratios_are_per_round_with_spread() {
        let a = summarize(
            "a",
            &[
                (vec![outcome(100, &[10], 2, None)], Duration::from_secs(1)),
                (vec![outcome(100, &[10], 2, None)], Duration::from_secs(2)),
            ],
        );
        let b = summarize(
            "b",
            &[
                (vec![outcome(50, &[10], 2, None)], Duration::from_secs(1)),
                (vec![outcome(50, &[10], 2, None)], Duration::from_secs(1)),
            ],
        );
        let r = ratio(&a, &b);
        let t = r.metrics["output_throughput"];
        assert_eq!((t.min, t.max, t.rounds), (1.0, 2.0, 2));
        assert_eq!(t.median, 1.5);
        assert!((t.pooled - 1.5).abs() < 1e-9);
        assert_eq!(r.metrics["ttft_p50_ms"].median, 0.5);
    }
}

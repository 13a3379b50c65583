//! QoS: per-model SLO targets (TTFT p95, ITL p95, error rate) over a sliding window of the requests the
//! router passed, and the remediations that act while a target is missed:
//! - `shed_low_priority`: requests with `"priority": "low"` for that model get a 429 (`Retry-After: 1`);
//! - `degrade_instances`: an instance whose own window misses a latency target while another instance of the
//!   model meets it gets a tenth of its share (it still sees some traffic, so its recovery shows);
//! - `alert`: a log line and `router_slo_ok` / `router_slo_violations_total` on each change, and a POST to
//!   `webhook_url` when one is set.

use crate::experiments::Sample;
use crate::stats::quantile;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remedy {
    ShedLowPriority,
    DegradeInstances,
    Alert,
}

fn all_remedies() -> Vec<Remedy> {
    vec![Remedy::ShedLowPriority, Remedy::DegradeInstances, Remedy::Alert]
}
fn default_window() -> f64 {
    60.0
}
fn default_min_samples() -> usize {
    20
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloConfig {
    /// The requests' `model`.
    pub model: String,
    #[serde(default = "default_window")]
    pub window_seconds: f64,
    #[serde(default)]
    pub ttft_p95_ms: Option<f64>,
    #[serde(default)]
    pub itl_p95_ms: Option<f64>,
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    /// Requests in the window before any verdict.
    #[serde(default = "default_min_samples")]
    pub min_samples: usize,
    #[serde(default = "all_remedies")]
    pub remediation: Vec<Remedy>,
    #[serde(default)]
    pub webhook_url: Option<String>,
}

impl SloConfig {
    pub fn validate(&self) -> Result<(), String> {
        let key = format!("slo[{}]", self.model);
        if !(self.window_seconds.is_finite() && self.window_seconds > 0.0) || self.min_samples == 0 {
            return Err(format!("{key}: window_seconds must be positive and min_samples at least 1"));
        }
        if self.ttft_p95_ms.is_none() && self.itl_p95_ms.is_none() && self.max_error_rate.is_none() {
            return Err(format!("{key}: give at least one of ttft_p95_ms, itl_p95_ms, max_error_rate"));
        }
        if let Some(u) = &self.webhook_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(format!("{key}.webhook_url: an http(s) URL, got `{u}`"));
            }
        }
        Ok(())
    }
}

/// Time-stamped samples of the last `window` (at most `MAX` of them).
#[derive(Debug, Default)]
struct Window(VecDeque<(Instant, Sample)>);

const MAX: usize = 20_000;

impl Window {
    fn push(&mut self, at: Instant, s: Sample) {
        if self.0.len() == MAX {
            self.0.pop_front();
        }
        self.0.push_back((at, s));
    }

    fn trim(&mut self, since: Instant) {
        while self.0.front().is_some_and(|(t, _)| *t < since) {
            self.0.pop_front();
        }
    }

    /// (requests, error rate, TTFT p95 ms, ITL p95 ms).
    fn measures(&self) -> (usize, f64, Option<f64>, Option<f64>) {
        let n = self.0.len();
        let errors = self.0.iter().filter(|(_, s)| s.error).count();
        let p95 = |f: fn(&Sample) -> Option<f64>| {
            let mut xs: Vec<f64> = self.0.iter().filter_map(|(_, s)| f(s)).map(|v| v * 1000.0).collect();
            xs.sort_by(f64::total_cmp);
            (!xs.is_empty()).then(|| quantile(&xs, 0.95))
        };
        (n, if n == 0 { 0.0 } else { errors as f64 / n as f64 }, p95(|s| s.ttft), p95(|s| s.itl))
    }
}

#[derive(Debug, Default)]
struct State {
    /// The measures missing their targets now (empty: the SLO holds).
    missed: Vec<String>,
    /// Instances whose own window misses a latency target while another's meets it.
    degraded: Vec<String>,
    last: Value,
}

/// One model's SLO.
#[derive(Debug)]
pub struct SloMonitor {
    pub cfg: SloConfig,
    window: Mutex<Window>,
    per_instance: Mutex<HashMap<String, Window>>,
    state: Mutex<State>,
    pub violations: AtomicU64,
    pub shed: AtomicU64,
}

/// A change of an SLO's verdict, to alert on.
#[derive(Debug)]
pub struct Change {
    pub model: String,
    pub ok: bool,
    pub body: Value,
}

impl SloMonitor {
    pub fn new(cfg: SloConfig) -> Self {
        Self {
            cfg,
            window: Mutex::default(),
            per_instance: Mutex::default(),
            state: Mutex::default(),
            violations: AtomicU64::new(0),
            shed: AtomicU64::new(0),
        }
    }

    /// A finished request, answered by `instance` (None: no instance answered).
    pub fn record(&self, instance: Option<&str>, s: Sample) {
        let now = Instant::now();
        self.window.lock().unwrap().push(now, s);
        if let Some(i) = instance {
            self.per_instance.lock().unwrap().entry(i.to_string()).or_default().push(now, s);
        }
    }

    fn misses(&self, w: &Window) -> Vec<String> {
        let (n, err, ttft, itl) = w.measures();
        if n < self.cfg.min_samples {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let (Some(t), Some(v)) = (self.cfg.ttft_p95_ms, ttft) {
            if v > t {
                out.push("ttft_p95".to_string());
            }
        }
        if let (Some(t), Some(v)) = (self.cfg.itl_p95_ms, itl) {
            if v > t {
                out.push("itl_p95".to_string());
            }
        }
        if self.cfg.max_error_rate.is_some_and(|t| err > t) {
            out.push("error_rate".to_string());
        }
        out
    }

    /// Recomputes the verdict over the window ending `now`; returns a change of verdict when there is one.
    pub fn evaluate(&self, now: Instant) -> Option<Change> {
        let since = now.checked_sub(Duration::from_secs_f64(self.cfg.window_seconds)).unwrap_or(now);
        let mut w = self.window.lock().unwrap();
        w.trim(since);
        let missed = self.misses(&w);
        let (n, err, ttft, itl) = w.measures();
        drop(w);
        let mut per = self.per_instance.lock().unwrap();
        per.values_mut().for_each(|w| w.trim(since));
        per.retain(|_, w| !w.0.is_empty());
        let latency = |m: &Vec<String>| m.iter().any(|x| x != "error_rate");
        let verdicts: Vec<(String, bool)> = per.iter().map(|(u, w)| (u.clone(), latency(&self.misses(w)))).collect();
        drop(per);
        let some_fine = verdicts.iter().any(|(_, bad)| !bad);
        let degraded: Vec<String> = match some_fine && self.cfg.remediation.contains(&Remedy::DegradeInstances) {
            true => verdicts.into_iter().filter(|(_, bad)| *bad).map(|(u, _)| u).collect(),
            false => Vec::new(),
        };
        let mut st = self.state.lock().unwrap();
        let was_ok = st.missed.is_empty();
        st.last = json!({"requests": n, "error_rate": err, "ttft_p95_ms": ttft, "itl_p95_ms": itl});
        st.missed = missed;
        st.degraded = degraded;
        let ok = st.missed.is_empty();
        if ok == was_ok {
            return None;
        }
        if !ok {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        let at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let body = json!({"model": self.cfg.model, "state": if ok { "ok" } else { "violated" }, "missed": st.missed,
            "measured": st.last, "targets": {"ttft_p95_ms": self.cfg.ttft_p95_ms, "itl_p95_ms": self.cfg.itl_p95_ms,
            "max_error_rate": self.cfg.max_error_rate}, "degraded_instances": st.degraded, "at": at});
        Some(Change { model: self.cfg.model.clone(), ok, body })
    }

    /// Whether low-priority requests are shed now.
    pub fn shedding(&self) -> bool {
        self.cfg.remediation.contains(&Remedy::ShedLowPriority) && !self.state.lock().unwrap().missed.is_empty()
    }

    pub fn ok(&self) -> bool {
        self.state.lock().unwrap().missed.is_empty()
    }

    pub fn degraded(&self) -> Vec<String> {
        self.state.lock().unwrap().degraded.clone()
    }

    pub fn report(&self) -> Value {
        let st = self.state.lock().unwrap();
        json!({"model": self.cfg.model, "ok": st.missed.is_empty(), "missed": st.missed, "measured": st.last,
            "targets": {"ttft_p95_ms": self.cfg.ttft_p95_ms, "itl_p95_ms": self.cfg.itl_p95_ms,
                "max_error_rate": self.cfg.max_error_rate}, "window_seconds": self.cfg.window_seconds,
            "degraded_instances": st.degraded, "violations": self.violations.load(Ordering::Relaxed),
            "shed": self.shed.load(Ordering::Relaxed)})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slo() -> SloMonitor {
        SloMonitor::new(SloConfig {
            model: "m".into(),
            window_seconds: 0.3,
            ttft_p95_ms: Some(50.0),
            itl_p95_ms: None,
            max_error_rate: Some(0.2),
            min_samples: 10,
            remediation: all_remedies(),
            webhook_url: None,
        })
    }

    fn ok(ttft: f64) -> Sample {
        Sample { ttft: Some(ttft), itl: None, error: false }
    }

    #[test]
    fn verdicts_change_with_the_window() {
        let s = slo();
        for _ in 0..9 {
            s.record(Some("a"), ok(0.2));
        }
        assert!(s.evaluate(Instant::now()).is_none() && s.ok(), "too few samples: no verdict");
        s.record(Some("a"), ok(0.2));
        let c = s.evaluate(Instant::now()).expect("a change");
        assert!(!c.ok && c.body["missed"] == json!(["ttft_p95"]));
        assert!(s.shedding() && s.violations.load(Ordering::Relaxed) == 1);
        assert!(s.evaluate(Instant::now()).is_none(), "no change, no second alert");
        std::thread::sleep(Duration::from_millis(350));
        for _ in 0..10 {
            s.record(Some("a"), ok(0.01));
        }
        let c = s.evaluate(Instant::now()).expect("back to ok once the slow samples left the window");
        assert!(c.ok && !s.shedding());
        for k in 0..10 {
            s.record(None, Sample { error: k < 5, ..ok(0.01) });
        }
        s.evaluate(Instant::now());
        assert_eq!(s.report()["missed"], json!(["error_rate"]), "5 errors in 20");
    }

    #[test]
    fn a_slow_instance_is_degraded_while_another_is_fine() {
        let s = slo();
        for _ in 0..12 {
            s.record(Some("slow"), ok(0.2));
            s.record(Some("fast"), ok(0.01));
        }
        s.evaluate(Instant::now());
        assert_eq!(s.degraded(), ["slow"]);
        let only = slo();
        for _ in 0..12 {
            only.record(Some("slow"), ok(0.2));
        }
        only.evaluate(Instant::now());
        assert!(only.degraded().is_empty(), "no instance does better: none is singled out");
    }
}

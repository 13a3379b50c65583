//! Canary rollouts, A/B tests and feature flags.
//!
//! An experiment takes the requests for one `model` and splits them between arms (instance groups, each
//! optionally sending another model name: two model versions), by a hash of the experiment's name and the
//! request's user (else its affinity header, else a per-request id), so a user stays in one arm. Each arm
//! keeps its requests' times to first token (TTFT: for streams the first event with content; for a whole
//! answer its arrival), the mean inter-token latency of streams (ITL: between content events), and errors.
//!
//! A canary (arms: stable, then canary) advances through its stages (default 10 → 25 → 50 → 100 % of the
//! traffic to the canary) when a stage has lasted `window_seconds` with at least `min_samples` on each arm
//! and no regression; it rolls back (0 %) as soon as a regression shows: its error rate above the stable
//! arm's by more than `max_error_rate_increase`, or its TTFT or ITL larger by Welch's
//! t-test with p below `max_p_value` and Cohen's d above `min_effect_size`. Samples count per stage. An A/B
//! test keeps fixed shares and reports the same statistics without deciding.
//!
//! A feature flag is on for a percentage of users (hash of the flag's name and the user): it sets request
//! fields and/or sends the request to an experiment's arm.

use crate::stats::{cohens_d, summarize, welch, Summary, Welch};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use xxhash_rust::xxh3::xxh3_64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExperimentKind {
    Canary,
    Ab,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    pub name: String,
    /// This arm's instances (base URLs; added to the pool).
    pub backends: Vec<String>,
    /// Sent as the request's `model` (another model version); default: the request's own.
    #[serde(default)]
    pub model: Option<String>,
    /// A/B tests: this arm's percentage of the traffic (canaries: the stage decides).
    #[serde(default)]
    pub share: Option<f64>,
}

fn default_stages() -> Vec<f64> {
    vec![10.0, 25.0, 50.0, 100.0]
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    /// The requests' `model` this experiment takes.
    pub model: String,
    pub kind: ExperimentKind,
    /// Canary: exactly two, the stable arm first.
    pub arms: Vec<ArmConfig>,
    #[serde(default = "default_stages")]
    pub stages: Vec<f64>,
    #[serde(default = "default_window")]
    pub window_seconds: f64,
    #[serde(default = "default_min_samples")]
    pub min_samples: usize,
    #[serde(default = "default_p")]
    pub max_p_value: f64,
    #[serde(default = "default_effect")]
    pub min_effect_size: f64,
    #[serde(default = "default_error_increase")]
    pub max_error_rate_increase: f64,
}

fn default_window() -> f64 {
    60.0
}
fn default_min_samples() -> usize {
    30
}
fn default_p() -> f64 {
    0.05
}
fn default_effect() -> f64 {
    0.5
}
fn default_error_increase() -> f64 {
    0.05
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagConfig {
    pub name: String,
    /// Percentage of users it is on for.
    pub percent: f64,
    /// Request fields it sets (top level, replacing the request's).
    #[serde(default)]
    pub set: Map<String, Value>,
    /// `EXPERIMENT/ARM`: requests with the flag on go to that arm.
    #[serde(default)]
    pub arm: Option<String>,
}

impl ExperimentConfig {
    pub fn validate(&self) -> Result<(), String> {
        let key = format!("experiments[{}]", self.name);
        if self.arms.len() < 2 || self.arms.iter().any(|a| a.backends.is_empty()) {
            return Err(format!("{key}.arms: at least two arms, each with backends"));
        }
        if self.kind == ExperimentKind::Canary {
            if self.arms.len() != 2 {
                return Err(format!("{key}.arms: a canary has two arms (stable, canary)"));
            }
            if self.stages.is_empty()
                || self.stages.windows(2).any(|w| w[0] >= w[1])
                || self.stages.iter().any(|s| !(*s > 0.0 && *s <= 100.0))
            {
                return Err(format!("{key}.stages: rising percentages in (0, 100]"));
            }
        } else {
            let total: f64 = self.arms.iter().map(|a| a.share.unwrap_or(0.0)).sum();
            if (total - 100.0).abs() > 1e-6 || self.arms.iter().any(|a| a.share.is_none_or(|s| s < 0.0)) {
                return Err(format!("{key}.arms: an A/B test's shares are percentages summing to 100"));
            }
        }
        if !(self.window_seconds.is_finite() && self.window_seconds > 0.0) || self.min_samples < 2 {
            return Err(format!("{key}: window_seconds must be positive and min_samples at least 2"));
        }
        if !(0.0..=1.0).contains(&self.max_p_value) || !(0.0..=1.0).contains(&self.max_error_rate_increase) {
            return Err(format!("{key}: max_p_value and max_error_rate_increase are from 0 to 1"));
        }
        Ok(())
    }
}

/// A finished request as an arm counts it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Seconds to the first byte of the answer.
    pub ttft: Option<f64>,
    /// Mean seconds between a stream's chunks.
    pub itl: Option<f64>,
    pub error: bool,
}

/// Bounded per-stage samples of one arm, with all-time counts.
#[derive(Debug, Default)]
struct Samples {
    ttft: VecDeque<f64>,
    itl: VecDeque<f64>,
    stage_requests: usize,
    stage_errors: usize,
    requests: u64,
    errors: u64,
}

const MAX_SAMPLES: usize = 10_000;

impl Samples {
    fn push(&mut self, s: Sample) {
        let bounded = |q: &mut VecDeque<f64>, v: f64| {
            if q.len() == MAX_SAMPLES {
                q.pop_front();
            }
            q.push_back(v);
        };
        if let Some(v) = s.ttft.filter(|_| !s.error) {
            bounded(&mut self.ttft, v);
        }
        if let Some(v) = s.itl.filter(|_| !s.error) {
            bounded(&mut self.itl, v);
        }
        self.stage_requests += 1;
        self.requests += 1;
        if s.error {
            self.stage_errors += 1;
            self.errors += 1;
        }
    }

    fn new_stage(&mut self) {
        self.ttft.clear();
        self.itl.clear();
        self.stage_requests = 0;
        self.stage_errors = 0;
    }

    fn error_rate(&self) -> f64 {
        if self.stage_requests == 0 {
            0.0
        } else {
            self.stage_errors as f64 / self.stage_requests as f64
        }
    }
}

#[derive(Debug)]
pub struct Arm {
    pub name: String,
    pub backends: Vec<String>,
    pub model: Option<String>,
    samples: Mutex<Samples>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Promoted,
    RolledBack,
}

#[derive(Debug)]
struct State {
    stage: usize,
    stage_started: Instant,
    status: Status,
    history: Vec<Value>,
}

#[derive(Debug)]
pub struct Experiment {
    pub cfg: ExperimentConfig,
    pub arms: Vec<Arm>,
    state: Mutex<State>,
}

/// A number in [0, 100) from `salt` and `key`, the same every time.
pub fn bucket(salt: &str, key: &str) -> f64 {
    let h = xxh3_64(format!("{salt}\u{0}{key}").as_bytes());
    (h % 1_000_000) as f64 / 10_000.0
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// How two arms compare on one measure.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Comparison {
    #[serde(flatten)]
    pub welch: Welch,
    pub effect_size: Option<f64>,
}

fn compare(a: &VecDeque<f64>, b: &VecDeque<f64>) -> Option<Comparison> {
    let (a, b): (Vec<f64>, Vec<f64>) = (a.iter().copied().collect(), b.iter().copied().collect());
    welch(&a, &b).map(|w| Comparison { welch: w, effect_size: cohens_d(&a, &b) })
}

impl Experiment {
    pub fn new(cfg: ExperimentConfig) -> Self {
        let arms = cfg
            .arms
            .iter()
            .map(|a| Arm {
                name: a.name.clone(),
                backends: a.backends.iter().map(|u| u.trim_end_matches('/').to_string()).collect(),
                model: a.model.clone(),
                samples: Mutex::default(),
            })
            .collect();
        let history = vec![json!({"at": unix_now(), "event": "started", "stage": 0})];
        let state = Mutex::new(State { stage: 0, stage_started: Instant::now(), status: Status::Running, history });
        Self { cfg, arms, state }
    }

    /// The canary arm's share of traffic now, in percent.
    pub fn canary_share(&self) -> f64 {
        let s = self.state.lock().unwrap();
        match s.status {
            Status::Running => self.cfg.stages[s.stage],
            Status::Promoted => 100.0,
            Status::RolledBack => 0.0,
        }
    }

    /// The arm for a request keyed by `key`.
    pub fn assign(&self, key: &str) -> usize {
        let b = bucket(&self.cfg.name, key);
        match self.cfg.kind {
            ExperimentKind::Canary => usize::from(b < self.canary_share()),
            ExperimentKind::Ab => {
                let mut acc = 0.0;
                for (k, a) in self.cfg.arms.iter().enumerate() {
                    acc += a.share.unwrap_or(0.0);
                    if b < acc {
                        return k;
                    }
                }
                self.arms.len() - 1
            }
        }
    }

    pub fn arm_index(&self, name: &str) -> Option<usize> {
        self.arms.iter().position(|a| a.name == name)
    }

    pub fn record(&self, arm: usize, s: Sample) {
        self.arms[arm].samples.lock().unwrap().push(s);
    }

    /// Decides a running canary's next step from the current stage's samples: roll back on a regression,
    /// advance when the stage has lasted its window with enough samples, else nothing.
    pub fn evaluate(&self, now: Instant) {
        if self.cfg.kind != ExperimentKind::Canary {
            return;
        }
        let mut st = self.state.lock().unwrap();
        if st.status != Status::Running {
            return;
        }
        let (stable, canary) = (self.arms[0].samples.lock().unwrap(), self.arms[1].samples.lock().unwrap());
        let n = self.cfg.min_samples;
        if stable.stage_requests < n || canary.stage_requests < n {
            return;
        }
        let mut regression = None;
        let increase = canary.error_rate() - stable.error_rate();
        if increase > self.cfg.max_error_rate_increase {
            regression = Some(json!({"measure": "error_rate", "stable": stable.error_rate(),
                "canary": canary.error_rate()}));
        }
        for (measure, a, b) in [("ttft", &stable.ttft, &canary.ttft), ("itl", &stable.itl, &canary.itl)] {
            if regression.is_some() || a.len() < n || b.len() < n {
                continue;
            }
            if let Some(c) = compare(a, b) {
                let worse = c.welch.t > 0.0
                    && c.welch.p < self.cfg.max_p_value
                    && c.effect_size.is_some_and(|d| d > self.cfg.min_effect_size);
                if worse {
                    regression = Some(json!({"measure": measure, "p_value": c.welch.p, "effect_size": c.effect_size,
                        "stable_mean": summarize(&a.iter().copied().collect::<Vec<_>>()).mean,
                        "canary_mean": summarize(&b.iter().copied().collect::<Vec<_>>()).mean}));
                }
            }
        }
        let stage = st.stage;
        let share = self.cfg.stages[stage];
        drop((stable, canary));
        if let Some(why) = regression {
            st.status = Status::RolledBack;
            st.history
                .push(json!({"at": unix_now(), "event": "rolled_back", "stage": stage, "share": share, "why": why}));
            tracing::warn!(experiment = %self.cfg.name, "canary rolled back: {why}");
            return;
        }
        if now.duration_since(st.stage_started) < Duration::from_secs_f64(self.cfg.window_seconds) {
            return;
        }
        let next = stage + 1;
        let promoted = next >= self.cfg.stages.len() || self.cfg.stages[next] >= 100.0;
        if promoted {
            st.status = Status::Promoted;
            st.stage = self.cfg.stages.len() - 1;
            st.history.push(json!({"at": unix_now(), "event": "promoted", "share": 100.0}));
            tracing::info!(experiment = %self.cfg.name, "canary promoted to 100 %");
        } else {
            st.stage = next;
            st.history
                .push(json!({"at": unix_now(), "event": "advanced", "stage": next, "share": self.cfg.stages[next]}));
            tracing::info!(experiment = %self.cfg.name, share = self.cfg.stages[next], "canary advanced");
        }
        st.stage_started = now;
        for a in &self.arms {
            a.samples.lock().unwrap().new_stage();
        }
    }

    /// The experiment as `/admin/experiments` shows it.
    pub fn report(&self) -> Value {
        let st = self.state.lock().unwrap();
        let arms: Vec<Value> = self
            .arms
            .iter()
            .map(|a| {
                let s = a.samples.lock().unwrap();
                let fb: Summary = summarize(&s.ttft.iter().copied().collect::<Vec<_>>());
                let itl: Summary = summarize(&s.itl.iter().copied().collect::<Vec<_>>());
                json!({"name": a.name, "backends": a.backends, "model": a.model, "requests": s.requests,
                    "errors": s.errors, "stage_requests": s.stage_requests, "stage_errors": s.stage_errors,
                    "stage_error_rate": s.error_rate(), "ttft_seconds": fb, "itl_seconds": itl})
            })
            .collect();
        let (a, b) = (self.arms[0].samples.lock().unwrap(), self.arms[1].samples.lock().unwrap());
        let comparison = json!({
            "ttft": compare(&a.ttft, &b.ttft),
            "itl": compare(&a.itl, &b.itl),
        });
        let share = match (self.cfg.kind, st.status) {
            (ExperimentKind::Ab, _) => Value::Null,
            (_, Status::Running) => json!(self.cfg.stages[st.stage]),
            (_, Status::Promoted) => json!(100.0),
            (_, Status::RolledBack) => json!(0.0),
        };
        json!({"name": self.cfg.name, "kind": self.cfg.kind, "model": self.cfg.model, "status": st.status,
            "stage": st.stage, "stages": self.cfg.stages, "canary_share": share,
            "stage_seconds": st.stage_started.elapsed().as_secs_f64(), "arms": arms,
            "comparison": comparison, "history": st.history})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canary(window: f64) -> Experiment {
        Experiment::new(ExperimentConfig {
            name: "c".into(),
            model: "m".into(),
            kind: ExperimentKind::Canary,
            arms: vec![
                ArmConfig { name: "stable".into(), backends: vec!["http://a".into()], model: None, share: None },
                ArmConfig { name: "canary".into(), backends: vec!["http://b".into()], model: None, share: None },
            ],
            stages: default_stages(),
            window_seconds: window,
            min_samples: 20,
            max_p_value: 0.05,
            min_effect_size: 0.5,
            max_error_rate_increase: 0.05,
        })
    }

    fn feed(e: &Experiment, arm: usize, mean: f64, n: usize, errors: usize) {
        for i in 0..n {
            let jitter = ((i * 37 % 11) as f64 - 5.0) * 0.002;
            e.record(arm, Sample { ttft: Some(mean + jitter), itl: Some(0.01 + jitter / 10.0), error: i < errors });
        }
    }

    #[test]
    fn buckets_are_stable_and_uniform() {
        assert_eq!(bucket("e", "user-1"), bucket("e", "user-1"));
        let below: usize = (0..10_000).filter(|u| bucket("e", &format!("user-{u}")) < 10.0).count();
        assert!((900..1100).contains(&below), "{below} of 10000 under 10 %");
        let e = canary(1.0);
        let to_canary: usize = (0..2000).filter(|u| e.assign(&format!("u{u}")) == 1).count();
        assert!((150..250).contains(&to_canary), "10 % stage: {to_canary} of 2000");
    }

    #[test]
    fn an_equal_canary_advances_to_promotion() {
        let e = canary(0.0);
        for stage in [25.0, 50.0] {
            feed(&e, 0, 0.1, 30, 0);
            feed(&e, 1, 0.1, 30, 0);
            e.evaluate(Instant::now());
            assert_eq!(e.canary_share(), stage);
        }
        feed(&e, 0, 0.1, 30, 0);
        feed(&e, 1, 0.1, 30, 0);
        e.evaluate(Instant::now());
        assert_eq!(e.canary_share(), 100.0);
        assert_eq!(e.report()["status"], "promoted");
        assert_eq!(e.report()["history"].as_array().unwrap().len(), 4, "started, two advances, promoted");
    }

    #[test]
    fn a_slower_canary_rolls_back_and_waits_for_samples_and_windows() {
        let e = canary(3600.0);
        feed(&e, 0, 0.1, 10, 0);
        feed(&e, 1, 0.3, 10, 0);
        e.evaluate(Instant::now());
        assert_eq!(e.canary_share(), 10.0, "too few samples: no decision yet");
        let e = canary(3600.0);
        feed(&e, 0, 0.1, 30, 0);
        feed(&e, 1, 0.1, 30, 0);
        e.evaluate(Instant::now());
        assert_eq!(e.canary_share(), 10.0, "equal, but the window is not over: it stays");
        let e = canary(3600.0);
        feed(&e, 0, 0.1, 30, 0);
        feed(&e, 1, 0.15, 30, 0);
        e.evaluate(Instant::now());
        assert_eq!(e.canary_share(), 0.0, "50 % slower: rolled back");
        let r = e.report();
        let last = r["history"].as_array().unwrap().last().unwrap().clone();
        assert_eq!((r["status"].as_str(), last["why"]["measure"].as_str()), (Some("rolled_back"), Some("ttft")));
        assert!(last["why"]["p_value"].as_f64().unwrap() < 0.05);
        assert_eq!(e.assign("anyone"), 0, "after a rollback all traffic is stable");
    }

    #[test]
    fn a_failing_canary_rolls_back_on_errors() {
        let e = canary(3600.0);
        feed(&e, 0, 0.1, 40, 0);
        feed(&e, 1, 0.1, 40, 4);
        e.evaluate(Instant::now());
        assert_eq!(e.report()["status"], "rolled_back");
        assert_eq!(e.report()["history"][1]["why"]["measure"], "error_rate");
    }

    #[test]
    fn ab_shares_and_validation() {
        let mut cfg = canary(1.0).cfg;
        cfg.kind = ExperimentKind::Ab;
        assert!(cfg.validate().is_err(), "an A/B test needs shares");
        cfg.arms[0].share = Some(70.0);
        cfg.arms[1].share = Some(30.0);
        cfg.validate().unwrap();
        let e = Experiment::new(cfg);
        let b: usize = (0..4000).filter(|u| e.assign(&format!("u{u}")) == 1).count();
        assert!((1000..1400).contains(&b), "30 %: {b} of 4000");
        feed(&e, 0, 0.1, 30, 0);
        feed(&e, 1, 0.5, 30, 0);
        e.evaluate(Instant::now());
        assert_eq!(e.report()["status"], "running", "an A/B test never decides by itself");
        assert!(e.report()["comparison"]["ttft"]["p"].as_f64().unwrap() < 1e-6);
        let mut bad = canary(1.0).cfg;
        bad.stages = vec![50.0, 25.0];
        assert!(bad.validate().is_err());
    }
}

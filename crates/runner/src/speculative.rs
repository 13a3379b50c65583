//! Speculative decoding's proposers and the choice of how many tokens to propose (#20).
//!
//! After each step the executor asks the [`Speculator`] for draft tokens for the sequences it sampled: n-gram
//! prompt lookup (the tokens that followed the last earlier occurrence of the sequence's last n tokens) or a
//! draft model's greedy continuation ([`crate::draft::DraftModel`]). The scheduler runs them in the next step
//! with the sequence's last token, and the executor verifies them there: it samples the target at every
//! position, exactly as it would without speculation, and keeps drafts while they equal the sample.
//!
//! That is speculative sampling's rule for a proposal `q` that is one-hot on the draft token `d` (both
//! proposers are deterministic): accept `d` with probability `min(1, p(d)/q(d)) = p(d)`, else draw from
//! `max(0, p − q)` normalized, which is `p` without `d`. Drawing `x ~ p` and keeping `d` when `x = d`, emitting
//! `x` otherwise, has exactly those probabilities; and since the draw for each output position comes from that
//! position's own generator ([`crate::sampler::rng_at`]), the tokens are the very ones decoding without
//! speculation gives, greedy or sampled, seed for seed, with every sampling parameter and constraint applied.
//!
//! How many to propose adapts per sequence: an exponential average of the sequence's acceptance rate `a`
//! picks the `k` that maximizes the expected tokens per step, `(1 − a^(k+1)) / (1 − a)`, over the step's
//! relative cost, `1 + k · (verify_cost + draft_cost)`. A sequence whose best `k` is 0 stops proposing and
//! tries one draft token every [`PROBE_INTERVAL`] steps. Steps with more than `disable_by_batch_size`
//! sequences propose nothing: batching already shares the weights' reads, and verification would cost more
//! than it saves.

use crate::draft::DraftModel;
use mlx_serving_engine::{ngram, RequestId, MAX_SPECULATIVE_TOKENS};
use std::collections::HashMap;

/// Which proposer speculates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecMethod {
    /// N-gram prompt lookup: no extra model.
    Ngram,
    /// A smaller model sharing the target's vocabulary.
    Draft,
}

/// `runtime.yaml`'s `speculative:` settings, as the runner uses them.
#[derive(Clone, Debug, PartialEq)]
pub struct SpeculativeConfig {
    pub method: SpecMethod,
    /// Most draft tokens per sequence and step (at most [`MAX_SPECULATIVE_TOKENS`]).
    pub num_speculative_tokens: usize,
    /// Shortest and longest n-grams the lookup matches.
    pub prompt_lookup_min: usize,
    pub prompt_lookup_max: usize,
    /// Steps with more sequences than this do not speculate.
    pub disable_by_batch_size: usize,
    /// Cost of verifying one more token, relative to a plain decode step (measured on the CPU kernels: 8
    /// tokens of Qwen2.5-1.5B take 2.6 times one token's step, see BENCHMARKS.md).
    pub verify_cost: f64,
}

impl Default for SpeculativeConfig {
    fn default() -> Self {
        Self {
            method: SpecMethod::Ngram,
            num_speculative_tokens: 5,
            prompt_lookup_min: 2,
            prompt_lookup_max: 4,
            disable_by_batch_size: 4,
            verify_cost: 0.2,
        }
    }
}

impl SpeculativeConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_SPECULATIVE_TOKENS).contains(&self.num_speculative_tokens) {
            return Err(format!(
                "num_speculative_tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}, got {}",
                self.num_speculative_tokens
            ));
        }
        if self.prompt_lookup_min == 0 || self.prompt_lookup_min > self.prompt_lookup_max {
            return Err(format!(
                "prompt_lookup_min must be at least 1 and at most prompt_lookup_max, got {} and {}",
                self.prompt_lookup_min, self.prompt_lookup_max
            ));
        }
        if !(self.verify_cost >= 0.0 && self.verify_cost.is_finite()) {
            return Err(format!("verify_cost must be a non-negative number, got {}", self.verify_cost));
        }
        Ok(())
    }
}

/// Steps between single-token probes of a sequence that stopped proposing.
pub const PROBE_INTERVAL: u32 = 8;

/// The acceptance rate a sequence starts with.
const PRIOR_ACCEPTANCE: f64 = 0.7;

/// Weight of the newest step in the acceptance average.
const EMA_WEIGHT: f64 = 0.3;

/// One sequence's acceptance history.
#[derive(Clone, Debug)]
pub struct SpecState {
    acceptance: f64,
    idle_steps: u32,
}

impl Default for SpecState {
    fn default() -> Self {
        Self { acceptance: PRIOR_ACCEPTANCE, idle_steps: 0 }
    }
}

impl SpecState {
    /// Records a verification: `accepted` of `proposed` drafts kept. Each draft position that was reached
    /// counts as a trial: all `accepted`, plus the rejected one if any.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        let trials = (accepted + 1).min(proposed);
        let rate = accepted as f64 / trials as f64;
        self.acceptance = (1.0 - EMA_WEIGHT) * self.acceptance + EMA_WEIGHT * rate;
    }

    pub fn acceptance(&self) -> f64 {
        self.acceptance
    }

    /// How many tokens to propose next, at most `max`, with `cost` the relative cost of one more draft token
    /// (verifying it, and drafting it with a draft model).
    pub fn next_k(&mut self, max: usize, cost: f64) -> usize {
        let k = best_k(self.acceptance, max, cost);
        if k > 0 {
            self.idle_steps = 0;
            return k;
        }
        self.idle_steps += 1;
        if self.idle_steps >= PROBE_INTERVAL {
            self.idle_steps = 0;
            return max.min(1);
        }
        0
    }
}

/// The `k` in `0..=max` that maximizes expected tokens per step over the step's cost (see the module doc).
pub fn best_k(acceptance: f64, max: usize, cost: f64) -> usize {
    let a = acceptance.clamp(0.0, 0.999);
    let (mut best, mut best_value) = (0, 1.0);
    let mut expected = 1.0;
    let mut power = 1.0;
    for k in 1..=max {
        power *= a;
        expected += power;
        let value = expected / (1.0 + k as f64 * cost);
        if value > best_value * (1.0 + 1e-9) {
            (best, best_value) = (k, value);
        }
    }
    best
}

/// The proposer of an executor.
pub struct Speculator {
    cfg: SpeculativeConfig,
    draft: Option<DraftModel>,
}

impl Speculator {
    /// N-gram lookup, or a draft model when `draft` is given (the method must say so).
    pub fn new(cfg: SpeculativeConfig, draft: Option<DraftModel>) -> Result<Self, String> {
        cfg.validate()?;
        match (cfg.method, &draft) {
            (SpecMethod::Draft, None) => return Err("speculative method `draft` needs a draft model".into()),
            (SpecMethod::Ngram, Some(_)) => return Err("a draft model was given for the `ngram` method".into()),
            _ => {}
        }
        Ok(Self { cfg, draft })
    }

    pub fn config(&self) -> &SpeculativeConfig {
        &self.cfg
    }

    /// Whether a draft model proposes (n-gram lookup otherwise).
    pub fn uses_draft(&self) -> bool {
        self.draft.is_some()
    }

    /// Relative cost of one more draft token.
    pub fn token_cost(&self) -> f64 {
        self.cfg.verify_cost + self.draft.as_ref().map_or(0.0, |d| d.relative_cost())
    }

    /// Draft tokens for each `(sequence, its tokens so far, how many)`; sequences without a proposal are left
    /// out. A draft model's failure is logged and proposes nothing: speculation never fails a request.
    pub fn propose(&mut self, wanted: &[(RequestId, Vec<u32>, usize)]) -> HashMap<RequestId, Vec<u32>> {
        let wanted: Vec<&(RequestId, Vec<u32>, usize)> = wanted.iter().filter(|w| w.2 > 0).collect();
        match &mut self.draft {
            None => wanted
                .iter()
                .map(|(id, tokens, k)| {
                    (*id, ngram::propose(tokens, self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max, *k))
                })
                .filter(|(_, d)| !d.is_empty())
                .collect(),
            Some(draft) => draft.propose(&wanted).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the draft model failed; no speculation this step");
                HashMap::new()
            }),
        }
    }

    /// Forgets a sequence (finished, aborted or preempted).
    pub fn remove(&mut self, id: RequestId) {
        if let Some(d) = &mut self.draft {
            d.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_grows_with_acceptance_and_shrinks_with_cost() {
        assert_eq!(best_k(0.1, 8, 0.2), 0, "rarely accepted: not worth a token");
        assert_eq!(best_k(0.99, 8, 0.0), 8, "free verification: propose the most");
        let ks: Vec<usize> = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95].iter().map(|&a| best_k(a, 10, 0.2)).collect();
        assert!(ks.windows(2).all(|w| w[0] <= w[1]), "k rises with acceptance: {ks:?}");
        assert!(ks[0] < ks[5]);
        assert!(best_k(0.8, 10, 0.6) < best_k(0.8, 10, 0.1), "a costlier draft proposes fewer");
        // The choice is the argmax of the stated value.
        let value = |a: f64, k: usize, c: f64| (0..=k).map(|i| a.powi(i as i32)).sum::<f64>() / (1.0 + k as f64 * c);
        for a in [0.4, 0.6, 0.85] {
            let k = best_k(a, 10, 0.25);
            assert!((0..=10).all(|j| value(a, j, 0.25) <= value(a, k, 0.25) + 1e-12), "a = {a}: k = {k}");
        }
    }

    #[test]
    fn a_sequence_that_stops_proposing_still_probes() {
        let mut s = SpecState::default();
        for _ in 0..20 {
            s.record(4, 0);
        }
        assert!(s.acceptance() < 0.01);
        let ks: Vec<usize> = (0..2 * PROBE_INTERVAL).map(|_| s.next_k(5, 0.2)).collect();
        assert_eq!(ks.iter().filter(|&&k| k == 1).count(), 2, "{ks:?}");
        assert!(ks.iter().all(|&k| k <= 1));
        // Accepted probes raise the average back up.
        for _ in 0..10 {
            s.record(1, 1);
        }
        assert!(s.next_k(5, 0.2) >= 2);
    }

    #[test]
    fn ngram_speculator_proposes_from_the_sequence() {
        let mut s = Speculator::new(SpeculativeConfig { prompt_lookup_min: 1, ..Default::default() }, None).unwrap();
        let toks = vec![5, 6, 7, 8, 1, 5, 6];
        let got =
            s.propose(&[(RequestId(1), toks, 2), (RequestId(2), vec![1, 2, 3], 2), (RequestId(3), vec![4, 4], 0)]);
        assert_eq!(got.len(), 1, "no match for 2, none asked of 3: {got:?}");
        assert_eq!(got[&RequestId(1)], vec![7, 8]);
    }

    #[test]
    fn configurations_are_checked() {
        let bad = |f: fn(&mut SpeculativeConfig)| {
            let mut c = SpeculativeConfig::default();
            f(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.num_speculative_tokens = 0));
        assert!(bad(|c| c.num_speculative_tokens = MAX_SPECULATIVE_TOKENS + 1));
        assert!(bad(|c| c.prompt_lookup_min = 0));
        assert!(bad(|c| c.prompt_lookup_min = 5));
        assert!(bad(|c| c.verify_cost = f64::NAN));
        assert!(SpeculativeConfig::default().validate().is_ok());
        assert!(Speculator::new(SpeculativeConfig { method: SpecMethod::Draft, ..Default::default() }, None).is_err());
    }
}

//! Per-request sampling: logits processors (penalties, logit bias, temperature, min-p, top-k, top-p) and a
//! seeded draw. Each request owns its [`Sampler`], and the draw for output position `i` uses a generator
//! seeded from the request's seed and `i` alone: the same seed gives the same tokens whatever else shares the
//! batch, however many positions a step samples (speculative decoding samples several), and after a
//! preemption.

use mlx_serving_engine::{SamplingParams, TokenLogprobs};
use std::collections::HashMap;

/// xoshiro256** seeded through splitmix64: small, fast, and stable across platforms and versions, which
/// makes a seed's output reproducible for as long as the sampling code is unchanged.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A seed for requests that did not ask for one.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// The generator for output position `pos` of a request seeded with `seed`.
pub fn rng_at(seed: u64, pos: usize) -> Rng {
    // Two splitmix64 finalizers, so neighbouring positions (and seeds) share no state.
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    Rng::seed_from_u64(mix(seed) ^ mix((pos as u64).wrapping_add(0x632B_E59B_D9B4_E019)))
}

#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    /// Scratch for the candidate list, reused across steps.
    candidates: Vec<(f32, u32)>,
    /// Tokens that may not be drawn while the output is shorter than `min_tokens` (stop and EOS ids).
    held_back: Vec<u32>,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(random_seed);
        let held_back = if params.min_tokens > 0 { params.stop_token_ids.clone() } else { Vec::new() };
        Self { params: params.clone(), seed, candidates: Vec::new(), held_back }
    }

    /// Declares the model's end-of-generation ids, which `min_tokens` holds back unless `ignore_eos` is set.
    pub fn with_eos(mut self, eos: &[u32]) -> Self {
        if self.params.min_tokens > 0 && !self.params.ignore_eos {
            self.held_back.extend_from_slice(eos);
        }
        self
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether [`sample_masked`](Self::sample_masked) without a mask comes down to the [`argmax`] of the raw
    /// logits, at output length `output_len` and after: greedy, no penalty, no bias, no tokens held back
    /// (`min_tokens` reached). A device may then return the argmax alone
    /// ([`DeviceModel::forward_select`](mlx_serving_models::DeviceModel::forward_select)).
    pub fn is_plain_argmax(&self, output_len: usize) -> bool {
        // Every field named, so that a new one that changes the logits is decided on here.
        let SamplingParams {
            temperature: _, // through is_greedy
            top_p: _,
            top_k: _,
            min_p: _, // truncations keep the most probable token: greedy takes it anyway
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            seed: _,
            max_tokens: _,
            stop: _,
            stop_token_ids: _, // held back with EOS only before min_tokens
            ignore_eos: _,
            min_tokens,
            logprobs: _,
            prompt_logprobs: _, // read from the logits: the executor's `argmax_suffices` checks them
            speculative: _,
        } = &self.params;
        self.params.is_greedy()
            && *repetition_penalty == 1.0
            && *presence_penalty == 0.0
            && *frequency_penalty == 0.0
            && logit_bias.is_empty()
            && output_len >= *min_tokens as usize
    }

    /// Applies the processors to `logits` in place and draws the next token.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], output: &[u32]) -> u32 {
        self.sample_masked(logits, prompt, output, None).unwrap_or_else(|| argmax(logits))
    }

    /// `sample` among the tokens a constraint's bit mask allows (see `ConstraintState::allowed`; tokens past
    /// its end are refused). The mask comes last, after penalties and biases; `min_tokens` holds back its
    /// tokens only where something else stays allowed (a finished constraint allows end-of-sequence alone).
    /// `None` when no token is left.
    pub fn sample_masked(
        &mut self,
        logits: &mut [f32],
        prompt: &[u32],
        output: &[u32],
        mask: Option<&[u32]>,
    ) -> Option<u32> {
        self.apply_penalties(logits, prompt, output);
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if let Some(mask) = mask {
            apply_mask(logits, mask);
        }
        if output.len() < self.params.min_tokens as usize {
            let saved: Vec<(usize, f32)> =
                self.held_back.iter().filter_map(|&id| logits.get(id as usize).map(|&l| (id as usize, l))).collect();
            for &(i, _) in &saved {
                logits[i] = f32::NEG_INFINITY;
            }
            if mask.is_some_and(|m| !any_allowed(logits, m)) {
                saved.into_iter().for_each(|(i, l)| logits[i] = l);
            }
        }
        if mask.is_some_and(|m| !any_allowed(logits, m)) {
            return None;
        }
        if self.params.is_greedy() {
            return Some(argmax(logits));
        }
        Some(self.sample_from(logits, output.len()))
    }

    fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32], output: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(output) {
                if let Some(s) = seen.get_mut(t as usize) {
                    if !*s {
                        *s = true;
                        let l = &mut logits[t as usize];
                        *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in output {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
    }

    /// Draws from `logits` after temperature and truncation, with output position `pos`'s generator.
    fn sample_from(&mut self, logits: &[f32], pos: usize) -> u32 {
        let p = &self.params;
        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (l, i as u32)));
        if cands.is_empty() {
            return argmax(logits);
        }
        let max = cands.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
        // Probabilities (unnormalized) relative to the top token: exp((l - max) / t) in (0, 1]. Subtracting
        // before scaling keeps every exponent at or below 0 (scaling first overflowed to inf - inf = NaN at
        // tiny temperatures); a temperature whose inverse is not finite is the argmax.
        let inv_t = 1.0 / p.temperature;
        if !inv_t.is_finite() {
            return argmax(logits);
        }
        for c in cands.iter_mut() {
            c.0 = ((c.0 - max) * inv_t).exp();
        }
        if p.min_p > 0.0 {
            cands.retain(|c| c.0 >= p.min_p);
        }
        if p.top_k > 0 && (p.top_k as usize) < cands.len() {
            let k = p.top_k as usize;
            cands.select_nth_unstable_by(k - 1, by_prob_desc);
            cands.truncate(k);
        }
        if p.top_p < 1.0 {
            nucleus(cands, p.top_p);
        }
        let total: f64 = cands.iter().map(|c| c.0 as f64).sum();
        let mut u = rng_at(self.seed, pos).next_f64() * total;
        for c in cands.iter() {
            u -= c.0 as f64;
            if u < 0.0 {
                return c.1;
            }
        }
        cands.last().map_or(0, |c| c.1)
    }
}

/// The candidates' order for truncation: more probable first, ties to the lower id (a strict order).
fn by_prob_desc(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Candidates `(probability, id)` cut to the nucleus, sorted by probability (ties to the lower id): the most
/// probable tokens whose running sum first reaches `top_p` of the total. It is a short prefix as a rule, so only
/// a top slice is sorted: the `k` largest (a strict order, so the same `k` a full sort would put first), widened
/// while their sum falls short. Sums in f64: the total does not depend on the order it is taken in.
fn nucleus(cands: &mut Vec<(f32, u32)>, top_p: f32) {
    let total: f64 = cands.iter().map(|c| c.0 as f64).sum();
    let target = top_p as f64 * total;
    let mut k = cands.len().min(256);
    let keep = loop {
        if k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_prob_desc);
        }
        cands[..k].sort_unstable_by(by_prob_desc);
        let mut acc = 0.0f64;
        if let Some(i) = cands[..k].iter().position(|c| {
            acc += c.0 as f64;
            acc >= target
        }) {
            break i + 1;
        }
        if k == cands.len() {
            break k;
        }
        k = (k * 8).min(cands.len());
    };
    cands.truncate(keep);
}

/// Sets the logits of the tokens `mask` does not allow to −∞ (bit `t % 32` of word `t / 32` allows `t`).
pub fn apply_mask(logits: &mut [f32], mask: &[u32]) {
    for (i, chunk) in logits.chunks_mut(32).enumerate() {
        match mask.get(i).copied().unwrap_or(0) {
            u32::MAX => {}
            0 => chunk.fill(f32::NEG_INFINITY),
            w => {
                for (b, l) in chunk.iter_mut().enumerate() {
                    if w >> b & 1 == 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

/// Whether a token `mask` allows still has a finite logit (scans the mask's words, not the whole vocabulary).
fn any_allowed(logits: &[f32], mask: &[u32]) -> bool {
    mask.iter()
        .enumerate()
        .filter(|(_, &w)| w != 0)
        .any(|(i, &w)| logits.iter().skip(32 * i).take(32).enumerate().any(|(b, l)| w >> b & 1 == 1 && l.is_finite()))
}

/// Index of the largest logit; ties go to the lowest id (as `torch.argmax`). One definition with the GPU's
/// (`mlx_serving_models::argmax`, which its argmax kernel matches).
pub use mlx_serving_models::argmax;

/// `log_softmax(logits)[id]`, computed in f64.
pub fn logprob(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    (logits[id as usize] as f64 - lse) as f32
}

/// The logprob of `token` and the `k` most likely tokens (most likely first, ties to the lower id), all from
/// `log_softmax(logits)` computed in f64.
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    let lp = |id: u32| (logits[id as usize] as f64 - lse) as f32;
    // Keep a sorted list of the best k: one pass, O(vocab · k) worst case but k ≤ 20 and most tokens lose
    // against the smallest kept value at once.
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if k == 0 || (top.len() == k && l <= top[k - 1].0) {
            continue;
        }
        let at = top.partition_point(|&(v, _)| v >= l);
        top.insert(at, (l, i as u32));
        top.truncate(k);
    }
    let own = logits[token as usize];
    let rank = 1 + logits.iter().filter(|&&l| l > own).count() as u32;
    TokenLogprobs { token, logprob: lp(token), rank, top: top.into_iter().map(|(_, id)| (id, lp(id))).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { temperature: 1.0, seed: Some(7), max_tokens: 1, ..SamplingParams::default() };
        f(&mut p);
        p
    }

    /// `n` draws at output positions 0 .. n (penalties are off in these tests: the output's ids do not matter).
    fn draw_many(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p);
        let output = vec![0u32; n];
        (0..n).map(|i| s.sample(&mut logits.to_vec(), &[], &output[..i])).collect()
    }

    /// Regression (#27, item 13): at temperatures of 1e-38 and 1e-45 (f32 subnormals) the scaled logits
    /// overflowed to inf, inf - inf gave NaN, and every draw fell through to the last candidate: SmolLM2 said
    /// "ectableectable...". Tiny temperatures give the argmax.
    #[test]
    fn tiny_temperatures_give_the_argmax() {
        let logits: Vec<f32> = (0..101).map(|i| 12.0 + ((i * 37) % 101) as f32 * 0.07).collect();
        let best = argmax(&logits);
        for t in [1e-4, 1e-5, 1e-6, 1e-20, 1e-38, 1e-45, f32::MIN_POSITIVE] {
            let draws = draw_many(&params(|p| p.temperature = t), &logits, 50);
            assert!(draws.iter().all(|&d| d == best), "temperature {t:e}: {draws:?}, argmax {best}");
        }
    }

    /// The scaling itself cannot overflow, whatever reaches it: `(l - max) / t` keeps exponents at or below 0.
    #[test]
    fn scaling_at_a_tiny_temperature_picks_the_top_token() {
        let logits: Vec<f32> = (0..101).map(|i| 12.0 + ((i * 37) % 101) as f32 * 0.07).collect();
        for t in [1e-30, 1e-45] {
            let mut s = Sampler::new(&params(|p| p.temperature = t));
            for pos in 0..20 {
                assert_eq!(s.sample_from(&logits, pos), argmax(&logits), "temperature {t:e}");
            }
        }
    }

    /// A constraint's mask leaves only its tokens (greedy and sampled, whatever the biases), refuses ids past
    /// its end, and wins over `min_tokens` when end-of-sequence is all it allows; an all-refusing mask is `None`.
    #[test]
    fn masks_restrict_the_draw() {
        let logits: Vec<f32> = (0..70).map(|i| (i % 7) as f32).collect();
        let mut mask = vec![0u32; 2];
        for t in [3u32, 40, 63] {
            mask[t as usize / 32] |= 1 << (t % 32);
        }
        let mut g = Sampler::new(&SamplingParams { logit_bias: vec![(6, 50.0)], ..SamplingParams::greedy(8) });
        assert_eq!(g.sample_masked(&mut logits.clone(), &[], &[], Some(&mask)), Some(40), "best allowed: 40 % 7 = 5");
        let mut s = Sampler::new(&params(|_| {}));
        let output = vec![0u32; 200];
        for i in 0..200 {
            let t = s.sample_masked(&mut logits.clone(), &[], &output[..i], Some(&mask)).unwrap();
            assert!([3, 40, 63].contains(&t), "{t}");
        }
        // Ids 64.. lie past the mask: refused.
        let all = vec![u32::MAX; 2];
        let mut l = logits.clone();
        l[66] = 99.0;
        let mut plain = Sampler::new(&SamplingParams::greedy(8));
        assert_eq!(
            plain.sample_masked(&mut l, &[], &[], Some(&all)),
            Some(6),
            "66 refused: the first 6 (of 6, 13, ..., 62)"
        );
        // min_tokens would hold back EOS (1), the only allowed token: the constraint wins.
        let p = SamplingParams { min_tokens: 5, ..SamplingParams::greedy(8) };
        let mut m = Sampler::new(&p).with_eos(&[1]);
        assert_eq!(m.sample_masked(&mut logits.clone(), &[], &[], Some(&[1 << 1, 0])), Some(1));
        assert_eq!(m.sample_masked(&mut logits.clone(), &[], &[], Some(&[(1 << 1) | (1 << 2), 0])), Some(2));
        assert_eq!(m.sample_masked(&mut logits.clone(), &[], &[], Some(&[0, 0])), None);
    }

    #[test]
    fn min_tokens_holds_back_eos_and_stop_ids_then_releases_them() {
        let p = SamplingParams { min_tokens: 2, stop_token_ids: vec![3], ..SamplingParams::greedy(8) };
        let mut s = Sampler::new(&p).with_eos(&[1]);
        let logits = [0.0, 9.0, 1.0, 8.0, 2.0];
        assert_eq!(s.sample(&mut logits.to_vec(), &[], &[]), 4, "EOS (1) and stop id (3) held back");
        assert_eq!(s.sample(&mut logits.to_vec(), &[], &[4]), 4);
        assert_eq!(s.sample(&mut logits.to_vec(), &[], &[4, 4]), 1, "released after min_tokens");
        let ignore = SamplingParams { ignore_eos: true, ..p };
        assert_eq!(Sampler::new(&ignore).with_eos(&[1]).sample(&mut logits.to_vec(), &[], &[]), 1);
    }

    #[test]
    fn token_logprobs_match_log_softmax_and_rank_the_top() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let t = token_logprobs(&logits, 4, 3);
        assert!((t.logprob - logprob(&logits, 4)).abs() < 1e-6);
        let ids: Vec<u32> = t.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 2, 0]);
        // The chosen token (4) is outside the top 3 and still gets its own logprob; the top entries carry
        // the same logprobs the tokens would get if chosen.
        for &(id, lp) in &t.top {
            assert!((lp - token_logprobs(&logits, id, 0).logprob).abs() < 1e-6, "top entry {id}");
        }
        let total: f64 = (0..logits.len() as u32).map(|i| (token_logprobs(&logits, i, 0).logprob as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "probabilities sum to one: {total}");
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        // k beyond the vocabulary: every token, best first.
        let all = token_logprobs(&logits, 0, 10).top;
        assert_eq!(all.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 0, 4, 3]);
    }

    #[test]
    fn greedy_takes_argmax_and_lowest_id_on_ties() {
        let mut s = Sampler::new(&SamplingParams::greedy(1));
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 3.0], &[], &[]), 1);
    }

    /// Pearson's chi-square of observed `counts` against expected probabilities `p`.
    fn chi_square(counts: &[u64], p: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts.iter().zip(p).map(|(&c, &pi)| (c as f64 - n as f64 * pi).powi(2) / (n as f64 * pi)).sum()
    }

    /// Each position has its own generator: draws at one position follow the distribution, and draws at
    /// neighbouring positions of one seed are independent. Over 20,000 seeds, the pairs of tokens drawn at
    /// positions 0 and 1 from a 4-token distribution are tested against the product distribution (15 degrees of
    /// freedom: chi-square below 37.7, p = 0.001), and the first tokens against the distribution (3 degrees:
    /// below 16.27).
    #[test]
    fn positions_draw_independently_from_the_distribution() {
        let logits = [0.0f32, 1.0, 0.5, -1.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let p: Vec<f64> = logits.iter().map(|&l| (l as f64).exp() / z).collect();
        let (mut pairs, mut firsts) = (vec![0u64; 16], vec![0u64; 4]);
        for seed in 0..20_000u64 {
            let mut s = Sampler::new(&params(|p| p.seed = Some(seed)));
            let a = s.sample(&mut logits.to_vec(), &[], &[]) as usize;
            let b = s.sample(&mut logits.to_vec(), &[], &[a as u32]) as usize;
            pairs[a * 4 + b] += 1;
            firsts[a] += 1;
        }
        let product: Vec<f64> = (0..16).map(|i| p[i / 4] * p[i % 4]).collect();
        let (pair_chi, first_chi) = (chi_square(&pairs, &product), chi_square(&firsts, &p));
        assert!(pair_chi < 37.7, "pairs: chi-square {pair_chi:.1}, counts {pairs:?}");
        assert!(first_chi < 16.27, "first tokens: chi-square {first_chi:.1}, counts {firsts:?}");
    }

    /// The draw depends on the seed and the position only: sampling position 5 gives the same token whether
    /// or not positions 0..5 were drawn by this sampler before.
    #[test]
    fn a_position_draws_the_same_token_whatever_came_before() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.7).sin()).collect();
        let output = vec![3u32; 5];
        let mut fresh = Sampler::new(&params(|_| {}));
        let mut used = Sampler::new(&params(|_| {}));
        for i in 0..5 {
            used.sample(&mut logits.clone(), &[], &output[..i]);
        }
        assert_eq!(fresh.sample(&mut logits.clone(), &[], &output), used.sample(&mut logits.clone(), &[], &output));
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.7).sin()).collect();
        let a = draw_many(&params(|_| {}), &logits, 64);
        let b = draw_many(&params(|_| {}), &logits, 64);
        let c = draw_many(&params(|p| p.seed = Some(8)), &logits, 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_restricts_to_the_k_best() {
        let logits = [1.0, 5.0, 2.0, 4.0, 3.0];
        let got = draw_many(&params(|p| p.top_k = 2), &logits, 200);
        assert!(got.iter().all(|&t| t == 1 || t == 3), "{got:?}");
        assert!(got.contains(&1) && got.contains(&3));
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let got = draw_many(&params(|p| p.top_p = 0.8), &logits, 300);
        assert!(got.iter().all(|&t| t <= 1), "{got:?}");
        assert!(got.contains(&1));
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // relative probs: 1, e^-1=0.37, e^-3=0.05: min_p 0.1 drops the last.
        let logits = [3.0, 2.0, 0.0];
        let got = draw_many(&params(|p| p.min_p = 0.1), &logits, 300);
        assert!(!got.contains(&2));
        assert!(got.contains(&1));
    }

    #[test]
    fn temperature_sharpens_the_distribution() {
        let logits = [1.0, 0.0];
        let hot = draw_many(&params(|p| p.temperature = 2.0), &logits, 2000).iter().filter(|&&t| t == 1).count();
        let cold = draw_many(&params(|p| p.temperature = 0.25), &logits, 2000).iter().filter(|&&t| t == 1).count();
        // P(1) is 0.38 at T=2 and 0.018 at T=0.25.
        assert!(hot > 600 && cold < 120, "hot {hot} cold {cold}");
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let s = Sampler::new(&params(|p| p.repetition_penalty = 2.0));
        let mut l = [4.0, -4.0, 4.0];
        s.apply_penalties(&mut l, &[0], &[1]);
        assert_eq!(l, [2.0, -8.0, 4.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_follow_openai() {
        let s = Sampler::new(&params(|p| {
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25;
        }));
        let mut l = [1.0, 1.0, 1.0];
        // Prompt tokens are not penalized; token 1 appears 3 times in the output.
        s.apply_penalties(&mut l, &[0, 0], &[1, 1, 1]);
        assert_eq!(l, [1.0, 1.0 - 0.75 - 0.5, 1.0]);
    }

    #[test]
    fn logit_bias_can_force_or_ban_a_token() {
        let mut s = Sampler::new(&SamplingParams { logit_bias: vec![(2, 100.0)], ..SamplingParams::greedy(1) });
        assert_eq!(s.sample(&mut [5.0, 4.0, 0.0], &[], &[]), 2);
        let mut s = Sampler::new(&SamplingParams { logit_bias: vec![(0, -100.0)], ..SamplingParams::greedy(1) });
        assert_eq!(s.sample(&mut [5.0, 4.0, 0.0], &[], &[]), 1);
    }

    #[test]
    fn logprob_is_log_softmax() {
        let lp = logprob(&[0.0, 0.0], 0);
        assert!((lp - (0.5f32).ln()).abs() < 1e-6);
    }

    /// `is_plain_argmax` holds exactly when sampling takes the raw argmax: each processor that reads the
    /// logits turns it off, and where it holds the sample is the argmax.
    #[test]
    fn plain_argmax_is_what_greedy_sampling_without_processors_does() {
        let greedy = SamplingParams::greedy(8);
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 23) as f32 * 0.5 - 3.0).collect();
        let mut s = Sampler::new(&greedy).with_eos(&[4]);
        assert!(s.is_plain_argmax(0));
        let output = [9, 9, 3];
        assert_eq!(s.sample(&mut logits.clone(), &[1, 2], &output), argmax(&logits));
        let cases: Vec<(&str, SamplingParams)> = vec![
            ("temperature", SamplingParams { temperature: 0.7, ..greedy.clone() }),
            ("repetition", SamplingParams { repetition_penalty: 1.1, ..greedy.clone() }),
            ("presence", SamplingParams { presence_penalty: 0.5, ..greedy.clone() }),
            ("frequency", SamplingParams { frequency_penalty: -0.5, ..greedy.clone() }),
            ("bias", SamplingParams { logit_bias: vec![(3, 5.0)], ..greedy.clone() }),
        ];
        for (what, p) in cases {
            assert!(!Sampler::new(&p).is_plain_argmax(100), "{what}");
        }
        let min = SamplingParams { min_tokens: 3, ..greedy };
        let s = Sampler::new(&min).with_eos(&[4]);
        assert!(!s.is_plain_argmax(2), "EOS is held back before the third token");
        assert!(s.is_plain_argmax(3));
    }

    /// The nucleus from a sorted top slice is the full sort's, whatever slice it took: small and large nuclei
    /// (one that needs the slice widened twice), ties, and zero probabilities.
    #[test]
    fn nucleus_equals_the_full_sort() {
        let mut rng = mlx_serving_test_support::rng::Rng(12345);
        for (vocab, flat) in [(5000, false), (5000, true), (300, false), (100, true), (20_000, true)] {
            let probs: Vec<(f32, u32)> = (0..vocab)
                .map(|i| {
                    let u = (rng.f32() + 1.0) / 2.0;
                    let p = if flat { 0.5 + 0.5 * u } else { (-12.0 * u).exp() };
                    // Repeated values (ties) and zeros.
                    let p = match (i % 17, i % 29) {
                        (0, _) => 0.25,
                        (_, 0) => 0.0,
                        _ => p,
                    };
                    (p, i as u32)
                })
                .collect();
            for top_p in [0.05f32, 0.5, 0.9, 0.99, 0.999_999, 1e-9] {
                let mut full = probs.clone();
                full.sort_by(by_prob_desc);
                let total: f64 = full.iter().map(|c| c.0 as f64).sum();
                let mut acc = 0.0;
                let keep = full.iter().position(|c| {
                    acc += c.0 as f64;
                    acc >= top_p as f64 * total
                });
                full.truncate(keep.map_or(full.len(), |i| i + 1));
                let mut ours = probs.clone();
                nucleus(&mut ours, top_p);
                assert_eq!(ours, full, "vocab {vocab} flat {flat} top_p {top_p}");
            }
        }
    }
}

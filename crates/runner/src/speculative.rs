//! Speculative sampling's verification rule (#20), on probability vectors: a draft token `d` drawn from the
//! proposer's distribution `q` is accepted with probability `min(1, p[d] / q[d])`, where `p` is the target's
//! distribution after every sampling parameter; otherwise the token is drawn from `max(0, p − q)`,
//! normalized. The kept token then follows `p` exactly. An n-gram proposal is a `q` that is one-hot on `d`.
//! Greedy decoding needs none of this: a draft token is kept when it is the target's argmax.

use crate::sampler::Rng;

/// The proposer's distribution for one draft token.
#[derive(Clone, Copy)]
pub enum Proposal<'a> {
    /// A draft model's probabilities (the same vocabulary as `p`).
    Draft(&'a [f32]),
    /// A deterministic proposal (n-gram lookup): all mass on the draft token.
    OneHot,
}

/// Verifies draft token `draft` against the target's probabilities `p`: `Ok(())` keeps it, `Err(t)` replaces
/// it with `t` (and the tokens drafted after it are dropped).
pub fn verify(p: &[f32], q: Proposal<'_>, draft: u32, rng: &mut Rng) -> Result<(), u32> {
    let d = draft as usize;
    let qd = match q {
        Proposal::Draft(q) => q[d],
        Proposal::OneHot => 1.0,
    };
    let (pd, u) = (p[d] as f64, rng.next_f64());
    if qd > 0.0 && u * (qd as f64) < pd {
        return Ok(());
    }
    // The residual max(0, p - q), drawn by inverse CDF over its unnormalized mass.
    let residual = |i: usize| -> f64 {
        let qi = match q {
            Proposal::Draft(q) => q[i] as f64,
            Proposal::OneHot => f64::from(u8::from(i == d)),
        };
        (p[i] as f64 - qi).max(0.0)
    };
    let total: f64 = (0..p.len()).map(residual).sum();
    if total <= 0.0 {
        // p == q (up to rounding): rejection had probability 0; keep the draft.
        return Ok(());
    }
    let mut target = rng.next_f64() * total;
    let mut last = draft;
    for i in 0..p.len() {
        let r = residual(i);
        if r > 0.0 {
            last = i as u32;
            if target < r {
                return Err(i as u32);
            }
            target -= r;
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws from `dist` by inverse CDF.
    fn draw(dist: &[f32], rng: &mut Rng) -> u32 {
        let mut t = rng.next_f64() * dist.iter().map(|&x| x as f64).sum::<f64>();
        for (i, &x) in dist.iter().enumerate() {
            if t < x as f64 {
                return i as u32;
            }
            t -= x as f64;
        }
        dist.len() as u32 - 1
    }

    /// Pearson's chi-square of `counts` against `p` (probabilities), over the cells with expected count > 0.
    fn chi_square(counts: &[u64], p: &[f32]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .filter(|(_, &pi)| pi > 0.0)
            .map(|(&c, &pi)| {
                let e = n as f64 * pi as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// The kept token follows the target `p` whatever the proposer's `q`: 200 000 draws per case, chi-square
    /// with 5 degrees of freedom below 20.5 (p-value 0.001; a wrong rule, such as always keeping the draft,
    /// gives thousands here).
    #[test]
    fn kept_tokens_follow_the_target_distribution() {
        let p = [0.40f32, 0.25, 0.15, 0.10, 0.07, 0.03];
        let cases: [&[f32]; 3] = [
            &[0.05, 0.05, 0.10, 0.20, 0.30, 0.30], // a draft that disagrees
            &[0.40, 0.25, 0.15, 0.10, 0.07, 0.03], // a perfect draft: always accepted
            &[0.0, 0.0, 0.0, 1.0, 0.0, 0.0],       // a one-hot draft, as an n-gram proposal
        ];
        for (ci, q) in cases.iter().enumerate() {
            let mut rng = Rng::seed_from_u64(42 + ci as u64);
            let mut counts = [0u64; 6];
            let mut accepted = 0u64;
            for _ in 0..200_000 {
                let d = draw(q, &mut rng);
                let kept = match verify(&p, Proposal::Draft(q), d, &mut rng) {
                    Ok(()) => {
                        accepted += 1;
                        d
                    }
                    Err(t) => t,
                };
                counts[kept as usize] += 1;
            }
            let x2 = chi_square(&counts, &p);
            assert!(x2 < 20.5, "case {ci}: chi-square {x2} for counts {counts:?}");
            if ci == 1 {
                assert_eq!(accepted, 200_000, "a draft equal to the target is always kept");
            }
        }
        // Keeping every draft would follow q instead, and fail the same test.
        let mut rng = Rng::seed_from_u64(7);
        let mut counts = [0u64; 6];
        for _ in 0..200_000 {
            counts[draw(cases[0], &mut rng) as usize] += 1;
        }
        assert!(chi_square(&counts, &p) > 1000.0);
    }

    #[test]
    fn one_hot_proposals_are_kept_with_the_targets_probability() {
        let p = [0.5f32, 0.3, 0.2];
        let mut rng = Rng::seed_from_u64(1);
        let (mut counts, mut kept) = ([0u64; 3], 0u64);
        for _ in 0..100_000 {
            match verify(&p, Proposal::OneHot, 1, &mut rng) {
                Ok(()) => {
                    kept += 1;
                    counts[1] += 1;
                }
                Err(t) => {
                    assert_ne!(t, 1, "a rejected one-hot draft is never drawn again");
                    counts[t as usize] += 1;
                }
            }
        }
        assert!((kept as f64 / 1e5 - 0.3).abs() < 0.01, "kept {kept}");
        assert!(chi_square(&counts, &p) < 13.8, "{counts:?}"); // 2 degrees of freedom, p-value 0.001
    }
}

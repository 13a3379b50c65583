//! The statistics behind the experiments' decisions: summaries with percentiles, Welch's t-test (unequal
//! variances, Welch–Satterthwaite degrees of freedom, the p-value from Student's t distribution through the
//! regularized incomplete beta function) and Cohen's d with the pooled standard deviation.

use serde::Serialize;

/// Count, mean, standard deviation and percentiles of a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub sd: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

fn mean_var(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var)
}

/// The `q` quantile (0..=1) of sorted values, by linear interpolation between closest ranks.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn summarize(xs: &[f64]) -> Summary {
    if xs.is_empty() {
        return Summary::default();
    }
    let (mean, var) = mean_var(xs);
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    Summary {
        n: xs.len(),
        mean,
        sd: var.sqrt(),
        p50: quantile(&s, 0.5),
        p95: quantile(&s, 0.95),
        p99: quantile(&s, 0.99),
    }
}

/// Welch's t-test of `b` against `a`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Welch {
    /// (mean b − mean a) / standard error: positive when `b` is larger.
    pub t: f64,
    pub df: f64,
    /// Two-sided p-value.
    pub p: f64,
}

/// Welch's test; None with fewer than two values on a side or no variance at all.
pub fn welch(a: &[f64], b: &[f64]) -> Option<Welch> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let ((ma, va), (mb, vb)) = (mean_var(a), mean_var(b));
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (sa, sb) = (va / na, vb / nb);
    let se2 = sa + sb;
    if se2 <= 0.0 {
        return None;
    }
    let t = (mb - ma) / se2.sqrt();
    let df = se2 * se2 / (sa * sa / (na - 1.0) + sb * sb / (nb - 1.0));
    Some(Welch { t, df, p: t_two_sided_p(t, df) })
}

/// Cohen's d of `b` against `a` (pooled standard deviation); None without two values a side or variance.
pub fn cohens_d(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let ((ma, va), (mb, vb)) = (mean_var(a), mean_var(b));
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let pooled = (((na - 1.0) * va + (nb - 1.0) * vb) / (na + nb - 2.0)).sqrt();
    (pooled > 0.0).then(|| (mb - ma) / pooled)
}

/// P(|T| ≥ |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t²)}(df/2, 1/2).
pub fn t_two_sided_p(t: f64, df: f64) -> f64 {
    if !t.is_finite() {
        return 0.0;
    }
    beta_reg(df / 2.0, 0.5, df / (df + t * t)).clamp(0.0, 1.0)
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized incomplete beta function I_x(a, b).
pub fn beta_reg(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-14 {
            break;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn t_distribution_matches_tables() {
        // Two-sided 5 % critical values of Student's t, and other tabulated points.
        for (t, df, p) in [
            (2.228_138_85, 10.0, 0.05),
            (2.085_963_45, 20.0, 0.05),
            (12.706_204_7, 1.0, 0.05),
            (1.959_963_98, 1e7, 0.05),
            (3.169_272_67, 10.0, 0.01),
            (1.0, 5.0, 0.363_217_47),
            (0.0, 7.0, 1.0),
        ] {
            let got = t_two_sided_p(t, df);
            assert!(close(got, p, 2e-6), "t={t} df={df}: {got} vs {p}");
        }
        assert!(close(beta_reg(2.0, 3.0, 0.4), 0.5248, 1e-12), "I_0.4(2,3) = 0.5248 exactly");
        assert!(close(ln_gamma(5.0), 24f64.ln(), 1e-12));
        assert!(close(ln_gamma(0.5), std::f64::consts::PI.sqrt().ln(), 1e-12));
    }

    #[test]
    fn welch_and_cohen() {
        // Worked example: a = 1..=10, b = 3..=12 shifted by 2 (equal variances 9.1667).
        let a: Vec<f64> = (1..=10).map(f64::from).collect();
        let b: Vec<f64> = (3..=12).map(f64::from).collect();
        let w = welch(&a, &b).unwrap();
        let se = (2.0 * (55.0 / 6.0) / 10.0f64).sqrt();
        assert!(close(w.t, 2.0 / se, 1e-12));
        assert!(close(w.df, 18.0, 1e-9), "equal sizes and variances: df = n1 + n2 - 2");
        assert!(close(w.p, t_two_sided_p(2.0 / se, 18.0), 1e-15));
        assert!(w.p > 0.1 && w.p < 0.2, "{}", w.p);
        let d = cohens_d(&a, &b).unwrap();
        assert!(close(d, 2.0 / (55.0f64 / 6.0).sqrt(), 1e-12));
        // Unequal variances: df between the smaller n - 1 and n1 + n2 - 2.
        let c: Vec<f64> = (0..30).map(|i| 100.0 + 40.0 * ((i * 7 % 13) as f64 - 6.0)).collect();
        let w = welch(&a, &c).unwrap();
        assert!(w.df > 9.0 && w.df < 38.0 && w.t > 2.9 && w.p < 0.01, "{w:?}");
        assert!(welch(&[1.0], &a).is_none() && welch(&[2.0, 2.0], &[2.0, 2.0]).is_none());
    }

    #[test]
    fn summaries_and_quantiles() {
        let xs: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = summarize(&xs);
        assert_eq!(s.n, 100);
        assert!(close(s.mean, 50.5, 1e-12) && close(s.p50, 50.5, 1e-12));
        assert!(close(s.p95, 95.05, 1e-9) && close(s.p99, 99.01, 1e-9));
        assert_eq!(summarize(&[]), Summary::default());
        assert_eq!(quantile(&[3.0], 0.9), 3.0);
    }
}

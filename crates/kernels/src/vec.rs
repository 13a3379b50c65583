//! Small f32 vector primitives, with AVX2+FMA paths picked at run time and plain fallbacks.

const LANES: usize = 16;

/// Dot product of two equal-length slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2() {
        // SAFETY: AVX2/FMA detected; both slices hold at least `n` floats.
        return unsafe { simd::dot_avx2(a.as_ptr(), b.as_ptr(), n) };
    }
    dot_scalar(&a[..n], &b[..n])
}

#[inline(always)]
pub(crate) fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let mut acc = [0f32; LANES];
    let chunks = n / LANES;
    for c in 0..chunks {
        let xa = &a[c * LANES..c * LANES + LANES];
        let xb = &b[c * LANES..c * LANES + LANES];
        for l in 0..LANES {
            acc[l] += xa[l] * xb[l];
        }
    }
    let mut s = 0f32;
    for i in chunks * LANES..n {
        s += a[i] * b[i];
    }
    s + acc.iter().sum::<f32>()
}

/// `out[t] = w · x[t]` for each row `t` of `x` (`[out.len(), w.len()]`), reusing each load of `w` across
/// four rows at a time.
pub fn dot_many(w: &[f32], x: &[f32], out: &mut [f32]) {
    let k = w.len();
    assert_eq!(x.len(), k * out.len());
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2() {
        // SAFETY: AVX2/FMA detected; `x` holds `out.len()` rows of `k` floats (asserted above).
        unsafe { simd::dot_many_avx2(w, x, out) };
        return;
    }
    for (t, o) in out.iter_mut().enumerate() {
        *o = dot_scalar(w, &x[t * k..(t + 1) * k]);
    }
}

/// `y += alpha * x`.
#[inline(always)]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// SwiGLU: `gate[i] = silu(gate[i]) · up[i]`, `silu(g) = g / (1 + e^−g)`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    swiglu_on(crate::Isa::detected(), gate, up)
}

/// `swiglu` on a given instruction set (tests force each one).
pub fn swiglu_on(isa: crate::Isa, gate: &mut [f32], up: &[f32]) {
    gated_on(isa, gate, up, Gate::Silu)
}

/// The gated FFN activations: `act(gate) · up`.
#[derive(Clone, Copy)]
enum Gate {
    Silu,
    GeluTanh,
}

fn gated_on(isa: crate::Isa, gate: &mut [f32], up: &[f32], act: Gate) {
    assert_eq!(gate.len(), up.len(), "gate and up lengths");
    assert!(isa.on_this_cpu(), "{isa:?} kernels asked for on a CPU without them");
    #[cfg(target_arch = "x86_64")]
    let done = if isa.avx2() {
        let done = gate.len() / 8 * 8;
        // SAFETY: an AVX2 path means AVX2, FMA and F16C were detected; both slices hold `done` floats.
        unsafe { simd::gated_avx2(&mut gate[..done], &up[..done], act) };
        // The tail through the same vector code (padded), so every element gets the same arithmetic
        // wherever it falls: a row's result must not depend on the rows batched before it.
        let rest = gate.len() - done;
        if rest > 0 {
            let (mut g, mut u) = ([0f32; 8], [0f32; 8]);
            g[..rest].copy_from_slice(&gate[done..]);
            u[..rest].copy_from_slice(&up[done..]);
            // SAFETY: as above; eight floats each.
            unsafe { simd::gated_avx2(&mut g, &u, act) };
            gate[done..].copy_from_slice(&g[..rest]);
        }
        gate.len()
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = {
        let _ = isa;
        0
    };
    for (g, u) in gate[done..].iter_mut().zip(&up[done..]) {
        let z = match act {
            Gate::Silu => *g,
            Gate::GeluTanh => GELU_Z * (GELU_CUBIC * *g * *g).mul_add(*g, *g),
        };
        *g = *g / (1.0 + (-z).exp()) * u;
    }
}

/// `gate[i] = gelu(gate[i]) · up[i]` with GELU's tanh approximation (gemma's gated FFN):
/// `gelu(g) = g/2 · (1 + tanh(√(2/π) · (g + 0.044715 g³)))`, computed as `g · σ(z)` with `z = 2√(2/π) · (g +
/// 0.044715 g³)` (the same value: `(1 + tanh(z/2)) / 2 = σ(z)`), by SwiGLU's sigmoid.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    gelu_tanh_mul_on(crate::Isa::detected(), gate, up)
}

/// `gelu_tanh_mul` on a given instruction set (tests force each one).
pub fn gelu_tanh_mul_on(isa: crate::Isa, gate: &mut [f32], up: &[f32]) {
    gated_on(isa, gate, up, Gate::GeluTanh)
}

/// Each `w`-wide row of `x` replaced by its softmax (max subtracted; `exp` as attention's, vectorized where the
/// CPU has AVX2).
pub fn softmax_rows(x: &mut [f32], w: usize) {
    assert!(w > 0 && x.len().is_multiple_of(w), "softmax_rows: {} values in rows of {w}", x.len());
    let isa = crate::Isa::detected();
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        for row in x.chunks_exact_mut(w) {
            // SAFETY: an AVX2 path means AVX2 and FMA were detected.
            unsafe { simd::softmax_row_avx2(row) };
        }
        return;
    }
    for row in x.chunks_exact_mut(w) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|v| *v -= max);
        exp_nonpositive_in_place(isa, row);
        let inv = 1.0 / row.iter().sum::<f32>();
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// `x[i] = e^x[i]` for `x[i] ≤ 0`.
fn exp_nonpositive_in_place(isa: crate::Isa, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an AVX2 path means AVX2 and FMA were detected.
        unsafe { simd::exp_nonpositive_avx2(x) };
        return;
    }
    let _ = isa;
    x.iter_mut().for_each(|v| *v = v.exp());
}

/// GELU with the exact error function, in place: `x/2 · (1 + erf(x/√2))`, erf from Numerical Recipes' erfc fit
/// (about 1e-7 absolute).
pub fn gelu_erf(x: &mut [f32]) {
    let isa = crate::Isa::detected();
    // Two passes over cache-sized chunks: the fit's exponent, then its exp, then the GELU.
    for chunk in x.chunks_mut(4096) {
        let mut e = [0f32; 4096];
        let e = &mut e[..chunk.len()];
        for (t, &v) in e.iter_mut().zip(chunk.iter()) {
            let z = (v * std::f32::consts::FRAC_1_SQRT_2).abs();
            let tt = 1.0 / (1.0 + 0.5 * z);
            *t = erfc_exponent(z, tt).min(0.0);
        }
        exp_nonpositive_in_place(isa, e);
        for (v, &ex) in chunk.iter_mut().zip(e.iter()) {
            let z = (*v * std::f32::consts::FRAC_1_SQRT_2).abs();
            let tt = 1.0 / (1.0 + 0.5 * z);
            let erf = (1.0 - tt * ex).copysign(*v);
            *v = 0.5 * *v * (1.0 + erf);
        }
    }
}

/// The exponent of Numerical Recipes' `erfc(z) ≈ t · e^(…)`, `t = 1 / (1 + z/2)`, `z ≥ 0`.
#[inline(always)]
fn erfc_exponent(z: f32, t: f32) -> f32 {
    -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_2 + t * 0.170_872_77))))))))
}

/// `2√(2/π)` and GELU's cubic coefficient.
const GELU_Z: f32 = 1.595_769_2;
const GELU_CUBIC: f32 = 0.044715;

/// [`rms_norm`] of each row of `x` (`[n, w.len()]`) in place: the per-head q/k norms.
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let h = w.len();
    assert!(h > 0 && x.len().is_multiple_of(h), "rms_norm shapes");
    let isa = crate::Isa::detected();
    for xr in x.chunks_exact_mut(h) {
        let inv = inv_rms_on(isa, xr, eps);
        for (xi, wi) in xr.iter_mut().zip(w) {
            *xi = *xi * inv * wi;
        }
    }
}

/// RMS norm of each row of `x` (`[n, w.len()]`): `out = x · inv_rms(x) · w`, as transformers computes it in
/// f32 (`(x · inv) · w`, rounded after each product).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_on(crate::Isa::detected(), x, w, eps, out)
}

/// `rms_norm` on a given instruction set; every path gives bitwise the same result.
pub fn rms_norm_on(isa: crate::Isa, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    assert!(h > 0 && x.len().is_multiple_of(h) && out.len() == x.len(), "rms_norm shapes");
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let inv = inv_rms_on(isa, xr, eps);
        for ((o, xi), wi) in or.iter_mut().zip(xr).zip(w) {
            *o = xi * inv * wi;
        }
    }
}

/// `1 / √(mean(x²) + eps)`. The squares are summed in eight lanes (element `i` into lane `i % 8`, each product
/// and sum rounded, no fused multiply-add), the lanes added as `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`, then
/// the tail past the last multiple of 8 in order: the AVX2 and portable paths give bitwise the same.
pub fn inv_rms_on(isa: crate::Isa, x: &[f32], eps: f32) -> f32 {
    assert!(isa.on_this_cpu(), "{isa:?} kernels asked for on a CPU without them");
    let body = x.len() / 8 * 8;
    #[cfg(target_arch = "x86_64")]
    let l = if isa.avx2() {
        // SAFETY: an AVX2 path means AVX2 was detected; `body` is a multiple of 8 within `x`.
        unsafe { simd::square_lanes(&x[..body]) }
    } else {
        square_lanes_portable(&x[..body])
    };
    #[cfg(not(target_arch = "x86_64"))]
    let l = {
        let _ = isa;
        square_lanes_portable(&x[..body])
    };
    let mut sum = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    for v in &x[body..] {
        sum += v * v;
    }
    1.0 / (sum / x.len() as f32 + eps).sqrt()
}

/// Lane `l` of the result: `Σ x[i]²` over `i % 8 == l`, in order (`x.len()` a multiple of 8).
fn square_lanes_portable(x: &[f32]) -> [f32; 8] {
    let mut acc = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    /// `square_lanes_portable` with AVX2, bitwise the same.
    ///
    /// SAFETY (caller): AVX2 available; `x.len()` a multiple of 8.
    #[target_feature(enable = "avx2")]
    pub unsafe fn square_lanes(x: &[f32]) -> [f32; 8] {
        let mut acc = _mm256_setzero_ps();
        for c in x.chunks_exact(8) {
            let v = _mm256_loadu_ps(c.as_ptr());
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
        out
    }

    /// One softmax row, eight lanes at a time: the maximum, then `e^(x − max)` summed in eight lanes as it is
    /// stored, then the scaling (the tail padded through the same code).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_row_avx2(x: &mut [f32]) {
        let n8 = x.len() / 8 * 8;
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in x[..n8].chunks_exact(8) {
            mv = _mm256_max_ps(mv, _mm256_loadu_ps(c.as_ptr()));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
        let max = lanes.iter().chain(&x[n8..]).copied().fold(f32::NEG_INFINITY, f32::max);
        let m = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        for c in x[..n8].chunks_exact_mut(8) {
            let e = crate::attention::avx2::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(c.as_mut_ptr(), e);
        }
        let rest = &mut x[n8..];
        if !rest.is_empty() {
            let mut pad = [f32::NEG_INFINITY; 8];
            pad[..rest.len()].copy_from_slice(rest);
            let e = crate::attention::avx2::exp_nonpositive(_mm256_max_ps(
                _mm256_sub_ps(_mm256_loadu_ps(pad.as_ptr()), m),
                _mm256_set1_ps(-1000.0),
            ));
            // Padding lanes: e^-1000 is 0.
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(pad.as_mut_ptr(), e);
            let k = rest.len();
            rest.copy_from_slice(&pad[..k]);
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let inv = _mm256_set1_ps(1.0 / lanes.iter().sum::<f32>());
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), inv));
        }
        let inv = 1.0 / lanes.iter().sum::<f32>();
        chunks.into_remainder().iter_mut().for_each(|v| *v *= inv);
    }

    /// `x[i] = e^x[i]` (`x[i] ≤ 0`), eight at a time; the tail through the same code, padded.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_nonpositive_avx2(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = crate::attention::avx2::exp_nonpositive(_mm256_loadu_ps(c.as_ptr()));
            _mm256_storeu_ps(c.as_mut_ptr(), v);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut pad = [-1000f32; 8];
            pad[..rest.len()].copy_from_slice(rest);
            let v = crate::attention::avx2::exp_nonpositive(_mm256_loadu_ps(pad.as_ptr()));
            _mm256_storeu_ps(pad.as_mut_ptr(), v);
            let n = rest.len();
            rest.copy_from_slice(&pad[..n]);
        }
    }

    /// `silu(x) · u` on eight lanes, as `swiglu` computes it.
    #[inline(always)]
    pub unsafe fn silu_mul(x: __m256, u: __m256) -> __m256 {
        gate_mul(x, x, u)
    }

    /// `g · σ(z) · u` on eight lanes: `σ(z) = s / (1 + t)` with `t = e^−|z|` (never overflows) and `s = 1`
    /// for `z ≥ 0`, `s = t` below.
    #[inline(always)]
    unsafe fn gate_mul(x: __m256, z: __m256, u: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        let t = crate::attention::avx2::exp_nonpositive(_mm256_or_ps(z, _mm256_set1_ps(-0.0)));
        let s = _mm256_blendv_ps(t, one, _mm256_cmp_ps::<_CMP_GE_OQ>(z, _mm256_setzero_ps()));
        _mm256_mul_ps(_mm256_div_ps(_mm256_mul_ps(x, s), _mm256_add_ps(one, t)), u)
    }

    /// `swiglu` (`z = g`) or `gelu_tanh_mul` (`z = 2√(2/π)·(g + 0.044715 g³)`) eight at a time (`gate.len()` a
    /// multiple of 8).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gated_avx2(gate: &mut [f32], up: &[f32], act: super::Gate) {
        for (g, u) in gate.chunks_exact_mut(8).zip(up.chunks_exact(8)) {
            let (x, uv) = (_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()));
            let v = match act {
                super::Gate::Silu => silu_mul(x, uv),
                super::Gate::GeluTanh => {
                    let c = _mm256_mul_ps(_mm256_set1_ps(super::GELU_CUBIC), _mm256_mul_ps(x, x));
                    gate_mul(x, _mm256_mul_ps(_mm256_set1_ps(super::GELU_Z), _mm256_fmadd_ps(c, x, x)), uv)
                }
            };
            _mm256_storeu_ps(g.as_mut_ptr(), v);
        }
    }

    pub fn has_avx2() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[inline(always)]
    pub unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// SAFETY (caller): AVX2/FMA available; `a` and `b` point to `n` readable floats.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(a: *const f32, b: *const f32, n: usize) -> f32 {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 8)), _mm256_loadu_ps(b.add(i + 8)), acc1);
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += *a.add(i) * *b.add(i);
            i += 1;
        }
        s
    }

    /// SAFETY (caller): AVX2/FMA available; `x.len() == w.len() * out.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_many_avx2(w: &[f32], x: &[f32], out: &mut [f32]) {
        let k = w.len();
        let wp = w.as_ptr();
        let rows = out.len();
        let mut t = 0;
        while t + 4 <= rows {
            let x0 = x.as_ptr().add(t * k);
            let (x1, x2, x3) = (x0.add(k), x0.add(2 * k), x0.add(3 * k));
            let (mut a0, mut a1, mut a2, mut a3) =
                (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 8 <= k {
                let wv = _mm256_loadu_ps(wp.add(i));
                a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0.add(i)), a0);
                a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1.add(i)), a1);
                a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2.add(i)), a2);
                a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3.add(i)), a3);
                i += 8;
            }
            let mut s = [hsum(a0), hsum(a1), hsum(a2), hsum(a3)];
            while i < k {
                let wv = *wp.add(i);
                s[0] += wv * *x0.add(i);
                s[1] += wv * *x1.add(i);
                s[2] += wv * *x2.add(i);
                s[3] += wv * *x3.add(i);
                i += 1;
            }
            out[t..t + 4].copy_from_slice(&s);
            t += 4;
        }
        while t < rows {
            out[t] = dot_avx2(wp, x.as_ptr().add(t * k), k);
            t += 1;
        }
    }
}

#[cfg(test)]
mod vision_op_tests {
    #[test]
    fn softmax_rows_and_gelu_erf_match_plain_math() {
        let mut x: Vec<f32> = (0..3 * 37).map(|i| ((i * 7919) % 200) as f32 / 10.0 - 10.0).collect();
        let plain: Vec<f32> = x
            .chunks(37)
            .flat_map(|r| {
                let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s: f64 = r.iter().map(|v| ((v - m) as f64).exp()).sum();
                r.iter().map(move |v| (((v - m) as f64).exp() / s) as f32).collect::<Vec<_>>()
            })
            .collect();
        super::softmax_rows(&mut x, 37);
        for (a, b) in x.iter().zip(&plain) {
            assert!((a - b).abs() <= 1e-6 * b.max(1e-3), "{a} vs {b}");
        }
        // erf values to 10 digits: gelu(x) = x/2 (1 + erf(x/√2)).
        let cases = [
            (0.0f64, 0.0f64),
            (0.5, 0.5204998778),
            (1.0, 0.8427007929),
            (2.0, 0.9953222650),
            (-0.7, -0.6778011938),
            (3.5, 0.9999992569),
            (-2.5, -0.9995930480),
        ];
        let mut v: Vec<f32> = cases.iter().map(|(z, _)| (z * std::f64::consts::SQRT_2) as f32).collect();
        let want: Vec<f64> = cases.iter().map(|(z, e)| z * std::f64::consts::SQRT_2 / 2.0 * (1.0 + e)).collect();
        super::gelu_erf(&mut v);
        for (a, b) in v.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 3e-6, "{a} vs {b}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GELU (tanh form) against f64 on every path, including large magnitudes where `tanh` saturates (within
    /// 3e-6 relative: deep in the negative tail `e^z` turns z's f32 rounding, relative 6e-8, into `|z|` times
    /// that), and an element's result independent of where it falls.
    #[test]
    fn gelu_paths_agree() {
        let g: Vec<f32> =
            (0..203).map(|i| (i as f32 - 101.0) * 0.07).chain([0.0, -0.0, 9.0, -9.0, 40.0, -40.0]).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 5) as f32 * 0.5).collect();
        let gelu = |g: f64| 0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh());
        let want: Vec<f64> = g.iter().zip(&u).map(|(g, u)| gelu(*g as f64) * *u as f64).collect();
        for isa in crate::Isa::all_on_this_cpu() {
            let mut got = g.clone();
            gelu_tanh_mul_on(isa, &mut got, &u);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() <= 3e-6 * b.abs().max(1e-6), "{isa:?} g={}: {a} vs {b}", g[i]);
            }
        }
        let g: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.707_106_77).sin() * 5.0).collect();
        let u = vec![1f32; g.len()];
        let mut whole = g.clone();
        gelu_tanh_mul(&mut whole, &u);
        for start in [1, 3, 5, 8, 13] {
            let mut part = g[start..].to_vec();
            gelu_tanh_mul(&mut part, &u[start..]);
            assert_eq!(part, whole[start..], "offset {start}");
        }
    }

    #[test]
    fn swiglu_paths_agree() {
        let g: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.37).chain([0.0, -0.0, 90.0, -90.0, -200.0]).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 5) as f32 * 0.5).collect();
        let want: Vec<f32> =
            g.iter().zip(&u).map(|(g, u)| (*g as f64 / (1.0 + (-*g as f64).exp()) * *u as f64) as f32).collect();
        for isa in crate::Isa::all_on_this_cpu() {
            let mut got = g.clone();
            swiglu_on(isa, &mut got, &u);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 4e-7 * b.abs().max(1e-30), "{isa:?} g={}: {a} vs {b}", g[i]);
            }
        }
        // An element's result does not depend on where it falls (vector body or tail).
        let g: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.707_106_77).sin() * 12.0).collect();
        let u = vec![1f32; g.len()];
        let mut whole = g.clone();
        swiglu(&mut whole, &u);
        for start in [1, 3, 5, 8, 13] {
            let mut part = g[start..].to_vec();
            swiglu(&mut part, &u[start..]);
            assert_eq!(part, whole[start..], "offset {start}");
        }
        let mut nan = vec![f32::NAN; 8];
        swiglu(&mut nan, &[1.0; 8]);
        assert!(nan.iter().all(|v| v.is_nan()), "NaN gates stay NaN");
    }

    #[test]
    fn square_lanes_are_bitwise_the_portable_ones() {
        // The lanes themselves (RMS norm's final rounding can hide a one-ulp difference in the sum).
        #[cfg(target_arch = "x86_64")]
        if simd::has_avx2() {
            for n in [8usize, 64, 576, 1536] {
                let x: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.731).sin() * 7.3).powi(3)).collect();
                // SAFETY: AVX2 detected; `n` is a multiple of 8.
                let fast = unsafe { simd::square_lanes(&x) };
                let slow = square_lanes_portable(&x);
                assert_eq!(fast.map(f32::to_bits), slow.map(f32::to_bits), "n {n}");
            }
        }
    }

    #[test]
    fn dot_matches_naive_on_odd_lengths() {
        for n in [0usize, 1, 7, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-4, "n={n}");
            assert!((dot_scalar(&a, &b) - naive).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn dot_many_matches_dot_for_any_row_count() {
        for (k, rows) in [(3usize, 1usize), (64, 4), (37, 7), (96, 9)] {
            let w: Vec<f32> = (0..k).map(|i| (i as f32 * 0.3).sin()).collect();
            let x: Vec<f32> = (0..k * rows).map(|i| (i as f32 * 0.7).cos()).collect();
            let mut out = vec![0f32; rows];
            dot_many(&w, &x, &mut out);
            for t in 0..rows {
                assert!((out[t] - dot_scalar(&w, &x[t * k..(t + 1) * k])).abs() < 1e-4, "k={k} row {t}");
            }
        }
    }
}

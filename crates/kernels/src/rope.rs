//! Rotary position embedding, fused with the KV-cache write: one pass over a q/k/v projection's output
//! rotates the queries into the attention's query buffer and writes the rotated keys and the values straight
//! into the paged cache (no split copies of q, k and v, no separate rotation and conversion passes).

use crate::attention::{KvElem, KvLayout};

/// Tokens per task when the pass runs over the pool; fewer than two tasks' worth run on the caller.
const TOKENS_PER_TASK: usize = 16;

/// cos and sin of each token's angles, `[n, half]` each (`half` = rotated dimensions / 2).
#[derive(Clone, Debug, Default)]
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeTables {
    /// The angles `position · inv_freq[i]` of each token.
    pub fn new(inv_freq: &[f32], positions: &[u32]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, half }
    }

    /// M-RoPE (Qwen2-VL): the frequencies in three consecutive sections of `sections[0]`, `[1]` and `[2]`,
    /// each section's angles `position[s] · inv_freq[i]` from its own component of the token's (temporal, row,
    /// column) position.
    pub fn sectioned(inv_freq: &[f32], positions: &[[u32; 3]], sections: [usize; 3]) -> Self {
        let half = inv_freq.len();
        assert_eq!(sections.iter().sum::<usize>(), half, "M-RoPE sections must cover the frequencies");
        let component: Vec<usize> = sections.iter().enumerate().flat_map(|(s, &n)| std::iter::repeat_n(s, n)).collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for (&f, &c) in inv_freq.iter().zip(&component) {
                let angle = p[c] as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, half }
    }

    /// Token `t`'s cos and sin.
    fn of(&self, t: usize) -> (&[f32], &[f32]) {
        let r = t * self.half..(t + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }
}

/// How rotated dimensions pair up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// `(2i, 2i + 1)` (GGUF llama: the converter permutes q/k rows to this order).
    Interleaved,
    /// `(i, i + half)` (GPT-NeoX, Qwen2).
    Neox,
}

/// Rotates one head (`head_dim` values) by one token's angles: each pair `(a, b)` becomes
/// `(a·cos − b·sin, a·sin + b·cos)`, every product and sum rounded (no fused multiply-add).
#[inline]
pub fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = cos.len();
    match style {
        RopeStyle::Interleaved => {
            for ((p, c), s) in head[..2 * half].chunks_exact_mut(2).zip(cos).zip(sin) {
                let (a, b) = (p[0], p[1]);
                p[0] = a * c - b * s;
                p[1] = a * s + b * c;
            }
        }
        RopeStyle::Neox => {
            let (lo, hi) = head.split_at_mut(half);
            for (((a, b), c), s) in lo.iter_mut().zip(&mut hi[..half]).zip(cos).zip(sin) {
                let (x, y) = (*a, *b);
                *a = x * c - y * s;
                *b = x * s + y * c;
            }
        }
    }
}

/// What `rope_qkv_store` reads and writes besides the cache.
pub struct QkvStore<'a> {
    /// The projection's output, `[n, (num_heads + 2 · kv_heads) · head_dim]`: each token's queries, keys, values.
    pub qkv: &'a [f32],
    pub num_heads: usize,
    pub layout: KvLayout,
    pub tables: &'a RopeTables,
    pub style: RopeStyle,
    /// Each token's cache slot.
    pub slots: &'a [u32],
}

/// For every token of `s.qkv`: its queries, rotated, into `q` (`[n, num_heads · head_dim]`); its keys, rotated,
/// and its values into `k_cache` / `v_cache` at the token's slot, converted to the cache's element type.
/// Bitwise what rotating split copies and then storing them gives. Runs over the pool for long batches when
/// no two tokens share a slot (otherwise in token order, so the last token's write wins, as before).
pub fn rope_qkv_store<T: KvElem>(s: &QkvStore<'_>, q: &mut [f32], k_cache: &mut [T], v_cache: &mut [T]) {
    let (hd, kvh) = (s.layout.head_dim, s.layout.num_kv_heads);
    let (qw, kw) = (s.num_heads * hd, kvh * hd);
    let stride = qw + 2 * kw;
    let n = s.slots.len();
    assert_eq!(s.qkv.len(), n * stride, "qkv is not n rows of q, k and v");
    assert_eq!(q.len(), n * qw, "query buffer length");
    assert!(s.tables.cos.len() >= n * s.tables.half && 2 * s.tables.half <= hd, "rope tables");
    let cache_len = k_cache.len().min(v_cache.len());
    for &slot in s.slots {
        assert!(s.layout.offset(slot as usize, 0) + kw <= cache_len, "slot {slot} is outside the cache");
    }
    let out = Dest { q: q.as_mut_ptr(), k: k_cache.as_mut_ptr(), v: v_cache.as_mut_ptr() };
    // `kr`: the token's keys, rotated before they are converted (one buffer per task, reused by its tokens).
    let token = |t: usize, kr: &mut [f32]| {
        let row = &s.qkv[t * stride..(t + 1) * stride];
        let (cos, sin) = s.tables.of(t);
        let dst = s.layout.offset(s.slots[t] as usize, 0);
        // SAFETY: `t < n` so row `t` of `q` is in range; `dst + kw` is within both caches (checked above);
        // callers give each token to one task, and tasks run in parallel only when slots are distinct.
        let (qd, kd, vd) = unsafe { out.token(t * qw, qw, dst, kw) };
        qd.copy_from_slice(&row[..qw]);
        for head in qd.chunks_exact_mut(hd) {
            rotate(head, cos, sin, s.style);
        }
        kr.copy_from_slice(&row[qw..qw + kw]);
        for head in kr.chunks_exact_mut(hd) {
            rotate(head, cos, sin, s.style);
        }
        T::store(kd, kr);
        T::store(vd, &row[qw + kw..]);
    };
    let tasks = n / TOKENS_PER_TASK;
    if tasks >= 2 && distinct(s.slots) {
        crate::pool::global().run(tasks, &|i, _| {
            let end = if i + 1 == tasks { n } else { (i + 1) * TOKENS_PER_TASK };
            let mut kr = vec![0f32; kw];
            (i * TOKENS_PER_TASK..end).for_each(|t| token(t, &mut kr))
        });
    } else {
        let mut kr = vec![0f32; kw];
        (0..n).for_each(|t| token(t, &mut kr));
    }
}

/// The buffers `rope_qkv_store`'s tasks write, each token to its own places.
struct Dest<T> {
    q: *mut f32,
    k: *mut T,
    v: *mut T,
}

// SAFETY: tasks write disjoint places (see `rope_qkv_store`), and the borrows it was made from outlive them.
unsafe impl<T: Send> Sync for Dest<T> {}

impl<T> Dest<T> {
    /// `q[qo .. qo + qw]`, and `k` and `v` at `[kvo .. kvo + kw]`.
    ///
    /// # Safety
    /// The ranges are within the buffers, and nothing else uses them while the slices live.
    #[allow(clippy::mut_from_ref)]
    unsafe fn token(&self, qo: usize, qw: usize, kvo: usize, kw: usize) -> (&mut [f32], &mut [T], &mut [T]) {
        (
            std::slice::from_raw_parts_mut(self.q.add(qo), qw),
            std::slice::from_raw_parts_mut(self.k.add(kvo), kw),
            std::slice::from_raw_parts_mut(self.v.add(kvo), kw),
        )
    }
}

/// Whether no slot repeats.
fn distinct(slots: &[u32]) -> bool {
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).all(|w| w[0] != w[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// The unfused steps: split copies, rotate q and k, store k and v element by element.
    fn unfused<T: KvElem>(s: &QkvStore<'_>, q: &mut [f32], kc: &mut [T], vc: &mut [T]) {
        let (hd, kvh) = (s.layout.head_dim, s.layout.num_kv_heads);
        let (qw, kw) = (s.num_heads * hd, kvh * hd);
        for (t, row) in s.qkv.chunks_exact(qw + 2 * kw).enumerate() {
            let (cos, sin) = s.tables.of(t);
            let mut qr = row[..qw].to_vec();
            let mut kr = row[qw..qw + kw].to_vec();
            qr.chunks_exact_mut(hd).for_each(|h| rotate(h, cos, sin, s.style));
            kr.chunks_exact_mut(hd).for_each(|h| rotate(h, cos, sin, s.style));
            q[t * qw..(t + 1) * qw].copy_from_slice(&qr);
            let dst = s.layout.offset(s.slots[t] as usize, 0);
            for i in 0..kw {
                kc[dst + i] = T::from_f32(kr[i]);
                vc[dst + i] = T::from_f32(row[qw + kw + i]);
            }
        }
    }

    /// `num_kv_heads` KV heads of `hd` dimensions (three query heads each), `half` rotated pairs per head.
    struct Shape {
        kvh: usize,
        hd: usize,
        half: usize,
    }

    fn check<T: KvElem + PartialEq + std::fmt::Debug>(n: usize, style: RopeStyle, slots: Vec<u32>, sh: &Shape) {
        let layout = KvLayout { block_size: 16, num_kv_heads: sh.kvh, head_dim: sh.hd };
        let num_heads = 3 * sh.kvh;
        let (qw, kw) = (num_heads * sh.hd, sh.kvh * sh.hd);
        let stride = qw + 2 * kw;
        let qkv: Vec<f32> = (0..n * stride).map(|i| ((i as f32) * 0.618).sin() * 3.0).collect();
        let inv_freq: Vec<f32> = (0..sh.half).map(|i| 1.0 / 10000f32.powf(i as f32 / sh.half as f32)).collect();
        let positions: Vec<u32> = (0..n as u32).map(|p| p * 7 + 3).collect();
        let tables = RopeTables::new(&inv_freq, &positions);
        let s = QkvStore { qkv: &qkv, num_heads, layout, tables: &tables, style, slots: &slots };
        let cache = 1024 * kw;
        let (mut q1, mut k1, mut v1) = (vec![0f32; n * qw], vec![T::default(); cache], vec![T::default(); cache]);
        let (mut q2, mut k2, mut v2) = (q1.clone(), k1.clone(), v1.clone());
        rope_qkv_store(&s, &mut q1, &mut k1, &mut v1);
        unfused(&s, &mut q2, &mut k2, &mut v2);
        assert_eq!(
            q1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            q2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(k1 == k2 && v1 == v2, "n {n} {style:?}: cache contents differ");
        assert!(k1.iter().filter(|k| **k != T::default()).count() > 0, "something was written");
        if 2 * sh.half < sh.hd {
            // Dimensions past the rotated ones pass through unrotated.
            let t = n - 1;
            let row = &qkv[t * stride..];
            assert_eq!(q1[t * qw + sh.hd - 1], row[sh.hd - 1], "unrotated query dimension");
        }
    }

    #[test]
    fn fused_pass_matches_the_separate_steps() {
        let full = Shape { kvh: 2, hd: 64, half: 32 };
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            for n in [1usize, 5, 33, 70] {
                // Slots scattered over blocks, distinct.
                let slots: Vec<u32> = (0..n as u32).map(|t| (t * 37 + 11) % 1024).collect();
                check::<f32>(n, style, slots.clone(), &full);
                check::<f16>(n, style, slots, &full);
            }
            // Repeated slots (serial, last write wins in both).
            check::<f16>(40, style, (0..40u32).map(|t| t % 9).collect(), &full);
            // Partial rotary (16 pairs: 32 of 64 dimensions rotated), and wide rows of keys (20 KV heads of
            // 64: 1,280 values).
            let slots: Vec<u32> = (0..35u32).map(|t| (t * 5 + 2) % 1024).collect();
            check::<f16>(35, style, slots.clone(), &Shape { kvh: 2, hd: 64, half: 16 });
            check::<f32>(35, style, slots, &Shape { kvh: 20, hd: 64, half: 32 });
        }
    }

    #[test]
    fn rotation_is_a_rotation() {
        // Angle 0 leaves the head alone; a quarter turn maps (a, b) to (−b, a).
        let head: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect();
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let mut h = head.clone();
            rotate(&mut h, &[1.0; 4], &[0.0; 4], style);
            assert_eq!(h, head);
            let mut h = head.clone();
            rotate(&mut h, &[0.0; 4], &[1.0; 4], style);
            let want: Vec<f32> = match style {
                RopeStyle::Interleaved => vec![-2.0, 1.0, -4.0, 3.0, -6.0, 5.0, -8.0, 7.0],
                RopeStyle::Neox => vec![-5.0, -6.0, -7.0, -8.0, 1.0, 2.0, 3.0, 4.0],
            };
            assert_eq!(h, want, "{style:?}");
        }
    }

    #[test]
    fn a_slot_outside_the_cache_is_refused() {
        let layout = KvLayout { block_size: 16, num_kv_heads: 1, head_dim: 64 };
        let tables = RopeTables::new(&[1.0; 32], &[0]);
        let qkv = vec![0f32; 3 * 64];
        let s = QkvStore { qkv: &qkv, num_heads: 1, layout, tables: &tables, style: RopeStyle::Neox, slots: &[16] };
        let r = std::panic::catch_unwind(|| {
            let (mut q, mut k, mut v) = (vec![0f32; 64], vec![0f32; 16 * 64], vec![0f32; 16 * 64]);
            rope_qkv_store(&s, &mut q, &mut k, &mut v);
        });
        assert!(r.is_err());
    }
}

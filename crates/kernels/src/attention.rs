//! Paged attention on the CPU: queries attend to keys/values stored in fixed-size blocks.
//!
//! Cache layout for one layer (K and V each), f32:
//!
//! ```text
//!   block 0                      block 1
//!   [slot 0: kvh0 d.. | kvh1 d..][slot 1: ...] ... [slot bs-1]  [slot 0: ...] ...
//!   index(block, slot, kv_head, d) = ((block * block_size + slot) * num_kv_heads + kv_head) * head_dim + d
//! ```
//!
//! A sequence's token at position `p` lives in block `block_table[p / block_size]`, slot `p % block_size`.
//! Queries are packed `[num_tokens, num_heads, head_dim]`; the queries of sequence `s` are its last
//! `query_len` positions, so query `i` sees positions `0 ..= context_len - query_len + i` (causal).
//! Grouped-query attention: query head `h` reads kv head `h / (num_heads / num_kv_heads)`.

use crate::vec::{axpy, dot_scalar as dot};
use rayon::prelude::*;

/// Shape of the paged cache for one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Floats per block for K (or V).
    pub fn block_stride(&self) -> usize {
        self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Offset of `(slot, kv_head, 0)` where `slot` is a global slot id (`block * block_size + offset`).
    #[inline]
    pub fn offset(&self, slot: usize, kv_head: usize) -> usize {
        (slot * self.num_kv_heads + kv_head) * self.head_dim
    }
}

/// One sequence's part of a batch.
#[derive(Clone, Copy, Debug)]
pub struct AttnSeq<'a> {
    /// Index of this sequence's first query row in the packed query tensor.
    pub query_start: usize,
    /// Number of query tokens this step (1 for decode, the chunk length for prefill).
    pub query_len: usize,
    /// Tokens in the cache for this sequence after this step's K/V were written (≥ query_len).
    pub context_len: usize,
    /// Physical block ids, in position order.
    pub block_table: &'a [u32],
}

fn check(seqs: &[AttnSeq<'_>], layout: KvLayout, cache_len: usize) {
    for s in seqs {
        assert!(s.query_len <= s.context_len, "query_len > context_len");
        let needed = s.context_len.div_ceil(layout.block_size);
        assert!(s.block_table.len() >= needed, "block table too short");
        for &b in &s.block_table[..needed] {
            assert!((b as usize + 1) * layout.block_stride() <= cache_len, "block id out of range");
        }
    }
}

/// Fast paged attention. `out` and `q` are `[num_tokens, num_heads, head_dim]`.
///
/// Work is split over (token, head) pairs with rayon; each pair does one pass over K for scores, a softmax
/// and one pass over V, with a per-thread scratch buffer.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    layout: KvLayout,
    num_heads: usize,
    seqs: &[AttnSeq<'_>],
    scale: f32,
) {
    check(seqs, layout, k_cache.len().min(v_cache.len()));
    let hd = layout.head_dim;
    let group = num_heads / layout.num_kv_heads;
    // (seq index, query index) per token row.
    let mut rows: Vec<(usize, usize)> = Vec::with_capacity(out.len() / (num_heads * hd).max(1));
    for (si, s) in seqs.iter().enumerate() {
        for i in 0..s.query_len {
            rows.push((si, i));
        }
    }
    // One work item per (token, kv head): the query heads sharing a kv head (GQA) read each K/V row once.
    // Decode batches of a single sequence still spread over the threads.
    let work = |(idx, out_g): (usize, &mut [f32]), scores: &mut Vec<f32>| {
        let (t_row, kvh) = (idx / layout.num_kv_heads, idx % layout.num_kv_heads);
        let (si, i) = rows[t_row];
        let s = &seqs[si];
        let t = s.query_start + i;
        let ctx = s.context_len - s.query_len + i + 1;
        let q0 = (t * num_heads + kvh * group) * hd;
        let qg = &q[q0..q0 + group * hd];
        scores.clear();
        scores.resize(group * ctx, 0.0);
        let slot_of =
            |p: usize| s.block_table[p / layout.block_size] as usize * layout.block_size + p % layout.block_size;
        for p in 0..ctx {
            let o = layout.offset(slot_of(p), kvh);
            let k = &k_cache[o..o + hd];
            for g in 0..group {
                scores[g * ctx + p] = dot(&qg[g * hd..(g + 1) * hd], k) * scale;
            }
        }
        for sc in scores.chunks_exact_mut(ctx) {
            let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for x in sc.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            sc.iter_mut().for_each(|x| *x *= inv);
        }
        out_g.fill(0.0);
        for p in 0..ctx {
            let o = layout.offset(slot_of(p), kvh);
            let v = &v_cache[o..o + hd];
            for (g, oh) in out_g.chunks_exact_mut(hd).enumerate() {
                axpy(oh, scores[g * ctx + p], v);
            }
        }
    };
    let items = rows.len() * layout.num_kv_heads;
    let out = &mut out[..items * group * hd];
    if items <= 1 {
        let mut scores = Vec::new();
        for item in out.chunks_mut(group * hd).enumerate() {
            work(item, &mut scores);
        }
    } else {
        out.par_chunks_mut(group * hd).enumerate().for_each_init(Vec::new, |scores, item| work(item, scores));
    }
}

/// Plain reference: gathers each sequence's K/V into contiguous rows and does textbook attention in f64.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_reference(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    layout: KvLayout,
    num_heads: usize,
    seqs: &[AttnSeq<'_>],
    scale: f32,
) {
    check(seqs, layout, k_cache.len().min(v_cache.len()));
    let hd = layout.head_dim;
    let group = num_heads / layout.num_kv_heads;
    for s in seqs {
        let gather = |cache: &[f32], p: usize, kvh: usize| -> Vec<f64> {
            let block = s.block_table[p / layout.block_size] as usize;
            let base = ((block * layout.block_size + p % layout.block_size) * layout.num_kv_heads + kvh) * hd;
            cache[base..base + hd].iter().map(|&x| x as f64).collect()
        };
        for i in 0..s.query_len {
            let t = s.query_start + i;
            let visible = s.context_len - s.query_len + i + 1;
            for h in 0..num_heads {
                let kvh = h / group;
                let qh: Vec<f64> = q[(t * num_heads + h) * hd..][..hd].iter().map(|&x| x as f64).collect();
                let logits: Vec<f64> = (0..visible)
                    .map(|p| gather(k_cache, p, kvh).iter().zip(&qh).map(|(a, b)| a * b).sum::<f64>() * scale as f64)
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let mut acc = vec![0f64; hd];
                for (p, w) in e.iter().enumerate() {
                    for (a, v) in acc.iter_mut().zip(gather(v_cache, p, kvh)) {
                        *a += w / z * v;
                    }
                }
                for (d, a) in acc.into_iter().enumerate() {
                    out[(t * num_heads + h) * hd + d] = a as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny deterministic generator so the test needs no dependency.
    struct Lcg(u64);
    impl Lcg {
        fn next_f32(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n
        }
    }

    /// Ragged mixed batch (decode rows and prefill chunks), shuffled block tables, GQA; error bound 1e-4
    /// absolute on outputs that are convex combinations of values in [-1, 1].
    #[test]
    fn fast_matches_reference_on_random_ragged_batches() {
        let mut rng = Lcg(42);
        for trial in 0..20 {
            let layout = KvLayout {
                block_size: [1, 4, 16][trial % 3],
                num_kv_heads: 1 + trial % 3,
                head_dim: [8, 64][trial % 2],
            };
            let num_heads = layout.num_kv_heads * (1 + trial % 4);
            let num_blocks = 64;
            let cache_len = num_blocks * layout.block_stride();
            let k: Vec<f32> = (0..cache_len).map(|_| rng.next_f32()).collect();
            let v: Vec<f32> = (0..cache_len).map(|_| rng.next_f32()).collect();
            let mut free: Vec<u32> = (0..num_blocks as u32).collect();
            for i in (1..free.len()).rev() {
                free.swap(i, rng.below(i + 1));
            }
            let nseq = 1 + rng.below(4);
            let mut tables = Vec::new();
            let mut shapes = Vec::new();
            for _ in 0..nseq {
                let ctx = 1 + rng.below(40.min(num_blocks * layout.block_size / nseq));
                let qlen = if rng.below(2) == 0 { 1 } else { 1 + rng.below(ctx) };
                let nb = ctx.div_ceil(layout.block_size);
                tables.push(free.drain(..nb).collect::<Vec<u32>>());
                shapes.push((qlen, ctx));
            }
            let mut seqs = Vec::new();
            let mut start = 0;
            for (t, &(qlen, ctx)) in tables.iter().zip(&shapes) {
                seqs.push(AttnSeq { query_start: start, query_len: qlen, context_len: ctx, block_table: t });
                start += qlen;
            }
            let n = start * num_heads * layout.head_dim;
            let q: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
            let scale = 1.0 / (layout.head_dim as f32).sqrt();
            let mut fast = vec![0f32; n];
            let mut slow = vec![0f32; n];
            paged_attention(&mut fast, &q, &k, &v, layout, num_heads, &seqs, scale);
            paged_attention_reference(&mut slow, &q, &k, &v, layout, num_heads, &seqs, scale);
            let max_err = fast.iter().zip(&slow).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(max_err < 1e-4, "trial {trial}: max abs error {max_err}");
        }
    }

    #[test]
    fn single_position_returns_its_value() {
        let layout = KvLayout { block_size: 2, num_kv_heads: 1, head_dim: 4 };
        let k = vec![0.5f32; 4 * layout.block_stride()];
        let mut v = vec![0f32; 4 * layout.block_stride()];
        // Sequence lives in block 3, position 0 -> slot 6.
        v[layout.offset(6, 0)..layout.offset(6, 0) + 4].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        let table = [3u32];
        let seqs = [AttnSeq { query_start: 0, query_len: 1, context_len: 1, block_table: &table }];
        let mut out = vec![0f32; 4];
        paged_attention(&mut out, &[1.0; 4], &k, &v, layout, 1, &seqs, 1.0);
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0]);
    }
}

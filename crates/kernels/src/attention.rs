//! Paged attention on the CPU: queries attend to keys/values stored in fixed-size blocks.
//!
//! Cache layout for one layer (K and V each), elements f32 or f16 (half the bytes to read per decode
//! step; [`KvElem`]); scores and outputs are accumulated in f32 either way:
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

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

use crate::pool::{for_each_chunk_mut, for_each_chunk_mut_with, for_each_split_mut_with};
use crate::quant::Isa;
use crate::vec::{axpy, dot_scalar};
use half::f16;

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F16,
    F32,
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            _ => Err(format!("unknown KV cache dtype {s:?} (f16 or f32)")),
        }
    }
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

/// A KV cache element: stored as `Self`, computed with in f32.
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// `dst[i] = from_f32(src[i])`, bitwise, in one vectorized pass where the type has one.
    fn store(dst: &mut [Self], src: &[f32]) {
        assert_eq!(dst.len(), src.len(), "store lengths");
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = Self::from_f32(*s));
    }
    /// `Σ q·k`, portable.
    fn dot(q: &[f32], k: &[Self]) -> f32;
    /// `acc += a·v`, portable.
    fn axpy(acc: &mut [f32], a: f32, v: &[Self]);
    /// `dot` with AVX2.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `q` and `k` have equal lengths.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_avx2(q: &[f32], k: &[Self]) -> f32;
    /// `axpy` with AVX2.
    ///
    /// # Safety
    /// As `dot_avx2`: the features available, `acc` and `v` of equal lengths.
    #[cfg(target_arch = "x86_64")]
    unsafe fn axpy_avx2(acc: &mut [f32], a: f32, v: &[Self]);
    /// Eight elements from `p`, widened to f32.
    ///
    /// # Safety
    /// AVX2 and F16C available; `p` points to eight readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn store(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn dot(q: &[f32], k: &[f32]) -> f32 {
        dot_scalar(q, k)
    }
    #[inline(always)]
    fn axpy(acc: &mut [f32], a: f32, v: &[f32]) {
        axpy(acc, a, v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2(q: &[f32], k: &[f32]) -> f32 {
        debug_assert_eq!(q.len(), k.len());
        crate::vec::simd::dot_avx2(q.as_ptr(), k.as_ptr(), q.len())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn axpy_avx2(acc: &mut [f32], a: f32, v: &[f32]) {
        // Inlined into an AVX2 function, the plain loop compiles to FMAs.
        axpy(acc, a, v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn store(dst: &mut [f16], src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn dot(q: &[f32], k: &[f16]) -> f32 {
        q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum()
    }
    fn axpy(acc: &mut [f32], a: f32, v: &[f16]) {
        acc.iter_mut().zip(v).for_each(|(y, x)| *y += a * x.to_f32());
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2(q: &[f32], k: &[f16]) -> f32 {
        use std::arch::x86_64::*;
        debug_assert_eq!(q.len(), k.len());
        let n = q.len();
        let (qp, kp) = (q.as_ptr(), k.as_ptr() as *const __m128i);
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), _mm256_cvtph_ps(_mm_loadu_si128(kp.add(i / 8))), a0);
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(qp.add(i + 8)),
                _mm256_cvtph_ps(_mm_loadu_si128(kp.add(i / 8 + 1))),
                a1,
            );
            i += 16;
        }
        let mut s = crate::vec::simd::hsum(_mm256_add_ps(a0, a1));
        for j in i..n {
            s += q[j] * k[j].to_f32();
        }
        s
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn axpy_avx2(acc: &mut [f32], a: f32, v: &[f16]) {
        use std::arch::x86_64::*;
        debug_assert_eq!(acc.len(), v.len());
        let n = acc.len();
        let (yp, vp) = (acc.as_mut_ptr(), v.as_ptr() as *const u8);
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(2 * i) as *const __m128i));
            _mm256_storeu_ps(yp.add(i), _mm256_fmadd_ps(av, x, _mm256_loadu_ps(yp.add(i))));
            i += 8;
        }
        for j in i..n {
            acc[j] += a * v[j].to_f32();
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

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

impl AttnSeq<'_> {
    /// Positions query `i` sees (causal): `0 .. context_len - query_len + i + 1`.
    fn query_context(&self, i: usize) -> usize {
        self.context_len - self.query_len + i + 1
    }

    /// The first position query `i` sees: 0, or with a sliding `window` the start of its last `window`.
    fn query_from(&self, i: usize, window: Option<usize>) -> usize {
        window.map_or(0, |w| self.query_context(i).saturating_sub(w))
    }
}

fn check(seqs: &[AttnSeq<'_>], layout: KvLayout, cache_len: usize) {
    let mut next = 0;
    for s in seqs {
        // The (token, kv head) pairs are numbered by packed query row, so the rows must be packed in order.
        assert_eq!(s.query_start, next, "sequences' query rows are not packed in order");
        next += s.query_len;
        assert!(s.query_len <= s.context_len, "query_len > context_len");
        let needed = s.context_len.div_ceil(layout.block_size);
        assert!(s.block_table.len() >= needed, "block table too short");
        for &b in &s.block_table[..needed] {
            assert!((b as usize + 1) * layout.block_stride() <= cache_len, "block id out of range");
        }
    }
}

/// Positions per work item: a long context is split into chunks of this many positions whose partial
/// softmax results are merged (flash-decoding), so a single decoding sequence still spreads over the
/// threads. The split depends only on the sequence's own length, never on the rest of the batch, so a
/// sequence gets bitwise the same result alone or batched.
pub const CHUNK: usize = 128;

/// Positions scored together before their values are accumulated (one softmax rescale per tile).
const TILE: usize = 32;

/// Online-softmax state of one query head over part of the context: running max `m`, running sum `l` of
/// `exp(score - m)`, and the unnormalized output `acc`.
struct Partial<'a> {
    m: &'a mut [f32],
    l: &'a mut [f32],
    acc: &'a mut [f32],
}

impl<'a> Partial<'a> {
    /// The state of `group` heads kept in `buf`: `m` per head, then `l`, then `acc` (`head_dim` per head).
    fn of(buf: &'a mut [f32], group: usize) -> Self {
        let (ml, acc) = buf.split_at_mut(2 * group);
        let (m, l) = ml.split_at_mut(group);
        Partial { m, l, acc }
    }
}

/// One work item: the `group` query heads in `qg` (sharing kv head `kvh`) over positions `range` of one
/// sequence, whose cache slots `slot_of` gives.
struct Span<'a, T> {
    qg: &'a [f32],
    k_cache: &'a [T],
    v_cache: &'a [T],
    layout: KvLayout,
    kvh: usize,
    slot_of: &'a dyn Fn(usize) -> usize,
    range: std::ops::Range<usize>,
    scale: f32,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels
    isa: Isa,
}

/// Folds `sp` into `st`. Picks the AVX2 build of the loop when the CPU has it (detected once, see
/// `quant::Isa`), else the portable one.
fn attend_range<T: KvElem>(st: &mut Partial<'_>, sp: &Span<'_, T>, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if sp.isa.avx2() {
        if sp.layout.head_dim.is_multiple_of(8) {
            // SAFETY: an AVX2 path means AVX2, FMA and F16C were detected at run time; the head size is a
            // multiple of 8; `check` put every slot in range inside the caches; the caller sized `scores`.
            unsafe { avx2::attend_range(st, sp, scores) };
        } else {
            // SAFETY: as above (this loop has no head-size condition).
            unsafe { attend_range_avx2(st, sp, scores) };
        }
        return;
    }
    attend_range_impl(st, sp, scores, T::dot, T::axpy);
}

/// SAFETY (caller): AVX2, FMA and F16C available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_range_avx2<T: KvElem>(st: &mut Partial<'_>, sp: &Span<'_, T>, scores: &mut [f32]) {
    // SAFETY (both): AVX2, FMA and F16C are enabled on this function; the loop passes equal lengths.
    let dot = |a: &[f32], b: &[T]| unsafe { T::dot_avx2(a, b) };
    let axpy = |y: &mut [f32], a: f32, x: &[T]| unsafe { T::axpy_avx2(y, a, x) };
    attend_range_impl(st, sp, scores, dot, axpy);
}

#[inline(always)]
fn attend_range_impl<T: KvElem>(
    st: &mut Partial<'_>,
    sp: &Span<'_, T>,
    scores: &mut [f32],
    dot: impl Fn(&[f32], &[T]) -> f32,
    axpy: impl Fn(&mut [f32], f32, &[T]),
) {
    let Span { qg, k_cache, v_cache, layout, kvh, slot_of, ref range, scale, .. } = *sp;
    let hd = layout.head_dim;
    let group = qg.len() / hd;
    let mut offs = [0usize; TILE];
    let mut t0 = range.start;
    while t0 < range.end {
        let tl = TILE.min(range.end - t0);
        for (j, o) in offs[..tl].iter_mut().enumerate() {
            *o = layout.offset(slot_of(t0 + j), kvh);
        }
        for g in 0..group {
            let qh = &qg[g * hd..(g + 1) * hd];
            let sc = &mut scores[g * TILE..g * TILE + tl];
            for (s, &o) in sc.iter_mut().zip(&offs[..tl]) {
                *s = dot(qh, &k_cache[o..o + hd]) * scale;
            }
            let tile_max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let m_new = st.m[g].max(tile_max);
            if st.m[g] != m_new {
                // exp(-inf) = 0 clears the empty initial state.
                let corr = (st.m[g] - m_new).exp();
                st.l[g] *= corr;
                st.acc[g * hd..(g + 1) * hd].iter_mut().for_each(|a| *a *= corr);
                st.m[g] = m_new;
            }
            let mut sum = 0f32;
            for s in sc.iter_mut() {
                *s = (*s - m_new).exp();
                sum += *s;
            }
            st.l[g] += sum;
        }
        for (j, &o) in offs[..tl].iter().enumerate() {
            let v = &v_cache[o..o + hd];
            for g in 0..group {
                axpy(&mut st.acc[g * hd..(g + 1) * hd], scores[g * TILE + j], v);
            }
        }
        t0 += tl;
    }
}

/// Fast paged attention. `out` and `q` are `[num_tokens, num_heads, head_dim]`. With a `window`, each query
/// sees only the last `window` positions up to itself (sliding-window layers); chunks wholly before every
/// query's window are skipped, so a long context costs a sliding layer only its window.
///
/// Work items are (token, kv head, chunk of `CHUNK` positions), a prefill's tokens taken `BLOCK_TOKENS` at a
/// time; the query heads sharing a kv head (GQA) read each K/V row once. Each item runs an online softmax
/// over tiles of positions, reading K/V in place from the blocks (a block of tokens converts each tile to
/// f32 once for all its tokens); chunks of one (token, kv head) are then merged.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: KvElem>(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[T],
    v_cache: &[T],
    layout: KvLayout,
    num_heads: usize,
    seqs: &[AttnSeq<'_>],
    scale: f32,
    window: Option<usize>,
) {
    paged_attention_on(Isa::detected(), out, q, k_cache, v_cache, layout, num_heads, seqs, scale, window)
}

/// `paged_attention` on a given instruction set (tests force each one).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_on<T: KvElem>(
    isa: Isa,
    out: &mut [f32],
    q: &[f32],
    k_cache: &[T],
    v_cache: &[T],
    layout: KvLayout,
    num_heads: usize,
    seqs: &[AttnSeq<'_>],
    scale: f32,
    window: Option<usize>,
) {
    assert!(isa.on_this_cpu(), "{isa:?} kernels asked for on a CPU without them");
    check(seqs, layout, k_cache.len().min(v_cache.len()));
    let hd = layout.head_dim;
    let nkv = layout.num_kv_heads;
    let group = num_heads / nkv;
    let num_tokens: usize = seqs.iter().map(|s| s.query_len).sum();
    // A (token, kv head) pair's output rows are `out[pair · group · hd ..]`, pair = token · nkv + kvh.
    let pairs = num_tokens * nkv;
    let out = &mut out[..pairs * group * hd];
    // Work items: (block of query tokens, kv head, chunk of positions); item `i` writes the partial states of
    // its tokens that reach the chunk (a suffix of the block) into state slots `slots[i] .. slots[i + 1]`.
    let mut items: Vec<Item> = Vec::new();
    let mut slots = vec![0usize];
    // Per pair: its (block, kv head)'s first item, its token's place in the block, its chunk count.
    let mut pair_items = vec![(0usize, 0usize, 0usize); pairs];
    for (si, s) in seqs.iter().enumerate() {
        let ctx = |i: usize| s.query_context(i);
        let bq = if s.query_len > 1 { BLOCK_TOKENS } else { 1 };
        for i0 in (0..s.query_len).step_by(bq) {
            let nq = bq.min(s.query_len - i0);
            // The block's first chunk: the one holding its first token's first visible position (chunks stay
            // aligned to absolute positions, so the split depends only on the sequence).
            let c_lo = s.query_from(i0, window) / CHUNK;
            for kvh in 0..nkv {
                let first = items.len();
                for j in 0..nq {
                    pair_items[(s.query_start + i0 + j) * nkv + kvh] = (first, j, ctx(i0 + j).div_ceil(CHUNK) - c_lo);
                }
                for c0 in (c_lo * CHUNK..ctx(i0 + nq - 1)).step_by(CHUNK) {
                    let jmin = (0..nq).find(|&j| ctx(i0 + j) > c0).expect("the block's last token reaches c0");
                    items.push(Item { si, i0, nq, jmin, kvh, c0 });
                    slots.push(slots[slots.len() - 1] + nq - jmin);
                }
            }
        }
    }
    // One item's tokens (states in `buf`: per token, per query head m, then l, then acc[hd]).
    let stride = group * (hd + 2);
    let work = |idx: usize, buf: &mut [f32], scratch: &mut Scratch| {
        let Item { si, i0, nq, jmin, kvh, c0 } = items[idx];
        let s = &seqs[si];
        let bs = layout.block_size;
        let slot_of = |p: usize| s.block_table[p / bs] as usize * bs + p % bs;
        // The item's tokens: queries, where their positions end, their states (no allocation: decode runs this
        // per token, kv head and layer).
        let tokens = nq - jmin;
        let mut qs: [&[f32]; BLOCK_TOKENS] = [&[]; BLOCK_TOKENS];
        let mut ends = [0usize; BLOCK_TOKENS];
        // Where each token's positions start in this chunk: past `c0` only in a window's first chunk (a token
        // whose window starts after the chunk gets an empty range: its state stays empty, weight 0 in the merge).
        let mut starts = [0usize; BLOCK_TOKENS];
        for (t, j) in (jmin..nq).enumerate() {
            let q0 = ((s.query_start + i0 + j) * num_heads + kvh * group) * hd;
            qs[t] = &q[q0..q0 + group * hd];
            ends[t] = s.query_context(i0 + j).min(c0 + CHUNK);
            starts[t] = s.query_from(i0 + j, window).max(c0);
        }
        let buf = &mut buf[..tokens * stride];
        for b in buf.chunks_exact_mut(stride) {
            let (m, rest) = b.split_at_mut(group);
            m.fill(f32::NEG_INFINITY);
            rest.fill(0.0);
        }
        // `qg` and `range` are set per token below (`attend_block` reads only the rest).
        let span = Span { qg: qs[0], k_cache, v_cache, layout, kvh, slot_of: &slot_of, range: c0..c0, scale, isa };
        scratch.scores.resize(tokens * group * TILE, 0.0);
        #[cfg(target_arch = "x86_64")]
        if tokens > 1 && isa.avx2() && hd.is_multiple_of(8) && starts[..tokens].iter().all(|&st| st == c0) {
            scratch.rows.resize(2 * TILE * hd, 0.0);
            let (qs, ends) = (&qs[..tokens], &ends[..tokens]);
            // SAFETY: an AVX2 path means AVX2, FMA and F16C were detected; the head size is a multiple of 8;
            // `check` put every slot of every token's range inside the caches; the scratch is sized above.
            unsafe { avx2::attend_block(buf, qs, ends, c0, &span, &mut scratch.scores, &mut scratch.rows) };
            return;
        }
        for (t, b) in buf.chunks_exact_mut(stride).enumerate() {
            attend_range(
                &mut Partial::of(b, group),
                &Span { qg: qs[t], range: starts[t]..ends[t], ..span },
                &mut scratch.scores,
            );
        }
    };
    if items.len() == pairs && items.iter().all(|it| it.nq == 1) {
        // Decode only, every context within one chunk: normalize straight into the output (the same
        // arithmetic as merging a single chunk, so results do not depend on which path a batch takes).
        let direct = |(pair, out_g): (usize, &mut [f32]), scratch: &mut (Vec<f32>, Scratch)| {
            let (buf, sc) = scratch;
            buf.resize(stride, 0.0);
            work(pair_items[pair].0, buf, sc);
            for g in 0..group {
                let inv = 1.0 / buf[group + g];
                let acc = &buf[2 * group + g * hd..2 * group + (g + 1) * hd];
                for (o, a) in out_g[g * hd..(g + 1) * hd].iter_mut().zip(acc) {
                    *o = a * inv;
                }
            }
        };
        if pairs <= 1 {
            let mut scratch = Default::default();
            out.chunks_mut(group * hd).enumerate().for_each(|item| direct(item, &mut scratch));
        } else {
            for_each_chunk_mut_with(out, group * hd, Default::default, |sc, i, chunk| direct((i, chunk), sc));
        }
        return;
    }
    let mut partial = vec![0f32; slots[slots.len() - 1] * stride];
    let bounds: Vec<usize> = slots.iter().map(|s| s * stride).collect();
    for_each_split_mut_with(&mut partial, &bounds, Scratch::default, |sc, idx, buf| work(idx, buf, sc));
    // Merge the chunks of each (token, kv head) into the output rows of its query heads.
    let merge = |(pair, out_g): (usize, &mut [f32])| {
        let (first, j, chunks) = pair_items[pair];
        let chunk = |c: usize| {
            let slot = slots[first + c] + j - items[first + c].jmin;
            &partial[slot * stride..(slot + 1) * stride]
        };
        for g in 0..group {
            let m = (0..chunks).map(|c| chunk(c)[g]).fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out_g[g * hd..(g + 1) * hd];
            o.fill(0.0);
            let mut l = 0f32;
            for c in (0..chunks).map(chunk) {
                let w = (c[g] - m).exp();
                l += c[group + g] * w;
                axpy(o, w, &c[2 * group + g * hd..2 * group + (g + 1) * hd]);
            }
            let inv = 1.0 / l;
            o.iter_mut().for_each(|x| *x *= inv);
        }
    };
    // A decode step has a handful of pairs: merging them is cheaper than waking the pool.
    if pairs <= 16 {
        out.chunks_mut(group * hd).enumerate().for_each(merge);
    } else {
        for_each_chunk_mut(out, group * hd, |i, chunk| merge((i, chunk)));
    }
}

/// Query tokens of one sequence's prefill that one work item takes together: each K/V tile is converted once
/// for all of them (and read from L1), not once per token. Criterion `attention/prefill_128_after_384` (2
/// threads): f16 cache 3.49 ms with every token on its own, 2.63 ms in blocks of 4, 2.27 in blocks of 8 (16:
/// no better); f32 cache 4.41 -> 2.26 ms.
const BLOCK_TOKENS: usize = 8;

/// A work item of `paged_attention_on`: tokens `i0 + jmin .. i0 + nq` of sequence `si` (those of the block
/// `i0 .. i0 + nq` whose context reaches `c0`), kv head `kvh`, positions from `c0` to each token's end or
/// `c0 + CHUNK`.
#[derive(Clone, Copy)]
struct Item {
    si: usize,
    i0: usize,
    nq: usize,
    jmin: usize,
    kvh: usize,
    c0: usize,
}

/// Per-thread buffers of the attention work items.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    /// A tile's K and V rows in f32 (`attend_block`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    rows: Vec<f32>,
}

/// Plain reference: gathers each sequence's K/V into contiguous rows and does textbook attention in f64.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_reference<T: KvElem>(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[T],
    v_cache: &[T],
    layout: KvLayout,
    num_heads: usize,
    seqs: &[AttnSeq<'_>],
    scale: f32,
    window: Option<usize>,
) {
    check(seqs, layout, k_cache.len().min(v_cache.len()));
    let hd = layout.head_dim;
    let group = num_heads / layout.num_kv_heads;
    for s in seqs {
        let gather = |cache: &[T], p: usize, kvh: usize| -> Vec<f64> {
            let block = s.block_table[p / layout.block_size] as usize;
            let base = ((block * layout.block_size + p % layout.block_size) * layout.num_kv_heads + kvh) * hd;
            cache[base..base + hd].iter().map(|&x| x.to_f32() as f64).collect()
        };
        for i in 0..s.query_len {
            let t = s.query_start + i;
            let visible = s.context_len - s.query_len + i + 1;
            let from = window.map_or(0, |w| visible.saturating_sub(w));
            for h in 0..num_heads {
                let kvh = h / group;
                let qh: Vec<f64> = q[(t * num_heads + h) * hd..][..hd].iter().map(|&x| x as f64).collect();
                let logits: Vec<f64> = (from..visible)
                    .map(|p| gather(k_cache, p, kvh).iter().zip(&qh).map(|(a, b)| a * b).sum::<f64>() * scale as f64)
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let mut acc = vec![0f64; hd];
                for (p, w) in (from..visible).zip(&e) {
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

    #[test]
    fn slice_store_converts_as_from_f32() {
        // f16's vectorized slice conversion against the scalar one, edges included (subnormals, the largest
        // finite value, values that round to infinity, infinities, NaN), and lengths with vector tails.
        let mut src = vec![
            0.0,
            -0.0,
            1e-8,
            -3e-7,
            6.1e-5,
            65504.0,
            65519.0,
            65520.0,
            1e6,
            -1e6,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        src.extend((0..37).map(|i| ((i as f32) * 0.917).sin() * 300.0));
        for len in [src.len(), 7, 9, 16, 1] {
            let mut fast = vec![f16::ZERO; len];
            f16::store(&mut fast, &src[..len]);
            let slow: Vec<f16> = src[..len].iter().map(|&v| f16::from_f32(v)).collect();
            assert_eq!(
                fast.iter().map(|h| h.to_bits()).collect::<Vec<_>>(),
                slow.iter().map(|h| h.to_bits()).collect::<Vec<_>>()
            );
        }
        let mut nan = [f16::ZERO; 9];
        f16::store(&mut nan, &[f32::NAN; 9]);
        assert!(nan.iter().all(|h| h.is_nan()));
        let mut f = [0f32; 3];
        f32::store(&mut f, &[1.5, -2.0, f32::MAX]);
        assert_eq!(f, [1.5, -2.0, f32::MAX]);
    }

    /// Ragged mixed batch (decode rows and prefill chunks), shuffled block tables, GQA, f32 and f16 caches
    /// (the reference reads the same stored values); error bound 1e-4 absolute on outputs that are convex
    /// combinations of values in [-1, 1].
    #[test]
    fn fast_matches_reference_on_random_ragged_batches() {
        ragged_batches::<f32>();
        ragged_batches::<f16>();
    }

    fn isas() -> Vec<Isa> {
        Isa::all_on_this_cpu()
    }

    fn ragged_batches<T: KvElem>() {
        let mut rng = Lcg(42);
        for trial in 0..20 {
            for isa in isas() {
                let layout = KvLayout {
                    block_size: [1, 4, 16][trial % 3],
                    num_kv_heads: 1 + trial % 3,
                    head_dim: [8, 64, 12, 96][trial % 4],
                };
                let num_heads = layout.num_kv_heads * (1 + trial % 4);
                let num_blocks = 64;
                let cache_len = num_blocks * layout.block_stride();
                let k: Vec<T> = (0..cache_len).map(|_| T::from_f32(rng.next_f32())).collect();
                let v: Vec<T> = (0..cache_len).map(|_| T::from_f32(rng.next_f32())).collect();
                let mut free: Vec<u32> = (0..num_blocks as u32).collect();
                for i in (1..free.len()).rev() {
                    free.swap(i, rng.below(i + 1));
                }
                let nseq = 1 + rng.below(4);
                let mut tables = Vec::new();
                let mut shapes = Vec::new();
                for _ in 0..nseq {
                    let ctx = 1 + rng.below(400.min(num_blocks * layout.block_size / nseq));
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
                // Every third trial slides: windows shorter and longer than a chunk.
                let window = (trial % 3 == 2).then(|| 1 + rng.below(300));
                let mut fast = vec![0f32; n];
                let mut slow = vec![0f32; n];
                paged_attention_on(isa, &mut fast, &q, &k, &v, layout, num_heads, &seqs, scale, window);
                paged_attention_reference(&mut slow, &q, &k, &v, layout, num_heads, &seqs, scale, window);
                let max_err = fast.iter().zip(&slow).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let t = std::any::type_name::<T>();
                assert!(max_err < 1e-4, "{t} {isa:?}: trial {trial} (window {window:?}): max abs error {max_err}");
            }
        }
    }

    /// A sequence's output is bitwise the same alone and batched with others, whether or not the batch needs
    /// chunk merging (a long companion), and whether its rows come as one prefill or one by one.
    #[test]
    fn results_are_bitwise_independent_of_the_batch() {
        // Windows: none, one inside a chunk, one across chunk boundaries (prefill tokens whose windows start in
        // different chunks), one wider than every context.
        for window in [None, Some(20), Some(130), Some(1000)] {
            batch_independence::<f32>(window);
            batch_independence::<f16>(window);
        }
    }

    fn batch_independence<T: KvElem>(window: Option<usize>) {
        let mut rng = Lcg(5);
        let layout = KvLayout { block_size: 16, num_kv_heads: 2, head_dim: 64 };
        let nh = 6;
        let len = 64 * layout.block_stride();
        let k: Vec<T> = (0..len).map(|_| T::from_f32(rng.next_f32())).collect();
        let v: Vec<T> = (0..len).map(|_| T::from_f32(rng.next_f32())).collect();
        let short: Vec<u32> = (0..6).collect();
        let long: Vec<u32> = (10..40).collect();
        let row = nh * layout.head_dim;
        let q: Vec<f32> = (0..11 * row).map(|_| rng.next_f32()).collect();
        let run = |seqs: &[AttnSeq<'_>], rows: usize| {
            let mut out = vec![0f32; rows * row];
            paged_attention(&mut out, &q[..rows * row], &k, &v, layout, nh, seqs, 0.125, window);
            out
        };
        // The short sequence's last 3 positions (context 90) as one prefill chunk.
        let alone = run(&[AttnSeq { query_start: 0, query_len: 3, context_len: 90, block_table: &short }], 3);
        let with_long = run(
            &[
                AttnSeq { query_start: 0, query_len: 3, context_len: 90, block_table: &short },
                AttnSeq { query_start: 3, query_len: 1, context_len: 470, block_table: &long },
            ],
            4,
        );
        assert_eq!(alone[..], with_long[..3 * row]);
        for i in 0..3 {
            let one = AttnSeq { query_start: 0, query_len: 1, context_len: 88 + i, block_table: &short };
            let mut out = vec![0f32; row];
            paged_attention(&mut out, &q[i * row..(i + 1) * row], &k, &v, layout, nh, &[one], 0.125, window);
            assert_eq!(out[..], alone[i * row..(i + 1) * row], "row {i} decoded alone");
        }
        // Eleven prefill rows (blocks of eight and three query tokens) against each row decoded alone: contexts
        // 253 ..= 263 end on both sides of a chunk boundary (256; the first block's last chunk has only its
        // last four tokens), contexts 220 ..= 230 on both sides of a tile boundary (224) inside a chunk.
        for last in [263, 230] {
            let first = last - 10;
            let seq = AttnSeq { query_start: 0, query_len: 11, context_len: last, block_table: &long };
            let prefill = run(&[seq], 11);
            for i in 0..11 {
                let one = AttnSeq { query_start: 0, query_len: 1, context_len: first + i, block_table: &long };
                let mut out = vec![0f32; row];
                paged_attention(&mut out, &q[i * row..(i + 1) * row], &k, &v, layout, nh, &[one], 0.125, window);
                assert_eq!(
                    out[..],
                    prefill[i * row..(i + 1) * row],
                    "window {window:?}, context {}: prefill row {i}",
                    first + i
                );
            }
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
        paged_attention(&mut out, &[1.0; 4], &k, &v, layout, 1, &seqs, 1.0, None);
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0]);
    }
}

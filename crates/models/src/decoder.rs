//! One decoder-only transformer covering the llama family and qwen2, selected by capability flags in
//! [`ModelConfig`] (attention biases, RoPE layout, tied embeddings).
//!
//! Per layer, for a flattened batch of `n` tokens:
//!
//! ```text
//!   x ─ rms_norm ─ q,k,v proj (+bias) ─ rope(positions) ─ write k,v → paged cache ─ paged attention ─ o proj ─(+)─
//!   x ─ rms_norm ─ gate,up proj ─ silu(gate)·up ─ down proj ─(+)─
//! ```
//!
//! Activations are plain f32 slices. Matmuls with Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q6_K weights use our kernels (8-bit,
//! 16-bit or f32 activations, see [`ActivationPrecision`]); other formats (and f32 weights when loaded with
//! `dequantize`) go through candle's `QMatMul`. Attention and cache writes are handled by `mlx_serving_kernels`.

use crate::config::{ModelConfig, RopeStyle};
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::kv::{BatchInput, KvLayers, LayerKv, PagedKvCache};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use mlx_serving_kernels::{
    paged_attention, qmatmul, Activations, AttnSeq, KvDtype, KvElem, KvLayout, QMatrix, QuantFormat,
};
use std::path::Path;

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Dequantize every weight to f32 at load: slow and large, but the arithmetic matches a float32
    /// reference implementation (used by tests that compare logits tightly).
    pub dequantize: bool,
    /// How activations enter the quantized matmuls (see [`ActivationPrecision`]).
    pub activations: ActivationPrecision,
    /// KV cache element type: f16 (the default) or f32 (twice the memory and attention bandwidth).
    pub kv_cache_dtype: KvDtype,
}

/// Precision of the activations entering the quantized matmuls, per model (`--activations`).
///
/// Rounding activations to 8 bits per block (llama.cpp's scheme) is the fastest, but its error is noise
/// that adds up over the matmuls. Measured on SmolLM2 (first-step top-5 logprobs against transformers f32,
/// one kind of matmul rounded at a time): the output head 0.16, the q/k/v projections 0.13–0.17, gate/up
/// 0.14–0.18, down 0.07, o 0.06; all of them together 0.18–0.30 depending on the kernels' summation order,
/// up to over the 0.25 the golden test allows. 16-bit activations (16-bit integer products, `madd`) cost
/// compute: one SmolLM2 decode step's matmuls take 4.8 ms against 3.8 at 8 bits (criterion `decode_pass`),
/// and 1.4x (8 decode rows) to about 1.5x (a 512-token prompt; 1.9x before the 16-bit weights were widened
/// once per row of tiles) the 8-bit time where multiplies set the pace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActivationPrecision {
    /// 16 bits into the output head, q/k/v and gate/up; 8 bits into o and down (16 where those are Q8_0, see
    /// `for_weight`): 0.08–0.14 on SmolLM2.
    /// (16 bits into the head and q/k/v only measured 0.12–0.22, too close to 0.25 as the 8-bit noise is
    /// redrawn by any change of summation order.)
    #[default]
    Mixed,
    /// 8 bits everywhere but into Q8_0 weights (16 bits there, see `for_weight`; SmolLM2's tied head is
    /// Q8_0): the fastest, 0.21 on SmolLM2 (0.32 with the head at 8 bits too).
    Int8,
    /// 16 bits everywhere: 0.002–0.005 on SmolLM2.
    Int16,
    /// f32 everywhere: the float32 reference's arithmetic up to summation order (0.0001), the slowest.
    F32,
}

impl std::str::FromStr for ActivationPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mixed" => Ok(Self::Mixed),
            "int8" => Ok(Self::Int8),
            "int16" => Ok(Self::Int16),
            "f32" => Ok(Self::F32),
            _ => Err(format!("unknown activation precision {s:?} (mixed, int8, int16 or f32)")),
        }
    }
}

impl ActivationPrecision {
    /// The kernel precision for the GGUF tensor `name` stored as `format`. Q8_0 weights never take 8-bit
    /// activations: SmolLM2's tied Q8_0 head at 8 bits alone moves `int8`'s first-step logprobs from 0.21 to
    /// 0.32, over the 0.25 bound. The cost is small: on AVX2 the signed bytes make the 8-bit product no faster
    /// than the 16-bit one (`maddubs` wants one unsigned operand, so each product pays a sign transfer and a
    /// widening; in-cache probe, `examples/probe.rs q8_0`, 8 rows: 0.9-1.0x the 16-bit time); with
    /// AVX-512 VNNI it is 1.36x faster (device Xeon, 3072 x 576, one thread).
    pub fn for_weight(self, name: &str, format: QuantFormat) -> Activations {
        match self.for_tensor(name) {
            Activations::Int8 if format == QuantFormat::Q8_0 => Activations::Int16,
            a => a,
        }
    }

    /// The kernel precision for the GGUF tensor `name`, whatever its format.
    fn for_tensor(self, name: &str) -> Activations {
        match self {
            Self::Int8 => Activations::Int8,
            Self::Int16 => Activations::Int16,
            Self::F32 => Activations::F32,
            Self::Mixed => {
                let head = name == "output.weight" || name == "token_embd.weight";
                let wide = [".attn_q.", ".attn_k.", ".attn_v.", ".ffn_gate.", ".ffn_up."];
                if head || wide.iter().any(|p| name.contains(p)) {
                    Activations::Int16
                } else {
                    Activations::Int8
                }
            }
        }
    }
}

/// A weight matrix `[out, in]`: our kernels where they cover the format, candle otherwise.
enum Weight {
    Kernel(QMatrix),
    Candle(QMatMul),
}

impl Weight {
    /// `x` is `[n, in]`; returns `[n, out]`.
    fn forward(&self, x: &[f32], n: usize, device: &Device) -> Result<Vec<f32>> {
        match self {
            Self::Kernel(w) => {
                let mut y = vec![0f32; n * w.rows()];
                qmatmul(w, x, &mut y);
                Ok(y)
            }
            Self::Candle(w) => {
                let xt = Tensor::from_slice(x, (n, x.len() / n), device)?;
                Ok(w.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }
}

struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn forward(&self, x: &[f32], n: usize, device: &Device) -> Result<Vec<f32>> {
        let mut y = self.weight.forward(x, n, device)?;
        if let Some(b) = &self.bias {
            for row in y.chunks_mut(b.len()) {
                for (yi, bi) in row.iter_mut().zip(b) {
                    *yi += bi;
                }
            }
        }
        Ok(y)
    }
}

/// Projections that read the same input (q/k/v; gate/up). When all are our kernel's format they run as
/// one stacked matmul: one parallel pass over the weights per step instead of several.
enum ProjGroup {
    Fused { weight: QMatrix, sizes: Vec<usize>, biases: Vec<Option<Vec<f32>>> },
    Separate(Vec<Linear>),
}

impl ProjGroup {
    fn new(parts: Vec<Linear>) -> Self {
        let kernels: Vec<QMatrix> = parts
            .iter()
            .filter_map(|p| match &p.weight {
                Weight::Kernel(m) => Some(m.clone()),
                Weight::Candle(_) => None,
            })
            .collect();
        if kernels.len() == parts.len() {
            if let Ok(weight) = QMatrix::concat_rows(&kernels) {
                let sizes = kernels.iter().map(|k| k.rows()).collect();
                let biases = parts.into_iter().map(|p| p.bias).collect();
                return Self::Fused { weight, sizes, biases };
            }
        }
        Self::Separate(parts)
    }

    /// Each projection's output, `[n, rows_i]`.
    fn forward(&self, x: &[f32], n: usize, device: &Device) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|p| p.forward(x, n, device)).collect(),
            Self::Fused { weight, sizes, biases } => {
                let total = weight.rows();
                let mut y = vec![0f32; n * total];
                qmatmul(weight, x, &mut y);
                let mut outs: Vec<Vec<f32>> = sizes.iter().map(|s| Vec::with_capacity(n * s)).collect();
                for row in y.chunks_exact(total) {
                    let mut off = 0;
                    for (o, &sz) in outs.iter_mut().zip(sizes) {
                        o.extend_from_slice(&row[off..off + sz]);
                        off += sz;
                    }
                }
                for (o, b) in outs.iter_mut().zip(biases) {
                    if let Some(b) = b {
                        for r in o.chunks_mut(b.len()) {
                            r.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
                        }
                    }
                }
                Ok(outs)
            }
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: ProjGroup,
    o: Weight,
    ffn_norm: Vec<f32>,
    gate_up: ProjGroup,
    down: Weight,
}

pub struct Model {
    cfg: ModelConfig,
    device: Device,
    /// Token embeddings, dequantized: `[vocab, hidden]`.
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Weight,
    inv_freq: Vec<f32>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Model {
    /// Opens and loads a GGUF model file on the CPU.
    pub fn load_gguf(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let mut g = GgufFile::open(path)?;
        Self::from_gguf(&mut g, opts, &Device::Cpu)
    }

    pub fn from_gguf(g: &mut GgufFile, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let mut cfg = ModelConfig::from_gguf(g)?;
        cfg.kv_dtype = opts.kv_cache_dtype;
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let matmul = |g: &mut GgufFile, name: &str, shape: &[usize]| -> Result<Weight> {
            let qt = g.tensor(name, shape, device)?;
            to_matmul(g, name, qt, opts)
        };
        let embed_q = g.tensor("token_embd.weight", &[cfg.vocab_size, h], device)?;
        let embed = embed_q
            .dequantize(device)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| g.bad_tensor("token_embd.weight", e.to_string()))?;
        let lm_head = if cfg.tie_word_embeddings {
            to_matmul(g, "token_embd.weight", embed_q, opts)?
        } else {
            matmul(g, "output.weight", &[cfg.vocab_size, h])?
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("blk.{i}");
            let bias = |g: &mut GgufFile, name: &str, n: usize| -> Result<Option<Vec<f32>>> {
                if !cfg.attention_bias {
                    return Ok(None);
                }
                vector(g, &format!("{p}.{name}.bias"), n, device).map(Some)
            };
            let q = Linear {
                weight: matmul(g, &format!("{p}.attn_q.weight"), &[cfg.q_size(), h])?,
                bias: bias(g, "attn_q", cfg.q_size())?,
            };
            let k = Linear {
                weight: matmul(g, &format!("{p}.attn_k.weight"), &[cfg.kv_size(), h])?,
                bias: bias(g, "attn_k", cfg.kv_size())?,
            };
            let v = Linear {
                weight: matmul(g, &format!("{p}.attn_v.weight"), &[cfg.kv_size(), h])?,
                bias: bias(g, "attn_v", cfg.kv_size())?,
            };
            layers.push(Layer {
                attn_norm: vector(g, &format!("{p}.attn_norm.weight"), h, device)?,
                qkv: ProjGroup::new(vec![q, k, v]),
                o: matmul(g, &format!("{p}.attn_output.weight"), &[h, cfg.q_size()])?,
                ffn_norm: vector(g, &format!("{p}.ffn_norm.weight"), h, device)?,
                gate_up: ProjGroup::new(vec![
                    Linear { weight: matmul(g, &format!("{p}.ffn_gate.weight"), &[ffn, h])?, bias: None },
                    Linear { weight: matmul(g, &format!("{p}.ffn_up.weight"), &[ffn, h])?, bias: None },
                ]),
                down: matmul(g, &format!("{p}.ffn_down.weight"), &[h, ffn])?,
            });
        }
        let norm = vector(g, "output_norm.weight", h, device)?;
        // inv_freq[i] = theta^(-2i/d), as transformers computes it, rounded to f32.
        let inv_freq = (0..cfg.rope_dim / 2)
            .map(|i| (1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.rope_dim as f64)) as f32)
            .collect();
        Ok(Self { cfg, device: device.clone(), embed, layers, norm, lm_head, inv_freq })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Runs one step over a flattened batch, writing each token's K/V into `cache` at its slot, and returns
    /// the logits of the rows in `batch.logits_indices`, row-major `[logits_indices.len(), vocab_size]`.
    pub fn forward(&self, batch: &BatchInput<'_>, cache: &mut PagedKvCache) -> Result<Vec<f32>> {
        batch.validate(cache, self.cfg.max_position_embeddings, self.cfg.vocab_size)?;
        let cfg = &self.cfg;
        let dev = &self.device;
        let n = batch.token_ids.len();
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let mut x = Vec::with_capacity(n * h);
        for &t in batch.token_ids {
            x.extend_from_slice(&self.embed[t as usize * h..(t as usize + 1) * h]);
        }
        let (cos, sin) = self.rope_tables(batch.positions);
        let layout = cache.layout();
        let mut row = 0;
        let seqs: Vec<AttnSeq<'_>> = batch
            .seqs
            .iter()
            .map(|s| {
                let a = AttnSeq {
                    query_start: row,
                    query_len: s.query_len,
                    context_len: s.context_len,
                    block_table: s.block_table,
                };
                row += s.query_len;
                a
            })
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut attn = vec![0f32; n * nh * hd];
        let mut hn = vec![0f32; n * h];
        if cache.dtype() != cfg.kv_dtype {
            return Err(crate::error::Error::InvalidBatch(format!(
                "KV cache holds {:?}, the model was loaded for {:?}",
                cache.dtype(),
                cfg.kv_dtype
            )));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps, &mut hn);
            let [mut q, mut k, v]: [Vec<f32>; 3] =
                layer.qkv.forward(&hn, n, dev)?.try_into().expect("three projections");
            self.apply_rope(&mut q, nh, &cos, &sin);
            self.apply_rope(&mut k, nkv, &cos, &sin);
            let step = AttnStep { layout, slots: batch.slot_mapping, seqs: &seqs, num_heads: nh, scale };
            match &mut cache.layers {
                KvLayers::F16(l) => step.run(&mut l[i], &k, &v, &q, &mut attn),
                KvLayers::F32(l) => step.run(&mut l[i], &k, &v, &q, &mut attn),
            }
            add_assign(&mut x, &layer.o.forward(&attn, n, dev)?);
            rms_norm(&x, &layer.ffn_norm, cfg.rms_norm_eps, &mut hn);
            let [mut gate, up]: [Vec<f32>; 2] =
                layer.gate_up.forward(&hn, n, dev)?.try_into().expect("two projections");
            mlx_serving_kernels::vec::swiglu(&mut gate, &up);
            add_assign(&mut x, &layer.down.forward(&gate, n, dev)?);
        }
        let m = batch.logits_indices.len();
        if m == 0 {
            return Ok(Vec::new());
        }
        let mut last = Vec::with_capacity(m * h);
        for &r in batch.logits_indices {
            last.extend_from_slice(&x[r as usize * h..(r as usize + 1) * h]);
        }
        let mut normed = vec![0f32; m * h];
        rms_norm(&last, &self.norm, cfg.rms_norm_eps, &mut normed);
        self.lm_head.forward(&normed, m, dev)
    }

    /// cos/sin per token and frequency, `[n, rope_dim / 2]`.
    fn rope_tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }

    /// Rotates `x` (`[n, heads, head_dim]`) in place.
    fn apply_rope(&self, x: &mut [f32], heads: usize, cos: &[f32], sin: &[f32]) {
        let hd = self.cfg.head_dim;
        let half = self.inv_freq.len();
        for (t, tok) in x.chunks_mut(heads * hd).enumerate() {
            let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            for head in tok.chunks_mut(hd) {
                match self.cfg.rope_style {
                    RopeStyle::Interleaved => {
                        for i in 0..half {
                            let (a, b) = (head[2 * i], head[2 * i + 1]);
                            head[2 * i] = a * c[i] - b * s[i];
                            head[2 * i + 1] = a * s[i] + b * c[i];
                        }
                    }
                    RopeStyle::Neox => {
                        for i in 0..half {
                            let (a, b) = (head[i], head[i + half]);
                            head[i] = a * c[i] - b * s[i];
                            head[i + half] = a * s[i] + b * c[i];
                        }
                    }
                }
            }
        }
    }
}

/// One layer's cache write and attention over a batch.
struct AttnStep<'a> {
    layout: KvLayout,
    slots: &'a [u32],
    seqs: &'a [AttnSeq<'a>],
    num_heads: usize,
    scale: f32,
}

impl AttnStep<'_> {
    /// Stores each token's `k`/`v` rows (`[n, kv_heads * head_dim]`) at its slot, then attends.
    fn run<T: KvElem>(&self, kv: &mut LayerKv<T>, k: &[f32], v: &[f32], q: &[f32], out: &mut [f32]) {
        let row = self.layout.num_kv_heads * self.layout.head_dim;
        for (t, &slot) in self.slots.iter().enumerate() {
            let dst = self.layout.offset(slot as usize, 0);
            let src = t * row..(t + 1) * row;
            kv.k[dst..dst + row].iter_mut().zip(&k[src.clone()]).for_each(|(d, s)| *d = T::from_f32(*s));
            kv.v[dst..dst + row].iter_mut().zip(&v[src]).for_each(|(d, s)| *d = T::from_f32(*s));
        }
        paged_attention(out, q, &kv.k, &kv.v, self.layout, self.num_heads, self.seqs, self.scale);
    }
}

fn to_matmul(g: &GgufFile, name: &str, qt: QTensor, opts: &LoadOptions) -> Result<Weight> {
    let bad = |e: String| g.bad_tensor(name, e);
    if opts.dequantize {
        let t = qt.dequantize(&qt.device()).map_err(|e| bad(e.to_string()))?;
        return Ok(Weight::Candle(QMatMul::Tensor(t)));
    }
    let format = match qt.dtype() {
        GgmlDType::Q4_0 => Some(QuantFormat::Q4_0),
        GgmlDType::Q4_1 => Some(QuantFormat::Q4_1),
        GgmlDType::Q5_0 => Some(QuantFormat::Q5_0),
        GgmlDType::Q5_1 => Some(QuantFormat::Q5_1),
        GgmlDType::Q8_0 => Some(QuantFormat::Q8_0),
        GgmlDType::Q4K => Some(QuantFormat::Q4_K),
        GgmlDType::Q6K => Some(QuantFormat::Q6_K),
        _ => None,
    };
    match (format, qt.shape().dims()) {
        (Some(format), &[rows, cols]) => {
            let data = qt.data().map_err(|e| bad(e.to_string()))?.into_owned();
            QMatrix::new(format, rows, cols, data)
                .map(|m| Weight::Kernel(m.with_activations(opts.activations.for_weight(name, format))))
                .map_err(|e| bad(e.to_string()))
        }
        _ => QMatMul::from_qtensor(qt).map(Weight::Candle).map_err(|e| bad(e.to_string())),
    }
}

fn vector(g: &mut GgufFile, name: &str, n: usize, device: &Device) -> Result<Vec<f32>> {
    let qt = g.tensor(name, &[n], device)?;
    qt.dequantize(device).and_then(|t| t.to_vec1::<f32>()).map_err(|e| g.bad_tensor(name, e.to_string()))
}

/// `out = x / rms(x) * w` per row, as transformers computes it in f32.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, xi), wi) in or.iter_mut().zip(xr).zip(w) {
            *o = xi * inv * wi;
        }
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

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
//! 16-bit or f32 activations, see [`ActivationPrecision`]), bf16/f16 weights our 16-bit float kernels (f32
//! activations), f32 weights our f32 kernel; other formats (and every weight when loaded with `dequantize`) go
//! through candle's `QMatMul`. Attention and cache writes are handled by `mlx_serving_kernels`.
//!
//! Where our kernels take rounded integer activations, the steps between matmuls are fused so that the
//! activations make one pass through memory instead of several, with bitwise the results of the separate steps:
//! - `rms_norm` and the rounding for the next matmul (`Q8Acts::rms_norm`): the normed rows are never written;
//! - `silu(gate)·up` and the rounding for `down` (`Q8Acts::swiglu`), read straight from the gate/up output;
//! - RoPE and the K/V cache write (`rope::rope_qkv_store`): one pass over the q/k/v output rotates the queries
//!   into the attention's buffer and writes the rotated keys and the values into the cache, converted;
//! - the residual adds: the `o` and `down` matmuls add their results into `x` as they store them.
//!
//! Long batches (prompts) build the rounded activations and do the cache writes over the kernel pool.

use crate::config::{FfnActivation, ModelConfig, RopeStyle};
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::kv::{BatchInput, KvLayers, LayerKv, PagedKvCache};
use crate::source::{TensorData, TensorSource};
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use mlx_serving_kernels::quant::{qmatmul_acts, qmatmul_add, Q8Acts};
use mlx_serving_kernels::rope::{self, rope_qkv_store, QkvStore, RopeTables};
use mlx_serving_kernels::{
    f32_matmul, half_matmul, paged_attention, qmatmul, Activations, AttnSeq, F32Matrix, HalfKind, HalfMatrix, KvDtype,
    KvElem, QMatrix, QuantFormat,
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
    /// Load the configuration only, no weights: the model runs on a device that loads them itself (a GPU, see
    /// [`DeviceModel`](crate::DeviceModel)); `forward` refuses.
    pub config_only: bool,
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

/// A weight matrix `[out, in]`: our kernels where they cover the format (block formats; 16-bit floats),
/// candle otherwise.
enum Weight {
    Kernel(QMatrix),
    Half(HalfMatrix),
    /// f32 weights on our f32 kernel (AVX-512 where the CPU has it).
    F32(F32Matrix),
    Candle(QMatMul),
}

/// Activations entering a projection: f32 rows, or rows already rounded for our integer kernels (by a fused
/// norm or SwiGLU pass).
#[derive(Clone, Copy)]
enum Input<'a> {
    F32(&'a [f32]),
    Rounded(&'a Q8Acts),
}

impl Weight {
    /// `Some(wide)` when this matrix takes rounded integer activations (16-bit when `wide`): then a fused
    /// pass can hand them over already rounded.
    fn rounded(&self) -> Option<bool> {
        match self {
            Self::Kernel(w) => rounded(w),
            Self::Half(_) | Self::F32(_) | Self::Candle(_) => None,
        }
    }

    /// Row `r` as f32 (embedding lookups); only for our kernels' matrices.
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match self {
            Self::Kernel(m) => m.dequantize_row(r, out),
            Self::Half(m) => m.dequantize_row(r, out),
            Self::F32(m) => m.row(r, out),
            Self::Candle(_) => unreachable!("embedding rows come from candle weights only through a dense table"),
        }
    }

    /// `y = x · Wᵀ` (`x` is `[n, in]`, `y` `[n, out]`), or `y += x · Wᵀ` with `add` (a residual in the same pass).
    fn forward_into(&self, x: Input<'_>, n: usize, y: &mut [f32], add: bool, device: &Device) -> Result<()> {
        match (self, x) {
            (Self::Kernel(w), Input::Rounded(a)) => qmatmul_acts(w, a, y, add),
            (Self::Kernel(w), Input::F32(x)) if add => qmatmul_add(w, x, y),
            (Self::Kernel(w), Input::F32(x)) => qmatmul(w, x, y),
            (Self::Half(w), Input::F32(x)) => half_matmul(w, x, y, add),
            (Self::F32(w), Input::F32(x)) => f32_matmul(w, x, y, add),
            (Self::Candle(w), Input::F32(x)) => {
                let xt = Tensor::from_slice(x, (n, x.len() / n), device)?;
                let out = w.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?;
                if add {
                    add_assign(y, &out);
                } else {
                    y.copy_from_slice(&out);
                }
            }
            (Self::Candle(_) | Self::Half(_) | Self::F32(_), Input::Rounded(_)) => {
                unreachable!("rounded activations only go to the block-format kernels")
            }
        }
        Ok(())
    }
}

/// `Some(wide)` when `w` takes rounded integer activations (16-bit when `wide`).
fn rounded(w: &QMatrix) -> Option<bool> {
    match w.activations() {
        Activations::Int8 => Some(false),
        Activations::Int16 => Some(true),
        Activations::F32 => None,
    }
}

struct Linear {
    weight: Weight,
    /// Output features.
    rows: usize,
    bias: Option<Vec<f32>>,
}

/// A projection's width in a group's output, and its bias.
type Part<'a> = (usize, Option<&'a [f32]>);

/// Projections that read the same input (q/k/v; gate/up). When all are one of our kernels' formats they
/// run as one stacked matmul: one parallel pass over the weights per step instead of several.
enum ProjGroup {
    /// `weight` is `Weight::Kernel` or `Weight::Half`.
    Fused {
        weight: Weight,
        sizes: Vec<usize>,
        biases: Vec<Option<Vec<f32>>>,
    },
    Separate(Vec<Linear>),
}

impl ProjGroup {
    fn new(parts: Vec<Linear>) -> Self {
        let sizes: Vec<usize> = parts.iter().map(|p| p.rows).collect();
        let all = |f: fn(&Weight) -> bool| parts.iter().all(|p| f(&p.weight));
        let (blocks, halves) = (all(|w| matches!(w, Weight::Kernel(_))), all(|w| matches!(w, Weight::Half(_))));
        if !blocks && !halves {
            return Self::Separate(parts);
        }
        // The parts are moved, not cloned: a stacked copy is made, then they are dropped.
        let (weights, biases): (Vec<Weight>, Vec<Option<Vec<f32>>>) =
            parts.into_iter().map(|p| (p.weight, p.bias)).unzip();
        let fused: std::result::Result<Weight, Vec<Weight>> = if blocks {
            let ms: Vec<QMatrix> =
                weights.into_iter().filter_map(|w| if let Weight::Kernel(m) = w { Some(m) } else { None }).collect();
            QMatrix::concat_rows(&ms).map(Weight::Kernel).map_err(|_| ms.into_iter().map(Weight::Kernel).collect())
        } else {
            let ms: Vec<HalfMatrix> =
                weights.into_iter().filter_map(|w| if let Weight::Half(m) = w { Some(m) } else { None }).collect();
            HalfMatrix::concat_rows(&ms).map(Weight::Half).map_err(|_| ms.into_iter().map(Weight::Half).collect())
        };
        match fused {
            Ok(weight) => Self::Fused { weight, sizes, biases },
            Err(weights) => Self::Separate(
                weights
                    .into_iter()
                    .zip(sizes)
                    .zip(biases)
                    .map(|((weight, rows), bias): ((Weight, usize), _)| Linear { weight, rows, bias })
                    .collect(),
            ),
        }
    }

    /// `Some(wide)` when the group runs as one matmul of rounded activations (see `Weight::rounded`).
    /// A separate group qualifies when all its parts are our kernels of one width (e.g. Q4_K_M files, whose
    /// q/k and v formats differ): the rounded activations are made once and shared.
    fn rounded(&self) -> Option<bool> {
        match self {
            Self::Fused { weight, .. } => weight.rounded(),
            Self::Separate(parts) => {
                let first = parts.first()?.weight.rounded()?;
                parts.iter().all(|p| p.weight.rounded() == Some(first)).then_some(first)
            }
        }
    }

    /// Every projection's output side by side, biases added: `[n, Σ rows_i]`, each row the first projection's
    /// values, then the second's, and so on (what a stacked matmul writes). Into `y`, resized: a buffer the
    /// caller reuses across layers (the matmul overwrites every element, so nothing is zeroed first).
    fn forward(&self, x: Input<'_>, n: usize, device: &Device, y: &mut Vec<f32>) -> Result<()> {
        let parts: Vec<Part<'_>> = match self {
            Self::Fused { weight, sizes, biases } => {
                y.resize(n * sizes.iter().sum::<usize>(), 0.0);
                weight.forward_into(x, n, y, false, device)?;
                sizes.iter().zip(biases).map(|(&s, b)| (s, b.as_deref())).collect()
            }
            Self::Separate(parts) => {
                let outs: Vec<Vec<f32>> = parts
                    .iter()
                    .map(|p| {
                        let mut o = vec![0f32; n * p.rows];
                        p.weight.forward_into(x, n, &mut o, false, device).map(|_| o)
                    })
                    .collect::<Result<_>>()?;
                y.clear();
                for t in 0..n {
                    for (o, p) in outs.iter().zip(parts) {
                        y.extend_from_slice(&o[t * p.rows..(t + 1) * p.rows]);
                    }
                }
                parts.iter().map(|p| (p.rows, p.bias.as_deref())).collect()
            }
        };
        if parts.iter().any(|(_, b)| b.is_some()) {
            let total: usize = parts.iter().map(|(sz, _)| sz).sum();
            for row in y.chunks_exact_mut(total) {
                let mut off = 0;
                for &(sz, b) in &parts {
                    if let Some(b) = b {
                        row[off..off + sz].iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
                    }
                    off += sz;
                }
            }
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: ProjGroup,
    /// Per-head RMS norm weights of q and of k, applied before RoPE (qwen3, gemma3).
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    o: Weight,
    ffn_norm: Vec<f32>,
    gate_up: ProjGroup,
    down: Weight,
    /// Norms of the attention output and of the FFN output before their residual adds (gemma3).
    post_norms: Option<(Vec<f32>, Vec<f32>)>,
}

/// Where token embeddings come from.
enum Embedding {
    /// Dequantized rows `[vocab, hidden]`.
    Dense(Vec<f32>),
    /// Rows of the tied output head's kernel matrix, dequantized on lookup (no second copy of a large
    /// vocabulary's table: gemma's 262k rows would take 671 MB in f32).
    Head,
    /// The table as stored, on our kernels' matrices, rows dequantized on lookup (Qwen2.5-0.5B's untied
    /// 152k-row table would take 544 MB in f32).
    Rows(Weight),
}

pub struct Model {
    cfg: ModelConfig,
    device: Device,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Weight,
    /// The first rows of `lm_head` only, when `limit_logits` cut the logits to the most frequent tokens.
    short_head: Option<(usize, Weight)>,
    inv_freq: Vec<f32>,
    /// RoPE frequencies of the sliding-window layers, when their base differs (gemma3).
    inv_freq_local: Option<Vec<f32>>,
    /// False for a model loaded with `config_only`.
    has_weights: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Model {
    /// Opens and loads a GGUF model file on the CPU.
    pub fn load_gguf(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let g = GgufFile::open(path)?;
        Self::from_gguf(&g, opts, &Device::Cpu)
    }

    pub fn from_gguf(g: &GgufFile, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::from_gguf(g)?;
        Self::from_source(g, cfg, opts, device)
    }

    /// Loads the model described by `cfg` from `g`'s tensors (named as in GGUF).
    pub fn from_source<S: TensorSource>(
        g: &S,
        mut cfg: ModelConfig,
        opts: &LoadOptions,
        device: &Device,
    ) -> Result<Self> {
        cfg.kv_dtype = opts.kv_cache_dtype;
        if opts.config_only {
            return Ok(Self {
                cfg,
                device: device.clone(),
                embed: Embedding::Dense(Vec::new()),
                layers: Vec::new(),
                norm: Vec::new(),
                lm_head: Weight::F32(F32Matrix::from_rows(1, 1, &[0.0])),
                short_head: None,
                inv_freq: Vec::new(),
                inv_freq_local: None,
                has_weights: false,
            });
        }
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let matmul = |g: &S, name: &str, shape: &[usize]| -> Result<Weight> {
            to_matmul(g, name, &g.tensor_data(name, shape)?, opts, device)
        };
        let embed_data = g.tensor_data("token_embd.weight", &[cfg.vocab_size, h])?;
        // Embedding rows come out of a matrix our kernels hold (the tied head, or the table itself kept in
        // its file format), dequantized on lookup; a dense f32 table only where candle would hold the weights.
        let on_kernels =
            !opts.dequantize && (kernel_format(embed_data.dtype).is_some() || half_kind(embed_data.dtype).is_some());
        let dense = || -> Result<Embedding> {
            let v = embed_data.to_f32().map_err(|e| g.bad_tensor("token_embd.weight", e.to_string()))?;
            Ok(Embedding::Dense(v))
        };
        let (embed, lm_head) = match (cfg.tie_word_embeddings, on_kernels) {
            (true, true) => (Embedding::Head, to_matmul(g, "token_embd.weight", &embed_data, opts, device)?),
            (true, false) => (dense()?, to_matmul(g, "token_embd.weight", &embed_data, opts, device)?),
            (false, true) => (
                Embedding::Rows(to_matmul(g, "token_embd.weight", &embed_data, opts, device)?),
                matmul(g, "output.weight", &[cfg.vocab_size, h])?,
            ),
            (false, false) => (dense()?, matmul(g, "output.weight", &[cfg.vocab_size, h])?),
        };
        drop(embed_data);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("blk.{i}");
            let bias = |g: &S, name: &str, n: usize| -> Result<Option<Vec<f32>>> {
                if !cfg.attention_bias {
                    return Ok(None);
                }
                vector(g, &format!("{p}.{name}.bias"), n).map(Some)
            };
            let q = Linear {
                weight: matmul(g, &format!("{p}.attn_q.weight"), &[cfg.q_size(), h])?,
                rows: cfg.q_size(),
                bias: bias(g, "attn_q", cfg.q_size())?,
            };
            let k = Linear {
                weight: matmul(g, &format!("{p}.attn_k.weight"), &[cfg.kv_size(), h])?,
                rows: cfg.kv_size(),
                bias: bias(g, "attn_k", cfg.kv_size())?,
            };
            let v = Linear {
                weight: matmul(g, &format!("{p}.attn_v.weight"), &[cfg.kv_size(), h])?,
                rows: cfg.kv_size(),
                bias: bias(g, "attn_v", cfg.kv_size())?,
            };
            let pair = |g: &S, a: &str, b: &str, n: usize| -> Result<(Vec<f32>, Vec<f32>)> {
                Ok((vector(g, &format!("{p}.{a}.weight"), n)?, vector(g, &format!("{p}.{b}.weight"), n)?))
            };
            let qk_norm = if cfg.qk_norm { Some(pair(g, "attn_q_norm", "attn_k_norm", cfg.head_dim)?) } else { None };
            let post_norms =
                if cfg.post_norms { Some(pair(g, "post_attention_norm", "post_ffw_norm", h)?) } else { None };
            layers.push(Layer {
                attn_norm: vector(g, &format!("{p}.attn_norm.weight"), h)?,
                qkv: ProjGroup::new(vec![q, k, v]),
                qk_norm,
                post_norms,
                o: matmul(g, &format!("{p}.attn_output.weight"), &[h, cfg.q_size()])?,
                ffn_norm: vector(g, &format!("{p}.ffn_norm.weight"), h)?,
                gate_up: ProjGroup::new(vec![
                    Linear { weight: matmul(g, &format!("{p}.ffn_gate.weight"), &[ffn, h])?, rows: ffn, bias: None },
                    Linear { weight: matmul(g, &format!("{p}.ffn_up.weight"), &[ffn, h])?, rows: ffn, bias: None },
                ]),
                down: matmul(g, &format!("{p}.ffn_down.weight"), &[h, ffn])?,
            });
        }
        let norm = vector(g, "output_norm.weight", h)?;
        // inv_freq[i] = theta^(-2i/d), as transformers computes it, rounded to f32.
        let freqs = |theta: f32| -> Vec<f32> {
            (0..cfg.rope_dim / 2)
                .map(|i| (1.0 / (theta as f64).powf(2.0 * i as f64 / cfg.rope_dim as f64)) as f32)
                .collect()
        };
        let inv_freq = freqs(cfg.rope_theta);
        let inv_freq_local = cfg.sliding_window.filter(|w| w.rope_theta != cfg.rope_theta).map(|w| freqs(w.rope_theta));
        Ok(Self {
            cfg,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            short_head: None,
            inv_freq,
            inv_freq_local,
            has_weights: true,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Makes `forward` return logits for the first `n` token ids only (rounded down to whole 8-row tiles), for a
    /// draft model: byte-level BPE vocabularies put frequent tokens first, and the output head is a large part
    /// of a small model's step. Inputs may still be any token. Returns the logits' width now (the vocabulary
    /// when the head cannot be cut: a float or candle head, or `n` not below the vocabulary).
    pub fn limit_logits(&mut self, n: usize) -> usize {
        let n = n / 8 * 8;
        if let Weight::Kernel(w) = &self.lm_head {
            if n > 0 && n < self.cfg.vocab_size {
                if let Ok(head) = w.first_rows(n) {
                    self.short_head = Some((n, Weight::Kernel(head)));
                }
            }
        }
        self.logits_width()
    }

    /// Values per row of `forward`'s logits: the vocabulary, or the limit `limit_logits` set.
    pub fn logits_width(&self) -> usize {
        self.short_head.as_ref().map_or(self.cfg.vocab_size, |(n, _)| *n)
    }

    /// Runs one step over a flattened batch, writing each token's K/V into `cache` at its slot, and returns
    /// the logits of the rows in `batch.logits_indices`, row-major `[logits_indices.len(), vocab_size]`.
    pub fn forward(&self, batch: &BatchInput<'_>, cache: &mut PagedKvCache) -> Result<Vec<f32>> {
        self.forward_with_progress(batch, cache, &|| true)
    }

    /// [`Self::forward`], calling `progress` after each layer's attention and after its MLP, so that a long
    /// step can show it is alive (the engine's heartbeat). When `progress` returns false the step stops there
    /// with [`Error::Cancelled`](crate::Error::Cancelled) (its requests were abandoned); the K/V written so far
    /// is garbage the caller must not use.
    pub fn forward_with_progress(
        &self,
        batch: &BatchInput<'_>,
        cache: &mut PagedKvCache,
        progress: &dyn Fn() -> bool,
    ) -> Result<Vec<f32>> {
        if !self.has_weights {
            return Err(crate::error::Error::InvalidBatch(
                "this model was loaded without its weights (they are on a device)".into(),
            ));
        }
        batch.validate(cache, self.cfg.max_position_embeddings, self.cfg.vocab_size, self.cfg.hidden_size)?;
        let _step = mlx_serving_kernels::pool::step();
        let cfg = &self.cfg;
        let dev = &self.device;
        let n = batch.token_ids.len();
        let (h, hd, nh) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads);
        let mut x = vec![0f32; n * h];
        for (&t, row) in batch.token_ids.iter().zip(x.chunks_exact_mut(h)) {
            let t = t as usize;
            match &self.embed {
                Embedding::Dense(e) => row.copy_from_slice(&e[t * h..(t + 1) * h]),
                Embedding::Head => self.lm_head.dequantize_row(t, row),
                Embedding::Rows(w) => w.dequantize_row(t, row),
            }
            if let Some(s) = cfg.embed_scale {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        for &(first, e) in batch.embeds {
            x[first * h..first * h + e.len()].copy_from_slice(e);
        }
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
        let scale = cfg.attn_scale;
        if cache.dtype() != cfg.kv_dtype {
            return Err(crate::error::Error::InvalidBatch(format!(
                "KV cache holds {:?}, the model was loaded for {:?}",
                cache.dtype(),
                cfg.kv_dtype
            )));
        }
        let tables = match cfg.mrope_section {
            Some(sections) if !batch.mrope_positions.is_empty() => {
                RopeTables::sectioned(&self.inv_freq, batch.mrope_positions, sections)
            }
            None if !batch.mrope_positions.is_empty() => {
                return Err(crate::error::Error::InvalidBatch("M-RoPE positions for a model without M-RoPE".into()))
            }
            _ => RopeTables::new(&self.inv_freq, batch.positions),
        };
        let local_tables = self.inv_freq_local.as_ref().map(|f| RopeTables::new(f, batch.positions));
        let style = match cfg.rope_style {
            RopeStyle::Interleaved => rope::RopeStyle::Interleaved,
            RopeStyle::Neox => rope::RopeStyle::Neox,
        };
        let eps = cfg.rms_norm_eps;
        let ffn = cfg.intermediate_size;
        // Buffers reused by every layer (a fresh large allocation per layer costs page faults).
        let mut q = vec![0f32; n * nh * hd];
        let mut attn = vec![0f32; n * nh * hd];
        let (mut hn, mut qkv, mut gate_up) = (Vec::new(), Vec::new(), Vec::new());
        // Outputs waiting for their post norm (gemma3), and that norm's result; the gate and up halves where the
        // activation does not fuse with rounding (GELU, or f32 inputs to `down`).
        let (mut out, mut out_normed) = (Vec::new(), Vec::new());
        let (mut gate, mut up) = (Vec::new(), Vec::new());
        let nq = nh * hd;
        let nkv = cfg.num_kv_heads * hd;
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = NormedRows::new(&x, &layer.attn_norm, eps, layer.qkv.rounded(), &mut hn);
            layer.qkv.forward(normed.input(), n, dev, &mut qkv)?;
            if let Some((qn, kn)) = &layer.qk_norm {
                for row in qkv.chunks_exact_mut(nq + 2 * nkv) {
                    mlx_serving_kernels::vec::rms_norm_in_place(&mut row[..nq], qn, eps);
                    mlx_serving_kernels::vec::rms_norm_in_place(&mut row[nq..nq + nkv], kn, eps);
                }
            }
            let window = cfg.layer_window(i);
            let tables = match (&local_tables, window) {
                (Some(local), Some(_)) => local,
                _ => &tables,
            };
            // Rotation of q and k and the cache write in one pass over the projection's output.
            let store = QkvStore { qkv: &qkv, num_heads: nh, layout, tables, style, slots: batch.slot_mapping };
            match &mut cache.layers {
                KvLayers::F16(l) => attend(&store, &seqs, scale, window, &mut q, &mut l[i], &mut attn),
                KvLayers::F32(l) => attend(&store, &seqs, scale, window, &mut q, &mut l[i], &mut attn),
            }
            match &layer.post_norms {
                None => layer.o.forward_into(Input::F32(&attn), n, &mut x, true, dev)?,
                Some((post, _)) => {
                    out.resize(n * h, 0.0);
                    layer.o.forward_into(Input::F32(&attn), n, &mut out, false, dev)?;
                    add_normed(&mut x, &out, post, eps, &mut out_normed);
                }
            }
            if !progress() {
                return Err(crate::error::Error::Cancelled);
            }
            let normed = NormedRows::new(&x, &layer.ffn_norm, eps, layer.gate_up.rounded(), &mut hn);
            layer.gate_up.forward(normed.input(), n, dev, &mut gate_up)?;
            // The activation and rounding in one pass where they fuse, the residual added by the down matmul
            // itself unless the output is normed first.
            let (dst, add) = match layer.post_norms {
                None => (&mut x, true),
                Some(_) => {
                    out.resize(n * h, 0.0);
                    (&mut out, false)
                }
            };
            match (cfg.ffn_activation, layer.down.rounded()) {
                (FfnActivation::Silu, Some(wide)) => {
                    let acts = Q8Acts::swiglu(&gate_up, ffn, wide);
                    layer.down.forward_into(Input::Rounded(&acts), n, dst, add, dev)?;
                }
                (act, _) => {
                    gate.clear();
                    up.clear();
                    for row in gate_up.chunks_exact(2 * ffn) {
                        gate.extend_from_slice(&row[..ffn]);
                        up.extend_from_slice(&row[ffn..]);
                    }
                    match act {
                        FfnActivation::Silu => mlx_serving_kernels::vec::swiglu(&mut gate, &up),
                        FfnActivation::GeluTanh => mlx_serving_kernels::vec::gelu_tanh_mul(&mut gate, &up),
                    }
                    layer.down.forward_into(Input::F32(&gate), n, dst, add, dev)?;
                }
            }
            if let Some((_, post)) = &layer.post_norms {
                add_normed(&mut x, &out, post, eps, &mut out_normed);
            }
            if !progress() {
                return Err(crate::error::Error::Cancelled);
            }
        }
        let m = batch.logits_indices.len();
        if m == 0 {
            return Ok(Vec::new());
        }
        let mut last = Vec::with_capacity(m * h);
        for &r in batch.logits_indices {
            last.extend_from_slice(&x[r as usize * h..(r as usize + 1) * h]);
        }
        let head = self.short_head.as_ref().map_or(&self.lm_head, |(_, w)| w);
        let mut logits = vec![0f32; m * self.logits_width()];
        let normed = NormedRows::new(&last, &self.norm, eps, head.rounded(), &mut hn);
        head.forward_into(normed.input(), m, &mut logits, false, dev)?;
        if let Some(cap) = cfg.final_logit_softcap {
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        Ok(logits)
    }
}

/// One layer's rotation, cache write and attention over a batch: the queries rotated into `q`, the keys and
/// values into the layer's cache, the attention output into `out`.
fn attend<T: KvElem>(
    s: &QkvStore<'_>,
    seqs: &[AttnSeq<'_>],
    scale: f32,
    window: Option<usize>,
    q: &mut [f32],
    kv: &mut LayerKv<T>,
    out: &mut [f32],
) {
    rope_qkv_store(s, q, &mut kv.k, &mut kv.v);
    paged_attention(out, q, &kv.k, &kv.v, s.layout, s.num_heads, seqs, scale, window);
}

/// `x += rms_norm(y) · w` (a post norm before the residual add); `buf` is scratch reused across layers.
fn add_normed(x: &mut [f32], y: &[f32], w: &[f32], eps: f32, buf: &mut Vec<f32>) {
    buf.resize(y.len(), 0.0);
    mlx_serving_kernels::vec::rms_norm(y, w, eps, buf);
    add_assign(x, buf);
}

fn to_matmul<S: TensorSource>(
    g: &S,
    name: &str,
    td: &TensorData<'_>,
    opts: &LoadOptions,
    device: &Device,
) -> Result<Weight> {
    let bad = |e: String| g.bad_tensor(name, e);
    if opts.dequantize {
        let v = td.to_f32().map_err(|e| bad(e.to_string()))?;
        let t = Tensor::from_vec(v, td.shape.as_slice(), device).map_err(|e| bad(e.to_string()))?;
        return Ok(Weight::Candle(QMatMul::Tensor(t)));
    }
    if let (Some(kind), &[rows, cols]) = (half_kind(td.dtype), &td.shape[..]) {
        return HalfMatrix::from_le_bytes(kind, rows, cols, &td.bytes)
            .map(Weight::Half)
            .map_err(|e| bad(e.to_string()));
    }
    match (kernel_format(td.dtype), &td.shape[..]) {
        (Some(format), &[rows, cols]) => {
            // Q4_1 whose scales repeat in runs (MLX's 4-bit groups of 64 or 128) keeps one scale per run.
            let m = match format {
                QuantFormat::Q4_1 => QMatrix::from_q4_1(rows, cols, &td.bytes),
                _ => QMatrix::new(format, rows, cols, &td.bytes),
            }
            .map_err(|e| bad(e.to_string()))?;
            let m = match &td.mins {
                Some(v) => m.with_block_mins(v.clone()).map_err(|e| bad(e.to_string()))?,
                None => m,
            };
            Ok(Weight::Kernel(m.with_activations(opts.activations.for_weight(name, format))))
        }
        _ if td.mins.is_some() => Err(bad("block offsets on a tensor our kernels do not take".into())),
        (None, &[rows, cols]) if td.dtype == GgmlDType::F32 => {
            let v = td.to_f32().map_err(|e| bad(e.to_string()))?;
            Ok(Weight::F32(F32Matrix::from_rows(rows, cols, &v)))
        }
        _ => td.to_qtensor(device).and_then(QMatMul::from_qtensor).map(Weight::Candle).map_err(|e| bad(e.to_string())),
    }
}

/// Our kernels' format for GGML type `t`, if they cover it.
fn kernel_format(t: GgmlDType) -> Option<QuantFormat> {
    match t {
        GgmlDType::Q4_0 => Some(QuantFormat::Q4_0),
        GgmlDType::Q4_1 => Some(QuantFormat::Q4_1),
        GgmlDType::Q5_0 => Some(QuantFormat::Q5_0),
        GgmlDType::Q5_1 => Some(QuantFormat::Q5_1),
        GgmlDType::Q8_0 => Some(QuantFormat::Q8_0),
        GgmlDType::Q4K => Some(QuantFormat::Q4_K),
        GgmlDType::Q6K => Some(QuantFormat::Q6_K),
        _ => None,
    }
}

/// Our 16-bit float kernels' kind for GGML type `t`.
fn half_kind(t: GgmlDType) -> Option<HalfKind> {
    match t {
        GgmlDType::BF16 => Some(HalfKind::Bf16),
        GgmlDType::F16 => Some(HalfKind::F16),
        _ => None,
    }
}

fn vector<S: TensorSource>(g: &S, name: &str, n: usize) -> Result<Vec<f32>> {
    g.f32_values(name, &[n])
}

/// The RMS norm of `x`'s rows (`vec::rms_norm`: as transformers computes it in f32) as a projection's input:
/// rounded in the same pass where the projection takes rounded activations (`rounded`: their width), else
/// f32 rows in `buf` (a buffer reused across layers).
enum NormedRows<'a> {
    Rounded(Q8Acts),
    F32(&'a [f32]),
}

impl<'a> NormedRows<'a> {
    fn new(x: &[f32], w: &[f32], eps: f32, rounded: Option<bool>, buf: &'a mut Vec<f32>) -> Self {
        match rounded {
            Some(wide) => Self::Rounded(Q8Acts::rms_norm(x, w, eps, wide)),
            None => {
                buf.resize(x.len(), 0.0);
                mlx_serving_kernels::vec::rms_norm(x, w, eps, buf);
                Self::F32(buf)
            }
        }
    }

    fn input(&self) -> Input<'_> {
        match self {
            Self::Rounded(a) => Input::Rounded(a),
            Self::F32(x) => Input::F32(x),
        }
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

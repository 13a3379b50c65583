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
//! Matmuls go through candle's `QMatMul` (quantized weights, or f32 when loaded with `dequantize`); the
//! attention and cache writes are plain slices handled by `mlx_serving_kernels`.

use crate::config::{ModelConfig, RopeStyle};
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::kv::{BatchInput, PagedKvCache};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use mlx_serving_kernels::{paged_attention, AttnSeq};
use std::path::Path;

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Dequantize every weight to f32 at load: slow and large, but the arithmetic matches a float32
    /// reference implementation (used by tests that compare logits tightly).
    pub dequantize: bool,
}

struct Linear {
    weight: QMatMul,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Vec<f32>> {
        let y = self.weight.forward(x)?;
        let mut y = y.flatten_all()?.to_vec1::<f32>()?;
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

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

pub struct Model {
    cfg: ModelConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: QMatMul,
    inv_freq: Vec<f32>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Opens and loads a GGUF model file on the CPU.
    pub fn load_gguf(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let mut g = GgufFile::open(path)?;
        Self::from_gguf(&mut g, opts, &Device::Cpu)
    }

    pub fn from_gguf(g: &mut GgufFile, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::from_gguf(g)?;
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let matmul = |g: &mut GgufFile, name: &str, shape: &[usize]| -> Result<QMatMul> {
            let qt = g.tensor(name, shape, device)?;
            to_matmul(g, name, qt, opts)
        };
        let embed_q = g.tensor("token_embd.weight", &[cfg.vocab_size, h], device)?;
        let embed = embed_q
            .dequantize(device)
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
                attn_norm: norm(g, &format!("{p}.attn_norm.weight"), h, device)?,
                q,
                k,
                v,
                o: matmul(g, &format!("{p}.attn_output.weight"), &[h, cfg.q_size()])?,
                ffn_norm: norm(g, &format!("{p}.ffn_norm.weight"), h, device)?,
                gate: matmul(g, &format!("{p}.ffn_gate.weight"), &[ffn, h])?,
                up: matmul(g, &format!("{p}.ffn_up.weight"), &[ffn, h])?,
                down: matmul(g, &format!("{p}.ffn_down.weight"), &[h, ffn])?,
            });
        }
        let norm = norm(g, "output_norm.weight", h, device)?;
        // inv_freq[i] = theta^(-2i/d), as transformers computes it, rounded to f32.
        let inv_freq = (0..cfg.rope_dim / 2)
            .map(|i| {
                (1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.rope_dim as f64)) as f32
            })
            .collect();
        Ok(Self {
            cfg,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Runs one step over a flattened batch, writing each token's K/V into `cache` at its slot, and returns
    /// the logits of the rows in `batch.logits_indices`, row-major `[logits_indices.len(), vocab_size]`.
    pub fn forward(&self, batch: &BatchInput<'_>, cache: &mut PagedKvCache) -> Result<Vec<f32>> {
        batch.validate(cache, self.cfg.max_position_embeddings, self.cfg.vocab_size)?;
        let cfg = &self.cfg;
        let n = batch.token_ids.len();
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let ids = Tensor::new(batch.token_ids, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
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
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let hn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps)?;
            let mut q = layer.q.forward(&hn)?;
            let mut k = layer.k.forward(&hn)?;
            let v = layer.v.forward(&hn)?;
            self.apply_rope(&mut q, nh, &cos, &sin);
            self.apply_rope(&mut k, nkv, &cos, &sin);
            for (t, &slot) in batch.slot_mapping.iter().enumerate() {
                let dst = layout.offset(slot as usize, 0);
                let src = t * nkv * hd..(t + 1) * nkv * hd;
                kv.k[dst..dst + nkv * hd].copy_from_slice(&k[src.clone()]);
                kv.v[dst..dst + nkv * hd].copy_from_slice(&v[src]);
            }
            paged_attention(&mut attn, &q, &kv.k, &kv.v, layout, nh, &seqs, scale);
            let a = Tensor::from_slice(&attn, (n, nh * hd), &self.device)?;
            x = (x + layer.o.forward(&a)?)?;
            let hn = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_norm_eps)?;
            let g = layer.gate.forward(&hn)?;
            let u = layer.up.forward(&hn)?;
            let m = (candle_nn::ops::silu(&g)? * u)?;
            x = (x + layer.down.forward(&m)?)?;
        }
        if batch.logits_indices.is_empty() {
            return Ok(Vec::new());
        }
        let rows = Tensor::new(batch.logits_indices, &self.device)?;
        let last = x.index_select(&rows, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, cfg.rms_norm_eps)?;
        let logits = self.lm_head.forward(&last)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
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
            let (c, s) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
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

fn to_matmul(g: &GgufFile, name: &str, qt: QTensor, opts: &LoadOptions) -> Result<QMatMul> {
    if opts.dequantize {
        let t = qt
            .dequantize(&qt.device())
            .map_err(|e| g.bad_tensor(name, e.to_string()))?;
        Ok(QMatMul::Tensor(t))
    } else {
        QMatMul::from_qtensor(qt).map_err(|e| g.bad_tensor(name, e.to_string()))
    }
}

fn norm(g: &mut GgufFile, name: &str, n: usize, device: &Device) -> Result<Tensor> {
    let qt = g.tensor(name, &[n], device)?;
    qt.dequantize(device)
        .map_err(|e| g.bad_tensor(name, e.to_string()))
}

fn vector(g: &mut GgufFile, name: &str, n: usize, device: &Device) -> Result<Vec<f32>> {
    let t = norm(g, name, n, device)?;
    t.to_vec1::<f32>()
        .map_err(|e| g.bad_tensor(name, e.to_string()))
}

//! Idefics3 / SmolVLM vision tower and connector, per `tile × tile` tile:
//!
//! ```text
//!   pixels [3, T, T] ─ patches (c, y, x order) · patch_embedding + bias + position_embedding   [P², d]
//!     ─ N × ( x + attn(LN1(x)) ;  x + fc2(gelu_erf(fc1(LN2(x)))) )   (pre-norm, full attention, no mask)
//!     ─ post_layernorm ─ pixel shuffle: each s × s block of patches, row-major, into one s²·d vector
//!     ─ modality_projection (no bias)                                                          [P²/s², text d]
//! ```
//!
//! All tiles of an image through each linear layer at once, attention within each tile.

use super::{cfg_err, gelu_erf, get_usize, grouped_attention, preprocessor_config, row_chunk, triple, Linear, Tensors};
use crate::error::{Error, Result};
use crate::hf::HfDir;
use mlx_serving_kernels::F32Matrix;
use serde_json::Value;

/// How Idefics3 wants its images prepared (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct Idefics3Processing {
    /// `size.longest_edge`.
    pub longest_edge: usize,
    /// `max_image_size.longest_edge`: the encoder's tile.
    pub tile: usize,
    pub do_image_splitting: bool,
    pub rescale_factor: f32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// Image tokens per tile.
    pub image_seq_len: usize,
}

#[derive(Clone, Debug)]
pub struct Idefics3VisionConfig {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub patch: usize,
    pub image_size: usize,
    pub eps: f64,
    pub scale_factor: usize,
    pub text_hidden: usize,
    pub image_token_id: u32,
}

struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl LayerNorm {
    fn forward(&self, x: &[f32], eps: f32) -> Vec<f32> {
        let mut y = Vec::new();
        self.forward_into(x, eps, &mut y);
        y
    }

    /// Into `y` (resized), rows in parallel.
    fn forward_into(&self, x: &[f32], eps: f32, y: &mut Vec<f32>) {
        let h = self.w.len();
        y.resize(x.len(), 0.0);
        let chunk = row_chunk(h);
        mlx_serving_kernels::pool::for_each_chunk_mut(y, chunk, |t, ys| {
            let xs = &x[t * chunk..t * chunk + ys.len()];
            for (xr, yr) in xs.chunks_exact(h).zip(ys.chunks_exact_mut(h)) {
                let mean = xr.iter().sum::<f32>() / h as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
                let inv = 1.0 / (var + eps).sqrt();
                for (((o, v), w), b) in yr.iter_mut().zip(xr).zip(&self.w).zip(&self.b) {
                    *o = (v - mean) * inv * w + b;
                }
            }
        });
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    /// q, k and v stacked: one product.
    qkv: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct Idefics3Vision {
    pub cfg: Idefics3VisionConfig,
    patch: Linear,
    pos: Vec<f32>,
    layers: Vec<EncoderLayer>,
    post_ln: LayerNorm,
    proj: Linear,
}

impl Idefics3Vision {
    pub(crate) fn load(dir: &HfDir) -> Result<Self> {
        let root = dir.root_config();
        let vc = root.get("vision_config").ok_or_else(|| cfg_err(dir, "vision_config", "missing"))?;
        let text = root.get("text_config").ok_or_else(|| cfg_err(dir, "text_config", "missing"))?;
        if let Some(act) = vc.get("hidden_act").and_then(Value::as_str) {
            if !matches!(act, "gelu" | "gelu_pytorch_tanh") {
                return Err(cfg_err(dir, "vision_config.hidden_act", &format!("{act} is not supported")));
            }
        }
        let cfg = Idefics3VisionConfig {
            hidden: get_usize(dir, vc, "hidden_size", "vision_config.")?,
            heads: get_usize(dir, vc, "num_attention_heads", "vision_config.")?,
            layers: get_usize(dir, vc, "num_hidden_layers", "vision_config.")?,
            intermediate: get_usize(dir, vc, "intermediate_size", "vision_config.")?,
            patch: get_usize(dir, vc, "patch_size", "vision_config.")?,
            image_size: get_usize(dir, vc, "image_size", "vision_config.")?,
            eps: vc.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            scale_factor: root.get("scale_factor").and_then(Value::as_u64).unwrap_or(2) as usize,
            text_hidden: get_usize(dir, text, "hidden_size", "text_config.")?,
            image_token_id: get_usize(dir, root, "image_token_id", "")? as u32,
        };
        let side = cfg.image_size / cfg.patch.max(1);
        if cfg.patch == 0
            || !cfg.image_size.is_multiple_of(cfg.patch)
            || cfg.heads == 0
            || !cfg.hidden.is_multiple_of(cfg.heads)
            || cfg.scale_factor == 0
            || !side.is_multiple_of(cfg.scale_factor)
        {
            return Err(cfg_err(dir, "vision_config", "inconsistent sizes (patch, image, heads, scale_factor)"));
        }
        let t = Tensors(dir);
        let tensor = |name: &str, want: &[usize]| t.get(name, want);
        let linear = |names: &[String], out: usize, inp: usize, bias: bool| t.linear(names, out, inp, bias);
        let one = |name: &str| [name.to_string()];
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                w: tensor(&format!("{name}.weight"), &[cfg.hidden])?,
                b: tensor(&format!("{name}.bias"), &[cfg.hidden])?,
            })
        };
        let vp = "model.vision_model.";
        let h = cfg.hidden;
        let pw = tensor(&format!("{vp}embeddings.patch_embedding.weight"), &[h, 3, cfg.patch, cfg.patch])?;
        let patch = Linear {
            w: F32Matrix::from_rows(h, 3 * cfg.patch * cfg.patch, &pw),
            b: Some(tensor(&format!("{vp}embeddings.patch_embedding.bias"), &[h])?),
        };
        let pos = tensor(&format!("{vp}embeddings.position_embedding.weight"), &[side * side, h])?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let lp = format!("{vp}encoder.layers.{i}.");
            let qkv: Vec<String> =
                ["q_proj", "k_proj", "v_proj"].iter().map(|p| format!("{lp}self_attn.{p}")).collect();
            layers.push(EncoderLayer {
                ln1: ln(&format!("{lp}layer_norm1"))?,
                qkv: linear(&qkv, h, h, true)?,
                o: linear(&one(&format!("{lp}self_attn.out_proj")), h, h, true)?,
                ln2: ln(&format!("{lp}layer_norm2"))?,
                fc1: linear(&one(&format!("{lp}mlp.fc1")), cfg.intermediate, h, true)?,
                fc2: linear(&one(&format!("{lp}mlp.fc2")), h, cfg.intermediate, true)?,
            });
        }
        let post_ln = ln(&format!("{vp}post_layernorm"))?;
        let s2 = cfg.scale_factor * cfg.scale_factor;
        let proj = linear(&one("model.connector.modality_projection.proj"), cfg.text_hidden, h * s2, false)?;
        Ok(Self { cfg, patch, pos, layers, post_ln, proj })
    }

    pub fn tokens_per_tile(&self) -> usize {
        let side = self.cfg.image_size / self.cfg.patch;
        side * side / (self.cfg.scale_factor * self.cfg.scale_factor)
    }

    /// All tiles at once through the linear layers; attention within each tile.
    pub(crate) fn encode(&self, pixels: &[f32], num_tiles: usize, progress: &dyn Fn() -> bool) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (t, p, h) = (c.image_size, c.patch, c.hidden);
        if num_tiles == 0 || pixels.len() != num_tiles * 3 * t * t {
            return Err(Error::InvalidBatch(format!(
                "{} pixel values for {num_tiles} tiles of 3x{t}x{t}",
                pixels.len()
            )));
        }
        let side = t / p;
        let n = side * side;
        // Patches as rows of (c, y, x) values, in row-major patch order, tile after tile.
        let mut patches = Vec::with_capacity(num_tiles * n * 3 * p * p);
        for tile in pixels.chunks_exact(3 * t * t) {
            for py in 0..side {
                for px in 0..side {
                    for ch in 0..3 {
                        for y in 0..p {
                            let row = ch * t * t + (py * p + y) * t + px * p;
                            patches.extend_from_slice(&tile[row..row + p]);
                        }
                    }
                }
            }
        }
        let mut x = self.patch.forward(&patches);
        for tile in x.chunks_exact_mut(n * h) {
            tile.iter_mut().zip(&self.pos).for_each(|(v, p)| *v += p);
        }
        let eps = c.eps as f32;
        let groups: Vec<(usize, usize)> = (0..num_tiles).map(|t| (t * n, n)).collect();
        // Buffers reused by every layer.
        let (mut y, mut qkv, mut a, mut scratch, mut f) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for l in &self.layers {
            l.ln1.forward_into(&x, eps, &mut y);
            l.qkv.forward_into(&y, &mut qkv);
            grouped_attention(&qkv, h, c.heads, &groups, &mut a, &mut scratch);
            l.o.add_into(&a, &mut x);
            l.ln2.forward_into(&x, eps, &mut y);
            l.fc1.forward_into(&y, &mut f);
            gelu_erf(&mut f);
            l.fc2.add_into(&f, &mut x);
            if !progress() {
                return Err(Error::Cancelled);
            }
        }
        let x = self.post_ln.forward(&x, eps);
        // Pixel shuffle: token (by, bx) gathers patches (by·s + i, bx·s + j), i then j, each h wide.
        let s = c.scale_factor;
        let bside = side / s;
        let mut shuffled = Vec::with_capacity(x.len());
        for tile in x.chunks_exact(n * h) {
            for by in 0..bside {
                for bx in 0..bside {
                    for i in 0..s {
                        for j in 0..s {
                            let patch = (by * s + i) * side + bx * s + j;
                            shuffled.extend_from_slice(&tile[patch * h..(patch + 1) * h]);
                        }
                    }
                }
            }
        }
        Ok(self.proj.forward(&shuffled))
    }
}

pub(crate) fn image_processing(dir: &HfDir, v: &Idefics3VisionConfig) -> Result<Idefics3Processing> {
    let (path, pre) = preprocessor_config(dir)?;
    let bad =
        |key: &str, reason: &str| Error::BadMetadata { path: path.clone(), key: key.into(), reason: reason.into() };
    let edge = |key: &str| -> Result<usize> {
        pre.get(key)
            .and_then(|s| s.get("longest_edge"))
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| bad(key, "needs a longest_edge"))
    };
    let tile = edge("max_image_size")?;
    if tile != v.image_size {
        return Err(bad("max_image_size", &format!("{tile} is not the encoder's image size {}", v.image_size)));
    }
    Ok(Idefics3Processing {
        longest_edge: edge("size")?,
        tile,
        do_image_splitting: pre.get("do_image_splitting").and_then(Value::as_bool).unwrap_or(true),
        rescale_factor: pre.get("rescale_factor").and_then(Value::as_f64).unwrap_or(1.0 / 255.0) as f32,
        image_mean: triple(&path, &pre, "image_mean", 0.5, false)?,
        image_std: triple(&path, &pre, "image_std", 0.5, true)?,
        image_seq_len: {
            let side = v.image_size / v.patch;
            side * side / (v.scale_factor * v.scale_factor)
        },
    })
}

//! Vision encoders of vision-language models: pixels in, one embedding per image token out, in the text
//! model's width, to replace the image placeholder tokens' embeddings.
//!
//! Idefics3 / SmolVLM (SigLIP-style tower + pixel-shuffle connector), per `tile × tile` tile:
//!
//! ```text
//!   pixels [3, T, T] ─ patches (c, y, x order) · patch_embedding + bias + position_embedding   [P², d]
//!     ─ N × ( x + attn(LN1(x)) ;  x + fc2(gelu_erf(fc1(LN2(x)))) )   (pre-norm, full attention, no mask)
//!     ─ post_layernorm ─ pixel shuffle: each s × s block of patches, row-major, into one s²·d vector
//!     ─ modality_projection (no bias)                                                          [P²/s², text d]
//! ```
//!
//! In f32 (the weights as the checkpoint stores them, widened) on our f32 matrix kernel, all tiles of an image
//! through each linear layer at once, attention within each tile.

use crate::error::{Error, Result};
use crate::hf::HfDir;
use mlx_serving_kernels::{f32_matmul, f32_matmul_serial, F32Matrix};
use serde_json::Value;

/// How a vision-language model wants its images prepared (from `preprocessor_config.json` and
/// `processor_config.json`), and the tokens that stand for them.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessing {
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

/// One image as its encoder takes it: `num_tiles` tiles of `[3, T, T]` f32 pixels (the engine carries it
/// to the runner opaquely).
#[derive(Debug)]
pub struct ImagePixels {
    pub pixels: Vec<f32>,
    pub num_tiles: usize,
    /// The share of a bounded budget these pixels hold while they live (see [`HeldBytes`]).
    pub held: Option<HeldBytes>,
}

/// Bytes counted against a shared budget for as long as this value lives: the server bounds the pixel data
/// of all images in flight (queued, running, or being answered) with one of these per image.
#[derive(Debug)]
pub struct HeldBytes {
    counter: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    bytes: usize,
}

impl HeldBytes {
    /// Takes `bytes` from `counter` if that keeps it within `limit`.
    pub fn take(counter: &std::sync::Arc<std::sync::atomic::AtomicUsize>, bytes: usize, limit: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| held.checked_add(bytes).filter(|&t| t <= limit))
            .ok()
            .map(|_| Self { counter: counter.clone(), bytes })
    }
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

impl ImagePixels {
    /// A hash of the pixels (what the encoder sees, so two files that decode and preprocess alike share it):
    /// the image's key in the prefix cache and the encoder cache.
    pub fn content_hash(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::with_seed(0x696d_6167_6573); // "images"
        h.update(&(self.num_tiles as u64).to_le_bytes());
        for v in &self.pixels {
            h.update(&v.to_le_bytes());
        }
        h.digest()
    }
}

/// The architecture's vision tower and connector.
pub enum VisionModel {
    Idefics3(Idefics3Vision),
}

impl std::fmt::Debug for VisionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idefics3(v) => f.debug_struct("Idefics3Vision").field("cfg", &v.cfg).finish_non_exhaustive(),
        }
    }
}

impl VisionModel {
    /// The vision part of a Hugging Face directory, if its architecture has one.
    pub fn load(dir: &HfDir) -> Result<Option<(Self, ImageProcessing)>> {
        match dir.root_config().get("model_type").and_then(Value::as_str) {
            Some("idefics3") => {
                let v = Idefics3Vision::load(dir)?;
                let p = image_processing(dir, &v.cfg)?;
                Ok(Some((Self::Idefics3(v), p)))
            }
            _ => Ok(None),
        }
    }

    /// Embeddings for `num_tiles` tiles of pixels (`[num_tiles, 3, T, T]`), row-major
    /// `[num_tiles × tokens per tile, text hidden size]`. `progress` is called after every encoder layer (the
    /// engine's heartbeat); when it returns false the encoding stops with [`Error::Cancelled`].
    pub fn encode(&self, pixels: &[f32], num_tiles: usize, progress: &dyn Fn() -> bool) -> Result<Vec<f32>> {
        match self {
            Self::Idefics3(v) => v.encode(pixels, num_tiles, progress),
        }
    }

    /// Tokens each tile becomes.
    pub fn tokens_per_tile(&self) -> usize {
        match self {
            Self::Idefics3(v) => v.tokens_per_tile(),
        }
    }

    /// The id of the placeholder token the embeddings replace.
    pub fn image_token_id(&self) -> u32 {
        match self {
            Self::Idefics3(v) => v.cfg.image_token_id,
        }
    }
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

struct Linear {
    w: F32Matrix,
    b: Option<Vec<f32>>,
}

impl Linear {
    /// `x [n, in]` → `[n, out]`.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let out = self.w.rows();
        let mut y = vec![0f32; x.len() / self.w.cols() * out];
        f32_matmul(&self.w, x, &mut y, false);
        if let Some(b) = &self.b {
            for row in y.chunks_exact_mut(out) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
        y
    }
}

struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl LayerNorm {
    fn forward(&self, x: &[f32], eps: f32) -> Vec<f32> {
        let h = self.w.len();
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let mean = xr.iter().sum::<f32>() / h as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for (((o, v), w), b) in yr.iter_mut().zip(xr).zip(&self.w).zip(&self.b) {
                *o = (v - mean) * inv * w + b;
            }
        }
        y
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

fn cfg_err(dir: &HfDir, key: &str, reason: &str) -> Error {
    Error::BadMetadata { path: dir.dir().join("config.json"), key: key.into(), reason: reason.into() }
}

fn get_usize(dir: &HfDir, v: &Value, key: &str, path: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::MissingMetadata { path: dir.dir().join("config.json"), key: format!("{path}{key}") })
}

fn gelu_erf(x: &mut [f32]) {
    mlx_serving_kernels::pool::for_each_chunk_mut(x, 16384, |_, c| mlx_serving_kernels::vec::gelu_erf(c));
}

impl Idefics3Vision {
    fn load(dir: &HfDir) -> Result<Self> {
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
        let tensor = |name: &str, want: &[usize]| -> Result<Vec<f32>> {
            let (shape, values) = dir.f32_tensor(name)?;
            if shape != want {
                return Err(Error::BadTensor {
                    path: dir.dir().to_path_buf(),
                    name: name.into(),
                    reason: format!("shape {shape:?}, expected {want:?}"),
                });
            }
            Ok(values)
        };
        let linear = |names: &[String], out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let mut w = Vec::with_capacity(names.len() * out * inp);
            let mut b = Vec::new();
            for name in names {
                w.extend(tensor(&format!("{name}.weight"), &[out, inp])?);
                if bias {
                    b.extend(tensor(&format!("{name}.bias"), &[out])?);
                }
            }
            Ok(Linear { w: F32Matrix::from_rows(names.len() * out, inp, &w), b: bias.then_some(b) })
        };
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
    fn encode(&self, pixels: &[f32], num_tiles: usize, progress: &dyn Fn() -> bool) -> Result<Vec<f32>> {
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
        for l in &self.layers {
            let y = l.ln1.forward(&x, eps);
            let qkv = l.qkv.forward(&y);
            let a = self.attention(&qkv, num_tiles, n);
            let o = l.o.forward(&a);
            x.iter_mut().zip(&o).for_each(|(v, o)| *v += o);
            let y = l.ln2.forward(&x, eps);
            let mut f = l.fc1.forward(&y);
            gelu_erf(&mut f);
            let f = l.fc2.forward(&f);
            x.iter_mut().zip(&f).for_each(|(v, o)| *v += o);
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

    /// Full self-attention within each tile: `qkv` `[tiles × n, 3h]` (q, k, v) → `[tiles × n, h]`. One pool task
    /// per tile and head; queries in blocks of 64 rows so a block's scores stay in cache through the softmax
    /// and the product with the values.
    fn attention(&self, qkv: &[f32], tiles: usize, n: usize) -> Vec<f32> {
        const QB: usize = 64;
        let (h, heads) = (self.cfg.hidden, self.cfg.heads);
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut per_head = vec![0f32; tiles * heads * n * hd];
        mlx_serving_kernels::pool::for_each_chunk_mut(&mut per_head, n * hd, |t, out| {
            let (tile, hh) = (t / heads, t % heads);
            let rows = &qkv[tile * n * 3 * h..(tile + 1) * n * 3 * h];
            let head = |which: usize| -> Vec<f32> {
                rows.chunks_exact(3 * h)
                    .flat_map(|r| &r[which * h + hh * hd..which * h + (hh + 1) * hd])
                    .copied()
                    .collect()
            };
            let q: Vec<f32> = head(0).into_iter().map(|v| v * scale).collect();
            let k = F32Matrix::from_rows(n, hd, &head(1));
            let v = F32Matrix::from_columns(hd, n, &head(2));
            let mut scores = vec![0f32; QB * n];
            for qb in (0..n).step_by(QB) {
                let m = QB.min(n - qb);
                let s = &mut scores[..m * n];
                f32_matmul_serial(&k, &q[qb * hd..(qb + m) * hd], s, false);
                mlx_serving_kernels::vec::softmax_rows(s, n);
                f32_matmul_serial(&v, s, &mut out[qb * hd..(qb + m) * hd], false);
            }
        });
        let mut a = vec![0f32; tiles * n * h];
        for (t, o) in per_head.chunks_exact(n * hd).enumerate() {
            let (tile, hh) = (t / heads, t % heads);
            for (i, src) in o.chunks_exact(hd).enumerate() {
                let row = (tile * n + i) * h + hh * hd;
                a[row..row + hd].copy_from_slice(src);
            }
        }
        a
    }
}

fn image_processing(dir: &HfDir, v: &Idefics3VisionConfig) -> Result<ImageProcessing> {
    let path = dir.dir().join("preprocessor_config.json");
    let pre: Value = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source }).and_then(|b| {
        serde_json::from_slice(&b).map_err(|e| Error::BadMetadata {
            path: path.clone(),
            key: "(file)".into(),
            reason: e.to_string(),
        })
    })?;
    let bad =
        |key: &str, reason: &str| Error::BadMetadata { path: path.clone(), key: key.into(), reason: reason.into() };
    let edge = |key: &str| -> Result<usize> {
        pre.get(key)
            .and_then(|s| s.get("longest_edge"))
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| bad(key, "needs a longest_edge"))
    };
    let triple = |key: &str, default: f32| -> Result<[f32; 3]> {
        match pre.get(key) {
            None => Ok([default; 3]),
            Some(Value::Array(a)) if a.len() == 3 && a.iter().all(Value::is_number) => {
                Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32))
            }
            Some(_) => Err(bad(key, "must be a list of three numbers")),
        }
    };
    let tile = edge("max_image_size")?;
    if tile != v.image_size {
        return Err(bad("max_image_size", &format!("{tile} is not the encoder's image size {}", v.image_size)));
    }
    let image_std = triple("image_std", 0.5)?;
    if image_std.contains(&0.0) {
        return Err(bad("image_std", "has a zero"));
    }
    Ok(ImageProcessing {
        longest_edge: edge("size")?,
        tile,
        do_image_splitting: pre.get("do_image_splitting").and_then(Value::as_bool).unwrap_or(true),
        rescale_factor: pre.get("rescale_factor").and_then(Value::as_f64).unwrap_or(1.0 / 255.0) as f32,
        image_mean: triple("image_mean", 0.5)?,
        image_std,
        image_seq_len: {
            let side = v.image_size / v.patch;
            side * side / (v.scale_factor * v.scale_factor)
        },
    })
}

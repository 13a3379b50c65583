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
//! Matmuls run on candle's CPU backend in f32 (the weights as the checkpoint stores them, widened).

use crate::error::{Error, Result};
use crate::hf::HfDir;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::path::PathBuf;

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
#[derive(Clone, Debug)]
pub struct ImagePixels {
    pub pixels: Vec<f32>,
    pub num_tiles: usize,
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
    /// `[num_tiles × tokens per tile, text hidden size]`.
    pub fn encode(&self, pixels: &[f32], num_tiles: usize) -> Result<Vec<f32>> {
        match self {
            Self::Idefics3(v) => v.encode(pixels, num_tiles),
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
    /// `[in, out]`, contiguous.
    w_t: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.w_t)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
}

struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct Idefics3Vision {
    pub cfg: Idefics3VisionConfig,
    patch: Linear,
    pos: Tensor,
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
        let dev = Device::Cpu;
        let tensor = |name: &str, want: &[usize]| -> Result<Tensor> {
            let (shape, values) = dir.f32_tensor(name)?;
            if shape != want {
                return Err(Error::BadTensor {
                    path: dir.dir().to_path_buf(),
                    name: name.into(),
                    reason: format!("shape {shape:?}, expected {want:?}"),
                });
            }
            Tensor::from_vec(values, shape, &dev).map_err(|e| candle_err(dir.dir().into(), name, e))
        };
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = tensor(&format!("{name}.weight"), &[out, inp])?;
            let w_t = w.t().and_then(|t| t.contiguous()).map_err(|e| candle_err(dir.dir().into(), name, e))?;
            let b = if bias { Some(tensor(&format!("{name}.bias"), &[out])?) } else { None };
            Ok(Linear { w_t, b })
        };
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
            w_t: pw
                .reshape((h, 3 * cfg.patch * cfg.patch))
                .and_then(|w| w.t())
                .and_then(|w| w.contiguous())
                .map_err(|e| candle_err(dir.dir().into(), "patch_embedding", e))?,
            b: Some(tensor(&format!("{vp}embeddings.patch_embedding.bias"), &[h])?),
        };
        let pos = tensor(&format!("{vp}embeddings.position_embedding.weight"), &[side * side, h])?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let lp = format!("{vp}encoder.layers.{i}.");
            layers.push(EncoderLayer {
                ln1: ln(&format!("{lp}layer_norm1"))?,
                q: linear(&format!("{lp}self_attn.q_proj"), h, h, true)?,
                k: linear(&format!("{lp}self_attn.k_proj"), h, h, true)?,
                v: linear(&format!("{lp}self_attn.v_proj"), h, h, true)?,
                o: linear(&format!("{lp}self_attn.out_proj"), h, h, true)?,
                ln2: ln(&format!("{lp}layer_norm2"))?,
                fc1: linear(&format!("{lp}mlp.fc1"), cfg.intermediate, h, true)?,
                fc2: linear(&format!("{lp}mlp.fc2"), h, cfg.intermediate, true)?,
            });
        }
        let post_ln = ln(&format!("{vp}post_layernorm"))?;
        let s2 = cfg.scale_factor * cfg.scale_factor;
        let proj = linear("model.connector.modality_projection.proj", cfg.text_hidden, h * s2, false)?;
        Ok(Self { cfg, patch, pos, layers, post_ln, proj })
    }

    pub fn tokens_per_tile(&self) -> usize {
        let side = self.cfg.image_size / self.cfg.patch;
        side * side / (self.cfg.scale_factor * self.cfg.scale_factor)
    }

    fn encode(&self, pixels: &[f32], num_tiles: usize) -> Result<Vec<f32>> {
        let t = self.cfg.image_size;
        if pixels.len() != num_tiles * 3 * t * t {
            return Err(Error::InvalidBatch(format!(
                "{} pixel values for {num_tiles} tiles of 3x{t}x{t}",
                pixels.len()
            )));
        }
        let mut out = Vec::with_capacity(num_tiles * self.tokens_per_tile() * self.cfg.text_hidden);
        for tile in pixels.chunks_exact(3 * t * t) {
            out.extend(self.encode_tile(tile).map_err(|e| Error::InvalidBatch(format!("vision encoder: {e}")))?);
        }
        Ok(out)
    }

    fn encode_tile(&self, pixels: &[f32]) -> candle_core::Result<Vec<f32>> {
        let c = &self.cfg;
        let (t, p, h) = (c.image_size, c.patch, c.hidden);
        let side = t / p;
        let n = side * side;
        // Patches as rows of (c, y, x) values, in row-major patch order.
        let mut patches = Vec::with_capacity(n * 3 * p * p);
        for py in 0..side {
            for px in 0..side {
                for ch in 0..3 {
                    for y in 0..p {
                        let row = ch * t * t + (py * p + y) * t + px * p;
                        patches.extend_from_slice(&pixels[row..row + p]);
                    }
                }
            }
        }
        let dev = Device::Cpu;
        let x = Tensor::from_vec(patches, (n, 3 * p * p), &dev)?;
        let mut x = (self.patch.forward(&x)? + &self.pos)?;
        let (heads, hd) = (c.heads, h / c.heads);
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = c.eps as f32;
        for l in &self.layers {
            let y = candle_nn::ops::layer_norm(&x, &l.ln1.w, &l.ln1.b, eps)?;
            let split = |t: Tensor| t.reshape((n, heads, hd))?.transpose(0, 1)?.contiguous();
            let q = split((l.q.forward(&y)? * scale)?)?;
            let k = split(l.k.forward(&y)?)?;
            let v = split(l.v.forward(&y)?)?;
            let att = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
            let a = att.matmul(&v)?.transpose(0, 1)?.reshape((n, h))?;
            x = (x + l.o.forward(&a)?)?;
            let y = candle_nn::ops::layer_norm(&x, &l.ln2.w, &l.ln2.b, eps)?;
            x = (&x + l.fc2.forward(&l.fc1.forward(&y)?.gelu_erf()?)?)?;
        }
        let x = candle_nn::ops::layer_norm(&x, &self.post_ln.w, &self.post_ln.b, eps)?;
        let x: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        // Pixel shuffle: token (by, bx) gathers patches (by·s + i, bx·s + j), i then j, each h wide.
        let s = c.scale_factor;
        let bside = side / s;
        let mut shuffled = Vec::with_capacity(x.len());
        for by in 0..bside {
            for bx in 0..bside {
                for i in 0..s {
                    for j in 0..s {
                        let patch = (by * s + i) * side + bx * s + j;
                        shuffled.extend_from_slice(&x[patch * h..(patch + 1) * h]);
                    }
                }
            }
        }
        let y = Tensor::from_vec(shuffled, (bside * bside, s * s * h), &dev)?;
        self.proj.forward(&y)?.flatten_all()?.to_vec1()
    }
}

fn candle_err(path: PathBuf, name: &str, e: candle_core::Error) -> Error {
    Error::BadTensor { path, name: name.into(), reason: e.to_string() }
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

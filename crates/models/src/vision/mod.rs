//! Vision encoders of vision-language models: pixels in, one embedding per image token out, in the text
//! model's width, to replace the image placeholder tokens' embeddings.
//!
//! - [`idefics3`]: Idefics3 / SmolVLM (SigLIP-style tower on fixed tiles, pixel-shuffle connector).
//! - [`qwen25vl`]: Qwen2.5-VL (ViT on native-resolution patches with 2-D RoPE and window attention, 2 × 2 patch
//!   merger; its text model places image tokens with M-RoPE).
//!
//! In f32 (the weights as the checkpoint stores them, widened) on our f32 matrix kernel.

pub mod idefics3;
pub mod qwen25vl;

use crate::error::{Error, Result};
use crate::hf::HfDir;
use mlx_serving_kernels::{f32_matmul, f32_matmul_serial, F32Matrix};
use serde_json::Value;

pub use idefics3::{Idefics3Processing, Idefics3Vision, Idefics3VisionConfig};
pub use qwen25vl::{Qwen25VlVision, Qwen25VlVisionConfig, Qwen2VlProcessing};

/// How a vision-language model wants its images prepared (from `preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub enum ImageProcessing {
    Idefics3(Idefics3Processing),
    Qwen2Vl(Qwen2VlProcessing),
}

/// How an image's pixels are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelLayout {
    /// `n` tiles of `[3, T, T]` (Idefics3).
    Tiles(usize),
    /// `rows × cols` patches, each `[3 · temporal · P · P]`, grouped by merge block (Qwen2-VL).
    Patches { rows: usize, cols: usize },
}

/// One image as its encoder takes it (the engine carries it to the runner opaquely).
#[derive(Debug)]
pub struct ImagePixels {
    pub pixels: Vec<f32>,
    pub layout: PixelLayout,
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
        match self.layout {
            PixelLayout::Tiles(n) => h.update(&(n as u64).to_le_bytes()),
            PixelLayout::Patches { rows, cols } => {
                h.update(&(u64::MAX).to_le_bytes());
                h.update(&(rows as u64).to_le_bytes());
                h.update(&(cols as u64).to_le_bytes());
            }
        }
        for v in &self.pixels {
            h.update(&v.to_le_bytes());
        }
        h.digest()
    }
}

/// The architecture's vision tower and connector.
pub enum VisionModel {
    Idefics3(Idefics3Vision),
    Qwen25Vl(Qwen25VlVision),
}

impl std::fmt::Debug for VisionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idefics3(v) => f.debug_struct("Idefics3Vision").field("cfg", &v.cfg).finish_non_exhaustive(),
            Self::Qwen25Vl(v) => f.debug_struct("Qwen25VlVision").field("cfg", &v.cfg).finish_non_exhaustive(),
        }
    }
}

impl VisionModel {
    /// The vision part of a Hugging Face directory, if its architecture has one.
    pub fn load(dir: &HfDir) -> Result<Option<(Self, ImageProcessing)>> {
        match dir.root_config().get("model_type").and_then(Value::as_str) {
            Some("idefics3") => {
                let v = Idefics3Vision::load(dir)?;
                let p = idefics3::image_processing(dir, &v.cfg)?;
                Ok(Some((Self::Idefics3(v), ImageProcessing::Idefics3(p))))
            }
            Some("qwen2_5_vl") => {
                let v = Qwen25VlVision::load(dir)?;
                let p = qwen25vl::image_processing(dir, &v.cfg)?;
                Ok(Some((Self::Qwen25Vl(v), ImageProcessing::Qwen2Vl(p))))
            }
            _ => Ok(None),
        }
    }

    /// Embeddings for one image, row-major `[image tokens, text hidden size]`, in the order of its placeholder
    /// tokens. `progress` is called after every encoder layer (the engine's heartbeat); when it returns false
    /// the encoding stops with [`Error::Cancelled`].
    pub fn encode(&self, image: &ImagePixels, progress: &dyn Fn() -> bool) -> Result<Vec<f32>> {
        match (self, image.layout) {
            (Self::Idefics3(v), PixelLayout::Tiles(n)) => v.encode(&image.pixels, n, progress),
            (Self::Qwen25Vl(v), PixelLayout::Patches { rows, cols }) => v.encode(&image.pixels, rows, cols, progress),
            (_, layout) => Err(Error::InvalidBatch(format!("pixels laid out as {layout:?} are not for this model"))),
        }
    }

    /// The id of the placeholder token the embeddings replace.
    pub fn image_token_id(&self) -> u32 {
        match self {
            Self::Idefics3(v) => v.cfg.image_token_id,
            Self::Qwen25Vl(v) => v.cfg.image_token_id,
        }
    }

    /// For a text model with M-RoPE: how many patches each image token merges in each direction (an image of
    /// `rows × cols` patches is a `rows / m × cols / m` grid of tokens, placed in 2-D).
    pub fn mrope_merge(&self) -> Option<usize> {
        match self {
            Self::Idefics3(_) => None,
            Self::Qwen25Vl(v) => Some(v.cfg.merge),
        }
    }
}

pub(crate) struct Linear {
    pub(crate) w: F32Matrix,
    pub(crate) b: Option<Vec<f32>>,
}

impl Linear {
    /// `x [n, in]` → `[n, out]`.
    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = Vec::new();
        self.forward_into(x, &mut y);
        y
    }

    /// [`Self::forward`] into `y` (resized; a buffer reused at the same size is not cleared first).
    pub(crate) fn forward_into(&self, x: &[f32], y: &mut Vec<f32>) {
        y.resize(x.len() / self.w.cols() * self.w.rows(), 0.0);
        f32_matmul(&self.w, x, y, false);
        self.add_bias(y);
    }

    /// `y += x·Wᵀ + b`: a residual connection.
    pub(crate) fn add_into(&self, x: &[f32], y: &mut [f32]) {
        f32_matmul(&self.w, x, y, true);
        self.add_bias(y);
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.b {
            for row in y.chunks_exact_mut(self.w.rows()) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
    }
}

/// Rows per pool task for row-wise work (norms) over `[rows, width]` values.
pub(crate) fn row_chunk(width: usize) -> usize {
    width * 64
}

pub(crate) fn cfg_err(dir: &HfDir, key: &str, reason: &str) -> Error {
    Error::BadMetadata { path: dir.dir().join("config.json"), key: key.into(), reason: reason.into() }
}

pub(crate) fn get_usize(dir: &HfDir, v: &Value, key: &str, path: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::MissingMetadata { path: dir.dir().join("config.json"), key: format!("{path}{key}") })
}

pub(crate) fn gelu_erf(x: &mut [f32]) {
    mlx_serving_kernels::pool::for_each_chunk_mut(x, 16384, |_, c| mlx_serving_kernels::vec::gelu_erf(c));
}

/// Tensors of a checkpoint, shapes checked.
pub(crate) struct Tensors<'a>(pub(crate) &'a HfDir);

impl Tensors<'_> {
    pub(crate) fn get(&self, name: &str, want: &[usize]) -> Result<Vec<f32>> {
        let (shape, values) = self.0.f32_tensor(name)?;
        if shape != want {
            return Err(Error::BadTensor {
                path: self.0.dir().to_path_buf(),
                name: name.into(),
                reason: format!("shape {shape:?}, expected {want:?}"),
            });
        }
        Ok(values)
    }

    /// The linear layers `names` (each `[out, inp]`, with a bias if `bias`) stacked into one.
    pub(crate) fn linear(&self, names: &[String], out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let mut w = Vec::with_capacity(names.len() * out * inp);
        let mut b = Vec::new();
        for name in names {
            w.extend(self.get(&format!("{name}.weight"), &[out, inp])?);
            if bias {
                b.extend(self.get(&format!("{name}.bias"), &[out])?);
            }
        }
        Ok(Linear { w: F32Matrix::from_rows(names.len() * out, inp, &w), b: bias.then_some(b) })
    }

    pub(crate) fn linear1(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        self.linear(&[name.to_string()], out, inp, bias)
    }
}

/// `preprocessor_config.json` of a directory.
pub(crate) fn preprocessor_config(dir: &HfDir) -> Result<(std::path::PathBuf, Value)> {
    let path = dir.dir().join("preprocessor_config.json");
    let pre: Value = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source }).and_then(|b| {
        serde_json::from_slice(&b).map_err(|e| Error::BadMetadata {
            path: path.clone(),
            key: "(file)".into(),
            reason: e.to_string(),
        })
    })?;
    Ok((path, pre))
}

/// `key` of a preprocessor config: three numbers (`default` each when absent), none of them zero if `nonzero`.
pub(crate) fn triple(path: &std::path::Path, pre: &Value, key: &str, default: f32, nonzero: bool) -> Result<[f32; 3]> {
    let bad = |reason: &str| Error::BadMetadata { path: path.into(), key: key.into(), reason: reason.into() };
    let t = match pre.get(key) {
        None => [default; 3],
        Some(Value::Array(a)) if a.len() == 3 && a.iter().all(Value::is_number) => {
            [0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32)
        }
        Some(_) => return Err(bad("must be a list of three numbers")),
    };
    if nonzero && t.contains(&0.0) {
        return Err(bad("has a zero"));
    }
    Ok(t)
}

/// Bidirectional attention within groups of rows: `qkv` `[rows, 3h]` (q, k, v, each `heads × hd`) → `[rows, h]`,
/// each row attending to the rows of its group (`groups`: consecutive `(start, len)` covering all rows). One
/// pool task per group and head; queries in blocks of 64 so a block's scores stay in cache through the softmax
/// and the product with the values.
/// The result goes to `a`; `scratch` holds the per-head outputs (both buffers reused across calls).
pub(crate) fn grouped_attention(
    qkv: &[f32],
    h: usize,
    heads: usize,
    groups: &[(usize, usize)],
    a: &mut Vec<f32>,
    scratch: &mut Vec<f32>,
) {
    const QB: usize = 64;
    let hd = h / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let rows: usize = groups.iter().map(|g| g.1).sum();
    // Task t = group g, head hh: its output [len, hd] at bounds[t].
    let mut bounds = Vec::with_capacity(groups.len() * heads + 1);
    let mut at = 0;
    for &(_, len) in groups {
        for _ in 0..heads {
            bounds.push(at);
            at += len * hd;
        }
    }
    bounds.push(at);
    let per_head = scratch;
    per_head.resize(rows * h, 0.0);
    mlx_serving_kernels::pool::for_each_split_mut(per_head, &bounds, |t, out| {
        let ((start, n), hh) = (groups[t / heads], t % heads);
        let rows = &qkv[start * 3 * h..(start + n) * 3 * h];
        let head = |which: usize| -> Vec<f32> {
            rows.chunks_exact(3 * h).flat_map(|r| &r[which * h + hh * hd..which * h + (hh + 1) * hd]).copied().collect()
        };
        let q: Vec<f32> = head(0).into_iter().map(|v| v * scale).collect();
        let k = F32Matrix::from_rows(n, hd, &head(1));
        let v = F32Matrix::from_columns(hd, n, &head(2));
        let mut scores = vec![0f32; QB.min(n) * n];
        for qb in (0..n).step_by(QB) {
            let m = QB.min(n - qb);
            let s = &mut scores[..m * n];
            f32_matmul_serial(&k, &q[qb * hd..(qb + m) * hd], s, false);
            mlx_serving_kernels::vec::softmax_rows(s, n);
            f32_matmul_serial(&v, s, &mut out[qb * hd..(qb + m) * hd], false);
        }
    });
    a.resize(rows * h, 0.0);
    for (t, w) in bounds.windows(2).enumerate() {
        let ((start, _), hh) = (groups[t / heads], t % heads);
        for (i, src) in per_head[w[0]..w[1]].chunks_exact(hd).enumerate() {
            let row = (start + i) * h + hh * hd;
            a[row..row + hd].copy_from_slice(src);
        }
    }
}

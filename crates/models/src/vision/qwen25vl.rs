//! Qwen2.5-VL's vision tower, for one image of `rows × cols` patches (grouped by 2 × 2 merge block, as the
//! processor lays them out):
//!
//! ```text
//!   patches [N, 3·T·P·P] · patch_embed (a 3-D convolution with stride = kernel: one product, no bias)  [N, d]
//!     ─ reorder merge blocks window by window (windows of `window_size / patch / merge` blocks a side)
//!     ─ depth × ( x + proj(attn(rope2d(qkv(rms1(x))))) ;  x + down(silu(gate(rms2(x))) · up(rms2(x))) )
//!         attention within each window, or over the whole image in the `fullatt_block_indexes` blocks;
//!         2-D RoPE: a head's first quarter of frequencies turns with the patch row, the second with its column
//!     ─ merger: rms(x), each merge block's patches concatenated, Linear ─ GELU(erf) ─ Linear         [N/m², D]
//!     ─ blocks back in row-major order
//! ```
//!
//! The text model then places the image's tokens on a `rows/m × cols/m` grid with M-RoPE (see
//! [`crate::decoder`]); the placeholders are `<|vision_start|>`, one `<|image_pad|>` per token, `<|vision_end|>`.

use super::{cfg_err, gelu_erf, get_usize, grouped_attention, preprocessor_config, row_chunk, triple, Linear, Tensors};
use crate::error::{Error, Result};
use crate::hf::HfDir;
use mlx_serving_kernels::F32Matrix;
use serde_json::Value;

/// How Qwen2-VL wants its images prepared (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2VlProcessing {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch: usize,
    pub temporal_patch: usize,
    pub merge: usize,
    pub rescale_factor: f32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

#[derive(Clone, Debug)]
pub struct Qwen25VlVisionConfig {
    pub depth: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub patch: usize,
    pub temporal_patch: usize,
    pub merge: usize,
    pub window: usize,
    pub full_attention: Vec<usize>,
    pub out_hidden: usize,
    pub rope_theta: f32,
    pub image_token_id: u32,
}

struct Block {
    norm1: Vec<f32>,
    qkv: Linear,
    proj: Linear,
    norm2: Vec<f32>,
    /// gate and up stacked: one product.
    gate_up: Linear,
    down: Linear,
}

pub struct Qwen25VlVision {
    pub cfg: Qwen25VlVisionConfig,
    patch: Linear,
    blocks: Vec<Block>,
    ln_q: Vec<f32>,
    mlp0: Linear,
    mlp2: Linear,
    /// Inverse frequencies of one axis (`head_dim / 4` of them).
    inv_freq: Vec<f32>,
}

const EPS: f32 = 1e-6;

fn rms(x: &[f32], w: &[f32]) -> Vec<f32> {
    let mut y = Vec::new();
    rms_into(x, w, &mut y);
    y
}

/// RMS norm of each row into `y` (resized), rows in parallel.
fn rms_into(x: &[f32], w: &[f32], y: &mut Vec<f32>) {
    y.resize(x.len(), 0.0);
    let chunk = row_chunk(w.len());
    mlx_serving_kernels::pool::for_each_chunk_mut(y, chunk, |t, ys| {
        mlx_serving_kernels::vec::rms_norm(&x[t * chunk..t * chunk + ys.len()], w, EPS, ys)
    });
}

impl Qwen25VlVision {
    pub(crate) fn load(dir: &HfDir) -> Result<Self> {
        let root = dir.root_config();
        let vc = root.get("vision_config").ok_or_else(|| cfg_err(dir, "vision_config", "missing"))?;
        if let Some(act) = vc.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(cfg_err(dir, "vision_config.hidden_act", &format!("{act} is not supported")));
            }
        }
        let u = |key: &str| get_usize(dir, vc, key, "vision_config.");
        let full_attention = match vc.get("fullatt_block_indexes") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|i| i as usize).collect(),
            _ => return Err(cfg_err(dir, "vision_config.fullatt_block_indexes", "missing")),
        };
        let text_hidden = root
            .get("text_config")
            .and_then(|t| t.get("hidden_size"))
            .or_else(|| root.get("hidden_size"))
            .and_then(Value::as_u64);
        let cfg = Qwen25VlVisionConfig {
            depth: u("depth")?,
            hidden: u("hidden_size")?,
            heads: u("num_heads")?,
            intermediate: u("intermediate_size")?,
            patch: u("patch_size")?,
            temporal_patch: u("temporal_patch_size")?,
            merge: u("spatial_merge_size")?,
            window: u("window_size")?,
            full_attention,
            out_hidden: u("out_hidden_size")?,
            rope_theta: vc
                .get("rope_theta")
                .or_else(|| vc.get("rope_parameters").and_then(|r| r.get("rope_theta")))
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0) as f32,
            image_token_id: root.get("image_token_id").and_then(Value::as_u64).unwrap_or(151_655) as u32,
        };
        let c = &cfg;
        if c.heads == 0
            || !c.hidden.is_multiple_of(c.heads)
            || !(c.hidden / c.heads).is_multiple_of(4)
            || c.patch == 0
            || c.merge == 0
            || c.temporal_patch == 0
            || c.window < c.patch * c.merge
        {
            return Err(cfg_err(dir, "vision_config", "inconsistent sizes (heads, patch, merge, window)"));
        }
        if text_hidden.is_some_and(|t| t as usize != c.out_hidden) {
            return Err(cfg_err(dir, "vision_config.out_hidden_size", "is not the text model's hidden size"));
        }
        let vp = if dir.has_tensor("visual.patch_embed.proj.weight") { "visual." } else { "model.visual." };
        let t = Tensors(dir);
        let (h, inter) = (c.hidden, c.intermediate);
        let per_patch = 3 * c.temporal_patch * c.patch * c.patch;
        let pw = t.get(&format!("{vp}patch_embed.proj.weight"), &[h, 3, c.temporal_patch, c.patch, c.patch])?;
        let patch = Linear { w: F32Matrix::from_rows(h, per_patch, &pw), b: None };
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let bp = format!("{vp}blocks.{i}.");
            let gate_up: Vec<String> = ["gate_proj", "up_proj"].iter().map(|p| format!("{bp}mlp.{p}")).collect();
            blocks.push(Block {
                norm1: t.get(&format!("{bp}norm1.weight"), &[h])?,
                qkv: t.linear1(&format!("{bp}attn.qkv"), 3 * h, h, true)?,
                proj: t.linear1(&format!("{bp}attn.proj"), h, h, true)?,
                norm2: t.get(&format!("{bp}norm2.weight"), &[h])?,
                gate_up: t.linear(&gate_up, inter, h, true)?,
                down: t.linear1(&format!("{bp}mlp.down_proj"), h, inter, true)?,
            });
        }
        let m2 = c.merge * c.merge * h;
        let ln_q = t.get(&format!("{vp}merger.ln_q.weight"), &[h])?;
        let mlp0 = t.linear1(&format!("{vp}merger.mlp.0"), m2, m2, true)?;
        let mlp2 = t.linear1(&format!("{vp}merger.mlp.2"), c.out_hidden, m2, true)?;
        // Per axis: head_dim / 2 dimensions, frequencies 1 / θ^(2i / (head_dim / 2)).
        let axis = c.hidden / c.heads / 2;
        let inv_freq = (0..axis / 2).map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / axis as f32)).collect();
        Ok(Self { cfg, patch, blocks, ln_q, mlp0, mlp2, inv_freq })
    }

    /// The merge blocks window by window (see [`window_order`]), and each window's size in patches.
    fn windows(&self, rows: usize, cols: usize) -> (Vec<usize>, Vec<usize>) {
        let m = self.cfg.merge;
        let ws = (self.cfg.window / self.cfg.patch / m).max(1);
        let (order, sizes) = window_order(rows / m, cols / m, ws);
        (order, sizes.into_iter().map(|s| s * m * m).collect())
    }

    /// The embeddings of one image of `rows × cols` patches: `[rows/m · cols/m, out_hidden]`, row-major.
    pub(crate) fn encode(
        &self,
        pixels: &[f32],
        rows: usize,
        cols: usize,
        progress: &dyn Fn() -> bool,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (m, h) = (c.merge, c.hidden);
        let mm = m * m;
        let per_patch = 3 * c.temporal_patch * c.patch * c.patch;
        let n = rows * cols;
        if n == 0 || !rows.is_multiple_of(m) || !cols.is_multiple_of(m) || pixels.len() != n * per_patch {
            return Err(Error::InvalidBatch(format!(
                "{} pixel values for {rows}x{cols} patches of {per_patch} (merge {m})",
                pixels.len()
            )));
        }
        let (order, sizes) = self.windows(rows, cols);
        // Patches in window order (whole merge blocks move), each with its (row, column) in the image.
        let lw = cols / m;
        let mut patches = Vec::with_capacity(pixels.len());
        let mut pos = Vec::with_capacity(n);
        for &b in &order {
            patches.extend_from_slice(&pixels[b * mm * per_patch..(b + 1) * mm * per_patch]);
            let (by, bx) = (b / lw, b % lw);
            for k in 0..mm {
                pos.push((by * m + k / m, bx * m + k % m));
            }
        }
        // Each patch's angles: [row · inv_freq, column · inv_freq] (head_dim / 2 of them).
        let half = h / c.heads / 2;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &(y, x) in &pos {
            for p in [y, x] {
                for &f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let mut x = self.patch.forward(&patches);
        let mut windows = Vec::with_capacity(sizes.len());
        let mut at = 0;
        for s in sizes {
            windows.push((at, s));
            at += s;
        }
        let whole = [(0, n)];
        let inter = c.intermediate;
        // Buffers reused by every block.
        let (mut y, mut qkv, mut a, mut scratch, mut gu, mut f) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), vec![0f32; n * inter]);
        for (i, b) in self.blocks.iter().enumerate() {
            rms_into(&x, &b.norm1, &mut y);
            b.qkv.forward_into(&y, &mut qkv);
            self.rope(&mut qkv, &cos, &sin);
            let groups: &[(usize, usize)] = if c.full_attention.contains(&i) { &whole } else { &windows };
            grouped_attention(&qkv, h, c.heads, groups, &mut a, &mut scratch);
            b.proj.add_into(&a, &mut x);
            rms_into(&x, &b.norm2, &mut y);
            b.gate_up.forward_into(&y, &mut gu);
            mlx_serving_kernels::pool::for_each_chunk_mut(&mut f, 64 * inter, |t, fs| {
                let rows = &gu[t * 64 * 2 * inter..];
                for (fr, row) in fs.chunks_exact_mut(inter).zip(rows.chunks_exact(2 * inter)) {
                    let (g, u) = row.split_at(inter);
                    fr.copy_from_slice(g);
                    mlx_serving_kernels::vec::swiglu(fr, u);
                }
            });
            b.down.add_into(&f, &mut x);
            if !progress() {
                return Err(Error::Cancelled);
            }
        }
        // Merger: rows of m² consecutive patches (one merge block) concatenated.
        let y = rms(&x, &self.ln_q);
        let mut z = self.mlp0.forward(&y);
        gelu_erf(&mut z);
        let merged = self.mlp2.forward(&z);
        // Blocks back to row-major order.
        let d = c.out_hidden;
        let mut out = vec![0f32; merged.len()];
        for (k, &b) in order.iter().enumerate() {
            out[b * d..(b + 1) * d].copy_from_slice(&merged[k * d..(k + 1) * d]);
        }
        Ok(out)
    }

    /// Rotates each row's q and k heads (`[q | k | v]`, heads of `hd`) by the patch's angles, pairs `(i, i + hd/2)`
    /// as transformers' `rotate_half`.
    fn rope(&self, qkv: &mut [f32], cos: &[f32], sin: &[f32]) {
        let h = self.cfg.hidden;
        let hd = h / self.cfg.heads;
        let half = hd / 2;
        for (r, row) in qkv.chunks_exact_mut(3 * h).enumerate() {
            let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            for head in row[..2 * h].chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * c[i] - x2 * s[i];
                    b[i] = x2 * c[i] + x1 * s[i];
                }
            }
        }
    }
}

/// The blocks of an `lh × lw` grid (row-major indices) window by window: windows of `ws × ws` blocks row-major
/// from the top left (the last row and column of windows cut short), blocks row-major within each; and each
/// window's number of blocks.
fn window_order(lh: usize, lw: usize, ws: usize) -> (Vec<usize>, Vec<usize>) {
    let (mut order, mut sizes) = (Vec::with_capacity(lh * lw), Vec::new());
    for wy in (0..lh).step_by(ws) {
        for wx in (0..lw).step_by(ws) {
            let before = order.len();
            for y in wy..(wy + ws).min(lh) {
                order.extend((wx..(wx + ws).min(lw)).map(|x| y * lw + x));
            }
            sizes.push(order.len() - before);
        }
    }
    (order, sizes)
}

pub(crate) fn image_processing(dir: &HfDir, v: &Qwen25VlVisionConfig) -> Result<Qwen2VlProcessing> {
    let (path, pre) = preprocessor_config(dir)?;
    let bad =
        |key: &str, reason: &str| Error::BadMetadata { path: path.clone(), key: key.into(), reason: reason.into() };
    // `min_pixels` / `max_pixels` win over `size` (as the processor's constructor has it).
    let pixels = |key: &str, size_key: &str, default: usize| -> usize {
        pre.get(key)
            .or_else(|| pre.get("size").and_then(|s| s.get(size_key)))
            .and_then(Value::as_u64)
            .map_or(default, |x| x as usize)
    };
    let num = |key: &str, default: usize| pre.get(key).and_then(Value::as_u64).map_or(default, |x| x as usize);
    let p = Qwen2VlProcessing {
        min_pixels: pixels("min_pixels", "shortest_edge", 56 * 56),
        max_pixels: pixels("max_pixels", "longest_edge", 28 * 28 * 1280),
        patch: num("patch_size", 14),
        temporal_patch: num("temporal_patch_size", 2),
        merge: num("merge_size", 2),
        rescale_factor: pre.get("rescale_factor").and_then(Value::as_f64).unwrap_or(1.0 / 255.0) as f32,
        image_mean: triple(&path, &pre, "image_mean", 0.5, false)?,
        image_std: triple(&path, &pre, "image_std", 0.5, true)?,
    };
    if (p.patch, p.temporal_patch, p.merge) != (v.patch, v.temporal_patch, v.merge) {
        return Err(bad("patch_size", "patch, temporal patch and merge sizes differ from the vision config's"));
    }
    if p.min_pixels > p.max_pixels || p.max_pixels < (p.patch * p.merge).pow(2) {
        return Err(bad("max_pixels", "the pixel bounds leave no image size"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::window_order;

    #[test]
    fn windows_cover_every_block_once_in_window_order() {
        // 3 x 5 blocks in windows of 2 x 2: the right column and bottom row of windows cut short.
        let (order, sizes) = window_order(3, 5, 2);
        assert_eq!(order, vec![0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]);
        assert_eq!(sizes, vec![4, 4, 2, 2, 2, 1]);
        // A grid the windows divide exactly: no empty windows.
        let (order, sizes) = window_order(4, 4, 2);
        assert_eq!(sizes, vec![4; 4]);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>());
    }
}

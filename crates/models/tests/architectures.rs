//! Qwen 3 and Gemma 3 on tiny random-weight GGUF files (and the Hugging Face directories `convert` writes from
//! them) against a plain reference forward written here from
//! the architectures' definitions (f64, whole-sequence recompute, no cache, no kernels): q/k norms, post
//! norms, GELU-tanh, the embedding scale, sliding-window layers with their own RoPE base, a head size other
//! than hidden / heads. No real Qwen 3 file installs from a package registry; Gemma 3 also has a real-file
//! golden test (runner/tests/golden.rs), but its prompts are shorter than its 512-position window.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use common::step;
use mlx_serving_kernels::KvDtype;
use mlx_serving_models::export::{export_hf, ExportDtype};
use mlx_serving_models::{ActivationPrecision, LoadOptions, Model, ModelBundle, PagedKvCache};
use mlx_serving_test_support::tiny::TinyLlama;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Every tensor of the file, dequantized.
fn tensors(path: &Path) -> HashMap<String, Vec<f64>> {
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let names: Vec<String> = c.tensor_infos.keys().cloned().collect();
    names
        .into_iter()
        .map(|n| {
            let t = c.tensor(&mut f, &n, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, v.into_iter().map(f64::from).collect())
        })
        .collect()
}

struct Arch {
    tiny: TinyLlama,
    qk_norm: bool,
    gemma: bool,
    /// Attend to the whole context in every layer (to show the window matters).
    ignore_window: bool,
}

impl Arch {
    fn head_dim(&self) -> usize {
        self.tiny.head_dim.unwrap_or(self.tiny.hidden / self.tiny.heads)
    }

    /// Every third layer is global (the tiny file's `sliding_window_pattern` is 3).
    fn sliding(&self, layer: usize) -> bool {
        self.tiny.sliding_window.is_some() && layer % 3 != 2
    }

    fn window(&self, layer: usize) -> Option<usize> {
        self.tiny.sliding_window.filter(|_| self.sliding(layer) && !self.ignore_window)
    }

    /// Sliding layers rotate with base 10 000; global ones with the file's 1e6 when the model slides at all.
    fn theta(&self, layer: usize) -> f64 {
        if self.tiny.sliding_window.is_none() || self.sliding(layer) {
            10_000.0
        } else {
            1_000_000.0
        }
    }
}

fn rms(x: &[f64], w: &[f64]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + 1e-5).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

/// `W x` for `W` `[rows, x.len()]`.
fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len()).map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

/// NEOX rotation of one head at `pos`.
fn rope(head: &mut [f64], pos: usize, theta: f64) {
    let d = head.len();
    for i in 0..d / 2 {
        let f = pos as f64 / theta.powf(2.0 * i as f64 / d as f64);
        let (s, c) = f.sin_cos();
        let (a, b) = (head[i], head[i + d / 2]);
        head[i] = a * c - b * s;
        head[i + d / 2] = a * s + b * c;
    }
}

/// Logits at every position of `tokens`, by the book.
fn reference(arch: &Arch, t: &HashMap<String, Vec<f64>>, tokens: &[u32]) -> Vec<Vec<f64>> {
    let cfg = &arch.tiny;
    let (h, hd, nh, nkv) = (cfg.hidden, arch.head_dim(), cfg.heads, cfg.kv_heads);
    let w = |n: &str| &t[n];
    let scale = if arch.gemma { (h as f64).sqrt() } else { 1.0 };
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&id| w("token_embd.weight")[id as usize * h..][..h].iter().map(|v| v * scale).collect())
        .collect();
    for l in 0..cfg.layers {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let hn = rms(x, w(&p("attn_norm")));
            let (mut q, mut k) = (matvec(w(&p("attn_q")), &hn), matvec(w(&p("attn_k")), &hn));
            for (v, n, norm) in [(&mut q, nh, "attn_q_norm"), (&mut k, nkv, "attn_k_norm")] {
                for head in v.chunks_exact_mut(hd).take(n) {
                    if arch.qk_norm {
                        let normed = rms(head, w(&p(norm)));
                        head.copy_from_slice(&normed);
                    }
                    rope(head, pos, arch.theta(l));
                }
            }
            qs.push(q);
            ks.push(k);
            vs.push(matvec(w(&p("attn_v")), &hn));
        }
        for (i, x) in xs.iter_mut().enumerate() {
            let from = arch.window(l).map_or(0, |win| (i + 1).saturating_sub(win));
            let mut attn = vec![0f64; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[i][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (from..=i)
                    .map(|j| {
                        q.iter().zip(&ks[j][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in (from..=i).zip(&e) {
                    for d in 0..hd {
                        attn[head * hd + d] += ej / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let mut o = matvec(w(&p("attn_output")), &attn);
            if arch.gemma {
                o = rms(&o, w(&p("post_attention_norm")));
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let hn = rms(x, w(&p("ffn_norm")));
            let (g, u) = (matvec(w(&p("ffn_gate")), &hn), matvec(w(&p("ffn_up")), &hn));
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| {
                    let a = if arch.gemma {
                        0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh())
                    } else {
                        g / (1.0 + (-g).exp())
                    };
                    a * u
                })
                .collect();
            let mut d = matvec(w(&p("ffn_down")), &act);
            if arch.gemma {
                d = rms(&d, w(&p("post_ffw_norm")));
            }
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
    }
    xs.iter().map(|x| matvec(w("token_embd.weight"), &rms(x, w("output_norm.weight")))).collect()
}

/// Our logits at every position: the whole sequence as one prefill, then again one token per step.
fn ours(model: &Model, tokens: &[u32]) -> [Vec<Vec<f32>>; 2] {
    let bs = 4;
    let table: Vec<u32> = (0..tokens.len().div_ceil(bs) as u32).rev().collect();
    let mut c = PagedKvCache::new(model.config(), bs, table.len());
    let whole = step(model, &mut c, &table, tokens, 0, tokens.len());
    let mut c = PagedKvCache::new(model.config(), bs, table.len());
    let steps = (0..tokens.len()).flat_map(|i| step(model, &mut c, &table, tokens, i, i + 1)).collect();
    [whole, steps]
}

fn write(arch: &Arch, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mlx-serving-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.gguf"));
    arch.tiny.write(&p, &[]);
    p
}

const TOKENS: [u32; 23] = [5, 17, 3, 88, 42, 42, 7, 60, 1, 2, 90, 33, 12, 70, 8, 19, 25, 4, 51, 66, 9, 14, 77];

/// Our forward (f32 activations and KV cache: the reference's arithmetic up to summation order and f32
/// rounding) against the reference.
fn check(arch: &Arch, name: &str) -> HashMap<String, Vec<f64>> {
    let path = write(arch, name);
    let opts =
        LoadOptions { activations: ActivationPrecision::F32, kv_cache_dtype: KvDtype::F32, ..LoadOptions::default() };
    let model = Model::load_gguf(&path, &opts).unwrap();
    // The same model through the Hugging Face layout: `convert` writes it (config.json with the
    // architecture's keys, its tensor names, gemma's `w - 1` norms) and the directory loader reads it back.
    let hf = path.with_extension("hf");
    export_hf(&path, &hf, ExportDtype::F32, |_, _| {}).unwrap();
    let from_hf = ModelBundle::load(&hf, &opts).unwrap().model;
    assert_eq!(from_hf.config(), model.config(), "{name}: config through config.json");
    let t = tensors(&path);
    let want = reference(arch, &t, &TOKENS);
    let mut worst = 0f64;
    let runs = ours(&model, &TOKENS).into_iter().zip(["prefill", "decode"]);
    let hf_runs = ours(&from_hf, &TOKENS).into_iter().zip(["HF dir prefill", "HF dir decode"]);
    for (got, how) in runs.chain(hf_runs) {
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            let err = g.iter().zip(w).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            let size = w.iter().map(|v| v.abs()).fold(0.0, f64::max);
            worst = worst.max(err / size.max(1.0));
            assert!(err < 1e-5 * size.max(1.0), "{name} {how}: position {pos}: max error {err} (logits up to {size})");
        }
    }
    println!("{name}: worst error {worst:.2e} of the largest logit");
    t
}

#[test]
fn qwen3_matches_a_plain_reference_forward() {
    let tiny = TinyLlama { arch: "qwen3", head_dim: Some(32), ..TinyLlama::default() };
    check(&Arch { tiny, qk_norm: true, gemma: false, ignore_window: false }, "qwen3");
}

#[test]
fn gemma3_matches_a_plain_reference_forward() {
    let tiny =
        TinyLlama { arch: "gemma3", layers: 3, head_dim: Some(32), sliding_window: Some(6), ..TinyLlama::default() };
    let mut arch = Arch { tiny, qk_norm: true, gemma: true, ignore_window: false };
    let t = check(&arch, "gemma3");
    // The window matters at this length: without it the reference's last logits differ (so the comparison
    // above would catch a model that ignored it).
    let with = reference(&arch, &t, &TOKENS).pop().unwrap();
    arch.ignore_window = true;
    let without = reference(&arch, &t, &TOKENS).pop().unwrap();
    let diff = with.iter().zip(&without).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff > 0.05, "the window changes the last logits by only {diff}");
}

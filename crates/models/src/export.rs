//! `convert`: any model we load (a GGUF file, a Hugging Face or an MLX directory) written out as a Hugging Face
//! directory that transformers, mlx-lm and our own loader read: weights dequantized to f32, f16 or bf16
//! safetensors (for GGUF llama, Q/K rows put back in Hugging Face's order, undoing the permutation
//! llama.cpp's converter applies for interleaved RoPE; gemma norms as `w − 1`), `config.json`,
//! `generation_config.json`, `tokenizer.json` (the tokenizer we loaded) and `tokenizer_config.json` with the
//! chat template; or as an MLX-quantized directory (`--format mlx`), the same files with every
//! linear layer and the embeddings stored as mlx-lm stores them: `weight` (uint32, `bits`-bit values packed
//! low bits first), `scales` and `biases` (bf16, one per `group_size` inputs; w = scale · q + bias).

use crate::bundle::ModelBundle;
use crate::config::{Architecture, RopeStyle};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::hf::{hf_name, HfDir};
use crate::source::TensorSource;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// Element type of the written weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for ExportDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("unknown dtype {s:?} (f32, f16 or bf16)")),
        }
    }
}

impl ExportDtype {
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
        }
    }

    fn torch(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }

    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        for &v in values {
            match self {
                Self::F32 => out.extend_from_slice(&v.to_le_bytes()),
                Self::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                Self::Bf16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
    }
}

/// How the weights are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// Float safetensors of this type.
    Hf(ExportDtype),
    /// MLX affine quantization; norms stay bf16.
    Mlx { bits: usize, group_size: usize },
}

/// Writes the model at `src` (GGUF file or model directory) as a Hugging Face directory `out`. `progress(done, total)` is called after
/// each tensor.
pub fn export_hf(src: &Path, out: &Path, dtype: ExportDtype, progress: impl FnMut(usize, usize)) -> Result<()> {
    export(src, out, ExportFormat::Hf(dtype), progress)
}

/// Writes the model at `src` (GGUF file or model directory) as `format` into `out`. `progress(done, total)` is called after each tensor.
pub fn export(src: &Path, out: &Path, format: ExportFormat, mut progress: impl FnMut(usize, usize)) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let bundle = ModelBundle::load(src, &crate::decoder::LoadOptions { dequantize: false, ..Default::default() })?;
    let cfg = bundle.model.config().clone();
    let (g, template): (Box<dyn TensorSource>, Option<String>) = if src.is_dir() {
        (Box::new(HfDir::open(src)?), crate::bundle::dir_chat_template(src)?)
    } else {
        let g = GgufFile::open(src)?;
        let t = chat_template_text(&g);
        (Box::new(g), t)
    };
    let gemma = cfg.architecture == Architecture::Gemma3;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let shapes = cfg.tensor_shapes();
    let dtype = match format {
        ExportFormat::Hf(d) => d,
        ExportFormat::Mlx { bits, group_size } => {
            if !matches!(bits, 4 | 8) || group_size == 0 || !group_size.is_multiple_of(32) {
                return Err(Error::BadMetadata {
                    path: out.to_path_buf(),
                    key: "quantization".into(),
                    reason: format!("4 or 8 bits in groups of a multiple of 32, not {bits} bits in {group_size}"),
                });
            }
            ExportDtype::Bf16
        }
    };
    // What each GGUF tensor becomes: (HF name, dtype, shape) entries, in this order in the file.
    let plan = |name: &str, dims: &[usize]| -> Vec<(String, &'static str, Vec<usize>)> {
        let hf = hf_name(name, gemma);
        match (format, dims) {
            (ExportFormat::Mlx { bits, group_size }, &[rows, cols])
                if quantizable(name) && cols.is_multiple_of(group_size) =>
            {
                let base = hf.trim_end_matches(".weight").to_string();
                vec![
                    (format!("{base}.weight"), "U32", vec![rows, cols * bits / 32]),
                    (format!("{base}.scales"), "BF16", vec![rows, cols / group_size]),
                    (format!("{base}.biases"), "BF16", vec![rows, cols / group_size]),
                ]
            }
            _ => vec![(hf, dtype.name(), dims.to_vec())],
        }
    };
    // Header first (it needs every tensor's size), then the data in the same order.
    let mut header = serde_json::Map::new();
    let kind = if matches!(format, ExportFormat::Mlx { .. }) { "mlx" } else { "pt" };
    header.insert("__metadata__".into(), json!({ "format": kind }));
    let mut offset = 0u64;
    for (name, dims) in &shapes {
        for (hf, kind, shape) in plan(name, dims) {
            let elem = if kind == "F32" || kind == "U32" { 4 } else { 2 };
            let n: u64 = shape.iter().map(|&d| d as u64).product::<u64>() * elem;
            header.insert(hf, json!({"dtype": kind, "shape": shape, "data_offsets": [offset, offset + n]}));
            offset += n;
        }
    }
    let mut head = Value::Object(header).to_string().into_bytes();
    head.resize(head.len().next_multiple_of(8), b' ');
    let path = out.join("model.safetensors");
    let part = out.join("model.safetensors.part");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&part).map_err(io(&part))?);
    f.write_all(&(head.len() as u64).to_le_bytes()).and_then(|_| f.write_all(&head)).map_err(io(&part))?;
    let mut buf = Vec::new();
    for (i, (name, dims)) in shapes.iter().enumerate() {
        let mut values = g.f32_values(name, dims)?;
        if gemma && name.ends_with("norm.weight") {
            // Gemma checkpoints scale by `1 + w`.
            values.iter_mut().for_each(|v| *v -= 1.0);
        }
        if cfg.rope_style == RopeStyle::Interleaved {
            if name.ends_with(".attn_q.weight") || name.ends_with(".attn_q.bias") {
                values = unpermute(&values, cfg.num_heads, dims[0]);
            } else if name.ends_with(".attn_k.weight") || name.ends_with(".attn_k.bias") {
                values = unpermute(&values, cfg.num_kv_heads, dims[0]);
            }
        }
        buf.clear();
        match (format, &dims[..]) {
            (ExportFormat::Mlx { bits, group_size }, &[_, cols])
                if quantizable(name) && cols.is_multiple_of(group_size) =>
            {
                let (words, scales, biases) = quantize_affine(&values, cols, bits, group_size);
                words.iter().for_each(|w| buf.extend_from_slice(&w.to_le_bytes()));
                scales.iter().chain(&biases).for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
            }
            _ => dtype.encode(&values, &mut buf),
        }
        f.write_all(&buf).map_err(io(&part))?;
        progress(i + 1, shapes.len());
    }
    f.flush().map_err(io(&part))?;
    drop(f);
    std::fs::rename(&part, &path).map_err(io(&path))?;

    let st = &bundle.special_tokens;
    let (model_type, architectures) = match cfg.architecture {
        Architecture::Llama => ("llama", "LlamaForCausalLM"),
        Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Architecture::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        Architecture::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM"),
    };
    let config = json!({
        "architectures": [architectures],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "attention_bias": cfg.attention_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": if gemma { "gelu_pytorch_tanh" } else { "silu" },
        "bos_token_id": st.bos,
        "eos_token_id": st.eos,
        "torch_dtype": dtype.torch(),
    });
    let mut config = config;
    if gemma {
        config["hidden_activation"] = json!("gelu_pytorch_tanh");
        config["query_pre_attn_scalar"] = json!((1.0 / (cfg.attn_scale * cfg.attn_scale)).round() as u64);
        config["final_logit_softcapping"] = json!(cfg.final_logit_softcap);
        config["rope_scaling"] = Value::Null;
        if let Some(w) = cfg.sliding_window {
            config["sliding_window"] = json!(w.size);
            config["sliding_window_pattern"] = json!(w.pattern);
            config["rope_local_base_freq"] = json!(w.rope_theta);
            let types: Vec<&str> = (0..cfg.num_layers)
                .map(|i| if cfg.layer_window(i).is_some() { "sliding_attention" } else { "full_attention" })
                .collect();
            config["layer_types"] = json!(types);
        }
    }
    if let ExportFormat::Mlx { bits, group_size } = format {
        let q = json!({"group_size": group_size, "bits": bits, "mode": "affine"});
        config["quantization"] = q.clone();
        config["quantization_config"] = q;
    }
    let text = |id: Option<u32>| id.and_then(|i| bundle.tokenizer.id_to_token(i));
    let mut tokenizer_config = json!({
        "bos_token": text(st.bos),
        "eos_token": text(st.eos),
        "add_bos_token": st.add_bos,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let builtin = crate::chat_template::builtin(cfg.architecture).map(String::from);
    if let Some(src) = template.or(builtin) {
        tokenizer_config["chat_template"] = json!(src);
    }
    let generation = json!({"bos_token_id": st.bos, "eos_token_id": st.eog});
    for (file, v) in [
        ("config.json", &config),
        ("generation_config.json", &generation),
        ("tokenizer_config.json", &tokenizer_config),
    ] {
        let p = out.join(file);
        std::fs::write(&p, serde_json::to_string_pretty(v).unwrap_or_default()).map_err(io(&p))?;
    }
    let p = out.join("tokenizer.json");
    bundle.tokenizer.save(&p, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", p.display())))?;
    Ok(())
}

/// Matrices MLX quantizes: the embeddings, the output head and every projection (not the norms).
fn quantizable(name: &str) -> bool {
    !name.contains("norm")
}

/// MLX's affine quantization of `[rows, cols]` values in groups of `group` inputs: per group, a bf16 scale
/// `(max - min) / (2^bits - 1)` and bias `min`, values `round((w - bias) / scale)` computed from the rounded
/// scale and bias, packed low bits first into u32 words. Returns (words, scales, biases).
fn quantize_affine(
    values: &[f32],
    cols: usize,
    bits: usize,
    group: usize,
) -> (Vec<u32>, Vec<half::bf16>, Vec<half::bf16>) {
    let levels = ((1u32 << bits) - 1) as f32;
    let per_word = 32 / bits;
    let (mut words, mut scales, mut biases) = (vec![0u32; values.len() / per_word], Vec::new(), Vec::new());
    for (gi, chunk) in values.chunks_exact(group).enumerate() {
        let (lo, hi) = chunk.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let scale = half::bf16::from_f32(((hi - lo) / levels).max(1e-8));
        let bias = half::bf16::from_f32(lo);
        let (s, b) = (scale.to_f32(), bias.to_f32());
        for (j, &v) in chunk.iter().enumerate() {
            let q = ((v - b) / s).round().clamp(0.0, levels) as u32;
            let at = gi * group + j;
            let (row, col) = (at / cols, at % cols);
            words[row * (cols / per_word) + col / per_word] |= q << ((col % per_word) * bits);
        }
        scales.push(scale);
        biases.push(bias);
    }
    (words, scales, biases)
}

fn chat_template_text(g: &GgufFile) -> Option<String> {
    g.get_str_opt("tokenizer.chat_template").ok().flatten().map(String::from)
}

/// Hugging Face's row order of a Q or K projection from llama.cpp's: within each head, llama.cpp interleaves
/// the two halves (row `2i + j` holds Hugging Face's row `j * d/2 + i`); `rows` rows of `values.len() / rows`.
fn unpermute(values: &[f32], heads: usize, rows: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let d = rows / heads;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let from = h * d + 2 * i + j;
                let to = h * d + j * (d / 2) + i;
                out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
    use candle_core::Device;

    /// Quantized as MLX does and read back by our MLX loader's unpacking: every value within half a step (plus
    /// the scale's and bias's bf16 rounding) of the original, for 4 and 8 bits and several group sizes.
    #[test]
    fn affine_quantization_round_trips_through_the_loader() {
        let (rows, cols) = (4, 256);
        let values: Vec<f32> =
            (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 + (i / cols) as f32).collect();
        for (bits, group) in [(4, 32), (4, 64), (4, 128), (8, 64)] {
            let (words, scales, biases) = quantize_affine(&values, cols, bits, group);
            let (s, b): (Vec<f32>, Vec<f32>) =
                (scales.iter().map(|v| v.to_f32()).collect(), biases.iter().map(|v| v.to_f32()).collect());
            for native in [false, true] {
                let (dtype, data, mins) = crate::hf::affine_to_ggml(&words, &s, &b, [rows, cols], bits, group, native);
                let want = match (native, bits) {
                    (false, _) => GgmlDType::F32,
                    (true, 4) => GgmlDType::Q4_1,
                    _ => GgmlDType::Q8_0,
                };
                assert_eq!(dtype, want);
                assert_eq!(mins.is_some(), dtype == GgmlDType::Q8_0);
                let t = qtensor_from_ggml(dtype, &data, vec![rows, cols], &Device::Cpu).unwrap();
                let mut back: Vec<f32> = t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                if let Some(m) = mins {
                    crate::source::add_block_mins(&mut back, &m);
                }
                for (i, (&v, &w)) in values.iter().zip(&back).enumerate() {
                    let g = i / group;
                    let bound = s[g] / 2.0 + 0.01 * (v.abs() + s[g]);
                    assert!(
                        (v - w).abs() <= bound,
                        "{bits} bits, group {group}, value {i}: {v} -> {w} (bound {bound})"
                    );
                }
            }
        }
    }
}

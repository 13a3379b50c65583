//! `convert --format hf`: a GGUF model written out as a Hugging Face directory that transformers, mlx-lm and
//! our own loader read: weights dequantized to f32, f16 or bf16 safetensors (llama's Q/K rows put back in
//! Hugging Face's order, undoing the permutation llama.cpp's converter applies for interleaved RoPE),
//! `config.json`, `generation_config.json`, `tokenizer.json` (the tokenizer built from the GGUF) and
//! `tokenizer_config.json` with the chat template.

use crate::bundle::ModelBundle;
use crate::config::{Architecture, RopeStyle};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::hf::hf_name;
use candle_core::Device;
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

/// Writes the GGUF model at `src` as a Hugging Face directory `out`. `progress(done, total)` is called after
/// each tensor.
pub fn export_hf(src: &Path, out: &Path, dtype: ExportDtype, mut progress: impl FnMut(usize, usize)) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let bundle = ModelBundle::load(src, &crate::decoder::LoadOptions { dequantize: false, ..Default::default() })?;
    let cfg = bundle.model.config().clone();
    let mut g = GgufFile::open(src)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let names = g.tensor_names();
    // Header first (it needs every tensor's size), then the data in the same order.
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    let elem = if dtype == ExportDtype::F32 { 4 } else { 2 };
    for name in &names {
        let dims = g.tensor_dims(name).unwrap_or_default();
        let n: u64 = dims.iter().map(|&d| d as u64).product();
        header.insert(
            hf_name(name),
            json!({"dtype": dtype.name(), "shape": dims, "data_offsets": [offset, offset + n * elem]}),
        );
        offset += n * elem;
    }
    let mut head = Value::Object(header).to_string().into_bytes();
    head.resize(head.len().next_multiple_of(8), b' ');
    let path = out.join("model.safetensors");
    let part = out.join("model.safetensors.part");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&part).map_err(io(&part))?);
    f.write_all(&(head.len() as u64).to_le_bytes()).and_then(|_| f.write_all(&head)).map_err(io(&part))?;
    let mut buf = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let dims = g.tensor_dims(name).unwrap_or_default();
        let qt = g.tensor(name, &dims, &Device::Cpu)?;
        let mut values = qt
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| g.bad_tensor(name, e.to_string()))?;
        if cfg.rope_style == RopeStyle::Interleaved {
            if name.ends_with(".attn_q.weight") || name.ends_with(".attn_q.bias") {
                values = unpermute(&values, cfg.num_heads, dims[0]);
            } else if name.ends_with(".attn_k.weight") || name.ends_with(".attn_k.bias") {
                values = unpermute(&values, cfg.num_kv_heads, dims[0]);
            }
        }
        buf.clear();
        dtype.encode(&values, &mut buf);
        f.write_all(&buf).map_err(io(&part))?;
        progress(i + 1, names.len());
    }
    f.flush().map_err(io(&part))?;
    drop(f);
    std::fs::rename(&part, &path).map_err(io(&path))?;

    let st = &bundle.special_tokens;
    let model_type = match cfg.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let architectures = match cfg.architecture {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
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
        "hidden_act": "silu",
        "bos_token_id": st.bos,
        "eos_token_id": st.eos,
        "torch_dtype": dtype.torch(),
    });
    let text = |id: Option<u32>| id.and_then(|i| bundle.tokenizer.id_to_token(i));
    let mut tokenizer_config = json!({
        "bos_token": text(st.bos),
        "eos_token": text(st.eos),
        "add_bos_token": st.add_bos,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(src) = chat_template_text(&g) {
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

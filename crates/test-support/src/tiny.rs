//! Tiny random-weight models written as real GGUF files, for loader and forward-pass tests.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Shape of the tiny llama-architecture model.
pub struct TinyLlama {
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub context: usize,
    /// `llama`, `qwen2` (no biases written), `qwen3` (q/k norms) or `gemma3` (q/k norms, post norms,
    /// sliding-window layers).
    pub arch: &'static str,
    /// Head size, when not `hidden / heads` (written as `attention.key_length`).
    pub head_dim: Option<usize>,
    /// Gemma 3's window (`attention.sliding_window`; every third layer global, see `write`).
    pub sliding_window: Option<usize>,
}

impl Default for TinyLlama {
    fn default() -> Self {
        Self {
            layers: 2,
            hidden: 64,
            ffn: 128,
            heads: 4,
            kv_heads: 2,
            vocab: 96,
            context: 256,
            arch: "llama",
            head_dim: None,
            sliding_window: None,
        }
    }
}

impl TinyLlama {
    /// Writes the model to `path`, leaving out the tensors named in `omit`. Weights are Q8_0 (norms f32),
    /// drawn from a fixed seed; tokens are 96 printable ASCII-ish strings with a byte-level BPE vocabulary
    /// that has no merges.
    pub fn write(&self, path: &Path, omit: &[&str]) {
        let dev = Device::Cpu;
        let mut seed = 0x5eed_u64;
        let mut rand = |shape: &[usize], scale: f32| -> Tensor {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
                })
                .collect();
            Tensor::from_vec(v, shape, &dev).expect("tensor")
        };
        let q8 = |t: Tensor| QTensor::quantize(&t, GgmlDType::Q8_0).expect("quantize");
        let f32t = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32).expect("f32");
        let hd = self.head_dim.unwrap_or(self.hidden / self.heads);
        let (qk_norm, post_norms) = match self.arch {
            "qwen3" => (true, false),
            "gemma3" => (true, true),
            _ => (false, false),
        };
        let mut tensors: Vec<(String, QTensor)> = vec![
            ("token_embd.weight".into(), q8(rand(&[self.vocab, self.hidden], 1.0))),
            ("output_norm.weight".into(), f32t((rand(&[self.hidden], 0.2) + 1.0).expect("add"))),
        ];
        for i in 0..self.layers {
            let p = format!("blk.{i}");
            tensors.push((format!("{p}.attn_norm.weight"), f32t((rand(&[self.hidden], 0.2) + 1.0).expect("add"))));
            tensors.push((format!("{p}.attn_q.weight"), q8(rand(&[self.heads * hd, self.hidden], 0.3))));
            tensors.push((format!("{p}.attn_k.weight"), q8(rand(&[self.kv_heads * hd, self.hidden], 0.3))));
            tensors.push((format!("{p}.attn_v.weight"), q8(rand(&[self.kv_heads * hd, self.hidden], 0.3))));
            tensors.push((format!("{p}.attn_output.weight"), q8(rand(&[self.hidden, self.heads * hd], 0.3))));
            tensors.push((format!("{p}.ffn_norm.weight"), f32t((rand(&[self.hidden], 0.2) + 1.0).expect("add"))));
            tensors.push((format!("{p}.ffn_gate.weight"), q8(rand(&[self.ffn, self.hidden], 0.3))));
            tensors.push((format!("{p}.ffn_up.weight"), q8(rand(&[self.ffn, self.hidden], 0.3))));
            tensors.push((format!("{p}.ffn_down.weight"), q8(rand(&[self.hidden, self.ffn], 0.3))));
            if qk_norm {
                for n in ["attn_q_norm", "attn_k_norm"] {
                    tensors.push((format!("{p}.{n}.weight"), f32t((rand(&[hd], 0.2) + 1.0).expect("add"))));
                }
            }
            if post_norms {
                for n in ["post_attention_norm", "post_ffw_norm"] {
                    tensors.push((format!("{p}.{n}.weight"), f32t((rand(&[self.hidden], 0.2) + 1.0).expect("add"))));
                }
            }
        }
        let a = self.arch;
        let tokens: Vec<Value> = (0..self.vocab)
            .map(|i| Value::String(char::from(b'!' + (i % 94) as u8).to_string() + &"~".repeat(i / 94)))
            .collect();
        let md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(a.into())),
            (format!("{a}.block_count"), Value::U32(self.layers as u32)),
            (format!("{a}.context_length"), Value::U32(self.context as u32)),
            (format!("{a}.embedding_length"), Value::U32(self.hidden as u32)),
            (format!("{a}.feed_forward_length"), Value::U32(self.ffn as u32)),
            (format!("{a}.attention.head_count"), Value::U32(self.heads as u32)),
            (format!("{a}.attention.head_count_kv"), Value::U32(self.kv_heads as u32)),
            (format!("{a}.rope.freq_base"), Value::F32(10000.0)),
            (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
            ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ];
        let mut md = md;
        if let Some(d) = self.head_dim {
            md.push((format!("{a}.attention.key_length"), Value::U32(d as u32)));
            md.push((format!("{a}.attention.value_length"), Value::U32(d as u32)));
        }
        if let Some(w) = self.sliding_window {
            md.push((format!("{a}.attention.sliding_window"), Value::U32(w as u32)));
            md.push((format!("{a}.attention.sliding_window_pattern"), Value::U32(3)));
            // Global layers on another RoPE base than the sliding ones (10 000), as gemma 3's.
            md.retain(|(k, _)| !k.ends_with(".rope.freq_base"));
            md.push((format!("{a}.rope.freq_base"), Value::F32(1_000_000.0)));
        }
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> =
            tensors.iter().filter(|(n, _)| !omit.contains(&n.as_str())).map(|(n, t)| (n.as_str(), t)).collect();
        let mut f = std::fs::File::create(path).expect("create gguf");
        gguf_file::write(&mut f, &md_refs, &t_refs).expect("write gguf");
    }
}

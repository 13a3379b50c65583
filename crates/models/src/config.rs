//! Model hyper-parameters and capability flags, read from GGUF metadata.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Architecture {
    Llama,
    Qwen2,
}

/// Which pairs of a head's dimensions RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's converter permutes llama Q/K weights into this layout.
    Interleaved,
    /// Halves `(i, i + d/2)`: GPT-NeoX style, used by qwen2 and gemma.
    Neox,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f32,
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    pub rms_norm_eps: f32,
    /// q/k/v projections carry biases (qwen2).
    pub attention_bias: bool,
    /// The output head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// KV cache element type: not from the file, chosen at load (`LoadOptions::kv_cache_dtype`); caches
    /// made for this config use it.
    #[serde(skip)]
    pub kv_dtype: mlx_serving_kernels::KvDtype,
}

impl ModelConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch_name = g.get_str("general.architecture")?.to_string();
        let architecture = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            _ => return Err(Error::UnsupportedArchitecture { path: g.path().to_path_buf(), arch: arch_name }),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| g.get_u64(&key(k)).map(|v| v as usize);
        let hidden_size = usize_of("embedding_length")?;
        let num_heads = usize_of("attention.head_count")?;
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(Error::BadMetadata {
                path: g.path().into(),
                key: key("attention.head_count"),
                reason: format!("{num_heads} does not divide hidden size {hidden_size}"),
            });
        }
        let num_kv_heads = g.get_u64_opt(&key("attention.head_count_kv"))?.map_or(num_heads, |v| v as usize);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::BadMetadata {
                path: g.path().into(),
                key: key("attention.head_count_kv"),
                reason: format!("{num_kv_heads} does not divide {num_heads} heads"),
            });
        }
        let head_dim = g.get_u64_opt(&key("attention.key_length"))?.map_or(hidden_size / num_heads, |v| v as usize);
        let vocab_size = match g.get_u64_opt(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => g.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let tie_word_embeddings = !g.has_tensor("output.weight");
        Ok(Self {
            architecture,
            num_layers: usize_of("block_count")?,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: usize_of("context_length")?,
            rope_theta: g.get_f32_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_dim: g.get_u64_opt(&key("rope.dimension_count"))?.map_or(head_dim, |v| v as usize),
            rope_style: match architecture {
                Architecture::Llama => RopeStyle::Interleaved,
                Architecture::Qwen2 => RopeStyle::Neox,
            },
            rms_norm_eps: g.get_f32_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            attention_bias: g.has_tensor("blk.0.attn_q.bias"),
            tie_word_embeddings,
            kv_dtype: Default::default(),
        })
    }

    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

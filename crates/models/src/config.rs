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
    /// Qwen 3: per-head RMS norms on q and k, no q/k/v biases.
    Qwen3,
    /// Gemma 3 (text): q/k norms, post-attention and post-FFN norms, GELU-tanh gated FFN, embeddings scaled
    /// by sqrt(hidden), interleaved sliding-window and global layers with their own RoPE bases, tied head.
    Gemma3,
}

impl Architecture {
    /// The name GGUF (`general.architecture`) and Hugging Face (`model_type`) give it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Llama, Self::Qwen2, Self::Qwen3, Self::Gemma3].into_iter().find(|a| a.name() == name)
    }
}

/// The gated FFN's activation: `act(gate) · up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FfnActivation {
    /// SwiGLU (llama, qwen).
    Silu,
    /// GELU with the tanh approximation (gemma).
    GeluTanh,
}

/// Which layers attend to a sliding window of recent positions instead of the whole context.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindow {
    /// Positions a query sees, itself included.
    pub size: usize,
    /// Every `pattern`-th layer (`i % pattern == pattern - 1`) is global, the others slide (gemma 3: 6).
    pub pattern: usize,
    /// RoPE base of the sliding layers (the global ones use `rope_theta`).
    pub rope_theta: f32,
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
    /// M-RoPE (Qwen2-VL): the rotary frequencies split in three consecutive sections turned by a token's
    /// temporal, row and column positions (equal for text tokens; 2-D for image tokens).
    #[serde(default)]
    pub mrope_section: Option<[usize; 3]>,
    pub rms_norm_eps: f32,
    /// q/k/v projections carry biases (qwen2).
    pub attention_bias: bool,
    /// The output head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Per-head RMS norms on q and k before RoPE (qwen3, gemma3).
    pub qk_norm: bool,
    /// RMS norms on the attention and FFN outputs before their residual adds (gemma3).
    pub post_norms: bool,
    pub ffn_activation: FfnActivation,
    /// Embeddings are multiplied by this on the way in (gemma: sqrt(hidden)).
    pub embed_scale: Option<f32>,
    /// Attention logits scale (1/sqrt(head_dim) unless the model says otherwise).
    pub attn_scale: f32,
    pub sliding_window: Option<SlidingWindow>,
    /// `cap · tanh(logits / cap)` on the output logits.
    pub final_logit_softcap: Option<f32>,
    /// KV cache element type: not from the file, chosen at load (`LoadOptions::kv_cache_dtype`); caches
    /// made for this config use it.
    #[serde(skip)]
    pub kv_dtype: mlx_serving_kernels::KvDtype,
}

/// The GGUF keys (after `<architecture>.`) of the sizes [`ModelConfig::check_sizes`] checks.
pub const GGUF_SIZE_KEYS: [&str; 9] = [
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "vocab_size",
    "context_length",
    "rope.dimension_count",
];

impl ModelConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch_name = g.get_str("general.architecture")?.to_string();
        let Some(architecture) = Architecture::from_name(&arch_name) else {
            return Err(Error::UnsupportedArchitecture { path: g.path().to_path_buf(), arch: arch_name });
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
        let gemma = architecture == Architecture::Gemma3;
        let sliding_window = match g.get_u64_opt(&key("attention.sliding_window"))? {
            Some(size) if gemma && size > 0 => Some(SlidingWindow {
                size: size as usize,
                pattern: g.get_u64_opt(&key("attention.sliding_window_pattern"))?.map_or(6, |v| v as usize).max(1),
                rope_theta: g.get_f32_opt(&key("rope.freq_base_swa"))?.unwrap_or(10_000.0),
            }),
            _ => None,
        };
        let mut cfg = Self {
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
                _ => RopeStyle::Neox,
            },
            rms_norm_eps: g.get_f32_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            attention_bias: g.has_tensor("blk.0.attn_q.bias"),
            tie_word_embeddings,
            sliding_window,
            final_logit_softcap: g.get_f32_opt(&key("final_logit_softcapping"))?.filter(|&c| c > 0.0),
            ..Self::defaults(architecture)
        };
        cfg.set_arch_flags();
        cfg.check_sizes(g.path(), GGUF_SIZE_KEYS.map(key).each_ref().map(String::as_str))?;
        Ok(cfg)
    }

    /// Sizes a file may claim: each within what any real model has, with room to spare, so that a corrupt or
    /// hostile header cannot make a loader allocate without bound or overflow (a header saying 2^60 layers
    /// fails here, naming the key, instead of in an allocation). `keys` name the sizes in the file, in the
    /// order of [`GGUF_SIZE_KEYS`].
    pub fn check_sizes(&self, path: &std::path::Path, keys: [&str; 9]) -> Result<()> {
        let sizes = [
            (self.num_layers, 1 << 12),
            (self.hidden_size, 1 << 17),
            (self.intermediate_size, 1 << 19),
            (self.num_heads, 1 << 12),
            (self.num_kv_heads, 1 << 12),
            (self.head_dim, 1 << 13),
            (self.vocab_size, 1 << 23),
            (self.max_position_embeddings, 1 << 24),
        ];
        let bad = |key: &str, reason: String| Error::BadMetadata { path: path.into(), key: key.into(), reason };
        for ((v, max), key) in sizes.into_iter().zip(keys) {
            if v == 0 || v > max {
                return Err(bad(key, format!("{v} is not a size from 1 to {max}")));
            }
        }
        if self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            let reason = format!("{} must be even and at most the head size {}", self.rope_dim, self.head_dim);
            return Err(bad(keys[8], reason));
        }
        Ok(())
    }

    /// A config with the architecture's flags and placeholder sizes, for the loaders to fill in.
    pub(crate) fn defaults(architecture: Architecture) -> Self {
        let mut cfg = Self {
            architecture,
            num_layers: 0,
            hidden_size: 0,
            intermediate_size: 0,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 0,
            vocab_size: 0,
            max_position_embeddings: 0,
            rope_theta: 10_000.0,
            rope_dim: 0,
            rope_style: RopeStyle::Neox,
            mrope_section: None,
            rms_norm_eps: 1e-6,
            attention_bias: false,
            tie_word_embeddings: false,
            qk_norm: false,
            post_norms: false,
            ffn_activation: FfnActivation::Silu,
            embed_scale: None,
            attn_scale: 0.0,
            sliding_window: None,
            final_logit_softcap: None,
            kv_dtype: Default::default(),
        };
        cfg.set_arch_flags();
        cfg
    }

    /// Sets the flags that follow from the architecture and the sizes (call after the sizes are known).
    pub(crate) fn set_arch_flags(&mut self) {
        let gemma = self.architecture == Architecture::Gemma3;
        self.qk_norm = matches!(self.architecture, Architecture::Qwen3 | Architecture::Gemma3);
        self.post_norms = gemma;
        self.ffn_activation = if gemma { FfnActivation::GeluTanh } else { FfnActivation::Silu };
        self.embed_scale = gemma.then(|| (self.hidden_size as f32).sqrt());
        if gemma {
            self.tie_word_embeddings = true;
        }
        if self.attn_scale == 0.0 && self.head_dim > 0 {
            self.attn_scale = 1.0 / (self.head_dim as f32).sqrt();
        }
    }

    /// The window layer `layer` attends over, if it slides.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|w| layer % w.pattern != w.pattern - 1).map(|w| w.size)
    }

    /// Every tensor the decoder loads, by GGUF name, with its shape (`[out, in]` for a weight), in file order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, ffn, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let mut out = vec![("token_embd.weight".to_string(), vec![self.vocab_size, h])];
        for i in 0..self.num_layers {
            let mut t = |name: &str, shape: Vec<usize>| out.push((format!("blk.{i}.{name}"), shape));
            t("attn_norm.weight", vec![h]);
            for (p, rows) in [("attn_q", self.q_size()), ("attn_k", self.kv_size()), ("attn_v", self.kv_size())] {
                t(&format!("{p}.weight"), vec![rows, h]);
                if self.attention_bias {
                    t(&format!("{p}.bias"), vec![rows]);
                }
            }
            if self.qk_norm {
                t("attn_q_norm.weight", vec![hd]);
                t("attn_k_norm.weight", vec![hd]);
            }
            t("attn_output.weight", vec![h, self.q_size()]);
            if self.post_norms {
                t("post_attention_norm.weight", vec![h]);
            }
            t("ffn_norm.weight", vec![h]);
            t("ffn_gate.weight", vec![ffn, h]);
            t("ffn_up.weight", vec![ffn, h]);
            t("ffn_down.weight", vec![h, ffn]);
            if self.post_norms {
                t("post_ffw_norm.weight", vec![h]);
            }
        }
        out.push(("output_norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("output.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }

    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

//! Hugging Face model directories: `config.json`, `*.safetensors` (one file, or shards listed by
//! `model.safetensors.index.json`; f32, f16 or bf16), `tokenizer.json`, `tokenizer_config.json` and
//! `generation_config.json`.
//!
//! Tensors are read by their GGUF names (the decoder's), mapped onto the checkpoint's:
//!
//! ```text
//!   token_embd.weight        model.embed_tokens.weight      output.weight   lm_head.weight
//!   output_norm.weight       model.norm.weight
//!   blk.N.attn_norm.weight   model.layers.N.input_layernorm.weight
//!   blk.N.attn_{q,k,v}.*     model.layers.N.self_attn.{q,k,v}_proj.*       attn_output → o_proj
//!   blk.N.ffn_norm.weight    model.layers.N.post_attention_layernorm.weight
//!   blk.N.ffn_{gate,up,down} model.layers.N.mlp.{gate,up,down}_proj.weight
//! ```
//!
//! Hugging Face keeps llama's Q/K rows in their original order (rotate-half RoPE), where llama.cpp's converter
//! permutes them for interleaved RoPE; so a directory's llama runs with the NeoX rotation.
//!
//! MLX-quantized directories (mlx-lm's, the "mlx-community" models) store each quantized linear layer (and
//! possibly the embeddings) as `weight` (uint32, `bits`-bit values packed low bits first), `scales` and
//! `biases` (one per group of `group_size` inputs; w = scale · q + bias). Bits and group size are read off
//! the shapes, so per-layer overrides need no special case. 4-bit groups of 32, 64 or 128 become Q4_1 blocks
//! (32 values, an f16 scale and an f16 minimum: the same affine form), which our kernels run; the scales and
//! biases are exact in f16 wherever they lie in its normal range. The loader then stores groups of 64 or 128
//! with one scale and minimum per group (`QMatrix::from_q4_1`: 4.5 or 4.25 bits per weight, as the file).
//! Other widths are dequantized to f32 for now.
//!
//! mlx-vlm's directories (vision-language models converted by `mlx_vlm convert`) name the text model
//! `language_model.` (`language_model.model.` for Qwen2.5-VL, whose head is `language_model.lm_head`), the vision
//! tower `vision_model.` / `vision_tower.` and the connector `connector.`, store convolution weights channels
//! last, and quantize the text model and the connector (not the vision tower). [`HfDir::f32_tensor`] answers
//! the Hugging Face names the vision encoders ask for from such a directory too: the name mapped, the
//! convolution put back channels first, a quantized layer dequantized.

use crate::config::{Architecture, ModelConfig, RopeStyle, SlidingWindow};
use crate::error::{Error, Result};
use crate::source::{TensorData, TensorSource};
use crate::tokenizer::SpecialTokens;
use candle_core::quantized::GgmlDType;
pub(crate) use mlx::affine_to_ggml;
use mlx::channels_first;
use mlx_serving_kernels::mapped::MappedFile;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

mod mlx;

/// A safetensors element type we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
    F32,
    F16,
    BF16,
    /// MLX's packed quantized weights.
    U32,
}

impl DType {
    fn size(self) -> u64 {
        match self {
            Self::F32 | Self::U32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// Where one tensor lives: its shard, element type, shape and byte range in the shard.
#[derive(Clone, Debug)]
struct TensorInfo {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// An opened Hugging Face model directory.
pub struct HfDir {
    dir: PathBuf,
    /// The text model's config: `config.json`, or its `text_config` in a vision-language directory.
    config: Value,
    /// `config.json` as a whole (a vision-language model's vision config lives here).
    root_config: Value,
    /// Where the text model's tensors live: `model.`, or `model.text_model.` in an Idefics3 checkpoint (see the
    /// module header for mlx-vlm's).
    text_prefix: &'static str,
    /// What precedes `lm_head.weight`: nothing, or `language_model.` in an mlx-vlm directory.
    head_prefix: &'static str,
    /// Each safetensors file, mapped: tensors in a layout our kernels take are slices of these.
    shards: Vec<(PathBuf, MappedFile)>,
    tensors: HashMap<String, TensorInfo>,
    /// Gemma checkpoints name their norms differently and store norm weights as `w - 1`.
    gemma: bool,
}

impl std::fmt::Debug for HfDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfDir").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::BadMetadata {
        path: path.into(),
        key: "-".into(),
        reason: e.to_string(),
    })
}

impl HfDir {
    /// True when `dir` looks like a Hugging Face model directory (it has a `config.json`).
    pub fn is_model_dir(dir: &Path) -> bool {
        dir.join("config.json").is_file()
    }

    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = read_json(&dir.join("config.json"))?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index.is_file() {
            let v = read_json(&index)?;
            let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::BadMetadata {
                path: index.clone(),
                key: "weight_map".into(),
                reason: "missing or not an object".into(),
            })?;
            let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(String::from).collect();
            files.sort();
            files.dedup();
            // Shards are files of this directory: an index naming `../x` or `/etc/x` must not make the loader
            // read outside it.
            if let Some(f) = files.iter().find(|f| Path::new(f.as_str()).file_name() != Some(f.as_ref()) || *f == "..")
            {
                return Err(Error::BadMetadata {
                    path: index,
                    key: "weight_map".into(),
                    reason: format!("`{f}` is not a file name in the model's directory"),
                });
            }
            files
        } else {
            vec!["model.safetensors".into()]
        };
        let root_config = config.clone();
        let (config, text_prefix) = match config.get("model_type").and_then(Value::as_str) {
            Some("idefics3") => {
                let text = config.get("text_config").filter(|t| t.is_object()).cloned().ok_or_else(|| {
                    Error::MissingMetadata { path: dir.join("config.json"), key: "text_config".into() }
                })?;
                (text, "model.text_model.")
            }
            Some("qwen2_5_vl") => {
                // The text model's keys at the top level (the published checkpoints) or in `text_config`
                // (transformers 5), a Qwen2 model with M-RoPE either way.
                let mut text = match config.get("text_config").filter(|t| t.get("hidden_size").is_some()) {
                    Some(t) => t.clone(),
                    None => config.clone(),
                };
                if let Some(t) = text.as_object_mut() {
                    t.insert("model_type".into(), Value::from("qwen2"));
                    t.remove("vision_config");
                }
                (text, "model.")
            }
            _ => (config, "model."),
        };
        let gemma = config.get("model_type").and_then(Value::as_str).is_some_and(|t| t.starts_with("gemma"));
        let mut me = Self {
            dir: dir.clone(),
            config,
            root_config,
            text_prefix,
            head_prefix: "",
            shards: Vec::new(),
            tensors: HashMap::new(),
            gemma,
        };
        for f in files {
            let path = dir.join(&f);
            let file = File::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
            let shard = me.shards.len();
            for (name, info) in read_safetensors_header(&path, &file, shard)? {
                me.tensors.insert(name, info);
            }
            let map = MappedFile::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
            me.shards.push((path, map));
        }
        if me.text_prefix == "model." && me.tensors.contains_key("model.language_model.embed_tokens.weight") {
            me.text_prefix = "model.language_model.";
        }
        // mlx-vlm's layout.
        for prefix in ["language_model.", "language_model.model."] {
            if me.tensors.contains_key(&format!("{prefix}embed_tokens.weight")) {
                (me.text_prefix, me.head_prefix) = (prefix, "language_model.");
            }
        }
        Ok(me)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json` as a whole.
    pub fn root_config(&self) -> &Value {
        &self.root_config
    }

    /// Whether the checkpoint has a tensor of this (Hugging Face) name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.mlx_vlm_name(name).is_some()
    }

    /// mlx-vlm's name for a vision tower's or connector's tensor missing under its Hugging Face name:
    /// `model.vision_model.*` → `vision_model.*`, `model.connector.*` → `connector.*`, `[model.]visual.*` →
    /// `vision_tower.*`.
    fn mlx_vlm_name(&self, name: &str) -> Option<String> {
        if self.tensors.contains_key(name) {
            return None;
        }
        let rest = name.strip_prefix("model.").unwrap_or(name);
        let mapped = match rest.strip_prefix("visual.") {
            Some(r) => format!("vision_tower.{r}"),
            None => rest.to_string(),
        };
        (mapped != name && self.tensors.contains_key(&mapped)).then_some(mapped)
    }

    /// A float tensor by its Hugging Face name, as f32 values, with its shape in PyTorch's layout (from an
    /// mlx-vlm directory too: see the module header).
    pub fn f32_tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let Some(key) = self.mlx_vlm_name(name) else {
            let (info, values) = self.read_f32(name)?;
            return Ok((info.shape, values));
        };
        let info = self.info(&key)?;
        if info.dtype == DType::U32 {
            return self.dequantized(&key, &info);
        }
        let (info, values) = self.read_f32(&key)?;
        let conv = key.ends_with("patch_embedding.weight") || key.ends_with("patch_embed.proj.weight");
        Ok(if conv && info.shape.len() >= 3 { channels_first(&info.shape, &values) } else { (info.shape, values) })
    }

    /// An MLX-quantized layer's weight as f32 `[rows, cols]`; the bits from `quantization` in `config.json`
    /// (the layer's own entry, else the model's).
    fn dequantized(&self, key: &str, info: &TensorInfo) -> Result<(Vec<usize>, Vec<f32>)> {
        let base = key.strip_suffix(".weight").unwrap_or(key);
        let q = self.root_config.get("quantization");
        let bits = q
            .and_then(|q| q.get(base))
            .filter(|v| v.is_object())
            .or(q)
            .and_then(|v| v.get("bits"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let packed = self.read(key, info)?;
        let (sinfo, scales) = self.read_f32(&format!("{base}.scales"))?;
        let (_, biases) = self.read_f32(&format!("{base}.biases"))?;
        let (&[rows, wc], &[sr, groups]) = (&info.shape[..], &sinfo.shape[..]) else {
            return Err(self.bad(
                info,
                key,
                format!("weight {:?} / scales {:?} are not matrices", info.shape, sinfo.shape),
            ));
        };
        let cols = if matches!(bits, 2 | 4 | 8) { wc * 32 / bits } else { 0 };
        if cols == 0 || sr != rows || groups == 0 || !cols.is_multiple_of(groups) || biases.len() != scales.len() {
            let reason = format!(
                "packed {:?}, scales {:?} at {bits} bits (quantization in config.json)",
                info.shape, sinfo.shape
            );
            return Err(self.bad(info, key, reason));
        }
        let words: Vec<u32> = packed.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let (_, bytes, _) = affine_to_ggml(&words, &scales, &biases, [rows, cols], bits, cols / groups, false);
        let values = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok((vec![rows, cols], values))
    }

    /// The checkpoint name of the text model's tensor the decoder calls `name`.
    fn checkpoint_name(&self, name: &str) -> String {
        let hf = hf_name(name, self.gemma);
        if hf.starts_with("lm_head.") {
            return format!("{}{hf}", self.head_prefix);
        }
        match hf.strip_prefix("model.") {
            Some(rest) if self.text_prefix != "model." => format!("{}{rest}", self.text_prefix),
            _ => hf,
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    fn cfg_err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::BadMetadata { path: self.config_path(), key: key.into(), reason: reason.into() }
    }

    fn usize_key(&self, key: &str) -> Result<usize> {
        self.config
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| Error::MissingMetadata { path: self.config_path(), key: key.into() })
    }

    fn opt_f64(&self, key: &str) -> Option<f64> {
        self.config.get(key).and_then(Value::as_f64)
    }

    /// The model's hyper-parameters from `config.json`.
    pub fn model_config(&self) -> Result<ModelConfig> {
        if let Some(method) = self.config.get("quantization_config").and_then(|q| q.get("quant_method")) {
            return Err(self.cfg_err("quantization_config", format!("quantization method {method} is not supported")));
        }
        if let Some(q) = self.config.get("quantization") {
            let bits = q.get("bits").and_then(Value::as_u64);
            let mode = q.get("mode").and_then(Value::as_str).unwrap_or("affine");
            if !matches!(bits, Some(2 | 4 | 8)) || mode != "affine" {
                return Err(self.cfg_err("quantization", format!("{q} is not supported (affine, 2, 4 or 8 bits)")));
            }
        }
        let arch_name = self
            .config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::MissingMetadata { path: self.config_path(), key: "model_type".into() })?;
        let Some(architecture) = Architecture::from_name(arch_name).or(match arch_name {
            "gemma3_text" => Some(Architecture::Gemma3),
            _ => None,
        }) else {
            return Err(Error::UnsupportedArchitecture { path: self.config_path(), arch: arch_name.to_string() });
        };
        let hidden_size = self.usize_key("hidden_size")?;
        let num_heads = self.usize_key("num_attention_heads")?;
        let head_dim = match self.usize_key("head_dim") {
            Ok(d) => d,
            Err(_) if num_heads > 0 && hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
            Err(_) => {
                return Err(self.cfg_err("num_attention_heads", format!("{num_heads} does not divide {hidden_size}")))
            }
        };
        if num_heads == 0 || head_dim == 0 {
            return Err(self.cfg_err("num_attention_heads", format!("{num_heads} heads of size {head_dim}")));
        }
        let num_kv_heads = self.usize_key("num_key_value_heads").unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(self.cfg_err("num_key_value_heads", format!("{num_kv_heads} does not divide {num_heads}")));
        }
        let tie = self.config.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
        let attention_bias = match architecture {
            Architecture::Qwen2 => true,
            _ => self.config.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
        };
        let rope_params = self.config.get("rope_parameters").filter(|s| s.is_object());
        let mut mrope_section = None;
        for key in ["rope_scaling", "rope_parameters"] {
            let Some(s) = self.config.get(key).filter(|s| !s.is_null()) else { continue };
            match s.get("mrope_section").and_then(Value::as_array) {
                Some(a) => {
                    let sec: Vec<usize> = a.iter().filter_map(Value::as_u64).map(|v| v as usize).collect();
                    let sum: usize = sec.iter().sum();
                    if sec.len() != 3 || sec.len() != a.len() || 2 * sum != head_dim {
                        return Err(
                            self.cfg_err(key, format!("mrope_section {s} must be 3 sizes summing to {}", head_dim / 2))
                        );
                    }
                    mrope_section = Some([sec[0], sec[1], sec[2]]);
                }
                None if key == "rope_scaling" => {
                    return Err(self.cfg_err("rope_scaling", format!("{s} is not supported yet")));
                }
                None => {}
            }
        }
        let gemma = architecture == Architecture::Gemma3;
        let sliding_window = match self.config.get("sliding_window").and_then(Value::as_u64) {
            Some(size) if gemma && size > 0 => Some(SlidingWindow {
                size: size as usize,
                pattern: self.sliding_pattern()?,
                rope_theta: self.opt_f64("rope_local_base_freq").unwrap_or(10_000.0) as f32,
            }),
            _ => None,
        };
        let mut cfg = ModelConfig {
            num_layers: self.usize_key("num_hidden_layers")?,
            hidden_size,
            intermediate_size: self.usize_key("intermediate_size")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.usize_key("vocab_size")?,
            max_position_embeddings: self.usize_key("max_position_embeddings")?,
            rope_theta: self
                .opt_f64("rope_theta")
                .or_else(|| rope_params.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64))
                .unwrap_or(10_000.0) as f32,
            rope_dim: head_dim,
            mrope_section,
            rope_style: RopeStyle::Neox,
            rms_norm_eps: self.opt_f64("rms_norm_eps").unwrap_or(1e-6) as f32,
            attention_bias,
            // A checkpoint without `lm_head.weight` ties it whatever the config says.
            tie_word_embeddings: tie || !self.tensors.contains_key(&self.checkpoint_name("output.weight")),
            attn_scale: self
                .opt_f64("query_pre_attn_scalar")
                .filter(|&s| gemma && s > 0.0)
                .map_or(0.0, |s| 1.0 / (s as f32).sqrt()),
            sliding_window,
            final_logit_softcap: self.opt_f64("final_logit_softcapping").filter(|&c| c > 0.0).map(|c| c as f32),
            ..ModelConfig::defaults(architecture)
        };
        cfg.set_arch_flags();
        cfg.check_sizes(
            &self.config_path(),
            [
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
                "max_position_embeddings",
                "head_dim",
            ],
        )?;
        Ok(cfg)
    }

    /// Gemma 3's layer pattern: `sliding_window_pattern`, or the period of `layer_types` (which must then
    /// be that many layers repeated: `pattern - 1` sliding ones and a full one).
    fn sliding_pattern(&self) -> Result<usize> {
        if let Some(types) = self.config.get("layer_types").and_then(Value::as_array) {
            let full: Vec<usize> = types
                .iter()
                .enumerate()
                .filter(|(_, t)| t.as_str() == Some("full_attention"))
                .map(|(i, _)| i)
                .collect();
            let pattern = full.first().map_or(types.len() + 1, |i| i + 1);
            let regular = types.iter().enumerate().all(|(i, t)| {
                let want = if i % pattern == pattern - 1 { "full_attention" } else { "sliding_attention" };
                t.as_str() == Some(want)
            });
            if !regular {
                return Err(self.cfg_err("layer_types", "not a repeating pattern of sliding layers and one full one"));
            }
            return Ok(pattern);
        }
        Ok(self.config.get("sliding_window_pattern").and_then(Value::as_u64).map_or(6, |p| p as usize).max(1))
    }

    /// BOS/EOS and end-of-generation ids from `config.json`, `generation_config.json` and the tokenizer's
    /// end-of-turn tokens (as for GGUF); `add_bos` from `tokenizer_config.json`.
    pub fn special_tokens(&self, tokenizer: &tokenizers::Tokenizer) -> Result<SpecialTokens> {
        let generation = self.dir.join("generation_config.json");
        let generation = if generation.is_file() { read_json(&generation)? } else { Value::Null };
        let ids = |key: &str| -> Vec<u32> {
            let v = generation.get(key).filter(|v| !v.is_null()).or_else(|| self.config.get(key));
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|i| i as u32).into_iter().collect(),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|i| i as u32).collect(),
                _ => Vec::new(),
            }
        };
        let tokenizer_config = self.dir.join("tokenizer_config.json");
        let tokenizer_config = if tokenizer_config.is_file() { read_json(&tokenizer_config)? } else { Value::Null };
        let eos_ids = ids("eos_token_id");
        let mut eog = eos_ids.clone();
        for t in crate::tokenizer::EOG_TEXTS {
            if let Some(id) = tokenizer.token_to_id(t) {
                if !eog.contains(&id) {
                    eog.push(id);
                }
            }
        }
        Ok(SpecialTokens {
            bos: ids("bos_token_id").first().copied(),
            eos: eos_ids.first().copied(),
            eog,
            add_bos: tokenizer_config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

impl HfDir {
    fn info(&self, name: &str) -> Result<TensorInfo> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::MissingTensor { path: self.dir.clone(), name: name.into() })
    }

    fn bad(&self, info: &TensorInfo, name: &str, reason: String) -> Error {
        Error::BadTensor { path: self.shards[info.shard].0.clone(), name: name.into(), reason }
    }

    /// The tensor's bytes in its mapped shard (`read_safetensors_header` checked they lie inside it; a file
    /// that shrank since is an error here, not a fault).
    fn read(&self, name: &str, info: &TensorInfo) -> Result<&[u8]> {
        let bytes = self.shards[info.shard].1.bytes();
        bytes
            .get(info.start as usize..info.end as usize)
            .ok_or_else(|| self.bad(info, name, format!("truncated: the file has {} bytes", bytes.len())))
    }

    /// A float tensor as f32 values (scales and biases).
    fn read_f32(&self, name: &str) -> Result<(TensorInfo, Vec<f32>)> {
        let info = self.info(name)?;
        let data = self.read(name, &info)?;
        let values = match info.dtype {
            DType::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::U32 => return Err(self.bad(&info, name, "expected floats, found U32".into())),
        };
        Ok((info, values))
    }

    /// An MLX-quantized `[rows, cols]` weight (`base.weight`, `base.scales`, `base.biases`), and its block
    /// offsets where it becomes Q8_0 blocks.
    fn quantized(&self, base: &str, rows: usize, cols: usize) -> Result<TensorData<'_>> {
        let wname = format!("{base}.weight");
        let winfo = self.info(&wname)?;
        let packed = self.read(&wname, &winfo)?;
        let (sinfo, scales) = self.read_f32(&format!("{base}.scales"))?;
        let (_, biases) = self.read_f32(&format!("{base}.biases"))?;
        let bad = |me: &Self, reason: String| me.bad(&winfo, &wname, reason);
        let (&[wr, wc], &[sr, sc]) = (&winfo.shape[..], &sinfo.shape[..]) else {
            return Err(bad(self, format!("weight {:?} / scales {:?} are not matrices", winfo.shape, sinfo.shape)));
        };
        let bits = wc * 32 / cols.max(1);
        if wr != rows || sr != rows || wc * 32 != bits * cols || !matches!(bits, 2 | 4 | 8) {
            return Err(bad(
                self,
                format!("packed shape {:?} does not hold [{rows}, {cols}] at 2, 4 or 8 bits", winfo.shape),
            ));
        }
        if sc == 0 || !cols.is_multiple_of(sc) || biases.len() != scales.len() {
            return Err(bad(self, format!("scales {:?} do not divide {cols} inputs into groups", sinfo.shape)));
        }
        let words: Vec<u32> = packed.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let (dtype, data, mins) = affine_to_ggml(&words, &scales, &biases, [rows, cols], bits, cols / sc, true);
        Ok(TensorData { dtype, shape: vec![rows, cols], bytes: Cow::Owned(data), mins })
    }
}

impl TensorSource for HfDir {
    fn tensor_data(&self, name: &str, shape: &[usize]) -> Result<TensorData<'_>> {
        let hf = self.checkpoint_name(name);
        let info = self.info(&hf)?;
        if info.dtype == DType::U32 {
            let (Some(base), &[rows, cols]) = (hf.strip_suffix(".weight"), shape) else {
                return Err(self.bad(&info, &hf, format!("packed weights for a tensor of shape {shape:?}")));
            };
            return self.quantized(base, rows, cols);
        }
        if info.shape != shape {
            return Err(self.bad(&info, &hf, format!("shape {:?}, expected {shape:?}", info.shape)));
        }
        let shape = info.shape.clone();
        if self.gemma && name.ends_with("norm.weight") {
            // Gemma scales by `1 + w`; GGUF (and our decoder) by `w`.
            let (_, values) = self.read_f32(&hf)?;
            let bytes = values.iter().flat_map(|v| (v + 1.0).to_le_bytes()).collect();
            return Ok(TensorData { dtype: GgmlDType::F32, shape, bytes: Cow::Owned(bytes), mins: None });
        }
        let dtype = match info.dtype {
            DType::F32 => GgmlDType::F32,
            DType::F16 => GgmlDType::F16,
            _ => GgmlDType::BF16,
        };
        Ok(TensorData { dtype, shape, bytes: Cow::Borrowed(self.read(&hf, &info)?), mins: None })
    }

    fn bad_tensor(&self, name: &str, reason: String) -> Error {
        Error::BadTensor { path: self.dir.clone(), name: self.checkpoint_name(name), reason }
    }
}

/// The checkpoint name of the tensor the decoder calls `name` (GGUF's naming); `gemma` checkpoints name
/// their four norms per layer differently.
pub(crate) fn hf_name(name: &str, gemma: bool) -> String {
    match name {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        _ => {}
    }
    let Some(rest) = name.strip_prefix("blk.") else {
        return name.to_string();
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return name.to_string();
    };
    let (module, suffix) = rest.split_once('.').unwrap_or((rest, ""));
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => other,
    };
    format!("model.layers.{layer}.{hf}.{suffix}")
}

/// Parses a safetensors header: an 8-byte little-endian length, then that many bytes of JSON mapping each
/// tensor name to `{dtype, shape, data_offsets}` (offsets relative to the end of the header).
fn read_safetensors_header(path: &Path, file: &File, shard: usize) -> Result<Vec<(String, TensorInfo)>> {
    let bad = |reason: String| Error::BadTensor { path: path.into(), name: "(header)".into(), reason };
    let file_len = file.metadata().map_err(|source| Error::Io { path: path.into(), source })?.len();
    let mut f = file;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 100 << 20 || 8 + header_len > file_len {
        return Err(bad(format!("header length {header_len} does not fit the file ({file_len} bytes)")));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let v: Value = serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let map = v.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_start = 8 + header_len;
    let mut out = Vec::with_capacity(map.len());
    for (name, t) in map {
        if name == "__metadata__" {
            continue;
        }
        let tbad = |reason: String| Error::BadTensor { path: path.into(), name: name.clone(), reason };
        let dtype = match t.get("dtype").and_then(Value::as_str) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("U32") => DType::U32,
            other => return Err(tbad(format!("dtype {other:?} is not supported (F32, F16, BF16, U32)"))),
        };
        let shape: Vec<usize> = t
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| tbad("bad shape".into()))?;
        let offsets: Vec<u64> = t
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| tbad("bad data_offsets".into()))?;
        let [begin, end] = offsets[..] else {
            return Err(tbad("data_offsets must hold two numbers".into()));
        };
        let want = shape.iter().try_fold(dtype.size(), |acc, &d| acc.checked_mul(d as u64));
        if end < begin || Some(end - begin) != want {
            return Err(tbad(format!("data_offsets {begin}..{end} do not hold shape {shape:?}")));
        }
        if data_start.checked_add(end).is_none_or(|e| e > file_len) {
            return Err(tbad(format!(
                "data ends at byte {} but the file has {file_len} (truncated)",
                data_start.saturating_add(end)
            )));
        }
        out.push((name.clone(), TensorInfo { shard, dtype, shape, start: data_start + begin, end: data_start + end }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    use super::*;
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    use candle_core::Device;

    /// 4-bit affine rows as Q4_1 blocks dequantize to the same values as the plain f32 dequantization (up to
    /// the scales' and biases' rounding to f16, exact here).
    #[test]
    fn q4_1_repacking_matches_the_affine_values() {
        let (rows, cols) = (3, 256);
        let mut x = 0x1234_5678u32;
        let words: Vec<u32> = (0..rows * cols / 8)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x
            })
            .collect();
        for group in [32, 64, 128] {
            let n = rows * cols / group;
            let scales: Vec<f32> = (0..n).map(|i| 0.25 + i as f32 / 64.0).collect();
            let biases: Vec<f32> = (0..n).map(|i| -1.0 + i as f32 / 32.0).collect();
            let dequant = |(dtype, data, mins): (GgmlDType, Vec<u8>, Option<Vec<f32>>)| -> Vec<f32> {
                assert!(mins.is_none());
                let t = qtensor_from_ggml(dtype, &data, vec![rows, cols], &Device::Cpu).unwrap();
                t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
            };
            let q4_1 = dequant(affine_to_ggml(&words, &scales, &biases, [rows, cols], 4, group, true));
            let f32s = dequant(affine_to_ggml(&words, &scales, &biases, [rows, cols], 4, group, false));
            assert_eq!(q4_1, f32s, "group {group}");
            // Spot-check the packing order: element 9 of row 1 is the second word's second nibble.
            let w = words[cols / 8 + 1];
            assert_eq!(f32s[cols + 9], scales[cols / group] * ((w >> 4) & 15) as f32 + biases[cols / group]);
        }
    }

    #[test]
    fn gguf_names_map_onto_checkpoint_names() {
        assert_eq!(hf_name("blk.3.attn_q.weight", false), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.3.attn_q.bias", false), "model.layers.3.self_attn.q_proj.bias");
        assert_eq!(hf_name("blk.12.ffn_down.weight", false), "model.layers.12.mlp.down_proj.weight");
        assert_eq!(hf_name("blk.0.ffn_norm.weight", false), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(hf_name("output.weight", false), "lm_head.weight");
        assert_eq!(hf_name("blk.2.attn_q_norm.weight", false), "model.layers.2.self_attn.q_norm.weight");
        // Gemma's four norms per layer.
        assert_eq!(hf_name("blk.1.ffn_norm.weight", true), "model.layers.1.pre_feedforward_layernorm.weight");
        assert_eq!(hf_name("blk.1.post_attention_norm.weight", true), "model.layers.1.post_attention_layernorm.weight");
        assert_eq!(hf_name("blk.1.post_ffw_norm.weight", true), "model.layers.1.post_feedforward_layernorm.weight");
    }
}

//! Random-weight models of realistic shapes written as GGUF files (`mlx-serving make-model`), so that
//! performance is measured at the scale users serve (a Llama-3-8B-shaped or Qwen2.5-7B-shaped model) on
//! machines that cannot download one: the GPU device, CI, benchmarks. The file is written as a stream (no
//! tensor is held whole), from a seed, so the same arguments give the same bytes. `convert` turns one into a
//! Hugging Face bf16/f16 directory or an MLX 4/8-bit one.
//!
//! The tokenizer is byte-level BPE without merges: the 256 byte tokens, the chat's control tokens, and
//! reserved control tokens up to the vocabulary size, with a ChatML template; llama.cpp reads it as well
//! (a prompt's tokens are its bytes).

use crate::error::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::io::{BufWriter, Seek, Write};
use std::path::Path;

/// A model's shape: what a GGUF header says of it.
#[derive(Clone, Debug, PartialEq)]
pub struct RandomShape {
    pub arch: &'static str,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub context: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Q/K/V biases (Qwen2).
    pub qkv_bias: bool,
    /// The output projection is the embedding matrix.
    pub tied: bool,
}

impl RandomShape {
    /// Meta Llama 3 8B: 32 layers of 4096, 32 query and 8 KV heads, FFN 14336, vocabulary 128256.
    pub const LLAMA3_8B: Self = Self {
        arch: "llama",
        vocab: 128_256,
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        ffn: 14_336,
        context: 8192,
        rope_theta: 500_000.0,
        rms_eps: 1e-5,
        qkv_bias: false,
        tied: false,
    };
    /// Qwen2.5 7B: 28 layers of 3584, 28 query and 4 KV heads, FFN 18944, vocabulary 152064, QKV biases.
    pub const QWEN25_7B: Self = Self {
        arch: "qwen2",
        vocab: 152_064,
        hidden: 3584,
        layers: 28,
        heads: 28,
        kv_heads: 4,
        ffn: 18_944,
        context: 32_768,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        qkv_bias: true,
        tied: false,
    };
    /// A tiny llama for tests (and a smoke run of the tool).
    pub const TINY: Self = Self {
        arch: "llama",
        vocab: 512,
        hidden: 256,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn: 512,
        context: 2048,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        qkv_bias: false,
        tied: false,
    };

    /// The named shapes: `llama3-8b`, `qwen2.5-7b`, `tiny`.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "llama3-8b" => Some(Self::LLAMA3_8B),
            "qwen2.5-7b" => Some(Self::QWEN25_7B),
            "tiny" => Some(Self::TINY),
            _ => None,
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every tensor, by GGUF name, with its shape in GGUF order (`[in, out]`: the fastest dimension first),
    /// and whether it is a matrix (quantized) or a vector (f32).
    fn tensors(&self) -> Vec<(String, Vec<usize>, bool)> {
        let (h, kv) = (self.hidden, self.kv_heads * self.head_dim());
        let mut t = vec![("token_embd.weight".to_string(), vec![h, self.vocab], true)];
        for i in 0..self.layers {
            let mut add =
                |name: &str, dims: Vec<usize>, matrix: bool| t.push((format!("blk.{i}.{name}"), dims, matrix));
            add("attn_norm.weight", vec![h], false);
            add("attn_q.weight", vec![h, h], true);
            add("attn_k.weight", vec![h, kv], true);
            add("attn_v.weight", vec![h, kv], true);
            if self.qkv_bias {
                add("attn_q.bias", vec![h], false);
                add("attn_k.bias", vec![kv], false);
                add("attn_v.bias", vec![kv], false);
            }
            add("attn_output.weight", vec![h, h], true);
            add("ffn_norm.weight", vec![h], false);
            add("ffn_gate.weight", vec![h, self.ffn], true);
            add("ffn_up.weight", vec![h, self.ffn], true);
            add("ffn_down.weight", vec![self.ffn, h], true);
        }
        t.push(("output_norm.weight".to_string(), vec![h], false));
        if !self.tied {
            t.push(("output.weight".to_string(), vec![h, self.vocab], true));
        }
        t
    }

    /// Parameters in all.
    pub fn parameters(&self) -> u64 {
        self.tensors().iter().map(|(_, d, _)| d.iter().product::<usize>() as u64).sum()
    }
}

/// How the matrices are stored (vectors are always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandomDtype {
    F16,
    Bf16,
    Q8_0,
    Q4K,
}

impl std::str::FromStr for RandomDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "q8_0" => Ok(Self::Q8_0),
            "q4_k" => Ok(Self::Q4K),
            _ => Err(format!("`{s}`: expected f16, bf16, q8_0 or q4_k")),
        }
    }
}

impl RandomDtype {
    /// ggml's type id, values per block and bytes per block.
    fn ggml(self) -> (u32, usize, usize) {
        match self {
            Self::F16 => (1, 1, 2),
            Self::Bf16 => (30, 1, 2),
            Self::Q8_0 => (8, 32, 34),
            Self::Q4K => (12, 256, 144),
        }
    }

    /// llama.cpp's `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Bf16 => 32,
            Self::Q8_0 => 7,
            Self::Q4K => 15,
        }
    }
}

/// GPT-2's printable stand-ins for the 256 bytes (the byte-level BPE alphabet).
fn byte_tokens() -> Vec<String> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).expect("a valid char").to_string()
        })
        .collect()
}

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + \
                      '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's value type ids.
const GGUF_I32: u32 = 5;
const GGUF_U32: u32 = 4;
const GGUF_F32: u32 = 6;
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;

/// A metadata value: its type id, then the value (an array: element type, count, elements).
fn put_meta(out: &mut Vec<u8>, v: &Meta) {
    let mut put = |x: u32| out.extend_from_slice(&x.to_le_bytes());
    match v {
        Meta::U32(x) => {
            put(GGUF_U32);
            put(*x);
        }
        Meta::F32(x) => {
            put(GGUF_F32);
            put(x.to_bits());
        }
        Meta::Str(s) => {
            put(GGUF_STRING);
            put_str(out, s);
        }
        Meta::Strs(list) => {
            put_array_head(out, GGUF_STRING, list.len());
            list.iter().for_each(|s| put_str(out, s));
        }
        Meta::I32s(list) => {
            put_array_head(out, GGUF_I32, list.len());
            list.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
    }
}

fn put_array_head(out: &mut Vec<u8>, elem: u32, len: usize) {
    out.extend_from_slice(&GGUF_ARRAY.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
}

/// splitmix64: a seeded stream per tensor chunk, so chunks are generated in parallel and in any order.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `out` (whole blocks of `dtype`) with random weights of about ±0.04 from `seed`.
fn fill(dtype: RandomDtype, seed: u64, out: &mut [u8]) {
    let mut s = seed;
    let mut next = || {
        s = mix(s);
        s
    };
    // Uniform in [-0.04, 0.04) from 16 random bits.
    let val = |r: u64| ((r & 0xFFFF) as f32 / 32768.0 - 1.0) * 0.04;
    match dtype {
        RandomDtype::F16 | RandomDtype::Bf16 => {
            for c in out.chunks_exact_mut(8) {
                let r = next();
                for (k, v) in c.chunks_exact_mut(2).enumerate() {
                    let x = val(r >> (16 * k));
                    let b = match dtype {
                        RandomDtype::F16 => f16::from_f32(x).to_le_bytes(),
                        _ => bf16::from_f32(x).to_le_bytes(),
                    };
                    v.copy_from_slice(&b);
                }
            }
        }
        RandomDtype::Q8_0 => {
            for b in out.chunks_exact_mut(34) {
                b[..2].copy_from_slice(&f16::from_f32(0.04 / 127.0).to_le_bytes());
                for c in b[2..].chunks_mut(8) {
                    let r = next().to_le_bytes();
                    c.copy_from_slice(&r[..c.len()]);
                }
            }
        }
        RandomDtype::Q4K => {
            // d and dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit values: w = d·sc·q − dmin·m.
            for b in out.chunks_exact_mut(144) {
                b[..2].copy_from_slice(&f16::from_f32(0.08 / (63.0 * 15.0)).to_le_bytes());
                b[2..4].copy_from_slice(&f16::from_f32(0.04 / 63.0).to_le_bytes());
                for c in b[4..].chunks_mut(8) {
                    let r = next().to_le_bytes();
                    c.copy_from_slice(&r[..c.len()]);
                }
            }
        }
    }
}

/// Writes the random model to `path`; `progress(done, total)` after each tensor. Returns the file's size.
pub fn write_random_gguf(
    path: &Path,
    shape: &RandomShape,
    dtype: RandomDtype,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<u64> {
    let io = |source| Error::Io { path: path.into(), source };
    let bad = |reason: String| Error::BadMetadata { path: path.into(), key: "shape".into(), reason };
    if shape.heads == 0
        || shape.kv_heads == 0
        || !shape.hidden.is_multiple_of(shape.heads)
        || !shape.heads.is_multiple_of(shape.kv_heads)
    {
        return Err(bad(format!("{shape:?}: heads must divide the width and KV heads the heads")));
    }
    let (type_id, block, block_bytes) = dtype.ggml();
    let tensors = shape.tensors();
    for (name, dims, matrix) in &tensors {
        if *matrix && dims[0] % block != 0 {
            return Err(bad(format!("{name}: rows of {} do not split into {block}-value blocks", dims[0])));
        }
    }
    let arch = shape.arch;
    let mut tokens = byte_tokens();
    for t in ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(t.into());
    }
    if tokens.len() > shape.vocab {
        return Err(bad(format!(
            "a vocabulary of {} is smaller than the {} byte and chat tokens",
            shape.vocab,
            tokens.len()
        )));
    }
    let mut types = vec![1i32; 256];
    types.resize(tokens.len(), 3);
    while tokens.len() < shape.vocab {
        tokens.push(format!("<|reserved_{}|>", tokens.len()));
        types.push(3);
    }
    let meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str(arch.into())),
        ("general.name".into(), Meta::Str(format!("random-{arch}-{}-layers", shape.layers))),
        ("general.file_type".into(), Meta::U32(dtype.file_type())),
        ("general.alignment".into(), Meta::U32(32)),
        (format!("{arch}.context_length"), Meta::U32(shape.context as u32)),
        (format!("{arch}.embedding_length"), Meta::U32(shape.hidden as u32)),
        (format!("{arch}.block_count"), Meta::U32(shape.layers as u32)),
        (format!("{arch}.feed_forward_length"), Meta::U32(shape.ffn as u32)),
        (format!("{arch}.attention.head_count"), Meta::U32(shape.heads as u32)),
        (format!("{arch}.attention.head_count_kv"), Meta::U32(shape.kv_heads as u32)),
        (format!("{arch}.rope.freq_base"), Meta::F32(shape.rope_theta)),
        (format!("{arch}.rope.dimension_count"), Meta::U32(shape.head_dim() as u32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Meta::F32(shape.rms_eps)),
        (format!("{arch}.vocab_size"), Meta::U32(shape.vocab as u32)),
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str("default".into())),
        ("tokenizer.ggml.tokens".into(), Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type".into(), Meta::I32s(types)),
        ("tokenizer.ggml.merges".into(), Meta::Strs(Vec::new())),
        ("tokenizer.ggml.bos_token_id".into(), Meta::U32(256)),
        ("tokenizer.ggml.eos_token_id".into(), Meta::U32(259)),
        ("tokenizer.chat_template".into(), Meta::Str(CHATML.into())),
    ];
    let mut head = b"GGUF".to_vec();
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut head, k);
        put_meta(&mut head, v);
    }
    // The tensor table; each tensor's data starts on a 32-byte boundary.
    let size = |dims: &[usize], matrix: bool| -> u64 {
        let n = dims.iter().product::<usize>() as u64;
        if matrix {
            n / block as u64 * block_bytes as u64
        } else {
            n * 4
        }
    };
    let mut offset = 0u64;
    for (name, dims, matrix) in &tensors {
        put_str(&mut head, name);
        head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for &d in dims {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&(if *matrix { type_id } else { 0 }).to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + size(dims, *matrix)).div_ceil(32) * 32;
    }
    head.resize(head.len().div_ceil(32) * 32, 0);
    let mut w = BufWriter::with_capacity(8 << 20, std::fs::File::create(path).map_err(io)?);
    w.write_all(&head).map_err(io)?;
    // Matrices in chunks of about 64 MiB, each chunk generated on all cores from its own seed.
    let chunk = (64 << 20) / block_bytes * block_bytes;
    let mut buf = Vec::new();
    for (i, (_, dims, matrix)) in tensors.iter().enumerate() {
        let bytes = size(dims, *matrix) as usize;
        if *matrix {
            for (c, start) in (0..bytes).step_by(chunk).enumerate() {
                buf.resize((bytes - start).min(chunk), 0);
                let tseed = mix(seed ^ mix(((i as u64) << 32) | c as u64));
                buf.par_chunks_mut((1 << 20) / block_bytes * block_bytes)
                    .enumerate()
                    .for_each(|(k, part)| fill(dtype, mix(tseed ^ k as u64), part));
                w.write_all(&buf).map_err(io)?;
            }
        } else {
            // Norm weights 1, biases 0.
            let one = if tensors[i].0.ends_with(".bias") { 0.0f32 } else { 1.0 };
            for _ in 0..bytes / 4 {
                w.write_all(&one.to_le_bytes()).map_err(io)?;
            }
        }
        let pad = bytes.div_ceil(32) * 32 - bytes;
        w.write_all(&[0u8; 32][..pad]).map_err(io)?;
        progress(i + 1, tensors.len());
    }
    w.flush().map_err(io)?;
    let end = w.stream_position().map_err(io)?;
    Ok(end)
}

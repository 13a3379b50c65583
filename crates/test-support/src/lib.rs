//! Shared helpers for tests: where the models and the reference data live, and loaders for them.
//!
//! Tests that need a real model fail with a message that says how to fetch it (`scripts/fetch-model.sh`),
//! never skip silently.

pub mod golden;
pub mod rng;
pub mod tiny;

use std::path::{Path, PathBuf};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

fn model(file: &str, fetch_arg: &str) -> PathBuf {
    let dir = std::env::var_os("MLX_SERVING_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models"));
    let p = dir.join(file);
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh {fetch_arg}", p.display());
    p
}

/// The default model: SmolLM2-135M-Instruct, GGUF Q4_1.
pub fn smollm2_path() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
}

/// Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M.
pub fn qwen2_path() -> PathBuf {
    model("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-0.5b")
}

/// Gemma-3-270M (base), GGUF Q4_K_M.
pub fn gemma3_path() -> PathBuf {
    model("gemma-3-270m-q4_k_m.gguf", "gemma3-270m")
}

/// A Hugging Face directory written from one of the GGUFs by `scripts/make-hf-dir.py` (the `gguf` package's
/// dequantizer, not our code): `SmolLM2-135M-Instruct-f32`, `SmolLM2-135M-Instruct-bf16`,
/// `Qwen2.5-Coder-0.5B-Instruct-bf16`.
pub fn hf_dir(name: &str) -> PathBuf {
    let p = model("hf", "hf").join(name);
    assert!(p.join("model.safetensors").is_file(), "{} is missing: run scripts/fetch-model.sh hf", p.display());
    p
}

/// An MLX-quantized directory written by mlx-lm's own `convert` (group 64) from the bf16 Hugging Face directory:
/// with f32 scales `SmolLM2-135M-Instruct-4bit`, `SmolLM2-135M-Instruct-8bit` (mlx-lm's greedy ids on them:
/// `reference("mlx-lm-greedy-NAME.json")`); with mlx-lm's default bf16 scales `SmolLM2-135M-Instruct-4bit-bf16`,
/// `SmolLM2-135M-Instruct-8bit-bf16`, `Qwen2.5-Coder-0.5B-Instruct-4bit-bf16` (the shared references
/// `greedy-*-mlx-lm-*.json`).
pub fn mlx_dir(name: &str) -> PathBuf {
    let p = model("mlx", "mlx").join(name);
    assert!(p.join("model.safetensors").is_file(), "{} is missing: run scripts/fetch-model.sh mlx", p.display());
    p
}

/// SmolVLM-rand: an Idefics3 (SmolVLM) directory with the real SmolLM2-135M-Instruct text model and a random
/// 3-layer SigLIP-style vision tower (`scripts/fetch-model.sh smolvlm-rand`; mlx-vlm's greedy ids on it:
/// `reference("greedy-SmolVLM-rand-mlx-vlm.json")`, images in `testdata/images`).
pub fn smolvlm_dir() -> PathBuf {
    let p = model("SmolVLM-rand", "smolvlm-rand");
    assert!(
        p.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-model.sh smolvlm-rand",
        p.display()
    );
    p
}

/// Qwen2.5-VL-rand: a tiny random-weight Qwen2.5-VL directory (`scripts/fetch-model.sh qwen25vl-rand`, written
/// by testdata/vlm/make_qwen25vl.py; transformers' outputs on it: `reference("qwen25vl-rand-transformers.json")`).
pub fn qwen25vl_dir() -> PathBuf {
    let p = model("Qwen2.5-VL-rand", "qwen25vl-rand");
    assert!(
        p.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-model.sh qwen25vl-rand",
        p.display()
    );
    p
}

pub fn testdata() -> PathBuf {
    workspace_root().join("testdata")
}

/// A reference JSON file from `testdata/reference/`.
pub fn reference(name: &str) -> serde_json::Value {
    let p = testdata().join("reference").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The Hugging Face tokenizer for `model` (`SmolLM2-135M-Instruct` or `Qwen2.5-Coder-0.5B-Instruct`).
pub fn reference_tokenizer(model: &str) -> tokenizers::Tokenizer {
    use std::io::Read;
    let p = testdata().join("tokenizers").join(model).join("tokenizer.json.gz");
    let file = std::fs::File::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(file).read_to_end(&mut json).expect("gunzip tokenizer.json");
    tokenizers::Tokenizer::from_bytes(&json).expect("parse tokenizer.json")
}

/// The model's chat template as Hugging Face ships it.
pub fn reference_chat_template(model: &str) -> String {
    let p = testdata().join("tokenizers").join(model).join("chat_template.jinja");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The fuzzers' seeds and findings for `target` (`fuzz/seeds/<target>`, `fuzz/regressions/<target>`), for
/// regression tests that replay them on stable; panics when there are none.
pub fn fuzz_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(workspace_root().join("fuzz").join(kind).join(target)) else { continue };
        for e in dir.flatten() {
            out.push((e.path(), std::fs::read(e.path()).unwrap()));
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no seeds for `{target}` under fuzz/seeds");
    out
}

//! Entry points for coverage-guided fuzzing (`fuzz/`, run by `scripts/fuzz.sh`) and for the regression tests
//! that replay every input the fuzzers found (`tests/fuzz_regressions.rs`): each takes untrusted bytes and
//! reads them the way a model load or a request does. Any outcome but a panic, a hang or an allocation
//! beyond the input's size is a pass: errors are the expected answer to malformed input.

use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::hf::HfDir;
use crate::source::TensorSource;
use crate::ChatTemplate;
use serde_json::{json, Value};
use std::path::PathBuf;

/// Tensors larger than this are not dequantized (their extents and shapes are still checked).
const MAX_DEQUANT_ELEMS: usize = 1 << 20;

/// A scratch directory of this process (tmpfs where there is one).
fn scratch() -> PathBuf {
    let base = match std::path::Path::new("/dev/shm").is_dir() {
        true => PathBuf::from("/dev/shm"),
        false => std::env::temp_dir(),
    };
    let dir = base.join(format!("mlx-serving-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Reads every tensor the decoder would load, dequantizing the small ones.
fn read_tensors(cfg: &ModelConfig, src: &dyn TensorSource) {
    for (name, shape) in cfg.tensor_shapes() {
        if let Ok(t) = src.tensor_data(&name, &shape) {
            if shape.iter().product::<usize>() <= MAX_DEQUANT_ELEMS {
                let _ = t.to_f32();
            }
        }
    }
}

/// `data` as a GGUF file: its header and tensor table, the model configuration and tokenizer built from its
/// metadata, its chat template rendered, and its tensors read.
pub fn gguf(data: &[u8]) {
    let path = scratch().join("model.gguf");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(g) = GgufFile::open(&path) {
        if let Ok(t) = crate::tokenizer_from_gguf(&g) {
            let _ = t.encode("Hello <|im_start|>world 123", true);
        }
        let _ = crate::SpecialTokens::from_gguf(&g);
        if let Ok(Some(src)) = g.get_str_opt("tokenizer.chat_template") {
            render(src, &json!([{"role": "user", "content": "Hi"}]));
        }
        if let Ok(cfg) = ModelConfig::from_gguf(&g) {
            read_tensors(&cfg, &g);
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// A Hugging Face directory from `data`: `config.json`, then after a NUL byte `model.safetensors.index.json`
/// (absent when empty), then after another NUL byte `model.safetensors` (the rest, any bytes).
pub fn hf_dir(data: &[u8]) {
    let dir = scratch().join("hf");
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let mut parts = data.splitn(3, |&b| b == 0);
    let (config, index, weights) =
        (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let _ = std::fs::write(dir.join("config.json"), config);
    if !index.is_empty() {
        let _ = std::fs::write(dir.join("model.safetensors.index.json"), index);
    }
    let _ = std::fs::write(dir.join("model.safetensors"), weights);
    if let Ok(hf) = HfDir::open(&dir) {
        if let Ok(cfg) = hf.model_config() {
            read_tensors(&cfg, &hf);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A chat template (the bytes before the first NUL) rendering messages (the JSON after it; a fixed
/// conversation when that is not JSON), with and without tools.
pub fn chat_template(data: &[u8]) {
    let mut parts = data.splitn(2, |&b| b == 0);
    let src = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let messages = parts.next().and_then(|m| serde_json::from_slice::<Value>(m).ok()).unwrap_or_else(|| {
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
                "function": {"name": "f", "arguments": {"x": 1}}}]}, {"role": "tool", "content": "2"}])
    });
    render(&src, &messages);
}

fn render(src: &str, messages: &Value) {
    if let Ok(t) = ChatTemplate::new(src, "<s>", "</s>") {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let _ = t.render(messages, None::<&Value>, true);
        let _ = t.render(messages, Some(&tools), false);
    }
}

//! Hugging Face directories that are broken in the ways users' directories break: each is a one-line error
//! naming the file and the tensor or key, never a panic. (Real directories are golden-tested in the runner.)

use mlx_serving_models::hf::HfDir;
use mlx_serving_models::{LoadOptions, Model};
use serde_json::{json, Value};
use std::path::Path;

const H: usize = 8;
const FFN: usize = 16;
const VOCAB: usize = 32;

fn config() -> Value {
    json!({"model_type": "llama", "hidden_size": H, "intermediate_size": FFN, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": VOCAB,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": true})
}

/// A tiny llama's tensors (tied head), with small deterministic values.
fn tensors() -> Vec<(String, Vec<usize>)> {
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, H]), ("model.norm.weight".into(), vec![H])];
    let l = "model.layers.0";
    for (name, shape) in [
        ("input_layernorm.weight", vec![H]),
        ("post_attention_layernorm.weight", vec![H]),
        ("self_attn.q_proj.weight", vec![H, H]),
        ("self_attn.k_proj.weight", vec![4, H]),
        ("self_attn.v_proj.weight", vec![4, H]),
        ("self_attn.o_proj.weight", vec![H, H]),
        ("mlp.gate_proj.weight", vec![FFN, H]),
        ("mlp.up_proj.weight", vec![FFN, H]),
        ("mlp.down_proj.weight", vec![H, FFN]),
    ] {
        t.push((format!("{l}.{name}"), shape));
    }
    t
}

/// Writes `tensors` as one f32 safetensors file.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>)]) {
    let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let n: usize = shape.iter().product();
        let start = data.len();
        for j in 0..n {
            data.extend_from_slice(&(((i * 7 + j) % 13) as f32 * 0.05 - 0.3).to_le_bytes());
        }
        header.insert(name.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let head = Value::Object(header).to_string();
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn dir_with(config: Value, tensors: &[(String, Vec<usize>)]) -> tempdir::Dir {
    let d = tempdir::Dir::new();
    std::fs::write(d.path().join("config.json"), config.to_string()).unwrap();
    write_safetensors(&d.path().join("model.safetensors"), tensors);
    d
}

fn load(dir: &Path) -> Result<Model, String> {
    let hf = HfDir::open(dir).map_err(|e| e.to_string())?;
    let cfg = hf.model_config().map_err(|e| e.to_string())?;
    Model::from_source(&hf, cfg, &LoadOptions::default(), &candle_core::Device::Cpu).map_err(|e| e.to_string())
}

fn error(dir: &Path) -> String {
    let e = load(dir).expect_err("the directory must not load");
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

#[test]
fn a_tiny_directory_loads() {
    let d = dir_with(config(), &tensors());
    let m = load(d.path()).unwrap();
    assert_eq!(m.config().num_layers, 1);
    assert!(m.config().tie_word_embeddings);
}

#[test]
fn broken_directories_are_one_line_errors_naming_what_is_wrong() {
    // Unsupported architecture.
    let mut c = config();
    c["model_type"] = json!("mamba");
    let e = error(dir_with(c, &tensors()).path());
    assert!(e.contains("config.json") && e.contains("mamba"), "{e}");
    // Quantization we do not read: another method, or MLX widths other than 2, 4 and 8 bits.
    let mut c = config();
    c["quantization_config"] = json!({"quant_method": "gptq", "bits": 4});
    let e = error(dir_with(c, &tensors()).path());
    assert!(e.contains("config.json") && e.contains("gptq"), "{e}");
    let mut c = config();
    c["quantization"] = json!({"group_size": 64, "bits": 3});
    let e = error(dir_with(c, &tensors()).path());
    assert!(e.contains("config.json") && e.contains("quantization"), "{e}");
    // A missing key.
    let mut c = config();
    c.as_object_mut().unwrap().remove("hidden_size");
    assert!(error(dir_with(c, &tensors()).path()).contains("hidden_size"));
    // A missing tensor.
    let mut t = tensors();
    t.retain(|(n, _)| !n.contains("up_proj"));
    let e = error(dir_with(config(), &t).path());
    assert!(e.contains("model.layers.0.mlp.up_proj.weight"), "{e}");
    // A shape that disagrees with the config.
    let mut t = tensors();
    t.iter_mut().find(|(n, _)| n.contains("q_proj")).unwrap().1 = vec![H, H + 1];
    let e = error(dir_with(config(), &t).path());
    assert!(e.contains("model.safetensors") && e.contains("q_proj") && e.contains("shape"), "{e}");
    // Truncated weights.
    let d = dir_with(config(), &tensors());
    let f = d.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 100).unwrap();
    let e = error(d.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    // Not a safetensors file at all.
    let d = dir_with(config(), &tensors());
    std::fs::write(d.path().join("model.safetensors"), b"hello").unwrap();
    assert!(error(d.path()).contains("model.safetensors"));
    // A shard the index names is missing.
    let d = dir_with(config(), &tensors());
    let index = json!({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                                      "lm_head.weight": "model-00002-of-00002.safetensors"}});
    std::fs::write(d.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = error(d.path());
    assert!(e.contains("model-00001-of-00002.safetensors"), "{e}");
}

/// #25 security pass: the index's shard names could leave the directory (`../x`, `/etc/x`), so a model
/// directory could make the loader map any file; data offsets near 2^64 overflowed the truncation check; and
/// sizes past any real model (2^40 layers) made the loader allocate for them. Each is now a one-line error.
#[test]
fn hostile_indexes_offsets_and_sizes_are_refused() {
    for shard in ["../model.safetensors", "/etc/hostname", "sub/model.safetensors", ".."] {
        let d = dir_with(config(), &tensors());
        let index = json!({"weight_map": {"model.norm.weight": shard}});
        std::fs::write(d.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = error(d.path());
        assert!(e.contains("weight_map") && e.contains("not a file name"), "{shard}: {e}");
    }
    let d = dir_with(config(), &tensors());
    let head = json!({"x": {"dtype": "F32", "shape": [2], "data_offsets": [u64::MAX - 8, u64::MAX]}}).to_string();
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(head.as_bytes());
    std::fs::write(d.path().join("model.safetensors"), bytes).unwrap();
    let e = error(d.path());
    assert!(e.contains("truncated") || e.contains("data_offsets"), "{e}");
    for (key, v) in [("num_hidden_layers", 1u64 << 40), ("vocab_size", 1 << 40), ("intermediate_size", 0)] {
        let mut c = config();
        c[key] = json!(v);
        let e = error(dir_with(c, &tensors()).path());
        assert!(e.contains(key) && e.contains("is not a size"), "{key}: {e}");
    }
}

/// A temporary directory removed on drop (no extra crates).
mod tempdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "mlx-serving-hf-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

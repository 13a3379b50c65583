//! Bad model files give errors that name the file and the problem, never a panic.

use mlx_serving_models::{Error, LoadOptions, Model};
use mlx_serving_test_support::tiny::TinyLlama;

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mlx-serving-gguf-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn tiny_model_loads() {
    let p = tmp("ok.gguf");
    TinyLlama::default().write(&p, &[]);
    let m = Model::load_gguf(&p, &LoadOptions::default()).expect("tiny model loads");
    assert_eq!(m.config().num_layers, 2);
    assert!(m.config().tie_word_embeddings);
}

#[test]
fn truncated_file_names_the_tensor() {
    let p = tmp("truncated.gguf");
    TinyLlama::default().write(&p, &[]);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let err = Model::load_gguf(&p, &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::BadTensor { .. }), "{msg}");
    assert!(msg.contains("truncated") && msg.contains("truncated.gguf") && msg.contains(".weight"), "{msg}");
}

#[test]
fn truncated_header_is_a_clear_error() {
    let p = tmp("header.gguf");
    TinyLlama::default().write(&p, &[]);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..40]).unwrap();
    let err = Model::load_gguf(&p, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::BadGguf { .. }), "{err}");
    assert!(err.to_string().contains("header.gguf"), "{err}");
}

#[test]
fn wrong_magic_is_not_gguf() {
    let p = tmp("magic.gguf");
    std::fs::write(&p, b"PK\x03\x04 this is a zip, not a model").unwrap();
    let err = Model::load_gguf(&p, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::NotGguf { .. }), "{err}");
    assert!(err.to_string().contains("magic"), "{err}");
    std::fs::write(&p, b"GG").unwrap();
    assert!(matches!(Model::load_gguf(&p, &LoadOptions::default()).unwrap_err(), Error::NotGguf { .. }));
}

#[test]
fn missing_tensor_is_named() {
    let p = tmp("missing.gguf");
    TinyLlama::default().write(&p, &["blk.1.ffn_up.weight"]);
    let err = Model::load_gguf(&p, &LoadOptions::default()).unwrap_err();
    match &err {
        Error::MissingTensor { name, .. } => assert_eq!(name, "blk.1.ffn_up.weight"),
        other => panic!("expected MissingTensor, got {other}"),
    }
    assert!(err.to_string().contains("missing.gguf"));
}

#[test]
fn missing_file_is_an_io_error_with_the_path() {
    let err = Model::load_gguf("/nonexistent/model.gguf", &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn unsupported_architecture_is_named() {
    let p = tmp("arch.gguf");
    TinyLlama { arch: "mamba", ..TinyLlama::default() }.write(&p, &[]);
    let err = Model::load_gguf(&p, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::UnsupportedArchitecture { .. }) && err.to_string().contains("mamba"), "{err}");
}

/// Found by the `gguf` fuzzer (`fuzz/regressions/gguf/oom-909b…`): a header claiming 134,217,729 layers made
/// the loader list (and allocate for) every layer's tensors until it ran out of memory. Sizes past any real
/// model's are now refused at once, naming the key.
#[test]
fn a_header_claiming_a_huge_model_is_refused_without_allocating() {
    let p = mlx_serving_test_support::workspace_root()
        .join("fuzz/regressions/gguf/oom-909b8bdaeff29865f9eb4f931f2cca09856472dc");
    let err = Model::load_gguf(&p, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::BadMetadata { .. }), "{err}");
    assert!(err.to_string().contains("llama.block_count") && err.to_string().contains("134217729"), "{err}");
}

/// A GGUF v3 header with no tensors and these metadata entries (each key with a u32 value).
fn header_with(entries: &[(&str, u32)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (k, v) in entries {
        b.extend_from_slice(&(k.len() as u64).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(&4u32.to_le_bytes()); // GGUF value type 4: u32
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// `general.alignment: 0` made candle's header reader divide by zero (a panic, not an error).
#[test]
fn a_zero_alignment_is_an_error() {
    let p = tmp("align0.gguf");
    std::fs::write(&p, header_with(&[("general.alignment", 0)])).unwrap();
    let err = mlx_serving_models::GgufFile::open(&p).unwrap_err();
    assert!(matches!(err, Error::BadGguf { .. }) && err.to_string().contains("alignment"), "{err}");
    std::fs::write(&p, header_with(&[("general.alignment", 32)])).unwrap();
    assert!(mlx_serving_models::GgufFile::open(&p).is_ok());
}

/// #25: a header claiming 2^60 tensors (or a string or array longer than the file) is refused before
/// anything is allocated for it.
#[test]
fn counts_and_lengths_past_the_file_are_refused() {
    let p = tmp("counts.gguf");
    let mut b = header_with(&[]);
    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let err = mlx_serving_models::GgufFile::open(&p).unwrap_err();
    assert!(matches!(err, Error::BadGguf { .. }) && err.to_string().contains("cannot fit"), "{err}");
    // One metadata entry whose key claims 2^50 bytes.
    let mut b = header_with(&[("general.alignment", 32)]);
    b[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let err = mlx_serving_models::GgufFile::open(&p).unwrap_err();
    assert!(matches!(err, Error::BadGguf { .. }) && err.to_string().contains("remain"), "{err}");
}

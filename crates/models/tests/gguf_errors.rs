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

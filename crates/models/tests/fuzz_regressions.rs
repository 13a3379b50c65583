//! The fuzzers' seeds and every input they found (`fuzz/seeds/<target>`, `fuzz/regressions/<target>`),
//! replayed on stable through the entry points the fuzz targets call (`mlx_serving_models::fuzzing`): none may
//! panic. `scripts/fuzz.sh` adds each new crash to `fuzz/regressions/` (the findings so far also have a
//! named test in `gguf_errors.rs` / `hf_dir.rs`).

use mlx_serving_models::export::{export_hf, ExportDtype};
use mlx_serving_models::fuzzing;
use mlx_serving_test_support::tiny::TinyLlama;
use mlx_serving_test_support::{fuzz_inputs, workspace_root};

fn replay(target: &str, f: fn(&[u8])) {
    for (path, data) in fuzz_inputs(target) {
        eprintln!("{}", path.display());
        f(&data);
    }
}

#[test]
fn gguf_inputs_replay_without_panics() {
    replay("gguf", fuzzing::gguf);
}

#[test]
fn hf_dir_inputs_replay_without_panics() {
    replay("hf_dir", fuzzing::hf_dir);
}

#[test]
fn chat_template_inputs_replay_without_panics() {
    replay("chat_template", fuzzing::chat_template);
}

/// Writes the seeds of the model targets (`cargo test -p mlx-serving-models --test fuzz_regressions --
/// --ignored`): tiny random-weight models as GGUF (three architectures) and as a Hugging Face directory, and
/// the reference chat templates with a conversation.
#[test]
#[ignore]
fn write_seeds() {
    let root = workspace_root().join("fuzz").join("seeds");
    let tmp = std::env::temp_dir().join(format!("mlx-serving-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let small =
        |arch| TinyLlama { layers: 1, hidden: 32, ffn: 32, heads: 2, kv_heads: 1, arch, ..TinyLlama::default() };
    std::fs::create_dir_all(root.join("gguf")).unwrap();
    for arch in ["llama", "qwen2", "qwen3"] {
        let path = tmp.join(format!("{arch}.gguf"));
        small(arch).write(&path, &[]);
        std::fs::copy(&path, root.join("gguf").join(format!("tiny-{arch}"))).unwrap();
    }
    let hf = tmp.join("hf");
    export_hf(&tmp.join("llama.gguf"), &hf, ExportDtype::F16, |_, _| {}).unwrap();
    let mut seed = std::fs::read(hf.join("config.json")).unwrap();
    seed.extend_from_slice(b"\0\0");
    seed.extend_from_slice(&std::fs::read(hf.join("model.safetensors")).unwrap());
    std::fs::create_dir_all(root.join("hf_dir")).unwrap();
    std::fs::write(root.join("hf_dir").join("tiny-llama-f16"), seed).unwrap();
    std::fs::create_dir_all(root.join("chat_template")).unwrap();
    let messages = br#"[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"},{"role":"user","content":"Bye"}]"#;
    // Hostile ones too: unbounded recursion and a loop far past the fuel.
    let hostile = [
        ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}".to_string()),
        ("loop", "{% for i in range(1000000) %}{% for j in range(1000000) %}x{% endfor %}{% endfor %}".to_string()),
    ];
    let real = ["SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"]
        .map(|m| (m, mlx_serving_test_support::reference_chat_template(m)));
    for (name, t) in real.into_iter().chain(hostile) {
        let model = name;
        let mut seed = t.into_bytes();
        seed.push(0);
        seed.extend_from_slice(messages);
        std::fs::write(root.join("chat_template").join(model), seed).unwrap();
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

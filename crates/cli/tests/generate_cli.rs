//! `mlx-serving generate` as users run it: the `--json` contract and chat input.

use mlx_serving_test_support::{reference, smollm2_path};
use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    run_env(args, &[])
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let model = smollm2_path();
    Command::new(env!("CARGO_BIN_EXE_mlx-serving"))
        .envs(env.iter().copied())
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args(["--threads", "2"])
        .args(args)
        .output()
        .expect("run mlx-serving")
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// With f32 activations and KV cache the arithmetic is the float32 reference's: the tokens are its tokens.
#[test]
fn json_output_has_the_documented_fields_and_reference_tokens() {
    let out = run(&[
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "10",
        "--json",
        "--activations",
        "f32",
        "--kv-cache-dtype",
        "f32",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let refs = reference("greedy-SmolLM2-135M-Instruct-transformers-f32.json");
    let item = &refs["items"][0];
    assert_eq!(ids(&v["prompt_token_ids"]), ids(&item["prompt_ids"]));
    assert_eq!(ids(&v["token_ids"]), ids(&item["output_ids"])[..10]);
    assert_eq!(v["text"], " Paris.\n\nThe answer is: 2");
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 10);
    // The fields scripts/ab-core.sh, bench-core.sh and vs-llama.sh read.
    for key in ["prompt_tokens_per_second", "decode_tokens_per_second", "prompt_ms", "decode_ms"] {
        assert!(v["timings"][key].as_f64().is_some_and(|x| x > 0.0), "timings.{key} in {v}");
    }
}

/// The portable kernels (what a CPU without AVX2 runs) give the same reference tokens.
#[test]
fn portable_kernels_give_the_reference_tokens() {
    let args = ["--prompt", "The capital of France is", "--max-tokens", "10", "--json"];
    let exact = ["--activations", "f32", "--kv-cache-dtype", "f32"];
    let out = run_env(&[&args[..], &exact[..]].concat(), &[("MLX_SERVING_ISA", "portable")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["isa"], "portable", "the portable kernels ran");
    let refs = reference("greedy-SmolLM2-135M-Instruct-transformers-f32.json");
    assert_eq!(ids(&v["token_ids"]), ids(&refs["items"][0]["output_ids"])[..10]);
    // The default numerics on the portable path: the same arithmetic per block as the AVX2 kernels, summed
    // in another order; the reference logit gaps over this prompt's first five tokens are all ≥ 0.84.
    let portable = run_env(&args, &[("MLX_SERVING_ISA", "portable")]);
    let native = run(&args);
    let (p, n): (serde_json::Value, serde_json::Value) =
        (serde_json::from_slice(&portable.stdout).unwrap(), serde_json::from_slice(&native.stdout).unwrap());
    assert_eq!(p["isa"], "portable");
    assert_eq!(ids(&p["token_ids"])[..5], ids(&n["token_ids"])[..5], "portable {p} vs native {n}");
}

#[test]
fn chat_input_uses_the_template_and_stops_at_end_of_turn() {
    let chat = r#"[{"role":"user","content":"What is the capital of France?"}]"#;
    let out = run(&["--chat", chat, "--max-tokens", "40", "--json", "--activations", "f32", "--kv-cache-dtype", "f32"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let refs = reference("greedy-SmolLM2-135M-Instruct-transformers-f32.json");
    let item = refs["items"].as_array().unwrap().iter().find(|i| i["kind"] == "chat").unwrap();
    assert_eq!(ids(&v["prompt_token_ids"]), ids(&item["prompt_ids"]));
    assert_eq!(v["finish_reason"], "stop");
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
}

#[test]
fn bad_input_is_a_clear_error_not_a_crash() {
    let out = run(&["--chat", "not json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--chat must be a JSON array"));
    let out = run(&["--prompt", "hi", "--temperature", "5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));
}

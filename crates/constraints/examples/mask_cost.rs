//! Per-token mask cost on real vocabularies: for every schema of `testdata/schemas`, each valid example is fed
//! token by token and the allowed-token mask is computed before each token (what a decode step pays per
//! constrained sequence). Prints the median, p90, p99 and max per vocabulary.
//! `cargo run --release -p mlx-serving-constraints --example mask_cost -- MODEL...` (GGUF files or directories).

use mlx_serving_constraints::{Spec, Vocab};
use mlx_serving_engine::ConstraintState;
use mlx_serving_models::{LoadOptions, ModelBundle};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/schemas");
    let mut files: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    for model in std::env::args().skip(1) {
        let bundle = Arc::new(ModelBundle::load(&model, &LoadOptions::default()).expect("model"));
        let t0 = Instant::now();
        let vocab = Vocab::for_model(&bundle).expect("vocab");
        let build = t0.elapsed();
        let (mut times, mut compile, mut advances) = (Vec::new(), Vec::new(), Vec::new());
        for f in &files {
            let case: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
            let t = Instant::now();
            let c = vocab.compile(&Spec::JsonSchema(case["schema"].clone())).expect("schema");
            compile.push(t.elapsed());
            for v in case["valid"].as_array().unwrap() {
                let ids = bundle.tokenizer.encode(v.to_string(), false).unwrap().get_ids().to_vec();
                let mut st = c.matcher().unwrap();
                for id in ids {
                    let t = Instant::now();
                    let mask = st.allowed().unwrap();
                    times.push(t.elapsed());
                    assert!(mlx_serving_engine::mask_allows(&mask, id));
                    let t = Instant::now();
                    st.advance(id).unwrap();
                    advances.push(t.elapsed());
                }
            }
        }
        let pct = |v: &mut Vec<Duration>, p: f64| {
            v.sort();
            v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6
        };
        println!(
            "{}: vocabulary {} tokens, built in {:.0} ms; {} masks: median {:.0} us, p90 {:.0} us, p99 {:.0} us, max {:.0} us; \
             advancing past a token: median {:.0} us, p99 {:.0} us; {} schemas compiled: median {:.2} ms, max {:.2} ms",
            std::path::Path::new(&model).file_name().unwrap().to_string_lossy(),
            vocab.vocab_size(),
            build.as_secs_f64() * 1e3,
            times.len(),
            pct(&mut times, 0.5),
            pct(&mut times, 0.9),
            pct(&mut times, 0.99),
            pct(&mut times, 1.0),
            pct(&mut advances, 0.5),
            pct(&mut advances, 0.99),
            compile.len(),
            pct(&mut compile, 0.5) / 1e3,
            pct(&mut compile, 1.0) / 1e3,
        );
    }
}

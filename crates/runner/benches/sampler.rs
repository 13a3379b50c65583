//! The CPU sampler on one row of logits at real vocabulary sizes (SmolLM2's 49,152, Llama 3's 128,256): greedy,
//! temperature alone, top-k, top-p, and the usual combination. Each sampled row of a step costs this on the
//! engine's thread (a GPU step copies the logits of such rows back for it).
//!
//! `cargo bench -p mlx-serving-runner --bench sampler`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use mlx_serving_engine::SamplingParams;
use mlx_serving_runner::Sampler;
use mlx_serving_test_support::rng::lm_logits;

fn bench(c: &mut Criterion) {
    let greedy = SamplingParams::greedy(16);
    let configs = [
        ("greedy", greedy.clone()),
        ("temperature", SamplingParams { temperature: 0.8, seed: Some(1), ..greedy.clone() }),
        ("top_k_40", SamplingParams { temperature: 0.8, top_k: 40, seed: Some(1), ..greedy.clone() }),
        ("top_p_0.9", SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(1), ..greedy.clone() }),
        ("top_p_0.95_top_k_50", SamplingParams { temperature: 0.7, top_p: 0.95, top_k: 50, seed: Some(1), ..greedy }),
    ];
    for vocab in [49_152, 128_256] {
        let row = lm_logits(vocab);
        let mut g = c.benchmark_group(format!("sample_{vocab}"));
        for (name, params) in &configs {
            let mut s = Sampler::new(params);
            let mut buf = row.clone();
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| {
                    buf.copy_from_slice(&row);
                    black_box(s.sample(&mut buf, &[], &[]))
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

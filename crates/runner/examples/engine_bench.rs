//! Aggregate decode throughput of the engine at several concurrency levels, and time to first token with
//! a cached vs cold 1,024-token prefix. A benchmark, not a test: it prints numbers and asserts nothing.
//!
//! cargo run --release -p mlx-serving-runner --example engine_bench -- [threads]

use mlx_serving_engine::{EngineCore, EngineHandle, EngineRequest, Priority, RequestId, SamplingParams};
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::ModelExecutor;
use mlx_serving_test_support::{reference, smollm2_path};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Runs the requests concurrently; returns (wall seconds, first-token seconds per request).
fn run(h: &EngineHandle, prompts: &[Vec<u32>], max_tokens: u32) -> (f64, Vec<f64>) {
    let start = Instant::now();
    let mut rxs = Vec::new();
    for p in prompts {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(max_tokens) };
        let id = RequestId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
        h.add_request(
            EngineRequest {
                id,
                prompt_token_ids: p.clone(),
                params: Arc::new(params),
                priority: Priority::Normal,
                deadline: None,
                constraint: None,
                mm_inputs: Vec::new(),
            },
            tx,
        )
        .expect("admitted");
        rxs.push(rx);
    }
    let mut ttfts = Vec::new();
    for mut rx in rxs {
        let mut first = None;
        while let Some(o) = rx.blocking_recv() {
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
            if o.finish_reason.is_some() {
                break;
            }
        }
        ttfts.push(first.unwrap_or(0.0));
    }
    (start.elapsed().as_secs_f64(), ttfts)
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("pool");
    mlx_serving_kernels::pool::set_threads(threads);
    let bundle = Arc::new(ModelBundle::load(smollm2_path(), &LoadOptions::default()).expect("load"));
    let refs = reference("greedy-SmolLM2-135M-Instruct-transformers-f32.json");
    let prompts: Vec<Vec<u32>> = refs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
        .collect();
    let mut cfg = ModelExecutor::scheduler_config(&bundle, 16, 256 << 20);
    cfg.max_num_seqs = 16;
    let exec = ModelExecutor::new(bundle.clone(), cfg.block_size, cfg.num_blocks);
    let (h, _join) = EngineCore::spawn(cfg, exec);
    run(&h, &prompts[..1], 8); // warm-up
    println!("threads={threads}, 128 output tokens per request, distinct prompts");
    let mut single = 0.0;
    for c in [1usize, 2, 4, 8, 16] {
        let ps: Vec<Vec<u32>> = prompts.iter().cycle().take(c).cloned().collect();
        let (wall, _) = run(&h, &ps, 128);
        let tps = (c * 128) as f64 / wall;
        if c == 1 {
            single = tps;
        }
        println!(
            "concurrency {c:2}: {tps:7.1} output tok/s aggregate ({:.2}x single stream), wall {wall:.2} s",
            tps / single
        );
    }
    // Memory: resident set before and after 1,000 short requests (in waves of 16).
    let rss_kib = || -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    };
    let before = rss_kib();
    let mut done = 0;
    while done < 1000 {
        let wave = 16.min(1000 - done);
        let ps: Vec<Vec<u32>> = prompts.iter().cycle().skip(done % prompts.len()).take(wave).cloned().collect();
        run(&h, &ps, 4);
        done += wave;
    }
    let after = rss_kib();
    let kv = h.stats().kv_usage_ppm.load(Ordering::Relaxed) as f64 / 1e4;
    println!(
        "RSS before 1,000 requests {} MiB, after {} MiB; KV blocks in use afterwards {kv:.1}%",
        before / 1024,
        after / 1024
    );
    // TTFT with a 1,024-token prefix: cold, then the same prefix (different last tokens) again.
    let long: Vec<u32> = prompts.concat().into_iter().cycle().take(1024).collect();
    let with_tail = |t: u32| -> Vec<u32> { long.iter().copied().chain([t, t + 1]).collect() };
    let (_, cold) = run(&h, &[with_tail(100)], 1);
    let (_, warm) = run(&h, &[with_tail(200)], 1);
    println!(
        "TTFT 1,026-token prompt: cold {:.3} s, 1,024-token prefix cached {:.3} s ({:.3}x)",
        cold[0],
        warm[0],
        warm[0] / cold[0]
    );
}

//! The `mlx-serving` binary: parses the command line and runs a subcommand.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mlx_serving_engine::SamplingParams;
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::{generate, GenerateOptions};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "mlx-serving",
    version,
    about = "An LLM serving engine: GGUF models on the CPU, OpenAI-compatible API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate text from a prompt or a chat, streaming it to stdout.
    Generate(GenerateArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// GGUF model file (default: the model scripts/fetch-model.sh fetches).
    #[arg(long, env = "MLX_SERVING_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Model name clients use (default: the file name without .gguf).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long, env = "MLX_SERVING_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "MLX_SERVING_PORT", default_value_t = 8080)]
    port: u16,
    /// CPU threads for the model (default: all cores).
    #[arg(long, env = "MLX_SERVING_THREADS")]
    threads: Option<usize>,
    /// KV cache budget in MiB (preallocated).
    #[arg(long, env = "MLX_SERVING_KV_CACHE_MB", default_value_t = 512)]
    kv_cache_mb: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 16)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Requests allowed to wait before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_waiting_requests: usize,
    #[arg(long)]
    no_prefix_caching: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat"])))]
struct GenerateArgs {
    /// GGUF model file.
    #[arg(long, env = "MLX_SERVING_MODEL")]
    model: PathBuf,
    /// Raw text prompt (no chat template).
    #[arg(long)]
    prompt: Option<String>,
    /// Chat as a JSON array of {"role", "content"} messages, rendered with the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 means off.
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable); not included in the output.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (prompt_token_ids, token_ids, text, finish_reason, usage, timings) instead of streaming.
    #[arg(long)]
    json: bool,
    /// CPU threads (default: all cores).
    #[arg(long, env = "MLX_SERVING_THREADS")]
    threads: Option<usize>,
    /// Dequantize all weights to f32 at load (slow; matches float32 references closely).
    #[arg(long)]
    dequantize: bool,
    /// Experimental: round activations to 8 bits in Q4_1 matmuls (faster, less accurate).
    #[arg(long)]
    int8_activations: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Generate(args) => run_generate(args),
    }
}

fn init_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle sizes its own thread use from RAYON_NUM_THREADS; our kernels use the global rayon pool.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("thread pool")?;
    }
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    init_threads(a.threads)?;
    let bundle =
        ModelBundle::load(&a.model, &LoadOptions { dequantize: a.dequantize, int8_activations: a.int8_activations })
            .with_context(|| format!("loading {}", a.model.display()))?;
    let prompt_ids = match (&a.prompt, &a.chat) {
        (Some(p), _) => bundle.encode(p, true)?,
        (None, Some(chat)) => {
            let messages: serde_json::Value =
                serde_json::from_str(chat).context("--chat must be a JSON array of messages")?;
            if !messages.is_array() {
                bail!("--chat must be a JSON array of messages");
            }
            bundle.encode_chat(&messages)?
        }
        (None, None) => unreachable!("clap requires --prompt or --chat"),
    };
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        logit_bias: Vec::new(),
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        stop_token_ids: Vec::new(),
        ignore_eos: a.ignore_eos,
    };
    let opts = GenerateOptions { eog_token_ids: bundle.special_tokens.eog.clone(), ..GenerateOptions::default() };
    let stream = !a.json;
    let mut out = std::io::stdout().lock();
    let g = generate(&bundle.model, &bundle.tokenizer, &prompt_ids, &params, &opts, |delta| {
        if stream {
            let _ = out.write_all(delta.as_bytes());
            let _ = out.flush();
        }
    })?;
    let prompt_s = g.prompt_time.as_secs_f64();
    let decode_s = g.decode_time.as_secs_f64();
    // The first output token comes out of the prefill step; decode speed counts the rest.
    let decoded = g.token_ids.len().saturating_sub(1);
    let timings = serde_json::json!({
        "prompt_ms": prompt_s * 1e3,
        "decode_ms": decode_s * 1e3,
        "prompt_tokens_per_second": g.prompt_token_ids.len() as f64 / prompt_s.max(1e-9),
        "decode_tokens_per_second": if decoded > 0 { decoded as f64 / decode_s.max(1e-9) } else { 0.0 },
    });
    if a.json {
        let v = serde_json::json!({
            "prompt_token_ids": g.prompt_token_ids,
            "token_ids": g.token_ids,
            "text": g.text,
            "finish_reason": g.finish_reason.as_str(),
            "usage": { "prompt_tokens": g.prompt_token_ids.len(), "completion_tokens": g.token_ids.len() },
            "timings": timings,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, finish_reason={}]",
            g.prompt_token_ids.len(),
            timings["prompt_tokens_per_second"].as_f64().unwrap_or(0.0),
            g.token_ids.len(),
            timings["decode_tokens_per_second"].as_f64().unwrap_or(0.0),
            g.finish_reason.as_str()
        );
    }
    Ok(())
}

fn run_serve(a: ServeArgs) -> Result<()> {
    init_threads(a.threads)?;
    if a.block_size == 0 || a.max_num_seqs == 0 || a.max_num_batched_tokens == 0 {
        bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be positive");
    }
    let bundle = std::sync::Arc::new(
        ModelBundle::load(&a.model, &LoadOptions::default())
            .with_context(|| format!("loading {}", a.model.display()))?,
    );
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        a.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let mut cfg = mlx_serving_runner::ModelExecutor::scheduler_config(&bundle, a.block_size, a.kv_cache_mb << 20);
    cfg.max_num_seqs = a.max_num_seqs;
    cfg.max_num_batched_tokens = a.max_num_batched_tokens;
    cfg.max_waiting_requests = a.max_waiting_requests;
    cfg.enable_prefix_caching = !a.no_prefix_caching;
    let exec = mlx_serving_runner::ModelExecutor::new(bundle.clone(), cfg.block_size, cfg.num_blocks);
    let (engine, _join) = mlx_serving_engine::EngineCore::spawn(cfg, exec);
    let state = std::sync::Arc::new(mlx_serving_server::AppState::new(engine, bundle, name.clone()));
    let app = mlx_serving_server::router(state);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        eprintln!("serving {name} on http://{addr}");
        axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

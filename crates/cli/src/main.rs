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
    /// Generate text from a prompt or a chat, streaming it to stdout.
    Generate(GenerateArgs),
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

//! The `mlx-serving` binary: parses the command line and runs a subcommand.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mlx_serving_engine::SamplingParams;
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::{generate, generate_speculative, GenerateOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

mod cache;
mod config;
mod device;
mod register;
mod router;
mod rpc;
mod serve;
mod sources;
mod speculative;
use serve::{run_serve, ServeArgs};

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
    Serve(Box<ServeArgs>),
    /// Generate text from a prompt or a chat, streaming it to stdout.
    Generate(GenerateArgs),
    /// Benchmark one or more OpenAI-compatible servers (ours or a peer's) side by side.
    Bench(BenchArgs),
    /// Write any loadable model (GGUF, Hugging Face or MLX directory) as a Hugging Face directory (`--format
    /// hf`) or an MLX-quantized one (`--format mlx`).
    Convert(ConvertArgs),
    /// Write a random-weight model of a real model's shape (Llama-3-8B, Qwen2.5-7B) as a GGUF file, for
    /// benchmarks at the scale users serve without downloading anything.
    MakeModel(MakeModelArgs),
    /// Route the OpenAI-compatible API over many `serve` instances (health checks, policies, retries).
    Router(Box<router::RouterArgs>),
    /// JSON-RPC 2.0 over stdin/stdout (one message per line) on the same models and engine as `serve`; takes
    /// serve's flags (host and port unused).
    Rpc(Box<ServeArgs>),
}

#[derive(Args)]
struct MakeModelArgs {
    /// `llama3-8b`, `qwen2.5-7b` or `tiny`.
    #[arg(long, default_value = "llama3-8b")]
    shape: String,
    /// How the matrices are stored: `f16`, `bf16`, `q8_0` or `q4_k` (norms and biases are f32).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Fewer layers than the shape has (a quicker file of the same widths).
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ConvertArgs {
    /// The model to convert: a GGUF file, a Hugging Face or MLX directory, or a repository id in the local
    /// Hugging Face cache.
    #[arg(long = "from")]
    from: PathBuf,
    /// The directory to write.
    #[arg(long = "to")]
    to: PathBuf,
    /// `hf` (float safetensors, config, tokenizer, chat template) or `mlx` (MLX affine-quantized).
    #[arg(long, default_value = "hf")]
    format: String,
    /// Weight type for `hf` (f32, bf16 or f16); `mlx` keeps norms in bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Bits per weight for `mlx` (4 or 8).
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Inputs per scale and bias for `mlx`.
    #[arg(long, default_value_t = 64)]
    group_size: usize,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("api").args(["chat", "completions"])))]
#[command(group(clap::ArgGroup::new("load").args(["concurrency", "request_rate"])))]
struct BenchArgs {
    /// Server to measure, e.g. http://127.0.0.1:8080 (repeat to compare: the first is the baseline).
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Model name to request (default: the first one the server's /v1/models lists); comma-separated names
    /// spread the requests over several models in turn.
    #[arg(long)]
    model: Option<String>,
    /// `builtin` (varied questions, instructions, code, multi-turn), `shared-prefix[:GROUPS]` (questions over 8
    /// (GROUPS) shared documents of --input-len tokens, default 512: for prefix caches and cache-aware routing)
    /// or a JSONL file of {"prompt"} or {"messages"} lines.
    #[arg(long, default_value = "builtin")]
    dataset: String,
    /// Requests per run (each endpoint, each load level, each round).
    #[arg(long, default_value_t = 64)]
    num_prompts: usize,
    /// Requests in flight; a comma-separated list sweeps (1,2,4,8,16). Default 1.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Poisson arrivals at this many requests per second (open loop) instead of a fixed concurrency.
    #[arg(long)]
    request_rate: Option<f64>,
    /// With --request-rate: most requests in flight.
    #[arg(long, requires = "request_rate")]
    max_concurrency: Option<usize>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Synthetic prompts of about this many tokens instead of the dataset.
    #[arg(long)]
    input_len: Option<usize>,
    /// Fraction of requests that repeat an earlier request's prompt exactly (for caches and coalescing).
    #[arg(long, default_value_t = 0.0)]
    duplicate_ratio: f64,
    /// Use /v1/chat/completions (the default).
    #[arg(long)]
    chat: bool,
    /// Use /v1/completions.
    #[arg(long)]
    completions: bool,
    /// Ask the server to ignore end-of-sequence tokens so every request produces max_tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Requests per endpoint before measuring (not counted).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Seeds the prompt order, synthetic prompts and arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Runs per endpoint and level, interleaved across endpoints (default: 1 with one URL, 3 with several).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds before a request counts as a timeout.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Write the full report as JSON here.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Print the table as Markdown.
    #[arg(long)]
    markdown: bool,
    /// Constrain every request to this JSON schema (a schema file, or a `testdata/schemas` case with a
    /// `schema` key), sent as OpenAI's `response_format` (which llama-server and vLLM take too).
    #[arg(long)]
    json_schema: Option<PathBuf>,
    /// With --json-schema: measure each URL twice, plain and constrained, side by side.
    #[arg(long, requires = "json_schema")]
    constraint_ab: bool,
}

/// `--json-schema FILE` as the request fields that ask for it.
fn bench_schema(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let schema = if v.get("schema").is_some_and(|s| s.is_object()) { v["schema"].clone() } else { v };
    Ok(
        serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}}),
    )
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat"])))]
struct GenerateArgs {
    /// GGUF file, Hugging Face directory, or repository id (`org/name`) in the local Hugging Face cache.
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
    /// Print one JSON object (prompt_token_ids, token_ids, text, finish_reason, usage, timings, isa) instead of
    /// streaming.
    #[arg(long)]
    json: bool,
    /// CPU threads (default: all cores).
    #[arg(long, env = "MLX_SERVING_THREADS")]
    threads: Option<usize>,
    /// Dequantize all weights to f32 at load (slow; matches float32 references closely).
    #[arg(long)]
    dequantize: bool,
    /// Quantized matmul activations: `mixed` (16-bit into the head, q/k/v and gate/up, 8-bit into o and down), `int8`
    /// (rounded per 32-value block as llama.cpp does; fastest, least accurate), `int16`, or `f32` (the
    /// float32 reference's arithmetic, slowest).
    #[arg(long, default_value = "mixed")]
    activations: mlx_serving_models::ActivationPrecision,
    /// KV cache element type: `f16` (the default) or `f32` (twice the memory and attention bandwidth).
    #[arg(long, default_value = "f16")]
    kv_cache_dtype: mlx_serving_kernels::KvDtype,
    /// Where the model runs: `cpu`, or `cuda[:N]` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: mlx_serving_models::ComputeDevice,
    #[command(flatten)]
    speculative: speculative::SpeculativeArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(*args),
        Command::Convert(args) => run_convert(args),
        Command::MakeModel(args) => run_make_model(args),
        Command::Generate(args) => run_generate(args),
        Command::Bench(args) => run_bench(args),
        Command::Router(args) => router::run_router(*args),
        Command::Rpc(args) => rpc::run_rpc(*args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, without a backtrace: these are user-facing errors.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub(crate) fn init_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle (matmuls of formats our kernels lack, e.g. Q5_K or f16) runs on rayon, sized from RAYON_NUM_THREADS
        // and the global pool; our kernels run on their own pool (`kernels::pool`).
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("thread pool")?;
        mlx_serving_kernels::pool::set_threads(n);
    }
    Ok(())
}

fn run_convert(a: ConvertArgs) -> Result<()> {
    use mlx_serving_models::export::{export, ExportFormat};
    use std::io::IsTerminal;
    let format = match a.format.as_str() {
        "hf" => ExportFormat::Hf(a.dtype.parse().map_err(|e| anyhow::anyhow!("--dtype: {e}"))?),
        "mlx" => ExportFormat::Mlx { bits: a.bits as usize, group_size: a.group_size },
        other => bail!("--format: `{other}` is not hf or mlx"),
    };
    let from = mlx_serving_models::resolve_model(&a.from)?;
    let tty = std::io::stderr().is_terminal();
    export(&from, &a.to, format, |done, total| {
        if tty {
            eprint!("\rconverting: {done}/{total} tensors");
            if done == total {
                eprintln!();
            }
        }
    })
    .with_context(|| format!("converting {} to {}", from.display(), a.to.display()))?;
    eprintln!("wrote {}", a.to.display());
    Ok(())
}

fn run_make_model(a: MakeModelArgs) -> Result<()> {
    use mlx_serving_models::random::{write_random_gguf, RandomShape};
    use std::io::IsTerminal;
    let Some(mut shape) = RandomShape::named(&a.shape) else {
        bail!("--shape: `{}` is not llama3-8b, qwen2.5-7b or tiny", a.shape)
    };
    if let Some(l) = a.layers {
        if l == 0 || l > shape.layers {
            bail!("--layers: must be from 1 to the shape's {}", shape.layers);
        }
        shape.layers = l;
    }
    let dtype = a.dtype.parse().map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let tty = std::io::stderr().is_terminal();
    let start = std::time::Instant::now();
    let bytes = write_random_gguf(&a.out, &shape, dtype, a.seed, |done, total| {
        if tty {
            eprint!("\rwriting: {done}/{total} tensors");
            if done == total {
                eprintln!();
            }
        }
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} ({} parameters, {:.2} GB) in {:.1} s",
        a.out.display(),
        shape.parameters(),
        bytes as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    a.device.check_available().map_err(|e| anyhow::anyhow!("--device {e}"))?;
    init_threads(a.threads)?;
    let path = mlx_serving_models::resolve_model(&a.model)?;
    let load_start = std::time::Instant::now();
    // On a GPU the weights load there (the CPU bundle keeps the configuration and tokenizer); a draft model
    // still loads on the CPU.
    let load_opts = LoadOptions {
        dequantize: a.dequantize,
        activations: a.activations,
        kv_cache_dtype: a.kv_cache_dtype,
        config_only: false,
    };
    let bundle_opts =
        LoadOptions { config_only: a.device != mlx_serving_models::ComputeDevice::Cpu, ..load_opts.clone() };
    let bundle =
        Arc::new(ModelBundle::load(&path, &bundle_opts).with_context(|| format!("loading {}", path.display()))?);
    let mut spec_section = None;
    a.speculative.apply(&mut spec_section);
    let load_s = load_start.elapsed().as_secs_f64();
    let prompt_ids = match (&a.prompt, &a.chat) {
        (Some(p), _) => bundle.encode(p, true)?,
        (None, Some(chat)) => {
            let messages: serde_json::Value =
                serde_json::from_str(chat).context("--chat must be a JSON array of messages")?;
            if !messages.is_array() {
                bail!("--chat must be a JSON array of messages");
            }
            bundle.encode_chat(&messages, mlx_serving_models::ChatContent::Text)?
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
        min_tokens: 0,
        logprobs: None,
        prompt_logprobs: None,
        speculative: true,
    };
    let opts = GenerateOptions { eog_token_ids: bundle.special_tokens.eog.clone(), ..GenerateOptions::default() };
    let stream = !a.json;
    let on_delta = |delta: &str| {
        if stream {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(delta.as_bytes());
            let _ = out.flush();
        }
    };
    let most = spec_section.as_ref().map_or(0, |s| s.num_speculative_tokens);
    let blocks = (prompt_ids.len() + params.max_tokens as usize + most + 1).div_ceil(opts.block_size);
    let device = device::device_model(a.device, &path, &bundle, opts.block_size, blocks)?;
    let (g, spec) = match (&spec_section, device) {
        (_, Some(d)) => {
            let mut exec = mlx_serving_runner::ModelExecutor::on_device(bundle.clone(), opts.block_size, d);
            if let Some(s) = &spec_section {
                exec = exec.with_speculation(s.speculator(&bundle, &load_opts, opts.block_size, blocks)?);
            }
            let (g, counts) =
                mlx_serving_runner::generate_with(&bundle, &mut exec, blocks, &prompt_ids, &params, &opts, on_delta)?;
            (g, spec_section.is_some().then_some(counts))
        }
        (None, None) => (generate(&bundle.model, &bundle.tokenizer, &prompt_ids, &params, &opts, on_delta)?, None),
        (Some(s), None) => {
            let blocks = (prompt_ids.len() + params.max_tokens as usize + s.num_speculative_tokens + 1)
                .div_ceil(opts.block_size);
            let speculator = s.speculator(&bundle, &load_opts, opts.block_size, blocks)?;
            let (g, counts) = generate_speculative(bundle.clone(), speculator, &prompt_ids, &params, &opts, on_delta)?;
            (g, Some(counts))
        }
    };
    let mut out = std::io::stdout().lock();
    let prompt_s = g.prompt_time.as_secs_f64();
    let decode_s = g.decode_time.as_secs_f64();
    // The first output token comes out of the prefill step; decode speed counts the rest.
    let decoded = g.token_ids.len().saturating_sub(1);
    let timings = serde_json::json!({
        "load_ms": load_s * 1e3,
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
            // The kernels' instruction set (`avx512vnni`, `avx2` or `portable`, see MLX_SERVING_ISA).
            "isa": format!("{:?}", mlx_serving_kernels::Isa::detected()).to_lowercase(),
            "speculative": spec.as_ref().map(|c| serde_json::json!({
                "drafts": c.drafts,
                "draft_tokens": c.draft_tokens,
                "accepted_tokens": c.accepted_tokens,
                "accepted_per_position": c.accepted_per_position,
            })),
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

fn run_bench(a: BenchArgs) -> Result<()> {
    use mlx_serving_bench::{BenchConfig, DatasetSpec, Load};
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    if !(0.0..1.0).contains(&a.duplicate_ratio) {
        bail!("--duplicate-ratio must be at least 0 and below 1");
    }
    let loads = match a.request_rate {
        Some(r) if !(r.is_finite() && r > 0.0) => bail!("--request-rate must be positive"),
        Some(rate) => vec![Load::RequestRate { rate, max_concurrency: a.max_concurrency }],
        None if a.concurrency.is_empty() => vec![Load::Concurrency(1)],
        None => {
            if a.concurrency.contains(&0) {
                bail!("--concurrency levels must be at least 1");
            }
            a.concurrency.iter().map(|&c| Load::Concurrency(c)).collect()
        }
    };
    let dataset = match a.dataset.as_str() {
        "builtin" => DatasetSpec::Builtin,
        "shared-prefix" => DatasetSpec::SharedPrefix(8),
        s if s.starts_with("shared-prefix:") => {
            let groups: usize = s["shared-prefix:".len()..].parse().context("--dataset shared-prefix:GROUPS")?;
            DatasetSpec::SharedPrefix(groups.max(1))
        }
        path => DatasetSpec::File(PathBuf::from(path)),
    };
    let cfg = BenchConfig {
        rounds: a.rounds.unwrap_or(if a.urls.len() > 1 { 3 } else { 1 }),
        urls: a.urls,
        model: a.model,
        dataset,
        num_prompts: a.num_prompts,
        loads,
        max_tokens: a.max_tokens,
        input_len: a.input_len,
        duplicate_ratio: a.duplicate_ratio,
        chat: !a.completions,
        ignore_eos: a.ignore_eos,
        temperature: a.temperature,
        warmup: a.warmup,
        seed: a.seed,
        timeout: std::time::Duration::from_secs_f64(a.timeout),
        progress: true,
        constraint: a.json_schema.as_deref().map(bench_schema).transpose()?,
        constraint_ab: a.constraint_ab,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = rt.block_on(mlx_serving_bench::run(cfg))?;
    print!("{}", mlx_serving_bench::render_table(&report, a.markdown));
    if let Some(path) = &a.output {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

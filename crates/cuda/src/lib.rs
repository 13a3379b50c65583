//! The decoder on an NVIDIA GPU (#21): weights and the paged KV cache in GPU memory, one forward pass per
//! engine step over the same flattened batches as the CPU model ([`mlx_serving_models::DeviceModel`]).
//!
//! Per layer, for a batch of `n` rows (all on one stream; the host only launches):
//!
//! ```text
//!   x ─ rms_norm ─ qkv matmul ─ qkv_rope_store (biases, RoPE, K/V → paged f16 cache) ─ paged attention ─ o matmul (+= x)
//!   x ─ rms_norm ─ gate/up matmul ─ swiglu ─ down matmul (+= x)
//! ```
//!
//! Matmuls: up to 8 rows (decode) go to our matvec kernels, which read the weights in their own format (GGUF's
//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K blocks, f16, bf16) with f32 activations; longer batches (prompts)
//! go to cuBLAS with 16-bit activations and f32 sums (block formats dequantized to 16 bits first, one matrix at a
//! time). Weights in other formats (Q2_K, Q3_K, Q5_K, f32, MLX's block offsets) are dequantized to f16 at load. Attention is `crates/kernels/cuda/paged_attention.cuh`'s flash-decoding kernel, run for every
//! row of the batch with that row's causal context (a prompt row attends to the positions up to its own).
//!
//! Batch invariance: a decode row's matvec and attention results do not depend on the other rows (fixed
//! split size of 256 positions, fixed summation order), so a sequence decoded in any batch of up to 8 rows gives
//! bitwise the logits it gives alone. Rows of batches past 8 go through cuBLAS, whose kernels may sum in
//! another order for another batch size.
//!
//! Greedy rows: rows the executor asks for their argmax alone (`forward_select`) are reduced on the GPU
//! (`argmax_rows`), and only their token ids are copied back.
//!
//! The kernels are compiled by NVRTC when a model loads (`module.rs`); cudarc loads the driver, NVRTC and
//! cuBLAS at run time, so this crate builds without CUDA.

mod module;
mod weights;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use mlx_serving_models::config::{FfnActivation, RopeStyle};
use mlx_serving_models::source::TensorSource;
use mlx_serving_models::{BatchInput, DeviceModel, Error, GgufFile, ModelConfig, StepLogits};
use module::Kernels;
use std::path::Path;
use std::sync::Arc;
use weights::{ptr, HalfKind, MatmulCtx, Matrix};

pub use mlx_serving_models::Result;
pub use module::compile;

/// An error mapper naming what failed.
pub(crate) fn device_err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Device(format!("cuda: {what}: {e:?}"))
}

struct Layer {
    attn_norm: CudaSlice<f32>,
    qkv: Matrix,
    /// q/k/v biases side by side (qwen2).
    qkv_bias: Option<CudaSlice<f32>>,
    o: Matrix,
    ffn_norm: CudaSlice<f32>,
    gate_up: Matrix,
    down: Matrix,
}

/// One layer's K and V: `[num_blocks, block_size, num_kv_heads, head_dim]` f16 each (the CPU cache's layout).
struct LayerKv {
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

/// `PagedDecodeParams` of paged_attention.cuh, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct PagedDecodeParams {
    q: u64,
    k_cache: u64,
    v_cache: u64,
    block_tables: u64,
    context_lens: u64,
    out: u64,
    part_max: u64,
    part_sum: u64,
    part_out: u64,
    num_heads: i32,
    num_kv_heads: i32,
    head_dim: i32,
    block_size: i32,
    max_blocks_per_seq: i32,
    max_splits: i32,
    split: i32,
    scale: f32,
}

// SAFETY: plain old data with the C struct's layout.
#[allow(unsafe_code)]
unsafe impl DeviceRepr for PagedDecodeParams {}

/// Context positions per attention split: fixed, so that a row's result never depends on its batch (see the
/// crate docs).
const SPLIT: usize = 256;
/// Threads per block of the argmax kernel (`ARGMAX_THREADS` of layer_ops.cuh).
const ARGMAX_THREADS: u32 = 256;
/// Bound on the attention's partial-result buffers; longer batches run the attention in row chunks.
const ATTN_PARTIAL_BYTES: usize = 256 << 20;

/// Buffers of one step, grown to the largest step seen.
#[derive(Default)]
struct Scratch {
    f32s: [Option<CudaSlice<f32>>; slot::F32_SLOTS],
    u16s: [Option<CudaSlice<u16>>; slot::U16_SLOTS],
    meta: Option<CudaSlice<u32>>,
    /// The argmax of each logits row (greedy rows).
    tokens: Option<CudaSlice<u32>>,
}

pub struct CudaModel {
    cfg: ModelConfig,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    embed: Matrix,
    /// The output head; `None` when tied to `embed`.
    head: Option<Matrix>,
    layers: Vec<Layer>,
    norm: CudaSlice<f32>,
    inv_freq: CudaSlice<f32>,
    kv: Vec<LayerKv>,
    block_size: usize,
    num_blocks: usize,
    /// 16-bit scratch for the largest matrix part cuBLAS reads dequantized.
    dequant: CudaSlice<u16>,
    scratch: Scratch,
    weight_bytes: usize,
}

/// Why the GPU cannot run a model of this configuration yet, if it cannot.
fn unsupported(cfg: &ModelConfig) -> Option<&'static str> {
    if cfg.qk_norm {
        Some("q/k norms (qwen3, gemma3)")
    } else if cfg.post_norms {
        Some("post-attention norms (gemma3)")
    } else if cfg.sliding_window.is_some() {
        Some("sliding-window attention")
    } else if cfg.mrope_section.is_some() {
        Some("M-RoPE (vision-language models)")
    } else if cfg.ffn_activation != FfnActivation::Silu {
        Some("GELU feed-forward")
    } else if cfg.final_logit_softcap.is_some() {
        Some("logit soft-capping")
    } else if !cfg.hidden_size.is_multiple_of(8) || !cfg.intermediate_size.is_multiple_of(8) {
        Some("widths that are not multiples of 8")
    } else if !cfg.head_dim.is_multiple_of(2) || cfg.head_dim > 256 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
        Some("this head shape")
    } else {
        None
    }
}

/// The libraries loaded at run time, each present: cudarc panics on first use of a missing one, so a machine
/// without them gets an error here instead.
fn check_libraries() -> Result<()> {
    // SAFETY: these only try to open the shared libraries (dlopen) and close them again.
    #[allow(unsafe_code)]
    let found = unsafe {
        [
            ("the NVIDIA driver (libcuda.so.1)", cudarc::driver::sys::is_culib_present()),
            ("NVRTC (libnvrtc.so.13)", cudarc::nvrtc::sys::is_culib_present()),
            ("cuBLAS (libcublas.so.13)", cudarc::cublas::sys::is_culib_present()),
        ]
    };
    match found.iter().find(|(_, present)| !present) {
        Some((what, _)) => Err(Error::Device(format!(
            "cuda: {what} was not found; install the NVIDIA driver and the CUDA runtime libraries (or put them on \
             LD_LIBRARY_PATH), or run on the CPU (`--device cpu`)"
        ))),
        None => Ok(()),
    }
}

impl CudaModel {
    /// Loads the model at `path` (a GGUF file or a Hugging Face directory) onto GPU `ordinal`, with a paged KV
    /// cache of `num_blocks` blocks of `block_size` tokens.
    pub fn load(path: &Path, cfg: &ModelConfig, ordinal: usize, block_size: usize, num_blocks: usize) -> Result<Self> {
        if path.is_dir() {
            let dir = mlx_serving_models::hf::HfDir::open(path)?;
            Self::from_source(&dir, cfg, ordinal, block_size, num_blocks)
        } else {
            let g = GgufFile::open(path)?;
            Self::from_source(&g, cfg, ordinal, block_size, num_blocks)
        }
    }

    pub fn from_source<S: TensorSource>(
        src: &S,
        cfg: &ModelConfig,
        ordinal: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        if let Some(what) = unsupported(cfg) {
            return Err(Error::Device(format!("cuda: {what} is not supported on the GPU yet (issue #21)")));
        }
        if cfg.kv_dtype != mlx_serving_kernels::KvDtype::F16 {
            return Err(Error::Device("cuda: the GPU's KV cache is f16 (leave kv_cache_dtype at f16)".into()));
        }
        check_libraries()?;
        let count = CudaContext::device_count().map_err(device_err("no usable driver (libcuda)"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device(format!("cuda:{ordinal}: this machine has {count} GPU(s)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(device_err("opening the GPU"))?;
        // One stream orders every kernel and copy: cudarc's per-buffer events would only cost time.
        // SAFETY: nothing here uses a second stream.
        #[allow(unsafe_code)]
        unsafe {
            ctx.disable_event_tracking()
        };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(device_err("cuBLAS"))?;
        let kernels = Kernels::load(&ctx)?;
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let matrix = |names: &[(&str, usize)], cols: usize| -> Result<Matrix> {
            let parts = names.iter().map(|(n, rows)| src.tensor_data(n, &[*rows, cols])).collect::<Result<Vec<_>>>()?;
            Matrix::stacked(&stream, names[0].0, &parts)
        };
        let vector = |name: &str, n: usize| -> Result<CudaSlice<f32>> {
            let v = src.f32_values(name, &[n])?;
            stream.clone_htod(&v).map_err(device_err(name))
        };
        let embed = matrix(&[("token_embd.weight", cfg.vocab_size)], h)?;
        let head = if cfg.tie_word_embeddings { None } else { Some(matrix(&[("output.weight", cfg.vocab_size)], h)?) };
        let (q, kv) = (cfg.q_size(), cfg.kv_size());
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("blk.{i}");
            let name = |s: &str| format!("{p}.{s}");
            let qkv_bias = if cfg.attention_bias {
                let mut b = src.f32_values(&name("attn_q.bias"), &[q])?;
                b.extend(src.f32_values(&name("attn_k.bias"), &[kv])?);
                b.extend(src.f32_values(&name("attn_v.bias"), &[kv])?);
                Some(stream.clone_htod(&b).map_err(device_err("bias"))?)
            } else {
                None
            };
            let (nq, nk, nv) = (name("attn_q.weight"), name("attn_k.weight"), name("attn_v.weight"));
            let (ng, nu) = (name("ffn_gate.weight"), name("ffn_up.weight"));
            layers.push(Layer {
                attn_norm: vector(&name("attn_norm.weight"), h)?,
                qkv: matrix(&[(&nq, q), (&nk, kv), (&nv, kv)], h)?,
                qkv_bias,
                o: matrix(&[(&name("attn_output.weight"), h)], q)?,
                ffn_norm: vector(&name("ffn_norm.weight"), h)?,
                gate_up: matrix(&[(&ng, ffn), (&nu, ffn)], h)?,
                down: matrix(&[(&name("ffn_down.weight"), h)], ffn)?,
            });
        }
        let norm = vector("output_norm.weight", h)?;
        // inv_freq[i] = theta^(-2i/d), as the CPU model computes it.
        let inv: Vec<f32> = (0..cfg.rope_dim / 2)
            .map(|i| (1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.rope_dim as f64)) as f32)
            .collect();
        let inv_freq = stream.clone_htod(&inv).map_err(device_err("rope"))?;
        let per_layer = num_blocks * block_size * cfg.num_kv_heads * cfg.head_dim;
        let kv_layers = (0..cfg.num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: stream.alloc_zeros::<u16>(per_layer).map_err(device_err("allocating the KV cache"))?,
                    v: stream.alloc_zeros::<u16>(per_layer).map_err(device_err("allocating the KV cache"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let all: Vec<&Matrix> = layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .chain(std::iter::once(&embed))
            .chain(head.as_ref())
            .collect();
        let largest = all.iter().map(|m| m.dequant_len()).max().unwrap_or(0).max(1);
        let weight_bytes = all.iter().map(|m| m.bytes()).sum();
        let dequant = stream.alloc_zeros::<u16>(largest).map_err(device_err("allocating scratch"))?;
        Ok(Self {
            cfg: cfg.clone(),
            ctx,
            stream,
            blas,
            kernels,
            embed,
            head,
            layers,
            norm,
            inv_freq,
            kv: kv_layers,
            block_size,
            num_blocks,
            dequant,
            scratch: Scratch::default(),
            weight_bytes,
        })
    }

    /// Bytes of weight matrices on the GPU.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn launch<'a>(
        &'a self,
        f: &'a cudarc::driver::CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
    ) -> LaunchBuilder<'a> {
        LaunchBuilder {
            args: self.stream.launch_builder(f),
            cfg: LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 },
        }
    }
}

struct LaunchBuilder<'a> {
    args: cudarc::driver::LaunchArgs<'a>,
    cfg: LaunchConfig,
}

impl LaunchBuilder<'_> {
    fn go(mut self, what: &str) -> Result<()> {
        // SAFETY: every caller passes pointers into buffers sized for its grid (see each kernel's comment).
        #[allow(unsafe_code)]
        unsafe { self.args.launch(self.cfg) }.map(|_| ()).map_err(device_err(what))
    }
}

/// Scratch slot numbers.
mod slot {
    pub const X: usize = 0;
    pub const HN: usize = 1;
    pub const QKV: usize = 2;
    pub const Q: usize = 3;
    pub const ATTN: usize = 4;
    pub const GU: usize = 5;
    pub const ACT: usize = 6;
    pub const LOGITS: usize = 7;
    pub const PART_MAX: usize = 8;
    pub const PART_SUM: usize = 9;
    pub const PART_OUT: usize = 10;
    pub const F32_SLOTS: usize = 11;
    pub const HN16: usize = 0;
    pub const ATTN16: usize = 1;
    pub const ACT16: usize = 2;
    pub const U16_SLOTS: usize = 3;
}

impl Scratch {
    /// A pointer to f32 buffer `i`, of at least `len` elements.
    fn f32(&mut self, stream: &Arc<CudaStream>, i: usize, len: usize) -> Result<u64> {
        grown(&mut self.f32s[i], stream, len)
    }

    fn u16(&mut self, stream: &Arc<CudaStream>, i: usize, len: usize) -> Result<u64> {
        grown(&mut self.u16s[i], stream, len)
    }

    /// The argmax buffer, of at least `len` ids.
    fn u32(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<u64> {
        grown(&mut self.tokens, stream, len)
    }
}

/// A pointer to the buffer in `slot`, reallocated half again larger than `len` when it holds fewer elements.
fn grown<T: DeviceRepr + ValidAsZeroBits>(
    slot: &mut Option<CudaSlice<T>>,
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<u64> {
    let len = len.max(1);
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = None;
        *slot = Some(stream.alloc_zeros::<T>(len + len / 2).map_err(device_err("allocating scratch"))?);
    }
    Ok(ptr(slot.as_ref().expect("allocated"), stream))
}

mod forward;

impl Drop for CudaModel {
    /// The buffers free on whichever thread drops the model: make its context current there first.
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
    }
}

impl DeviceModel for CudaModel {
    fn forward(&mut self, batch: &BatchInput<'_>, progress: &dyn Fn() -> bool) -> Result<Vec<f32>> {
        Ok(self.step(batch, &[], progress)?.logits)
    }

    fn forward_select(
        &mut self,
        batch: &BatchInput<'_>,
        argmax_only: &[bool],
        progress: &dyn Fn() -> bool,
    ) -> Result<StepLogits> {
        self.step(batch, argmax_only, progress)
    }

    fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        format!("cuda:{} ({name}, {:.2} GB of weights)", self.ctx.ordinal(), self.weight_bytes as f64 / 1e9)
    }
}

//! The kernels, compiled by NVRTC from the sources in `crates/kernels/cuda` and `src/*.cu` when a model loads,
//! for the GPU's own architecture, and their handles.

use crate::{device_err, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::sync::Arc;

/// The module's source: the prelude NVRTC needs in place of CUDA's headers, the shared kernels, the model's.
pub(crate) fn source() -> String {
    [
        include_str!("prelude.cuh"),
        include_str!("../../kernels/cuda/paged_attention.cuh"),
        include_str!("../../kernels/cuda/q4k_matvec.cuh"),
        include_str!("model.cu"),
    ]
    .join("\n")
}

/// Rows per warp of the matvec kernels (1, 2 or 4), by the matrix's rows and the number of vectors: fewer rows
/// give a small matrix more warps; more share each activation load over more weights (measured on an H100
/// for Q4_K, BENCHMARKS.md, session 25).
pub(crate) fn rows_per_warp(rows: usize, nv: usize) -> usize {
    match (nv, rows) {
        (1, r) if r <= 2048 => 1,
        (1, r) if r <= 32768 => 2,
        (_, r) if r <= 2048 => 2,
        _ => 4,
    }
}

/// The module compiled to PTX for `arch` (e.g. `sm_90`): NVRTC only, no GPU needed.
pub fn compile(arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec!["-std=c++17".into(), "-default-device".into()],
        ..CompileOptions::default()
    };
    compile_ptx_with_opts(source(), opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            crate::Error::Device(format!("cuda: compiling the kernels: {}", log.to_string_lossy()))
        }
        e => crate::Error::Device(format!("cuda: compiling the kernels: {e:?}")),
    })
}

pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    pub embed_half: CudaFunction,
    pub embed_q4k: CudaFunction,
    pub q4k_dequant_f16: CudaFunction,
    pub rms_norm: CudaFunction,
    pub qkv_rope_store: CudaFunction,
    pub swiglu: CudaFunction,
    pub to_half: CudaFunction,
    pub pa_split: CudaFunction,
    pub pa_merge: CudaFunction,
    /// `pa_grouped[g - 1]`: the grouped attention kernel for g query heads per KV head.
    pub pa_grouped: Vec<CudaFunction>,
    /// `[nv index (1, 2, 4, 8)][rows-per-warp index (1, 2, 4)]`.
    pub q4k_mv: Vec<Vec<CudaFunction>>,
    pub f16_mv: Vec<Vec<CudaFunction>>,
    pub bf16_mv: Vec<Vec<CudaFunction>>,
}

pub(crate) const VECTORS: [usize; 4] = [1, 2, 4, 8];
const ROWS: [usize; 3] = [1, 2, 4];

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().map_err(device_err("compute capability"))?;
        // NVRTC wants a 'static str; the few architectures are listed rather than leaked.
        let arch: &'static str = match (major, minor) {
            (7, 0) => "sm_70",
            (7, 5) => "sm_75",
            (8, 0) => "sm_80",
            (8, 6) => "sm_86",
            (8, 9) => "sm_89",
            (9, 0) => "sm_90",
            (10, 0) => "sm_100",
            (12, 0) => "sm_120",
            (a, b) => return Err(crate::Error::Device(format!("cuda: compute capability {a}.{b} is not supported"))),
        };
        let ptx = compile(arch)?;
        let module = ctx.load_module(ptx).map_err(device_err("loading the kernels"))?;
        let f = |name: &str| module.load_function(name).map_err(device_err(name));
        let table = |prefix: &str| -> Result<Vec<Vec<CudaFunction>>> {
            VECTORS.iter().map(|nv| ROWS.iter().map(|r| f(&format!("{prefix}_mv_{nv}_{r}"))).collect()).collect()
        };
        Ok(Self {
            embed_half: f("embed_half")?,
            embed_q4k: f("embed_q4k")?,
            q4k_dequant_f16: f("q4k_dequant_f16")?,
            rms_norm: f("rms_norm")?,
            qkv_rope_store: f("qkv_rope_store")?,
            swiglu: f("swiglu")?,
            to_half: f("to_half")?,
            pa_split: f("pa_split")?,
            pa_merge: f("pa_merge")?,
            pa_grouped: (1..=8).map(|g| f(&format!("pa_grouped_{g}"))).collect::<Result<_>>()?,
            q4k_mv: table("q4k")?,
            f16_mv: table("f16")?,
            bf16_mv: table("bf16")?,
            _module: module,
        })
    }
}

/// Index of `r` rows per warp in the kernel tables.
pub(crate) fn rows_index(r: usize) -> usize {
    ROWS.iter().position(|&x| x == r).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    /// NVRTC compiles the whole module (no GPU needed; NVRTC must be loadable, e.g. from the
    /// `nvidia-cuda-nvrtc` wheel on `LD_LIBRARY_PATH`, as `scripts/cuda-tests.sh` and CI arrange).
    #[test]
    #[ignore = "needs libnvrtc: scripts/nvrtc-check.sh"]
    fn the_kernels_compile() {
        let ptx = super::compile("sm_90").unwrap();
        let text = ptx.to_src();
        for name in ["pa_grouped_3", "q4k_mv_8_4", "bf16_mv_1_2", "qkv_rope_store", "embed_q4k"] {
            assert!(text.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
    }
}

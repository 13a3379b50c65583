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
        include_str!("../../kernels/cuda/matvec_store.cuh"),
        include_str!("../../kernels/cuda/q4k_matvec.cuh"),
        include_str!("../../kernels/cuda/block_matvec.cuh"),
        include_str!("../../kernels/cuda/layer_ops.cuh"),
        include_str!("model.cu"),
    ]
    .join("\n")
}

/// Rows per warp of the matvec kernels (1, 2 or 4; 4 only where `format` has it), by the matrix's rows and the
/// number of vectors: fewer rows give a small matrix more warps; more share each activation load over more
/// weights (measured on an H100 for Q4_K, BENCHMARKS.md, session 25).
pub(crate) fn rows_per_warp(format: Format, rows: usize, nv: usize) -> usize {
    let r = match (nv, rows) {
        (1, r) if r <= 2048 => 1,
        (1, r) if r <= 32768 => 2,
        (_, r) if r <= 2048 => 2,
        _ => 4,
    };
    r.min(format.max_rows_per_warp())
}

/// A weight format the kernels read in place (GGUF's layouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q6K,
    Q4K,
}

impl Format {
    pub const ALL: [Format; 9] = [
        Format::F16,
        Format::Bf16,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q8_0,
        Format::Q6K,
        Format::Q4K,
    ];

    /// The kernels' name for it.
    pub fn name(self) -> &'static str {
        match self {
            Format::F16 => "f16",
            Format::Bf16 => "bf16",
            Format::Q4_0 => "q4_0",
            Format::Q4_1 => "q4_1",
            Format::Q5_0 => "q5_0",
            Format::Q5_1 => "q5_1",
            Format::Q8_0 => "q8_0",
            Format::Q6K => "q6_k",
            Format::Q4K => "q4_k",
        }
    }

    /// (values, bytes) per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Format::F16 | Format::Bf16 => (8, 16),
            Format::Q4_0 => (32, 18),
            Format::Q4_1 => (32, 20),
            Format::Q5_0 => (32, 22),
            Format::Q5_1 => (32, 24),
            Format::Q8_0 => (32, 34),
            Format::Q6K => (256, 210),
            Format::Q4K => (256, 144),
        }
    }

    fn max_rows_per_warp(self) -> usize {
        match self {
            Format::F16 | Format::Bf16 | Format::Q4K => 4,
            _ => 2,
        }
    }

    fn index(self) -> usize {
        Format::ALL.iter().position(|&f| f == self).unwrap_or(0)
    }
}

/// The module compiled to PTX for `arch` (e.g. `sm_90`): NVRTC only, no GPU needed.
pub fn compile(arch: &str) -> Result<cudarc::nvrtc::Ptx> {
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into(), "-default-device".into()],
        ..CompileOptions::default()
    };
    compile_ptx_with_opts(source(), opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            crate::Error::Device(format!("cuda: compiling the kernels: {}", log.to_string_lossy()))
        }
        e => crate::Error::Device(format!("cuda: compiling the kernels: {e:?}")),
    })
}

/// [`compile`], through a file cache (`$MLX_SERVING_CACHE_DIR`, else `$XDG_CACHE_HOME/mlx-serving`, else
/// `~/.cache/mlx-serving`) keyed by the architecture and a hash of the source: NVRTC takes seconds, a load from
/// the cache none. A cache that cannot be read or written only costs the compilation.
fn cached_compile(arch: &str) -> Result<(cudarc::nvrtc::Ptx, bool)> {
    use std::hash::{Hash, Hasher};
    let dir = std::env::var_os("MLX_SERVING_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| std::path::Path::new(&d).join("mlx-serving")))
        .or_else(|| std::env::var_os("HOME").map(|d| std::path::Path::new(&d).join(".cache/mlx-serving")));
    let mut h = std::hash::DefaultHasher::new();
    source().hash(&mut h);
    let file = dir.map(|d| d.join(format!("kernels-{arch}-{:016x}.ptx", h.finish())));
    if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        return Ok((cudarc::nvrtc::Ptx::from_src(text), true));
    }
    let ptx = compile(arch)?;
    if let Some(f) = &file {
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        let written = f.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok())
            && std::fs::write(&tmp, ptx.to_src()).is_ok()
            && std::fs::rename(&tmp, f).is_ok();
        if !written {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok((ptx, false))
}

/// A format's kernels.
pub(crate) struct FormatKernels {
    pub embed: CudaFunction,
    pub dequant: CudaFunction,
    /// `[nv index (1, 2, 4, 8)][rows-per-warp index (1, 2, 4)]`.
    pub mv: Vec<Vec<CudaFunction>>,
}

pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    pub rms_norm: CudaFunction,
    pub qkv_rope_store: CudaFunction,
    pub swiglu: CudaFunction,
    pub to_half: CudaFunction,
    pub argmax_rows: CudaFunction,
    pub pa_split: CudaFunction,
    pub pa_merge: CudaFunction,
    /// `pa_grouped[g - 1]`: the grouped attention kernel for g query heads per KV head.
    pub pa_grouped: Vec<CudaFunction>,
    formats: Vec<FormatKernels>,
}

pub(crate) const VECTORS: [usize; 4] = [1, 2, 4, 8];
const ROWS: [usize; 3] = [1, 2, 4];

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().map_err(device_err("compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        let (ptx, cached) = cached_compile(&arch)?;
        let module = match ctx.load_module(ptx) {
            Ok(m) => m,
            // A cached module the driver refuses (written by another NVRTC, say): compile afresh.
            Err(_) if cached => ctx.load_module(compile(&arch)?).map_err(device_err("loading the kernels"))?,
            Err(e) => return Err(device_err("loading the kernels")(e)),
        };
        let f = |name: &str| module.load_function(name).map_err(device_err(name));
        let formats = Format::ALL
            .iter()
            .map(|fmt| {
                let n = fmt.name();
                let rows: &[usize] = if fmt.max_rows_per_warp() == 4 { &ROWS } else { &ROWS[..2] };
                Ok(FormatKernels {
                    embed: f(&format!("embed_{n}"))?,
                    dequant: f(&format!("dequant_{n}"))?,
                    mv: VECTORS
                        .iter()
                        .map(|nv| rows.iter().map(|r| f(&format!("mv_{n}_{nv}_{r}"))).collect())
                        .collect::<Result<_>>()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            rms_norm: f("rms_norm")?,
            qkv_rope_store: f("qkv_rope_store")?,
            swiglu: f("swiglu")?,
            to_half: f("to_half")?,
            argmax_rows: f("argmax_rows")?,
            pa_split: f("pa_split")?,
            pa_merge: f("pa_merge")?,
            pa_grouped: (1..=8).map(|g| f(&format!("pa_grouped_{g}"))).collect::<Result<_>>()?,
            formats,
            _module: module,
        })
    }

    pub fn format(&self, f: Format) -> &FormatKernels {
        &self.formats[f.index()]
    }

    /// The matvec kernel of `f` for `nv` vectors and `r` rows per warp (both from the tables' values).
    pub fn matvec(&self, f: Format, nv: usize, r: usize) -> &CudaFunction {
        let fk = self.format(f);
        let v = VECTORS.iter().position(|&x| x == nv).unwrap_or(0);
        let i = ROWS.iter().position(|&x| x == r).unwrap_or(0).min(fk.mv[v].len() - 1);
        &fk.mv[v][i]
    }
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
        for name in
            ["pa_grouped_3", "mv_q4_k_8_4", "mv_bf16_1_4", "mv_q6_k_8_2", "qkv_rope_store", "embed_q4_k", "argmax_rows"]
        {
            assert!(text.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
    }
}

//! Weight matrices on the GPU, in their own format where a kernel reads it (Q4_K blocks, f16, bf16), and the
//! matmul that picks the kernel: our matvec kernels (f32 activations) for up to 8 rows, cuBLAS (16-bit
//! activations, f32 sums and output) for more.

use crate::module::{rows_index, rows_per_warp, Kernels, VECTORS};
use crate::{device_err, Error, Result};
use candle_core::quantized::GgmlDType;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use mlx_serving_models::source::TensorData;
use std::sync::Arc;

/// 16-bit float kinds, as the kernels number them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HalfKind {
    F16 = 1,
    Bf16 = 2,
}

pub(crate) enum Storage {
    Half(CudaSlice<u16>, HalfKind),
    Q4K(CudaSlice<u8>),
}

/// A matrix `[rows, cols]` (`y = x · Wᵀ`).
pub(crate) struct Matrix {
    pub storage: Storage,
    pub rows: usize,
    pub cols: usize,
}

/// Row count up to which a step uses the matvec kernels.
pub(crate) const MATVEC_ROWS: usize = 8;

impl Matrix {
    /// The parts stacked by rows (q/k/v; gate/up), all with `cols` columns, kept in their format when they
    /// share one the kernels read, else each dequantized and stored as f16.
    pub fn stacked(stream: &Arc<CudaStream>, name: &str, parts: &[TensorData<'_>]) -> Result<Self> {
        let cols = parts[0].shape[1];
        let rows: usize = parts.iter().map(|p| p.shape[0]).sum();
        let all = |t: GgmlDType| parts.iter().all(|p| p.dtype == t && p.mins.is_none());
        let upload_u8 = |bytes: Vec<u8>| stream.clone_htod(&bytes).map_err(device_err(name));
        let storage = if all(GgmlDType::Q4K) {
            Storage::Q4K(upload_u8(parts.iter().flat_map(|p| p.bytes.iter().copied()).collect())?)
        } else if all(GgmlDType::BF16) || all(GgmlDType::F16) {
            let kind = if parts[0].dtype == GgmlDType::BF16 { HalfKind::Bf16 } else { HalfKind::F16 };
            let v: Vec<u16> = parts
                .iter()
                .flat_map(|p| p.bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])))
                .collect();
            Storage::Half(stream.clone_htod(&v).map_err(device_err(name))?, kind)
        } else {
            let mut v = Vec::with_capacity(rows * cols);
            for p in parts {
                let f = p.to_f32().map_err(|e| Error::Device(format!("{name}: {e}")))?;
                for x in f {
                    let h = half::f16::from_f32(x);
                    if !h.is_finite() && x.is_finite() {
                        return Err(Error::Device(format!("{name}: a weight ({x}) is outside f16's range")));
                    }
                    v.push(h.to_bits());
                }
            }
            Storage::Half(stream.clone_htod(&v).map_err(device_err(name))?, HalfKind::F16)
        };
        Ok(Self { storage, rows, cols })
    }

    /// The 16-bit kind cuBLAS reads this matrix's activations in.
    pub fn gemm_kind(&self) -> HalfKind {
        match &self.storage {
            Storage::Half(_, k) => *k,
            Storage::Q4K(_) => HalfKind::F16,
        }
    }

    /// Whether `n` activation rows go through cuBLAS (so they are needed in 16 bits).
    pub fn wants_half(&self, n: usize) -> bool {
        n > MATVEC_ROWS || !self.has_matvec()
    }

    fn has_matvec(&self) -> bool {
        match &self.storage {
            Storage::Half(..) => self.cols.is_multiple_of(8),
            Storage::Q4K(_) => true,
        }
    }

    /// Bytes on the GPU.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::Half(s, _) => s.len() * 2,
            Storage::Q4K(s) => s.len(),
        }
    }
}

/// What a matmul needs besides its operands: the stream, kernels, cuBLAS and a scratch buffer for dequantized
/// Q4_K weights.
pub(crate) struct MatmulCtx<'a> {
    pub stream: &'a Arc<CudaStream>,
    pub kernels: &'a Kernels,
    pub blas: &'a CudaBlas,
    /// f16 scratch of at least the largest Q4_K matrix's size.
    pub dequant: u64,
}

/// A device pointer of a buffer (event tracking is off: one stream orders everything).
pub(crate) fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

impl MatmulCtx<'_> {
    /// `y [n, w.rows] (+)= x [n, w.cols] · Wᵀ`: `x32` f32 rows, `x16` their 16-bit copy in `w.gemm_kind()` (read
    /// only when `w.wants_half(n)`), `y` f32.
    pub fn matmul(&self, w: &Matrix, x32: u64, x16: u64, y: u64, n: usize, add: bool) -> Result<()> {
        let (rows, k) = (w.rows, w.cols);
        if !w.wants_half(n) {
            let (table, wptr) = match &w.storage {
                Storage::Q4K(s) => (&self.kernels.q4k_mv, ptr(s, self.stream)),
                Storage::Half(s, HalfKind::F16) => (&self.kernels.f16_mv, ptr(s, self.stream)),
                Storage::Half(s, HalfKind::Bf16) => (&self.kernels.bf16_mv, ptr(s, self.stream)),
            };
            let mut done = 0;
            while done < n {
                let nv = *VECTORS.iter().rev().find(|&&v| v <= n - done).unwrap_or(&1);
                let r = rows_per_warp(rows, nv);
                let f = &table[VECTORS.iter().position(|&v| v == nv).unwrap_or(0)][rows_index(r)];
                let (xp, yp) = (x32 + (done * k * 4) as u64, y + (done * rows * 4) as u64);
                let (rows_i, k_i, add_i) = (rows as i32, k as i32, add as i32);
                let cfg = LaunchConfig {
                    grid_dim: (rows.div_ceil(4 * r) as u32, 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = self.stream.launch_builder(f);
                b.arg(&wptr).arg(&xp).arg(&yp).arg(&rows_i).arg(&k_i).arg(&add_i);
                // SAFETY: the pointers cover [nv, k] inputs and [nv, rows] outputs (the caller's buffers hold n rows).
                #[allow(unsafe_code)]
                unsafe { b.launch(cfg) }.map_err(device_err("matvec"))?;
                done += nv;
            }
            return Ok(());
        }
        let (a, a_type) = match &w.storage {
            Storage::Half(s, kind) => (ptr(s, self.stream), data_type(*kind)),
            Storage::Q4K(s) => {
                let (wp, out, k_i) = (ptr(s, self.stream), self.dequant, k as i32);
                let cfg = LaunchConfig {
                    grid_dim: ((rows * k / 256) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = self.stream.launch_builder(&self.kernels.q4k_dequant_f16);
                b.arg(&wp).arg(&out).arg(&k_i);
                // SAFETY: the scratch holds the largest Q4_K matrix.
                #[allow(unsafe_code)]
                unsafe { b.launch(cfg) }.map_err(device_err("q4k dequant"))?;
                (self.dequant, blas_sys::cudaDataType_t::CUDA_R_16F)
            }
        };
        let (alpha, beta) = (1f32, if add { 1f32 } else { 0f32 });
        // Row-major y[n, rows] = x[n, k] · W[rows, k]ᵀ is column-major yᵀ[rows, n] = W(as k×rows)ᵀ · xᵀ(k×n).
        // SAFETY: sizes as above; cuBLAS runs on the model's stream.
        #[allow(unsafe_code)]
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                rows as i32,
                n as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                a as *const _,
                a_type,
                k as i32,
                x16 as *const _,
                a_type,
                k as i32,
                (&beta) as *const f32 as *const _,
                y as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                rows as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Device(format!("cuda: cuBLAS GEMM: {e:?}")))
    }
}

fn data_type(k: HalfKind) -> blas_sys::cudaDataType_t {
    match k {
        HalfKind::F16 => blas_sys::cudaDataType_t::CUDA_R_16F,
        HalfKind::Bf16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
    }
}

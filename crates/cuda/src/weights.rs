//! Weight matrices on the GPU in their own format (GGUF's block layouts, f16, bf16), and the matmul that picks
//! the kernel: our matvec kernels (f32 activations) for up to 8 rows, cuBLAS (16-bit activations, f32 sums
//! and output) for more, the weights dequantized to 16 bits first where they are not already.

use crate::module::{rows_per_warp, Format, Kernels, VECTORS};
use crate::{device_err, Error, Result};
use candle_core::quantized::GgmlDType;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use mlx_serving_models::source::TensorData;
use std::sync::Arc;

/// 16-bit float kinds of the activations cuBLAS reads, as the kernels number them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HalfKind {
    F16 = 1,
    Bf16 = 2,
}

/// Rows of a matrix stored in one format.
pub(crate) struct Part {
    pub bytes: CudaSlice<u8>,
    pub format: Format,
    pub rows: usize,
}

/// A matrix `[rows, cols]` (`y = x · Wᵀ`): parts stacked by rows (q/k/v, gate/up), consecutive parts of one
/// format stored together.
pub(crate) struct Matrix {
    pub parts: Vec<Part>,
    pub rows: usize,
    pub cols: usize,
}

/// Row count up to which a step uses the matvec kernels.
pub(crate) const MATVEC_ROWS: usize = 8;

/// The kernels' format for a GGUF type.
fn format_of(t: GgmlDType) -> Option<Format> {
    Some(match t {
        GgmlDType::F16 => Format::F16,
        GgmlDType::BF16 => Format::Bf16,
        GgmlDType::Q4_0 => Format::Q4_0,
        GgmlDType::Q4_1 => Format::Q4_1,
        GgmlDType::Q5_0 => Format::Q5_0,
        GgmlDType::Q5_1 => Format::Q5_1,
        GgmlDType::Q8_0 => Format::Q8_0,
        GgmlDType::Q6K => Format::Q6K,
        GgmlDType::Q4K => Format::Q4K,
        _ => None?,
    })
}

impl Matrix {
    /// The parts stacked by rows, all with `cols` columns, each kept in its format where the kernels read it;
    /// other formats (and MLX block offsets) are dequantized and stored as f16.
    pub fn stacked(stream: &Arc<CudaStream>, name: &str, parts: &[TensorData<'_>]) -> Result<Self> {
        let cols = parts[0].shape[1];
        let mut groups: Vec<(Format, usize, Vec<u8>)> = Vec::new();
        for p in parts {
            let rows = p.shape[0];
            let (format, bytes) = match format_of(p.dtype).filter(|_| p.mins.is_none()) {
                Some(f) if cols.is_multiple_of(f.block().0) => (f, p.bytes.to_vec()),
                _ => (Format::F16, to_f16_bytes(name, p)?),
            };
            match groups.last_mut() {
                Some((f, r, b)) if *f == format => {
                    *r += rows;
                    b.extend_from_slice(&bytes);
                }
                _ => groups.push((format, rows, bytes)),
            }
        }
        // cuBLAS reads every part with activations of one kind: f16 and bf16 parts together are made all f16.
        let kinds = |f: Format| groups.iter().any(|g| g.0 == f);
        if kinds(Format::Bf16) && groups.iter().any(|g| g.0 != Format::Bf16) {
            let all: Vec<u8> = parts.iter().map(|p| to_f16_bytes(name, p)).collect::<Result<Vec<_>>>()?.concat();
            groups = vec![(Format::F16, parts.iter().map(|p| p.shape[0]).sum(), all)];
        }
        let parts = groups
            .into_iter()
            .map(|(format, rows, bytes)| {
                Ok(Part { bytes: stream.clone_htod(&bytes).map_err(device_err(name))?, format, rows })
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = parts.iter().map(|p| p.rows).sum();
        Ok(Self { parts, rows, cols })
    }

    /// The 16-bit kind cuBLAS reads this matrix's activations in.
    pub fn gemm_kind(&self) -> HalfKind {
        if self.parts.iter().any(|p| p.format == Format::Bf16) {
            HalfKind::Bf16
        } else {
            HalfKind::F16
        }
    }

    /// Whether `n` activation rows go through cuBLAS (so they are needed in 16 bits).
    pub fn wants_half(&self, n: usize) -> bool {
        n > MATVEC_ROWS || !self.cols.is_multiple_of(8)
    }

    /// Values of the largest part that cuBLAS reads dequantized (0 when every part is f16 or bf16).
    pub fn dequant_len(&self) -> usize {
        let half = |f: Format| f == Format::F16 || f == Format::Bf16;
        self.parts.iter().filter(|p| !half(p.format)).map(|p| p.rows * self.cols).max().unwrap_or(0)
    }

    /// Bytes on the GPU.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes.len()).sum()
    }
}

/// A tensor dequantized and stored as little-endian f16.
fn to_f16_bytes(name: &str, p: &TensorData<'_>) -> Result<Vec<u8>> {
    let f = p.to_f32().map_err(|e| Error::Device(format!("{name}: {e}")))?;
    let mut out = Vec::with_capacity(f.len() * 2);
    for x in f {
        let h = half::f16::from_f32(x);
        if !h.is_finite() && x.is_finite() {
            return Err(Error::Device(format!("{name}: a weight ({x}) is outside f16's range")));
        }
        out.extend_from_slice(&h.to_bits().to_le_bytes());
    }
    Ok(out)
}

/// What a matmul needs besides its operands: the stream, kernels, cuBLAS and a scratch buffer for dequantized
/// Q4_K weights.
pub(crate) struct MatmulCtx<'a> {
    pub stream: &'a Arc<CudaStream>,
    pub kernels: &'a Kernels,
    pub blas: &'a CudaBlas,
    /// 16-bit scratch of at least the largest `Matrix::dequant_len`.
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
        let (k, ldy) = (w.cols, w.rows);
        let mut col = 0;
        for part in &w.parts {
            let yp = y + (col * 4) as u64;
            if w.wants_half(n) {
                self.gemm(part, w.gemm_kind(), k, ldy, x16, yp, n, add)?;
            } else {
                self.matvec(part, k, ldy, x32, yp, n, add)?;
            }
            col += part.rows;
        }
        Ok(())
    }

    /// Up to 8 rows on the matvec kernels, in launches of 8, 4, 2 and 1 vectors.
    #[allow(clippy::too_many_arguments)]
    fn matvec(&self, part: &Part, k: usize, ldy: usize, x32: u64, y: u64, n: usize, add: bool) -> Result<()> {
        let (rows, wptr) = (part.rows, ptr(&part.bytes, self.stream));
        let mut done = 0;
        while done < n {
            let nv = *VECTORS.iter().rev().find(|&&v| v <= n - done).unwrap_or(&1);
            let r = rows_per_warp(part.format, rows, nv);
            let f = self.kernels.matvec(part.format, nv, r);
            let (xp, yp) = (x32 + (done * k * 4) as u64, y + (done * ldy * 4) as u64);
            let (rows_i, k_i, ldy_i, add_i) = (rows as i32, k as i32, ldy as i32, add as i32);
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(4 * r) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(f);
            b.arg(&wptr).arg(&xp).arg(&yp).arg(&rows_i).arg(&k_i).arg(&ldy_i).arg(&add_i);
            // SAFETY: the pointers cover [nv, k] inputs and nv output rows of stride ldy (the caller's buffers hold n).
            #[allow(unsafe_code)]
            unsafe { b.launch(cfg) }.map_err(device_err("matvec"))?;
            done += nv;
        }
        Ok(())
    }

    /// cuBLAS over `n` rows: the part as stored if it is 16-bit, else dequantized into the scratch first.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        part: &Part,
        kind: HalfKind,
        k: usize,
        ldy: usize,
        x16: u64,
        y: u64,
        n: usize,
        add: bool,
    ) -> Result<()> {
        let rows = part.rows;
        let a = match part.format {
            Format::F16 | Format::Bf16 => ptr(&part.bytes, self.stream),
            f => {
                let (wp, out, kind_i, rows_i, k_i) =
                    (ptr(&part.bytes, self.stream), self.dequant, kind as i32, rows as i32, k as i32);
                let cfg = LaunchConfig {
                    grid_dim: ((rows * k / 8).div_ceil(256) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = self.stream.launch_builder(&self.kernels.format(f).dequant);
                b.arg(&wp).arg(&out).arg(&kind_i).arg(&rows_i).arg(&k_i);
                // SAFETY: the scratch holds the largest dequantized part.
                #[allow(unsafe_code)]
                unsafe { b.launch(cfg) }.map_err(device_err("dequant"))?;
                self.dequant
            }
        };
        let ty = data_type(kind);
        let (alpha, beta) = (1f32, if add { 1f32 } else { 0f32 });
        // Row-major y[n, rows] (row stride ldy) = x[n, k] · W[rows, k]ᵀ is column-major yᵀ = W(as k×rows)ᵀ · xᵀ.
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
                ty,
                k as i32,
                x16 as *const _,
                ty,
                k as i32,
                (&beta) as *const f32 as *const _,
                y as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                ldy as i32,
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

#[cfg(test)]
mod gpu_tests {
    use super::*;
    use crate::module::Kernels;
    use cudarc::driver::CudaContext;
    use mlx_serving_test_support::rng::Rng;
    use std::borrow::Cow;

    /// Random weights `[rows, cols]` in GGUF type `t`: random bytes, with every block's scale fields set to
    /// small f16 values (any bit pattern is a valid quantized value; a random scale could be inf or NaN).
    fn random_tensor(t: GgmlDType, rows: usize, cols: usize, rng: &mut Rng) -> TensorData<'static> {
        let halves = |v: Vec<u16>| v.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>();
        let bytes = match t {
            GgmlDType::F16 => {
                halves((0..rows * cols).map(|_| half::f16::from_f32(rng.f32() * 0.1).to_bits()).collect())
            }
            GgmlDType::BF16 => {
                halves((0..rows * cols).map(|_| half::bf16::from_f32(rng.f32() * 0.1).to_bits()).collect())
            }
            _ => {
                let f = format_of(t).expect("a block format");
                let (values, size) = f.block();
                let scales: &[usize] = match f {
                    Format::Q4_1 | Format::Q5_1 | Format::Q4K => &[0, 2],
                    Format::Q6K => &[208],
                    _ => &[0],
                };
                let mut b: Vec<u8> = (0..rows * cols / values * size).map(|_| rng.next_u64() as u8).collect();
                for block in b.chunks_exact_mut(size) {
                    for &at in scales {
                        let s = half::f16::from_f32(0.002 + 0.01 * rng.f32().abs()).to_bits().to_le_bytes();
                        block[at..at + 2].copy_from_slice(&s);
                    }
                }
                b
            }
        };
        TensorData { dtype: t, shape: vec![rows, cols], bytes: Cow::Owned(bytes), mins: None }
    }

    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        (num / den).sqrt()
    }

    /// Every format's matvec (1 to 8 rows, f32 activations) and GEMM path (16-bit activations) against candle's
    /// CPU dequantization of the same bytes and an f64 product; also matrices stacked from parts of two formats
    /// (a Q4_K_M file's q/k/v), whose outputs land side by side.
    #[test]
    #[ignore = "needs an NVIDIA GPU: scripts/cuda-tests.sh"]
    fn every_format_matches_the_cpu_dequantization() {
        let ctx = CudaContext::new(0).unwrap();
        // SAFETY: one stream.
        #[allow(unsafe_code)]
        unsafe {
            ctx.disable_event_tracking()
        };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).unwrap();
        let kernels = Kernels::load(&ctx).unwrap();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let cols = 512;
        use GgmlDType::*;
        let cases: Vec<Vec<GgmlDType>> = vec![
            vec![F16],
            vec![BF16],
            vec![Q4_0],
            vec![Q4_1],
            vec![Q5_0],
            vec![Q5_1],
            vec![Q8_0],
            vec![Q6K],
            vec![Q4K],
            vec![Q5_0, Q5_0, Q8_0],
            vec![Q4K, Q6K],
        ];
        for types in cases {
            let tensors: Vec<TensorData<'static>> =
                types.iter().enumerate().map(|(i, &t)| random_tensor(t, 100 + 37 * i, cols, &mut rng)).collect();
            let w: Vec<f32> = tensors.iter().flat_map(|t| t.to_f32().unwrap()).collect();
            let m = Matrix::stacked(&stream, "w", &tensors).unwrap();
            let rows = m.rows;
            let dequant = stream.alloc_zeros::<u16>(m.dequant_len().max(1)).unwrap();
            let mm = MatmulCtx { stream: &stream, kernels: &kernels, blas: &blas, dequant: ptr(&dequant, &stream) };
            for n in [1, 3, 8, 12] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                let want: Vec<f64> = (0..n)
                    .flat_map(|v| {
                        let (x, w) = (&x, &w);
                        (0..rows).map(move |r| (0..cols).map(|k| w[r * cols + k] as f64 * x[v * cols + k] as f64).sum())
                    })
                    .collect();
                let x16: Vec<u16> = match m.gemm_kind() {
                    HalfKind::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect(),
                    HalfKind::Bf16 => x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect(),
                };
                let (xd, xd16) = (stream.clone_htod(&x).unwrap(), stream.clone_htod(&x16).unwrap());
                let yd = stream.alloc_zeros::<f32>(n * rows).unwrap();
                let (xp, x16p, yp) = (ptr(&xd, &stream), ptr(&xd16, &stream), ptr(&yd, &stream));
                mm.matmul(&m, xp, x16p, yp, n, false).unwrap();
                let got = stream.clone_dtoh(&yd).unwrap();
                let err = rel_err(&got, &want);
                // f32 activations: f32 rounding only; 16-bit activations (and bf16 weights' activations): their rounding.
                let bound = match (n > MATVEC_ROWS, m.gemm_kind()) {
                    (false, _) => 1e-5,
                    (true, HalfKind::F16) => 2e-3,
                    (true, HalfKind::Bf16) => 1e-2,
                };
                println!("{types:?} ({rows} x {cols}), {n} rows: relative error {err:.2e} (bound {bound:.0e})");
                assert!(err < bound, "{types:?}, {n} rows: relative error {err}");
                // `add` accumulates into y.
                mm.matmul(&m, xp, x16p, yp, n, true).unwrap();
                let twice = stream.clone_dtoh(&yd).unwrap();
                let doubled: Vec<f64> = want.iter().map(|w| 2.0 * w).collect();
                assert!(rel_err(&twice, &doubled) < bound, "{types:?}, {n} rows: add");
            }
        }
    }
}

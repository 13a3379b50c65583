//! Matrix products with GGUF-quantized weights. The tiled layout lives in `quant/layout.rs`, the rounded
//! activations of the integer paths in `quant/acts.rs`, the kernels in `quant/tiled.rs` (and `tiled/zmm.rs`).
//!
//! Three activation precisions, chosen per matrix:
//! - [`Activations::Int8`] (the default): each activation row is rounded to 8 bits per 32-value block, as
//!   llama.cpp does, and blocks are multiplied with integer dot products. Equal to exact arithmetic on the
//!   rounded activations up to f32 summation order.
//! - [`Activations::Int16`]: rounded to 16 bits per block instead (16-bit integer dot products): about 250
//!   times less rounding error, for the matmuls whose error shows most.
//! - [`Activations::F32`]: activations stay in f32, so the result is the float32 product with the
//!   dequantized weights up to summation order (what a float32 reference computes). Slower: on SmolLM2 0.66×
//!   the default's decode speed and 0.40× its prompt speed.
//!
//! Block layouts in GGUF (little-endian; `f16` scales):
//!
//! ```text
//!   Q4_0 (18 B per 32): d | qs[16]:          w[j] = d·((qs[j] & 0xF) − 8), w[j+16] = d·((qs[j] >> 4) − 8)
//!   Q4_1 (20 B per 32): d | m | qs[16]:      w[j] = d·(qs[j] & 0xF) + m,   w[j+16] = d·(qs[j] >> 4) + m
//!   Q5_0 (22 B per 32): d | qh: u32 | qs[16]: as Q4_0 with bit j of qh as bit 4 of value j, minus 16
//!   Q5_1 (24 B per 32): d | m | qh | qs[16]: as Q4_1 with bit j of qh as bit 4 of value j
//!   Q8_0 (34 B per 32): d | qs[32] as i8:    w[j] = d·qs[j]
//!   Q4_K (144 B per 256): d | dmin | scales[12] | qs[128]: eight 32-value sub-blocks, each with a 6-bit
//!        scale s and min m: w = d·s·q − dmin·m; sub-blocks 2c and 2c+1 are the low and high nibbles of
//!        qs[32c .. 32c+32]
//!   Q6_K (210 B per 256): ql[128] | qh[64] | scales[16] as i8 | d: sixteen 16-value sub-blocks with 8-bit
//!        scales: w = d·s·(q − 32), q the 4 bits of ql plus 2 bits of qh
//! ```
//!
//! Q4_0 and Q5_0 compute as Q4_1 and Q5_1 with `m = −8·d` and `m = −16·d` (exact), by the same kernels.
//!
//! The 32-value formats are stored at load in 8-row tiles: for each run of eight rows (the last one padded
//! with zero rows) and each block, the eight rows' scales, their eight mins (Q4_1, Q5_1), their high bits
//! as a 32-byte bit plane (Q5_0, Q5_1), then their quantized bytes in 4-byte words: word 0 of rows 0..8,
//! word 1 of rows 0..8, ... A 32-byte vector is then four consecutive values of each of eight rows, and the
//! kernels (`tiled.rs`) get each row's block sum in its own lane: no horizontal folds, and one tile decode
//! serves several activation rows. The file's bytes rearranged (Q5's high bits bit by bit; the last tile row
//! zero-padded), one sequential stream per eight rows.
//!
//! Q4_K is tiled too, per super-block of eight rows (`K4_TILE` bytes): the eight `d`, the eight `dmin`, the
//! eight rows' 6-bit scales of each sub-block (a byte each, unpacked from the file's 12 bytes), their mins,
//! then each 32-value sub-block's nibbles as a Q4_1 tile holds them (low nibbles values `4c .. 4c + 4`, high
//! ones `16 + 4c ..`, in 4-byte words across the rows). A sub-block then runs through the Q4_1 tile kernel
//! with scale `d·s` and min `−dmin·m` (exact products in f32). 2.8 % more bytes than the file (the
//! unpacked scales).
//!
//! Q6_K is tiled per super-block of eight rows too, in as many bytes as the file (`K6_TILE`): the eight `d`,
//! the rows' sixteen 16-value sub-block scales (a byte each), then per 32-value block the low four bits as a
//! Q4_1 tile's nibbles and the top two bits in two 32-byte vectors. The kernels take `q − 32` as signed bytes
//! (8-bit activations: one i16 accumulator per 16-value half, scaled by `madd` with the half's scales) or as
//! i16 multiplied by the scales (16-bit activations, `|·| ≤ 4096`).
//!
//! For a Q4_1 block and 8-bit activations `x ≈ dx·qx`: `Σ w·x ≈ d·dx·Σ q·qx + m·(dx·Σ qx)`. The min term
//! uses the sum of the *rounded* activations (llama.cpp's `s` in `block_q8_1`): then the total error is
//! `Σ w·(x − x̂)`, which cancels around zero-mean weights. With the exact `Σ x` instead, the error becomes
//! `Σ (w − m)·(x − x̂)`, biased by the block minimum; on SmolLM2 that moved first-step logprobs by 0.59 and
//! flipped greedy tokens at logit gaps up to 1.2; with the fix, 8 bits everywhere measure 0.25–0.30
//! (llama.cpp: 0.16–0.19, ≤ 0.22).
//!
//! Kernels are picked at run time ([`Isa`]): AVX2 (+FMA, F16C), AVX2 with VNNI dot products, or a portable
//! one. Every kernel computes each activation row's result with the same arithmetic whatever the batch, so
//! a row gets bitwise the same output alone, in a decode batch or in a prefill (seeded sampling does not
//! depend on batching or on the prefix cache).

use crate::pool::for_each_split_mut;
pub use acts::Q8Acts;
use acts::*;
use half::f16;
use layout::*;
use std::sync::OnceLock;

mod acts;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod layout;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod tiled;

pub const BLOCK: usize = 32;
/// Values per K-quant super-block.
pub const SUPER: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)] // GGML's names
pub enum QuantFormat {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q6_K,
    /// Q4_1's arithmetic with one scale and min per 64 values (MLX's affine 4-bit, group 64): 4.5 bits per
    /// weight where Q4_1 needs 5. A file block is `d | m | qs[32]`, bytes `16j .. 16j + 16` of `qs` holding
    /// 32-value sub-block `j` as a Q4_1 block's 16 bytes do.
    A4_64,
    /// The same with one scale and min per 128 values (MLX group 128): 4.25 bits per weight.
    A4_128,
}

impl QuantFormat {
    /// Every format the kernels take.
    pub const ALL: [QuantFormat; 9] = [
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Q8_0,
        QuantFormat::Q4_K,
        QuantFormat::Q6_K,
        QuantFormat::A4_64,
        QuantFormat::A4_128,
    ];

    /// Byte offsets of the f16 fields (scales and stored mins) in a file block: what a test or benchmark
    /// sets to finite values after filling a block with random bytes.
    pub fn f16_offsets(self) -> &'static [usize] {
        match self {
            Self::Q4_1 | Self::Q5_1 | Self::Q4_K | Self::A4_64 | Self::A4_128 => &[0, 2],
            Self::Q6_K => &[208],
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => &[0],
        }
    }

    /// Weights per block in the file: 32, 256 for the K-quants, 64 or 128 for the `A4` formats.
    pub fn block_len(self) -> usize {
        match self {
            Self::Q4_K | Self::Q6_K => SUPER,
            Self::A4_64 => 64,
            Self::A4_128 => 128,
            _ => BLOCK,
        }
    }

    /// The `A4` format with one scale and min per `group` values (64 or 128).
    pub fn affine4(group: usize) -> Option<Self> {
        match group {
            64 => Some(Self::A4_64),
            128 => Some(Self::A4_128),
            _ => None,
        }
    }

    /// 32-value sub-blocks sharing a scale and min in an `A4` format (else 1).
    pub(crate) fn sub_blocks(self) -> usize {
        match self {
            Self::A4_64 | Self::A4_128 => self.block_len() / BLOCK,
            _ => 1,
        }
    }

    /// Bytes per block in the file.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4_K => 144,
            Self::Q6_K => 210,
            Self::A4_64 | Self::A4_128 => 4 + self.block_len() / 2,
        }
    }

    /// For the formats without a stored min: the min as a multiple of the scale (`m = zero · d`).
    fn zero_point(self) -> Option<f32> {
        match self {
            Self::Q4_0 => Some(-8.0),
            Self::Q5_0 => Some(-16.0),
            _ => None,
        }
    }

    /// Widths of a stored 32-value block's fields in file order (scale, min, high bits, quantized values),
    /// which a tile keeps in this order; empty for the K-quants and `A4` (their tiles: `tile_q4k`, `tile_q6k`,
    /// `tile_a4`).
    fn fields(self) -> &'static [usize] {
        match self {
            Self::Q4_0 => &[2, 16],
            Self::Q4_1 => &[2, 2, 16],
            Self::Q5_0 => &[2, 4, 16],
            Self::Q5_1 => &[2, 2, 4, 16],
            Self::Q8_0 => &[2, 32],
            _ => &[],
        }
    }

    /// Stored bytes of a row of `cols` values.
    fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_len() * self.block_bytes()
    }

    /// Stored bytes of a tiled format's row of tiles (eight rows of `cols` values).
    pub(crate) fn tile_row_bytes(self, cols: usize) -> usize {
        match self {
            Self::Q4_K => cols / SUPER * K4_TILE,
            Self::Q6_K => cols / SUPER * K6_TILE,
            // `A4`: as many bytes as the file (`tile_a4`).
            _ => TILE_ROWS * self.row_bytes(cols),
        }
    }

    /// A 32-value format's bytes per tile (one block of eight rows); the K-quants' tiles: `K4_TILE`, `K6_TILE`.
    pub(crate) fn tile_bytes(self) -> usize {
        debug_assert!(!self.fields().is_empty(), "{self:?}: tile_bytes is for the 32-value formats");
        TILE_ROWS * self.block_bytes()
    }

    /// Offset of field `f` (see `fields`) in a tile; `tile_field(fields().len() - 1)` is the quantized
    /// values'.
    pub(crate) fn tile_field(self, f: usize) -> usize {
        debug_assert!(!self.fields().is_empty(), "{self:?}: tile_field is for the 32-value formats");
        TILE_ROWS * self.fields()[..f].iter().sum::<usize>()
    }

    /// Offset of the quantized values in a tile: after the eight scales, eight mins (Q4_1, Q5_1) and the
    /// high bits (Q5_0, Q5_1).
    pub(crate) fn tile_qs(self) -> usize {
        self.tile_field(self.fields().len() - 1)
    }
}

/// Rows per tile in the tiled formats.
pub(crate) const TILE_ROWS: usize = 8;

/// A Q4_K tile (eight rows' super-block): `d` and `dmin` (eight f16 each), then the sub-blocks' scales and
/// mins (byte `8j + lane`), then the eight sub-blocks' nibbles (`K4_QS` on, 128 bytes each, as a Q4_1 tile's).
pub(crate) const K4_TILE: usize = K4_QS + 8 * 128;
/// Offset of the sub-block scales in a Q4_K tile; the mins follow at `K4_MINS`, the nibbles at `K4_QS`.
pub(crate) const K4_SCALES: usize = 32;
pub(crate) const K4_MINS: usize = 96;
pub(crate) const K4_QS: usize = 160;

/// A Q6_K tile (eight rows' super-block, as many bytes as the file's): `d` (eight f16), the sixteen 16-value
/// sub-blocks' scales (byte `8k + lane`, i8), then per 32-value block `K6_BLOCK` bytes: the low four bits as a
/// Q4_1 tile's nibbles, then the top two bits in two 32-byte vectors (see `tile_q6k`).
pub(crate) const K6_TILE: usize = K6_BLOCKS + 8 * K6_BLOCK;
pub(crate) const K6_SCALES: usize = 16;
pub(crate) const K6_BLOCKS: usize = K6_SCALES + 128;
pub(crate) const K6_BLOCK: usize = 128 + 64;

/// How activations enter a quantized matmul.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    /// Rounded to 8 bits per 32-value block; integer dot products (llama.cpp's scheme).
    #[default]
    Int8,
    /// Rounded to 16 bits per 32-value block; integer dot products on 16-bit lanes: about 250 times less
    /// rounding than `Int8`.
    Int16,
    /// Kept in f32: the float32 product with the dequantized weights, up to summation order.
    F32,
}

impl std::str::FromStr for Activations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "int8" => Ok(Self::Int8),
            "int16" => Ok(Self::Int16),
            "f32" => Ok(Self::F32),
            _ => Err(format!("unknown activation precision {s:?} (int8, int16 or f32)")),
        }
    }
}

/// Instruction set the kernels use, detected once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// 512-bit kernels for the integer paths (AVX-512 F, BW, VL and VNNI): two tiles (16 weight rows) per
    /// vector, `vpdpbusd` / `vpdpwssd` on 64 bytes; f32 activations and attention run the AVX2 kernels.
    /// `qmatmul` runs them for products of at least 64 activation rows (prompts; `MLX_SERVING_ZMM_MIN_ROWS`)
    /// and the 256-bit VNNI ones for fewer (decode). On the device's Xeon (Sapphire Rapids class, 2 cores):
    /// in cache they are 1.15–1.3x faster at 4–8 rows, and `pp512` gains 1.16–1.18x; but running them for
    /// decode too made single-stream decode 0.76–0.92x and 8 streams 0.95–0.96x. Why is not pinned down:
    /// the weights of two tiles streamed at once from L3, or the core's lower clock under 512-bit work.
    Avx512,
    /// The AVX2 kernels with AVX-512 VNNI integer dot products on 256-bit vectors (`vpdpbusd`, `vpdpwssd`;
    /// AVX512-VNNI with AVX512-VL: Intel since Ice Lake / Sapphire Rapids, AMD since Zen 4).
    Avx512Vnni,
    /// AVX2 with FMA and F16C (x86-64 since Haswell / Zen).
    Avx2,
    /// Plain Rust, any target.
    Portable,
}

impl Isa {
    /// The best path this CPU supports, unless `MLX_SERVING_ISA` caps it: `portable`, `avx2` (AVX2 without
    /// VNNI), `avx512vnni` (256-bit vectors with VNNI) or `avx512` (the default where the CPU has it), to test
    /// a path or to compare. An unknown value is reported on stderr and ignored. Read once.
    pub fn detected() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let want = std::env::var("MLX_SERVING_ISA").unwrap_or_default();
            let cap = match want.as_str() {
                "portable" => Isa::Portable,
                "avx2" => Isa::Avx2,
                "avx512vnni" => Isa::Avx512Vnni,
                "" | "avx512" => Isa::Avx512,
                other => {
                    eprintln!("MLX_SERVING_ISA={other:?} is not one of portable, avx2, avx512vnni, avx512: ignored");
                    Isa::Avx512
                }
            };
            Isa::all_on_this_cpu().into_iter().find(|isa| isa.rank() <= cap.rank()).unwrap_or(Isa::Portable)
        })
    }

    /// Order of capability: portable 0, AVX2 1, VNNI 2, AVX-512 3.
    fn rank(self) -> u8 {
        match self {
            Isa::Portable => 0,
            Isa::Avx2 => 1,
            Isa::Avx512Vnni => 2,
            Isa::Avx512 => 3,
        }
    }

    /// Whether this CPU can run the path (whatever `MLX_SERVING_ISA` says).
    pub fn on_this_cpu(self) -> bool {
        static CPU: OnceLock<(bool, bool, bool)> = OnceLock::new();
        let (avx2, vnni, avx512) = *CPU.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = crate::vec::simd::has_avx2() && std::arch::is_x86_feature_detected!("f16c");
                let vnni = std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vl");
                let wide =
                    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw");
                (avx2, avx2 && vnni, avx2 && vnni && wide)
            }
            #[cfg(not(target_arch = "x86_64"))]
            (false, false, false)
        });
        match self {
            Isa::Avx512 => avx512,
            Isa::Avx512Vnni => vnni,
            Isa::Avx2 => avx2,
            Isa::Portable => true,
        }
    }

    /// The path for a product over `n` activation rows: `Avx512` runs 256-bit VNNI below `zmm_min_rows`.
    /// The two give bitwise the same results, so this keeps results independent of the batch.
    pub fn for_rows(self, n: usize) -> Isa {
        if self == Isa::Avx512 && n < zmm_min_rows() {
            Isa::Avx512Vnni
        } else {
            self
        }
    }

    /// Whether the path runs the AVX2 kernels (with or without VNNI; the 512-bit path runs them where it has
    /// none of its own).
    pub fn avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512Vnni | Isa::Avx512)
    }

    /// Every path this CPU can run, best first (tests run them all).
    pub fn all_on_this_cpu() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx512Vnni, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.on_this_cpu()).collect()
    }
}

/// A `[rows, cols]` weight matrix from GGUF blocks, tiled as the module header describes.
#[derive(Clone, Debug)]
pub struct QMatrix {
    format: QuantFormat,
    activations: Activations,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    /// Per-block offsets added to the weights, `[rows, cols / 32]` (see [`QMatrix::with_block_mins`]).
    mins: Option<Vec<f32>>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QuantError(String);

impl QuantError {
    pub(crate) fn new(msg: String) -> Self {
        Self(msg)
    }
}

impl QMatrix {
    /// Takes the tensor's raw GGUF bytes (a slice of a mapped file: tiling is the one copy they make).
    pub fn new(format: QuantFormat, rows: usize, cols: usize, data: impl AsRef<[u8]>) -> Result<Self, QuantError> {
        let data = data.as_ref();
        let len = format.block_len();
        if rows == 0 || cols == 0 || !cols.is_multiple_of(len) {
            return Err(QuantError(format!("{format:?} [{rows}, {cols}]: need rows, and columns a multiple of {len}")));
        }
        let want = rows * format.row_bytes(cols);
        if data.len() != want {
            return Err(QuantError(format!("{format:?} [{rows}, {cols}] needs {want} bytes, got {}", data.len())));
        }
        let data = tile(format, cols, data);
        Ok(Self { format, activations: Activations::default(), rows, cols, data, mins: None })
    }

    /// Q4_1 blocks (`data`, the GGUF layout) whose runs of `group / 32` blocks along a row share one scale
    /// and min, as the `A4` format of that group (64 or 128): the same products, bitwise, from 4.5 (4.25) bits
    /// per weight instead of 5. This is how MLX's affine 4-bit weights, read as Q4_1 blocks, are stored;
    /// tiling is the one copy.
    pub fn from_q4_1_groups(
        group: usize,
        rows: usize,
        cols: usize,
        data: impl AsRef<[u8]>,
    ) -> Result<Self, QuantError> {
        let data = data.as_ref();
        let format = QuantFormat::affine4(group)
            .ok_or_else(|| QuantError(format!("Q4_1 groups of {group}: the shared-scale formats take 64 or 128")))?;
        let want = rows * QuantFormat::Q4_1.row_bytes(cols);
        if rows == 0 || !cols.is_multiple_of(group) || data.len() != want {
            return Err(QuantError(format!(
                "Q4_1 in groups of {group} [{rows}, {cols}]: need rows, columns a multiple of {group} and {want} bytes, got {}",
                data.len()
            )));
        }
        if let Some(at) =
            data.chunks_exact(20 * format.sub_blocks()).position(|g| g.chunks_exact(20).any(|b| b[..4] != g[..4]))
        {
            let (r, c) = (at / (cols / group), at % (cols / group) * group);
            return Err(QuantError(format!(
                "Q4_1 in groups of {group}: row {r}'s blocks at columns {c}..{} differ in scale or min",
                c + group
            )));
        }
        let data = tile_a4(format, cols, data, true);
        Ok(Self { format, activations: Activations::default(), rows, cols, data, mins: None })
    }

    /// Q4_1 blocks (`data`, rows of `cols` values) as the most compact format that holds them exactly:
    /// `A4_128` or `A4_64` where every run of four or two blocks along a row shares its scale and min (MLX's
    /// affine 4-bit weights read as Q4_1), else Q4_1 itself.
    pub fn from_q4_1(rows: usize, cols: usize, data: impl AsRef<[u8]>) -> Result<Self, QuantError> {
        let data = data.as_ref();
        let shared = |group: usize| {
            cols.is_multiple_of(group)
                && data.len().is_multiple_of(20 * group / 32)
                && data.chunks_exact(20 * group / 32).all(|g| g.chunks_exact(20).all(|b| b[..4] == g[..4]))
        };
        match [128, 64].into_iter().find(|&g| shared(g)) {
            Some(group) => Self::from_q4_1_groups(group, rows, cols, data),
            None => Self::new(QuantFormat::Q4_1, rows, cols, data),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }

    pub fn activations(&self) -> Activations {
        self.activations
    }

    pub fn with_activations(mut self, a: Activations) -> Self {
        self.activations = a;
        self
    }

    /// Bytes of quantized values plus scales and mins: the file's size. A product reads about this much: the
    /// same bytes rearranged, plus the zero padding of the last tile row (and for Q4_K 2.8 % more: its
    /// sub-block scales and mins unpacked to a byte each).
    pub fn weight_bytes(&self) -> usize {
        self.rows * self.format.row_bytes(self.cols)
    }

    /// Stacks matrices with the same format and column count into one (rows of the first, then the
    /// second, ...), so projections that read the same input run as one matmul.
    pub fn concat_rows(parts: &[QMatrix]) -> Result<Self, QuantError> {
        let first = parts.first().ok_or_else(|| QuantError("nothing to concatenate".into()))?;
        if parts.iter().any(|p| p.format != first.format || p.cols != first.cols || p.activations != first.activations)
        {
            return Err(QuantError("concatenated matrices must share format, column count and activations".into()));
        }
        let (format, cols) = (first.format, first.cols);
        let rows = parts.iter().map(|p| p.rows).sum();
        let data = if parts.iter().rev().skip(1).any(|p| !p.rows.is_multiple_of(TILE_ROWS)) {
            // A part ending inside a tile: tile the rows again.
            let file: Vec<u8> = parts.iter().flat_map(|p| untile(format, p.rows, cols, &p.data)).collect();
            tile(format, cols, &file)
        } else {
            let mut data = crate::mapped::huge_zeroed::<u8>(parts.iter().map(|p| p.data.len()).sum());
            let mut at = 0;
            for p in parts {
                data[at..at + p.data.len()].copy_from_slice(&p.data);
                at += p.data.len();
            }
            data
        };
        let mins = parts.iter().any(|p| p.mins.is_some()).then(|| {
            let zeros = |p: &QMatrix| vec![0f32; p.rows * (cols / BLOCK)];
            parts.iter().flat_map(|p| p.mins.clone().unwrap_or_else(|| zeros(p))).collect()
        });
        Ok(Self { format, activations: first.activations, rows, cols, data, mins })
    }

    /// A copy of the first `n` rows (`n` a multiple of the 8-row tiles, at most `rows`): e.g. an output head cut to
    /// the most frequent tokens, for a draft model whose proposals need no rare ones.
    pub fn first_rows(&self, n: usize) -> Result<Self, QuantError> {
        if n == 0 || n > self.rows || !n.is_multiple_of(TILE_ROWS) {
            return Err(QuantError(format!(
                "first_rows({n}): must be a positive multiple of {TILE_ROWS} up to {}",
                self.rows
            )));
        }
        let bytes = n / TILE_ROWS * self.format.tile_row_bytes(self.cols);
        let mut data = crate::mapped::huge_zeroed::<u8>(bytes);
        data.copy_from_slice(&self.data[..bytes]);
        let mins = self.mins.as_ref().map(|m| m[..n * self.blocks_per_row()].to_vec());
        Ok(Self { format: self.format, activations: self.activations, rows: n, cols: self.cols, data, mins })
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// Row `r`: its row of tiles, and its lane in each tile.
    fn row(&self, r: usize) -> RowRef<'_> {
        let (format, nb) = (self.format, self.blocks_per_row());
        RowRef { format, nb, data: self.tile_row(r / TILE_ROWS), lane: r % TILE_ROWS }
    }

    /// The tiles of rows `8g .. 8g + 8`.
    pub(crate) fn tile_row(&self, g: usize) -> &[u8] {
        let stride = self.format.tile_row_bytes(self.cols);
        &self.data[g * stride..(g + 1) * stride]
    }

    /// Row `r` dequantized into `out` (`cols` floats).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.row(r).dequantize(out);
        if let Some(mins) = &self.mins {
            let nb = self.blocks_per_row();
            for (o, &m) in out.chunks_exact_mut(BLOCK).zip(&mins[r * nb..(r + 1) * nb]) {
                o.iter_mut().for_each(|v| *v += m);
            }
        }
    }

    /// Adds an offset per 32-value block: row `r`'s block `b` holds `w + mins[r · cols/32 + b]`. This is how a
    /// format with a zero point per block that the tiles do not carry runs on our kernels: MLX's 8-bit affine
    /// `s·q + b` (`q` in 0..256) is Q8_0's `d·(q − 128)` with `d = s` plus the offset `b + 128·s`. A product
    /// adds `Σ_b mins · (the block's activation sum)` (of the rounded activations on the integer paths, as
    /// Q4_1's minimum does), in a fixed order per output: still bitwise independent of the batch.
    pub fn with_block_mins(mut self, mins: Vec<f32>) -> Result<Self, QuantError> {
        let want = self.rows * self.blocks_per_row();
        if mins.len() != want {
            return Err(QuantError(format!("{} block offsets for {want} blocks", mins.len())));
        }
        self.mins = Some(mins);
        Ok(self)
    }
}

/// One weight row: lane `lane` of a row of tiles.
#[derive(Clone, Copy)]
struct RowRef<'a> {
    format: QuantFormat,
    /// Blocks in the row.
    nb: usize,
    /// The row's tile row.
    data: &'a [u8],
    lane: usize,
}

/// A 32-value block decoded: `w[j] = d·q[j] + m` (Q6_K's 16-value sub-scales are multiplied into `q`).
struct Decoded {
    q: [i32; BLOCK],
    d: f32,
    m: f32,
}

/// Q4_K sub-block `j`'s 6-bit scale and min from the super-block's 12 scale bytes.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

impl<'a> RowRef<'a> {
    /// Byte offset of the row's field `f` (scale or min, see [`QuantFormat::fields`]) in block `b`'s tile.
    #[inline(always)]
    fn field(&self, b: usize, f: usize) -> usize {
        b * self.format.tile_bytes() + self.format.tile_field(f) + 2 * self.lane
    }

    /// The tiled formats' f16 scale and stored min of block `b` (zero where the format stores none).
    #[inline(always)]
    fn scale_min_f16(&self, b: usize) -> (f16, f16) {
        let d = f16_at(self.data, self.field(b, 0));
        match self.format {
            QuantFormat::Q4_1 | QuantFormat::Q5_1 => (d, f16_at(self.data, self.field(b, 1))),
            _ => (d, f16::ZERO),
        }
    }

    /// Block `b`'s min from its f32 scale and the stored f16 min.
    #[inline(always)]
    fn min_of(&self, d: f32, m: f32) -> f32 {
        match self.format.zero_point() {
            Some(z) => z * d,
            None => m,
        }
    }

    /// The tile (eight rows' super-block) holding Q4_K block `b`.
    fn q4k_tile(&self, b: usize) -> &'a [u8] {
        let s = b / (SUPER / BLOCK);
        &self.data[s * K4_TILE..(s + 1) * K4_TILE]
    }

    /// The tile (eight rows' super-block) holding Q6_K block `b`.
    fn q6k_tile(&self, b: usize) -> &'a [u8] {
        let s = b / (SUPER / BLOCK);
        &self.data[s * K6_TILE..(s + 1) * K6_TILE]
    }

    /// The tile (eight rows' block) holding `A4` block `b`, and `b`'s sub-block in it.
    fn a4_tile(&self, b: usize) -> (&'a [u8], usize) {
        let (n, len) = (self.format.sub_blocks(), TILE_ROWS * self.format.block_bytes());
        (&self.data[b / n * len..(b / n + 1) * len], b % n)
    }

    /// Block `b`'s scale and min as f32.
    fn scale_min(&self, b: usize) -> (f32, f32) {
        match self.format {
            QuantFormat::A4_64 | QuantFormat::A4_128 => {
                let (t, _) = self.a4_tile(b);
                (f16_at(t, 2 * self.lane).to_f32(), f16_at(t, 16 + 2 * self.lane).to_f32())
            }
            QuantFormat::Q4_K => {
                let (t, j, lane) = (self.q4k_tile(b), b % (SUPER / BLOCK), self.lane);
                let (sc, m) = (t[K4_SCALES + 8 * j + lane], t[K4_MINS + 8 * j + lane]);
                (f16_at(t, 2 * lane).to_f32() * sc as f32, -(f16_at(t, 16 + 2 * lane).to_f32() * m as f32))
            }
            QuantFormat::Q6_K => (f16_at(self.q6k_tile(b), 2 * self.lane).to_f32(), 0.0),
            _ => {
                let (d, m) = self.scale_min_f16(b);
                (d.to_f32(), self.min_of(d.to_f32(), m.to_f32()))
            }
        }
    }

    /// The quantized bytes of 32-value block `b` (16 or 32 of them) as the file stores them.
    fn qs(&self, b: usize) -> [u8; BLOCK] {
        let len = *self.format.fields().last().expect("a tiled format");
        let mut qs = [0u8; BLOCK];
        let t = b * self.format.tile_bytes() + self.format.tile_qs() + 4 * self.lane;
        for (w, word) in qs[..len].chunks_exact_mut(4).enumerate() {
            word.copy_from_slice(&self.data[t + 4 * TILE_ROWS * w..][..4]);
        }
        qs
    }

    /// Block `b` decoded.
    fn block(&self, b: usize) -> Decoded {
        let (d, m) = self.scale_min(b);
        let mut q = [0i32; BLOCK];
        match self.format {
            QuantFormat::Q4_0 | QuantFormat::Q4_1 | QuantFormat::Q5_0 | QuantFormat::Q5_1 => {
                let nf = self.format.fields().len();
                let qs = self.qs(b);
                let qh = if matches!(self.format, QuantFormat::Q5_0 | QuantFormat::Q5_1) {
                    let o = b * self.format.tile_bytes() + self.format.tile_field(nf - 2) + 4 * self.lane;
                    plane_word(&self.data[o..o + 4])
                } else {
                    0
                };
                for j in 0..16 {
                    q[j] = (qs[j] & 0xF) as i32 | (((qh >> j) & 1) << 4) as i32;
                    q[j + 16] = (qs[j] >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32;
                }
            }
            QuantFormat::Q8_0 => {
                let qs = self.qs(b);
                for j in 0..BLOCK {
                    q[j] = qs[j] as i8 as i32;
                }
            }
            QuantFormat::Q4_K | QuantFormat::A4_64 | QuantFormat::A4_128 => {
                let qs = if self.format == QuantFormat::Q4_K {
                    &self.q4k_tile(b)[K4_QS + 128 * (b % (SUPER / BLOCK))..]
                } else {
                    let (t, j) = self.a4_tile(b);
                    &t[A4_QS + 128 * j..]
                };
                for (c, e) in nibble_bytes() {
                    let byte = qs[nibble_word_offset(c, self.lane, e)];
                    q[4 * c + e] = (byte & 0xF) as i32;
                    q[16 + 4 * c + e] = (byte >> 4) as i32;
                }
            }
            QuantFormat::Q6_K => {
                let (t, j, lane) = (self.q6k_tile(b), b % (SUPER / BLOCK), self.lane);
                let blk = &t[K6_BLOCKS + K6_BLOCK * j..];
                for (c, e) in nibble_bytes() {
                    let [v0, v1] = q6k_tile_values(blk, c, lane, e);
                    (q[4 * c + e], q[16 + 4 * c + e]) = (v0 as i32 - 32, v1 as i32 - 32);
                }
                for (l, v) in q.iter_mut().enumerate() {
                    *v *= t[K6_SCALES + 8 * (2 * j + l / 16) + lane] as i8 as i32;
                }
            }
        }
        Decoded { q, d, m }
    }

    fn dequantize(&self, out: &mut [f32]) {
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate().take(self.nb) {
            let blk = self.block(b);
            for (o, q) in o.iter_mut().zip(blk.q) {
                *o = blk.d * q as f32 + blk.m;
            }
        }
    }

    /// `Σ w·x` for one f32 activation row, given its per-block sums (for the minimums).
    fn dot_f32_portable(&self, x: &[f32], xsum: &[f32]) -> f32 {
        let mut s = 0f32;
        for (b, xb) in x.chunks_exact(BLOCK).enumerate().take(self.nb) {
            let blk = self.block(b);
            let acc: f32 = blk.q.iter().zip(xb).map(|(&q, &x)| q as f32 * x).sum();
            s += blk.d * acc + blk.m * xsum[b];
        }
        s
    }

    /// `out[t] = Σ w·x̂` for every activation row `t` of `acts` (8- or 16-bit), in integer arithmetic per
    /// block; each block is decoded once for all the rows.
    fn dot_int8_portable(&self, acts: &Q8Acts, out: &mut [f32]) {
        let nb = self.nb;
        out.fill(0.0);
        for b in 0..nb {
            let blk = self.block(b);
            for (t, s) in out.iter_mut().enumerate() {
                let o = t * acts.k + b * BLOCK;
                // i64: Q6_K's sub-scaled values times 16-bit activations can pass i32 over a block.
                let isum: i64 = (0..BLOCK).map(|j| blk.q[j] as i64 * acts.value(o + j) as i64).sum();
                *s += blk.d * acts.d[t * nb + b] * isum as f32 + blk.m * acts.s[t * nb + b];
            }
        }
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

/// The fewest activation rows for which the AVX-512 path runs its 512-bit kernels (the 256-bit VNNI ones
/// below): `MLX_SERVING_ZMM_MIN_ROWS`, default 64, read once. See `Isa::Avx512` for why.
fn zmm_min_rows() -> usize {
    static MIN: OnceLock<usize> = OnceLock::new();
    *MIN.get_or_init(|| std::env::var("MLX_SERVING_ZMM_MIN_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(64))
}

/// Task boundaries over `m` weight rows (integer paths): guided self-scheduling. Each task
/// takes `1 / (2 · threads)` of the rows left (whole pairs of 8-row tiles: the 512-bit kernels take two at
/// once), so the first tasks are long contiguous runs (what the prefetcher needs) and the last ones short,
/// so the thread that finishes first waits at most a short task for the other. With equal tasks (four per
/// thread) the caller spent 5 % of decode waiting at the end of each matmul.
fn guided_bounds(m: usize) -> Vec<usize> {
    let div = 2 * crate::pool::global().threads();
    let mut bounds = vec![0];
    let mut start = 0;
    while start < m {
        let size = (m - start).div_ceil(div).next_multiple_of(2 * TILE_ROWS);
        start = (start + size).min(m);
        bounds.push(start);
    }
    bounds
}

/// `y = x · wᵀ`: `x` is `[n, cols]`, `y` is `[n, rows]`, both row-major.
///
/// Parallel over weight rows; each task reads its weight rows once and applies them to every activation row
/// (the weight read is shared across the batch, which is where batching pays on a CPU).
pub fn qmatmul(w: &QMatrix, x: &[f32], y: &mut [f32]) {
    qmatmul_on(Isa::detected().for_rows(x.len() / w.cols), w, x, y)
}

/// `qmatmul` on a given instruction set (tests force each one).
pub fn qmatmul_on(isa: Isa, w: &QMatrix, x: &[f32], y: &mut [f32]) {
    matmul(isa, w, x, y, false)
}

/// `y += x · wᵀ` (a residual added in the same pass): bitwise `y + qmatmul(w, x)`.
pub fn qmatmul_add(w: &QMatrix, x: &[f32], y: &mut [f32]) {
    qmatmul_add_on(Isa::detected().for_rows(x.len() / w.cols), w, x, y)
}

/// `qmatmul_add` on a given instruction set.
pub fn qmatmul_add_on(isa: Isa, w: &QMatrix, x: &[f32], y: &mut [f32]) {
    matmul(isa, w, x, y, true)
}

/// `qmatmul` of activations already rounded (`Q8Acts::rms_norm`, `Q8Acts::swiglu`), stored into `y`, or added
/// to it with `add`. `w` must take integer activations of the width `acts` has (`Int16` for 16-bit ones).
pub fn qmatmul_acts(w: &QMatrix, acts: &Q8Acts, y: &mut [f32], add: bool) {
    qmatmul_acts_on(Isa::detected().for_rows(acts.rows()), w, acts, y, add)
}

/// `qmatmul_acts` on a given instruction set.
pub fn qmatmul_acts_on(isa: Isa, w: &QMatrix, acts: &Q8Acts, y: &mut [f32], add: bool) {
    let n = acts.rows();
    assert_eq!(acts.k, w.cols, "activation row length");
    assert_eq!(y.len(), n * w.rows, "output length");
    let want = match w.activations {
        Activations::Int8 => Some(false),
        Activations::Int16 => Some(true),
        Activations::F32 => None,
    };
    assert_eq!(
        want,
        Some(acts.is_wide()),
        "{:?} weights given {}-bit activations",
        w.activations,
        if acts.is_wide() { 16 } else { 8 }
    );
    assert!(isa.on_this_cpu(), "{isa:?} kernels asked for on a CPU without them");
    int_matmul(isa, w, acts, y, add);
}

fn matmul(isa: Isa, w: &QMatrix, x: &[f32], y: &mut [f32], add: bool) {
    let (k, m) = (w.cols, w.rows);
    let n = activation_rows(isa, k, m, x, y);
    if n == 0 {
        return;
    }
    match w.activations {
        Activations::Int8 | Activations::Int16 => {
            let wide = w.activations == Activations::Int16;
            let acts = Q8Acts::build(isa, RowSource::Plain(x), n, k, wide);
            int_matmul(isa, w, &acts, y, add);
        }
        Activations::F32 => {
            let xsums: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
            let tiled = isa.avx2();
            #[cfg(target_arch = "x86_64")]
            if tiled {
                // SAFETY: as for the integer paths (`int_matmul`); `x` and `xsums` hold the `n` activation rows.
                tiled_tasks(y, n, m, add, |r0, rows, yp| unsafe {
                    tiled::rows_tiled_f32(w, r0, rows, x, &xsums, n, yp)
                });
            }
            if !tiled {
                rows_parallel(y, n, m, add, |r, o| {
                    for (t, o) in o.iter_mut().enumerate() {
                        *o = w.row(r).dot_f32_portable(&x[t * k..(t + 1) * k], &xsums[t * w.blocks_per_row()..]);
                    }
                });
            }
            add_block_mins(w, &xsums, n, y);
        }
    }
}

/// The number of activation rows of a `[m, k]` product of `x` into `y`, checking both lengths and that `isa`
/// runs here.
pub(crate) fn activation_rows(isa: Isa, k: usize, m: usize, x: &[f32], y: &[f32]) -> usize {
    let n = x.len() / k;
    assert_eq!(x.len(), n * k, "activation length");
    assert_eq!(y.len(), n * m, "output length");
    assert!(isa.on_this_cpu(), "{isa:?} kernels asked for on a CPU without them");
    n
}

/// The integer-activation product of `qmatmul` (stored or added).
fn int_matmul(isa: Isa, w: &QMatrix, acts: &Q8Acts, y: &mut [f32], add: bool) {
    let (n, m) = (acts.rows(), w.rows);
    if n == 0 {
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an AVX2 path means AVX2, FMA and F16C were detected (and VNNI for its path); `w` is tiled;
        // `acts` holds the `n` activation rows; `tiled_tasks` gives each task whole tiles and its own columns
        // of `y`.
        tiled_tasks(y, n, m, add, |r0, rows, yp| unsafe {
            match isa {
                Isa::Avx512 => tiled::rows_tiled_512(w, r0, rows, acts, n, yp),
                Isa::Avx512Vnni => tiled::rows_tiled_vnni(w, r0, rows, acts, n, yp),
                _ => tiled::rows_tiled(w, r0, rows, acts, n, yp),
            }
        });
        add_block_mins(w, &acts.s, n, y);
        return;
    }
    rows_parallel(y, n, m, add, |r, o| w.row(r).dot_int8_portable(acts, o));
    add_block_mins(w, &acts.s, n, y);
}

/// `y[t, r] += Σ_b mins[r, b] · sums[t, b]`: the per-block offsets of `w` (`with_block_mins`) times the
/// activations' block sums `sums` (`[n, cols/32]`). Each output's sum runs in the same order whatever `n`.
fn add_block_mins(w: &QMatrix, sums: &[f32], n: usize, y: &mut [f32]) {
    let Some(mins) = &w.mins else { return };
    let (m, nb) = (w.rows, w.blocks_per_row());
    let one = |t: usize, yrow: &mut [f32]| {
        let s = &sums[t * nb..(t + 1) * nb];
        for (o, mr) in yrow.iter_mut().zip(mins.chunks_exact(nb)) {
            *o += crate::vec::dot(mr, s);
        }
    };
    if n == 1 {
        one(0, &mut y[..m]);
    } else {
        crate::pool::for_each_chunk_mut(y, m, one);
    }
}

/// Runs `f(row, out)` for every weight row over the pool, `out` being that row's `n` outputs; writes
/// `y` as `[n, m]`.
fn rows_parallel(y: &mut [f32], n: usize, m: usize, add: bool, f: impl Fn(usize, &mut [f32]) + Sync) {
    rows_parallel_tasks(y, n, m, add, |r0, out| {
        for (i, o) in out.chunks_exact_mut(n).enumerate() {
            f(r0 + i, o);
        }
    });
}

/// Runs `f(r0, rows, y)` over the pool for the runs of weight rows `r0 .. r0 + rows` of `guided_bounds` (whole
/// pairs of 8-row tiles, but for the end of the matrix), `y` pointing to the `[n, m]` output: each call may write
/// the columns `r0 .. r0 + rows` of every output row, which no other call touches. The tiled kernels write
/// each activation row's eight results straight into the output row.
#[cfg(target_arch = "x86_64")]
fn tiled_tasks(y: &mut [f32], n: usize, m: usize, add: bool, f: impl Fn(usize, usize, tiled::Dst) + Sync) {
    let bounds = guided_bounds(m);
    let cols = Columns::new(y, n);
    let dst = tiled::Dst { y: cols.base(), add };
    crate::pool::global().run(bounds.len() - 1, &|t, _| f(bounds[t], bounds[t + 1] - bounds[t], dst));
}

/// Runs `f(r0, out)` over the pool for runs of weight rows starting at `r0` (`guided_bounds`), `out` being
/// those rows' outputs as `[rows, n]`; writes `y` as `[n, m]`.
pub(crate) fn rows_parallel_tasks(y: &mut [f32], n: usize, m: usize, add: bool, f: impl Fn(usize, &mut [f32]) + Sync) {
    if n == 1 && !add {
        let bounds = guided_bounds(m);
        for_each_split_mut(y, &bounds, |t, out| f(bounds[t], out));
        return;
    }
    // yt is [m, n]: each task owns a contiguous run of output features, and writes them into y's columns
    // itself (in parallel, while its results are still in cache). Guided task sizes here too, so the
    // thread that finishes first waits for at most a short task.
    let mut yt = vec![0f32; m * n];
    let bounds = guided_bounds(m);
    let split: Vec<usize> = bounds.iter().map(|b| b * n).collect();
    let cols = Columns::new(y, n);
    for_each_split_mut(&mut yt, &split, |t, out| {
        f(bounds[t], out);
        // SAFETY: task `t` owns output features `bounds[t] .. bounds[t + 1]`, disjoint from other tasks'.
        unsafe { cols.put(bounds[t], out, add) };
    });
}

/// A `[n, m]` output that parallel tasks fill by columns: each task writes the features (columns) it owns.
struct Columns {
    ptr: *mut f32,
    n: usize,
    m: usize,
}

// SAFETY: `put`'s contract makes concurrent writes disjoint; the borrow in `new` keeps the buffer alive and
// unaliased for the `Columns`' lifetime of use inside one `qmatmul` call.
unsafe impl Sync for Columns {}

impl Columns {
    fn new(y: &mut [f32], n: usize) -> Self {
        Self { ptr: y.as_mut_ptr(), n, m: y.len() / n }
    }

    /// The output's first element, for a kernel that writes its own columns (see `put`'s contract).
    #[cfg(target_arch = "x86_64")]
    fn base(&self) -> *mut f32 {
        self.ptr
    }

    /// Writes `chunk` (`[rows, n]`: features `r0 .. r0 + rows`, each with its `n` outputs) into columns
    /// `r0 .. r0 + rows`, or adds it to what they hold (`add`).
    ///
    /// # Safety
    /// No other thread writes these columns meanwhile, and `r0 + rows ≤ m`; the `y` given to `new` is
    /// still borrowed by the caller and not otherwise accessed until the tasks finish.
    unsafe fn put(&self, r0: usize, chunk: &[f32], add: bool) {
        let rows = chunk.len() / self.n;
        assert!(r0 + rows <= self.m, "columns out of range");
        // Row by row of `y`, so the writes are sequential (the chunk is still in cache).
        for t in 0..self.n {
            let dst = self.ptr.add(t * self.m + r0);
            for i in 0..rows {
                let v = chunk[i * self.n + t];
                *dst.add(i) = if add { *dst.add(i) + v } else { v };
            }
        }
    }
}

/// Reference: dequantize each row and accumulate in f64 (the f32-activation product).
pub fn qmatmul_reference(w: &QMatrix, x: &[f32], y: &mut [f32]) {
    let (k, m) = (w.cols, w.rows);
    let n = x.len() / k;
    let mut row = vec![0f32; k];
    for r in 0..m {
        w.dequantize_row(r, &mut row);
        for t in 0..n {
            y[t * m + r] =
                row.iter().zip(&x[t * k..(t + 1) * k]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
        }
    }
}

/// Reference for the integer paths (`w`'s activations `Int8` or `Int16`): the activations rounded as
/// `Q8Acts` does, then `d·Σ q·x̂ + m·s` per block in f64, from the blocks' own quantized values.
pub fn qmatmul_int8_reference(w: &QMatrix, x: &[f32], y: &mut [f32]) {
    let (k, m) = (w.cols, w.rows);
    let n = x.len() / k;
    let nb = k / BLOCK;
    let acts = Q8Acts::quantize_to(x, k, w.activations == Activations::Int16);
    for r in 0..m {
        let wr = w.row(r);
        let blocks: Vec<Decoded> = (0..nb).map(|b| wr.block(b)).collect();
        for t in 0..n {
            let mut sum = 0f64;
            for (b, blk) in blocks.iter().enumerate() {
                let dot: f64 = (0..BLOCK).map(|j| blk.q[j] as f64 * acts.value(t * k + b * BLOCK + j) as f64).sum();
                sum += blk.d as f64 * acts.d[t * nb + b] as f64 * dot;
                sum += blk.m as f64 * acts.s[t * nb + b] as f64;
                if let Some(mins) = &w.mins {
                    sum += mins[r * nb + b] as f64 * acts.s[t * nb + b] as f64;
                }
            }
            y[t * m + r] = sum as f32;
        }
    }
}

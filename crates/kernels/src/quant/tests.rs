use super::*;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn f32(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
}

/// Random blocks of `format` in the file layout: random quantized bytes, small random scales (smaller for
/// the K-quants, whose sub-block scales multiply them by up to 63 or 128).
fn random_matrix(rng: &mut Lcg, format: QuantFormat, rows: usize, cols: usize) -> QMatrix {
    let size = match format {
        QuantFormat::Q4_K => 0.002,
        QuantFormat::Q6_K => 0.0005,
        _ => 0.05,
    };
    let mut data: Vec<u8> = (0..rows * format.row_bytes(cols)).map(|_| rng.next() as u8).collect();
    for blk in data.chunks_exact_mut(format.block_bytes()) {
        for &o in format.f16_offsets() {
            blk[o..o + 2].copy_from_slice(&f16::from_f32(rng.f32() * size).to_le_bytes());
        }
    }
    QMatrix::new(format, rows, cols, data).unwrap()
}

/// `w`'s blocks in the file layout.
fn file_bytes(w: &QMatrix) -> Vec<u8> {
    untile(w.format, w.rows, w.cols, &w.data)
}

/// Every instruction set this machine can run: the portable one always.
fn isas() -> Vec<Isa> {
    Isa::all_on_this_cpu()
}

const FORMATS: [QuantFormat; 9] = QuantFormat::ALL;

/// `cols` rounded up to whole blocks of `format` (256 for the K-quants).
fn cols_for(format: QuantFormat, cols: usize) -> usize {
    cols.next_multiple_of(format.block_len())
}

/// Shapes `(rows, cols, n)`: row counts that end inside a tile, activation counts with every remainder mod 4
/// (the tiled kernels take four activation rows per pass, then 3, 2 or 1), and batches up to 64 rows.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 32, 1),
    (33, 64, 1),
    (17, 96, 2),
    (70, 576, 3),
    (96, 1536, 7),
    (5, 160, 16),
    (5, 64, 17),
    (40, 96, 64),
    (3, 224, 5),
];

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn out_scale(v: &[f32]) -> f32 {
    v.iter().fold(1e-3f32, |a, b| a.max(b.abs()))
}

/// f32 activations, every path, against the f64 reference: bound 1e-4 of the output scale (f32
/// accumulation over ≤ 1536 terms).
#[test]
fn f32_path_matches_reference() {
    let mut rng = Lcg(9);
    for isa in isas() {
        for format in FORMATS {
            for &(rows, cols, n) in SHAPES {
                let cols = cols_for(format, cols);
                let w = random_matrix(&mut rng, format, rows, cols).with_activations(Activations::F32);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                let (mut fast, mut slow) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                qmatmul_on(isa, &w, &x, &mut fast);
                qmatmul_reference(&w, &x, &mut slow);
                let (err, scale) = (max_err(&fast, &slow), out_scale(&slow));
                assert!(err <= 1e-4 * scale, "{isa:?} {format:?} [{rows},{cols}] n={n}: error {err} at {scale}");
            }
        }
    }
}

/// Standard deviations of the rounding errors of `w · x̂` against `w · x`: each activation's rounding error
/// is uniform within half its block's step `d`, so `σ² = Σ w² d² / 12` per output (`[n, rows]`).
fn rounding_sigma(w: &QMatrix, x: &[f32]) -> Vec<f32> {
    let (k, m) = (w.cols(), w.rows());
    let acts = Q8Acts::quantize_to(x, k, w.activations() == Activations::Int16);
    let mut row = vec![0f32; k];
    let mut sigma = vec![0f32; x.len() / k * m];
    for r in 0..m {
        w.dequantize_row(r, &mut row);
        for (t, s) in sigma.chunks_exact_mut(m).enumerate() {
            let var: f64 = row
                .iter()
                .enumerate()
                .map(|(j, &v)| (v as f64 * acts.d[t * k / BLOCK + j / BLOCK] as f64).powi(2))
                .sum();
            s[r] = (var / 12.0).sqrt() as f32;
        }
    }
    sigma
}

/// 8- and 16-bit activations, every path, against exact arithmetic on the rounded activations: bound 1e-4 of
/// the output scale. And against the f32 product: each output within six standard deviations of the rounding
/// error (`rounding_sigma`), plus the same 1e-4 for f32 summation.
#[test]
fn int8_path_matches_its_reference() {
    let mut rng = Lcg(21);
    for isa in isas() {
        for acts in [Activations::Int8, Activations::Int16] {
            for format in FORMATS {
                for &(rows, cols, n) in SHAPES {
                    let cols = cols_for(format, cols);
                    let w = random_matrix(&mut rng, format, rows, cols);
                    assert_eq!(w.activations(), Activations::Int8);
                    let w = w.with_activations(acts);
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                    let (mut fast, mut want, mut exact) =
                        (vec![0f32; n * rows], vec![0f32; n * rows], vec![0f32; n * rows]);
                    qmatmul_on(isa, &w, &x, &mut fast);
                    qmatmul_int8_reference(&w, &x, &mut want);
                    qmatmul_reference(&w, &x, &mut exact);
                    let what = format!("{isa:?} {acts:?} {format:?} [{rows},{cols}] n={n}");
                    let (err, scale) = (max_err(&fast, &want), out_scale(&want));
                    assert!(err <= 1e-4 * scale, "{what}: error {err} at {scale}");
                    let sigma = rounding_sigma(&w, &x);
                    for ((f, e), s) in fast.iter().zip(&exact).zip(&sigma) {
                        assert!((f - e).abs() <= 6.0 * s + 1e-4 * scale, "{what}: rounding error {} at σ {s}", f - e);
                    }
                }
            }
        }
    }
}

/// 16-bit activations: values within ±32767 and within half a step of `x / d`, extremes included; the block
/// sums use the rounded values.
#[test]
fn int16_activations_round_to_nearest() {
    let mut rng = Lcg(4);
    let mut x: Vec<f32> = (0..4 * BLOCK).map(|_| rng.f32() * 3.0).collect();
    x[0] = 3.5; // a block's maximum maps to +32767
    x[BLOCK] = -3.5; // and its minimum to -32767
    x[2 * BLOCK..3 * BLOCK].fill(0.0); // an all-zero block
    let a = Q8Acts::quantize_wide(&x, 2 * BLOCK);
    assert!(a.is_wide() && a.qs.is_empty());
    for (i, v) in x.iter().enumerate() {
        let d = a.d[i / BLOCK];
        let q = a.value(i);
        assert!(q.abs() <= 32767);
        if d > 0.0 {
            assert!((q as f32 - v / d).abs() <= 0.5 + 1e-2, "x[{i}] = {v}: {q} · {d}");
        } else {
            assert_eq!(q, 0);
        }
    }
    assert_eq!(a.value(0), 32767);
    assert_eq!(a.value(BLOCK), -32767);
    for b in 0..4 {
        let sum: i32 = (b * BLOCK..(b + 1) * BLOCK).map(|i| a.value(i)).sum();
        assert_eq!(a.s[b], a.d[b] * sum as f32);
    }
}

/// Q8_0 weights at -128 and activations at ±127, or ±32767 in 16 bits (the extremes of the sign trick, of
/// i16 pair sums and of the 16-bit products).
#[test]
fn int8_q8_0_extremes() {
    let cols = 128;
    let mut data = Vec::new();
    for b in 0..cols / BLOCK {
        data.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        data.extend((0..32).map(|j| if (j + b) % 3 == 0 { 0x80u8 } else { 0x7F }));
    }
    let x = |i: usize| if i.is_multiple_of(2) { 1.0 } else { -1.0 };
    extremes_match_reference(QuantFormat::Q8_0, &data, cols, x, |w| 1e-4 * w.abs().max(1.0));
}

/// One row's `data` repeated over 17 rows (a pair of tiles and a lone one on the 512-bit path) against 1 to 5
/// and 8 activation rows of `x(i)` (every kernel's batch shapes, and the widened-weights buffer from five
/// rows), at both widths on every path: each output within `tol(reference)` of the f64 reference.
fn extremes_match_reference(
    format: QuantFormat,
    row: &[u8],
    cols: usize,
    x: impl Fn(usize) -> f32,
    tol: impl Fn(f32) -> f32,
) {
    let rows = 17;
    let data = row.repeat(rows);
    for acts in [Activations::Int8, Activations::Int16] {
        let w = QMatrix::new(format, rows, cols, data.clone()).unwrap().with_activations(acts);
        for n in [1, 2, 3, 4, 5, 8] {
            let x: Vec<f32> = (0..n * cols).map(&x).collect();
            let mut want = vec![0f32; n * rows];
            qmatmul_int8_reference(&w, &x, &mut want);
            for isa in isas() {
                let mut got = vec![0f32; n * rows];
                qmatmul_on(isa, &w, &x, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= tol(*w), "{isa:?} {acts:?} {format:?} n={n}: {g} vs {w}");
                }
            }
        }
    }
}

/// The largest integer sums the kernels can meet, on every path and both widths, against the f64 reference:
/// Q6_K at 16 bits (weights `(q − 32)·s = (−32)·(−128) = 4096` times activations at 32767: a lane of the
/// folded i32 sums reaches 2 147 418 112, 65 535 below `i32::MAX`), and Q5_1 at 8 bits (weights 31 times 127:
/// the i16 fold of eight products reaches 31 496).
#[test]
fn integer_sums_at_their_extremes() {
    let mut q6 = vec![0u8; 210];
    q6[192..208].fill(0x80); // sub-scales −128; ql = qh = 0: q − 32 = −32
    q6[208..].copy_from_slice(&f16::from_f32(1e-3).to_le_bytes());
    let mut q5 = f16::from_f32(1e-3).to_le_bytes().to_vec();
    q5.extend_from_slice(&f16::from_f32(0.0).to_le_bytes());
    q5.extend([0xFF; 4 + 16]); // every value 31
    for (format, block, cols) in [(QuantFormat::Q6_K, q6, 512), (QuantFormat::Q5_1, q5, 128)] {
        let row: Vec<u8> = block.iter().copied().cycle().take(cols / format.block_len() * block.len()).collect();
        // Activations of 1.0 round to the top value: 127, or 32767.
        extremes_match_reference(format, &row, cols, |_| 1.0, |w| 1e-5 * w.abs());
    }
}

/// The VNNI paths (256- and 512-bit) compute the same integer sums as the AVX2 one and the same float
/// operations, so bitwise the same outputs (where the CPU has them; elsewhere there is nothing to compare).
/// Row counts give the 512-bit kernel pairs of tiles, a partial second tile and a last odd tile.
#[test]
fn vnni_paths_match_avx2_bitwise() {
    let others: Vec<Isa> = [Isa::Avx512, Isa::Avx512Vnni].into_iter().filter(|i| i.on_this_cpu()).collect();
    if others.is_empty() {
        println!("no VNNI on this CPU: nothing to compare");
        return;
    }
    let mut rng = Lcg(17);
    for isa in &others {
        for acts in [Activations::Int8, Activations::Int16] {
            for format in FORMATS {
                for rows in [9, 16, 25, 40] {
                    for n in [1, 2, 3, 4, 6, 9] {
                        let cols = cols_for(format, 224);
                        let w = random_matrix(&mut rng, format, rows, cols).with_activations(acts);
                        let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                        let (mut a, mut b) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                        qmatmul_on(Isa::Avx2, &w, &x, &mut a);
                        qmatmul_on(*isa, &w, &x, &mut b);
                        assert_eq!(a, b, "{isa:?} {acts:?} {format:?} rows={rows} n={n}");
                    }
                }
            }
        }
    }
    println!("{others:?} and AVX2 compared: {} formats, 2 widths, 4 row counts, 6 batch sizes", FORMATS.len());
}

/// Each activation row gets bitwise the same result alone, in a decode batch and in a prefill batch
/// (what keeps seeded sampling independent of batching and of the prefix cache), on every path.
#[test]
fn results_are_bitwise_independent_of_batch_size() {
    let mut rng = Lcg(7);
    for isa in isas() {
        for acts in [Activations::Int8, Activations::Int16, Activations::F32] {
            for format in FORMATS {
                // 25 rows: the last task has an odd count, so decode runs a single-row tile after the pairs.
                // 480 columns: two super-blocks of the K-quants.
                let (rows, cols) = (25, cols_for(format, 480));
                let w = random_matrix(&mut rng, format, rows, cols).with_activations(acts);
                for n in [2usize, 3, 5, 7, 16, 17, 40] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                    let mut batched = vec![0f32; n * rows];
                    qmatmul_on(isa, &w, &x, &mut batched);
                    for t in 0..n {
                        let mut alone = vec![0f32; rows];
                        qmatmul_on(isa, &w, &x[t * cols..(t + 1) * cols], &mut alone);
                        assert_eq!(&batched[t * rows..(t + 1) * rows], &alone[..], "{isa:?} {acts:?} {format:?} n={n}");
                    }
                }
            }
        }
    }
}

#[test]
fn dequantize_follows_the_block_layout() {
    // Q4_1 block with d = 1, m = -8: w[j] = (qs[j] & 0xF) - 8, w[j + 16] = (qs[j] >> 4) - 8.
    let mut data = f16::from_f32(1.0).to_le_bytes().to_vec();
    data.extend_from_slice(&f16::from_f32(-8.0).to_le_bytes());
    data.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let w = QMatrix::new(QuantFormat::Q4_1, 1, 32, data).unwrap();
    let mut row = vec![0f32; 32];
    w.dequantize_row(0, &mut row);
    assert_eq!(row[0], -8.0);
    assert_eq!(row[15], 7.0);
    assert_eq!(row[16], 7.0);
    assert_eq!(row[31], -8.0);
    assert_eq!(w.weight_bytes(), 20);
    // Every format stores the file's bytes and no more, padded to whole tiles of 8 rows (Q4_0 and Q5_0 store
    // no min: it is computed from the scale); Q4_K with its eight sub-blocks' 6-bit scales and mins a byte each:
    // 8 · 16 bytes per tile where the file packs them in 8 · 12.
    let mut rng = Lcg(3);
    for format in FORMATS {
        let w = random_matrix(&mut rng, format, 3, cols_for(format, 64));
        let stored = match format {
            QuantFormat::Q4_K => w.cols() / SUPER * (TILE_ROWS * format.block_bytes() + TILE_ROWS * (16 - 12)),
            _ => TILE_ROWS * format.row_bytes(w.cols()),
        };
        assert_eq!(w.data.len(), stored, "{format:?}");
        assert_eq!(w.weight_bytes(), 3 * format.row_bytes(w.cols()), "{format:?}");
    }
}

#[test]
fn tiles_hold_the_file_bytes() {
    let mut rng = Lcg(21);
    for format in QuantFormat::ALL {
        for rows in [1, 7, 8, 9, 17] {
            let cols = cols_for(format, 96);
            let file: Vec<u8> = (0..rows * format.row_bytes(cols)).map(|_| rng.next() as u8).collect();
            let tiles = tile(format, cols, &file);
            assert_eq!(tiles.len(), rows.div_ceil(TILE_ROWS) * format.tile_row_bytes(cols), "{format:?}");
            assert_eq!(untile(format, rows, cols, &tiles), file, "{format:?} {rows} rows");
            // Padding rows are zeros.
            let padded = untile(format, rows.next_multiple_of(TILE_ROWS), cols, &tiles);
            assert!(padded[file.len()..].iter().all(|&b| b == 0), "{format:?} {rows} rows");
        }
    }
}

#[test]
fn concatenated_rows_give_the_same_products() {
    let mut rng = Lcg(11);
    let (a, b) = (random_matrix(&mut rng, QuantFormat::Q4_1, 7, 64), random_matrix(&mut rng, QuantFormat::Q4_1, 5, 64));
    let ab = QMatrix::concat_rows(&[a.clone(), b.clone()]).unwrap();
    let x: Vec<f32> = (0..2 * 64).map(|_| rng.f32()).collect();
    let (mut ya, mut yb, mut yab) = (vec![0f32; 14], vec![0f32; 10], vec![0f32; 24]);
    qmatmul(&a, &x, &mut ya);
    qmatmul(&b, &x, &mut yb);
    qmatmul(&ab, &x, &mut yab);
    for t in 0..2 {
        assert_eq!(&yab[t * 12..t * 12 + 7], &ya[t * 7..t * 7 + 7]);
        assert_eq!(&yab[t * 12 + 7..t * 12 + 12], &yb[t * 5..t * 5 + 5]);
    }
    // The K-quants' tiles re-tiled the same way.
    for format in [QuantFormat::Q4_K, QuantFormat::Q6_K] {
        let (a, b) = (random_matrix(&mut rng, format, 7, 256), random_matrix(&mut rng, format, 5, 256));
        let ab = QMatrix::concat_rows(&[a.clone(), b.clone()]).unwrap();
        let x: Vec<f32> = (0..256).map(|_| rng.f32()).collect();
        let (mut ya, mut yb, mut yab) = (vec![0f32; 7], vec![0f32; 5], vec![0f32; 12]);
        qmatmul(&a, &x, &mut ya);
        qmatmul(&b, &x, &mut yb);
        qmatmul(&ab, &x, &mut yab);
        assert_eq!(&yab[..7], &ya[..], "{format:?}");
        assert_eq!(&yab[7..], &yb[..], "{format:?}");
    }
    // A first part of whole tiles (its tiles are kept as they are), then a ragged one.
    let c = random_matrix(&mut rng, QuantFormat::Q4_1, 8, 64);
    let cb = QMatrix::concat_rows(&[c.clone(), b.clone()]).unwrap();
    let (mut yc, mut ycb) = (vec![0f32; 16], vec![0f32; 26]);
    qmatmul(&c, &x, &mut yc);
    qmatmul(&cb, &x, &mut ycb);
    for t in 0..2 {
        assert_eq!(&ycb[t * 13..t * 13 + 8], &yc[t * 8..t * 8 + 8]);
        assert_eq!(&ycb[t * 13 + 8..t * 13 + 13], &yb[t * 5..t * 5 + 5]);
    }
    assert!(QMatrix::concat_rows(&[a.clone(), random_matrix(&mut rng, QuantFormat::Q8_0, 1, 64)]).is_err());
    // Parts with different activation precisions would silently take the first part's.
    assert!(QMatrix::concat_rows(&[a.with_activations(Activations::Int16), b]).is_err());
}

/// The Q4_1 min term must multiply the sum of the *rounded* activations (`s = d·Σq`). With the exact sum
/// the error becomes Σ (w − m)·(x − x̂) instead of Σ w·(x − x̂): biased by the block minimum, which real
/// weights put near −8·d. That version moved SmolLM2 logprobs by 0.59; here its total error is larger than
/// the kernel's (the assertion fails if the two are swapped).
#[test]
fn int8_min_term_uses_the_rounded_sum() {
    let mut rng = Lcg(33);
    let (rows, cols) = (200, 1536);
    let mut data = Vec::new();
    for _ in 0..rows * cols / BLOCK {
        let d = 0.01 + 0.01 * rng.f32().abs();
        data.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        data.extend_from_slice(&f16::from_f32(-8.0 * d).to_le_bytes());
        data.extend((0..16).map(|_| rng.next() as u8));
    }
    let w = QMatrix::new(QuantFormat::Q4_1, rows, cols, data).unwrap();
    let n = 16;
    let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
    let acts = Q8Acts::quantize(&x, cols);
    for (b, blk) in acts.qs.chunks_exact(BLOCK).enumerate() {
        assert_eq!(acts.s[b], acts.d[b] * blk.iter().map(|&q| q as i32).sum::<i32>() as f32);
    }
    let (mut got, mut exact) = (vec![0f32; n * rows], vec![0f32; n * rows]);
    qmatmul(&w, &x, &mut got);
    qmatmul_reference(&w, &x, &mut exact);
    let nb = cols / BLOCK;
    let (mut err, mut err_exact_sum) = (0f64, 0f64);
    for t in 0..n {
        for r in 0..rows {
            let row = w.row(r);
            // The same product with the min term taken from the exact block sums instead.
            let shift: f64 = (0..nb)
                .map(|b| {
                    let xsum: f32 = x[t * cols + b * BLOCK..t * cols + (b + 1) * BLOCK].iter().sum();
                    row.scale_min(b).1 as f64 * (xsum - acts.s[t * nb + b]) as f64
                })
                .sum();
            let (g, e) = (got[t * rows + r] as f64, exact[t * rows + r] as f64);
            err += (g - e).abs();
            err_exact_sum += (g + shift - e).abs();
        }
    }
    println!("total error {err:.3}, with exact sums {err_exact_sum:.3}");
    assert!(err < 0.9 * err_exact_sum, "mean error {err} vs {err_exact_sum} with exact sums");
}

#[test]
fn wrong_sizes_are_errors() {
    assert!(QMatrix::new(QuantFormat::Q8_0, 0, 32, vec![]).is_err());
    assert!(QMatrix::new(QuantFormat::Q8_0, 2, 0, vec![]).is_err());
    assert!(QMatrix::new(QuantFormat::Q8_0, 2, 30, vec![0; 68]).is_err());
    assert!(QMatrix::new(QuantFormat::Q8_0, 2, 32, vec![0; 67]).is_err());
    // K-quant rows must be whole 256-value super-blocks.
    assert!(QMatrix::new(QuantFormat::Q4_K, 1, 224, vec![0; 126]).is_err());
    assert!(QMatrix::new(QuantFormat::Q6_K, 1, 256, vec![0; 209]).is_err());
    assert!(QMatrix::new(QuantFormat::Q6_K, 1, 256, vec![0; 210]).is_ok());
    assert_eq!("int8".parse::<Activations>(), Ok(Activations::Int8));
    assert_eq!("int16".parse::<Activations>(), Ok(Activations::Int16));
    assert!("fp8".parse::<Activations>().is_err());
}

/// The AVX2 quantizer (called directly, whatever `MLX_SERVING_ISA` says) gives bitwise the portable one's
/// values, scales and sums, 8 and 16 bits: halfway cases at both widths, values just below a half, an
/// all-zero block, a block so small that `1 / scale` would overflow, and blocks with NaN and infinities.
#[test]
fn vectorized_quantize_matches_portable() {
    #[cfg(target_arch = "x86_64")]
    {
        if !(crate::vec::simd::has_avx2() && std::arch::is_x86_feature_detected!("f16c")) {
            return;
        }
        let mut rng = Lcg(12);
        let mut x: Vec<f32> = (0..64 * BLOCK).map(|_| rng.f32() * 4.0).collect();
        // Block 0: max 127, so the 8-bit step is exactly 1: values at halves, and just below a half.
        for (j, v) in x[..BLOCK].iter_mut().enumerate() {
            *v = if j == 0 { 127.0 } else { j as f32 - 16.5 };
        }
        x[3] = 0.499_999_97;
        x[4] = -0.5;
        // Block 1: all zeros. Block 2: max 32767, so the 16-bit step is exactly 1, values at halves.
        x[BLOCK..2 * BLOCK].fill(0.0);
        for (j, v) in x[2 * BLOCK..3 * BLOCK].iter_mut().enumerate() {
            *v = if j == 0 { -32767.0 } else { (j as f32 - 16.0) * 1000.0 + 0.5 };
        }
        // Block 3: tiny values (1 / scale overflows f32) and zeros.
        x[3 * BLOCK..4 * BLOCK].fill(0.0);
        x[3 * BLOCK] = 1e-37;
        x[3 * BLOCK + 5] = -3e-38;
        // Block 4: NaN among finite values (at the start, so the vector max meets it first). Block 5: an
        // infinity and a NaN (the scale is infinite). Block 6: all NaN.
        x[4 * BLOCK] = f32::NAN;
        x[4 * BLOCK + 9] = -f32::NAN;
        x[5 * BLOCK + 3] = f32::NEG_INFINITY;
        x[5 * BLOCK + 4] = f32::NAN;
        x[6 * BLOCK..7 * BLOCK].fill(f32::NAN);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        for wide in [false, true] {
            let slow = Q8Acts::quantize_portable(&x, 4 * BLOCK, wide);
            let fast = Q8Acts::build(Isa::Avx2, RowSource::Plain(&x), x.len() / (4 * BLOCK), 4 * BLOCK, wide);
            let Q8Acts { qs, x16, d, s: sums, .. } = fast;
            assert_eq!(qs, slow.qs, "wide {wide}");
            assert_eq!(x16, slow.x16, "wide {wide}");
            assert_eq!(bits(&d), bits(&slow.d), "wide {wide}");
            assert_eq!(bits(&sums), bits(&slow.s), "wide {wide}");
        }
        let a = Q8Acts::quantize_portable(&x, 4 * BLOCK, false);
        assert_eq!((a.qs[1], a.qs[3], a.qs[4]), (-16, 0, -1), "halves round away from zero, 0.49999997 down");
        assert!(a.qs[3 * BLOCK..4 * BLOCK].iter().all(|&q| q == 0), "a block too small to scale rounds to zeros");
        let w = Q8Acts::quantize_portable(&x, 4 * BLOCK, true);
        assert_eq!(
            (w.x16[2 * BLOCK + 1], w.x16[2 * BLOCK + 2]),
            (-15_000, -14_000),
            "16-bit halves round away from zero"
        );
    }
}

/// `qmatmul` on the AVX-512 path takes the 512-bit kernels for prompt-sized products only, and never hands a
/// CPU a path it lacks.
#[test]
fn avx512_runs_512_bit_kernels_for_prompts_only() {
    let min = super::zmm_min_rows(); // 64 unless MLX_SERVING_ZMM_MIN_ROWS says otherwise
    if min > 1 {
        assert_eq!(Isa::Avx512.for_rows(1), Isa::Avx512Vnni);
        assert_eq!(Isa::Avx512.for_rows(min - 1), Isa::Avx512Vnni);
    }
    assert_eq!(Isa::Avx512.for_rows(min), Isa::Avx512);
    for isa in [Isa::Avx512Vnni, Isa::Avx2, Isa::Portable] {
        assert_eq!(isa.for_rows(1), isa);
        assert_eq!(isa.for_rows(512), isa);
    }
    assert!(Isa::detected().for_rows(1).on_this_cpu() && Isa::detected().for_rows(512).on_this_cpu());
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Two sets of rounded activations hold bitwise the same values, scales and sums.
fn same_acts(a: &Q8Acts, b: &Q8Acts, what: &str) {
    assert_eq!(a.k, b.k, "{what}");
    assert_eq!(a.qs, b.qs, "{what}: 8-bit values");
    assert_eq!(a.x16, b.x16, "{what}: 16-bit values");
    assert_eq!(bits(&a.d), bits(&b.d), "{what}: scales");
    assert_eq!(bits(&a.s), bits(&b.s), "{what}: sums");
}

/// Rows of varied size, some with a spike, so scales differ per block and per row.
fn varied_rows(rng: &mut Lcg, n: usize, k: usize) -> Vec<f32> {
    (0..n * k)
        .map(|i| {
            let row_scale = 0.05 + (i / k % 7) as f32;
            let spike = if i % 97 == 5 { 40.0 } else { 1.0 };
            rng.f32() * row_scale * spike
        })
        .collect()
}

#[test]
fn fused_norm_and_swiglu_round_like_the_separate_steps() {
    let mut rng = Lcg(41);
    // 1 and 3 rows run on the caller; 70 rows over the pool in tasks of 32 (a ragged last task).
    for (n, k) in [(1usize, 32usize), (3, 576), (70, 96), (70, 1536)] {
        let x = varied_rows(&mut rng, n, k);
        let w: Vec<f32> = (0..k).map(|_| 0.5 + rng.f32()).collect();
        let gu = varied_rows(&mut rng, n, 2 * k);
        for isa in isas() {
            for wide in [false, true] {
                let what = format!("{isa:?} n {n} k {k} wide {wide}");
                let mut normed = vec![0f32; n * k];
                crate::vec::rms_norm_on(isa, &x, &w, 1e-5, &mut normed);
                let fused = Q8Acts::rms_norm_on(isa, &x, &w, 1e-5, wide);
                same_acts(&fused, &Q8Acts::build(isa, RowSource::Plain(&normed), n, k, wide), &format!("norm {what}"));
                assert_eq!((fused.rows(), fused.cols(), fused.wide()), (n, k, wide));

                let mut gated = Vec::with_capacity(n * k);
                for row in gu.chunks_exact(2 * k) {
                    let mut g = row[..k].to_vec();
                    crate::vec::swiglu_on(isa, &mut g, &row[k..]);
                    gated.extend_from_slice(&g);
                }
                let fused = Q8Acts::swiglu_on(isa, &gu, k, wide);
                same_acts(&fused, &Q8Acts::build(isa, RowSource::Plain(&gated), n, k, wide), &format!("swiglu {what}"));
            }
        }
    }
}

#[test]
fn rms_norm_paths_agree_bitwise_and_with_f64() {
    let mut rng = Lcg(43);
    for k in [1usize, 7, 8, 13, 64, 576, 581] {
        let n = 3;
        let x = varied_rows(&mut rng, n, k);
        let w: Vec<f32> = (0..k).map(|_| rng.f32() * 2.0).collect();
        let mut want = vec![0f32; n * k];
        crate::vec::rms_norm_on(Isa::Portable, &x, &w, 1e-6, &mut want);
        for (xr, wr) in x.chunks_exact(k).zip(want.chunks_exact(k)) {
            let ms = xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / k as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            for ((xi, wi), got) in xr.iter().zip(&w).zip(wr) {
                let exact = *xi as f64 * inv * *wi as f64;
                assert!((exact - *got as f64).abs() <= 1e-6 * exact.abs().max(1e-3), "k {k}: {got} vs {exact}");
            }
        }
        for isa in isas() {
            let mut got = vec![0f32; n * k];
            crate::vec::rms_norm_on(isa, &x, &w, 1e-6, &mut got);
            assert_eq!(bits(&got), bits(&want), "{isa:?} k {k}");
        }
    }
}

#[test]
fn products_add_into_the_output_and_take_rounded_activations() {
    let mut rng = Lcg(47);
    for format in [QuantFormat::Q4_1, QuantFormat::Q8_0, QuantFormat::Q6_K] {
        // 29 rows with 70 activation rows: the 512-bit kernels' last pair of tiles is partial (masked adds).
        for (rows, n) in [(24usize, 1usize), (40, 5), (17, 70), (29, 70)] {
            let cols = cols_for(format, 256);
            let base = random_matrix(&mut rng, format, rows, cols);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
            let y0: Vec<f32> = (0..n * rows).map(|_| rng.f32() * 3.0).collect();
            for act in [Activations::Int8, Activations::Int16, Activations::F32] {
                let w = base.clone().with_activations(act);
                for isa in isas() {
                    let what = format!("{format:?} {act:?} {isa:?} rows {rows} n {n}");
                    let isa = isa.for_rows(n);
                    let mut plain = vec![0f32; n * rows];
                    qmatmul_on(isa, &w, &x, &mut plain);
                    let mut added = y0.clone();
                    qmatmul_add_on(isa, &w, &x, &mut added);
                    let want: Vec<f32> = y0.iter().zip(&plain).map(|(a, b)| a + b).collect();
                    assert_eq!(bits(&added), bits(&want), "add: {what}");
                    if act == Activations::F32 {
                        continue;
                    }
                    let acts = Q8Acts::build(isa, RowSource::Plain(&x), n, cols, act == Activations::Int16);
                    let mut got = vec![f32::NAN; n * rows];
                    qmatmul_acts_on(isa, &w, &acts, &mut got, false);
                    assert_eq!(bits(&got), bits(&plain), "rounded activations: {what}");
                    let mut got = y0.clone();
                    qmatmul_acts_on(isa, &w, &acts, &mut got, true);
                    assert_eq!(bits(&got), bits(&want), "rounded activations, added: {what}");
                }
            }
        }
    }
}

#[test]
fn activations_of_the_wrong_width_are_refused() {
    let mut rng = Lcg(53);
    let w = random_matrix(&mut rng, QuantFormat::Q4_1, 8, 64).with_activations(Activations::Int16);
    let acts = Q8Acts::quantize(&[0.5; 64], 64);
    let r = std::panic::catch_unwind(|| qmatmul_acts(&w, &acts, &mut [0f32; 8], false));
    assert!(r.is_err(), "8-bit activations into a 16-bit product");
    // An empty batch keeps its width, and multiplies to nothing.
    let empty = Q8Acts::quantize_wide(&[], 64);
    assert!(empty.wide() && empty.rows() == 0);
    qmatmul_acts(&w, &empty, &mut [], false);
    qmatmul(&w, &[], &mut []);
}

/// Per-block offsets (`with_block_mins`, MLX 8-bit affine on Q8_0 tiles): every activation precision and
/// path against its reference (f32: the dequantized rows, offsets included; integer: exact arithmetic on
/// the rounded activations, the offsets times their block sums); a row bitwise the same alone and batched;
/// offsets survive stacking; a wrong count is an error.
#[test]
fn block_mins_on_every_path() {
    let mut rng = Lcg(33);
    for isa in isas() {
        for acts in [Activations::Int8, Activations::Int16, Activations::F32] {
            for &(rows, cols, n) in SHAPES {
                let w = random_matrix(&mut rng, QuantFormat::Q8_0, rows, cols);
                let mins: Vec<f32> = (0..rows * cols / BLOCK).map(|_| rng.f32() * 0.5).collect();
                let w = w.with_block_mins(mins).unwrap().with_activations(acts);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                let (mut fast, mut want) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                qmatmul_on(isa, &w, &x, &mut fast);
                match acts {
                    Activations::F32 => qmatmul_reference(&w, &x, &mut want),
                    _ => qmatmul_int8_reference(&w, &x, &mut want),
                }
                let what = format!("{isa:?} {acts:?} [{rows},{cols}] n={n}");
                let (err, scale) = (max_err(&fast, &want), out_scale(&want));
                assert!(err <= 1e-4 * scale, "{what}: error {err} at {scale}");
                for t in 0..n {
                    let mut alone = vec![0f32; rows];
                    qmatmul_on(isa, &w, &x[t * cols..(t + 1) * cols], &mut alone);
                    assert_eq!(&fast[t * rows..(t + 1) * rows], &alone[..], "{what}: row {t} alone");
                }
            }
        }
    }
    // The offsets matter, and stacking keeps each part's (zeros for a part without).
    let a = random_matrix(&mut rng, QuantFormat::Q8_0, 9, 64).with_activations(Activations::F32);
    let plain = random_matrix(&mut rng, QuantFormat::Q8_0, 7, 64).with_activations(Activations::F32);
    let b = plain.clone().with_block_mins(vec![0.25; 14]).unwrap();
    let ab = QMatrix::concat_rows(&[a.clone(), b.clone()]).unwrap();
    let x: Vec<f32> = (0..64).map(|_| rng.f32()).collect();
    let (mut ya, mut yb, mut yab) = (vec![0f32; 9], vec![0f32; 7], vec![0f32; 16]);
    qmatmul(&a, &x, &mut ya);
    qmatmul(&b, &x, &mut yb);
    qmatmul(&ab, &x, &mut yab);
    assert_eq!(yab[..9], ya[..]);
    assert_eq!(yab[9..], yb[..]);
    let mut yp = vec![0f32; 7];
    qmatmul(&plain, &x, &mut yp);
    // Both offsets times the block's sum (f32 activations: the exact sums).
    let sums: f32 = x[..32].iter().sum::<f32>() * 0.25 + x[32..].iter().sum::<f32>() * 0.25;
    assert!(yp.iter().zip(&yb).all(|(p, b)| (b - p - sums).abs() < 1e-4), "{yp:?} {yb:?} {sums}");
    assert!(a.with_block_mins(vec![0.0; 3]).is_err());
}

/// Q4_1 blocks whose runs of two or four share a scale and min, stored as `A4_64` / `A4_128`
/// (`from_q4_1_groups`), give bitwise the Q4_1 matrix's products on every path and activation width, and
/// dequantize alike; they take 4.5 / 4.25 bits per weight where Q4_1 takes 5.
#[test]
fn shared_scale_formats_compute_as_q4_1() {
    let mut rng = Lcg(29);
    for group in [64, 128] {
        let format = QuantFormat::affine4(group).unwrap();
        for (rows, cols) in [(9, 128), (25, 640), (16, 896)] {
            let mut data = file_bytes(&random_matrix(&mut rng, QuantFormat::Q4_1, rows, cols));
            for g in data.chunks_exact_mut(20 * group / 32) {
                let head: [u8; 4] = g[..4].try_into().unwrap();
                g.chunks_exact_mut(20).for_each(|b| b[..4].copy_from_slice(&head));
            }
            let q41 = QMatrix::new(QuantFormat::Q4_1, rows, cols, &data).unwrap();
            let a4 = QMatrix::from_q4_1_groups(group, rows, cols, &data).unwrap();
            assert_eq!(a4.format(), format);
            assert_eq!(a4.weight_bytes() * 20 * group / 32, q41.weight_bytes() * (4 + group / 2), "{format:?}");
            let (mut r1, mut r2) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                q41.dequantize_row(r, &mut r1);
                a4.dequantize_row(r, &mut r2);
                assert_eq!(bits(&r1), bits(&r2), "{format:?} row {r}");
            }
            for isa in isas() {
                for acts in [Activations::Int8, Activations::Int16, Activations::F32] {
                    for n in [1, 3, 8, 64] {
                        let x = varied_rows(&mut rng, n, cols);
                        let (mut a, mut b) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                        qmatmul_on(isa, &q41.clone().with_activations(acts), &x, &mut a);
                        qmatmul_on(isa, &a4.clone().with_activations(acts), &x, &mut b);
                        assert_eq!(bits(&a), bits(&b), "{isa:?} {acts:?} {format:?} [{rows}, {cols}] n={n}");
                    }
                }
            }
        }
    }
}

/// `from_q4_1_groups` refuses blocks of a group that differ in scale or min, naming the row and columns, and
/// sizes that do not fit.
#[test]
fn shared_scale_groups_are_checked() {
    let mut rng = Lcg(31);
    let data = file_bytes(&random_matrix(&mut rng, QuantFormat::Q4_1, 3, 128));
    let err = QMatrix::from_q4_1_groups(64, 3, 128, &data).unwrap_err().to_string();
    assert!(err.contains("row 0's blocks at columns 0..64 differ"), "{err}");
    assert!(QMatrix::from_q4_1_groups(96, 3, 128, &data).is_err());
    assert!(QMatrix::from_q4_1_groups(128, 3, 192, &data).is_err());
    assert!(QMatrix::from_q4_1_groups(64, 3, 128, &data[..data.len() - 1]).is_err());
}

/// `from_q4_1` picks the largest run of blocks that share scales everywhere: 128, 64, else plain Q4_1.
#[test]
fn q4_1_takes_the_most_compact_shared_format() {
    let mut rng = Lcg(37);
    let data = file_bytes(&random_matrix(&mut rng, QuantFormat::Q4_1, 2, 256));
    let share = |data: &[u8], blocks: usize| {
        let mut d = data.to_vec();
        for g in d.chunks_exact_mut(20 * blocks) {
            let head: [u8; 4] = g[..4].try_into().unwrap();
            g.chunks_exact_mut(20).for_each(|b| b[..4].copy_from_slice(&head));
        }
        d
    };
    assert_eq!(QMatrix::from_q4_1(2, 256, &data).unwrap().format(), QuantFormat::Q4_1);
    assert_eq!(QMatrix::from_q4_1(2, 256, share(&data, 2)).unwrap().format(), QuantFormat::A4_64);
    assert_eq!(QMatrix::from_q4_1(2, 256, share(&data, 4)).unwrap().format(), QuantFormat::A4_128);
    // 96 columns: runs of 64 do not fit a row, so Q4_1 even where every block has the same scale and min.
    let short = share(&file_bytes(&random_matrix(&mut rng, QuantFormat::Q4_1, 2, 128))[..2 * 3 * 20], 6);
    assert_eq!(QMatrix::from_q4_1(2, 96, short).unwrap().format(), QuantFormat::Q4_1);
}

#[test]
fn first_rows_give_the_first_outputs() {
    let mut rng = Lcg(12);
    for format in [QuantFormat::Q4_1, QuantFormat::Q4_K, QuantFormat::Q6_K, QuantFormat::Q8_0] {
        let cols = if matches!(format, QuantFormat::Q4_K | QuantFormat::Q6_K) { 256 } else { 64 };
        let w = random_matrix(&mut rng, format, 21, cols);
        let head = w.first_rows(16).unwrap();
        let x: Vec<f32> = (0..3 * cols).map(|_| rng.f32()).collect();
        let (mut y, mut yh) = (vec![0f32; 3 * 21], vec![0f32; 3 * 16]);
        qmatmul(&w, &x, &mut y);
        qmatmul(&head, &x, &mut yh);
        for t in 0..3 {
            assert_eq!(&yh[t * 16..t * 16 + 16], &y[t * 21..t * 21 + 16], "{format:?} row {t}");
        }
        assert!(w.first_rows(12).is_err(), "not whole tiles");
        assert!(w.first_rows(24).is_err(), "more rows than the matrix");
    }
}

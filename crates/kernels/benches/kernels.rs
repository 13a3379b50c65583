//! Kernel benchmarks with a roofline view: `cargo bench -p mlx-serving-kernels`.
//!
//! - `decode_pass/*`: one decode step's matmuls of SmolLM2-135M (30 layers of q/k/v, o, gate/up, down in
//!   Q4_1, and the tied Q8_0 head): 96 MB of weights, three times the L3 cache, so every step streams them
//!   from memory as real decoding does. Criterion's throughput is the weight bytes read: compare it with the
//!   machine's read bandwidth (BENCHMARKS.md has the roofline note).
//! - `decode_pass_qwen/*`: the same for Qwen2.5-Coder-0.5B Q4_K_M's formats (Q5_0, Q4_K, Q6_K, Q8_0) and
//!   shapes, `mixed` and 8-bit activations (398 MB a pass); `decode_pass_qwen/mlx4`: its MLX 4-bit
//!   directory's (`A4_64` everywhere, untied head: 278 MB a pass).
//! - `decode_batch/*`: the same matmuls for 8 sequences decoding together; throughput in multiply-adds.
//! - `prefill/*`: one layer's matmuls for 512 tokens (compute-bound); throughput in multiply-adds.
//! - `hot/*`: one matrix that stays in cache, one activation row: the kernel's compute ceiling.
//! - `formats/*`: every weight format at one in-cache shape (1536 × 1536), 8- and 16-bit activations.
//! - `attention/*`: SmolLM2's attention (9 heads on 3 KV heads of 64) over 512 positions, f32 and f16 cache.
//! - `memory/read`: a plain 256 MiB read on the same worker pool: the machine's read-bandwidth ceiling,
//!   measured in the same run.
//!
//! Each runs with 8-bit, 16-bit and f32 activations on the detected instruction set, and on the portable path for
//! the hot case. Threads: `MLX_SERVING_THREADS` (default: all cores).

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use half::f16;
use mlx_serving_kernels::attention::{paged_attention_on, AttnSeq, KvElem, KvLayout};
use mlx_serving_kernels::quant::{qmatmul_on, Activations, Isa, QMatrix, QuantFormat};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
}

fn matrix(rng: &mut Rng, format: QuantFormat, rows: usize, cols: usize, a: Activations) -> QMatrix {
    let bb = format.block_bytes();
    let mut data: Vec<u8> = (0..rows * cols / format.block_len() * bb).map(|_| rng.next() as u8).collect();
    // Small finite scales (and mins) where the format keeps them.
    for blk in data.chunks_exact_mut(bb) {
        for &o in format.f16_offsets() {
            blk[o..o + 2].copy_from_slice(&f16::from_f32(rng.unit() * 0.05).to_le_bytes());
        }
    }
    QMatrix::new(format, rows, cols, data).unwrap().with_activations(a)
}

const HIDDEN: usize = 576;
const FFN: usize = 1536;
const LAYERS: usize = 30;
const VOCAB: usize = 49152;

/// SmolLM2-135M's matmuls in execution order: per layer qkv, o, gate_up, down; then the head; every one at
/// activation precision `a` (the kernels' rate per precision; the loader gives the Q8_0 head 16 bits even
/// with `--activations int8`).
fn model(a: Activations) -> Vec<QMatrix> {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let mut m = Vec::new();
    for _ in 0..LAYERS {
        m.push(matrix(&mut rng, QuantFormat::Q4_1, 960, HIDDEN, a));
        m.push(matrix(&mut rng, QuantFormat::Q4_1, HIDDEN, HIDDEN, a));
        m.push(matrix(&mut rng, QuantFormat::Q4_1, 2 * FFN, HIDDEN, a));
        m.push(matrix(&mut rng, QuantFormat::Q4_1, HIDDEN, FFN, a));
    }
    m.push(matrix(&mut rng, QuantFormat::Q8_0, VOCAB, HIDDEN, a));
    m
}

/// Qwen2.5-Coder-0.5B Q4_K_M's matmuls in execution order, with the file's formats: q/k/v (Q5_0; v is Q8_0
/// in every other layer), o (Q5_0), gate/up (Q5_0), down (Q4_K and Q6_K alternating), the Q8_0 head. `mixed`:
/// 16-bit activations into q/k/v, gate/up and the head, 8-bit into o and down (the default); else 8-bit but
/// into the Q8_0 weights (as the loader's `--activations int8` does).
fn qwen_model(mixed: bool) -> Vec<QMatrix> {
    let (h, ffn, kv) = (896, 4864, 128);
    let wide = if mixed { Activations::Int16 } else { Activations::Int8 };
    let mut rng = Rng(0x2545F4914F6CDD1D);
    let mut m = Vec::new();
    for layer in 0..24 {
        if layer % 2 == 0 {
            m.push(matrix(&mut rng, QuantFormat::Q5_0, h + 2 * kv, h, wide));
        } else {
            m.push(matrix(&mut rng, QuantFormat::Q5_0, h + kv, h, wide));
            m.push(matrix(&mut rng, QuantFormat::Q8_0, kv, h, Activations::Int16));
        }
        m.push(matrix(&mut rng, QuantFormat::Q5_0, h, h, Activations::Int8));
        m.push(matrix(&mut rng, QuantFormat::Q5_0, 2 * ffn, h, wide));
        let down = if layer % 2 == 0 { QuantFormat::Q4_K } else { QuantFormat::Q6_K };
        m.push(matrix(&mut rng, down, h, ffn, Activations::Int8));
    }
    m.push(matrix(&mut rng, QuantFormat::Q8_0, 151_936, h, Activations::Int16));
    m
}

/// Qwen2.5-0.5B's matmuls as its MLX 4-bit directory (group 64) runs them: every weight `A4_64` with 8-bit
/// activations, q/k/v and gate/up fused, and the untied 4-bit head.
fn qwen_mlx4_model() -> Vec<QMatrix> {
    let (h, ffn, kv) = (896, 4864, 128);
    let mut rng = Rng(0x5851F42D4C957F2D);
    let a4 = |rng: &mut Rng, rows, cols| matrix(rng, QuantFormat::A4_64, rows, cols, Activations::Int8);
    let mut m = Vec::new();
    for _ in 0..24 {
        m.push(a4(&mut rng, h + 2 * kv, h));
        m.push(a4(&mut rng, h, h));
        m.push(a4(&mut rng, 2 * ffn, h));
        m.push(a4(&mut rng, h, ffn));
    }
    m.push(a4(&mut rng, 151_936, h));
    m
}

/// Benchmark `name` in `g`: every matrix of `mats` once, for one activation row; throughput in weight bytes.
fn pass(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, mats: &[QMatrix], isa: Isa, rng: &mut Rng) {
    let bytes: usize = mats.iter().map(|m| m.weight_bytes()).sum();
    let cols = mats.iter().map(|m| m.cols()).max().unwrap_or(0);
    let x: Vec<f32> = (0..cols).map(|_| rng.unit()).collect();
    let mut y = vec![0f32; mats.iter().map(|m| m.rows()).max().unwrap_or(0)];
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function(BenchmarkId::new(name, format!("{:?}", isa.for_rows(1))), |b| {
        b.iter(|| {
            for m in mats {
                qmatmul_on(isa.for_rows(1), m, &x[..m.cols()], &mut y[..m.rows()]);
            }
        })
    });
}

fn acts_name(a: Activations) -> &'static str {
    match a {
        Activations::Int8 => "int8",
        Activations::Int16 => "int16",
        Activations::F32 => "f32",
    }
}

fn bench(c: &mut Criterion) {
    if let Ok(n) = std::env::var("MLX_SERVING_THREADS") {
        mlx_serving_kernels::pool::set_threads(n.parse().expect("MLX_SERVING_THREADS"));
    }
    let isa = Isa::detected();
    let mut rng = Rng(42);

    let mut g = c.benchmark_group("memory");
    g.sample_size(10);
    let mut buf = vec![0u64; 32 << 20];
    buf.iter_mut().enumerate().for_each(|(i, v)| *v = i as u64);
    g.throughput(Throughput::Bytes((buf.len() * 8) as u64));
    let mut sums = vec![0u64; 64];
    g.bench_function("read", |b| {
        b.iter(|| {
            let per = buf.len() / sums.len();
            mlx_serving_kernels::pool::for_each_chunk_mut(&mut sums, 1, |t, s| {
                // Four independent lanes so the adds keep up with the loads.
                let mut acc = [0u64; 4];
                for c in buf[t * per..(t + 1) * per].chunks_exact(4) {
                    for (a, v) in acc.iter_mut().zip(c) {
                        *a = a.wrapping_add(*v);
                    }
                }
                s[0] = acc.iter().fold(0, |x, y| x.wrapping_add(*y));
            });
            criterion::black_box(&sums);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("decode_pass");
    g.sample_size(20);
    for a in [Activations::Int8, Activations::Int16, Activations::F32] {
        pass(&mut g, acts_name(a), &model(a), isa, &mut rng);
    }
    g.finish();

    // The same for Qwen2.5-0.5B's formats and shapes (398 MB a pass).
    let mut g = c.benchmark_group("decode_pass_qwen");
    g.sample_size(10);
    for (name, mixed) in [("mixed", true), ("int8", false)] {
        pass(&mut g, name, &qwen_model(mixed), isa, &mut rng);
    }
    pass(&mut g, "mlx4", &qwen_mlx4_model(), isa, &mut rng);
    g.finish();

    // Eight sequences decoding together (8 concurrent streams): each weight read once for eight rows.
    batched(c, "decode_batch", 8, &[Activations::Int8, Activations::Int16], None, isa, &mut rng);
    // One layer's matmuls over a 512-token prompt.
    batched(c, "prefill", 512, &[Activations::Int8, Activations::Int16, Activations::F32], Some(4), isa, &mut rng);

    let mut g = c.benchmark_group("hot");
    for a in [Activations::Int8, Activations::Int16, Activations::F32] {
        for (format, rows, cols) in [(QuantFormat::Q4_1, 2 * FFN, HIDDEN), (QuantFormat::Q8_0, 1024, HIDDEN)] {
            let m = matrix(&mut rng, format, rows, cols, a);
            let x: Vec<f32> = (0..cols).map(|_| rng.unit()).collect();
            let mut y = vec![0f32; rows];
            g.throughput(Throughput::Bytes(m.weight_bytes() as u64));
            let mut isas = vec![isa];
            if isa != Isa::Portable {
                isas.push(Isa::Portable);
            }
            for on in isas {
                let id = format!("{format:?}/{rows}x{cols}/{:?}", on.for_rows(1));
                g.bench_function(BenchmarkId::new(acts_name(a), id), |b| {
                    b.iter(|| qmatmul_on(on.for_rows(1), &m, &x, &mut y))
                });
            }
        }
    }
    g.finish();

    // Every format at one in-cache shape, one activation row: the per-format cost of decoding blocks.
    let mut g = c.benchmark_group("formats");
    let (rows, cols) = (1536, 1536);
    g.throughput(Throughput::Elements((rows * cols) as u64));
    for format in QuantFormat::ALL {
        for a in [Activations::Int8, Activations::Int16] {
            let m = matrix(&mut rng, format, rows, cols, a);
            let x: Vec<f32> = (0..cols).map(|_| rng.unit()).collect();
            let mut y = vec![0f32; rows];
            g.bench_function(BenchmarkId::new(acts_name(a), format!("{format:?}")), |b| {
                b.iter(|| qmatmul_on(isa.for_rows(1), &m, &x, &mut y))
            });
        }
    }
    g.finish();

    attention(c, isa, &mut rng);
}

/// Group `name`: the model's matmuls (the first `take` of them, or all) for `n` activation rows, per
/// activation precision; throughput in multiply-adds.
fn batched(
    c: &mut Criterion,
    name: &str,
    n: usize,
    acts: &[Activations],
    take: Option<usize>,
    isa: Isa,
    rng: &mut Rng,
) {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    for &a in acts {
        let mats: Vec<QMatrix> = model(a).into_iter().take(take.unwrap_or(usize::MAX)).collect();
        let macs: usize = mats.iter().map(|m| m.rows() * m.cols() * n).sum();
        let x: Vec<f32> = (0..n * FFN).map(|_| rng.unit()).collect();
        let mut y = vec![0f32; n * mats.iter().map(|m| m.rows()).max().unwrap_or(0)];
        g.throughput(Throughput::Elements(macs as u64));
        g.bench_function(BenchmarkId::new(acts_name(a), format!("{:?}/n{n}", isa.for_rows(n))), |b| {
            b.iter(|| {
                for m in &mats {
                    qmatmul_on(isa.for_rows(n), m, &x[..n * m.cols()], &mut y[..n * m.rows()]);
                }
            })
        });
    }
    g.finish();
}

/// SmolLM2-135M's attention over 30 layers' caches: one decoding sequence at 512 of context (streams every
/// layer's K and V once: throughput in KV bytes), and one 128-token prefill chunk after 384 cached
/// positions (throughput in query·position pairs per head).
fn attention(c: &mut Criterion, isa: Isa, rng: &mut Rng) {
    fn run<T: KvElem>(c: &mut Criterion, isa: Isa, rng: &mut Rng, name: &str) {
        let layout = KvLayout { block_size: 16, num_kv_heads: 3, head_dim: 64 };
        let (nh, ctx) = (9, 512);
        let blocks = ctx / layout.block_size;
        let layer = blocks * layout.block_stride();
        let k: Vec<Vec<T>> = (0..LAYERS).map(|_| (0..layer).map(|_| T::from_f32(rng.unit())).collect()).collect();
        let v: Vec<Vec<T>> = (0..LAYERS).map(|_| (0..layer).map(|_| T::from_f32(rng.unit())).collect()).collect();
        // Blocks in a shuffled order, as a long-running cache hands them out.
        let table: Vec<u32> = (0..blocks as u32).map(|i| (i * 7) % blocks as u32).collect();
        let q: Vec<f32> = (0..128 * nh * 64).map(|_| rng.unit()).collect();
        let mut out = vec![0f32; q.len()];
        let mut g = c.benchmark_group("attention");
        g.sample_size(20);
        g.throughput(Throughput::Bytes((2 * LAYERS * layer * std::mem::size_of::<T>()) as u64));
        let one = [AttnSeq { query_start: 0, query_len: 1, context_len: ctx, block_table: &table }];
        g.bench_function(BenchmarkId::new("decode_ctx512", format!("{name}/{isa:?}")), |b| {
            b.iter(|| {
                for (k, v) in k.iter().zip(&v) {
                    paged_attention_on(isa, &mut out[..nh * 64], &q[..nh * 64], k, v, layout, nh, &one, 0.125, None);
                }
            })
        });
        let chunk = [AttnSeq { query_start: 0, query_len: 128, context_len: ctx, block_table: &table }];
        let pairs: usize = (385..=ctx).sum::<usize>() * nh;
        g.throughput(Throughput::Elements(pairs as u64));
        g.bench_function(BenchmarkId::new("prefill_128_after_384", format!("{name}/{isa:?}")), |b| {
            b.iter(|| paged_attention_on(isa, &mut out, &q, &k[0], &v[0], layout, nh, &chunk, 0.125, None))
        });
        g.finish();
    }
    run::<f32>(c, isa, rng, "f32");
    run::<f16>(c, isa, rng, "f16");
}

criterion_group!(benches, bench);
criterion_main!(benches);

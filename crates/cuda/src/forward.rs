//! One engine step on the GPU: the batch's metadata goes over in one copy, the layers run as launches on the
//! model's stream, and the logits of the wanted rows come back.

use super::*;

/// Byte offset of element `i` of an f32 or u32 buffer.
fn at(base: u64, i: usize) -> u64 {
    base + (i * 4) as u64
}

/// A step's metadata as the kernels read it, in one buffer (one copy to the GPU): token ids, positions, K/V
/// slots, each row's causal context length (a prompt row attends to the positions up to its own), each row's
/// block table (its sequence's, padded with zeros to the longest), the logits rows.
struct Meta {
    data: Vec<u32>,
    n: usize,
    max_blocks: usize,
}

impl Meta {
    fn new(batch: &BatchInput<'_>, block_size: usize) -> Self {
        let n = batch.token_ids.len();
        let max_blocks = batch.seqs.iter().map(|s| s.context_len.div_ceil(block_size)).max().unwrap_or(1);
        let mut data: Vec<u32> = Vec::with_capacity(n * (4 + max_blocks) + batch.logits_indices.len());
        data.extend_from_slice(batch.token_ids);
        data.extend_from_slice(batch.positions);
        data.extend_from_slice(batch.slot_mapping);
        for s in batch.seqs {
            let start = s.context_len - s.query_len;
            data.extend((0..s.query_len).map(|j| (start + j + 1) as u32));
        }
        for s in batch.seqs {
            let table = &s.block_table[..s.context_len.div_ceil(block_size)];
            for _ in 0..s.query_len {
                data.extend_from_slice(table);
                data.extend(std::iter::repeat_n(0, max_blocks - table.len()));
            }
        }
        data.extend_from_slice(batch.logits_indices);
        Self { data, n, max_blocks }
    }

    /// Element offsets of the ids, positions, slots, context lengths, block tables and logits rows.
    fn offsets(&self) -> [usize; 6] {
        let n = self.n;
        [0, n, 2 * n, 3 * n, 4 * n, 4 * n + n * self.max_blocks]
    }
}

impl CudaModel {
    /// One step; the logits rows flagged in `argmax_only` come back as their argmax alone (see
    /// [`DeviceModel::forward_select`]).
    pub(crate) fn step(
        &mut self,
        batch: &BatchInput<'_>,
        argmax_only: &[bool],
        progress: &dyn Fn() -> bool,
    ) -> Result<StepLogits> {
        // The engine runs steps on its own thread: make the model's context current there.
        self.ctx.bind_to_thread().map_err(device_err("binding the GPU's context"))?;
        let cfg = &self.cfg;
        batch.check(self.block_size, self.num_blocks, cfg.max_position_embeddings, cfg.vocab_size, cfg.hidden_size)?;
        if !batch.mrope_positions.is_empty() {
            return Err(Error::InvalidBatch("M-RoPE positions are not supported on the GPU yet".into()));
        }
        let (n, m) = (batch.token_ids.len(), batch.logits_indices.len());
        if !argmax_only.is_empty() && argmax_only.len() != m {
            return Err(Error::InvalidBatch(format!("{} argmax flags for {m} logits rows", argmax_only.len())));
        }
        // Rows go in a grid dimension that holds 65,535 blocks.
        if n > 65_535 || m > 65_535 {
            return Err(Error::InvalidBatch(format!("a GPU step takes at most 65,535 tokens, this one has {n}")));
        }
        let (h, nh, nkv, hd, ffn) =
            (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size);
        let (bs, eps, vocab) = (self.block_size, cfg.rms_norm_eps, cfg.vocab_size);
        let width = (nh + 2 * nkv) * hd;

        let meta = Meta::new(batch, bs);
        let max_blocks = meta.max_blocks;
        let stream = self.stream.clone();
        let len = meta.data.len();
        let base = grown(&mut self.scratch.meta, &stream, len)?;
        let meta_buf = self.scratch.meta.as_mut().expect("allocated");
        stream.memcpy_htod(&meta.data, &mut meta_buf.slice_mut(0..len)).map_err(device_err("copying the batch"))?;
        let [ids, positions, slots, ctx_lens, tables, logits_rows] = meta.offsets().map(|o| at(base, o));

        // Scratch.
        let rows = n.max(m);
        let max_ctx = batch.seqs.iter().map(|s| s.context_len).max().unwrap_or(1);
        let max_splits = max_ctx.div_ceil(SPLIT);
        let per_row = nh * max_splits * (hd + 2) * 4;
        let chunk = (ATTN_PARTIAL_BYTES / per_row).clamp(1, n);
        let sc = &mut self.scratch;
        let x = sc.f32(&stream, slot::X, n * h)?;
        let hn = sc.f32(&stream, slot::HN, rows * h)?;
        let qkv = sc.f32(&stream, slot::QKV, n * width)?;
        let q = sc.f32(&stream, slot::Q, n * nh * hd)?;
        let attn = sc.f32(&stream, slot::ATTN, n * nh * hd)?;
        let gu = sc.f32(&stream, slot::GU, n * 2 * ffn)?;
        let act = sc.f32(&stream, slot::ACT, n * ffn)?;
        let logits = sc.f32(&stream, slot::LOGITS, m * vocab)?;
        let part_max = sc.f32(&stream, slot::PART_MAX, chunk * nh * max_splits)?;
        let part_sum = sc.f32(&stream, slot::PART_SUM, chunk * nh * max_splits)?;
        let part_out = sc.f32(&stream, slot::PART_OUT, chunk * nh * max_splits * hd)?;
        let hn16 = sc.u16(&stream, slot::HN16, rows * h)?;
        let attn16 = sc.u16(&stream, slot::ATTN16, n * nh * hd)?;
        let act16 = sc.u16(&stream, slot::ACT16, n * ffn)?;

        // Embeddings (and rows given as embeddings: a vision encoder's output).
        let (h_i, scale) = (h as i32, cfg.embed_scale.unwrap_or(1.0));
        let table = &self.embed.parts[0];
        let t = ptr(&table.bytes, &stream);
        let mut l = self.launch(&self.kernels.format(table.format).embed, (n as u32, 1, 1), 128);
        l.args.arg(&t).arg(&ids).arg(&x).arg(&h_i).arg(&scale);
        l.go("embedding")?;
        if !batch.embeds.is_empty() {
            let xs = self.scratch.f32s[slot::X].as_mut().expect("allocated");
            for &(row, e) in batch.embeds {
                let mut dst = xs.slice_mut(row * h..row * h + e.len());
                stream.memcpy_htod(e, &mut dst).map_err(device_err("copying embeddings"))?;
            }
        }

        let mm = MatmulCtx {
            stream: &self.stream,
            kernels: &self.kernels,
            blas: &self.blas,
            dequant: ptr(&self.dequant, &self.stream),
        };
        let norm = |src: u64, rows_ptr: u64, w: &CudaSlice<f32>, count: usize, out16: Option<HalfKind>| {
            let w = ptr(w, &stream);
            let (o16, kind) = match out16 {
                Some(k) => (hn16, k as i32),
                None => (0u64, 0i32),
            };
            let mut l = self.launch(&self.kernels.rms_norm, (count as u32, 1, 1), 256);
            l.args.arg(&src).arg(&rows_ptr).arg(&w).arg(&hn).arg(&o16).arg(&kind).arg(&h_i).arg(&eps);
            l.go("rms_norm")
        };
        let half_for = |w: &Matrix, count: usize| w.wants_half(count).then(|| w.gemm_kind());
        let neox = i32::from(cfg.rope_style == RopeStyle::Neox);
        let (nh_i, nkv_i, hd_i, rope_i) = (nh as i32, nkv as i32, hd as i32, cfg.rope_dim as i32);
        let inv_freq = ptr(&self.inv_freq, &stream);
        let groups = nh / nkv;
        let grouped = hd % 64 == 0 && groups <= 8 && groups * hd <= 2048;
        for (i, layer) in self.layers.iter().enumerate() {
            norm(x, 0, &layer.attn_norm, n, half_for(&layer.qkv, n))?;
            mm.matmul(&layer.qkv, hn, hn16, qkv, n, false)?;
            let bias = layer.qkv_bias.as_ref().map_or(0, |b| ptr(b, &stream));
            let (kc, vc) = (ptr(&self.kv[i].k, &stream), ptr(&self.kv[i].v, &stream));
            let mut l = self.launch(&self.kernels.qkv_rope_store, (n as u32, (nh + nkv) as u32, 1), 64);
            l.args.arg(&qkv).arg(&bias).arg(&positions).arg(&slots).arg(&inv_freq).arg(&q).arg(&kc).arg(&vc);
            l.args.arg(&nh_i).arg(&nkv_i).arg(&hd_i).arg(&rope_i).arg(&neox);
            l.go("qkv_rope_store")?;
            for r0 in (0..n).step_by(chunk) {
                let count = chunk.min(n - r0);
                let p = PagedDecodeParams {
                    q: at(q, r0 * nh * hd),
                    k_cache: kc,
                    v_cache: vc,
                    block_tables: at(tables, r0 * max_blocks),
                    context_lens: at(ctx_lens, r0),
                    out: at(attn, r0 * nh * hd),
                    part_max,
                    part_sum,
                    part_out,
                    num_heads: nh_i,
                    num_kv_heads: nkv_i,
                    head_dim: hd_i,
                    block_size: bs as i32,
                    max_blocks_per_seq: max_blocks as i32,
                    max_splits: max_splits as i32,
                    split: SPLIT as i32,
                    scale: cfg.attn_scale,
                };
                let mut l = if grouped {
                    self.launch(
                        &self.kernels.pa_grouped[groups - 1],
                        (nkv as u32, count as u32, max_splits as u32),
                        256,
                    )
                } else {
                    self.launch(&self.kernels.pa_split, (nh as u32, count as u32, max_splits as u32), 128)
                };
                l.args.arg(&p);
                l.go("attention")?;
                let mut l = self.launch(&self.kernels.pa_merge, (nh as u32, count as u32, 1), 128);
                l.args.arg(&p);
                l.go("attention merge")?;
            }
            if let Some(kind) = half_for(&layer.o, n) {
                self.to_half(attn, attn16, kind, n * nh * hd)?;
            }
            mm.matmul(&layer.o, attn, attn16, x, n, true)?;
            if !progress() {
                return Err(Error::Cancelled);
            }
            norm(x, 0, &layer.ffn_norm, n, half_for(&layer.gate_up, n))?;
            mm.matmul(&layer.gate_up, hn, hn16, gu, n, false)?;
            let (a16, kind) = match half_for(&layer.down, n) {
                Some(k) => (act16, k as i32),
                None => (0u64, 0i32),
            };
            let ffn_i = ffn as i32;
            let mut l = self.launch(&self.kernels.swiglu, (ffn.div_ceil(256) as u32, n as u32, 1), 256);
            l.args.arg(&gu).arg(&act).arg(&a16).arg(&kind).arg(&ffn_i);
            l.go("swiglu")?;
            mm.matmul(&layer.down, act, act16, x, n, true)?;
            if !progress() {
                return Err(Error::Cancelled);
            }
        }
        if m == 0 {
            stream.synchronize().map_err(device_err("step"))?;
            return Ok(StepLogits::default());
        }
        let head = self.head.as_ref().unwrap_or(&self.embed);
        norm(x, logits_rows, &self.norm, m, half_for(head, m))?;
        mm.matmul(head, hn, hn16, logits, m, false)?;
        if !argmax_only.contains(&true) {
            let out = self.scratch.f32s[slot::LOGITS].as_ref().expect("allocated");
            let all = stream.clone_dtoh(&out.slice(0..m * vocab)).map_err(device_err("copying the logits"))?;
            return Ok(StepLogits::all(all, m));
        }
        // Every row's argmax on the GPU (one block per row), the ids back, and the logits of the other rows
        // only, a run of consecutive rows per copy.
        let ids = self.scratch.u32(&stream, m)?;
        let vocab_i = vocab as i32;
        let mut l = self.launch(&self.kernels.argmax_rows, (m as u32, 1, 1), ARGMAX_THREADS);
        l.args.arg(&logits).arg(&vocab_i).arg(&ids);
        l.go("argmax")?;
        let ids_buf = self.scratch.tokens.as_ref().expect("allocated");
        let ids = stream.clone_dtoh(&ids_buf.slice(0..m)).map_err(device_err("copying the argmax"))?;
        let out = self.scratch.f32s[slot::LOGITS].as_ref().expect("allocated");
        let mut kept = Vec::new();
        let mut r = 0;
        while r < m {
            let start = r;
            while r < m && !argmax_only[r] {
                r += 1;
            }
            if r > start {
                let part = stream
                    .clone_dtoh(&out.slice(start * vocab..r * vocab))
                    .map_err(device_err("copying the logits"))?;
                kept.extend_from_slice(&part);
            }
            r += 1;
        }
        let tokens = argmax_only.iter().zip(ids).map(|(&only, id)| only.then_some(id)).collect();
        Ok(StepLogits { logits: kept, tokens })
    }

    fn to_half(&self, src: u64, dst: u64, kind: HalfKind, len: usize) -> Result<()> {
        let (kind, len_i) = (kind as i32, len as i32);
        let mut l = self.launch(&self.kernels.to_half, (len.div_ceil(256) as u32, 1, 1), 256);
        l.args.arg(&src).arg(&dst).arg(&kind).arg(&len_i);
        l.go("to_half")
    }
}

#[cfg(test)]
mod tests {
    use super::Meta;
    use mlx_serving_models::{BatchInput, SeqInput};

    /// A 3-token prompt chunk at positions 4..7 and a decode row at position 20, blocks of 4 tokens.
    #[test]
    fn metadata_gives_each_row_its_causal_context_and_table() {
        let (t0, t1) = ([7u32, 3], [9u32, 2, 5, 8, 1, 6]);
        let seqs = [
            SeqInput { query_len: 3, context_len: 7, block_table: &t0 },
            SeqInput { query_len: 1, context_len: 21, block_table: &t1 },
        ];
        let batch = BatchInput {
            token_ids: &[11, 12, 13, 14],
            positions: &[4, 5, 6, 20],
            slot_mapping: &[12, 13, 14, 24],
            seqs: &seqs,
            logits_indices: &[2, 3],
            embeds: &[],
            mrope_positions: &[],
        };
        let m = Meta::new(&batch, 4);
        assert_eq!(m.max_blocks, 6);
        let [ids, pos, slots, ctx, tables, rows] = m.offsets();
        assert_eq!(&m.data[ids..pos], &[11, 12, 13, 14]);
        assert_eq!(&m.data[pos..slots], &[4, 5, 6, 20]);
        assert_eq!(&m.data[slots..ctx], &[12, 13, 14, 24]);
        assert_eq!(&m.data[ctx..tables], &[5, 6, 7, 21]);
        let padded = [7, 3, 0, 0, 0, 0];
        assert_eq!(&m.data[tables..rows], [&padded[..], &padded, &padded, &[9, 2, 5, 8, 1, 6]].concat().as_slice());
        assert_eq!(&m.data[rows..], &[2, 3]);
    }
}

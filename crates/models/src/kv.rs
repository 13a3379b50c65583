//! Paged KV cache storage and the batch metadata `Model::forward` takes.
//!
//! The cache is a pool of fixed-size blocks per layer (layout in `mlx_serving_kernels::attention`). Which
//! blocks belong to which sequence is decided outside (the KV cache manager); the model only follows the
//! block tables and slot mapping it is given.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use half::f16;
use mlx_serving_kernels::{KvDtype, KvElem, KvLayout};

/// K and V blocks for every layer, in the config's `kv_dtype`.
pub struct PagedKvCache {
    layout: KvLayout,
    num_blocks: usize,
    pub(crate) layers: KvLayers,
}

pub(crate) enum KvLayers {
    F16(Vec<LayerKv<f16>>),
    F32(Vec<LayerKv<f32>>),
}

pub(crate) struct LayerKv<T> {
    pub k: Vec<T>,
    pub v: Vec<T>,
}

impl<T: KvElem> LayerKv<T> {
    fn new(len: usize) -> Self {
        // Written, not just reserved: the whole budget is resident from the start, so memory use is flat
        // and a KV budget the machine cannot hold fails at startup, not mid-request.
        // Zeroed on the kernel pool, in huge pages where the system has them.
        let touched = || mlx_serving_kernels::mapped::huge_zeroed::<T>(len);
        Self { k: touched(), v: touched() }
    }
}

impl PagedKvCache {
    pub fn new(cfg: &ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        let layout = KvLayout { block_size, num_kv_heads: cfg.num_kv_heads, head_dim: cfg.head_dim };
        let n = num_blocks * layout.block_stride();
        let layers = match cfg.kv_dtype {
            KvDtype::F16 => KvLayers::F16((0..cfg.num_layers).map(|_| LayerKv::new(n)).collect()),
            KvDtype::F32 => KvLayers::F32((0..cfg.num_layers).map(|_| LayerKv::new(n)).collect()),
        };
        Self { layout, num_blocks, layers }
    }

    /// Bytes one block takes across all layers (K and V).
    pub fn bytes_per_block(cfg: &ModelConfig, block_size: usize) -> usize {
        2 * cfg.num_layers * block_size * cfg.kv_size() * cfg.kv_dtype.bytes()
    }

    pub fn dtype(&self) -> KvDtype {
        match self.layers {
            KvLayers::F16(_) => KvDtype::F16,
            KvLayers::F32(_) => KvDtype::F32,
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

/// One sequence's share of a flattened batch.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    /// Tokens of this sequence in this step (their rows are contiguous, in sequence order).
    pub query_len: usize,
    /// Tokens in the cache for this sequence once this step's tokens are written.
    pub context_len: usize,
    pub block_table: &'a [u32],
}

/// A flattened batch: all sequences' new tokens back to back.
///
/// ```text
///   token_ids / positions / slot_mapping:  [ seq0 tokens | seq1 tokens | ... ]
///   logits_indices: rows (into the flattened tokens) whose next-token logits are wanted
/// ```
#[derive(Clone, Debug)]
pub struct BatchInput<'a> {
    pub token_ids: &'a [u32],
    pub positions: &'a [u32],
    /// Global slot (`block * block_size + offset`) each token's K/V is written to.
    pub slot_mapping: &'a [u32],
    pub seqs: &'a [SeqInput<'a>],
    pub logits_indices: &'a [u32],
    /// Rows whose input embeddings are given instead of looked up from their token ids (a vision encoder's
    /// output at image placeholder tokens): each `(first row, hidden_size × k values)` for `k` rows.
    pub embeds: &'a [(usize, &'a [f32])],
    /// M-RoPE models (Qwen2-VL): each token's (temporal, row, column) rotary position, or empty when every
    /// token's three equal its cache position (`positions`: text-only batches). Image tokens sit on a 2-D grid
    /// and the text after an image continues from the grid's largest position, so these can differ from the
    /// cache positions.
    pub mrope_positions: &'a [[u32; 3]],
}

impl BatchInput<'_> {
    pub(crate) fn validate(
        &self,
        cache: &PagedKvCache,
        max_positions: usize,
        vocab_size: usize,
        hidden_size: usize,
    ) -> Result<()> {
        self.check(cache.block_size(), cache.num_blocks(), max_positions, vocab_size, hidden_size)
    }

    /// Checks the batch against a paged cache of `num_blocks` blocks of `block_size` tokens (on any device) and
    /// the model's sizes: every index a kernel will follow is in range.
    pub fn check(
        &self,
        block_size: usize,
        num_blocks: usize,
        max_positions: usize,
        vocab_size: usize,
        hidden_size: usize,
    ) -> Result<()> {
        let n = self.token_ids.len();
        let bad = |m: String| Err(Error::InvalidBatch(m));
        if n == 0 {
            return bad("empty batch".into());
        }
        if self.positions.len() != n || self.slot_mapping.len() != n {
            return bad(format!(
                "{n} tokens but {} positions and {} slots",
                self.positions.len(),
                self.slot_mapping.len()
            ));
        }
        if let Some(&id) = self.token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return bad(format!("token id {id} is outside the vocabulary (size {vocab_size})"));
        }
        let total: usize = self.seqs.iter().map(|s| s.query_len).sum();
        if total != n {
            return bad(format!("sequence query lengths sum to {total}, batch has {n} tokens"));
        }
        let bs = block_size;
        let mut row = 0;
        for (i, s) in self.seqs.iter().enumerate() {
            if s.query_len == 0 || s.query_len > s.context_len {
                return bad(format!("seq {i}: query_len {} context_len {}", s.query_len, s.context_len));
            }
            if s.context_len > max_positions {
                return bad(format!(
                    "seq {i}: context {} exceeds the model's {max_positions} positions",
                    s.context_len
                ));
            }
            if s.block_table.len() < s.context_len.div_ceil(bs)
                || s.block_table.iter().any(|&b| b as usize >= num_blocks)
            {
                return bad(format!("seq {i}: block table does not cover {} tokens with valid blocks", s.context_len));
            }
            for j in 0..s.query_len {
                let pos = s.context_len - s.query_len + j;
                if self.positions[row + j] as usize != pos {
                    return bad(format!("seq {i}: token {j} has position {}, expected {pos}", self.positions[row + j]));
                }
                let slot = s.block_table[pos / bs] as usize * bs + pos % bs;
                if self.slot_mapping[row + j] as usize != slot {
                    return bad(format!(
                        "seq {i}: token {j} maps to slot {}, block table says {slot}",
                        self.slot_mapping[row + j]
                    ));
                }
            }
            row += s.query_len;
        }
        if self.logits_indices.iter().any(|&r| r as usize >= n) {
            return bad("logits index out of range".into());
        }
        if self.embeds.iter().any(|&(row, e)| e.len() % hidden_size != 0 || row + e.len() / hidden_size > n) {
            return bad("embedding rows out of range or not a whole number of rows".into());
        }
        if !self.mrope_positions.is_empty() {
            if self.mrope_positions.len() != n {
                return bad(format!("{n} tokens but {} M-RoPE positions", self.mrope_positions.len()));
            }
            if self.mrope_positions.iter().flatten().any(|&p| p as usize >= max_positions) {
                return bad(format!("an M-RoPE position beyond the model's {max_positions} positions"));
            }
        }
        Ok(())
    }
}

//! Helpers shared by the forward-pass tests.

use mlx_serving_models::{BatchInput, Model, PagedKvCache, SeqInput};

/// Runs `tokens[range]` of one sequence as one step; returns the logits of every token in the step.
pub fn step(
    model: &Model,
    cache: &mut PagedKvCache,
    table: &[u32],
    tokens: &[u32],
    start: usize,
    end: usize,
) -> Vec<Vec<f32>> {
    let bs = cache.block_size();
    let positions: Vec<u32> = (start..end).map(|p| p as u32).collect();
    let slots: Vec<u32> = (start..end).map(|p| table[p / bs] * bs as u32 + (p % bs) as u32).collect();
    let seqs = [SeqInput { query_len: end - start, context_len: end, block_table: table }];
    let rows: Vec<u32> = (0..(end - start) as u32).collect();
    let batch = BatchInput {
        token_ids: &tokens[start..end],
        positions: &positions,
        slot_mapping: &slots,
        seqs: &seqs,
        logits_indices: &rows,
        embeds: &[],
        mrope_positions: &[],
    };
    let v = model.config().vocab_size;
    model.forward(&batch, cache).unwrap().chunks(v).map(|c| c.to_vec()).collect()
}

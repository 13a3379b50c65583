//! The forward pass over the paged cache gives the same logits however the tokens are batched: whole
//! prompt at once, token by token, in chunks, or next to another sequence.

mod common;

use common::step;
use mlx_serving_models::{BatchInput, LoadOptions, Model, PagedKvCache, SeqInput};
use mlx_serving_test_support::tiny::TinyLlama;

/// Regression: the tests used to write the same file concurrently and read each other's half-written
/// model; the file is now written once per process.
fn tiny_path() -> &'static std::path::Path {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mlx-serving-forward-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tiny.gguf");
        TinyLlama::default().write(&p, &[]);
        p
    })
}

fn tiny_model() -> Model {
    Model::load_gguf(tiny_path(), &LoadOptions::default()).unwrap()
}

/// A model loaded with `config_only` (its weights live on a GPU) has the whole configuration and refuses to run.
#[test]
fn a_config_only_model_has_the_configuration_and_refuses_to_run() {
    let full = tiny_model();
    let hollow = Model::load_gguf(tiny_path(), &LoadOptions { config_only: true, ..LoadOptions::default() }).unwrap();
    assert_eq!(format!("{:?}", hollow.config()), format!("{:?}", full.config()));
    let mut cache = PagedKvCache::new(full.config(), 16, 4);
    let table = [0u32, 1, 2, 3];
    let seqs = [SeqInput { query_len: 3, context_len: 3, block_table: &table }];
    let batch = BatchInput {
        token_ids: &TOKENS[..3],
        positions: &[0, 1, 2],
        slot_mapping: &[0, 1, 2],
        seqs: &seqs,
        logits_indices: &[2],
        embeds: &[],
        mrope_positions: &[],
    };
    let e = hollow.forward(&batch, &mut cache).unwrap_err().to_string();
    assert!(e.contains("without its weights"), "{e}");
    assert_eq!(full.forward(&batch, &mut cache).unwrap().len(), full.config().vocab_size);
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

const TOKENS: [u32; 21] = [5, 17, 3, 88, 42, 42, 7, 60, 1, 2, 90, 33, 12, 70, 8, 19, 25, 4, 51, 66, 9];

#[test]
fn prefill_equals_incremental_and_chunked() {
    let m = tiny_model();
    let table: Vec<u32> = vec![3, 0, 5, 1, 4, 2]; // deliberately scattered blocks
    let mut c1 = PagedKvCache::new(m.config(), 4, 6);
    let whole = step(&m, &mut c1, &table, &TOKENS, 0, TOKENS.len());
    let mut c2 = PagedKvCache::new(m.config(), 4, 6);
    let mut inc = Vec::new();
    for i in 0..TOKENS.len() {
        inc.extend(step(&m, &mut c2, &table, &TOKENS, i, i + 1));
    }
    let mut c3 = PagedKvCache::new(m.config(), 4, 6);
    let mut chunked = Vec::new();
    for (s, e) in [(0, 5), (5, 6), (6, 15), (15, 21)] {
        chunked.extend(step(&m, &mut c3, &table, &TOKENS, s, e));
    }
    // Bitwise: a token's logits do not depend on how many tokens share its step, which is
    // what lets speculative decoding verify several tokens in one step and still give the tokens that
    // decoding one at a time gives.
    for i in 0..TOKENS.len() {
        assert!(whole[i] == inc[i], "token {i}: whole vs incremental differ bitwise");
        assert!(chunked[i] == inc[i], "token {i}: chunked vs incremental differ bitwise");
    }
    // Positions matter: the same token at another position gets other logits.
    assert!(max_diff(&whole[4], &whole[5]) > 1e-2);
}

#[test]
fn two_sequences_in_one_batch_match_each_alone() {
    let m = tiny_model();
    let v = m.config().vocab_size;
    let (a, b) = (&TOKENS[..9], &TOKENS[9..]);
    let (ta, tb): (Vec<u32>, Vec<u32>) = (vec![0, 1, 2], vec![7, 6, 5, 4]);
    let alone = |toks: &[u32], table: &[u32]| {
        let mut c = PagedKvCache::new(m.config(), 4, 8);
        step(&m, &mut c, table, toks, 0, toks.len()).pop().unwrap()
    };
    let (la, lb) = (alone(a, &ta), alone(b, &tb));
    let mut cache = PagedKvCache::new(m.config(), 4, 8);
    let ids: Vec<u32> = a.iter().chain(b).copied().collect();
    let positions: Vec<u32> = (0..a.len() as u32).chain(0..b.len() as u32).collect();
    let slot = |t: &[u32], p: usize| t[p / 4] * 4 + (p % 4) as u32;
    let slots: Vec<u32> = (0..a.len()).map(|p| slot(&ta, p)).chain((0..b.len()).map(|p| slot(&tb, p))).collect();
    let seqs = [
        SeqInput { query_len: a.len(), context_len: a.len(), block_table: &ta },
        SeqInput { query_len: b.len(), context_len: b.len(), block_table: &tb },
    ];
    let rows = [a.len() as u32 - 1, ids.len() as u32 - 1];
    let batch = BatchInput {
        token_ids: &ids,
        positions: &positions,
        slot_mapping: &slots,
        seqs: &seqs,
        logits_indices: &rows,
        embeds: &[],
        mrope_positions: &[],
    };
    let out = m.forward(&batch, &mut cache).unwrap();
    assert!(max_diff(&out[..v], &la) < 1e-3);
    assert!(max_diff(&out[v..], &lb) < 1e-3);
}

#[test]
fn inconsistent_batches_are_errors_not_panics() {
    let m = tiny_model();
    let mut cache = PagedKvCache::new(m.config(), 4, 2);
    let table = [0u32, 1];
    let seqs = [SeqInput { query_len: 2, context_len: 2, block_table: &table }];
    // Wrong slot for the second token.
    let bad_slots = BatchInput {
        token_ids: &[1, 2],
        positions: &[0, 1],
        slot_mapping: &[0, 5],
        seqs: &seqs,
        logits_indices: &[1],
        embeds: &[],
        mrope_positions: &[],
    };
    assert!(m.forward(&bad_slots, &mut cache).is_err());
    // Context longer than the block table covers.
    let seqs = [SeqInput { query_len: 1, context_len: 9, block_table: &table }];
    let too_long = BatchInput {
        token_ids: &[1],
        positions: &[8],
        slot_mapping: &[8],
        seqs: &seqs,
        logits_indices: &[0],
        embeds: &[],
        mrope_positions: &[],
    };
    assert!(m.forward(&too_long, &mut cache).is_err());
    // Token id outside the vocabulary.
    let seqs = [SeqInput { query_len: 1, context_len: 1, block_table: &table }];
    let bad_id = BatchInput {
        token_ids: &[10_000],
        positions: &[0],
        slot_mapping: &[0],
        seqs: &seqs,
        logits_indices: &[0],
        embeds: &[],
        mrope_positions: &[],
    };
    assert!(m.forward(&bad_id, &mut cache).is_err());
}

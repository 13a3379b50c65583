//! The SSE-client fuzzer's seeds and findings (`fuzz/seeds/sse`, `fuzz/regressions/sse`), replayed on stable
//! through the entry point the fuzz target calls (`mlx_serving_bench::client::fuzz_sse`): none may panic.

#[test]
fn sse_inputs_replay_without_panics() {
    for (path, data) in mlx_serving_test_support::fuzz_inputs("sse") {
        eprintln!("{}", path.display());
        mlx_serving_bench::client::fuzz_sse(&data);
    }
}

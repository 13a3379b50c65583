//! The request-body fuzzer's seeds and findings (`fuzz/seeds/request`, `fuzz/regressions/request`), replayed
//! on stable through the entry point the fuzz target calls (`mlx_serving_server::fuzzing::request`): none may
//! panic.

#[test]
fn request_inputs_replay_without_panics() {
    for (path, data) in mlx_serving_test_support::fuzz_inputs("request") {
        eprintln!("{}", path.display());
        mlx_serving_server::fuzzing::request(&data);
    }
}

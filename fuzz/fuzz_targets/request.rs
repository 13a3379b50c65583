#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mlx_serving_server::fuzzing::request(data));

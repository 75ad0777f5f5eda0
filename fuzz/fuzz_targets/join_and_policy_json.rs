//! See `herd_fuzz::join_and_policy_json` for what this target checks and its input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herd_fuzz::join_and_policy_json::run(data));

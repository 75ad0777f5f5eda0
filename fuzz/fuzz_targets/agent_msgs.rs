//! See `herd_fuzz::agent_msgs` for what this target checks and its input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herd_fuzz::agent_msgs::run(data));

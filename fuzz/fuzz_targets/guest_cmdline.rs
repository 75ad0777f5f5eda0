//! See `herd_fuzz::guest_cmdline` for what this target checks and its input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herd_fuzz::guest_cmdline::run(data));

//! See `herd_fuzz::api_http` for what this target checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|request: herd_fuzz::api_http::FuzzRequest| {
    herd_fuzz::api_http::run(&request)
});

//! The bodies of herd's fuzz targets, one module per target.
//!
//! Each target in `fuzz_targets/` is one line that calls `run` here. Keeping the logic in
//! a library lets the seed generator (`examples/seeds.rs`) build inputs with the same
//! types the targets decode, and replay every seed through the same code before writing
//! it, so a seed that crashes is caught when it is made, not in CI.
//!
//! A target panics on anything that is a bug: a panic inside herd, a broken invariant of
//! a decoder or a state machine, a server error. libFuzzer turns the panic into a saved
//! crash input; `scripts/fuzz` runs every target and fails on one.

pub mod agent_msgs;
pub mod api_http;
pub mod guest_cmdline;
pub mod guest_frames;
pub mod join_and_policy_json;
pub mod json;

//! Code shared by herd's benchmark binaries.

pub mod herd_up;
pub mod plot;

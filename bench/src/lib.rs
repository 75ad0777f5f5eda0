//! Code shared by herd's benchmark binaries.

pub mod plot;

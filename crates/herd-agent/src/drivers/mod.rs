//! Driver implementations, one module per hypervisor type.

pub mod sim;

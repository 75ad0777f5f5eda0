//! Driver implementations, one module per hypervisor type.

pub mod qemu;
pub mod sim;

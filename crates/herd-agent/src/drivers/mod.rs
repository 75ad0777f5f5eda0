//! Driver implementations, one module per hypervisor type.

pub(crate) mod channel;
pub(crate) mod console;
pub mod guest_config;
mod images;
pub mod oci;
mod op_locks;
pub mod procfs;
pub mod qemu;
pub mod sim;

/// The hypervisor types this build has drivers for, each named by its driver. The
/// server takes them as the types a VM may name before any host has announced its
/// drivers; after that, only the types some host offers.
pub const KINDS: [&str; 3] = [qemu::KIND, oci::KIND, sim::KIND];

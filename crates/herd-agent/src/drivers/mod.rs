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

/// Saves a VM's spec in its directory (`spec.json`), where a restarted agent finds it.
pub(crate) fn save_spec(
    path: &std::path::Path,
    spec: &herd_proto::wire::VmSpec,
) -> Result<(), crate::driver::DriverError> {
    use crate::driver::DriverError;
    let json = serde_json::to_vec_pretty(spec).map_err(DriverError::encode("the VM's spec"))?;
    crate::persist::write_atomic(path, &json).map_err(DriverError::io("saving spec.json"))
}

/// Gives a held spec a new shape and saves it.
pub(crate) fn reshape_spec(
    spec: &mut herd_proto::wire::VmSpec,
    path: &std::path::Path,
    vcpus: u32,
    memory_mib: u64,
) -> Result<(), crate::driver::DriverError> {
    spec.vcpus = vcpus;
    spec.memory_mib = memory_mib;
    save_spec(path, spec)
}

//! What names a VM and a host, and what a VM should be: shared by the agent protocol
//! (`wire`) and the migration protocol (`migration`), which import it, not each other.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub type VmId = Uuid;
pub type HostId = Uuid;
pub type BroadcastId = Uuid;

/// What a VM should be, as the agent needs it to build one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub hypervisor: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub image: String,
    /// The workload command run inside the guest; empty runs the image's default.
    pub command: Vec<String>,
    /// Self-management policies, enforced in the guest and, as a backstop, by the agent.
    #[serde(default)]
    pub policy: crate::policy::PolicySpec,
    /// Keep the VM up after its workload ends (by default it powers off).
    #[serde(default)]
    pub keep_running: bool,
    /// The size of the VM's data disk in MiB; 0 for none. A qemu guest sees it as a
    /// virtio-blk device that herd-guest mounts at /data.
    #[serde(default)]
    pub disk_mib: u64,
    /// The most the VM may burst by (its project's limits), for its host to decide alone.
    #[serde(default)]
    pub burst: crate::burst::BurstLimits,
    /// A copy made from this broadcast's snapshot, which its host holds, instead of
    /// from its image alone.
    #[serde(default)]
    pub seed: Option<BroadcastId>,
}

//! The index compares numbers, not hosts: this is what it keeps of each host, so that a
//! placement touches no strings or hash maps, and where it decides whether a host's
//! numbers are small enough for the trees' arithmetic.

use crate::{fit_score, Demand, HostSlot, SchedPolicy, Score, Short};
use uuid::Uuid;

/// Limits above this keep a host out of the trees, so that `free * limit` fits in i64.
const TREE_MAX_LIMIT: u64 = 1 << 30;
/// Usage above this keeps a host out of the trees (free capacity stays within 2^31).
const TREE_MAX_USED: u64 = 1 << 31;

/// What the filter and the weigh need of a host, without its strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Load {
    pub(super) id: Uuid,
    vcpu_limit: u64,
    memory_limit_mib: u64,
    used_vcpus: u64,
    used_memory_mib: u64,
}

impl Load {
    pub(super) fn shape(&self) -> (u64, u64) {
        (self.vcpu_limit, self.memory_limit_mib)
    }

    /// Whether the trees can hold the host.
    pub(super) fn fits_trees(&self) -> bool {
        (1..=TREE_MAX_LIMIT).contains(&self.vcpu_limit)
            && (1..=TREE_MAX_LIMIT).contains(&self.memory_limit_mib)
            && self.used_vcpus <= TREE_MAX_USED
            && self.used_memory_mib <= TREE_MAX_USED
    }

    /// Free capacity; only called when `fits_trees`, so the casts are exact.
    pub(super) fn free_vcpus(&self) -> i64 {
        self.vcpu_limit as i64 - self.used_vcpus as i64
    }

    pub(super) fn free_memory_mib(&self) -> i64 {
        self.memory_limit_mib as i64 - self.used_memory_mib as i64
    }

    pub(super) fn fit(&self, demand: &Demand) -> Result<Score, Short> {
        fit_score(
            self.vcpu_limit,
            self.memory_limit_mib,
            self.used_vcpus,
            self.used_memory_mib,
            demand,
        )
    }
}

/// A host as the scheduler holds it: its slot plus what the index derives from it.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) slot: HostSlot,
    vcpu_limit: u64,
    memory_limit_mib: u64,
    /// The slot's hypervisor types without duplicates.
    pub(super) kinds: Vec<String>,
}

impl Entry {
    pub(super) fn new(slot: HostSlot, policy: &SchedPolicy) -> Entry {
        let mut kinds = slot.hypervisors.clone();
        kinds.sort();
        kinds.dedup();
        Entry {
            vcpu_limit: policy.vcpu_limit(&slot),
            memory_limit_mib: policy.memory_limit_mib(&slot),
            slot,
            kinds,
        }
    }

    pub(super) fn load(&self) -> Load {
        Load {
            id: self.slot.id,
            vcpu_limit: self.vcpu_limit,
            memory_limit_mib: self.memory_limit_mib,
            used_vcpus: self.slot.used_vcpus,
            used_memory_mib: self.slot.used_memory_mib,
        }
    }
}

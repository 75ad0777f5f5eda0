//! Capacity accounting: which host each VM holds its share on, kept beside the
//! scheduler's index under one lock so that placing and counting are one step.

use super::Cloud;
use crate::store::HostRecord;
use herd_proto::wire::{HostId, VmId, VmSpec};
use herd_sched::{Demand, HostSlot, NoFit, SchedPolicy, Scheduler};
use std::collections::HashMap;

/// Capacity accounting, under one lock: the scheduler's host index (which counts what
/// each host holds) and where each VM holds its share.
pub(super) struct Placement {
    pub(super) sched: Scheduler,
    pub(super) vms: HashMap<VmId, (HostId, u32, u64)>,
}

impl Placement {
    pub(super) fn holds(&self, vm: VmId, host: HostId) -> bool {
        self.vms
            .get(&vm)
            .is_some_and(|(placed, _, _)| *placed == host)
    }

    pub(super) fn new(policy: SchedPolicy) -> Placement {
        Placement {
            sched: Scheduler::new(policy),
            vms: HashMap::new(),
        }
    }

    pub(super) fn add(&mut self, vm: VmId, host: HostId, vcpus: u32, memory_mib: u64) {
        if self.vms.insert(vm, (host, vcpus, memory_mib)).is_none() {
            self.sched.reserve(host, vcpus, memory_mib);
        }
    }

    /// Counts what is already placed, at start: each host enters the scheduler's index
    /// once with its totals, instead of being re-sorted in it once per VM (a million
    /// re-sorts were half of a restart at a million VMs).
    pub(super) fn restore(&mut self, hosts: Vec<HostSlot>, shares: Vec<(VmId, HostId, u32, u64)>) {
        let mut used: HashMap<HostId, (u64, u64)> = HashMap::with_capacity(hosts.len());
        self.vms.reserve(shares.len());
        for (vm, host, vcpus, memory_mib) in shares {
            if self.vms.insert(vm, (host, vcpus, memory_mib)).is_none() {
                let total = used.entry(host).or_default();
                total.0 = total.0.saturating_add(u64::from(vcpus));
                total.1 = total.1.saturating_add(memory_mib);
            }
        }
        for mut slot in hosts {
            if let Some((vcpus, memory_mib)) = used.get(&slot.id) {
                slot.used_vcpus = slot.used_vcpus.saturating_add(*vcpus);
                slot.used_memory_mib = slot.used_memory_mib.saturating_add(*memory_mib);
            }
            self.sched.upsert_host(slot);
        }
    }

    pub(super) fn release(&mut self, vm: VmId) {
        if let Some((host, vcpus, memory_mib)) = self.vms.remove(&vm) {
            self.sched.release(host, vcpus, memory_mib);
        }
    }

    /// The host a VM would go to: filter and weigh over the index, nothing counted.
    pub(super) fn choose(&self, spec: &VmSpec) -> Result<HostId, NoFit> {
        self.sched.place(&Demand {
            hypervisor: spec.hypervisor.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        })
    }
}

impl Cloud {
    /// Tries to place a VM; on success the capacity is already counted.
    pub(super) fn try_place(&self, vm: VmId, spec: &VmSpec) -> Result<HostId, String> {
        let mut placement = self.placement.lock();
        let host = placement.choose(spec).map_err(|e| e.to_string())?;
        placement.add(vm, host, spec.vcpus, spec.memory_mib);
        Ok(host)
    }

    /// Whether the VM is placed on this host, if the placement map is free to look at:
    /// `false` also when a launch holds it while writing its batch, and the ingest,
    /// which asks for every reported change, then asks the store instead of waiting.
    pub fn vm_on_host_now(&self, vm: VmId, host: HostId) -> bool {
        self.placement
            .try_lock()
            .is_some_and(|placement| placement.holds(vm, host))
    }

    /// Whether the VM is currently placed on this host (node restriction).
    pub fn vm_on_host(&self, vm: VmId, host: HostId) -> bool {
        self.placement.lock().holds(vm, host)
    }

    /// Holds capacity for `spec` on a migration's target: `to` if given, else the best
    /// host of the VM's type that is not in `exclude`. The answer is the host, or why
    /// none fits (counted per reason, as for a launch).
    pub(crate) fn reserve_target(
        &self,
        spec: &VmSpec,
        to: Option<HostId>,
        exclude: &[HostId],
    ) -> Result<HostId, NoFit> {
        let mut placement = self.placement.lock();
        let hosts: Vec<HostSlot> = placement
            .sched
            .hosts()
            .filter(|h| to.is_none_or(|to| h.id == to) && !exclude.contains(&h.id))
            .cloned()
            .collect();
        let demand = Demand {
            hypervisor: spec.hypervisor.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        };
        let chosen = herd_sched::place(&hosts, &demand, placement.sched.policy())?;
        let host = hosts[chosen].id;
        placement.sched.reserve(host, spec.vcpus, spec.memory_mib);
        Ok(host)
    }

    /// Gives back what [`Cloud::reserve_target`] held.
    pub(crate) fn release_target(&self, host: HostId, spec: &VmSpec) {
        self.placement
            .lock()
            .sched
            .release(host, spec.vcpus, spec.memory_mib);
    }

    /// A committed migration: the VM's share is counted on `to` (which held it as a
    /// reservation already, in the shape given) and no longer on its old host.
    pub(crate) fn move_share(&self, vm: VmId, to: HostId, vcpus: u32, memory_mib: u64) {
        let mut guard = self.placement.lock();
        let placement = &mut *guard;
        if let Some(share) = placement.vms.get_mut(&vm) {
            let (from, old_vcpus, old_memory_mib) = *share;
            *share = (to, vcpus, memory_mib);
            placement.sched.release(from, old_vcpus, old_memory_mib);
        }
    }

    /// A resize in place: the VM's share on its host becomes `vcpus` and `memory_mib`
    /// if `decide` (given the scheduler's view) says so, in one step under the lock,
    /// so that no launch takes the room between the decision and the count.
    pub(crate) fn reshape_share<T>(
        &self,
        vm: VmId,
        decide: impl FnOnce(&[HostSlot]) -> (T, Option<(u32, u64)>),
    ) -> T {
        let mut guard = self.placement.lock();
        let placement = &mut *guard;
        let hosts: Vec<HostSlot> = placement.sched.hosts().cloned().collect();
        let (answer, apply) = decide(&hosts);
        if let (Some((vcpus, memory_mib)), Some(share)) = (apply, placement.vms.get_mut(&vm)) {
            let (host, old_vcpus, old_memory_mib) = *share;
            *share = (host, vcpus, memory_mib);
            placement.sched.release(host, old_vcpus, old_memory_mib);
            placement.sched.reserve(host, vcpus, memory_mib);
        }
        answer
    }

    /// Drops what the server holds of the VM's old host (its last usage counters and
    /// guest report), once it runs elsewhere: the new host counts from its own start.
    pub(crate) fn forget_host_facts(&self, vm: VmId) {
        self.usage.lock().remove(&vm);
    }

    pub fn release(&self, vm: VmId) {
        self.placement.lock().release(vm);
        self.usage.lock().remove(&vm);
        self.guests.lock().remove(&vm);
    }
}

pub(super) fn slot_of(host: &HostRecord) -> HostSlot {
    HostSlot {
        id: host.id,
        up: host.up,
        hypervisors: host.hypervisors.iter().map(|h| h.kind.clone()).collect(),
        cpus: host.cpus,
        memory_mib: host.memory_mib,
        used_vcpus: 0,
        used_memory_mib: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restoring_at_start_counts_as_placing_one_by_one() {
        let host = |n: u128, cpus: u32| HostSlot {
            id: HostId::from_u128(n),
            up: true,
            hypervisors: vec!["sim".into()],
            cpus,
            memory_mib: 4096,
            used_vcpus: 0,
            used_memory_mib: 0,
        };
        let hosts = vec![host(1, 8), host(2, 4)];
        let share = |vm: u128, host: u128, vcpus: u32, memory_mib: u64| {
            (
                VmId::from_u128(vm),
                HostId::from_u128(host),
                vcpus,
                memory_mib,
            )
        };
        let shares = vec![
            share(10, 1, 2, 512),
            share(11, 1, 1, 256),
            share(12, 2, 4, 1024),
            // Listed twice: held once.
            share(10, 1, 2, 512),
        ];
        let mut restored = Placement::new(SchedPolicy::default());
        restored.restore(hosts.clone(), shares.clone());
        let mut placed = Placement::new(SchedPolicy::default());
        for slot in hosts {
            placed.sched.upsert_host(slot);
        }
        for (vm, host, vcpus, memory_mib) in shares {
            placed.add(vm, host, vcpus, memory_mib);
        }
        for id in [1, 2] {
            let id = HostId::from_u128(id);
            assert_eq!(restored.sched.host(id), placed.sched.host(id));
        }
        assert_eq!(restored.vms, placed.vms);
        assert_eq!(
            restored
                .sched
                .host(HostId::from_u128(1))
                .map(|slot| slot.used_vcpus),
            Some(3)
        );
        let demand = Demand {
            hypervisor: "sim".into(),
            vcpus: 2,
            memory_mib: 256,
        };
        assert_eq!(restored.sched.place(&demand), placed.sched.place(&demand));
    }
}

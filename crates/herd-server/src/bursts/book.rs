//! What the server holds in memory about bursts: the leases hosts last reported and
//! the asks waiting for their host. Apart from the rest of the module so that the cloud
//! can hold it without depending on what uses the cloud.

use herd_proto::burst::{BurstAnswer, BurstLease};
use herd_proto::wire::{HostId, VmId};
use parking_lot::Mutex;
use std::collections::HashMap;

/// The leases in force and the asks waiting for their host.
#[derive(Default)]
pub struct Bursts {
    /// Each VM's lease, with the host that reported it.
    leases: Mutex<HashMap<VmId, (HostId, BurstLease)>>,
    /// Asks waiting for their host, each about one VM.
    pub waiters: crate::waiters::Waiters<(HostId, VmId), BurstAnswer>,
}

impl Bursts {
    /// The VM's lease in force, as its host last said.
    pub fn lease(&self, vm: VmId) -> Option<BurstLease> {
        self.leases.lock().get(&vm).map(|(_, lease)| *lease)
    }

    /// A host's whole report of its leases, which replaces what it said before. Only
    /// leases of VMs placed on that host count: a host cannot speak for another's VM.
    /// Returns the leases kept, and how many it named that are not its own.
    pub fn reported(
        &self,
        host: HostId,
        leases: Vec<(VmId, BurstLease)>,
        placed_here: impl Fn(VmId) -> bool,
    ) -> (Vec<(VmId, BurstLease)>, usize) {
        let total = leases.len();
        let kept: Vec<_> = leases
            .into_iter()
            .filter(|(vm, _)| placed_here(*vm))
            .collect();
        let refused = total - kept.len();
        let mut book = self.leases.lock();
        book.retain(|_, (from, _)| *from != host);
        book.extend(kept.iter().map(|(vm, lease)| (*vm, (host, *lease))));
        (kept, refused)
    }

    /// A host is gone: what it said is no longer known to hold.
    pub fn host_gone(&self, host: HostId) {
        self.leases.lock().retain(|_, (from, _)| *from != host);
    }

    /// A lease the server saw granted, before the host's next report says it.
    pub(super) fn granted(&self, host: HostId, vm: VmId, lease: BurstLease) {
        self.leases.lock().insert(vm, (host, lease));
    }
}

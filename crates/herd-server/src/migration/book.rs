//! What the server holds in memory about migrations: the active ones (each also in the
//! store) and where each agent connects from. Apart from the coordinator so that the
//! cloud can hold it without depending on the coordinator, which depends on the cloud.

use super::plan::Migration;
use herd_proto::migration::MigrationId;
use herd_proto::wire::{HostId, VmId};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;

/// The migrations in progress, in memory (each also in the store), and where each
/// connected agent connects from.
#[derive(Default)]
pub struct Migrations {
    /// Held across each step of any migration (read the record, decide, save, send):
    /// answers from the two agents arrive on two connections at once, and a step that
    /// read the record before the other's step saved it would undo that step.
    pub(super) steps: Mutex<()>,
    pub(super) active: Mutex<HashMap<MigrationId, Migration>>,
    pub(super) peers: Mutex<HashMap<HostId, IpAddr>>,
}

impl Migrations {
    /// Remembers the address an agent's bus connection comes from: a target is reached
    /// there, at the port it names.
    pub fn peer_connected(&self, host: HostId, ip: IpAddr) {
        self.peers.lock().insert(host, ip);
    }

    /// The VM's migration in progress, if it has one.
    pub fn of_vm(&self, vm: VmId) -> Option<Migration> {
        self.active
            .lock()
            .values()
            .find(|m| m.vm == vm && !m.phase.is_over())
            .cloned()
    }

    pub fn is_migrating(&self, vm: VmId) -> bool {
        self.of_vm(vm).is_some()
    }
}

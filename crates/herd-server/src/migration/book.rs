//! What the server holds in memory about migrations: the active ones (each also in the
//! store). Apart from the coordinator so that the
//! cloud can hold it without depending on the coordinator, which depends on the cloud.

use super::plan::Migration;
use herd_proto::migration::MigrationId;
use herd_proto::wire::VmId;
use parking_lot::Mutex;
use std::collections::HashMap;

/// The migrations in progress, in memory (each also in the store).
#[derive(Default)]
pub struct Migrations {
    /// Held across each step of any migration (read the record, decide, save, send):
    /// answers from the two agents arrive on two connections at once, and a step that
    /// read the record before the other's step saved it would undo that step.
    pub(super) steps: Mutex<()>,
    pub(super) active: Mutex<HashMap<MigrationId, Migration>>,
}

impl Migrations {
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

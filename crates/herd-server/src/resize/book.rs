//! What the server holds in memory about resizes: the lock each step takes, and which
//! VMs wait for their host to apply a new shape (so that a command's answer costs a
//! store read only when it may finish a resize). Apart from the coordinator so that
//! the cloud can hold it without depending on the coordinator.

use herd_proto::wire::VmId;
use parking_lot::Mutex;
use std::collections::HashMap;

#[derive(Default)]
pub struct Resizes {
    /// Held across each step of any resize (read the record, decide, save, send).
    pub(super) steps: Mutex<()>,
    /// VMs whose host was sent a new shape, with the generation that carries it.
    pub(super) applying: Mutex<HashMap<VmId, u64>>,
}

impl Resizes {
    /// Whether the answer to this command may finish a resize.
    pub fn awaits(&self, vm: VmId, generation: u64) -> bool {
        self.applying.lock().get(&vm) == Some(&generation)
    }
}

//! What the server holds in memory about jobs past their deadline: every one (few: one
//! per job that missed it), each also in the store. Apart from the coordinator so that
//! the cloud can hold it without depending on the coordinator.

use super::plan::Job;
use herd_proto::wire::VmId;
use parking_lot::Mutex;
use std::collections::HashMap;

#[derive(Default)]
pub struct Jobs {
    /// Held across each step of any job (read, decide, save, act): exits arrive from
    /// many hosts at once.
    pub(super) steps: Mutex<()>,
    /// By original VM.
    pub(super) all: Mutex<HashMap<VmId, Job>>,
}

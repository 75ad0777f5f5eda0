//! What the server holds in memory about broadcasts: the active ones, each also in the
//! store. Apart from the coordinator so that the cloud can hold it without depending
//! on the coordinator, which depends on the cloud.

use super::plan::Broadcast;
use herd_proto::broadcast::BroadcastId;
use parking_lot::Mutex;
use std::collections::HashMap;

#[derive(Default)]
pub struct Broadcasts {
    /// Held across each step of any broadcast (read the record, decide, save, send):
    /// answers from many hosts arrive on many connections at once.
    pub(super) steps: Mutex<()>,
    pub(super) active: Mutex<HashMap<BroadcastId, Broadcast>>,
}

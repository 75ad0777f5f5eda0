//! Hooks into the agent's sync loop, so a harness can measure it from outside without
//! a second copy of the loop.
//!
//! `herd sim` runs thousands of real agents in one process and needs to know when the
//! server acknowledged the report that carried a state change (sync lag), and when an
//! agent lost and regained its server (resync time). The agent calls these hooks at
//! the exact points where those things happen; with no probe set they cost nothing.
//! They run on the agent's own task, so they must be cheap and must not block.

use herd_proto::wire::VmId;

pub trait SyncProbe: Send + Sync {
    /// The agent is connected to its server's bus (hello sent). `sync_interval_ms` is
    /// the report interval the server asked for.
    fn connected(&self, _sync_interval_ms: u64) {}

    /// The connection to the server ended (or the agent was stopped while connected).
    fn disconnected(&self) {}

    /// A state report was sent. `changed` are the VMs whose state differs from the
    /// previous report (for a full report as well); `bytes` is the encoded frame's size.
    fn reported(&self, _epoch: u64, _seq: u64, _full: bool, _changed: &[VmId], _bytes: usize) {}

    /// The server acknowledged every report of `epoch` up to `seq` (acks are
    /// cumulative).
    fn acked(&self, _epoch: u64, _seq: u64) {}
}

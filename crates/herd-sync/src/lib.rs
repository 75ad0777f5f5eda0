//! Delta state sync, as two sans-IO state machines: each interval an agent reports only
//! the VM states that changed, and the server's view of the host stays exact.
//!
//! [`Reporter`] runs in the agent: each sync interval it is fed the states the drivers
//! observe and returns the one report to send, carrying only the VMs whose state differs
//! from what it reported last. [`HostView`] runs in the server, one per host: it applies
//! reports strictly in `seq` order within an `epoch`, ignores stale and duplicate ones,
//! and asks for a full report on a gap or an epoch it does not know.
//!
//! Neither touches a socket, a clock or a disk, so the property that matters ("the
//! server's view equals the agent's truth under loss, duplication and reordering, after
//! at most one full sync") is tested here with proptest, message by message.
//!
//! Every report, heartbeats included, carries a `seq`. That is what makes a lost delta
//! visible: the next heartbeat arrives with a gap, and the server asks for a full report.
//! No timers are needed for convergence.

mod diff;
mod reporter;
mod transitions;
mod view;

pub use diff::{Change, Diff};
pub use reporter::{Reporter, ReporterState};
pub use transitions::{events_of, lifecycle_events};
pub use view::{Applied, HostView, ViewChange};

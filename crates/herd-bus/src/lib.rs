//! The bus carries commands from the server to each host's agent through a durable
//! listener queue per host, so a command outlives a dropped connection, a restarted
//! agent and a restarted server.
//!
//! Callers see only [`Bus`]. The embedded implementation keeps the queues in SQLite next
//! to the server's store and wakes the host's connection when something is queued; a
//! NATS JetStream implementation (one durable consumer per host) can replace it without
//! touching a caller.
//!
//! Delivery is at least once; the effect is exactly once because commands are
//! level-triggered and carry `(vm, generation)`: a queued command supersedes older ones
//! for the same VM, and the agent ignores a generation it has already applied.

pub mod contract;
mod embedded;

pub use embedded::EmbeddedBus;

use async_trait::async_trait;
use herd_proto::wire::{Command, CommandId, HostId};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The engine's storage failed; the source is the engine's own error.
    #[error("bus storage failed")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("queued command {0} is corrupt")]
    Corrupt(String),
    #[error("the bus's storage task stopped: {0}")]
    Stopped(String),
}

/// A queued command and its position in the host's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub seq: u64,
    pub command: Command,
}

#[async_trait]
pub trait Bus: Send + Sync {
    /// Queues commands, each for its host, durably and all together (one write for the
    /// batch: the reconciler sends thousands at a time). Queuing the same id twice keeps
    /// one copy; older generations for the same VM are dropped, since a newer one
    /// supersedes them.
    async fn publish(&self, commands: &[(HostId, Command)]) -> Result<(), BusError>;

    /// Unacknowledged commands with a position after `after`, oldest first.
    async fn pending(
        &self,
        host: HostId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Queued>, BusError>;

    /// The agent applied these commands (or newer ones): drop them from the host's
    /// queue, in one write.
    async fn ack(&self, host: HostId, ids: &[CommandId]) -> Result<(), BusError>;

    /// Number of unacknowledged commands for the host.
    async fn depth(&self, host: HostId) -> Result<u64, BusError>;

    /// Tells the caller whenever commands are queued for the host from now on.
    fn subscribe(&self, host: HostId) -> Subscription;
}

/// News that commands were queued for one host. Wakes are coalesced (many publishes
/// before a look are one wake) and none is missed: a publish after [`Bus::subscribe`]
/// wakes the next [`Subscription::queued`], however late that call comes. So a
/// connection subscribes, reads the queue, and reads it again after each wake.
pub struct Subscription {
    queued: tokio::sync::watch::Receiver<u64>,
}

impl Subscription {
    /// Made by an engine from a counter it bumps on every publish for the host.
    pub fn new(queued: tokio::sync::watch::Receiver<u64>) -> Subscription {
        Subscription { queued }
    }

    /// Resolves once commands were queued since the last call (or since subscribing).
    /// Cancel-safe. If the bus is gone, it never resolves.
    pub async fn queued(&mut self) {
        if self.queued.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

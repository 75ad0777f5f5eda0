//! What the server and the two agents of a live migration say to each other.
//!
//! The server coordinates; the agents move the bytes between themselves. Every order is
//! level-triggered, like a command: the server repeats the order of a migration's
//! current phase until the agent answers it (after a reconnection, a restart of either
//! side, or a lost message), and an agent answers a repeated order from what it has,
//! without doing the work twice. So no message needs to be delivered exactly once.
//!
//! The transfer itself runs on a connection from the source agent to the target agent,
//! authenticated on both ends by the agents' certificates from the cloud's CA; its first
//! frame ([`TransferHello`]) names the migration, which the target must have been told
//! to expect from exactly that source host.

use crate::spec::{HostId, VmId, VmSpec};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub type MigrationId = Uuid;

/// The server's orders for one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationOrder {
    /// To the target: expect the VM from `source`. Answered with
    /// [`MigrationUpdate::Expecting`].
    Expect {
        migration: MigrationId,
        /// Which attempt of the migration (each tries another target); answers carry it
        /// back, so one from an earlier attempt is not taken for this one's.
        attempt: u32,
        vm: VmId,
        spec: Box<VmSpec>,
        source: HostId,
    },
    /// To the source: send the VM to `target`, reachable at `addr`. Answered with
    /// progress, then [`MigrationUpdate::Sent`] or [`MigrationUpdate::Failed`].
    Send {
        migration: MigrationId,
        attempt: u32,
        vm: VmId,
        target: HostId,
        addr: String,
        max_downtime_ms: u64,
    },
    /// To the target: the migration is over without it; remove whatever it holds of
    /// the VM. Answered with [`MigrationUpdate::Aborted`].
    Abort { migration: MigrationId, vm: VmId },
    /// To the source, after a transfer that completed but was not committed: run the
    /// VM again. Answered with [`MigrationUpdate::Resumed`].
    Resume { migration: MigrationId, vm: VmId },
    /// To the source, after the commit: the target owns the VM now; remove the old
    /// copy. Answered with [`MigrationUpdate::Released`].
    Release { migration: MigrationId, vm: VmId },
}

impl MigrationOrder {
    pub fn migration(&self) -> MigrationId {
        match self {
            MigrationOrder::Expect { migration, .. }
            | MigrationOrder::Send { migration, .. }
            | MigrationOrder::Abort { migration, .. }
            | MigrationOrder::Resume { migration, .. }
            | MigrationOrder::Release { migration, .. } => *migration,
        }
    }

    /// The attempt an order is about; cleaning and resuming concern the migration as
    /// a whole (0).
    pub fn attempt(&self) -> u32 {
        match self {
            MigrationOrder::Expect { attempt, .. } | MigrationOrder::Send { attempt, .. } => {
                *attempt
            }
            _ => 0,
        }
    }

    pub fn vm(&self) -> VmId {
        match self {
            MigrationOrder::Expect { vm, .. }
            | MigrationOrder::Send { vm, .. }
            | MigrationOrder::Abort { vm, .. }
            | MigrationOrder::Resume { vm, .. }
            | MigrationOrder::Release { vm, .. } => *vm,
        }
    }
}

/// How far a transfer has come, as the source's hypervisor counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TransferProgress {
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    /// The pre-copy pass (1 = the first copy of all memory).
    pub pass: u64,
    /// The downtime the hypervisor expects for the switch-over, if it says.
    pub expected_downtime_ms: Option<u64>,
}

/// An agent's answers about one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationUpdate {
    /// The target waits for the source on this port of the address the server sees it
    /// connect from.
    Expecting {
        port: u16,
    },
    Progress(TransferProgress),
    /// The source's hypervisor sent everything and stopped the VM there: the target
    /// has it now, or will once it has loaded it.
    Sent {
        downtime_ms: Option<u64>,
        total_ms: u64,
        transferred_bytes: u64,
    },
    /// The target runs the VM.
    Arrived,
    /// This side could not do its part; the VM still runs where it ran.
    Failed {
        reason: String,
    },
    /// The target holds nothing of the VM any more.
    Aborted,
    /// The source runs the VM again.
    Resumed,
    /// The source holds nothing of the VM any more.
    Released,
}

/// The first frame on a transfer connection, source to target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferHello {
    pub migration: MigrationId,
    pub attempt: u32,
    pub vm: VmId,
    /// What the source's driver keeps about the VM that the target's driver needs to
    /// go on with it (its guest's credential, its birth): opaque to everyone else.
    pub handoff: Vec<u8>,
}

/// The target's answer to [`TransferHello`]: ready for the stream, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferReply {
    Ready,
    Refused { reason: String },
}

/// Largest [`TransferHello`] or [`TransferReply`] either agent reads.
pub const MAX_TRANSFER_FRAME: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode, encode};

    #[test]
    fn orders_and_updates_round_trip() {
        let order = MigrationOrder::Send {
            migration: Uuid::from_u128(1),
            attempt: 2,
            vm: Uuid::from_u128(2),
            target: Uuid::from_u128(3),
            addr: "198.51.100.3:40000".into(),
            max_downtime_ms: 300,
        };
        assert_eq!(order.migration(), Uuid::from_u128(1));
        assert_eq!(order.attempt(), 2);
        assert_eq!(order.vm(), Uuid::from_u128(2));
        assert_eq!(decode::<MigrationOrder>(&encode(&order)).ok(), Some(order));
        let update = MigrationUpdate::Progress(TransferProgress {
            transferred_bytes: 1 << 20,
            remaining_bytes: 5,
            total_bytes: 1 << 28,
            pass: 2,
            expected_downtime_ms: Some(12),
        });
        assert_eq!(
            decode::<MigrationUpdate>(&encode(&update)).ok(),
            Some(update)
        );
    }
}

//! Status messages: what each host tells every other host about its load, every status
//! interval, through the bus.
//!
//! A host decides things from what the others said (where a burst that does not fit
//! could go), so each keeps the latest status of every other with its age. To stay
//! small at thousands of hosts a status is a handful of integers, and most intervals a
//! host sends only a heartbeat (its sequence number): the figures go again when one
//! moved past its threshold, and whole every [`FULL_EVERY`] intervals so that a host
//! that missed one catches up. A host that says nothing for two intervals is stale.
//!
//! Who a status is from is the bus's word (the connection it came in on), never the
//! message's: a status carries no name.

use serde::{Deserialize, Serialize};

/// Every this many intervals a host sends its figures whatever moved.
pub const FULL_EVERY: u64 = 10;
/// A status older than this many intervals is stale.
pub const STALE_AFTER_INTERVALS: u64 = 2;

/// One host's load and room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostStatus {
    /// Busy time of all its CPUs, in thousandths.
    pub cpu_permille: u16,
    pub mem_free_mib: u64,
    pub disk_free_mib: u64,
    /// Received and sent over all its interfaces.
    pub net_bytes_per_s: u64,
    /// vCPUs and MiB no VM's shape or burst holds: what it could grant or place.
    pub room_cpus: i64,
    pub room_mib: i64,
    /// Bursts it has granted that are in force.
    pub bursts: u32,
}

/// One status as a host sends it: its sequence number, and the figures when they moved
/// (a heartbeat otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    pub seq: u64,
    pub status: Option<HostStatus>,
}

/// A host's status as the bus relays it to the others: who it is from, by the bus's
/// word, with its name in a whole status only (a heartbeat is the id and the number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerUpdate {
    pub host: uuid::Uuid,
    pub hostname: Option<String>,
    pub update: StatusUpdate,
}

/// What one host knows of another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeerView {
    pub host: uuid::Uuid,
    pub hostname: String,
    /// Since its last word (a status or a heartbeat).
    pub age_ms: u64,
    pub stale: bool,
    pub seq: u64,
    /// Its latest figures, if it ever sent them.
    pub status: Option<HostStatus>,
}

impl HostStatus {
    /// Whether `self` differs from `sent` past the thresholds a peer cares about.
    pub fn moved_from(&self, sent: &HostStatus) -> bool {
        self.cpu_permille.abs_diff(sent.cpu_permille) >= 50
            || self.mem_free_mib.abs_diff(sent.mem_free_mib) >= 64
            || self.disk_free_mib.abs_diff(sent.disk_free_mib) >= 256
            || self.net_bytes_per_s.abs_diff(sent.net_bytes_per_s) >= 1 << 20
            || self.room_cpus != sent.room_cpus
            || self.room_mib != sent.room_mib
            || self.bursts != sent.bursts
    }
}

/// What a host sends next: the figures when they moved or it is time for a full one,
/// else a heartbeat. Pure; the caller keeps `last_sent` and `seq`.
pub fn next_update(now: &HostStatus, last_sent: Option<&HostStatus>, seq: u64) -> StatusUpdate {
    let full = seq.is_multiple_of(FULL_EVERY);
    let send = match last_sent {
        None => true,
        Some(sent) => full || now.moved_from(sent),
    };
    StatusUpdate {
        seq,
        status: send.then_some(*now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_go_when_they_move_or_every_tenth_interval_else_a_heartbeat() {
        let a = HostStatus {
            cpu_permille: 100,
            mem_free_mib: 1000,
            room_cpus: 2,
            ..HostStatus::default()
        };
        assert_eq!(
            next_update(&a, None, 1).status,
            Some(a),
            "the first is whole"
        );
        assert_eq!(next_update(&a, Some(&a), 2).status, None, "a heartbeat");
        let noise = HostStatus {
            cpu_permille: 130,
            mem_free_mib: 1010,
            ..a
        };
        assert_eq!(
            next_update(&noise, Some(&a), 3).status,
            None,
            "noise stays home"
        );
        let busy = HostStatus {
            cpu_permille: 600,
            ..a
        };
        assert_eq!(next_update(&busy, Some(&a), 4).status, Some(busy));
        let granted = HostStatus { room_cpus: 1, ..a };
        assert!(
            next_update(&granted, Some(&a), 5).status.is_some(),
            "room is exact"
        );
        assert_eq!(next_update(&a, Some(&a), 10).status, Some(a), "a full one");
    }
}

//! Bursts: a temporary grant of CPU and memory above a VM's shape.
//!
//! A burst is decided and kept by the VM's host alone: the host grants it from its own
//! free room, applies it at once and takes it back when its lease ends, with or without
//! a server to ask. So what a burst may be (the project's limits, in the VM's spec),
//! what is asked (by the guest over its channel, or by a user through the server) and
//! what was granted are all in this one place that the guest, the agent and the server
//! share.

use serde::{Deserialize, Serialize};

/// The longest lease any project may allow.
pub const MAX_BURST_SECONDS: u32 = 7 * 24 * 3600;

/// The most a VM may burst by, set per project by an admin and carried in each VM's
/// spec so that its host decides without a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BurstLimits {
    /// Extra vCPUs' worth of CPU time.
    pub max_cpus: u32,
    pub max_memory_mib: u64,
    /// The longest lease, and the longest a renewal extends one to from now.
    pub max_seconds: u32,
}

impl BurstLimits {
    /// No bursts at all.
    pub const NONE: BurstLimits = BurstLimits {
        max_cpus: 0,
        max_memory_mib: 0,
        max_seconds: 0,
    };
}

impl Default for BurstLimits {
    /// What a project allows until an admin says otherwise: two vCPUs and 2 GiB more,
    /// for up to an hour.
    fn default() -> BurstLimits {
        BurstLimits {
            max_cpus: 2,
            max_memory_mib: 2048,
            max_seconds: 3600,
        }
    }
}

/// What a burst asks for: this much more than the VM's shape, for this long from now.
/// Asking again while a lease holds replaces it (a renewal, or a change of size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurstAsk {
    pub cpus: u32,
    pub memory_mib: u64,
    pub seconds: u32,
}

/// A burst the host granted, in force from `granted_ms` to `expires_ms` (unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurstLease {
    pub cpus: u32,
    pub memory_mib: u64,
    pub granted_ms: u64,
    pub expires_ms: u64,
}

impl BurstLease {
    /// Whole seconds left at `now_ms`.
    pub fn seconds_left(&self, now_ms: u64) -> u64 {
        self.expires_ms.saturating_sub(now_ms) / 1000
    }
}

/// A host's leases, whole: those in force, and those that ended within the last week
/// with when (unix ms), so that one granted and ended while the server was away is
/// still billed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurstReport {
    /// By VM id (`spec::VmId`, which is a `Uuid`: the spec carries burst limits, so this
    /// module names the id by its type rather than import the spec).
    pub in_force: Vec<(uuid::Uuid, BurstLease)>,
    pub ended: Vec<(uuid::Uuid, BurstLease, u64)>,
}

/// A host's answer to an ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BurstAnswer {
    Granted(BurstLease),
    /// Refused, saying why with the figures that decided it.
    Denied {
        reason: String,
    },
}

/// An ask that no host could grant: said before any room is looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAsk {
    #[error("a burst asks for more CPU or memory (or both): this one asks for neither")]
    Empty,
    #[error("a burst lasts at least one second")]
    NoDuration,
    #[error("{what} {asked} is past what this VM's project allows ({allowed})")]
    PastLimit {
        what: &'static str,
        asked: String,
        allowed: String,
    },
}

impl BurstAsk {
    /// Whether the ask is one the limits allow at all.
    pub fn check(&self, limits: &BurstLimits) -> Result<(), BadAsk> {
        if self.cpus == 0 && self.memory_mib == 0 {
            return Err(BadAsk::Empty);
        }
        if self.seconds == 0 {
            return Err(BadAsk::NoDuration);
        }
        if self.cpus > limits.max_cpus {
            return Err(BadAsk::PastLimit {
                what: "a burst of CPUs",
                asked: format!("+{}", self.cpus),
                allowed: format!("+{}", limits.max_cpus),
            });
        }
        if self.memory_mib > limits.max_memory_mib {
            return Err(BadAsk::PastLimit {
                what: "a burst of memory",
                asked: format!("+{} MiB", self.memory_mib),
                allowed: format!("+{} MiB", limits.max_memory_mib),
            });
        }
        let longest = limits.max_seconds.min(MAX_BURST_SECONDS);
        if self.seconds > longest {
            return Err(BadAsk::PastLimit {
                what: "a burst's duration",
                asked: format!("{} s", self.seconds),
                allowed: format!("{longest} s"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(cpus: u32, memory_mib: u64, seconds: u32) -> BurstAsk {
        BurstAsk {
            cpus,
            memory_mib,
            seconds,
        }
    }

    #[test]
    fn an_ask_is_held_to_its_projects_limits() {
        let limits = BurstLimits::default();
        assert_eq!(ask(1, 0, 60).check(&limits), Ok(()));
        assert_eq!(ask(2, 2048, 3600).check(&limits), Ok(()));
        assert_eq!(ask(0, 0, 60).check(&limits), Err(BadAsk::Empty));
        assert_eq!(ask(1, 0, 0).check(&limits), Err(BadAsk::NoDuration));
        let past = ask(3, 0, 60)
            .check(&limits)
            .expect_err("past the limit")
            .to_string();
        assert_eq!(
            past,
            "a burst of CPUs +3 is past what this VM's project allows (+2)"
        );
        assert!(ask(0, 4096, 60).check(&limits).is_err());
        assert!(ask(1, 0, 3601).check(&limits).is_err());
        assert!(ask(1, 0, 1).check(&BurstLimits::NONE).is_err());
    }

    #[test]
    fn a_lease_counts_down_in_whole_seconds() {
        let lease = BurstLease {
            cpus: 1,
            memory_mib: 0,
            granted_ms: 1_000,
            expires_ms: 11_000,
        };
        assert_eq!(lease.seconds_left(1_000), 10);
        assert_eq!(lease.seconds_left(10_999), 0);
        assert_eq!(lease.seconds_left(20_000), 0);
    }
}

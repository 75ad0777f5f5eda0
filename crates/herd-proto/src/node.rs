//! What a node says about itself, apart from its VMs: the utility module's sample of the
//! whole host, and the health of each hypervisor driver as the agent sees it.
//!
//! The two travel together (`AgentMsg::Node`) but come from different places on
//! purpose. The utility module (`herd-util`) is its own process and reads only /proc,
//! the data dir's filesystem and cgroups, so its figures keep coming when a driver
//! hangs; the agent adds whether each driver answered, so a hung driver shows as
//! `driver qemu: unresponsive` instead of as a host that went dark.

use serde::{Deserialize, Serialize};

/// One sample of the host by the utility module. Rates are over the interval before
/// `sampled_at_ms`; the first sample after a start has none (zeros).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeStats {
    pub sampled_at_ms: u64,
    /// The module's sampling interval: a figure older than two of them is stale.
    pub interval_ms: u32,
    /// Busy time of all CPUs, in thousandths (from /proc/stat).
    pub cpu_permille: u16,
    /// The 1-minute load average, in hundredths.
    pub load1_centi: u32,
    pub mem_total_mib: u64,
    /// Total minus available.
    pub mem_used_mib: u64,
    /// The filesystem holding the agent's data dir.
    pub disk: DiskStats,
    /// Every interface but loopback.
    pub net: Vec<NetStats>,
    /// What each driver's guests cost the host, measured from outside them.
    pub drivers: Vec<DriverUse>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskStats {
    pub total_mib: u64,
    pub free_mib: u64,
    /// The block device under the data dir, where it has one (not on tmpfs or overlay).
    pub device: Option<String>,
    pub read_bytes_per_s: u64,
    pub write_bytes_per_s: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetStats {
    pub iface: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_bytes_per_s: u64,
    pub tx_bytes_per_s: u64,
}

/// The host resources a driver's guests use, all of them together: QEMU processes
/// (CPU and resident memory, emulation included), or the containers' parent cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DriverUse {
    pub kind: String,
    /// Of the whole host's CPU time, in thousandths (the same scale as `cpu_permille`).
    pub cpu_permille: u16,
    pub mem_mib: u64,
    /// QEMU processes or containers found.
    pub n: u32,
}

/// Whether a driver answers the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum DriverHealth {
    Ok,
    /// It did not answer in time: a listing or a check of its guests is stuck.
    Unresponsive {
        since_ms: u64,
        reason: String,
    },
    /// It answers with an error.
    Failing {
        since_ms: u64,
        error: String,
    },
}

impl DriverHealth {
    pub fn is_ok(&self) -> bool {
        matches!(self, DriverHealth::Ok)
    }

    /// `ok`, `unresponsive` or `failing`.
    pub fn name(&self) -> &'static str {
        match self {
            DriverHealth::Ok => "ok",
            DriverHealth::Unresponsive { .. } => "unresponsive",
            DriverHealth::Failing { .. } => "failing",
        }
    }

    /// One line for operators: `unresponsive (QMP of VM ... does not answer)`.
    pub fn describe(&self) -> String {
        match self {
            DriverHealth::Ok => "ok".into(),
            DriverHealth::Unresponsive { reason, .. } => format!("unresponsive ({reason})"),
            DriverHealth::Failing { error, .. } => format!("failing ({error})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DriverStatus {
    pub kind: String,
    pub health: DriverHealth,
}

/// The node's message: the latest utility sample (if the module runs), why it does not
/// (if it does not), and every driver's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub stats: Option<NodeStats>,
    pub util_error: Option<String>,
    pub drivers: Vec<DriverStatus>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::wire;

    #[test]
    fn a_node_report_survives_the_wire() {
        let report = NodeReport {
            stats: Some(NodeStats {
                sampled_at_ms: 1,
                interval_ms: 1000,
                cpu_permille: 420,
                load1_centi: 150,
                mem_total_mib: 24_000,
                mem_used_mib: 3_000,
                disk: DiskStats {
                    total_mib: 100,
                    free_mib: 40,
                    device: Some("vda1".into()),
                    read_bytes_per_s: 5,
                    write_bytes_per_s: 6,
                },
                net: vec![NetStats {
                    iface: "eth0".into(),
                    rx_bytes: 10,
                    tx_bytes: 20,
                    rx_bytes_per_s: 1,
                    tx_bytes_per_s: 2,
                }],
                drivers: vec![DriverUse {
                    kind: "qemu".into(),
                    cpu_permille: 100,
                    mem_mib: 150,
                    n: 1,
                }],
            }),
            util_error: None,
            drivers: vec![DriverStatus {
                kind: "qemu".into(),
                health: DriverHealth::Unresponsive {
                    since_ms: 5,
                    reason: "list did not answer".into(),
                },
            }],
        };
        let msg = wire::AgentMsg::Node(report.clone());
        let back: wire::AgentMsg = wire::decode(&wire::encode(&msg)).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn health_reads_as_one_line() {
        let stuck = DriverHealth::Unresponsive {
            since_ms: 0,
            reason: "QMP of VM x does not answer".into(),
        };
        assert_eq!(
            stuck.describe(),
            "unresponsive (QMP of VM x does not answer)"
        );
        assert_eq!(stuck.name(), "unresponsive");
        assert!(DriverHealth::Ok.is_ok());
    }
}

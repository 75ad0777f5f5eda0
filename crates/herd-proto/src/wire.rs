//! The agent <-> server protocol: messages on the agent's one connection.
//!
//! Messages are encoded with postcard (compact, varint integers, 16-byte UUIDs) and sent
//! as binary WebSocket frames. Compactness matters because delta sync
//! exists to save bytes: with JSON, per-message overhead would dominate a one-VM delta.
//! Decoding is strict: a trailing byte or an oversized frame is an error, never a guess.

use crate::lifecycle::{Event, VmState};
use serde::{Deserialize, Serialize};

pub use crate::spec::{HostId, VmId, VmSpec};

/// Largest frame either side accepts. A full sync of 10,000 VMs is ~200 KB.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// Protocol version; a mismatch is refused at hello.
pub const PROTOCOL_VERSION: u32 = 1;

/// What the agent knows of one VM's operating state.
///
/// A VM is named by a small slot number that is local to one host and one mapping: a
/// full report gives every VM its slot together with its id, and a delta names a VM
/// it has already mapped by slot alone (1 byte instead of 16). A delta introduces a new
/// VM with its id. Any lost message is a sequence gap and brings a full report, which
/// starts a new mapping, so the two sides never disagree about a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub slot: u32,
    /// The VM's id, when this message maps the slot.
    pub vm: Option<VmId>,
    pub state: VmState,
}

/// A lifecycle event the agent derived from an observed change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    pub vm: VmId,
    pub from: VmState,
    pub to: VmState,
    /// The flow's event for this step; `None` when the change did not fit the flow.
    pub event: Option<Event>,
    /// True for states the agent did not see but filled in from the flow.
    pub inferred: bool,
    pub message: Option<String>,
}

/// Host utilization carried by every report, so a heartbeat is useful on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostUtil {
    /// Host CPU busy, in thousandths.
    pub cpu_permille: u16,
    pub mem_used_mib: u64,
    pub n_vms: u32,
}

/// Capacity the agent found on its host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpus: u32,
    pub memory_mib: u64,
}

/// A hypervisor type usable on the host, and how it was configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HypervisorInfo {
    /// Driver name: `qemu`, `oci`, `sim`.
    pub kind: String,
    /// One line for operators, e.g. which accelerator and why.
    pub detail: String,
}

/// How a probe detail says that its driver cannot suspend on this host, and why: the
/// agent writes it with [`HypervisorInfo::suspend_unsupported_note`], the server reads it
/// with [`HypervisorInfo::suspend_unsupported`] to refuse a suspend before queueing it.
const SUSPEND_UNSUPPORTED: &str = "suspend: unsupported";

impl HypervisorInfo {
    /// `suspend: unsupported (<reason>)`, for a probe detail.
    pub fn suspend_unsupported_note(reason: &str) -> String {
        format!("{SUSPEND_UNSUPPORTED} ({reason})")
    }

    /// The `suspend: unsupported (...)` part of the detail, where it has one.
    pub fn suspend_unsupported(&self) -> Option<&str> {
        let start = self.detail.find(SUSPEND_UNSUPPORTED)?;
        let rest = &self.detail[start..];
        // Up to the parenthesis that closes the reason (reasons may hold commas).
        let mut depth = 0usize;
        for (at, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 1 => return Some(&rest[..=at]),
                ')' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        Some(rest)
    }
}

/// The body of a state report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportBody {
    /// Only the VMs whose state changed since the last report, and the slots of the
    /// VMs that are gone. Empty lists make it a heartbeat.
    Delta {
        changed: Vec<VmStatus>,
        removed: Vec<u32>,
    },
    /// Every VM on the host; replaces the server's view of the host.
    Full { vms: Vec<VmStatus> },
}

/// One state report. `seq` counts reports within `epoch`; an agent picks a new epoch
/// each time it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub epoch: u64,
    pub seq: u64,
    pub util: HostUtil,
    pub body: ReportBody,
    pub events: Vec<VmEvent>,
}

impl Report {
    pub fn is_full(&self) -> bool {
        matches!(self.body, ReportBody::Full { .. })
    }
}

/// Resource counters of one VM since it started. Sent on their own slower cadence so
/// that a running VM's ever-moving counters do not make every state report a change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmUsage {
    pub vm: VmId,
    pub cpu_ms: u64,
    pub mem_kib: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
}

/// Identifies a command; the agent applies each id at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CommandId {
    pub vm: VmId,
    /// The VM's desired-state generation this command carries out.
    pub generation: u64,
}

impl std::fmt::Display for CommandId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.vm, self.generation)
    }
}

/// Converge one VM to `target`, creating it from `spec` if the host lacks it.
///
/// Commands are level-triggered ("be in this state"), not edge-triggered ("pause"),
/// so a replayed command is harmless and a lost one is re-sent by the reconciler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub id: CommandId,
    pub spec: VmSpec,
    pub target: VmState,
}

/// Agent to server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// Presence: first message on every connection.
    Hello {
        protocol: u32,
        agent_version: String,
        hostname: String,
        capacity: Capacity,
        hypervisors: Vec<HypervisorInfo>,
        /// The port this agent takes transfers from other agents on, if it takes any
        /// (at the address the server sees it connect from).
        transfer_port: Option<u16>,
    },
    Report(Report),
    /// Counters sampled at one instant (unix ms). The instant makes a retransmitted
    /// batch recognisable: metering counts each (VM, instant) once.
    Usage {
        sampled_at_ms: u64,
        vms: Vec<VmUsage>,
    },
    CommandDone {
        id: CommandId,
        error: Option<String>,
    },
    /// The answer to a [`ServerMsg::ConsoleRequest`].
    Console {
        request: u64,
        result: Result<Vec<u8>, String>,
    },
    /// The agent's backstop enforced a policy on a VM whose guest did not (its module
    /// is gone, or it lies about its usage), from host-side measurements.
    PolicyEnforced {
        vm: VmId,
        rule: String,
        action: crate::policy::PolicyAction,
        reason: String,
    },
    /// What a VM's guest module said. The agent names the VM from the channel the
    /// message came in on, never from the message, and strips the guest's credential.
    Guest {
        vm: VmId,
        report: GuestReport,
    },
    /// The node itself: the utility module's latest sample and the drivers' health, on
    /// the module's cadence and whenever a driver's health changes.
    Node(crate::node::NodeReport),
    /// This host's part in a live migration (see [`crate::migration`]).
    Migration {
        migration: crate::migration::MigrationId,
        /// The attempt of the order answered (see `MigrationOrder::attempt`).
        attempt: u32,
        vm: VmId,
        update: crate::migration::MigrationUpdate,
    },
    /// The answer to a [`ServerMsg::Burst`].
    BurstAnswer {
        request: u64,
        vm: VmId,
        answer: crate::burst::BurstAnswer,
    },
    /// This host's bursts, whole: on each change and on each connection.
    Bursts(crate::burst::BurstReport),
    /// This host's status for the others, every status interval.
    Status(crate::status::StatusUpdate),
    /// The answer to a [`ServerMsg::PeersRequest`]: what this host knows of the others.
    Peers {
        request: u64,
        peers: Vec<crate::status::PeerView>,
    },
    /// Round trips to the neighbours of the last [`ServerMsg::Neighbours`], each time
    /// they are measured.
    RoundTrips(Vec<crate::proximity::RoundTrip>),
    /// An answer about one broadcast (see [`crate::broadcast`]).
    Broadcast {
        broadcast: crate::broadcast::BroadcastId,
        update: crate::broadcast::BroadcastUpdate,
    },
}

/// A guest module's report, as relayed to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestReport {
    Hello {
        guest_version: String,
    },
    Status {
        uptime_ms: u64,
        workload_running: bool,
        guest_rss_kib: u64,
    },
    WorkloadExit {
        code: i32,
    },
    Error {
        message: String,
    },
    PolicyWarning {
        rule: String,
        message: String,
    },
    /// The guest is carrying out a policy action itself.
    PolicyAction {
        rule: String,
        action: crate::policy::PolicyAction,
        reason: String,
    },
    /// (rule, text, fraction of the limit in thousandths, seconds left).
    PolicyProgress {
        items: Vec<(String, String, u32, Option<u64>)>,
    },
}

/// Server to agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    Welcome {
        sync_interval_ms: u64,
        usage_interval_ms: u64,
    },
    Ack {
        epoch: u64,
        seq: u64,
    },
    NeedFull {
        reason: String,
    },
    Command(Box<Command>),
    /// Send the last `max_bytes` of a VM's serial console.
    ConsoleRequest {
        request: u64,
        vm: VmId,
        max_bytes: u32,
    },
    /// The server refuses the connection; the agent should not retry blindly.
    Refused {
        reason: String,
    },
    /// An order for this host's part in a live migration (see [`crate::migration`]).
    Migration(Box<crate::migration::MigrationOrder>),
    /// Other hosts' statuses, as the bus heard them since the last batch.
    Peers(Vec<crate::status::PeerUpdate>),
    /// Say what this host knows of the others, answered by [`AgentMsg::Peers`].
    PeersRequest {
        request: u64,
    },
    /// A user asks for a burst of one of this host's VMs; answered by
    /// [`AgentMsg::BurstAnswer`] with the same `request`.
    Burst {
        request: u64,
        vm: VmId,
        ask: crate::burst::BurstAsk,
    },
    /// The hosts this one should measure its round trips to, whole: each replaces the
    /// last. Answered, now and then, by [`AgentMsg::RoundTrips`].
    Neighbours(Vec<crate::proximity::Neighbour>),
    /// An order for this host's part in a broadcast (see [`crate::broadcast`]).
    Broadcast(Box<crate::broadcast::BroadcastOrder>),
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("malformed message")]
    Malformed(#[source] postcard::Error),
}

/// Encodes a message for the wire.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain types into a Vec cannot fail: no maps with non-string
    // keys, no unsupported types. Fall back to an empty frame rather than panic; the
    // receiver rejects it as malformed.
    postcard::to_stdvec(msg).unwrap_or_default()
}

/// Decodes one whole frame: the message must use every byte.
pub fn decode<'a, T: Deserialize<'a>>(frame: &'a [u8]) -> Result<T, DecodeError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge(frame.len()));
    }
    let (msg, rest) = postcard::take_from_bytes(frame).map_err(DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    #[test]
    fn a_suspend_refusal_reads_back_from_the_detail() {
        let note = HypervisorInfo::suspend_unsupported_note("criu check: vdso: bad (x), y");
        let info = HypervisorInfo {
            kind: "oci".into(),
            detail: format!("runc 1.1.5, cgroup v1, {note}, images: default"),
        };
        assert_eq!(
            info.suspend_unsupported(),
            Some("suspend: unsupported (criu check: vdso: bad (x), y)")
        );
        let qemu = HypervisorInfo {
            kind: "qemu".into(),
            detail: "qemu 7.2, microvm".into(),
        };
        assert_eq!(qemu.suspend_unsupported(), None);
    }

    fn status(n: u128, state: VmState) -> VmStatus {
        VmStatus {
            slot: n as u32,
            vm: Some(Uuid::from_u128(n)),
            state,
        }
    }

    #[test]
    fn round_trip() {
        let msg = AgentMsg::Report(Report {
            epoch: 7,
            seq: 42,
            util: HostUtil {
                cpu_permille: 250,
                mem_used_mib: 1024,
                n_vms: 2,
            },
            body: ReportBody::Delta {
                changed: vec![status(1, VmState::Running)],
                removed: vec![2],
            },
            events: vec![],
        });
        let bytes = encode(&msg);
        assert_eq!(decode::<AgentMsg>(&bytes).ok(), Some(msg));
    }

    #[test]
    fn heartbeat_is_small() {
        let msg = AgentMsg::Report(Report {
            epoch: u64::MAX,
            seq: 1_000_000,
            util: HostUtil {
                cpu_permille: 999,
                mem_used_mib: 200_000,
                n_vms: 100,
            },
            body: ReportBody::Delta {
                changed: vec![],
                removed: vec![],
            },
            events: vec![],
        });
        assert!(encode(&msg).len() <= 24, "{}", encode(&msg).len());
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&ServerMsg::Ack { epoch: 1, seq: 2 });
        bytes.push(0);
        assert!(matches!(
            decode::<ServerMsg>(&bytes),
            Err(DecodeError::Trailing(1))
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<AgentMsg>(&bytes);
            let _ = decode::<ServerMsg>(&bytes);
        }
    }
}

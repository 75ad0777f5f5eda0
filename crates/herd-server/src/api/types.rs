//! Request and response bodies of the REST API; `/openapi.json` is derived from these.

use super::rfc3339;
use crate::cloud::{GuestInfo, HostStatus};
use crate::store::{EventRecord, VmRecord};
use herd_proto::policy::PolicySpec;
use herd_proto::wire::VmUsage;
use herd_proto::VmState;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    /// 1 to 63 characters of a-z, 0-9 and '-'; unique within the project.
    pub name: String,
    /// Defaults to `default`.
    pub project: Option<String>,
    /// A hypervisor type some host offers (`qemu`, `sim`); defaults to the server's
    /// default.
    pub hypervisor: Option<String>,
    /// 1 to 256; defaults to 1.
    pub vcpus: Option<u32>,
    /// 16 to 1048576; defaults to 256.
    pub memory_mib: Option<u64>,
    /// Defaults to `default`.
    pub image: Option<String>,
    /// The workload run inside the guest.
    pub command: Option<Vec<String>>,
    /// Self-management policies, enforced inside the VM and by its host.
    pub policy: Option<PolicySpec>,
    /// Keep the VM up after its workload ends; by default it powers off.
    pub keep_running: Option<bool>,
    /// A data disk of this many MiB (qemu: virtio-blk, mounted at /data in the guest);
    /// none by default.
    #[schema(minimum = 1, maximum = 16777216)]
    pub disk_mib: Option<u64>,
}

/// Many alike VMs in one request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchLaunchRequest {
    /// 1 to 1,000.
    pub count: u32,
    /// What each VM is; `name` is the prefix of their names.
    pub vm: LaunchRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchLaunched {
    /// The new VMs' ids, in name order.
    pub ids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageView {
    pub cpu_ms: u64,
    pub mem_kib: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub sampled_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub id: Uuid,
    pub name: String,
    pub project: String,
    pub hypervisor: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub image: String,
    pub command: Vec<String>,
    pub policy: PolicySpec,
    pub keep_running: bool,
    /// The data disk's size in MiB; 0 when it has none.
    pub disk_mib: u64,
    /// The host it is placed on; absent while pending.
    pub host: Option<Uuid>,
    /// What the user asked for.
    pub desired_state: VmState,
    /// What the host last reported.
    pub state: VmState,
    /// Bumps on every change of desired state.
    pub generation: u64,
    pub state_since: String,
    pub last_error: Option<String>,
    pub deleting: bool,
    pub created_at: String,
    pub updated_at: String,
    pub usage: Option<UsageView>,
    /// The guest module, once it has said hello.
    pub guest: Option<GuestView>,
    /// The burst in force, as its host last said (shown on a single VM's read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<BurstView>,
    /// The job it became when it missed its deadline (shown on a single VM's read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<super::broadcast_types::JobView>,
    /// The broadcast it was copied from, if it is a copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_of_broadcast: Option<Uuid>,
    /// Why a pending VM is not placed yet, as the scheduler said on its last pass
    /// (e.g. `waiting for capacity: none of 3 hosts fits: 2 short of memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
}

/// A burst granted by a VM's host: this much above the VM's shape until it expires.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BurstView {
    pub cpus: u32,
    pub memory_mib: u64,
    pub granted_at: String,
    pub expires_at: String,
    pub seconds_left: u64,
}

impl BurstView {
    pub fn of(lease: &herd_proto::burst::BurstLease, now_ms: u64) -> BurstView {
        let at = |ms: u64| rfc3339(i64::try_from(ms).unwrap_or(i64::MAX));
        BurstView {
            cpus: lease.cpus,
            memory_mib: lease.memory_mib,
            granted_at: at(lease.granted_ms),
            expires_at: at(lease.expires_ms),
            seconds_left: lease.seconds_left(now_ms),
        }
    }
}

/// An ask for a burst: this much more than the VM's shape, for `seconds` from now.
/// Asking again while one holds renews or replaces it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BurstRequest {
    /// Extra vCPUs' worth of CPU time.
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_mib: u64,
    #[schema(minimum = 1)]
    pub seconds: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GuestView {
    /// The guest said hello since the VM last booted and the VM is up.
    pub connected: bool,
    pub version: Option<String>,
    pub hello_at: Option<String>,
    pub last_report_at: String,
    pub uptime_ms: Option<u64>,
    pub workload_running: Option<bool>,
    /// Memory used by the guest module itself.
    pub guest_rss_kib: Option<u64>,
    pub exit_code: Option<i32>,
    pub last_error: Option<String>,
    /// How far each policy rule is from firing, as the guest last reported.
    pub policy_progress: Vec<PolicyProgressView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyProgressView {
    pub rule: String,
    pub text: String,
    /// Fraction of the limit reached, in thousandths.
    pub fraction_milli: u32,
    pub seconds_left: Option<u64>,
}

impl GuestView {
    fn of(info: &GuestInfo, state: VmState) -> GuestView {
        GuestView {
            connected: info.hello_at_ms.is_some()
                && matches!(state, VmState::Running | VmState::Paused),
            version: info.version.clone(),
            hello_at: info.hello_at_ms.map(rfc3339),
            last_report_at: rfc3339(info.last_report_at_ms),
            uptime_ms: info.uptime_ms,
            workload_running: info.workload_running,
            guest_rss_kib: info.guest_rss_kib,
            exit_code: info.exit_code,
            last_error: info.last_error.clone(),
            policy_progress: info
                .policy_progress
                .iter()
                .map(
                    |(rule, text, fraction_milli, seconds_left)| PolicyProgressView {
                        rule: rule.clone(),
                        text: text.clone(),
                        fraction_milli: *fraction_milli,
                        seconds_left: *seconds_left,
                    },
                )
                .collect(),
        }
    }
}

impl VmView {
    pub fn of(vm: &VmRecord, usage: Option<(VmUsage, i64)>, guest: Option<GuestInfo>) -> VmView {
        VmView {
            id: vm.id,
            name: vm.name.clone(),
            project: vm.project.clone(),
            hypervisor: vm.hypervisor.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            image: vm.image.clone(),
            command: vm.command.clone(),
            policy: vm.policy,
            keep_running: vm.keep_running,
            disk_mib: vm.disk_mib,
            host: vm.host,
            desired_state: vm.desired,
            state: vm.observed,
            generation: vm.generation,
            state_since: rfc3339(vm.observed_at_ms),
            last_error: vm.last_error.clone(),
            deleting: vm.deleting,
            created_at: rfc3339(vm.created_at_ms),
            updated_at: rfc3339(vm.updated_at_ms),
            usage: usage.map(|(u, at)| UsageView {
                cpu_ms: u.cpu_ms,
                mem_kib: u.mem_kib,
                net_rx_bytes: u.net_rx_bytes,
                net_tx_bytes: u.net_tx_bytes,
                disk_read_bytes: u.disk_read_bytes,
                disk_write_bytes: u.disk_write_bytes,
                sampled_at: rfc3339(at),
            }),
            guest: guest.map(|g| GuestView::of(&g, vm.observed)),
            burst: None,
            job: None,
            copy_of_broadcast: vm.seed,
            pending_reason: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub items: Vec<VmView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VmQuery {
    pub project: Option<String>,
    /// Observed state, e.g. `running`.
    pub state: Option<String>,
    /// Host id.
    pub host: Option<String>,
    pub name: Option<String>,
    /// 1 to 1000; defaults to 100.
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events after this event id.
    pub after: Option<i64>,
    /// 1 to 1000; defaults to 100.
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// How much of the end of the log, 1 to 1048576; defaults to 65536.
    pub bytes: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    pub id: i64,
    pub time: String,
    pub vm: Option<Uuid>,
    pub host: Option<Uuid>,
    /// e.g. `vm.state`, `vm.action`, `host.down`.
    pub kind: String,
    pub from: Option<VmState>,
    pub to: Option<VmState>,
    pub message: String,
}

impl EventView {
    pub fn of(event: &EventRecord) -> EventView {
        EventView {
            id: event.id,
            time: rfc3339(event.time_ms),
            vm: event.vm,
            host: event.host,
            kind: event.kind.clone(),
            from: event.from,
            to: event.to,
            message: event.message.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    pub items: Vec<EventView>,
    /// Pass as `after` for the next page.
    pub next_after: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HypervisorView {
    pub kind: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    pub id: Uuid,
    pub hostname: String,
    /// `joining` (joined, not heard from yet), `up` or `down`.
    pub state: String,
    pub connected: bool,
    pub hypervisors: Vec<HypervisorView>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// vCPUs and memory promised to VMs placed here.
    pub allocated_vcpus: u64,
    pub allocated_memory_mib: u64,
    /// Live utilization from the last report.
    pub cpu_permille: u16,
    pub mem_used_mib: u64,
    pub n_vms: u32,
    /// Milliseconds since the host was last heard from.
    pub last_seen_ms_ago: Option<u64>,
    pub agent_version: Option<String>,
    pub joined_at: String,
    /// Free-form; `region`, `zone` and `rack` place the host in the proximity tree.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Each driver's health as the agent last saw it: `ok`, `unresponsive` or
    /// `failing`, with why. Empty until the agent has said.
    pub drivers: Vec<DriverView>,
    /// The host's utility module's last sample, while the connection that brought it
    /// is open.
    pub utility: Option<UtilityView>,
    /// Why the utility module is not running, if it is not.
    pub utility_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DriverView {
    pub kind: String,
    /// `ok`, `unresponsive` or `failing`.
    pub health: String,
    /// The reason or error, when not ok.
    pub detail: Option<String>,
    /// When it stopped being ok.
    pub since: Option<String>,
}

impl DriverView {
    pub fn of(status: &herd_proto::node::DriverStatus) -> DriverView {
        use herd_proto::node::DriverHealth;
        let (detail, since) = match &status.health {
            DriverHealth::Ok => (None, None),
            DriverHealth::Unresponsive { since_ms, reason } => {
                (Some(reason.clone()), Some(*since_ms))
            }
            DriverHealth::Failing { since_ms, error } => (Some(error.clone()), Some(*since_ms)),
        };
        DriverView {
            kind: status.kind.clone(),
            health: status.health.name().into(),
            detail,
            since: since.map(|ms| rfc3339(i64::try_from(ms).unwrap_or(i64::MAX))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UtilityView {
    /// Milliseconds since the server received the sample.
    pub age_ms: u64,
    pub stats: herd_proto::node::NodeStats,
}

impl HostInfo {
    pub fn of(status: &HostStatus) -> HostInfo {
        let host = &status.record;
        let live = status.live.as_ref();
        let node = live.and_then(|l| l.node.as_ref());
        HostInfo {
            id: host.id,
            hostname: host.hostname.clone(),
            state: match (host.up, &host.agent_version) {
                (true, _) => "up".into(),
                // Never said hello yet: it has joined but not come up.
                (false, None) => "joining".into(),
                (false, Some(_)) => "down".into(),
            },
            connected: live.is_some_and(|l| l.connected),
            hypervisors: host
                .hypervisors
                .iter()
                .map(|h| HypervisorView {
                    kind: h.kind.clone(),
                    detail: h.detail.clone(),
                })
                .collect(),
            cpus: host.cpus,
            memory_mib: host.memory_mib,
            allocated_vcpus: status.allocated_vcpus,
            allocated_memory_mib: status.allocated_memory_mib,
            cpu_permille: live.map(|l| l.util.cpu_permille).unwrap_or(0),
            mem_used_mib: live.map(|l| l.util.mem_used_mib).unwrap_or(0),
            n_vms: live.map(|l| l.util.n_vms).unwrap_or(0),
            last_seen_ms_ago: live.map(|l| l.last_seen.elapsed().as_millis() as u64),
            agent_version: host.agent_version.clone(),
            joined_at: rfc3339(host.joined_at_ms),
            labels: host.labels.clone(),
            drivers: node
                .map(|(_, n)| n.drivers.iter().map(DriverView::of).collect())
                .unwrap_or_default(),
            utility: node.and_then(|(at, n)| {
                n.stats.clone().map(|stats| UtilityView {
                    age_ms: u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
                    stats,
                })
            }),
            utility_error: node.and_then(|(_, n)| n.util_error.clone()),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// Lifetime in seconds, 1 to 604800; defaults to 3600.
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenView {
    /// Shown once; the server keeps only its hash.
    pub token: String,
    pub expires_at: String,
    /// The command to run on the new host.
    pub command: String,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BillQuery {
    pub project: Option<String>,
    /// Start of the period: RFC 3339 or unix seconds; defaults to 30 days ago.
    pub from: Option<String>,
    /// End of the period: RFC 3339 or unix seconds; defaults to now.
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BillLineView {
    pub vm: Uuid,
    pub name: String,
    pub project: String,
    /// Hours running or paused within the period.
    pub hours: f64,
    pub cpu_seconds: f64,
    pub memory_gib_hours: f64,
    pub net_gib: f64,
    /// Exact, in millionths of the currency unit; bursts included.
    pub cost_micros: u64,
    /// Rounded half up to the cent.
    pub cost: String,
    /// The VM's bursts within the period, each with its part of the cost.
    #[serde(default)]
    pub bursts: Vec<BurstChargeView>,
}

/// A burst's part of a bill.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BurstChargeView {
    pub cpus: u32,
    pub memory_mib: u64,
    pub from: String,
    pub to: String,
    /// The lease's hours within the period.
    pub hours: f64,
    pub cost_micros: u64,
    pub cost: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BillView {
    pub from: String,
    pub to: String,
    pub lines: Vec<BillLineView>,
    pub total_micros: u64,
    pub total: String,
}

impl BillView {
    /// The bill as CSV: a header, a line per VM and the total (what `herd bill -o csv`
    /// prints and the web UI downloads).
    pub fn csv(&self) -> String {
        use std::fmt::Write;
        let mut out = String::from(
            "vm,name,project,hours,cpu_seconds,memory_gib_hours,net_gib,cost_micros,cost,\
             burst_hours,burst_cost_micros\n",
        );
        for l in &self.lines {
            // Names and projects are lowercase letters, digits and `-`: no field
            // needs quoting.
            let _ = writeln!(
                out,
                "{},{},{},{:.6},{:.3},{:.6},{:.6},{},{},{:.6},{}",
                l.vm,
                l.name,
                l.project,
                l.hours,
                l.cpu_seconds,
                l.memory_gib_hours,
                l.net_gib,
                l.cost_micros,
                l.cost,
                l.bursts.iter().map(|b| b.hours).sum::<f64>(),
                l.bursts.iter().map(|b| b.cost_micros).sum::<u64>()
            );
        }
        let _ = writeln!(out, ",total,,,,,,{},{},,", self.total_micros, self.total);
        out
    }

    pub fn of(lines: &[crate::billing::BillLine], from_ms: i64, to_ms: i64) -> BillView {
        let total_micros = lines.iter().map(|l| l.cost_micros).sum();
        BillView {
            from: rfc3339(from_ms),
            to: rfc3339(to_ms),
            lines: lines
                .iter()
                .map(|l| BillLineView {
                    vm: l.vm.vm,
                    name: l.vm.name.clone(),
                    project: l.vm.project.clone(),
                    hours: l.billed_ms as f64 / 3_600_000.0,
                    cpu_seconds: l.cpu_ms as f64 / 1000.0,
                    memory_gib_hours: l.memory_mib_ms as f64 / 1024.0 / 3_600_000.0,
                    net_gib: l.net_bytes as f64 / (1u64 << 30) as f64,
                    cost_micros: l.cost_micros,
                    cost: crate::billing::format_money(l.cost_micros),
                    bursts: l
                        .bursts
                        .iter()
                        .map(|b| BurstChargeView {
                            cpus: b.burst.cpus,
                            memory_mib: b.burst.memory_mib,
                            from: rfc3339(b.burst.from_ms),
                            to: rfc3339(b.burst.to_ms),
                            hours: b.billed_ms as f64 / 3_600_000.0,
                            cost_micros: b.cost_micros,
                            cost: crate::billing::format_money(b.cost_micros),
                        })
                        .collect(),
                })
                .collect(),
            total_micros,
            total: crate::billing::format_money(total_micros),
        }
    }
}

/// A request to move a running VM to another host.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target host, by id or hostname; absent lets the scheduler choose a host of
    /// the VM's type with room.
    #[serde(default)]
    pub to: Option<String>,
}

/// A VM's migrations, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MigrationList {
    pub items: Vec<MigrationView>,
}

/// A live migration, as it stands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MigrationView {
    pub id: Uuid,
    pub vm: Uuid,
    pub source: Uuid,
    /// The current attempt's target.
    pub target: Uuid,
    /// preparing, transferring, switching_over, committed, rolling_back, resuming,
    /// done or failed.
    pub phase: String,
    /// Whether anything is left to do (a phase, or an old target to clean).
    pub active: bool,
    pub attempt: u32,
    /// Every target tried, the current one last.
    pub tried: Vec<Uuid>,
    pub progress: herd_proto::migration::TransferProgress,
    /// How long the VM was stopped for the switch-over, as the source's hypervisor
    /// measured it.
    pub downtime_ms: Option<u64>,
    /// How long the transfer took, from the start of the copy to the switch-over.
    pub transfer_ms: Option<u64>,
    /// Why the last attempt failed, or the migration did.
    pub reason: Option<String>,
    pub started_at: String,
    pub updated_at: String,
}

impl MigrationView {
    pub fn of(m: &crate::migration::plan::Migration) -> MigrationView {
        MigrationView {
            id: m.id,
            vm: m.vm,
            source: m.source,
            target: m.target,
            phase: m.phase.as_str().into(),
            active: m.is_active(),
            attempt: m.attempt,
            tried: m.tried.clone(),
            progress: m.progress,
            downtime_ms: m.downtime_ms,
            transfer_ms: m.transfer_ms,
            reason: m.reason.clone(),
            started_at: rfc3339(m.started_at_ms),
            updated_at: rfc3339(m.updated_at_ms),
        }
    }
}

/// A request for a new shape; what is absent stays as it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    #[schema(minimum = 1, maximum = 256)]
    pub vcpus: Option<u32>,
    #[schema(minimum = 16, maximum = 1048576)]
    pub memory_mib: Option<u64>,
    /// Accept that the VM restarts: a running qemu VM's shape changes only at boot.
    #[serde(default)]
    pub restart: bool,
    /// With no host having room now, wait (status `deferred`) instead of refusing.
    #[serde(default)]
    pub wait_for_room: bool,
}

/// A VM's shape.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct SizeView {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// A VM's resizes: the latest, if any.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResizeList {
    pub items: Vec<ResizeView>,
}

/// A resize, as it stands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResizeView {
    pub id: Uuid,
    pub vm: Uuid,
    pub from: SizeView,
    pub to: SizeView,
    /// proposed, moving (to a host with room first), in_progress (sent to its host),
    /// deferred (waiting for room), done or failed.
    pub status: String,
    /// Why it is where it is.
    pub reason: String,
    /// It restarts the VM.
    pub restart: bool,
    pub wait_for_room: bool,
    /// The migration that moves it to a host with room, if it needed one.
    pub migration: Option<Uuid>,
    pub created_at: String,
    pub updated_at: String,
}

impl ResizeView {
    pub fn of(r: &crate::resize::plan::Resize) -> ResizeView {
        let size = |s: crate::resize::plan::Size| SizeView {
            vcpus: s.vcpus,
            memory_mib: s.memory_mib,
        };
        ResizeView {
            id: r.id,
            vm: r.vm,
            from: size(r.from),
            to: size(r.to),
            status: r.status.as_str().into(),
            reason: r.reason.clone(),
            restart: r.restart,
            wait_for_room: r.wait_for_room,
            migration: r.migration,
            created_at: rfc3339(r.created_at_ms),
            updated_at: rfc3339(r.updated_at_ms),
        }
    }
}

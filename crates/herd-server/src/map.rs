//! The live resource map: what every host and every hypervisor type has, holds and
//! uses, merged from three sources that each know one part. The server's placement
//! knows what specs reserve (allocated); the agents' utility modules measure what the
//! hosts and each driver's guests really use; the host records say what each host
//! offers. Pure: [`build`] takes those facts and the time, so every rule (stale hosts,
//! over-commit, a project's view) is unit-tested.
//!
//! A host's measured figures count only while they are fresh (younger than two of its
//! utility module's intervals) and it is up; otherwise it is `stale`, its measured
//! figures are left out and nothing on it counts as free, so a silent host is never
//! shown as room to place on.

use crate::cloud::HostStatus;
use crate::store::Allocation;
use herd_proto::node::{DriverHealth, NodeStats};
use herd_proto::wire::HostId;
use herd_sched::SchedPolicy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;
use utoipa::ToSchema;

/// A host with no utility figures for this long is stale even if its module's interval
/// is unknown.
const DEFAULT_INTERVAL_MS: u64 = 1_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResourceMap {
    /// `cloud` (every host, for cloud admins) or `project` (the caller's projects'
    /// aggregates, without hosts).
    pub scope: String,
    /// One row per hypervisor type. Capacity and free of a type count every fresh
    /// host that offers it, so a host with two types counts in both.
    pub types: Vec<TypeMap>,
    pub hosts: Vec<HostMap>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TypeMap {
    pub hypervisor: String,
    /// Hosts that offer the type and have fresh figures.
    pub n_hosts: u32,
    pub n_stale_hosts: u32,
    /// VMs of the type that hold capacity, and the ones waiting for a host.
    pub n_vms: u64,
    pub n_pending: u64,
    pub allocated_vcpus: u64,
    pub allocated_memory_mib: u64,
    /// Measured: thousandths of one CPU, and resident memory of the type's guests.
    pub used_millicores: Option<u64>,
    pub used_memory_mib: Option<u64>,
    /// What the scheduler could still promise (capacity times over-commit, less
    /// allocated), on fresh hosts; not shown to project members.
    pub free_vcpus: Option<u64>,
    pub free_memory_mib: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostMap {
    #[schema(value_type = String, format = Uuid)]
    pub id: HostId,
    pub hostname: String,
    /// `up`, `down` or `joining`.
    pub state: String,
    /// Its measured figures are missing or older than two utility intervals.
    pub stale: bool,
    /// Why it is stale, in words.
    pub stale_reason: Option<String>,
    /// Milliseconds since its last utility figures.
    pub figures_age_ms: Option<u64>,
    /// Until hosts carry labels, every host is in zone `-`.
    pub zone: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub allocated_vcpus: u64,
    pub allocated_memory_mib: u64,
    /// Allocated over physical capacity (1.0 = as many vCPUs as CPUs).
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub free_vcpus: u64,
    pub free_memory_mib: u64,
    /// The whole host, measured by its utility module.
    pub used_millicores: Option<u64>,
    pub used_memory_mib: Option<u64>,
    pub load1: Option<f64>,
    pub disk_free_mib: Option<u64>,
    pub disk_total_mib: Option<u64>,
    pub net_rx_bytes_per_s: Option<u64>,
    pub net_tx_bytes_per_s: Option<u64>,
    pub types: Vec<HostTypeMap>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostTypeMap {
    pub hypervisor: String,
    /// `ok`, `unresponsive`, `failing`, or `unknown` before the agent said.
    pub health: String,
    pub health_detail: Option<String>,
    pub n_vms: u64,
    pub allocated_vcpus: u64,
    pub allocated_memory_mib: u64,
    /// What the type's guests use on this host, measured from outside them.
    pub used_millicores: Option<u64>,
    pub used_memory_mib: Option<u64>,
    /// Guests the utility module found (QEMU processes, containers).
    pub measured_guests: Option<u32>,
}

/// Who asks: a cloud admin sees every host; anyone else the aggregates of the
/// projects they can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapScope {
    Cloud,
    Projects(Vec<String>),
}

/// A host's utility figures, if fresh enough to count.
fn fresh_stats(host: &HostStatus, now: Instant) -> Result<(&NodeStats, u64), String> {
    if !host.record.up {
        return Err("host is not up".into());
    }
    let Some(live) = &host.live else {
        return Err("not heard from since the server started".into());
    };
    let Some((received, report)) = &live.node else {
        return Err("no utility figures yet".into());
    };
    let age_ms = now.saturating_duration_since(*received).as_millis() as u64;
    let Some(stats) = &report.stats else {
        return Err(report
            .util_error
            .clone()
            .unwrap_or_else(|| "its utility module does not run".into()));
    };
    let interval = match u64::from(stats.interval_ms) {
        0 => DEFAULT_INTERVAL_MS,
        ms => ms,
    };
    if age_ms > 2 * interval {
        return Err(format!("utility figures are {age_ms} ms old"));
    }
    Ok((stats, age_ms))
}

fn host_state(host: &HostStatus) -> &'static str {
    match (host.record.up, &host.record.agent_version) {
        (true, _) => "up",
        (false, None) => "joining",
        (false, Some(_)) => "down",
    }
}

/// What can still be promised on a host of `capacity`, `allocated` already, at
/// `overcommit`.
fn free(capacity: u64, overcommit: f64, allocated: u64) -> u64 {
    ((capacity as f64 * overcommit).floor() as u64).saturating_sub(allocated)
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 / whole as f64 * 100.0).round() / 100.0
    }
}

#[derive(Default, Clone, Copy)]
struct Sum {
    n: u64,
    vcpus: u64,
    memory_mib: u64,
}

/// The map of `hosts` and `allocations` at `now`, as `scope` may see it.
pub fn build(
    hosts: &[HostStatus],
    allocations: &[Allocation],
    policy: &SchedPolicy,
    scope: &MapScope,
    now: Instant,
) -> ResourceMap {
    let visible = |project: &str| match scope {
        MapScope::Cloud => true,
        MapScope::Projects(projects) => projects.iter().any(|p| p == project),
    };
    // (host, type) and (type) sums of what the visible projects hold.
    let mut by_host_type: BTreeMap<(HostId, &str), Sum> = BTreeMap::new();
    let mut by_type: BTreeMap<&str, (Sum, u64)> = BTreeMap::new();
    for a in allocations.iter().filter(|a| visible(&a.project)) {
        let (sum, pending) = by_type.entry(a.hypervisor.as_str()).or_default();
        match a.host {
            Some(host) => {
                sum.n += a.n_vms;
                sum.vcpus += a.vcpus;
                sum.memory_mib += a.memory_mib;
                let at = by_host_type
                    .entry((host, a.hypervisor.as_str()))
                    .or_default();
                at.n += a.n_vms;
                at.vcpus += a.vcpus;
                at.memory_mib += a.memory_mib;
            }
            None => *pending += a.n_vms,
        }
    }
    let cloud = *scope == MapScope::Cloud;
    let mut host_rows = Vec::new();
    // Per type: fresh hosts, stale hosts, used millicores and MiB, free vCPUs and MiB.
    let mut type_hosts: BTreeMap<String, (u32, u32, u64, u64, u64, u64)> = BTreeMap::new();
    for host in hosts {
        let fresh = fresh_stats(host, now);
        let stats = fresh.as_ref().ok().map(|(stats, _)| *stats);
        let cpus = u64::from(host.record.cpus);
        let free_vcpus = stats
            .map(|_| free(cpus, policy.cpu_overcommit, host.allocated_vcpus))
            .unwrap_or(0);
        let free_memory_mib = stats
            .map(|_| {
                free(
                    host.record.memory_mib,
                    policy.memory_overcommit,
                    host.allocated_memory_mib,
                )
            })
            .unwrap_or(0);
        let health = host
            .live
            .as_ref()
            .and_then(|live| live.node.as_ref())
            .map(|(_, report)| report.drivers.as_slice())
            .unwrap_or_default();
        let mut types = Vec::new();
        for offered in &host.record.hypervisors {
            let kind = offered.kind.as_str();
            let held = by_host_type
                .get(&(host.record.id, kind))
                .copied()
                .unwrap_or_default();
            let measured = stats.and_then(|s| s.drivers.iter().find(|d| d.kind == kind));
            let used_millicores = measured.map(|d| u64::from(d.cpu_permille) * cpus);
            let used_memory_mib = measured.map(|d| d.mem_mib);
            let row = type_hosts.entry(offered.kind.clone()).or_default();
            if stats.is_some() {
                row.0 += 1;
                row.2 += used_millicores.unwrap_or(0);
                row.3 += used_memory_mib.unwrap_or(0);
                row.4 += free_vcpus;
                row.5 += free_memory_mib;
            } else {
                row.1 += 1;
            }
            let status = health.iter().find(|s| s.kind == kind).map(|s| &s.health);
            types.push(HostTypeMap {
                hypervisor: offered.kind.clone(),
                health: status.map_or("unknown", DriverHealth::name).to_owned(),
                health_detail: status.filter(|h| !h.is_ok()).map(DriverHealth::describe),
                n_vms: held.n,
                allocated_vcpus: held.vcpus,
                allocated_memory_mib: held.memory_mib,
                used_millicores,
                used_memory_mib,
                measured_guests: measured.map(|d| d.n),
            });
        }
        if !cloud {
            continue;
        }
        let net = stats.map(|s| {
            s.net.iter().fold((0u64, 0u64), |(rx, tx), n| {
                (
                    rx.saturating_add(n.rx_bytes_per_s),
                    tx.saturating_add(n.tx_bytes_per_s),
                )
            })
        });
        host_rows.push(HostMap {
            id: host.record.id,
            hostname: host.record.hostname.clone(),
            state: host_state(host).into(),
            stale: stats.is_none(),
            stale_reason: fresh.as_ref().err().cloned(),
            figures_age_ms: fresh.as_ref().ok().map(|(_, age)| *age),
            zone: "-".into(),
            cpus: host.record.cpus,
            memory_mib: host.record.memory_mib,
            allocated_vcpus: host.allocated_vcpus,
            allocated_memory_mib: host.allocated_memory_mib,
            cpu_overcommit: ratio(host.allocated_vcpus, cpus),
            memory_overcommit: ratio(host.allocated_memory_mib, host.record.memory_mib),
            free_vcpus,
            free_memory_mib,
            used_millicores: stats.map(|s| u64::from(s.cpu_permille) * cpus),
            used_memory_mib: stats.map(|s| s.mem_used_mib),
            load1: stats.map(|s| f64::from(s.load1_centi) / 100.0),
            disk_free_mib: stats.map(|s| s.disk.free_mib),
            disk_total_mib: stats.map(|s| s.disk.total_mib),
            net_rx_bytes_per_s: net.map(|n| n.0),
            net_tx_bytes_per_s: net.map(|n| n.1),
            types,
        });
    }
    let mut kinds: Vec<String> = type_hosts.keys().cloned().collect();
    for kind in by_type.keys() {
        if !type_hosts.contains_key(*kind) {
            kinds.push((*kind).to_owned());
        }
    }
    let types = kinds
        .into_iter()
        .map(|kind| {
            let (held, pending) = by_type.get(kind.as_str()).copied().unwrap_or_default();
            let (n_hosts, n_stale, used_mc, used_mib, free_vcpus, free_mib) =
                type_hosts.get(&kind).copied().unwrap_or_default();
            TypeMap {
                n_hosts: if cloud { n_hosts } else { 0 },
                n_stale_hosts: if cloud { n_stale } else { 0 },
                n_vms: held.n,
                n_pending: pending,
                allocated_vcpus: held.vcpus,
                allocated_memory_mib: held.memory_mib,
                used_millicores: cloud.then_some(used_mc),
                used_memory_mib: cloud.then_some(used_mib),
                free_vcpus: cloud.then_some(free_vcpus),
                free_memory_mib: cloud.then_some(free_mib),
                hypervisor: kind,
            }
        })
        .collect();
    ResourceMap {
        scope: if cloud { "cloud" } else { "project" }.into(),
        types,
        hosts: host_rows,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cloud::HostLive;
    use crate::store::HostRecord;
    use herd_proto::node::{DriverStatus, DriverUse, NodeReport};
    use herd_proto::wire::{HostUtil, HypervisorInfo};
    use std::time::Duration;

    fn host(
        n: u8,
        kinds: &[&str],
        figures: Option<(Duration, NodeStats)>,
        now: Instant,
    ) -> HostStatus {
        HostStatus {
            record: HostRecord {
                id: HostId::from_bytes([n; 16]),
                hostname: format!("h{n}"),
                hypervisors: kinds
                    .iter()
                    .map(|k| HypervisorInfo {
                        kind: (*k).into(),
                        detail: String::new(),
                    })
                    .collect(),
                cpus: 2,
                memory_mib: 4096,
                up: true,
                joined_at_ms: 0,
                agent_version: Some("t".into()),
                labels: Default::default(),
            },
            live: Some(HostLive {
                last_seen: now,
                util: HostUtil::default(),
                down: false,
                needs_resync: false,
                session: 1,
                connected: true,
                node: figures.map(|(age, stats)| {
                    (
                        now - age,
                        NodeReport {
                            stats: Some(stats),
                            util_error: None,
                            drivers: vec![DriverStatus {
                                kind: "qemu".into(),
                                health: DriverHealth::Unresponsive {
                                    since_ms: 1,
                                    reason: "QMP of VM x does not answer".into(),
                                },
                            }],
                        },
                    )
                }),
            }),
            allocated_vcpus: 3,
            allocated_memory_mib: 1024,
        }
    }

    fn stats() -> NodeStats {
        NodeStats {
            interval_ms: 1000,
            cpu_permille: 500,
            mem_used_mib: 2000,
            mem_total_mib: 4096,
            drivers: vec![
                DriverUse {
                    kind: "qemu".into(),
                    cpu_permille: 300,
                    mem_mib: 700,
                    n: 2,
                },
                DriverUse {
                    kind: "oci".into(),
                    cpu_permille: 50,
                    mem_mib: 20,
                    n: 1,
                },
            ],
            ..NodeStats::default()
        }
    }

    fn allocation(host: Option<u8>, project: &str, kind: &str, n: u64) -> Allocation {
        Allocation {
            host: host.map(|h| HostId::from_bytes([h; 16])),
            project: project.into(),
            hypervisor: kind.into(),
            n_vms: n,
            vcpus: n,
            memory_mib: 256 * n,
        }
    }

    #[test]
    fn a_fresh_host_shows_both_types_with_allocated_used_and_free() {
        let now = Instant::now();
        let hosts = [host(
            1,
            &["qemu", "oci"],
            Some((Duration::from_millis(500), stats())),
            now,
        )];
        let allocations = [
            allocation(Some(1), "a", "qemu", 2),
            allocation(Some(1), "b", "oci", 1),
            allocation(None, "a", "qemu", 4),
        ];
        let map = build(
            &hosts,
            &allocations,
            &SchedPolicy::default(),
            &MapScope::Cloud,
            now,
        );
        let h = &map.hosts[0];
        assert!(!h.stale);
        assert_eq!(h.figures_age_ms, Some(500));
        // 2 CPUs at 4x over-commit, 3 allocated.
        assert_eq!((h.free_vcpus, h.free_memory_mib), (5, 3072));
        assert_eq!(h.cpu_overcommit, 1.5);
        assert_eq!(h.used_millicores, Some(1000));
        let qemu = &h.types[0];
        assert_eq!(
            (qemu.hypervisor.as_str(), qemu.n_vms, qemu.allocated_vcpus),
            ("qemu", 2, 2)
        );
        assert_eq!(
            (qemu.used_millicores, qemu.used_memory_mib),
            (Some(600), Some(700))
        );
        assert_eq!(qemu.health, "unresponsive");
        assert_eq!(
            qemu.health_detail.as_deref(),
            Some("unresponsive (QMP of VM x does not answer)")
        );
        let oci = &h.types[1];
        assert_eq!(
            (oci.n_vms, oci.used_memory_mib, oci.health.as_str()),
            (1, Some(20), "unknown")
        );
        let qemu_type = map.types.iter().find(|t| t.hypervisor == "qemu").unwrap();
        assert_eq!(
            (qemu_type.n_vms, qemu_type.n_pending, qemu_type.n_hosts),
            (2, 4, 1)
        );
        assert_eq!(qemu_type.free_vcpus, Some(5));
    }

    #[test]
    fn a_stale_or_silent_host_is_never_free() {
        let now = Instant::now();
        let hosts = [
            host(
                1,
                &["qemu"],
                Some((Duration::from_millis(2_500), stats())),
                now,
            ),
            host(2, &["qemu"], None, now),
        ];
        let map = build(&hosts, &[], &SchedPolicy::default(), &MapScope::Cloud, now);
        for h in &map.hosts {
            assert!(h.stale, "{h:?}");
            assert_eq!((h.free_vcpus, h.free_memory_mib), (0, 0));
            assert_eq!(h.used_millicores, None);
        }
        assert_eq!(
            map.hosts[0].stale_reason.as_deref(),
            Some("utility figures are 2500 ms old")
        );
        assert_eq!(
            map.hosts[1].stale_reason.as_deref(),
            Some("no utility figures yet")
        );
        let qemu = &map.types[0];
        assert_eq!(
            (qemu.n_hosts, qemu.n_stale_hosts, qemu.free_vcpus),
            (0, 2, Some(0))
        );
    }

    #[test]
    fn a_project_sees_its_own_aggregates_and_no_hosts() {
        let now = Instant::now();
        let hosts = [host(
            1,
            &["qemu", "oci"],
            Some((Duration::ZERO, stats())),
            now,
        )];
        let allocations = [
            allocation(Some(1), "a", "qemu", 2),
            allocation(Some(1), "b", "qemu", 5),
            allocation(Some(1), "b", "oci", 1),
        ];
        let scope = MapScope::Projects(vec!["a".into()]);
        let map = build(&hosts, &allocations, &SchedPolicy::default(), &scope, now);
        assert_eq!(map.scope, "project");
        assert!(map.hosts.is_empty());
        let qemu = map.types.iter().find(|t| t.hypervisor == "qemu").unwrap();
        assert_eq!((qemu.n_vms, qemu.allocated_vcpus), (2, 2));
        assert_eq!(
            (qemu.used_millicores, qemu.free_vcpus, qemu.n_hosts),
            (None, None, 0)
        );
        let oci = map.types.iter().find(|t| t.hypervisor == "oci").unwrap();
        assert_eq!(oci.n_vms, 0);
    }
}

//! Where a resize goes, decided from the scheduler's view alone (a VM that outgrows its
//! host moves to a host of its type with room rather than be refused). Pure, so every case is
//! tested without a cloud, and the same answer serves the request and the retries of
//! a resize that waits for room.

use herd_proto::migration::MigrationId;
use herd_proto::wire::{HostId, VmId};
use herd_sched::{Demand, HostSlot, SchedPolicy};
use serde::{Deserialize, Serialize};

/// A VM's shape as the scheduler counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} vCPU, {} MiB", self.vcpus, self.memory_mib)
    }
}

/// Where a resize stands, as in Kubernetes' in-place resize (KEP 1287). A resize that
/// could never fit is refused at once and not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Decided; nothing sent yet.
    Proposed,
    /// Moving to a host with room first (a live migration).
    Moving,
    /// Sent to the VM's host, which applies it (a restart for qemu).
    InProgress,
    /// No host has room now; tried again as room appears.
    Deferred,
    Done,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Proposed => "proposed",
            Status::Moving => "moving",
            Status::InProgress => "in_progress",
            Status::Deferred => "deferred",
            Status::Done => "done",
            Status::Failed => "failed",
        }
    }
}

/// One resize of one VM, as the store keeps it (the latest per VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    pub id: uuid::Uuid,
    pub vm: VmId,
    pub from: Size,
    pub to: Size,
    pub status: Status,
    /// Why it is where it is, in words.
    pub reason: String,
    /// It restarts the VM (QEMU fixes a guest's shape at boot).
    pub restart: bool,
    pub wait_for_room: bool,
    /// The move it waits for.
    pub migration: Option<MigrationId>,
    /// The VM generation whose command applies it on the host.
    pub generation: Option<u64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl Resize {
    /// Not finished yet: the VM takes no other resize meanwhile.
    pub fn is_open(&self) -> bool {
        !matches!(self.status, Status::Done | Status::Failed)
    }
}

/// What a resize does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Its host has room for the new size, counting the share the VM holds already.
    InPlace,
    /// Its host has not; this host of its type has.
    Move(HostId),
    /// No host has room now, but one of its type is big enough: room may appear.
    NoRoomNow(String),
    /// No host of its type is big enough, even empty.
    Infeasible(String),
}

/// Decides a resize of a VM of type `hypervisor` on host `here` from `current` to
/// `wanted`, over every host the scheduler knows (`here` among them, counting
/// `current` as used).
pub fn route(
    hypervisor: &str,
    here: HostId,
    current: Size,
    wanted: Size,
    hosts: &[HostSlot],
    policy: &SchedPolicy,
) -> Route {
    let of_type = |h: &&HostSlot| h.hypervisors.iter().any(|k| k == hypervisor);
    let shrinks = wanted.vcpus <= current.vcpus && wanted.memory_mib <= current.memory_mib;
    if let Some(home) = hosts.iter().find(|h| h.id == here) {
        let vcpus =
            home.used_vcpus.saturating_sub(u64::from(current.vcpus)) + u64::from(wanted.vcpus);
        let memory = home.used_memory_mib.saturating_sub(current.memory_mib) + wanted.memory_mib;
        // What the VM gives back always fits where it is.
        if shrinks || vcpus <= policy.vcpu_limit(home) && memory <= policy.memory_limit_mib(home) {
            return Route::InPlace;
        }
    }
    let others: Vec<HostSlot> = hosts.iter().filter(|h| h.id != here).cloned().collect();
    let demand = Demand {
        hypervisor: hypervisor.to_owned(),
        vcpus: wanted.vcpus,
        memory_mib: wanted.memory_mib,
    };
    let no_fit = match herd_sched::place(&others, &demand, policy) {
        Ok(idx) => return Route::Move(others[idx].id),
        Err(no_fit) => no_fit,
    };
    let big_enough = hosts.iter().filter(of_type).any(|h| {
        u64::from(wanted.vcpus) <= policy.vcpu_limit(h)
            && wanted.memory_mib <= policy.memory_limit_mib(h)
    });
    let asked = format!("{} vCPU and {} MiB", wanted.vcpus, wanted.memory_mib);
    if big_enough {
        return Route::NoRoomNow(format!(
            "no {hypervisor} host has room for {asked} now: its host is full and {no_fit}"
        ));
    }
    let largest = hosts
        .iter()
        .filter(of_type)
        .map(|h| (policy.vcpu_limit(h), policy.memory_limit_mib(h)))
        .max_by_key(|(vcpus, memory)| (*memory, *vcpus));
    Route::Infeasible(match largest {
        Some((vcpus, memory)) => format!(
            "no {hypervisor} host can hold {asked}: the largest holds {vcpus} vCPU and \
             {memory} MiB"
        ),
        None => format!("no {hypervisor} host is known"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn host(n: u128, cpus: u32, memory_mib: u64, used: (u64, u64)) -> HostSlot {
        HostSlot {
            id: HostId::from_u128(n),
            up: true,
            hypervisors: vec!["qemu".into()],
            cpus,
            memory_mib,
            used_vcpus: used.0,
            used_memory_mib: used.1,
        }
    }

    fn size(vcpus: u32, memory_mib: u64) -> Size {
        Size { vcpus, memory_mib }
    }

    /// No overcommit, so the figures read as they are.
    fn exact() -> SchedPolicy {
        SchedPolicy {
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            ..SchedPolicy::default()
        }
    }

    #[test]
    fn a_size_that_fits_its_host_stays() {
        let hosts = [host(1, 4, 4096, (1, 1024)), host(2, 8, 8192, (0, 0))];
        let here = HostId::from_u128(1);
        // Growing from 1/1024 to 4/4096 uses the whole host, counting its own share.
        let r = route("qemu", here, size(1, 1024), size(4, 4096), &hosts, &exact());
        assert_eq!(r, Route::InPlace);
    }

    #[test]
    fn shrinking_stays_even_on_an_overfull_host() {
        let hosts = [host(1, 2, 1024, (8, 4096))];
        let here = HostId::from_u128(1);
        let r = route("qemu", here, size(4, 2048), size(2, 512), &hosts, &exact());
        assert_eq!(r, Route::InPlace);
    }

    #[test]
    fn outgrowing_its_host_moves_to_one_with_room() {
        let hosts = [
            host(1, 4, 4096, (4, 2048)),
            host(2, 4, 4096, (3, 0)),
            host(3, 8, 8192, (2, 1024)),
        ];
        let here = HostId::from_u128(1);
        let r = route("qemu", here, size(2, 1024), size(4, 2048), &hosts, &exact());
        assert_eq!(r, Route::Move(HostId::from_u128(3)));
    }

    #[test]
    fn only_hosts_of_its_type_take_it() {
        let mut other = host(2, 64, 65536, (0, 0));
        other.hypervisors = vec!["oci".into()];
        let hosts = [host(1, 2, 2048, (2, 2048)), other];
        let here = HostId::from_u128(1);
        let r = route("qemu", here, size(2, 2048), size(4, 4096), &hosts, &exact());
        assert!(
            matches!(r, Route::Infeasible(ref why) if why.contains("2 vCPU and 2048 MiB")),
            "{r:?}"
        );
    }

    #[test]
    fn full_hosts_that_are_big_enough_mean_wait() {
        let hosts = [host(1, 4, 4096, (4, 4096)), host(2, 8, 8192, (8, 8192))];
        let here = HostId::from_u128(1);
        let r = route("qemu", here, size(2, 2048), size(6, 6144), &hosts, &exact());
        assert!(
            matches!(r, Route::NoRoomNow(ref why) if why.contains("6 vCPU and 6144 MiB")),
            "{r:?}"
        );
    }

    #[test]
    fn a_down_host_gets_nothing_new() {
        let mut down = host(2, 8, 8192, (0, 0));
        down.up = false;
        let hosts = [host(1, 2, 2048, (2, 2048)), down];
        let here = HostId::from_u128(1);
        let r = route("qemu", here, size(2, 2048), size(4, 4096), &hosts, &exact());
        assert!(matches!(r, Route::NoRoomNow(_)), "{r:?}");
    }

    proptest! {
        /// Whatever the hosts hold: staying means the VM's host holds the new size
        /// (or the VM shrank), and moving means the target holds it and is another up
        /// host of the type.
        #[test]
        fn every_route_keeps_hosts_within_their_limits(
            used in proptest::collection::vec((0u64..16, 0u64..16384), 1..5),
            current in (1u32..8, 1u64..4096),
            wanted in (1u32..12, 1u64..12288),
        ) {
            let hosts: Vec<HostSlot> = used
                .iter()
                .enumerate()
                .map(|(i, u)| host(i as u128 + 1, 8, 8192, *u))
                .collect();
            let here = hosts[0].id;
            let (current, wanted) = (size(current.0, current.1), size(wanted.0, wanted.1));
            let policy = exact();
            match route("qemu", here, current, wanted, &hosts, &policy) {
                Route::InPlace => {
                    let h = &hosts[0];
                    let shrinks = wanted.vcpus <= current.vcpus
                        && wanted.memory_mib <= current.memory_mib;
                    let vcpus = h.used_vcpus.saturating_sub(current.vcpus.into())
                        + u64::from(wanted.vcpus);
                    let memory = h.used_memory_mib.saturating_sub(current.memory_mib)
                        + wanted.memory_mib;
                    prop_assert!(shrinks || vcpus <= 8 && memory <= 8192);
                }
                Route::Move(to) => {
                    prop_assert_ne!(to, here);
                    let h = hosts.iter().find(|h| h.id == to).unwrap();
                    prop_assert!(h.used_vcpus + u64::from(wanted.vcpus) <= 8);
                    prop_assert!(h.used_memory_mib + wanted.memory_mib <= 8192);
                }
                Route::NoRoomNow(_) => {
                    prop_assert!(wanted.vcpus <= 8 && wanted.memory_mib <= 8192);
                }
                Route::Infeasible(_) => {
                    prop_assert!(wanted.vcpus > 8 || wanted.memory_mib > 8192);
                }
            }
        }
    }
}

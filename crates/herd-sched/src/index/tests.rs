//! The index must choose exactly what the linear reference [`crate::place`] chooses:
//! these tests check that on chosen cases and over random histories.

use super::Scheduler;
use crate::{place, Demand, HostSlot, NoFit, SchedPolicy, Strategy};
use proptest::prelude::{
    any, prop_assert, prop_assert_eq, prop_oneof, proptest, Just, Strategy as _,
};
use uuid::Uuid;

fn host(n: u128, kinds: &[&str], cpus: u32, memory_mib: u64) -> HostSlot {
    HostSlot {
        id: Uuid::from_u128(n),
        up: true,
        hypervisors: kinds.iter().map(|k| (*k).to_owned()).collect(),
        cpus,
        memory_mib,
        used_vcpus: 0,
        used_memory_mib: 0,
    }
}

fn demand(kind: &str, vcpus: u32, memory_mib: u64) -> Demand {
    Demand {
        hypervisor: kind.into(),
        vcpus,
        memory_mib,
    }
}

fn policy(strategy: Strategy) -> SchedPolicy {
    SchedPolicy {
        strategy,
        ..SchedPolicy::default()
    }
}

/// A scheduler that gives every shape its trees from its first host.
fn tree_sched(policy: SchedPolicy) -> Scheduler {
    Scheduler::with_promote_at(policy, 1)
}

/// The reference's answer over the scheduler's own hosts.
fn linear(sched: &Scheduler, demand: &Demand) -> Result<Uuid, NoFit> {
    let hosts: Vec<HostSlot> = sched.hosts().cloned().collect();
    place(&hosts, demand, sched.policy()).map(|idx| hosts[idx].id)
}

#[test]
fn hypervisors_are_those_some_known_host_offers() {
    let mut sched = tree_sched(policy(Strategy::Spread));
    sched.upsert_host(host(1, &["qemu", "sim"], 2, 4096));
    sched.upsert_host(host(2, &["qemu"], 2, 4096));
    assert_eq!(sched.hypervisors().collect::<Vec<_>>(), ["qemu", "sim"]);
    // A host that is down still offers its types: its VMs wait for it.
    sched.set_up(Uuid::from_u128(1), false);
    assert!(sched.offers("sim"));
    // A host that comes back without a driver no longer offers it.
    sched.upsert_host(host(1, &["qemu"], 2, 4096));
    assert!(!sched.offers("sim"));
    sched.remove_host(Uuid::from_u128(1));
    sched.remove_host(Uuid::from_u128(2));
    assert_eq!(sched.hypervisors().count(), 0);
}

#[test]
fn identical_hosts_fill_in_id_order_with_spread() {
    let mut sched = tree_sched(policy(Strategy::Spread));
    for n in (1..=4).rev() {
        sched.upsert_host(host(n, &["sim"], 2, 4096));
    }
    let mut chosen = Vec::new();
    for _ in 0..8 {
        let d = demand("sim", 1, 512);
        let id = sched.place_and_reserve(&d).expect("fits");
        chosen.push(id.as_u128());
    }
    assert_eq!(chosen, vec![1, 2, 3, 4, 1, 2, 3, 4]);
}

#[test]
fn binpack_fills_one_host_first() {
    let mut sched = tree_sched(policy(Strategy::Binpack));
    for n in 1..=3 {
        sched.upsert_host(host(n, &["sim"], 1, 2048));
    }
    for _ in 0..4 {
        let id = sched
            .place_and_reserve(&demand("sim", 1, 512))
            .expect("fits");
        assert_eq!(id.as_u128(), 1);
    }
    let id = sched
        .place_and_reserve(&demand("sim", 1, 512))
        .expect("fits");
    assert_eq!(id.as_u128(), 2);
}

#[test]
fn down_hosts_and_other_types_are_skipped_and_counted() {
    let mut sched = tree_sched(SchedPolicy::default());
    sched.upsert_host(host(1, &["qemu"], 8, 8192));
    sched.upsert_host(host(2, &["sim"], 8, 8192));
    sched.upsert_host(host(3, &["sim"], 1, 1024));
    assert!(sched.set_up(Uuid::from_u128(2), false));
    let err = sched
        .place(&demand("sim", 1, 4096))
        .expect_err("host 3 is too small, host 2 is down");
    assert_eq!(
        err.to_string(),
        "none of 3 hosts fits: 1 down, 1 without the hypervisor type, 1 short of memory"
    );
    assert!(sched.set_up(Uuid::from_u128(2), true));
    assert_eq!(sched.place(&demand("sim", 1, 4096)), Ok(Uuid::from_u128(2)));
    assert_eq!(
        sched.place(&demand("xen", 1, 1)).map_err(|e| e.to_string()),
        Err("none of 3 hosts fits: 3 without the hypervisor type".to_owned())
    );
    assert!(!sched.set_up(Uuid::from_u128(9), true));
    assert!(!sched.reserve(Uuid::from_u128(9), 1, 1));
}

#[test]
fn release_gives_capacity_back_and_upsert_replaces() {
    let mut sched = tree_sched(SchedPolicy {
        cpu_overcommit: 1.0,
        ..SchedPolicy::default()
    });
    sched.upsert_host(host(1, &["sim"], 2, 1024));
    let d = demand("sim", 2, 1024);
    let id = sched.place_and_reserve(&d).expect("fits");
    let err = sched.place(&d).expect_err("full");
    assert_eq!(err.n_short_of_cpu, 1);
    assert!(sched.release(id, 2, 1024));
    assert_eq!(sched.place(&d), Ok(id));
    // More than was reserved never goes below zero.
    assert!(sched.release(id, 100, 100_000));
    assert_eq!(sched.host(id).map(|h| h.used_vcpus), Some(0));
    // A host that comes back smaller keeps its usage, even past its limit.
    let mut slot = sched.host(id).cloned().expect("known");
    slot.used_vcpus = 3;
    slot.cpus = 1;
    sched.upsert_host(slot);
    assert_eq!(
        sched
            .place(&demand("sim", 1, 1))
            .map_err(|e| e.n_short_of_cpu),
        Err(1)
    );
    assert_eq!(sched.remove_host(id).map(|h| h.id), Some(id));
    assert!(sched.is_empty());
    assert_eq!(
        sched.place(&d).map_err(|e| e.to_string()),
        Err("no hosts have joined".to_owned())
    );
}

#[test]
fn zero_sized_and_huge_hosts_still_place() {
    let mut sched = tree_sched(SchedPolicy::default());
    sched.upsert_host(host(1, &["sim"], 0, 1024));
    sched.upsert_host(host(2, &["sim"], u32::MAX, u64::MAX / 2));
    let d = demand("sim", 1, 1);
    assert_eq!(sched.place(&d), linear(&sched, &d));
    assert_eq!(sched.place(&d), Ok(Uuid::from_u128(2)));
    let empty = demand("sim", 0, 0);
    assert_eq!(sched.place(&empty), linear(&sched, &empty));
}

#[test]
fn shapes_get_trees_once_they_have_enough_hosts() {
    let mut sched = Scheduler::new(SchedPolicy::default());
    let n = super::PROMOTE_AT as u128 + 3;
    for id in 1..=n {
        sched.upsert_host(host(id, &["sim"], 4, 4096));
        sched.upsert_host(host(1000 + id, &["sim"], 100 + id as u32, 4096));
    }
    let group = &sched.index.groups["sim"];
    assert_eq!(group.shapes.len(), 1);
    assert_eq!(group.flat.len(), n as usize);
    for _ in 0..200 {
        let d = demand("sim", 1, 100);
        assert_eq!(sched.place(&d), linear(&sched, &d));
        sched.place_and_reserve(&d).expect("fits");
    }
}

#[test]
fn huge_usage_moves_a_host_out_of_the_trees_and_back() {
    let mut sched = tree_sched(policy(Strategy::Binpack));
    sched.upsert_host(host(1, &["sim"], 4, 4096));
    sched.upsert_host(host(2, &["sim"], 4, 4096));
    let id = Uuid::from_u128(1);
    assert!(sched.reserve(id, 0, 1 << 40));
    assert_eq!(sched.index.groups["sim"].flat.len(), 1);
    let d = demand("sim", 1, 1);
    assert_eq!(sched.place(&d), Ok(Uuid::from_u128(2)));
    assert_eq!(sched.place(&d), linear(&sched, &d));
    assert!(sched.release(id, 0, 1 << 40));
    assert!(sched.index.groups["sim"].flat.is_empty());
    assert_eq!(sched.place(&d), Ok(id));
}

#[test]
fn promotion_leaves_hosts_the_trees_cannot_hold() {
    let mut sched = Scheduler::with_promote_at(policy(Strategy::Spread), 2);
    let mut huge = host(1, &["sim"], 4, 4096);
    huge.used_memory_mib = 1 << 40;
    sched.upsert_host(huge);
    sched.upsert_host(host(2, &["sim"], 4, 4096));
    sched.upsert_host(host(3, &["sim"], 4, 4096));
    let group = &sched.index.groups["sim"];
    assert_eq!((group.shapes.len(), group.flat.len()), (1, 1));
    let d = demand("sim", 1, 1);
    assert_eq!(sched.place(&d), linear(&sched, &d));
    assert!(sched.release(Uuid::from_u128(1), 0, 1 << 40));
    assert!(sched.index.groups["sim"].flat.is_empty());
    assert_eq!(sched.place(&d), Ok(Uuid::from_u128(1)));
}

#[test]
fn set_policy_rebuilds() {
    let mut sched = tree_sched(policy(Strategy::Spread));
    sched.upsert_host(host(1, &["sim"], 4, 4096));
    sched.upsert_host(host(2, &["sim"], 4, 4096));
    assert!(sched.reserve(Uuid::from_u128(2), 1, 512));
    let d = demand("sim", 1, 512);
    assert_eq!(sched.place(&d), Ok(Uuid::from_u128(1)));
    sched.set_policy(policy(Strategy::Binpack));
    assert_eq!(sched.place(&d), Ok(Uuid::from_u128(2)));
    assert_eq!(
        sched.host(Uuid::from_u128(2)).map(|h| h.used_vcpus),
        Some(1)
    );
}

/// One step of a random history.
#[derive(Debug, Clone)]
enum Op {
    Place {
        kind: usize,
        vcpus: u32,
        memory_mib: u64,
    },
    Release {
        nth: usize,
    },
    SetUp {
        host: usize,
        up: bool,
    },
    Reshape {
        host: usize,
        shape: usize,
        kinds: usize,
    },
    Remove {
        host: usize,
    },
}

const KINDS: [&[&str]; 4] = [&["a"], &["b"], &["a", "b"], &["b", "a", "b"]];

/// Few shapes, so that hosts share shapes and tie; some degenerate ones.
fn shape(n: usize) -> (u32, u64) {
    [
        (4, 4096),
        (4, 4096),
        (8, 16384),
        (2, 8192),
        (16, 4096),
        (1, 512),
        (3, 3000),
        (0, 2048),
        (4, 0),
    ][n % 9]
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..3, 0u32..6, prop_oneof![0u64..9000, (0u64..18).prop_map(|n| n * 512)])
            .prop_map(|(kind, vcpus, memory_mib)| Op::Place { kind, vcpus, memory_mib }),
        2 => any::<usize>().prop_map(|nth| Op::Release { nth }),
        1 => (0usize..24, any::<bool>()).prop_map(|(host, up)| Op::SetUp { host, up }),
        1 => (0usize..24, 0usize..9, 0usize..4)
            .prop_map(|(host, shape, kinds)| Op::Reshape { host, shape, kinds }),
        1 => (0usize..24).prop_map(|host| Op::Remove { host }),
    ]
}

proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]

    /// The index chooses exactly what the linear reference chooses (or fails with the
    /// same reasons) after any history of placements, releases, hosts going down and
    /// up, hosts changing shape or type, and hosts leaving; and its accounting matches
    /// a recount of the placements.
    #[test]
    fn agrees_with_linear_place(
        n_hosts in 1usize..24,
        shapes in proptest::collection::vec((0usize..9, 0usize..4, 0u64..6), 24),
        ops in proptest::collection::vec(op(), 1..150),
        binpack in any::<bool>(),
        promote_at in prop_oneof![Just(1usize), Just(2), Just(4), Just(32)],
        overcommit in (prop_oneof![Just(1.0), Just(1.5), Just(4.0)],
                       prop_oneof![Just(1.0), Just(1.25)]),
    ) {
        let policy = SchedPolicy {
            cpu_overcommit: overcommit.0,
            memory_overcommit: overcommit.1,
            strategy: if binpack { Strategy::Binpack } else { Strategy::Spread },
        };
        let mut sched = Scheduler::with_promote_at(policy, promote_at);
        let slot_of = |n: usize, shape_n: usize, kinds_n: usize, used: u64| {
            let (cpus, memory_mib) = shape(shape_n);
            let mut slot = host(n as u128 * 7919 % 101, KINDS[kinds_n], cpus, memory_mib);
            slot.used_vcpus = used;
            slot.used_memory_mib = used * 512;
            slot
        };
        for (n, (shape_n, kinds_n, used)) in shapes.iter().enumerate().take(n_hosts) {
            sched.upsert_host(slot_of(n, *shape_n, *kinds_n, *used));
        }
        // What the test itself placed: (host, vcpus, memory), to release and recount.
        let mut placed: Vec<(Uuid, u32, u64)> = Vec::new();
        let mut base: std::collections::HashMap<Uuid, (u64, u64)> = sched
            .hosts()
            .map(|h| (h.id, (h.used_vcpus, h.used_memory_mib)))
            .collect();
        for op in ops {
            match op {
                Op::Place { kind, vcpus, memory_mib } => {
                    let d = demand(["a", "b", "c"][kind], vcpus, memory_mib);
                    let chosen = sched.place(&d);
                    prop_assert_eq!(&chosen, &linear(&sched, &d));
                    if let Ok(id) = chosen {
                        prop_assert_eq!(sched.place_and_reserve(&d), Ok(id));
                        placed.push((id, vcpus, memory_mib));
                    }
                }
                Op::Release { nth } => {
                    if !placed.is_empty() {
                        let (id, vcpus, memory_mib) = placed.swap_remove(nth % placed.len());
                        sched.release(id, vcpus, memory_mib);
                    }
                }
                Op::SetUp { host: n, up } => {
                    let id = slot_of(n, 0, 0, 0).id;
                    prop_assert_eq!(sched.set_up(id, up), sched.host(id).is_some());
                }
                Op::Reshape { host: n, shape: shape_n, kinds: kinds_n } => {
                    let fresh = slot_of(n, shape_n, kinds_n, 0);
                    let mut slot = sched.host(fresh.id).cloned().unwrap_or(fresh.clone());
                    if sched.host(fresh.id).is_none() {
                        base.insert(fresh.id, (0, 0));
                    }
                    slot.cpus = fresh.cpus;
                    slot.memory_mib = fresh.memory_mib;
                    slot.hypervisors = fresh.hypervisors;
                    sched.upsert_host(slot);
                }
                Op::Remove { host: n } => {
                    let id = slot_of(n, 0, 0, 0).id;
                    sched.remove_host(id);
                    base.remove(&id);
                    placed.retain(|(host, _, _)| *host != id);
                }
            }
        }
        // The index's usage is the starting usage plus what is still placed.
        for h in sched.hosts() {
            let (mut vcpus, mut memory) = base.get(&h.id).copied().unwrap_or((0, 0));
            for (_, v, m) in placed.iter().filter(|(id, _, _)| *id == h.id) {
                vcpus += u64::from(*v);
                memory += m;
            }
            prop_assert_eq!((h.used_vcpus, h.used_memory_mib), (vcpus, memory));
        }
        // A last round of demands against the final state.
        for kind in ["a", "b"] {
            for (vcpus, memory_mib) in [(1, 1), (2, 2048), (8, 100), (1, 9000)] {
                let d = demand(kind, vcpus, memory_mib);
                prop_assert_eq!(sched.place(&d), linear(&sched, &d));
            }
        }
        prop_assert!(sched.len() <= 24);
    }
}

//! The host's leases and the decisions about them, without I/O: what an ask gets, which
//! leases are due, how much room the host has left.
//!
//! Room is counted from what this host has promised, not from what its VMs happen to
//! use right now: a lease is a promise for its whole term, so every VM's shape and every
//! lease in force count as taken, whether the VM is busy or idle.

use herd_proto::burst::{BurstAnswer, BurstAsk, BurstLease, BurstLimits};
use herd_proto::wire::{Capacity, VmId, VmSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How often one VM may ask, after a few at once: a guest that asks in a loop is
/// answered "too often" without the host looking at room, so its flood costs the host
/// nothing and its neighbours are answered as before.
pub const ASK_EVERY_MS: u64 = 1_000;
pub const ASKS_AT_ONCE: u64 = 3;

/// Ended leases are kept this long, and at most this many, for the server to bill:
/// one granted and ended while the server was away is reported when it is back.
pub const KEEP_ENDED_MS: u64 = 7 * 24 * 3_600_000;
pub const KEEP_ENDED: usize = 256;

/// What a VM is on this host, as the book needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub limits: BurstLimits,
}

/// CPU and memory not promised to any VM or lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub cpus: i64,
    pub memory_mib: i64,
}

/// The leases in force on this host, kept in the agent's data dir across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    pub leases: BTreeMap<VmId, BurstLease>,
    /// Leases that ended, with when (unix ms), newest last.
    #[serde(default)]
    pub ended: Vec<(VmId, BurstLease, u64)>,
    /// Each VM's asks left, in thousandths, and when that was counted (not saved: a
    /// restart forgives).
    #[serde(skip)]
    asks_left: BTreeMap<VmId, (u64, u64)>,
}

/// What deciding an ask changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub answer: BurstAnswer,
    /// The lease to apply, when granted (it replaces the VM's current one).
    pub apply: Option<BurstLease>,
}

impl Shape {
    pub fn of(spec: &VmSpec) -> Shape {
        Shape {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            limits: spec.burst,
        }
    }
}

/// The room left on a host of `capacity` running VMs of `shapes` with `leases` in force
/// (a lease of a VM not running holds nothing).
pub fn room<'a>(
    capacity: Capacity,
    shapes: &BTreeMap<VmId, Shape>,
    leases: impl IntoIterator<Item = (&'a VmId, &'a BurstLease)>,
) -> Room {
    let mib = |m: u64| i64::try_from(m).unwrap_or(i64::MAX);
    let mut room = Room {
        cpus: i64::from(capacity.cpus),
        memory_mib: mib(capacity.memory_mib),
    };
    for shape in shapes.values() {
        room.cpus -= i64::from(shape.vcpus);
        room.memory_mib -= mib(shape.memory_mib);
    }
    for (_, lease) in leases.into_iter().filter(|(vm, _)| shapes.contains_key(vm)) {
        room.cpus -= i64::from(lease.cpus);
        room.memory_mib -= mib(lease.memory_mib);
    }
    room
}

impl Book {
    /// The room left on a host of `capacity` running VMs of `shapes`, with the leases
    /// in force, leaving out `except`'s lease (an ask replaces it).
    pub fn room(
        &self,
        capacity: Capacity,
        shapes: &BTreeMap<VmId, Shape>,
        except: Option<VmId>,
    ) -> Room {
        room(
            capacity,
            shapes,
            self.leases.iter().filter(|(vm, _)| Some(**vm) != except),
        )
    }

    /// Decides `vm`'s ask at `now_ms`. A grant replaces the VM's lease (a renewal, or a
    /// new size) and is recorded here; the caller applies it and calls [`Book::undo`]
    /// if that fails.
    pub fn decide(
        &mut self,
        vm: VmId,
        ask: BurstAsk,
        capacity: Capacity,
        shapes: &BTreeMap<VmId, Shape>,
        now_ms: u64,
    ) -> Decision {
        let denied = |reason: String| Decision {
            answer: BurstAnswer::Denied { reason },
            apply: None,
        };
        if !self.take_ask(vm, now_ms) {
            return denied(format!(
                "asked too often: {ASKS_AT_ONCE} asks at once, then one every {ASK_EVERY_MS} ms"
            ));
        }
        let Some(shape) = shapes.get(&vm) else {
            return denied("the VM is not running on this host".into());
        };
        if let Err(e) = ask.check(&shape.limits) {
            return denied(e.to_string());
        }
        let room = self.room(capacity, shapes, Some(vm));
        let short_cpus = i64::from(ask.cpus) > room.cpus;
        let short_memory = i64::try_from(ask.memory_mib).unwrap_or(i64::MAX) > room.memory_mib;
        if short_cpus || short_memory {
            return denied(format!(
                "no room: asked +{} vCPUs and +{} MiB, this host has {} vCPUs and {} MiB \
                 not promised (of {} vCPUs and {} MiB)",
                ask.cpus,
                ask.memory_mib,
                room.cpus.max(0),
                room.memory_mib.max(0),
                capacity.cpus,
                capacity.memory_mib
            ));
        }
        let granted_ms = match self.leases.get(&vm) {
            // A renewal of the same size keeps its start, so a bill shows one burst.
            Some(l) if l.cpus == ask.cpus && l.memory_mib == ask.memory_mib => l.granted_ms,
            // A new size ends the old lease now and starts another.
            Some(l) => {
                let old = *l;
                self.end(vm, old, now_ms);
                now_ms
            }
            None => now_ms,
        };
        let lease = BurstLease {
            cpus: ask.cpus,
            memory_mib: ask.memory_mib,
            granted_ms,
            expires_ms: now_ms.saturating_add(u64::from(ask.seconds) * 1000),
        };
        self.leases.insert(vm, lease);
        Decision {
            answer: BurstAnswer::Granted(lease),
            apply: Some(lease),
        }
    }

    /// Takes one of `vm`'s asks, if it has one left (a bucket of [`ASKS_AT_ONCE`],
    /// refilled one every [`ASK_EVERY_MS`]).
    fn take_ask(&mut self, vm: VmId, now_ms: u64) -> bool {
        let full = ASKS_AT_ONCE * 1000;
        let (left, at) = self.asks_left.get(&vm).copied().unwrap_or((full, now_ms));
        let refilled = now_ms.saturating_sub(at).saturating_mul(1000) / ASK_EVERY_MS;
        let left = left.saturating_add(refilled).min(full);
        let taken = left >= 1000;
        self.asks_left
            .insert(vm, (if taken { left - 1000 } else { left }, now_ms));
        taken
    }

    /// Puts back `vm`'s lease as it was before a grant that could not be applied.
    pub fn undo(&mut self, vm: VmId, before: Option<BurstLease>) {
        match before {
            Some(lease) => {
                self.ended
                    .retain(|(id, l, _)| !(*id == vm && l.granted_ms == lease.granted_ms));
                self.leases.insert(vm, lease)
            }
            None => self.leases.remove(&vm),
        };
    }

    /// Ends `vm`'s lease at `now_ms` (or at its expiry, if that came first) and keeps
    /// it among the ended.
    pub fn finish(&mut self, vm: VmId, now_ms: u64) {
        if let Some(lease) = self.leases.remove(&vm) {
            self.end(vm, lease, now_ms);
        }
    }

    fn end(&mut self, vm: VmId, lease: BurstLease, now_ms: u64) {
        self.ended.push((vm, lease, now_ms.min(lease.expires_ms)));
        let oldest = now_ms.saturating_sub(KEEP_ENDED_MS);
        self.ended.retain(|(_, _, at)| *at >= oldest);
        let over = self.ended.len().saturating_sub(KEEP_ENDED);
        self.ended.drain(..over);
    }

    /// Leases that end at `now_ms`: expired, or of a VM no longer running here.
    pub fn due(&self, running: &BTreeMap<VmId, Shape>, now_ms: u64) -> Vec<VmId> {
        self.leases
            .iter()
            .filter(|(vm, lease)| lease.expires_ms <= now_ms || !running.contains_key(vm))
            .map(|(vm, _)| *vm)
            .collect()
    }

    /// When the next lease expires.
    pub fn next_expiry(&self) -> Option<u64> {
        self.leases.values().map(|l| l.expires_ms).min()
    }

    /// Forgets the ask times of VMs that are gone, so the map stays as small as the host.
    pub fn forget_gone(&mut self, running: &BTreeMap<VmId, Shape>) {
        self.asks_left.retain(|vm, _| running.contains_key(vm));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CAPACITY: Capacity = Capacity {
        cpus: 4,
        memory_mib: 4096,
    };

    fn vm(n: u8) -> VmId {
        VmId::from_bytes([n; 16])
    }

    fn shapes(list: &[(u8, u32, u64)]) -> BTreeMap<VmId, Shape> {
        list.iter()
            .map(|&(n, vcpus, memory_mib)| {
                (
                    vm(n),
                    Shape {
                        vcpus,
                        memory_mib,
                        limits: BurstLimits::default(),
                    },
                )
            })
            .collect()
    }

    fn ask(cpus: u32, memory_mib: u64, seconds: u32) -> BurstAsk {
        BurstAsk {
            cpus,
            memory_mib,
            seconds,
        }
    }

    fn granted(d: &Decision) -> BurstLease {
        match d.answer {
            BurstAnswer::Granted(lease) => lease,
            BurstAnswer::Denied { ref reason } => panic!("denied: {reason}"),
        }
    }

    fn reason(d: &Decision) -> String {
        match &d.answer {
            BurstAnswer::Denied { reason } => reason.clone(),
            BurstAnswer::Granted(_) => panic!("granted"),
        }
    }

    #[test]
    fn a_grant_comes_from_room_no_shape_or_lease_holds() {
        let running = shapes(&[(1, 1, 512), (2, 1, 512)]);
        let mut book = Book::default();
        let lease = granted(&book.decide(vm(1), ask(2, 1024, 60), CAPACITY, &running, 1_000));
        assert_eq!(lease.expires_ms, 61_000);
        assert_eq!(
            book.room(CAPACITY, &running, None),
            Room {
                cpus: 0,
                memory_mib: 2048
            }
        );
        // The other VM finds the CPUs promised, and hears the figures.
        let denied = reason(&book.decide(vm(2), ask(1, 0, 60), CAPACITY, &running, 1_000));
        assert!(
            denied.starts_with("no room: asked +1 vCPUs and +0 MiB, this host has 0 vCPUs"),
            "{denied}"
        );
        assert!(book
            .decide(vm(2), ask(0, 1024, 60), CAPACITY, &running, 3_000)
            .apply
            .is_some());
    }

    #[test]
    fn a_renewal_replaces_the_lease_and_keeps_its_start() {
        let running = shapes(&[(1, 2, 512)]);
        let mut book = Book::default();
        granted(&book.decide(vm(1), ask(2, 0, 60), CAPACITY, &running, 0));
        // Its own lease is not counted against it.
        let renewed = granted(&book.decide(vm(1), ask(2, 0, 120), CAPACITY, &running, 30_000));
        assert_eq!((renewed.granted_ms, renewed.expires_ms), (0, 150_000));
        let resized = granted(&book.decide(vm(1), ask(1, 0, 10), CAPACITY, &running, 40_000));
        assert_eq!(resized.granted_ms, 40_000);
        assert_eq!(book.leases.len(), 1);
    }

    #[test]
    fn bad_and_hurried_asks_grant_nothing() {
        let running = shapes(&[(1, 1, 512)]);
        let mut book = Book::default();
        assert!(
            reason(&book.decide(vm(1), ask(9, 0, 60), CAPACITY, &running, 0))
                .contains("past what this VM's project allows")
        );
        assert!(
            reason(&book.decide(vm(1), ask(1, 0, 0), CAPACITY, &running, 10))
                .contains("at least one second")
        );
        assert!(
            reason(&book.decide(vm(1), ask(0, 0, 10), CAPACITY, &running, 20)).contains("neither")
        );
        // Three at once, then one a second.
        assert!(
            reason(&book.decide(vm(1), ask(1, 0, 60), CAPACITY, &running, 500))
                .starts_with("asked too often")
        );
        assert!(
            reason(&book.decide(vm(1), ask(1, 0, 0), CAPACITY, &running, 1_500))
                .contains("at least one second")
        );
        assert!(
            reason(&book.decide(vm(1), ask(1, 0, 0), CAPACITY, &running, 1_600))
                .starts_with("asked too often")
        );
        assert!(
            reason(&book.decide(vm(3), ask(1, 0, 5), CAPACITY, &running, 2_000))
                .contains("not running")
        );
        assert!(book.leases.is_empty());
    }

    #[test]
    fn a_flooding_vm_is_held_back_and_its_neighbour_is_not() {
        let running = shapes(&[(1, 1, 512), (2, 1, 512)]);
        let mut book = Book::default();
        let answered = (0..100u64)
            .filter(|i| {
                book.decide(vm(1), ask(0, 0, 10), CAPACITY, &running, i * 10)
                    .answer
                    != BurstAnswer::Denied {
                        reason: format!(
                            "asked too often: {ASKS_AT_ONCE} asks at once, then one every \
                             {ASK_EVERY_MS} ms"
                        ),
                    }
            })
            .count();
        assert_eq!(
            answered, 3,
            "a burst of three, then nothing within the second"
        );
        assert!(book
            .decide(vm(2), ask(1, 0, 10), CAPACITY, &running, 990)
            .apply
            .is_some());
    }

    #[test]
    fn a_lease_is_due_at_expiry_or_when_its_vm_is_gone() {
        let running = shapes(&[(1, 1, 0), (2, 1, 0)]);
        let mut book = Book::default();
        granted(&book.decide(vm(1), ask(1, 0, 10), CAPACITY, &running, 0));
        granted(&book.decide(vm(2), ask(1, 0, 20), CAPACITY, &running, 0));
        assert_eq!(book.next_expiry(), Some(10_000));
        assert!(book.due(&running, 9_999).is_empty());
        assert_eq!(book.due(&running, 10_000), vec![vm(1)]);
        let only_two = shapes(&[(2, 1, 0)]);
        assert_eq!(book.due(&only_two, 0), vec![vm(1)]);
        book.finish(vm(1), 12_000);
        assert_eq!(book.next_expiry(), Some(20_000));
        // Kept for the bill, ended at its expiry (the check came late).
        let (id, lease, ended) = book.ended[0];
        assert_eq!((id, lease.granted_ms, ended), (vm(1), 0, 10_000));
        // A new size ends the lease in force now and starts another.
        granted(&book.decide(vm(2), ask(2, 0, 20), CAPACITY, &running, 5_000));
        assert_eq!(book.ended[1].2, 5_000);
        assert_eq!(book.leases[&vm(2)].granted_ms, 5_000);
    }

    proptest! {
        /// Whatever is asked, in whatever order, the leases in force never promise more
        /// than the host has left after its VMs' shapes.
        #[test]
        fn leases_never_promise_more_than_the_host_has(
            asks in proptest::collection::vec((1u8..5, 0u32..4, 0u64..3000, 0u32..100), 1..40)
        ) {
            let running = shapes(&[(1, 1, 512), (2, 1, 512), (3, 0, 0), (4, 1, 1024)]);
            let mut book = Book::default();
            let mut now = 0;
            for (n, cpus, memory_mib, seconds) in asks {
                now += 700;
                let due = book.due(&running, now);
                for vm in due {
                    book.undo(vm, None);
                }
                book.decide(vm(n), ask(cpus, memory_mib, seconds), CAPACITY, &running, now);
                let room = book.room(CAPACITY, &running, None);
                prop_assert!(room.cpus >= 0 && room.memory_mib >= 0, "{room:?}");
            }
        }
    }
}

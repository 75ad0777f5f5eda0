//! The scheduler as an incremental index: the same filter and weigh as [`crate::place`],
//! without looking at every host.
//!
//! # Why a sorted order of hosts is not enough
//!
//! A host with vCPU limit `Lv` and memory limit `Lm` (after overcommit), `Fv` vCPUs and
//! `Fm` MiB free, scores `min(sv, sm)` for a demand of `dv` vCPUs and `dm` MiB, where
//! `sv = (Fv - dv) / Lv` and `sm = (Fm - dm) / Lm`; it fits when both are at least 0.
//! Which of the two is the minimum depends on the demand, and so does the order of the
//! hosts by score: no single order of hosts kept ahead of time is the score order for
//! every demand, and walking one until a host fits has no useful bound.
//!
//! # What the index keeps instead
//!
//! Hosts are grouped by hypervisor type, then by *shape* `(Lv, Lm)`. Within one shape,
//! `sv <= sm` exactly when `k <= delta`, where `k = Fv*Lm - Fm*Lv` depends only on the
//! host and `delta = dv*Lm - dm*Lv` only on the demand. So for any demand a shape splits
//! into the hosts scored by their vCPUs (`k <= delta`), among which the score order *is*
//! the `Fv` order, and those scored by their memory (`k >= delta`), ordered by `Fm`.
//! Each shape keeps its up hosts in two trees, one ordered by `(Fv, id)` and one by
//! `(Fm, id)`, whose subtrees know their least and greatest `k` (`tree.rs`); the best
//! host of each part is then the first host in tree order whose `k` is on the right side
//! of `delta`, found in one descent:
//! - spread: the order is by free capacity descending, and the first such host is the
//!   best of its part. In the vCPU part `sv <= sm`, so `sv >= 0` means both fit: if that
//!   host does not fit, nothing in its part does.
//! - binpack: the order is ascending and the search starts at `Fv >= dv` (or `Fm >= dm`),
//!   so the first such host fits and has the least score of its part.
//!
//! Ties within a part go to the lower id by the tree order; the parts' and the shapes'
//! winners are compared exactly (fractions, cross-multiplied), so the choice is the
//! reference's, tie-break included. `tests::agrees_with_linear_place` checks this over
//! random hosts, demands and reserve/release/up/down/upsert/remove sequences.
//!
//! # Shapes with few hosts
//!
//! A tree per shape pays off only when the shape has many hosts. A shape gets its trees
//! once it has [`PROMOTE_AT`] up hosts of the type; until then its hosts sit in one flat
//! list per type, checked one by one with the reference filter (about 20 ns a host on
//! the bench machine: no strings, no hash lookups). So are hosts the trees cannot hold:
//! a zero limit, or numbers too large for the trees' `i64` arithmetic (a limit over
//! 2^30, a billion vCPUs or a PiB of memory, or usage over 2^31).
//!
//! # Cost
//!
//! A placement costs O(B log n + m) for the B shapes with trees and the m hosts in the
//! flat list of the demanded type; a reserve or release O(h log n) for the h types of the
//! host. A fleet bought as a few server models has a few shapes and an empty flat list.
//! If every host has its own shape (memory sizes that differ by a few MiB, say) all
//! hosts are in the flat list and a placement is a linear pass again, though about three
//! times cheaper than [`crate::place`]. The bench measures both cases.

mod group;
mod load;
mod shape;
#[cfg(test)]
mod tests;

use crate::{better, Demand, HostSlot, NoFit, SchedPolicy, Score, Short, Strategy};
use group::{Group, Index};
use load::Entry;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// Up hosts of one type and shape from which that shape gets its own trees.
pub(crate) const PROMOTE_AT: usize = 32;

fn pick(
    strategy: Strategy,
    candidates: impl Iterator<Item = (Score, Uuid)>,
) -> Option<(Score, Uuid)> {
    candidates.fold(None, |best, candidate| match best {
        Some(best) if !better(strategy, candidate, best) => Some(best),
        _ => Some(candidate),
    })
}

/// The hosts, their capacity accounting, and an index that places a VM without looking
/// at every host. Makes the same choice as [`crate::place`] over [`Scheduler::hosts`].
#[derive(Debug, Clone)]
pub struct Scheduler {
    policy: SchedPolicy,
    hosts: HashMap<Uuid, Entry>,
    index: Index,
    /// How many hosts, up or down, offer each hypervisor type.
    offered: BTreeMap<String, usize>,
}

impl Scheduler {
    pub fn new(policy: SchedPolicy) -> Scheduler {
        Scheduler::with_promote_at(policy, PROMOTE_AT)
    }

    /// Like `new`, with another threshold for giving a shape its trees (tests use 1, to
    /// put every host in a tree).
    fn with_promote_at(policy: SchedPolicy, promote_at: usize) -> Scheduler {
        Scheduler {
            policy,
            hosts: HashMap::new(),
            index: Index {
                strategy: policy.strategy,
                promote_at: promote_at.max(1),
                groups: HashMap::new(),
                n_up: 0,
                n_down: 0,
            },
            offered: BTreeMap::new(),
        }
    }

    pub fn policy(&self) -> &SchedPolicy {
        &self.policy
    }

    /// Changes overcommit or strategy; rebuilds the index (O(n log n)).
    pub fn set_policy(&mut self, policy: SchedPolicy) {
        let slots: Vec<HostSlot> = self.hosts.drain().map(|(_, entry)| entry.slot).collect();
        *self = Scheduler::with_promote_at(policy, self.index.promote_at);
        for slot in slots {
            self.upsert_host(slot);
        }
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The host as the scheduler sees it, usage included.
    pub fn host(&self, id: Uuid) -> Option<&HostSlot> {
        self.hosts.get(&id).map(|entry| &entry.slot)
    }

    /// Every host, in no particular order.
    pub fn hosts(&self) -> impl Iterator<Item = &HostSlot> + '_ {
        self.hosts.values().map(|entry| &entry.slot)
    }

    /// Adds a host or replaces everything about it, `used_*` included. To change a
    /// known host's capacity but keep its usage, start from [`Scheduler::host`].
    pub fn upsert_host(&mut self, slot: HostSlot) {
        if let Some(old) = self.hosts.remove(&slot.id) {
            self.index.detach(&old);
            self.withdraw(&old.kinds);
        }
        let entry = Entry::new(slot, &self.policy);
        self.index.attach(&entry);
        for kind in &entry.kinds {
            *self.offered.entry(kind.clone()).or_insert(0) += 1;
        }
        self.hosts.insert(entry.slot.id, entry);
    }

    pub fn remove_host(&mut self, id: Uuid) -> Option<HostSlot> {
        let entry = self.hosts.remove(&id)?;
        self.index.detach(&entry);
        self.withdraw(&entry.kinds);
        Some(entry.slot)
    }

    fn withdraw(&mut self, kinds: &[String]) {
        for kind in kinds {
            if let Some(n) = self.offered.get_mut(kind) {
                *n -= 1;
                if *n == 0 {
                    self.offered.remove(kind);
                }
            }
        }
    }

    /// The hypervisor types some known host offers, up or down, in order: what a VM
    /// may ask for. A type no host has a driver for would wait forever.
    pub fn hypervisors(&self) -> impl Iterator<Item = &str> + '_ {
        self.offered.keys().map(String::as_str)
    }

    /// Whether some known host, up or down, offers the hypervisor type.
    pub fn offers(&self, hypervisor: &str) -> bool {
        self.offered.contains_key(hypervisor)
    }

    /// Changes one host; returns false if the host is unknown.
    fn update(&mut self, id: Uuid, change: impl FnOnce(&mut HostSlot)) -> bool {
        let Some(entry) = self.hosts.get_mut(&id) else {
            return false;
        };
        self.index.detach(entry);
        change(&mut entry.slot);
        self.index.attach(entry);
        true
    }

    /// Marks a host up or down (a down host is never chosen but keeps its usage).
    /// Returns false if the host is unknown.
    pub fn set_up(&mut self, id: Uuid, up: bool) -> bool {
        self.update(id, |slot| slot.up = up)
    }

    /// Counts a VM's vCPUs and memory against a host, even past its limits (a host
    /// that came back smaller still carries its VMs). Returns false if the host is
    /// unknown, in which case nothing is counted.
    pub fn reserve(&mut self, id: Uuid, vcpus: u32, memory_mib: u64) -> bool {
        self.update(id, |slot| {
            slot.used_vcpus = slot.used_vcpus.saturating_add(u64::from(vcpus));
            slot.used_memory_mib = slot.used_memory_mib.saturating_add(memory_mib);
        })
    }

    /// Gives back what [`Scheduler::reserve`] counted, never going below zero.
    /// Returns false if the host is unknown.
    pub fn release(&mut self, id: Uuid, vcpus: u32, memory_mib: u64) -> bool {
        self.update(id, |slot| {
            slot.used_vcpus = slot.used_vcpus.saturating_sub(u64::from(vcpus));
            slot.used_memory_mib = slot.used_memory_mib.saturating_sub(memory_mib);
        })
    }

    /// Chooses a host for the demand; counts nothing.
    pub fn place(&self, demand: &Demand) -> Result<Uuid, NoFit> {
        let strategy = self.policy.strategy;
        let Some(group) = self.index.groups.get(&demand.hypervisor) else {
            return Err(self.no_fit(None, demand));
        };
        let from_trees = group
            .shapes
            .values()
            .filter_map(|shape| shape.best(demand, strategy));
        let from_flat = group
            .flat
            .iter()
            .filter_map(|load| load.fit(demand).ok().map(|score| (score, load.id)));
        match pick(strategy, from_trees.chain(from_flat)) {
            Some((_, id)) => Ok(id),
            None => Err(self.no_fit(Some(group), demand)),
        }
    }

    /// Chooses a host for the demand and counts the demand against it.
    pub fn place_and_reserve(&mut self, demand: &Demand) -> Result<Uuid, NoFit> {
        let id = self.place(demand)?;
        self.reserve(id, demand.vcpus, demand.memory_mib);
        Ok(id)
    }

    /// The reasons nothing fits, counted as [`crate::place`] counts them: every up host
    /// with the type is short of vCPUs or, failing that, of memory.
    fn no_fit(&self, group: Option<&Group>, demand: &Demand) -> NoFit {
        let strategy = self.policy.strategy;
        let n_up_with_kind = group.map_or(0, |group| group.n_up);
        let n_short_of_cpu = group.map_or(0, |group| {
            let in_trees: usize = group
                .shapes
                .values()
                .map(|shape| shape.n_short_of_cpu(demand, strategy))
                .sum();
            let in_flat = group
                .flat
                .iter()
                .filter(|load| matches!(load.fit(demand), Err(Short::OfCpu)))
                .count();
            in_trees + in_flat
        });
        NoFit {
            n_hosts: self.hosts.len(),
            n_down: self.index.n_down,
            n_wrong_hypervisor: self.index.n_up - n_up_with_kind,
            n_short_of_cpu,
            n_short_of_memory: n_up_with_kind - n_short_of_cpu,
        }
    }
}

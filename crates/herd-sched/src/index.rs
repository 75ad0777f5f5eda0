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

use crate::tree::{Tree, Want};
use crate::{better, fit_score, Demand, HostSlot, NoFit, SchedPolicy, Score, Short, Strategy};
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// Up hosts of one type and shape from which that shape gets its own trees.
pub(crate) const PROMOTE_AT: usize = 32;

/// Limits above this keep a host out of the trees, so that `free * limit` fits in i64.
const TREE_MAX_LIMIT: u64 = 1 << 30;
/// Usage above this keeps a host out of the trees (free capacity stays within 2^31).
const TREE_MAX_USED: u64 = 1 << 31;

/// What the filter and the weigh need of a host, without its strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Load {
    id: Uuid,
    vcpu_limit: u64,
    memory_limit_mib: u64,
    used_vcpus: u64,
    used_memory_mib: u64,
}

impl Load {
    fn shape(&self) -> (u64, u64) {
        (self.vcpu_limit, self.memory_limit_mib)
    }

    /// Whether the trees can hold the host.
    fn fits_trees(&self) -> bool {
        (1..=TREE_MAX_LIMIT).contains(&self.vcpu_limit)
            && (1..=TREE_MAX_LIMIT).contains(&self.memory_limit_mib)
            && self.used_vcpus <= TREE_MAX_USED
            && self.used_memory_mib <= TREE_MAX_USED
    }

    /// Free capacity; only called when `fits_trees`, so the casts are exact.
    fn free_vcpus(&self) -> i64 {
        self.vcpu_limit as i64 - self.used_vcpus as i64
    }

    fn free_memory_mib(&self) -> i64 {
        self.memory_limit_mib as i64 - self.used_memory_mib as i64
    }

    fn fit(&self, demand: &Demand) -> Result<Score, Short> {
        fit_score(
            self.vcpu_limit,
            self.memory_limit_mib,
            self.used_vcpus,
            self.used_memory_mib,
            demand,
        )
    }
}

/// A host as the scheduler holds it: its slot plus what the index derives from it.
#[derive(Debug, Clone)]
struct Entry {
    slot: HostSlot,
    vcpu_limit: u64,
    memory_limit_mib: u64,
    /// The slot's hypervisor types without duplicates.
    kinds: Vec<String>,
}

impl Entry {
    fn new(slot: HostSlot, policy: &SchedPolicy) -> Entry {
        let mut kinds = slot.hypervisors.clone();
        kinds.sort();
        kinds.dedup();
        Entry {
            vcpu_limit: policy.vcpu_limit(&slot),
            memory_limit_mib: policy.memory_limit_mib(&slot),
            slot,
            kinds,
        }
    }

    fn load(&self) -> Load {
        Load {
            id: self.slot.id,
            vcpu_limit: self.vcpu_limit,
            memory_limit_mib: self.memory_limit_mib,
            used_vcpus: self.slot.used_vcpus,
            used_memory_mib: self.slot.used_memory_mib,
        }
    }
}

/// The up hosts of one hypervisor type with one shape, in two trees.
#[derive(Debug, Clone)]
struct Shape {
    vcpu_limit: i64,
    memory_limit_mib: i64,
    /// Ordered by free vCPUs (descending for spread, ascending for binpack), then id.
    by_vcpus: Tree,
    /// Ordered by free memory, likewise.
    by_memory: Tree,
}

impl Shape {
    /// Only for shapes whose limits are within `TREE_MAX_LIMIT`.
    fn new((vcpu_limit, memory_limit_mib): (u64, u64)) -> Shape {
        Shape {
            vcpu_limit: vcpu_limit as i64,
            memory_limit_mib: memory_limit_mib as i64,
            by_vcpus: Tree::new(),
            by_memory: Tree::new(),
        }
    }

    /// Which resource scores the host: `k <= delta` means vCPUs, `k >= delta` memory.
    /// Each product is below 2^61 in magnitude.
    fn k(&self, load: &Load) -> i64 {
        load.free_vcpus() * self.memory_limit_mib - load.free_memory_mib() * self.vcpu_limit
    }

    /// Clamped into i64: every `k` is well inside, so comparisons are unchanged.
    fn delta(&self, demand: &Demand) -> i64 {
        let delta = i128::from(demand.vcpus) * i128::from(self.memory_limit_mib)
            - i128::from(demand.memory_mib) * i128::from(self.vcpu_limit);
        delta.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }

    fn insert(&mut self, load: &Load, strategy: Strategy) {
        let k = self.k(load);
        let id = load.id.as_u128();
        self.by_vcpus
            .insert(tree_key(strategy, load.free_vcpus()), id, k);
        self.by_memory
            .insert(tree_key(strategy, load.free_memory_mib()), id, k);
    }

    fn remove(&mut self, load: &Load, strategy: Strategy) {
        let id = load.id.as_u128();
        self.by_vcpus
            .remove(tree_key(strategy, load.free_vcpus()), id);
        self.by_memory
            .remove(tree_key(strategy, load.free_memory_mib()), id);
    }

    /// The best host of this shape for the demand, if any fits.
    fn best(&self, demand: &Demand, strategy: Strategy) -> Option<(Score, Uuid)> {
        let delta = self.delta(demand);
        let need_vcpus = i64::from(demand.vcpus);
        let need_memory = i64::try_from(demand.memory_mib).unwrap_or(i64::MAX);
        let (by_vcpus, by_memory) = match strategy {
            Strategy::Spread => (
                self.by_vcpus.first(None, Want::AtMost(delta)),
                self.by_memory.first(None, Want::AtLeast(delta)),
            ),
            Strategy::Binpack => (
                self.by_vcpus.first(Some(need_vcpus), Want::AtMost(delta)),
                self.by_memory
                    .first(Some(need_memory), Want::AtLeast(delta)),
            ),
        };
        let scored = |found: Option<(i64, u128)>, need: u64, limit: i64| {
            let (key, id) = found?;
            let free = tree_key(strategy, key);
            // In its part the host's score is this resource's: fitting here is fitting.
            let left = u128::try_from(i128::from(free) - i128::from(need)).ok()?;
            let limit = u128::try_from(limit).ok()?;
            Some((Score::new(left, limit), Uuid::from_u128(id)))
        };
        let candidates = [
            scored(by_vcpus, u64::from(demand.vcpus), self.vcpu_limit),
            scored(by_memory, demand.memory_mib, self.memory_limit_mib),
        ];
        pick(strategy, candidates.into_iter().flatten())
    }

    /// How many hosts of this shape have fewer free vCPUs than the demand.
    fn n_short_of_cpu(&self, demand: &Demand, strategy: Strategy) -> usize {
        let need = i64::from(demand.vcpus);
        match strategy {
            // Keys are `-free`: free < need is key > -need.
            Strategy::Spread => self.by_vcpus.len() - self.by_vcpus.count_below(-need, true),
            Strategy::Binpack => self.by_vcpus.count_below(need, false),
        }
    }
}

/// The tree key for an amount of free capacity, and back: trees are searched in
/// ascending order, and spread wants the most free first.
fn tree_key(strategy: Strategy, free: i64) -> i64 {
    match strategy {
        Strategy::Spread => -free,
        Strategy::Binpack => free,
    }
}

fn pick(
    strategy: Strategy,
    candidates: impl Iterator<Item = (Score, Uuid)>,
) -> Option<(Score, Uuid)> {
    candidates.fold(None, |best, candidate| match best {
        Some(best) if !better(strategy, candidate, best) => Some(best),
        _ => Some(candidate),
    })
}

/// The up hosts that offer one hypervisor type.
#[derive(Debug, Clone, Default)]
struct Group {
    n_up: usize,
    /// Shapes with their own trees.
    shapes: BTreeMap<(u64, u64), Shape>,
    /// Hosts not in any tree, checked one by one.
    flat: Vec<Load>,
    /// Where each host of `flat` is.
    flat_position: HashMap<Uuid, usize>,
    /// How many hosts of `flat` each shape without trees has (hosts the trees could hold).
    flat_shapes: HashMap<(u64, u64), usize>,
}

impl Group {
    fn attach(&mut self, load: Load, strategy: Strategy, promote_at: usize) {
        self.n_up += 1;
        if load.fits_trees() {
            if let Some(shape) = self.shapes.get_mut(&load.shape()) {
                shape.insert(&load, strategy);
                return;
            }
            let count = self.flat_shapes.entry(load.shape()).or_insert(0);
            *count += 1;
            if *count >= promote_at {
                self.promote(load, strategy);
                return;
            }
        }
        self.flat_position.insert(load.id, self.flat.len());
        self.flat.push(load);
    }

    /// Gives a shape its trees, moving its hosts (and the new one) out of the flat list.
    fn promote(&mut self, load: Load, strategy: Strategy) {
        let key = load.shape();
        self.flat_shapes.remove(&key);
        let mut shape = Shape::new(key);
        shape.insert(&load, strategy);
        self.flat.retain(|other| {
            let moves = other.shape() == key && other.fits_trees();
            if moves {
                shape.insert(other, strategy);
            }
            !moves
        });
        self.flat_position = self
            .flat
            .iter()
            .enumerate()
            .map(|(position, other)| (other.id, position))
            .collect();
        self.shapes.insert(key, shape);
    }

    fn detach(&mut self, load: Load, strategy: Strategy) {
        self.n_up -= 1;
        if load.fits_trees() {
            if let Some(shape) = self.shapes.get_mut(&load.shape()) {
                shape.remove(&load, strategy);
                if shape.by_vcpus.is_empty() {
                    self.shapes.remove(&load.shape());
                }
                return;
            }
            if let Some(count) = self.flat_shapes.get_mut(&load.shape()) {
                *count -= 1;
                if *count == 0 {
                    self.flat_shapes.remove(&load.shape());
                }
            }
        }
        if let Some(position) = self.flat_position.remove(&load.id) {
            self.flat.swap_remove(position);
            if let Some(moved) = self.flat.get(position) {
                self.flat_position.insert(moved.id, position);
            }
        }
    }
}

/// Everything derived from the hosts, kept apart from them so both can be borrowed.
#[derive(Debug, Clone)]
struct Index {
    strategy: Strategy,
    promote_at: usize,
    groups: HashMap<String, Group>,
    n_up: usize,
    n_down: usize,
}

impl Index {
    fn attach(&mut self, entry: &Entry) {
        if !entry.slot.up {
            self.n_down += 1;
            return;
        }
        self.n_up += 1;
        for kind in &entry.kinds {
            match self.groups.get_mut(kind) {
                Some(group) => group.attach(entry.load(), self.strategy, self.promote_at),
                None => {
                    let mut group = Group::default();
                    group.attach(entry.load(), self.strategy, self.promote_at);
                    self.groups.insert(kind.clone(), group);
                }
            }
        }
    }

    fn detach(&mut self, entry: &Entry) {
        if !entry.slot.up {
            self.n_down -= 1;
            return;
        }
        self.n_up -= 1;
        for kind in &entry.kinds {
            if let Some(group) = self.groups.get_mut(kind) {
                group.detach(entry.load(), self.strategy);
                if group.n_up == 0 {
                    self.groups.remove(kind);
                }
            }
        }
    }
}

/// The hosts, their capacity accounting, and an index that places a VM without looking
/// at every host. Makes the same choice as [`crate::place`] over [`Scheduler::hosts`].
#[derive(Debug, Clone)]
pub struct Scheduler {
    policy: SchedPolicy,
    hosts: HashMap<Uuid, Entry>,
    index: Index,
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
        }
        let entry = Entry::new(slot, &self.policy);
        self.index.attach(&entry);
        self.hosts.insert(entry.slot.id, entry);
    }

    pub fn remove_host(&mut self, id: Uuid) -> Option<HostSlot> {
        let entry = self.hosts.remove(&id)?;
        self.index.detach(&entry);
        Some(entry.slot)
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

#[cfg(test)]
mod tests {
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
}

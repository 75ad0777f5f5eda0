//! Within one shape the best host for any demand is found in one descent of an ordered
//! tree (the parent module says why that is exact); this is where the shape's two trees
//! are kept and searched.

use super::load::Load;
use super::pick;
use crate::tree::{Tree, Want};
use crate::{Demand, Score, Strategy};
use uuid::Uuid;

/// The up hosts of one hypervisor type with one shape, in two trees.
#[derive(Debug, Clone)]
pub(super) struct Shape {
    vcpu_limit: i64,
    memory_limit_mib: i64,
    /// Ordered by free vCPUs (descending for spread, ascending for binpack), then id.
    pub(super) by_vcpus: Tree,
    /// Ordered by free memory, likewise.
    by_memory: Tree,
}

impl Shape {
    /// Only for shapes whose limits are within `TREE_MAX_LIMIT`.
    pub(super) fn new((vcpu_limit, memory_limit_mib): (u64, u64)) -> Shape {
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

    pub(super) fn insert(&mut self, load: &Load, strategy: Strategy) {
        let k = self.k(load);
        let id = load.id.as_u128();
        self.by_vcpus
            .insert(tree_key(strategy, load.free_vcpus()), id, k);
        self.by_memory
            .insert(tree_key(strategy, load.free_memory_mib()), id, k);
    }

    pub(super) fn remove(&mut self, load: &Load, strategy: Strategy) {
        let id = load.id.as_u128();
        self.by_vcpus
            .remove(tree_key(strategy, load.free_vcpus()), id);
        self.by_memory
            .remove(tree_key(strategy, load.free_memory_mib()), id);
    }

    /// The best host of this shape for the demand, if any fits.
    pub(super) fn best(&self, demand: &Demand, strategy: Strategy) -> Option<(Score, Uuid)> {
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
    pub(super) fn n_short_of_cpu(&self, demand: &Demand, strategy: Strategy) -> usize {
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

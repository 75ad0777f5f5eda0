//! A demand names one hypervisor type and a shape's trees pay off only once it has many
//! hosts, so hosts are kept per type, and this is where each one is put in a shape's
//! trees or in the type's flat list, and moved between them.

use super::load::{Entry, Load};
use super::shape::Shape;
use crate::Strategy;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// The up hosts that offer one hypervisor type.
#[derive(Debug, Clone, Default)]
pub(super) struct Group {
    pub(super) n_up: usize,
    /// Shapes with their own trees.
    pub(super) shapes: BTreeMap<(u64, u64), Shape>,
    /// Hosts not in any tree, checked one by one.
    pub(super) flat: Vec<Load>,
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
pub(super) struct Index {
    pub(super) strategy: Strategy,
    pub(super) promote_at: usize,
    pub(super) groups: HashMap<String, Group>,
    pub(super) n_up: usize,
    pub(super) n_down: usize,
}

impl Index {
    pub(super) fn attach(&mut self, entry: &Entry) {
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

    pub(super) fn detach(&mut self, entry: &Entry) {
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

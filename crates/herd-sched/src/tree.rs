//! An ordered set of hosts with a subtree aggregate, for the index in `index/`.
//!
//! A treap in an arena: entries are ordered by `(key, id)` and each carries a second
//! number `k`; every subtree knows its size and the least and greatest `k` in it. That
//! answers "the first entry at or after `key` whose `k` is at most (or at least) `x`"
//! and "how many entries lie below `key`" in time proportional to the tree's depth,
//! which the random priorities keep logarithmic in expectation. `std`'s `BTreeMap`
//! cannot carry subtree aggregates, hence this small tree.

/// "No node", in place of a child index.
const NIL: u32 = u32::MAX;

/// 64 bytes, one cache line: the trees are walked far more often than changed.
#[derive(Debug, Clone)]
struct Node {
    key: i64,
    id: u128,
    k: i64,
    priority: u32,
    left: u32,
    right: u32,
    size: u32,
    min_k: i64,
    max_k: i64,
}

/// Which entries a search wants, by their `k`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Want {
    AtMost(i64),
    AtLeast(i64),
}

impl Want {
    fn admits(self, k: i64) -> bool {
        match self {
            Want::AtMost(limit) => k <= limit,
            Want::AtLeast(limit) => k >= limit,
        }
    }

    fn admits_some(self, node: &Node) -> bool {
        match self {
            Want::AtMost(limit) => node.min_k <= limit,
            Want::AtLeast(limit) => node.max_k >= limit,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Tree {
    nodes: Vec<Node>,
    /// Arena slots of removed nodes, reused first.
    free: Vec<u32>,
    root: u32,
}

/// A well-mixed priority from an id, so that the tree's shape does not depend on the
/// order hosts arrive in (test ids are sequential; real ones are random anyway).
fn priority_of(id: u128) -> u32 {
    let mut x = (id as u64) ^ ((id >> 64) as u64).rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((x ^ (x >> 31)) >> 32) as u32
}

impl Tree {
    pub(crate) fn new() -> Tree {
        Tree {
            nodes: Vec::new(),
            free: Vec::new(),
            root: NIL,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.size(self.root) as usize
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.root == NIL
    }

    fn size(&self, node: u32) -> u32 {
        if node == NIL {
            0
        } else {
            self.nodes[node as usize].size
        }
    }

    fn node(&self, node: u32) -> &Node {
        &self.nodes[node as usize]
    }

    /// Recomputes a node's aggregates from its children.
    fn pull(&mut self, node: u32) {
        let (left, right) = {
            let n = self.node(node);
            (n.left, n.right)
        };
        let mut size = 1;
        let mut min_k = self.node(node).k;
        let mut max_k = min_k;
        for child in [left, right] {
            if child != NIL {
                let c = self.node(child);
                size += c.size;
                min_k = min_k.min(c.min_k);
                max_k = max_k.max(c.max_k);
            }
        }
        let n = &mut self.nodes[node as usize];
        n.size = size;
        n.min_k = min_k;
        n.max_k = max_k;
    }

    /// Splits `node` into the entries before `(key, id)` and the rest.
    fn split(&mut self, node: u32, key: i64, id: u128) -> (u32, u32) {
        if node == NIL {
            return (NIL, NIL);
        }
        let n = self.node(node);
        if (n.key, n.id) < (key, id) {
            let (lower, upper) = self.split(n.right, key, id);
            self.nodes[node as usize].right = lower;
            self.pull(node);
            (node, upper)
        } else {
            let (lower, upper) = self.split(n.left, key, id);
            self.nodes[node as usize].left = upper;
            self.pull(node);
            (lower, node)
        }
    }

    /// Joins two trees where every entry of `lower` comes before every entry of `upper`.
    fn merge(&mut self, lower: u32, upper: u32) -> u32 {
        if lower == NIL {
            return upper;
        }
        if upper == NIL {
            return lower;
        }
        if self.node(lower).priority >= self.node(upper).priority {
            let right = self.node(lower).right;
            let merged = self.merge(right, upper);
            self.nodes[lower as usize].right = merged;
            self.pull(lower);
            lower
        } else {
            let left = self.node(upper).left;
            let merged = self.merge(lower, left);
            self.nodes[upper as usize].left = merged;
            self.pull(upper);
            upper
        }
    }

    /// Adds an entry; `(key, id)` must not be present already.
    pub(crate) fn insert(&mut self, key: i64, id: u128, k: i64) {
        let node = Node {
            key,
            id,
            k,
            priority: priority_of(id),
            left: NIL,
            right: NIL,
            size: 1,
            min_k: k,
            max_k: k,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.nodes[slot as usize] = node;
                slot
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        let (lower, upper) = self.split(self.root, key, id);
        let lower = self.merge(lower, slot);
        self.root = self.merge(lower, upper);
    }

    /// Removes the entry `(key, id)`; returns whether it was there.
    pub(crate) fn remove(&mut self, key: i64, id: u128) -> bool {
        let (root, removed) = self.remove_from(self.root, key, id);
        self.root = root;
        removed
    }

    fn remove_from(&mut self, node: u32, key: i64, id: u128) -> (u32, bool) {
        if node == NIL {
            return (NIL, false);
        }
        let n = self.node(node);
        let (left, right) = (n.left, n.right);
        match (key, id).cmp(&(n.key, n.id)) {
            std::cmp::Ordering::Equal => {
                self.free.push(node);
                (self.merge(left, right), true)
            }
            std::cmp::Ordering::Less => {
                let (child, removed) = self.remove_from(left, key, id);
                self.nodes[node as usize].left = child;
                self.pull(node);
                (node, removed)
            }
            std::cmp::Ordering::Greater => {
                let (child, removed) = self.remove_from(right, key, id);
                self.nodes[node as usize].right = child;
                self.pull(node);
                (node, removed)
            }
        }
    }

    /// The first entry in `(key, id)` order with `key >= from` (any key when `from` is
    /// `None`) whose `k` `want` admits; returns its `(key, id)`.
    pub(crate) fn first(&self, from: Option<i64>, want: Want) -> Option<(i64, u128)> {
        let found = match from {
            None => self.first_in(self.root, want),
            Some(from) => self.first_from(self.root, from, want),
        };
        found.map(|node| {
            let n = self.node(node);
            (n.key, n.id)
        })
    }

    fn first_from(&self, node: u32, from: i64, want: Want) -> Option<u32> {
        if node == NIL || !want.admits_some(self.node(node)) {
            return None;
        }
        let n = self.node(node);
        if n.key < from {
            return self.first_from(n.right, from, want);
        }
        // This node is at or after `from`, so its whole right subtree is too.
        if let Some(found) = self.first_from(n.left, from, want) {
            return Some(found);
        }
        if want.admits(n.k) {
            return Some(node);
        }
        self.first_in(n.right, want)
    }

    /// The first entry of a subtree that `want` admits, guided by the aggregates.
    fn first_in(&self, mut node: u32, want: Want) -> Option<u32> {
        if node == NIL || !want.admits_some(self.node(node)) {
            return None;
        }
        loop {
            let n = self.node(node);
            if n.left != NIL && want.admits_some(self.node(n.left)) {
                node = n.left;
            } else if want.admits(n.k) {
                return Some(node);
            } else {
                // The aggregate said some entry here qualifies and it is not on the
                // left nor this node, so it is on the right.
                node = n.right;
                if node == NIL {
                    return None;
                }
            }
        }
    }

    /// How many entries have a key below `key` (`or_equal`: at most `key`).
    pub(crate) fn count_below(&self, key: i64, or_equal: bool) -> usize {
        let mut count = 0;
        let mut node = self.root;
        while node != NIL {
            let n = self.node(node);
            let below = if or_equal { n.key <= key } else { n.key < key };
            if below {
                count += self.size(n.left) as usize + 1;
                node = n.right;
            } else {
                node = n.left;
            }
        }
        count
    }

    /// Every entry in order, as `(key, id, k)`; for tests.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> Vec<(i64, u128, i64)> {
        fn walk(tree: &Tree, node: u32, out: &mut Vec<(i64, u128, i64)>) {
            if node != NIL {
                let n = tree.node(node);
                walk(tree, n.left, out);
                out.push((n.key, n.id, n.k));
                walk(tree, n.right, out);
            }
        }
        let mut out = Vec::new();
        walk(self, self.root, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{Tree, Want};
    use proptest::prelude::{prop_assert_eq, proptest};

    proptest! {
        /// The tree answers exactly what a sorted list answers.
        #[test]
        fn agrees_with_a_sorted_list(
            ops in proptest::collection::vec((0u8..3, -20i64..20, 0u128..30, -50i64..50), 1..300),
        ) {
            let mut tree = Tree::new();
            let mut model: Vec<(i64, u128, i64)> = Vec::new();
            for (op, key, id, k) in ops {
                match op {
                    0 => {
                        if !model.iter().any(|e| e.1 == id) {
                            tree.insert(key, id, k);
                            model.push((key, id, k));
                            model.sort();
                        }
                    }
                    1 => {
                        let present = model.iter().position(|e| e.1 == id);
                        if let Some(pos) = present {
                            let (key, id, _) = model.remove(pos);
                            prop_assert_eq!(tree.remove(key, id), true);
                        } else {
                            prop_assert_eq!(tree.remove(key, id), false);
                        }
                    }
                    _ => {
                        for want in [Want::AtMost(k), Want::AtLeast(k)] {
                            for from in [None, Some(key)] {
                                let expected = model
                                    .iter()
                                    .find(|e| from.iter().all(|f| e.0 >= *f) && want.admits(e.2))
                                    .map(|e| (e.0, e.1));
                                prop_assert_eq!(tree.first(from, want), expected);
                            }
                        }
                        prop_assert_eq!(
                            tree.count_below(key, false),
                            model.iter().filter(|e| e.0 < key).count()
                        );
                        prop_assert_eq!(
                            tree.count_below(key, true),
                            model.iter().filter(|e| e.0 <= key).count()
                        );
                    }
                }
                prop_assert_eq!(tree.len(), model.len());
                prop_assert_eq!(tree.is_empty(), model.is_empty());
            }
            prop_assert_eq!(tree.entries(), model);
        }
    }
}

//! Who a host sends a broadcast's chunks to: its children in the tree the server
//! planned, and in place of a child it gave up on, that child's children (and so on
//! down), so that a dead interior host costs its subtree a new parent, not the
//! snapshot. Pure.

use herd_proto::broadcast::TreeHost;
use herd_proto::wire::HostId;
use std::collections::HashSet;

/// The hosts `me` sends to, given the hosts it gave up on, in the tree's order.
pub fn children(tree: &[TreeHost], me: HostId, dead: &HashSet<HostId>) -> Vec<HostId> {
    let mut out = Vec::new();
    let mut stack: Vec<HostId> = direct(tree, me);
    stack.reverse();
    let mut seen = HashSet::new();
    while let Some(child) = stack.pop() {
        if child == me || !seen.insert(child) {
            continue;
        }
        if dead.contains(&child) {
            let mut below = direct(tree, child);
            below.reverse();
            stack.extend(below);
        } else {
            out.push(child);
        }
    }
    out
}

fn direct(tree: &[TreeHost], parent: HostId) -> Vec<HostId> {
    tree.iter()
        .filter(|h| h.parent == Some(parent))
        .map(|h| h.host)
        .collect()
}

/// Whether `peer` may send to `me`: any host above `me` in the tree (a parent, or an
/// ancestor that took over from a dead one).
pub fn is_ancestor(tree: &[TreeHost], peer: HostId, me: HostId) -> bool {
    let mut at = me;
    for _ in 0..tree.len() {
        let Some(parent) = tree.iter().find(|h| h.host == at).and_then(|h| h.parent) else {
            return false;
        };
        if parent == peer {
            return true;
        }
        at = parent;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> HostId {
        HostId::from_u128(n)
    }

    /// 1 -> {2, 3}, 2 -> {4, 5}, 4 -> {6}
    fn tree() -> Vec<TreeHost> {
        [
            (1, None),
            (2, Some(1)),
            (3, Some(1)),
            (4, Some(2)),
            (5, Some(2)),
            (6, Some(4)),
        ]
        .into_iter()
        .map(|(h, p)| TreeHost {
            host: id(h),
            addr: String::new(),
            parent: p.map(id),
        })
        .collect()
    }

    #[test]
    fn a_dead_child_is_replaced_by_its_children_down_to_the_living() {
        let t = tree();
        assert_eq!(children(&t, id(1), &HashSet::new()), vec![id(2), id(3)]);
        let dead: HashSet<_> = [id(2)].into();
        assert_eq!(children(&t, id(1), &dead), vec![id(4), id(5), id(3)]);
        let dead: HashSet<_> = [id(2), id(4)].into();
        assert_eq!(children(&t, id(1), &dead), vec![id(6), id(5), id(3)]);
        assert_eq!(children(&t, id(6), &HashSet::new()), Vec::<HostId>::new());
    }

    #[test]
    fn only_ancestors_may_send() {
        let t = tree();
        assert!(is_ancestor(&t, id(4), id(6)));
        assert!(is_ancestor(&t, id(1), id(6)));
        assert!(!is_ancestor(&t, id(3), id(6)));
        assert!(!is_ancestor(&t, id(6), id(1)));
        assert!(!is_ancestor(&t, id(9), id(6)));
    }
}

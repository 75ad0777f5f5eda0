//! The proximity tree: hosts of a rack together, racks of a zone together, zones of a
//! region together, with at most `fanout` children per host.
//!
//! The tree grows from its root outwards, one circle at a time: first the root's own
//! rack (ordered by round trip from the root, filled breadth first, so a rack is as
//! shallow as the fan-out allows), then the other racks of its zone, each hung by its
//! host closest to the root under the shallowest host of the root's rack with a free
//! slot (once those are full, of the racks hung before it), and each grown the same
//! way from that host; then the other zones, then the
//! other regions. So every rack, zone and region is one connected subtree, entered
//! from its parent group by exactly one edge, and the order in which hosts joined the
//! tree ([`Tree::order`]) keeps every group contiguous: that order is the chain a
//! broadcast streams along (a tree of fan-out one).
//!
//! Round trips only order; labels decide. A host with no measurement to the root sorts
//! after those that have one, by id, so a fleet without measurements still gets a
//! stable tree.

use crate::labels::Place;
use crate::HostId;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// A host as the tree sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: HostId,
    pub place: Place,
}

/// Measured round trips in microseconds, as each host measured them. Either direction
/// answers for a pair; when both were measured the smaller counts (a probe can only be
/// slowed, never sped up).
#[derive(Debug, Clone, Default)]
pub struct Rtts {
    measured: HashMap<(HostId, HostId), u32>,
}

impl Rtts {
    pub fn insert(&mut self, from: HostId, to: HostId, rtt_us: u32) {
        self.measured.insert((from, to), rtt_us);
    }

    /// Forgets what `from` measured to `to` (its probes were lost).
    pub fn remove(&mut self, from: HostId, to: HostId) {
        self.measured.remove(&(from, to));
    }

    pub fn get(&self, a: HostId, b: HostId) -> Option<u32> {
        match (self.measured.get(&(a, b)), self.measured.get(&(b, a))) {
            (Some(x), Some(y)) => Some(*x.min(y)),
            (x, y) => x.or(y).copied(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("the root {0} is not one of the hosts")]
    NoRoot(HostId),
    #[error("a fan-out of 0 makes no tree")]
    NoFanout,
}

/// A proximity tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tree {
    pub root: HostId,
    pub fanout: usize,
    /// Every host but the root, with its parent.
    pub parent: BTreeMap<HostId, HostId>,
    /// Every host with children, with them in the order they joined.
    pub children: BTreeMap<HostId, Vec<HostId>>,
    /// Every host in the order it joined the tree, the root first.
    pub order: Vec<HostId>,
}

impl Tree {
    pub fn children_of(&self, host: HostId) -> &[HostId] {
        self.children.get(&host).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Edges from `host` up to the root.
    pub fn depth(&self, mut host: HostId) -> usize {
        let mut depth = 0;
        while let Some(parent) = self.parent.get(&host) {
            host = *parent;
            depth += 1;
        }
        depth
    }

    /// The hosts below `host`, nearest first (breadth first), without `host`.
    pub fn below(&self, host: HostId) -> Vec<HostId> {
        let mut out = Vec::new();
        let mut next = 0;
        out.extend_from_slice(self.children_of(host));
        while next < out.len() {
            let h = out[next];
            out.extend_from_slice(self.children_of(h));
            next += 1;
        }
        out
    }

    fn attach(&mut self, parent: HostId, child: HostId) {
        self.parent.insert(child, parent);
        self.children.entry(parent).or_default().push(child);
        self.order.push(child);
    }

    fn has_room(&self, host: HostId) -> bool {
        self.children_of(host).len() < self.fanout
    }
}

/// The proximity tree of `members` from `root`, at most `fanout` children each.
/// Members listed twice count once.
pub fn build(
    members: &[Member],
    rtts: &Rtts,
    root: HostId,
    fanout: usize,
) -> Result<Tree, TreeError> {
    if fanout == 0 {
        return Err(TreeError::NoFanout);
    }
    let mut seen = std::collections::HashSet::new();
    let members: Vec<&Member> = members.iter().filter(|m| seen.insert(m.id)).collect();
    let root_member = *members
        .iter()
        .find(|m| m.id == root)
        .ok_or(TreeError::NoRoot(root))?;
    let mut tree = Tree {
        root,
        fanout,
        parent: BTreeMap::new(),
        children: BTreeMap::new(),
        order: vec![root],
    };
    grow(&mut tree, 0, members, root_member, rtts);
    Ok(tree)
}

/// Adds `members` (which hold `root`, already in the tree) below `root`, grouped by
/// their place from `level` down.
fn grow(tree: &mut Tree, level: usize, members: Vec<&Member>, root: &Member, rtts: &Rtts) {
    let closeness = |m: &Member| (rtts.get(root.id, m.id).unwrap_or(u32::MAX), m.id);
    if level == 3 {
        // One rack: breadth first in order of closeness, so parent i's children are
        // the next `fanout` hosts in line.
        let mut rest: Vec<&Member> = members.into_iter().filter(|m| m.id != root.id).collect();
        rest.sort_by_key(|m| closeness(m));
        let start = tree.order.len() - 1;
        for (i, m) in rest.iter().enumerate() {
            let parent = tree.order[start + i / tree.fanout];
            tree.attach(parent, m.id);
        }
        return;
    }
    let mut groups: BTreeMap<(&str, &str, &str), Vec<&Member>> = BTreeMap::new();
    for m in &members {
        groups.entry(m.place.group(level)).or_default().push(m);
    }
    let own_key = root.place.group(level);
    let own = groups.remove(&own_key).unwrap_or_default();
    let first_own = tree.order.len() - 1;
    grow(tree, level + 1, own, root, rtts);
    let own_hosts: Vec<HostId> = tree.order[first_own..].to_vec();
    // The root's group, shallowest first: where the other groups hang from.
    let mut slots: Vec<(usize, HostId)> = own_hosts.iter().map(|&h| (tree.depth(h), h)).collect();
    slots.sort_unstable();
    let mut slot = 0;
    let mut others: Vec<(&Member, Vec<&Member>)> = groups
        .into_values()
        .filter_map(|group| {
            let leader = *group.iter().min_by_key(|m| closeness(m))?;
            Some((leader, group))
        })
        .collect();
    others.sort_by_key(|(leader, _)| closeness(leader));
    for (leader, group) in others {
        while slot < slots.len() && !tree.has_room(slots[slot].1) {
            slot += 1;
        }
        // The slots end with the last group hung, whose leaves have room.
        let parent = slots.get(slot).map(|s| s.1).unwrap_or(root.id);
        tree.attach(parent, leader.id);
        let first = tree.order.len() - 1;
        grow(tree, level + 1, group, leader, rtts);
        // When the root's group is full, the groups hung since take the next ones.
        let mut hung: Vec<(usize, HostId)> = tree.order[first..]
            .iter()
            .map(|&h| (tree.depth(h), h))
            .collect();
        hung.sort_unstable();
        slots.extend(hung);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn member(n: u128, region: &str, zone: &str, rack: &str) -> Member {
        Member {
            id: HostId::from_u128(n),
            place: Place {
                region: region.into(),
                zone: zone.into(),
                rack: rack.into(),
            },
        }
    }

    fn id(n: u128) -> HostId {
        HostId::from_u128(n)
    }

    #[test]
    fn two_racks_of_four_hang_together_by_one_edge() {
        let members: Vec<Member> = (1..=8)
            .map(|n| member(n, "eu", "z1", if n <= 4 { "r1" } else { "r2" }))
            .collect();
        let mut rtts = Rtts::default();
        for n in 2..=8 {
            // Host 8 is the closest of rack 2 to the root.
            rtts.insert(id(1), id(n), if n == 8 { 50 } else { 100 * n as u32 });
        }
        let tree = build(&members, &rtts, id(1), 2).unwrap();
        assert_eq!(tree.children_of(id(1)), &[id(2), id(3)]);
        assert_eq!(tree.children_of(id(2)), &[id(4), id(8)]);
        assert_eq!(tree.parent[&id(8)], id(2));
        assert_eq!(
            tree.order,
            [1, 2, 3, 4, 8, 5, 6, 7].map(id).to_vec(),
            "the root's rack, then the other rack from its closest host"
        );
        assert_eq!(tree.below(id(8)), [5, 6, 7].map(id).to_vec());
        assert_eq!(tree.depth(id(5)), 3);
    }

    #[test]
    fn a_fanout_of_one_is_a_chain_and_bad_input_is_refused() {
        let members: Vec<Member> = (1..=5).map(|n| member(n, "", "", "")).collect();
        let tree = build(&members, &Rtts::default(), id(3), 1).unwrap();
        assert_eq!(tree.order, [3, 1, 2, 4, 5].map(id).to_vec());
        for pair in tree.order.windows(2) {
            assert_eq!(tree.parent[&pair[1]], pair[0]);
        }
        assert_eq!(
            build(&members, &Rtts::default(), id(9), 2),
            Err(TreeError::NoRoot(id(9)))
        );
        assert_eq!(
            build(&members, &Rtts::default(), id(1), 0),
            Err(TreeError::NoFanout)
        );
    }

    #[test]
    fn round_trips_take_the_smaller_direction() {
        let mut rtts = Rtts::default();
        rtts.insert(id(1), id(2), 500);
        assert_eq!(rtts.get(id(2), id(1)), Some(500));
        rtts.insert(id(2), id(1), 300);
        assert_eq!(rtts.get(id(1), id(2)), Some(300));
        assert_eq!(rtts.get(id(1), id(3)), None);
    }

    /// Members, measured round trips (from, to, µs), the root's index and a fan-out.
    type Fleet = (Vec<Member>, Vec<(usize, usize, u32)>, usize, usize);

    fn fleet() -> impl Strategy<Value = Fleet> {
        (1usize..40)
            .prop_flat_map(|n| {
                (
                    prop::collection::vec((0u8..2, 0u8..3, 0u8..3), n),
                    prop::collection::vec((0..n, 0..n, 1u32..10_000), 0..n * 3),
                    0..n,
                    1usize..5,
                )
            })
            .prop_map(|(places, rtts, root, fanout)| {
                let members = places
                    .iter()
                    .enumerate()
                    .map(|(i, (r, z, k))| {
                        member(
                            i as u128 + 1,
                            &format!("r{r}"),
                            &format!("z{z}"),
                            &format!("k{k}"),
                        )
                    })
                    .collect();
                (members, rtts, root, fanout)
            })
    }

    proptest! {
        #[test]
        fn every_host_once_fanout_bounded_and_every_group_one_subtree_in_one_run(
            (members, measured, root, fanout) in fleet()
        ) {
            let mut rtts = Rtts::default();
            for (a, b, us) in measured {
                rtts.insert(members[a].id, members[b].id, us);
            }
            let root = members[root].id;
            let tree = build(&members, &rtts, root, fanout).unwrap();
            // Every host once, the root first, and a parent for all but it.
            prop_assert_eq!(tree.order.len(), members.len());
            prop_assert_eq!(tree.order[0], root);
            let unique: HashSet<_> = tree.order.iter().collect();
            prop_assert_eq!(unique.len(), members.len());
            prop_assert_eq!(tree.parent.len(), members.len() - 1);
            prop_assert!(!tree.parent.contains_key(&root));
            // No host has more children than the fan-out, and every path ends at the
            // root (depth would loop forever otherwise; bound it).
            for kids in tree.children.values() {
                prop_assert!(kids.len() <= fanout);
            }
            for m in &members {
                let mut host = m.id;
                let mut steps = 0;
                while let Some(p) = tree.parent.get(&host) {
                    host = *p;
                    steps += 1;
                    prop_assert!(steps <= members.len());
                }
                prop_assert_eq!(host, root);
            }
            // Every region, zone and rack is entered by one edge (one of its hosts has
            // its parent outside it, or is the root) and is one run of the order.
            let place: HashMap<HostId, &Place> = members.iter().map(|m| (m.id, &m.place)).collect();
            for level in 0..3 {
                let mut entries: HashMap<(&str, &str, &str), usize> = HashMap::new();
                for m in &members {
                    let group = m.place.group(level);
                    let enters = match tree.parent.get(&m.id) {
                        None => true,
                        Some(p) => place[p].group(level) != group,
                    };
                    if enters {
                        *entries.entry(group).or_default() += 1;
                    }
                }
                prop_assert!(entries.values().all(|&n| n == 1), "level {}: {:?}", level, entries);
                let runs = tree
                    .order
                    .windows(2)
                    .filter(|w| place[&w[0]].group(level) != place[&w[1]].group(level))
                    .count()
                    + 1;
                prop_assert_eq!(runs, entries.len(), "level {}: each group one run", level);
            }
        }
    }
}

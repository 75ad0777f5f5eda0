//! Which hosts each host measures its round trips to.
//!
//! Measuring every pair costs N² probes; at ten thousand hosts that is a hundred million.
//! The tree needs round trips within a group (to order it) and from a group's hosts to
//! the host they would hang from, so each host measures its own rack first, then its
//! zone, its region, and the rest, up to a bound. Within each circle a host starts
//! after itself in id order and wraps around, so that the hosts of a big group spread
//! their probes over the group instead of all measuring the same few.
//!
//! All hosts are answered at once: sorted by place, each circle of a host is a range of
//! the sorted list around the one inside it, so a host's list costs its bound, not N.

use crate::tree::Member;
use crate::HostId;

/// Every member with up to `bound` hosts it should measure, closest circle first.
/// Members listed twice count once.
pub fn neighbours(members: &[Member], bound: usize) -> Vec<(HostId, Vec<HostId>)> {
    let mut sorted: Vec<&Member> = members.iter().collect();
    sorted.sort_by(|a, b| (&a.place, a.id).cmp(&(&b.place, b.id)));
    sorted.dedup_by_key(|m| m.id);
    // The range of `sorted` holding the group of sorted[p] at `level` (3: all).
    let range = |p: usize, level: usize| -> (usize, usize) {
        if level == 3 {
            return (0, sorted.len());
        }
        let key = sorted[p].place.group(level);
        let lo = sorted[..p].partition_point(|m| m.place.group(level) < key);
        let hi = p + sorted[p..].partition_point(|m| m.place.group(level) <= key);
        (lo, hi)
    };
    (0..sorted.len())
        .map(|p| {
            let mut out = Vec::with_capacity(bound.min(sorted.len()));
            let mut inner = (p, p + 1);
            // From the rack out: rack (2), zone (1), region (0), then everyone (3).
            for level in [2, 1, 0, 3] {
                let (lo, hi) = range(p, level);
                let after = inner.1..hi;
                let before = lo..inner.0;
                for i in after.chain(before) {
                    if out.len() == bound {
                        break;
                    }
                    out.push(sorted[i].id);
                }
                inner = (lo, hi);
            }
            (sorted[p].id, out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Place;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    fn member(n: u128, zone: &str, rack: &str) -> Member {
        Member {
            id: HostId::from_u128(n),
            place: Place {
                region: "eu".into(),
                zone: zone.into(),
                rack: rack.into(),
            },
        }
    }

    fn of(all: &[(HostId, Vec<HostId>)], n: u128) -> Vec<HostId> {
        all.iter()
            .find(|(id, _)| *id == HostId::from_u128(n))
            .map(|(_, list)| list.clone())
            .unwrap()
    }

    #[test]
    fn the_own_rack_comes_first_then_the_zone_then_the_rest_within_the_bound() {
        let members = vec![
            member(1, "a", "r1"),
            member(2, "a", "r1"),
            member(3, "a", "r2"),
            member(4, "b", "r3"),
            member(5, "a", "r1"),
        ];
        let ids = |ns: &[u128]| ns.iter().map(|&n| HostId::from_u128(n)).collect::<Vec<_>>();
        // Ring order within the rack: after 2 comes 5, then 1.
        assert_eq!(of(&neighbours(&members, 10), 2), ids(&[5, 1, 3, 4]));
        assert_eq!(of(&neighbours(&members, 2), 2), ids(&[5, 1]));
        assert_eq!(of(&neighbours(&members, 10), 4), ids(&[1, 2, 5, 3]));
    }

    proptest! {
        #[test]
        fn each_list_is_distinct_others_bounded_and_by_circle(
            places in prop::collection::vec((0u8..2, 0u8..3, 0u8..3), 1..60),
            bound in 0usize..20,
        ) {
            let members: Vec<Member> = places
                .iter()
                .enumerate()
                .map(|(i, (r, z, k))| Member {
                    id: HostId::from_u128(i as u128 + 1),
                    place: Place {
                        region: format!("r{r}"),
                        zone: format!("z{z}"),
                        rack: format!("k{k}"),
                    },
                })
                .collect();
            let place: HashMap<HostId, &Place> = members.iter().map(|m| (m.id, &m.place)).collect();
            let all = neighbours(&members, bound);
            prop_assert_eq!(all.len(), members.len());
            for (me, list) in &all {
                let unique: HashSet<_> = list.iter().collect();
                prop_assert_eq!(unique.len(), list.len());
                prop_assert!(!list.contains(me));
                prop_assert_eq!(list.len(), bound.min(members.len() - 1));
                // Closest circle first: how many levels a neighbour shares with me
                // never grows along the list.
                let shared = |id: &HostId| (0..3).filter(|&l| place[id].group(l) == place[me].group(l)).count();
                for w in list.windows(2) {
                    prop_assert!(shared(&w[0]) >= shared(&w[1]));
                }
            }
        }
    }
}

//! What changed between two observations of a host's VMs.
//!
//! An agent compares every interval's observation with the last one it reported: to
//! build the report, to check the changes against the lifecycle flow and to know
//! whether its saved state moved. Ten thousand agents in one scale run do this a
//! hundred VMs at a time, so it is one ordered walk over both maps, done once per
//! interval and shared, rather than a lookup per VM for each of those uses.

use herd_proto::wire::VmId;
use herd_proto::VmState;
use std::collections::BTreeMap;

/// One VM whose state is not what it was: `from` is `None` for a VM that appeared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub vm: VmId,
    pub from: Option<VmState>,
    pub to: VmState,
}

/// The changes from one observation to the next, each list in VM order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub changed: Vec<Change>,
    /// VMs that were there and are gone.
    pub removed: Vec<VmId>,
}

impl Diff {
    /// Compares `before` with `now` in one walk over both (both are in VM order).
    pub fn between(before: &BTreeMap<VmId, VmState>, now: &BTreeMap<VmId, VmState>) -> Diff {
        let mut diff = Diff::default();
        let mut old = before.iter().peekable();
        for (vm, to) in now {
            // Whatever `before` holds ahead of this VM is gone from `now`.
            while let Some((gone, _)) = old.next_if(|(was, _)| *was < vm) {
                diff.removed.push(*gone);
            }
            let from = old.next_if(|(was, _)| *was == vm).map(|(_, from)| *from);
            if from != Some(*to) {
                diff.changed.push(Change {
                    vm: *vm,
                    from,
                    to: *to,
                });
            }
        }
        diff.removed.extend(old.map(|(gone, _)| *gone));
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

/// The same comparison, one lookup per VM: the reference the walk is checked against.
#[cfg(test)]
fn by_lookup(before: &BTreeMap<VmId, VmState>, now: &BTreeMap<VmId, VmState>) -> Diff {
    let changed = now
        .iter()
        .filter(|(vm, to)| before.get(vm) != Some(to))
        .map(|(vm, to)| Change {
            vm: *vm,
            from: before.get(vm).copied(),
            to: *to,
        })
        .collect();
    let removed = before
        .keys()
        .filter(|vm| !now.contains_key(vm))
        .copied()
        .collect();
    Diff { changed, removed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    const STATES: [VmState; 4] = [
        VmState::Running,
        VmState::Paused,
        VmState::Stopped,
        VmState::Booting,
    ];

    fn observation() -> impl Strategy<Value = BTreeMap<VmId, VmState>> {
        proptest::collection::btree_map(
            (0u128..40).prop_map(Uuid::from_u128),
            (0usize..STATES.len()).prop_map(|i| STATES[i]),
            0..30,
        )
    }

    #[test]
    fn finds_changes_arrivals_and_departures() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let before = BTreeMap::from([(a, VmState::Running), (b, VmState::Running)]);
        let now = BTreeMap::from([(b, VmState::Paused), (c, VmState::Booting)]);
        let diff = Diff::between(&before, &now);
        assert_eq!(
            diff.changed,
            vec![
                Change {
                    vm: b,
                    from: Some(VmState::Running),
                    to: VmState::Paused
                },
                Change {
                    vm: c,
                    from: None,
                    to: VmState::Booting
                },
            ]
        );
        assert_eq!(diff.removed, vec![a]);
        assert!(Diff::between(&now, &now).is_empty());
    }

    proptest! {
        #[test]
        fn the_walk_agrees_with_lookups(before in observation(), now in observation()) {
            prop_assert_eq!(Diff::between(&before, &now), by_lookup(&before, &now));
        }
    }
}

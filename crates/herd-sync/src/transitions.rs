//! Checks observed changes against the lifecycle state flow.

use crate::diff::{Change, Diff};
use herd_proto::lifecycle::{explain, Transition};
use herd_proto::wire::{VmEvent, VmId};
use herd_proto::VmState;
use std::collections::BTreeMap;

/// The lifecycle events that explain how `before` became `now`, one VM at a time:
/// one event per edge, inferred events for missed states on a unique path, and an
/// event without a flow event (an error) when the change does not fit the flow.
///
/// A VM that appears is explained from `Scheduled` (the server placed it here); a VM
/// that disappears gets no event here, the report's `removed` list carries it.
pub fn lifecycle_events(
    before: &BTreeMap<VmId, VmState>,
    now: &BTreeMap<VmId, VmState>,
) -> Vec<VmEvent> {
    events_of(&Diff::between(before, now).changed)
}

/// The lifecycle events that explain `changes` (see [`lifecycle_events`]).
pub fn events_of(changes: &[Change]) -> Vec<VmEvent> {
    let mut events = Vec::new();
    for &Change { vm, from, to } in changes {
        let from = from.unwrap_or(VmState::Scheduled);
        let transition = explain(from, to);
        if let Some(steps) = transition.steps() {
            events.extend(steps.into_iter().map(|(step, inferred)| VmEvent {
                vm,
                from: step.from,
                to: step.to,
                event: Some(step.event),
                inferred,
                message: None,
            }));
            continue;
        }
        match transition {
            Transition::Ambiguous => events.push(VmEvent {
                vm,
                from,
                to,
                event: None,
                inferred: false,
                message: Some(format!(
                    "changed from {from} to {to} by more than one possible path; the states between were not observed"
                )),
            }),
            Transition::Invalid => events.push(VmEvent {
                vm,
                from,
                to,
                event: None,
                inferred: false,
                message: Some(format!(
                    "changed from {from} to {to}, which the lifecycle state flow does not allow"
                )),
            }),
            Transition::Same | Transition::Direct(_) | Transition::Filled(_) => {}
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::Event;
    use uuid::Uuid;

    #[test]
    fn fills_in_missed_states_and_flags_invalid_ones() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let before = BTreeMap::from([(a, VmState::Running), (b, VmState::Terminated)]);
        let now = BTreeMap::from([(a, VmState::Suspended), (b, VmState::Running)]);
        let events = lifecycle_events(&before, &now);
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].event, Some(Event::Suspend));
        assert!(events[0].inferred);
        assert_eq!(events[1].event, Some(Event::Saved));
        assert!(!events[1].inferred);
        assert_eq!(events[2].event, None);
        assert!(events[2].message.is_some());
    }

    #[test]
    fn new_vm_is_explained_from_scheduled() {
        let a = Uuid::from_u128(1);
        let events = lifecycle_events(&BTreeMap::new(), &BTreeMap::from([(a, VmState::Booting)]));
        let tos: Vec<_> = events.iter().map(|e| e.to).collect();
        assert_eq!(tos, vec![VmState::Building, VmState::Booting]);
    }
}

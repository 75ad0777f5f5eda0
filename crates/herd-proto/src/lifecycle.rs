//! The VM lifecycle state flow: the one table of states, the events that move a VM
//! between them, and the questions the rest of herd asks of it.
//!
//! Agents observe states from drivers at sync intervals, so they can miss intermediate
//! states (a VM that went `running -> suspending -> suspended` between two looks is seen
//! as `running -> suspended`). [`explain`] answers how an observed change fits the flow:
//! a direct edge, a unique shortest path whose missed states can be filled in, or no
//! consistent explanation (an error event). The server uses the same table to validate
//! user actions, so the API and the agents can never disagree about what is allowed.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

/// Every state a VM can be in, as stored by the server and reported by agents.
///
/// `Unknown` is never reported by an agent: the server sets it when a host stops
/// sending heartbeats, and the host's next full sync replaces it with the truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Pending,
    Scheduled,
    Building,
    Booting,
    Running,
    Paused,
    Suspending,
    Suspended,
    Resuming,
    Migrating,
    Stopping,
    Stopped,
    Terminating,
    Terminated,
    Purged,
    Error,
    Unknown,
}

/// What moves a VM from one state to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The scheduler picked a host.
    Schedule,
    /// The host started preparing the VM's disk, image and sockets.
    Build,
    /// The hypervisor process started (first boot, or a start after a stop).
    Boot,
    /// The guest is up (its module said hello, or the driver saw it running).
    Ready,
    Pause,
    Resume,
    Suspend,
    /// The suspend image is complete on disk.
    Saved,
    /// Restoring from a suspend image began.
    Restore,
    Migrate,
    Stop,
    /// The hypervisor process ended: a requested stop, or the guest powered off.
    Halted,
    Terminate,
    /// The VM and its files are gone from the host.
    Destroyed,
    /// The server dropped its record.
    Purge,
    Fail,
}

impl VmState {
    /// Every state, in declaration order.
    pub const ALL: [VmState; 17] = [
        VmState::Pending,
        VmState::Scheduled,
        VmState::Building,
        VmState::Booting,
        VmState::Running,
        VmState::Paused,
        VmState::Suspending,
        VmState::Suspended,
        VmState::Resuming,
        VmState::Migrating,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Terminating,
        VmState::Terminated,
        VmState::Purged,
        VmState::Error,
        VmState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::Scheduled => "scheduled",
            VmState::Building => "building",
            VmState::Booting => "booting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Suspending => "suspending",
            VmState::Suspended => "suspended",
            VmState::Resuming => "resuming",
            VmState::Migrating => "migrating",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Terminating => "terminating",
            VmState::Terminated => "terminated",
            VmState::Purged => "purged",
            VmState::Error => "error",
            VmState::Unknown => "unknown",
        }
    }

    /// States a user can ask for: the reconciler drives the observed state toward one.
    pub fn is_target(self) -> bool {
        matches!(
            self,
            VmState::Running
                | VmState::Paused
                | VmState::Suspended
                | VmState::Stopped
                | VmState::Terminated
        )
    }

    /// States after which the VM holds no resources on its host.
    pub fn is_final(self) -> bool {
        matches!(self, VmState::Terminated | VmState::Purged)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not part of the flow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown VM state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for VmState {
    type Err = UnknownState;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        VmState::ALL
            .iter()
            .copied()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| UnknownState(text.to_owned()))
    }
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Schedule => "schedule",
            Event::Build => "build",
            Event::Boot => "boot",
            Event::Ready => "ready",
            Event::Pause => "pause",
            Event::Resume => "resume",
            Event::Suspend => "suspend",
            Event::Saved => "saved",
            Event::Restore => "restore",
            Event::Migrate => "migrate",
            Event::Stop => "stop",
            Event::Halted => "halted",
            Event::Terminate => "terminate",
            Event::Destroyed => "destroyed",
            Event::Purge => "purge",
            Event::Fail => "fail",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

use Event as E;
use VmState as S;

/// The state flow: `(from, event, to)`. The only place it is written down.
pub const FLOW: &[(VmState, Event, VmState)] = &[
    (S::Pending, E::Schedule, S::Scheduled),
    (S::Scheduled, E::Build, S::Building),
    (S::Building, E::Boot, S::Booting),
    (S::Booting, E::Ready, S::Running),
    (S::Running, E::Pause, S::Paused),
    (S::Paused, E::Resume, S::Running),
    (S::Running, E::Suspend, S::Suspending),
    (S::Paused, E::Suspend, S::Suspending),
    (S::Suspending, E::Saved, S::Suspended),
    (S::Suspended, E::Restore, S::Resuming),
    (S::Resuming, E::Ready, S::Running),
    (S::Running, E::Migrate, S::Migrating),
    (S::Migrating, E::Ready, S::Running),
    (S::Booting, E::Stop, S::Stopping),
    (S::Running, E::Stop, S::Stopping),
    (S::Paused, E::Stop, S::Stopping),
    (S::Stopping, E::Halted, S::Stopped),
    (S::Running, E::Halted, S::Stopped),
    (S::Booting, E::Halted, S::Stopped),
    (S::Stopped, E::Boot, S::Booting),
    (S::Error, E::Boot, S::Booting),
    (S::Pending, E::Terminate, S::Terminating),
    (S::Scheduled, E::Terminate, S::Terminating),
    (S::Building, E::Terminate, S::Terminating),
    (S::Booting, E::Terminate, S::Terminating),
    (S::Running, E::Terminate, S::Terminating),
    (S::Paused, E::Terminate, S::Terminating),
    (S::Suspending, E::Terminate, S::Terminating),
    (S::Suspended, E::Terminate, S::Terminating),
    (S::Resuming, E::Terminate, S::Terminating),
    (S::Migrating, E::Terminate, S::Terminating),
    (S::Stopping, E::Terminate, S::Terminating),
    (S::Stopped, E::Terminate, S::Terminating),
    (S::Error, E::Terminate, S::Terminating),
    (S::Terminating, E::Destroyed, S::Terminated),
    (S::Terminated, E::Purge, S::Purged),
    (S::Building, E::Fail, S::Error),
    (S::Booting, E::Fail, S::Error),
    (S::Running, E::Fail, S::Error),
    (S::Paused, E::Fail, S::Error),
    (S::Suspending, E::Fail, S::Error),
    (S::Suspended, E::Fail, S::Error),
    (S::Resuming, E::Fail, S::Error),
    (S::Migrating, E::Fail, S::Error),
    (S::Stopping, E::Fail, S::Error),
    (S::Terminating, E::Fail, S::Error),
];

/// The event that moves `from` to `to` in one step, if the flow has that edge.
pub fn edge(from: VmState, to: VmState) -> Option<Event> {
    FLOW.iter()
        .find(|(a, _, b)| *a == from && *b == to)
        .map(|(_, event, _)| *event)
}

/// Whether `event` may happen in state `from`.
pub fn enabled(from: VmState, event: Event) -> bool {
    FLOW.iter().any(|(a, e, _)| *a == from && *e == event)
}

/// One step of a filled-in path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub from: VmState,
    pub event: Event,
    pub to: VmState,
}

/// How an observed change `from -> to` fits the state flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    Same,
    /// A single edge of the flow.
    Direct(Step),
    /// Several edges; the states between were missed and are filled in. The path is the
    /// only shortest one, so the filling is not a guess.
    Filled(Vec<Step>),
    /// More than one shortest path: the states between cannot be known.
    Ambiguous,
    /// No path in the flow leads from `from` to `to`.
    Invalid,
}

impl Transition {
    /// The edges that explain the change, each with whether it was inferred (a missed
    /// state filled in) rather than seen; `None` when the change does not fit the flow
    /// on one path. Every reader of the flow names events the same way through this.
    pub fn steps(&self) -> Option<Vec<(Step, bool)>> {
        match self {
            Transition::Same => Some(Vec::new()),
            Transition::Direct(step) => Some(vec![(*step, false)]),
            Transition::Filled(steps) => {
                let last = steps.len().saturating_sub(1);
                Some(
                    steps
                        .iter()
                        .enumerate()
                        .map(|(idx, step)| (*step, idx != last))
                        .collect(),
                )
            }
            Transition::Ambiguous | Transition::Invalid => None,
        }
    }
}

/// Explains an observed change against the flow (see [`Transition`]).
pub fn explain(from: VmState, to: VmState) -> Transition {
    if from == to {
        return Transition::Same;
    }
    if let Some(event) = edge(from, to) {
        return Transition::Direct(Step { from, event, to });
    }
    // Breadth-first search that counts shortest paths, so uniqueness is exact.
    let n = VmState::ALL.len();
    let index = |s: VmState| s as usize;
    let mut dist = vec![usize::MAX; n];
    let mut n_paths = vec![0u32; n];
    let mut parent: Vec<Option<(VmState, Event)>> = vec![None; n];
    dist[index(from)] = 0;
    n_paths[index(from)] = 1;
    let mut queue = VecDeque::from([from]);
    while let Some(state) = queue.pop_front() {
        for (a, event, b) in FLOW.iter().filter(|(a, _, _)| *a == state) {
            let (ia, ib) = (index(*a), index(*b));
            if dist[ib] == usize::MAX {
                dist[ib] = dist[ia] + 1;
                n_paths[ib] = n_paths[ia];
                parent[ib] = Some((*a, *event));
                queue.push_back(*b);
            } else if dist[ib] == dist[ia] + 1 {
                n_paths[ib] = n_paths[ib].saturating_add(n_paths[ia]);
            }
        }
    }
    match n_paths[index(to)] {
        0 => Transition::Invalid,
        1 => {
            let mut steps = Vec::new();
            let mut cursor = to;
            while let Some((prev, event)) = parent[index(cursor)] {
                steps.push(Step {
                    from: prev,
                    event,
                    to: cursor,
                });
                if prev == from {
                    break;
                }
                cursor = prev;
            }
            steps.reverse();
            Transition::Filled(steps)
        }
        _ => Transition::Ambiguous,
    }
}

/// A user action on a VM, and the target state it asks the reconciler for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Start,
    Stop,
    Pause,
    Resume,
    Suspend,
    Terminate,
}

impl Action {
    pub const ALL: [Action; 6] = [
        Action::Start,
        Action::Stop,
        Action::Pause,
        Action::Resume,
        Action::Suspend,
        Action::Terminate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Suspend => "suspend",
            Action::Terminate => "terminate",
        }
    }

    pub fn parse(text: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == text)
    }

    pub fn target(self) -> VmState {
        match self {
            Action::Start | Action::Resume => VmState::Running,
            Action::Stop => VmState::Stopped,
            Action::Pause => VmState::Paused,
            Action::Suspend => VmState::Suspended,
            Action::Terminate => VmState::Terminated,
        }
    }

    /// The events this action may begin with; the action is allowed in a state where one
    /// of them is enabled.
    fn first_events(self) -> &'static [Event] {
        match self {
            Action::Start => &[Event::Boot, Event::Resume, Event::Restore],
            Action::Stop => &[Event::Stop, Event::Halted],
            Action::Pause => &[Event::Pause],
            Action::Resume => &[Event::Resume, Event::Restore],
            Action::Suspend => &[Event::Suspend],
            Action::Terminate => &[Event::Terminate],
        }
    }

    /// Whether the action may be taken on a VM whose effective state is `state`.
    ///
    /// `Unknown` accepts every action: the host is unreachable, so the request is
    /// recorded as desired state and carried out when the host returns.
    pub fn allowed_in(self, state: VmState) -> bool {
        state == VmState::Unknown || self.first_events().iter().any(|e| enabled(state, *e))
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for state in VmState::ALL {
            assert_eq!(state.as_str().parse::<VmState>(), Ok(state));
        }
        assert!("sleeping".parse::<VmState>().is_err());
    }

    #[test]
    fn all_lists_every_state_in_order() {
        for (idx, state) in VmState::ALL.iter().enumerate() {
            assert_eq!(*state as usize, idx);
        }
    }

    #[test]
    fn flow_is_deterministic() {
        // One event from one state leads to exactly one next state.
        for (a, e, b) in FLOW {
            let targets: Vec<_> = FLOW
                .iter()
                .filter(|(a2, e2, _)| a2 == a && e2 == e)
                .map(|(_, _, b2)| *b2)
                .collect();
            assert_eq!(targets, vec![*b], "{a} --{e}-->");
        }
    }

    #[test]
    fn every_state_but_purged_and_unknown_reaches_purged() {
        for state in VmState::ALL {
            if matches!(state, VmState::Purged | VmState::Unknown) {
                continue;
            }
            assert_ne!(
                explain(state, VmState::Purged),
                Transition::Invalid,
                "{state}"
            );
        }
    }

    #[test]
    fn unknown_is_outside_the_flow() {
        assert!(FLOW
            .iter()
            .all(|(a, _, b)| *a != VmState::Unknown && *b != VmState::Unknown));
    }

    #[test]
    fn missed_suspending_is_filled_in() {
        let Transition::Filled(steps) = explain(VmState::Running, VmState::Suspended) else {
            panic!("expected a filled path");
        };
        assert_eq!(
            steps,
            vec![
                Step {
                    from: VmState::Running,
                    event: Event::Suspend,
                    to: VmState::Suspending
                },
                Step {
                    from: VmState::Suspending,
                    event: Event::Saved,
                    to: VmState::Suspended
                },
            ]
        );
    }

    #[test]
    fn launch_path_is_filled_in() {
        let Transition::Filled(steps) = explain(VmState::Scheduled, VmState::Running) else {
            panic!("expected a filled path");
        };
        let states: Vec<_> = steps.iter().map(|s| s.to).collect();
        assert_eq!(
            states,
            vec![VmState::Building, VmState::Booting, VmState::Running]
        );
    }

    #[test]
    fn direct_and_invalid() {
        assert_eq!(
            explain(VmState::Running, VmState::Paused),
            Transition::Direct(Step {
                from: VmState::Running,
                event: Event::Pause,
                to: VmState::Paused
            })
        );
        assert_eq!(
            explain(VmState::Terminated, VmState::Running),
            Transition::Invalid
        );
        assert_eq!(explain(VmState::Paused, VmState::Paused), Transition::Same);
    }

    #[test]
    fn ambiguous_when_two_shortest_paths() {
        // paused -> stopped: via stopping (stop, halted) or via running (resume, halted).
        assert_eq!(
            explain(VmState::Paused, VmState::Stopped),
            Transition::Ambiguous
        );
    }

    #[test]
    fn steps_mark_only_the_missed_edges_as_inferred() {
        let steps = explain(VmState::Scheduled, VmState::Running).steps();
        let inferred: Option<Vec<bool>> =
            steps.map(|steps| steps.iter().map(|(_, inferred)| *inferred).collect());
        assert_eq!(inferred, Some(vec![true, true, false]));
        assert_eq!(
            explain(VmState::Running, VmState::Running).steps(),
            Some(vec![])
        );
        assert_eq!(explain(VmState::Paused, VmState::Stopped).steps(), None);
        assert_eq!(explain(VmState::Terminated, VmState::Running).steps(), None);
    }

    #[test]
    fn filled_paths_are_chains_of_edges() {
        for from in VmState::ALL {
            for to in VmState::ALL {
                if let Transition::Filled(steps) = explain(from, to) {
                    assert_eq!(steps.first().map(|s| s.from), Some(from));
                    assert_eq!(steps.last().map(|s| s.to), Some(to));
                    for pair in steps.windows(2) {
                        assert_eq!(pair[0].to, pair[1].from);
                    }
                    for step in &steps {
                        assert_eq!(edge(step.from, step.to), Some(step.event));
                    }
                }
            }
        }
    }

    #[test]
    fn actions_follow_the_flow() {
        assert!(Action::Pause.allowed_in(VmState::Running));
        assert!(!Action::Pause.allowed_in(VmState::Stopped));
        assert!(Action::Resume.allowed_in(VmState::Paused));
        assert!(Action::Resume.allowed_in(VmState::Suspended));
        assert!(Action::Start.allowed_in(VmState::Stopped));
        assert!(!Action::Start.allowed_in(VmState::Terminated));
        assert!(Action::Terminate.allowed_in(VmState::Pending));
        assert!(!Action::Terminate.allowed_in(VmState::Terminated));
        for action in Action::ALL {
            assert!(action.allowed_in(VmState::Unknown));
            assert!(action.target().is_target());
            assert_eq!(Action::parse(action.as_str()), Some(action));
        }
    }
}

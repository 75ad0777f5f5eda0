//! What to do next to bring one VM toward its target state. Pure, so every pair of
//! (current, target) is tested without a driver.

use herd_proto::VmState;

/// The next driver operation, or why there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Create,
    Start,
    Pause,
    Resume,
    Suspend,
    Stop,
    Terminate,
    /// The VM is between states; look again shortly.
    Wait,
    /// The VM is in the target state.
    Done,
    /// No operation leads from here to the target.
    Impossible,
}

/// `current` is `None` when the host does not have the VM.
pub fn next_step(current: Option<VmState>, target: VmState) -> Plan {
    use VmState as S;
    let Some(current) = current else {
        return match target {
            S::Terminated | S::Purged => Plan::Done,
            S::Running | S::Paused | S::Suspended | S::Stopped => Plan::Create,
            _ => Plan::Impossible,
        };
    };
    if current == target {
        return Plan::Done;
    }
    if matches!(target, S::Terminated | S::Purged) {
        return Plan::Terminate;
    }
    if matches!(
        current,
        S::Building
            | S::Booting
            | S::Suspending
            | S::Resuming
            | S::Migrating
            | S::Stopping
            | S::Terminating
    ) {
        return Plan::Wait;
    }
    match (current, target) {
        (S::Stopped | S::Error, S::Running | S::Paused | S::Suspended) => Plan::Start,
        (S::Stopped, S::Stopped) => Plan::Done,
        (S::Paused | S::Suspended, S::Running) => Plan::Resume,
        (S::Suspended, S::Paused) => Plan::Resume,
        (S::Running, S::Paused) => Plan::Pause,
        (S::Running | S::Paused, S::Suspended) => Plan::Suspend,
        (S::Running | S::Paused, S::Stopped) => Plan::Stop,
        (S::Suspended, S::Stopped) => Plan::Resume,
        (S::Error, S::Stopped) => Plan::Done,
        _ => Plan::Impossible,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::VmState as S;

    /// Following the plan with a model where every operation lands in its obvious
    /// state reaches every target from every state the agent can observe.
    #[test]
    fn plans_reach_every_target() {
        let observable = [
            None,
            Some(S::Running),
            Some(S::Paused),
            Some(S::Suspended),
            Some(S::Stopped),
            Some(S::Error),
        ];
        for target in [
            S::Running,
            S::Paused,
            S::Suspended,
            S::Stopped,
            S::Terminated,
        ] {
            for start in observable {
                let mut current = start;
                let mut done = false;
                for _ in 0..6 {
                    let plan = next_step(current, target);
                    current = match plan {
                        Plan::Done => {
                            done = true;
                            break;
                        }
                        Plan::Create | Plan::Start | Plan::Resume => Some(S::Running),
                        Plan::Pause => Some(S::Paused),
                        Plan::Suspend => Some(S::Suspended),
                        Plan::Stop => Some(S::Stopped),
                        Plan::Terminate => None,
                        Plan::Wait | Plan::Impossible => panic!("{start:?} -> {target}: {plan:?}"),
                    };
                }
                assert!(
                    done || (target == S::Stopped && start == Some(S::Error)),
                    "{start:?} -> {target}"
                );
            }
        }
    }

    #[test]
    fn transitional_states_wait() {
        assert_eq!(next_step(Some(S::Booting), S::Running), Plan::Wait);
        assert_eq!(next_step(Some(S::Booting), S::Terminated), Plan::Terminate);
    }
}

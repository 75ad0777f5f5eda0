//! Waiting for an action to be done: `herd vm pause web && herd vm resume web` must
//! work, so an action returns only once the host reports the state it asked for, or
//! fails with the reason the VM's events give. Whether a VM's view means done, not yet
//! or failed is one pure function ([`judge`]); the loop around it only polls and draws.

use crate::client::Client;
use anyhow::{bail, Result};
use herd_proto::VmState;
use herd_server::api::VmView;
use indicatif::ProgressBar;
use std::time::{Duration, Instant};

/// How often the CLI reads the VM while it waits. The agent reports a command's result
/// at once, so a short interval is what makes the wait end close to the real change.
const POLL: Duration = Duration::from_millis(100);

/// What the waiter waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// The host reports this state.
    State(VmState),
    /// The record is gone (`herd vm rm`).
    Gone,
}

/// Where a wait stands after one read of the VM.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Done,
    Waiting,
    Failed(String),
}

/// Judges one read of a VM (`None`: the record is gone) against the goal of an action
/// that left the VM at `generation`.
pub fn judge(goal: Goal, generation: u64, view: Option<&VmView>) -> Verdict {
    let Some(view) = view else {
        return match goal {
            Goal::Gone => Verdict::Done,
            Goal::State(_) => Verdict::Failed("the VM was deleted".into()),
        };
    };
    if let Goal::State(target) = goal {
        if view.state == target {
            return Verdict::Done;
        }
    }
    if view.generation > generation {
        return Verdict::Failed(format!(
            "another request changed what it should be: desired {} now",
            view.desired_state
        ));
    }
    if view.state == VmState::Error {
        let reason = view.last_error.as_deref().unwrap_or("no reason given");
        return Verdict::Failed(format!("it went to error: {reason}"));
    }
    if goal != Goal::Gone && view.state.is_final() {
        return Verdict::Failed(format!("it ended as {}", view.state));
    }
    Verdict::Waiting
}

/// Why a launch should stop waiting: the VM has been pending with a reason from the
/// scheduler for `patience` (it stays pending, and is placed once a host has room).
pub fn stuck_pending(
    view: &VmView,
    waited: Duration,
    patience: Option<Duration>,
) -> Option<String> {
    let patience = patience?;
    if view.state != VmState::Pending || waited < patience {
        return None;
    }
    view.pending_reason.clone()
}

/// Polls the VM until the goal holds, showing the states it passes on a spinner when
/// stderr is a terminal. Fails with the reason the VM's events or error give.
pub async fn until(
    client: &Client,
    view: &VmView,
    goal: Goal,
    timeout: Duration,
    patience: Option<Duration>,
) -> Result<VmView> {
    let started = Instant::now();
    let spinner = spinner(&view.name, goal);
    let mut last = view.clone();
    loop {
        let read: Option<VmView> = client
            .get_if_exists(&format!("/v1/vms/{}", view.id))
            .await?;
        if let Some(now) = &read {
            if now.state != last.state {
                spinner.set_message(format!("{} ({})", now.state, goal_text(goal)));
            }
            last = now.clone();
        }
        match judge(goal, view.generation, read.as_ref()) {
            Verdict::Done => {
                spinner.finish_and_clear();
                return Ok(last);
            }
            Verdict::Failed(why) => {
                spinner.finish_and_clear();
                let event = last_event(client, view).await.unwrap_or_default();
                bail!(
                    "{}: {why}{event}; see `herd vm events {}`",
                    view.name,
                    view.name
                );
            }
            Verdict::Waiting => {}
        }
        if let Some(why) = stuck_pending(&last, started.elapsed(), patience) {
            spinner.finish_and_clear();
            bail!(
                "{name}: cannot be placed: {why}; it stays pending and starts when a host has \
                 room (`herd vm rm {name}` gives up; `--wait-for-room` waits)",
                name = view.name
            );
        }
        if started.elapsed() > timeout {
            spinner.finish_and_clear();
            bail!(
                "{}: still {} after {} s (waiting for {}); it goes on in the background, \
                 see `herd vm events {}`",
                view.name,
                last.state,
                timeout.as_secs(),
                goal_text(goal),
                view.name
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn goal_text(goal: Goal) -> String {
    match goal {
        Goal::State(state) => state.to_string(),
        Goal::Gone => "its record to go".into(),
    }
}

fn spinner(name: &str, goal: Goal) -> ProgressBar {
    crate::progress::spinner(name, format!("waiting for {}", goal_text(goal)))
}

/// The newest event with a message, as `" (last event: ...)"`; empty if none is found.
async fn last_event(client: &Client, view: &VmView) -> Option<String> {
    let events = super::all_events(client, view.id).await.ok()?;
    let event = events.iter().rev().find(|e| !e.message.is_empty())?;
    Some(format!(" (last event: {})", event.message))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vm(state: VmState, generation: u64) -> VmView {
        let text = format!(
            r#"{{"id":"00000000-0000-0000-0000-000000000001","name":"web","project":"default",
            "hypervisor":"qemu","vcpus":1,"memory_mib":128,"image":"base","command":[],
            "policy":{{}},"keep_running":false,"disk_mib":0,"host":null,
            "desired_state":"running","state":"{state}","generation":{generation},
            "state_since":"","last_error":null,"deleting":false,"created_at":"",
            "updated_at":"","usage":null,"guest":null}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn the_target_state_is_done_and_the_states_on_the_way_are_waiting() {
        let goal = Goal::State(VmState::Paused);
        assert_eq!(
            judge(goal, 3, Some(&vm(VmState::Running, 3))),
            Verdict::Waiting
        );
        assert_eq!(judge(goal, 3, Some(&vm(VmState::Paused, 3))), Verdict::Done);
        // Done even if someone asked for more since: what was asked happened.
        assert_eq!(judge(goal, 3, Some(&vm(VmState::Paused, 4))), Verdict::Done);
    }

    #[test]
    fn an_error_a_final_state_or_a_newer_request_fails_the_wait() {
        let goal = Goal::State(VmState::Running);
        let mut broken = vm(VmState::Error, 2);
        broken.last_error = Some("qemu exited".into());
        assert_eq!(
            judge(goal, 2, Some(&broken)),
            Verdict::Failed("it went to error: qemu exited".into())
        );
        assert!(matches!(
            judge(goal, 2, Some(&vm(VmState::Terminated, 2))),
            Verdict::Failed(why) if why.contains("terminated")
        ));
        assert!(matches!(
            judge(goal, 2, Some(&vm(VmState::Booting, 3))),
            Verdict::Failed(why) if why.contains("another request")
        ));
        assert!(matches!(judge(goal, 2, None), Verdict::Failed(_)));
    }

    #[test]
    fn a_launch_stops_waiting_on_a_vm_no_host_can_take() {
        let mut pending = vm(VmState::Pending, 1);
        let patience = Some(Duration::from_secs(10));
        // No reason yet, or not long enough: keep waiting.
        assert_eq!(
            stuck_pending(&pending, Duration::from_secs(30), patience),
            None
        );
        pending.pending_reason = Some("none of 2 hosts fits: 2 short of memory".into());
        assert_eq!(
            stuck_pending(&pending, Duration::from_secs(3), patience),
            None
        );
        assert_eq!(
            stuck_pending(&pending, Duration::from_secs(10), patience).as_deref(),
            Some("none of 2 hosts fits: 2 short of memory")
        );
        // --wait-for-room, or the VM got a host: no.
        assert_eq!(stuck_pending(&pending, Duration::from_secs(60), None), None);
        let mut booting = pending.clone();
        booting.state = VmState::Booting;
        assert_eq!(
            stuck_pending(&booting, Duration::from_secs(60), patience),
            None
        );
    }

    #[test]
    fn a_removal_is_done_when_the_record_is_gone() {
        assert_eq!(
            judge(Goal::Gone, 5, Some(&vm(VmState::Terminating, 5))),
            Verdict::Waiting
        );
        assert_eq!(
            judge(Goal::Gone, 5, Some(&vm(VmState::Terminated, 5))),
            Verdict::Waiting
        );
        assert_eq!(judge(Goal::Gone, 5, None), Verdict::Done);
    }
}

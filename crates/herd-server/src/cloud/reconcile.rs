//! The reconciler: desired state carried to hosts as level-triggered commands,
//! pending VMs placed, lifespans the server can judge alone enforced.

use super::{shape_of, Cloud, CloudError};
use crate::store::{now_ms, NewEvent, Observation, VmRecord};
use herd_proto::policy::{PolicyAction, PolicySpec};
use herd_proto::wire::{Command, CommandId, HostId, VmId};
use herd_proto::VmState;
use std::sync::atomic::Ordering;

/// How many VMs the reconciler takes from the store at a time.
const RECONCILE_SLICE: usize = 5_000;

/// How long after a lifespan's end the server acts for a guest that has not.
const LIFESPAN_GRACE_MS: i64 = 5_000;

/// The action the server takes at `now_ms` for a VM created at `created_at_ms`, if its
/// lifespan ended more than [`LIFESPAN_GRACE_MS`] ago: the guest should have acted
/// itself by then.
fn lifespan_action(policy: &PolicySpec, created_at_ms: i64, now_ms: i64) -> Option<PolicyAction> {
    let lifespan = policy.lifespan?;
    let by_duration = lifespan.max_seconds.map(|s| {
        created_at_ms.saturating_add(i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000))
    });
    let by_time = lifespan
        .end_at
        .map(|t| i64::try_from(t).unwrap_or(i64::MAX).saturating_mul(1000));
    let deadline = by_duration.into_iter().chain(by_time).min()?;
    (now_ms >= deadline.saturating_add(LIFESPAN_GRACE_MS)).then_some(lifespan.enforce.action)
}

impl Cloud {
    /// Time-based policies the server can judge by itself: a VM past its lifespan is
    /// given its action as desired state, a little after the guest should have acted.
    /// This also keeps a queued "run" command from reviving a VM whose lifespan ended
    /// while nobody was listening: the new generation supersedes it in the queue.
    fn enforce_lifespans(&self, now_ms: i64) -> Result<(), CloudError> {
        for vm in self.store.vms_with_lifespan()? {
            if let Some(action) = lifespan_action(&vm.policy, vm.created_at_ms, now_ms) {
                self.policy_desired(vm.id, action, "policy lifespan (server)")?;
            }
        }
        Ok(())
    }

    /// One pass of the reconciler: enforce lifespans, place pending VMs, send commands
    /// for desired states not yet sent. Works in slices of [`RECONCILE_SLICE`] VMs, each
    /// slice's commands queued and recorded in one write each.
    pub async fn reconcile_once(&self) -> Result<(), CloudError> {
        let now = now_ms();
        crate::blocking(|| self.enforce_lifespans(now))?;
        let mut after = None;
        loop {
            let slice = crate::blocking(|| self.store.vms_needing_work(after, RECONCILE_SLICE))?;
            let Some(last) = slice.last() else {
                return Ok(());
            };
            after = Some(last.id);
            let full = slice.len() == RECONCILE_SLICE;
            let commands = crate::blocking(|| -> Result<_, CloudError> {
                let mut commands = Vec::new();
                for vm in slice {
                    match vm.host {
                        None => {
                            if let Some(host) = self.place_pending(&vm, now)? {
                                commands.push((host, vm));
                            }
                        }
                        Some(host) => commands.push((host, vm)),
                    }
                }
                Ok(commands)
            })?;
            self.publish(&commands).await?;
            if !full {
                return Ok(());
            }
        }
    }

    /// Why a pending VM is not placed yet, as the last scheduling pass found.
    pub fn pending_reason(&self, vm: VmId) -> Option<String> {
        self.pending_reasons.lock().get(&vm).cloned()
    }

    /// Places a VM that has no host yet, if it may and can be; or ends it, if it was
    /// terminated first. Returns its new host.
    fn place_pending(&self, vm: &VmRecord, now_ms: i64) -> Result<Option<HostId>, CloudError> {
        if vm.desired == VmState::Terminated {
            self.store.observe(&[Observation {
                vm: vm.id,
                state: VmState::Terminated,
                purge: vm.deleting,
                host: None,
                events: vec![NewEvent {
                    vm: Some(vm.id),
                    kind: "vm.state",
                    from: Some(vm.observed),
                    to: Some(VmState::Terminated),
                    message: "terminated before it was placed".into(),
                    ..NewEvent::default()
                }],
            }])?;
            self.pending_reasons.lock().remove(&vm.id);
            return Ok(None);
        }
        let why = match self.activation_wait(vm, now_ms)? {
            Some(why) => why,
            None => match self.try_place(vm.id, &shape_of(vm)) {
                Ok(host) => {
                    if let Err(e) = self.store.assign_host(
                        vm.id,
                        host,
                        &NewEvent {
                            vm: Some(vm.id),
                            host: Some(host),
                            kind: "vm.state",
                            from: Some(VmState::Pending),
                            to: Some(VmState::Scheduled),
                            message: format!("scheduled on host {host}"),
                        },
                    ) {
                        self.release(vm.id);
                        return Err(e.into());
                    }
                    self.pending_reasons.lock().remove(&vm.id);
                    return Ok(Some(host));
                }
                Err(reason) => format!("waiting for capacity: {reason}"),
            },
        };
        // Say why once, not every pass.
        let mut reasons = self.pending_reasons.lock();
        if reasons.get(&vm.id) != Some(&why) {
            reasons.insert(vm.id, why.clone());
            drop(reasons);
            self.store.append_event(&NewEvent {
                vm: Some(vm.id),
                kind: "vm.pending",
                message: why,
                ..NewEvent::default()
            })?;
        }
        Ok(None)
    }

    /// Why a pending VM may not be placed yet, if its activation has not come.
    fn activation_wait(&self, vm: &VmRecord, now_ms: i64) -> Result<Option<String>, CloudError> {
        let Some(activation) = vm.policy.activation else {
            return Ok(None);
        };
        if let Some(start_at) = activation.start_at {
            if now_ms / 1000 < i64::try_from(start_at).unwrap_or(i64::MAX) {
                return Ok(Some(format!("waiting for its start time ({start_at})")));
            }
        }
        if let Some(after) = activation.after_vm {
            let completed = match self.store.vm(after)? {
                // Gone, or ended: the awaited VM has completed.
                None => true,
                Some(other) => {
                    matches!(other.observed, VmState::Stopped | VmState::Terminated)
                        || self.guest(after).is_some_and(|g| g.exit_code.is_some())
                }
            };
            if !completed {
                return Ok(Some(format!("waiting for VM {after} to complete")));
            }
        }
        Ok(None)
    }

    /// Queues each VM's command for its desired state on its host, then records them
    /// as queued.
    async fn publish(&self, vms: &[(HostId, VmRecord)]) -> Result<(), CloudError> {
        if vms.is_empty() {
            return Ok(());
        }
        let commands: Vec<(HostId, Command)> = vms
            .iter()
            .map(|(host, vm)| {
                let command = Command {
                    id: CommandId {
                        vm: vm.id,
                        generation: vm.generation,
                    },
                    spec: self.spec_of(vm),
                    target: vm.desired,
                };
                (*host, command)
            })
            .collect();
        // Queue first, then record; a crash in between re-queues the same ids, which
        // the bus keeps once.
        self.bus.publish(&commands).await?;
        let issued: Vec<(VmId, u64)> = vms.iter().map(|(_, vm)| (vm.id, vm.generation)).collect();
        crate::blocking(|| self.store.mark_issued(&issued))?;
        self.metrics
            .commands_published
            .fetch_add(commands.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::policy::{Enforcement, Lifespan};

    fn lifespan(max_seconds: Option<u64>, end_at: Option<u64>) -> PolicySpec {
        PolicySpec {
            lifespan: Some(Lifespan {
                max_seconds,
                end_at,
                enforce: Enforcement {
                    action: PolicyAction::Terminate,
                    warn: None,
                },
            }),
            ..PolicySpec::default()
        }
    }

    #[test]
    fn a_lifespan_is_enforced_only_after_its_grace() {
        let policy = lifespan(Some(60), None);
        let end = 1_000 + 60_000;
        assert_eq!(lifespan_action(&policy, 1_000, end), None);
        assert_eq!(
            lifespan_action(&policy, 1_000, end + LIFESPAN_GRACE_MS - 1),
            None
        );
        assert_eq!(
            lifespan_action(&policy, 1_000, end + LIFESPAN_GRACE_MS),
            Some(PolicyAction::Terminate)
        );
    }

    #[test]
    fn the_earlier_of_duration_and_end_time_counts() {
        // Ends at t = 10 s by the clock, long before its hour is up.
        let policy = lifespan(Some(3_600), Some(10));
        assert_eq!(
            lifespan_action(&policy, 0, 10_000 + LIFESPAN_GRACE_MS),
            Some(PolicyAction::Terminate)
        );
        assert_eq!(lifespan_action(&PolicySpec::default(), 0, i64::MAX), None);
        // Absurd values saturate instead of wrapping into the past.
        let policy = lifespan(Some(u64::MAX), Some(u64::MAX));
        assert_eq!(lifespan_action(&policy, i64::MAX, 0), None);
    }
}

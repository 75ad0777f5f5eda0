//! What a report changes: applied to the host's view, checked against the server's
//! placement (an agent speaks only for its own VMs), turned into store writes and the
//! lifecycle events that explain them.

use super::ACK_EVERY;
use crate::cloud::{Cloud, CloudError, Metrics};
use crate::group_commit::Pending;
use crate::store::{NewEvent, Observation};
use herd_proto::lifecycle::explain;
use herd_proto::wire::{HostId, Report, ServerMsg, VmEvent, VmId};
use herd_proto::VmState;
use herd_sync::{Applied, HostView, ViewChange};
use tracing::{debug, warn};

fn event_of(host: HostId, event: &VmEvent) -> NewEvent {
    let message = match (&event.message, event.event) {
        (Some(message), _) => message.clone(),
        (None, Some(flow_event)) if event.inferred => {
            format!("{flow_event} (inferred: the state between was not observed)")
        }
        (None, Some(flow_event)) => flow_event.to_string(),
        (None, None) => "changed".into(),
    };
    NewEvent {
        vm: Some(event.vm),
        host: Some(host),
        kind: if event.event.is_some() {
            "vm.state"
        } else {
            "vm.state_error"
        },
        from: Some(event.from),
        to: Some(event.to),
        message,
    }
}

/// Applies one state report to the host's view and the store; returns the answer for
/// the agent (an ack, a request for a full report, or nothing for a stale report).
/// The changes are durable when this returns.
pub async fn apply_report(
    cloud: &Cloud,
    host: HostId,
    view: &mut HostView,
    report: &Report,
) -> Result<Option<ServerMsg>, CloudError> {
    let (reply, written) = apply_report_behind(cloud, host, view, report)?;
    if let Some(written) = written {
        written.durable().await?;
    }
    Ok(reply)
}

/// Applies one state report to the host's view and hands its changes, if any, to the
/// write-behind: they are the server's view when this returns, and on disk when the
/// returned [`Pending`] resolves.
pub fn apply_report_behind(
    cloud: &Cloud,
    host: HostId,
    view: &mut HostView,
    report: &Report,
) -> Result<(Option<ServerMsg>, Option<Pending>), CloudError> {
    if report.is_full() {
        Metrics::inc(&cloud.metrics.reports_full);
    } else {
        Metrics::inc(&cloud.metrics.reports_delta);
    }
    Ok(match view.apply(report) {
        Applied::InOrder {
            epoch,
            seq,
            changes,
        } => {
            // Acks are cumulative: a heartbeat that changed nothing is acknowledged by
            // the next ack, or every tenth report, which keeps heartbeats one-way.
            let ack = !changes.is_empty() || report.is_full() || seq % ACK_EVERY == 0;
            let written = if changes.is_empty() {
                None
            } else {
                Some(apply_changes(cloud, host, report, changes)?)
            };
            (ack.then_some(ServerMsg::Ack { epoch, seq }), written)
        }
        Applied::Stale => (None, None),
        Applied::NeedFull { reason } => {
            debug!(%host, "asking for a full report: {reason}");
            Metrics::inc(&cloud.metrics.full_requests);
            (Some(ServerMsg::NeedFull { reason }), None)
        }
    })
}

/// The lifecycle events explaining a change the store saw: one per edge of the flow,
/// with missed states filled in on a unique path. The agent derives the same from the
/// same table and sends only what does not fit, so normal events cost no bytes.
fn derived_events(host: HostId, vm: VmId, from: VmState, to: VmState) -> Vec<NewEvent> {
    if let Some(steps) = explain(from, to).steps() {
        return steps
            .into_iter()
            .map(|(step, inferred)| NewEvent {
                vm: Some(vm),
                host: Some(host),
                kind: "vm.state",
                from: Some(step.from),
                to: Some(step.to),
                message: if inferred {
                    format!(
                        "{} (inferred: the state between was not observed)",
                        step.event
                    )
                } else {
                    step.event.to_string()
                },
            })
            .collect();
    }
    // Back from an unreachable host: whatever it reports now is the truth.
    if from != VmState::Unknown {
        return vec![];
    }
    vec![NewEvent {
        vm: Some(vm),
        host: Some(host),
        kind: "vm.state",
        from: Some(from),
        to: Some(to),
        message: "host reachable again".into(),
    }]
}

/// The server's record of a VM a host reported, if it is that host's: anything else is
/// dropped and counted.
fn checked_brief(
    cloud: &Cloud,
    host: HostId,
    vm: VmId,
) -> Result<Option<crate::store::VmBrief>, CloudError> {
    let Some(record) = cloud.vm_brief(vm)? else {
        warn!(%host, %vm, "report about a VM the server does not know; ignored");
        Metrics::inc(&cloud.metrics.rejected_reports);
        return Ok(None);
    };
    if record.host != Some(host) {
        warn!(%host, %vm, "report about another host's VM; ignored");
        Metrics::inc(&cloud.metrics.rejected_reports);
        return Ok(None);
    }
    Ok(Some(record))
}

/// Hands the view's changes to the write-behind, with the events that explain them.
fn apply_changes(
    cloud: &Cloud,
    host: HostId,
    report: &Report,
    changes: Vec<ViewChange>,
) -> Result<Pending, CloudError> {
    let mut observations = Vec::new();
    let mut released = Vec::new();
    for change in changes {
        match change {
            ViewChange::Upsert {
                vm: vm_id,
                before,
                state,
            } => {
                // A VM placed on this host that changes state needs no store read: the
                // view's state before the change is the server's, since the view starts
                // from it and the only other writer of a placed VM's state, a host-down
                // mark, makes the view start over. So a burst of changes costs no disk.
                let from = match before {
                    Some(before) if cloud.vm_on_host_now(vm_id, host) => before,
                    _ => match checked_brief(cloud, host, vm_id)? {
                        Some(record) => record.observed,
                        None => continue,
                    },
                };
                if from == state {
                    // The server's record says so already (a migration's commit wrote
                    // the state the new host now reports).
                    continue;
                }
                Metrics::inc(&cloud.metrics.vm_state_changes);
                let mut events = derived_events(host, vm_id, from, state);
                // What the agent found anomalous (and the server cannot derive if the
                // agent saw states the server never did) comes with the report.
                events.extend(
                    report
                        .events
                        .iter()
                        .filter(|e| e.vm == vm_id)
                        .map(|e| event_of(host, e)),
                );
                if events.is_empty() {
                    events.push(NewEvent {
                        vm: Some(vm_id),
                        host: Some(host),
                        kind: "vm.state_error",
                        from: Some(from),
                        to: Some(state),
                        message: format!(
                            "now {state}, which the flow does not lead to from {from} in a unique way"
                        ),
                    });
                }
                observations.push(Observation {
                    vm: vm_id,
                    state,
                    purge: false,
                    host: Some(host),
                    events,
                });
            }
            ViewChange::Removed { vm: vm_id, before } => {
                let Some(record) = checked_brief(cloud, host, vm_id)? else {
                    continue;
                };
                Metrics::inc(&cloud.metrics.vm_state_changes);
                if record.desired == VmState::Terminated {
                    released.push(vm_id);
                    observations.push(Observation {
                        vm: vm_id,
                        state: VmState::Terminated,
                        purge: record.deleting,
                        host: Some(host),
                        events: vec![NewEvent {
                            vm: Some(vm_id),
                            host: Some(host),
                            kind: if record.deleting {
                                "vm.purged"
                            } else {
                                "vm.state"
                            },
                            from: Some(before),
                            to: Some(if record.deleting {
                                VmState::Purged
                            } else {
                                VmState::Terminated
                            }),
                            message: if record.deleting {
                                "terminated and deleted".into()
                            } else {
                                "terminated".into()
                            },
                        }],
                    });
                } else {
                    observations.push(Observation {
                        vm: vm_id,
                        state: VmState::Error,
                        purge: false,
                        host: Some(host),
                        events: vec![NewEvent {
                            vm: Some(vm_id),
                            host: Some(host),
                            kind: "vm.state_error",
                            from: Some(before),
                            to: Some(VmState::Error),
                            message: "vanished from its host without being terminated".into(),
                        }],
                    });
                }
            }
        }
    }
    let written = cloud
        .commits
        .hand_over(Some(host), observations, Vec::new());
    for vm in released {
        cloud.release(vm);
    }
    Ok(written)
}

//! What guest modules report through their agents, and the policy decisions the
//! server takes on their behalf (a guest that acts, a backstop that acted).

use super::{Cloud, CloudError, GuestInfo};
use crate::store::{now_ms, NewEvent};
use herd_proto::policy::PolicyAction;
use herd_proto::wire::{GuestReport, HostId, VmId};
use herd_proto::VmState;
use tracing::warn;

impl Cloud {
    pub fn guest(&self, id: VmId) -> Option<GuestInfo> {
        self.guests.lock().get(&id).cloned()
    }

    /// The policy rules that guests say will act within `seconds`, soonest first:
    /// (VM, rule, its text, seconds left).
    pub fn policies_acting_within(&self, seconds: u64) -> Vec<(VmId, String, String, u64)> {
        let mut soon: Vec<(VmId, String, String, u64)> = self
            .guests
            .lock()
            .iter()
            .flat_map(|(vm, info)| {
                info.policy_progress
                    .iter()
                    .filter_map(move |(rule, text, _, left)| match left {
                        Some(left) if *left <= seconds => {
                            Some((*vm, rule.clone(), text.clone(), *left))
                        }
                        _ => None,
                    })
            })
            .collect();
        soon.sort_by_key(|s| s.3);
        soon
    }

    /// Records a guest report relayed by the VM's host. Returns false if the VM is not
    /// placed on that host (the report is dropped).
    pub fn record_guest(
        &self,
        host: HostId,
        vm: VmId,
        report: &GuestReport,
    ) -> Result<bool, CloudError> {
        if !self.vm_on_host(vm, host) {
            return Ok(false);
        }
        if let GuestReport::PolicyAction { action, rule, .. } = report {
            if !self.policy_allows(vm, *action)? {
                warn!(%vm, %host, rule, action = action.as_str(), "guest claimed an action its policy does not have; ignored");
                return Ok(false);
            }
        }
        let now = now_ms();
        let event = {
            let mut guests = self.guests.lock();
            let info = guests.entry(vm).or_default();
            info.last_report_at_ms = now;
            match report {
                GuestReport::Hello { guest_version } => {
                    // A guest greets at boot and again when its host greets it: one
                    // event per boot is enough.
                    let repeated = info
                        .hello_at_ms
                        .is_some_and(|at| now.saturating_sub(at) < 10_000);
                    *info = GuestInfo {
                        version: Some(guest_version.clone()),
                        hello_at_ms: Some(now),
                        last_report_at_ms: now,
                        ..GuestInfo::default()
                    };
                    (!repeated).then(|| {
                        (
                            "vm.guest",
                            format!("guest module {guest_version} said hello"),
                        )
                    })
                }
                GuestReport::Status {
                    uptime_ms,
                    workload_running,
                    guest_rss_kib,
                } => {
                    info.uptime_ms = Some(*uptime_ms);
                    info.workload_running = Some(*workload_running);
                    info.guest_rss_kib = Some(*guest_rss_kib);
                    None
                }
                GuestReport::WorkloadExit { code } => {
                    info.exit_code = Some(*code);
                    info.workload_running = Some(false);
                    Some((
                        "vm.workload_exit",
                        format!("workload exited with code {code}"),
                    ))
                }
                GuestReport::Error { message } => {
                    info.last_error = Some(message.clone());
                    Some(("vm.guest_error", format!("guest reports: {message}")))
                }
                GuestReport::PolicyWarning { rule, message } => {
                    Some(("vm.policy_warning", format!("{rule}: {message}")))
                }
                GuestReport::PolicyAction {
                    rule,
                    action,
                    reason,
                } => Some((
                    "vm.policy_action",
                    format!("{rule}: {} ({reason}), by the guest", action.as_str()),
                )),
                GuestReport::PolicyProgress { items } => {
                    info.policy_progress = items.clone();
                    None
                }
            }
        };
        if let Some((kind, message)) = event {
            self.store.append_event(&NewEvent {
                vm: Some(vm),
                host: Some(host),
                kind,
                message,
                ..NewEvent::default()
            })?;
        }
        match report {
            GuestReport::PolicyAction { rule, action, .. } => {
                self.policy_desired(vm, *action, &format!("policy {rule} (guest)"))?;
            }
            GuestReport::WorkloadExit { code } => self.job_workload_exited(vm, *code)?,
            _ => {}
        }
        Ok(true)
    }

    /// The agent's backstop enforced a policy on one of its VMs.
    pub fn record_backstop(
        &self,
        host: HostId,
        vm: VmId,
        rule: &str,
        action: PolicyAction,
        reason: &str,
    ) -> Result<bool, CloudError> {
        if !self.vm_on_host(vm, host) || !self.policy_allows(vm, action)? {
            return Ok(false);
        }
        self.store.append_event(&NewEvent {
            vm: Some(vm),
            host: Some(host),
            kind: "vm.policy_action",
            message: format!(
                "{rule}: {} ({reason}), by the host's backstop",
                action.as_str()
            ),
            ..NewEvent::default()
        })?;
        self.policy_desired(vm, action, &format!("policy {rule} (host backstop)"))?;
        Ok(true)
    }

    fn policy_allows(&self, vm: VmId, action: PolicyAction) -> Result<bool, CloudError> {
        Ok(self
            .store
            .vm(vm)?
            .is_some_and(|record| record.policy.allows(action)))
    }

    /// Makes a policy action the VM's desired state, so the reconciler carries it out
    /// and a later restart does not undo it.
    pub(crate) fn policy_desired(
        &self,
        vm: VmId,
        action: PolicyAction,
        why: &str,
    ) -> Result<(), CloudError> {
        let target = match action {
            PolicyAction::Notify => return Ok(()),
            PolicyAction::Suspend => VmState::Suspended,
            PolicyAction::Stop => VmState::Stopped,
            PolicyAction::Terminate => VmState::Terminated,
        };
        let Some(record) = self.store.vm(vm)? else {
            return Ok(());
        };
        if record.desired == target || record.desired == VmState::Terminated {
            return Ok(());
        }
        self.store.set_desired(
            vm,
            target,
            false,
            &NewEvent {
                vm: Some(vm),
                host: record.host,
                kind: "vm.action",
                message: format!("{why}: desired state {target}"),
                ..NewEvent::default()
            },
        )?;
        self.reconcile_now.notify_one();
        Ok(())
    }
}

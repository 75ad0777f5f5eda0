//! Bursts as the server sees them: a user's ask passed to the VM's host, and the leases
//! hosts report.
//!
//! The host decides and keeps every lease (see the agent's `bursts`): the server adds
//! only what the host cannot know, the caller's rights and project, and relays the
//! answer. What is in force is what the hosts last said, each host's report replacing
//! its previous one whole; a host that disconnects takes its leases with it from this
//! view until it reconnects and says them again, because nobody else can vouch for
//! them meanwhile.

pub mod book;

use crate::billing;
use crate::cloud::{Cloud, CloudError};
use crate::store::{BurstRow, VmRecord};
use herd_proto::burst::{BurstAnswer, BurstAsk, BurstLease, BurstLimits};
use herd_proto::wire::ServerMsg;
use std::time::Duration;

/// The types whose VMs burst: a container's limits change while it runs; a qemu
/// VM's vCPUs and memory are fixed when it boots.
const BURSTABLE: &[&str] = &["oci"];

/// How long a user's ask waits for its host.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

impl Cloud {
    /// What a VM of `project` may burst by: its admin-set limits, else the defaults
    /// (two vCPUs and 2 GiB more, for up to an hour).
    pub fn burst_limits(&self, project: &str) -> BurstLimits {
        self.tenancy.burst_limits(project)
    }

    /// Refuses a burst whose most it could cost would take its project past its 30-day
    /// budget: its memory and vCPUs at the rate card's prices for the whole lease, and
    /// every burst vCPU busy throughout at the dearer CPU-second price.
    fn check_burst_budget(&self, project: &str, ask: &BurstAsk) -> Result<(), CloudError> {
        let Some(budget) = self
            .tenancy
            .project(project)
            .and_then(|p| p.quota.budget_micros)
        else {
            return Ok(());
        };
        let budget = budget.max(0) as u64;
        let rates = self.rate_card(project)?;
        let now = crate::store::now_ms();
        let burst = BurstRow {
            cpus: ask.cpus,
            memory_mib: ask.memory_mib,
            from_ms: now,
            to_ms: now.saturating_add(i64::from(ask.seconds) * 1000),
        };
        let (_, fine) = billing::bill_burst(&rates, &burst, burst.from_ms, burst.to_ms);
        let per_cpu_second = rates.per_cpu_second.peak.max(rates.per_cpu_second.off_peak);
        let cpu = u64::from(ask.cpus)
            .saturating_mul(u64::from(ask.seconds))
            .saturating_mul(per_cpu_second);
        let most = herd_policy::fine_to_micros(fine).saturating_add(cpu);
        let spent = self.spent_last_30_days(project)?;
        if spent.saturating_add(most) > budget {
            return Err(CloudError::Conflict {
                code: "burst_denied",
                message: format!(
                    "over budget: the burst could cost up to {}, and project {project:?} has \
                     spent {} of its 30-day budget of {}",
                    billing::format_money(most),
                    billing::format_money(spent),
                    billing::format_money(budget)
                ),
            });
        }
        Ok(())
    }

    /// Asks the VM's host for a burst and returns its answer: the lease granted, or a
    /// conflict saying why not with the figures the host decided by. `vm` is the record
    /// as the caller read it (with its rights checked).
    pub async fn burst(&self, vm: &VmRecord, ask: BurstAsk) -> Result<BurstLease, CloudError> {
        let conflict = |code: &'static str, message: String| CloudError::Conflict { code, message };
        // What no host could grant is refused here, in the words a host would use.
        ask.check(&self.burst_limits(&vm.project))
            .map_err(|e| crate::cloud::invalid("burst", e.to_string()))?;
        if !BURSTABLE.contains(&vm.hypervisor.as_str()) {
            return Err(conflict(
                "cannot_burst",
                format!(
                    "VM {} is a {} VM: only {} VMs burst (a qemu VM's vCPUs and memory are \
                     fixed when it boots; resize it instead)",
                    vm.name,
                    vm.hypervisor,
                    BURSTABLE.join(", ")
                ),
            ));
        }
        if vm.observed != herd_proto::VmState::Running {
            return Err(conflict(
                "not_running",
                format!(
                    "VM {} is {}: only a running VM can burst",
                    vm.name, vm.observed
                ),
            ));
        }
        let Some(host) = vm.host else {
            return Err(conflict(
                "not_placed",
                format!("VM {} is not on a host", vm.name),
            ));
        };
        crate::blocking(|| self.check_burst_budget(&vm.project, &ask))?;
        let (request, rx) = self.bursts.waiters.wait_for((host, vm.id));
        let sent = self.send_to_agent(
            host,
            ServerMsg::Burst {
                request,
                vm: vm.id,
                ask,
            },
        );
        let answer = if sent {
            match tokio::time::timeout(ANSWER_WITHIN, rx).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(_)) => Err(format!("the host of VM {} disconnected", vm.name)),
                Err(_) => Err(format!(
                    "the host of VM {} did not answer within {} s",
                    vm.name,
                    ANSWER_WITHIN.as_secs()
                )),
            }
        } else {
            Err(format!("the host of VM {} is not connected", vm.name))
        };
        self.bursts.waiters.forget(request);
        match answer {
            Ok(BurstAnswer::Granted(lease)) => {
                self.bursts.granted(host, vm.id, lease);
                Ok(lease)
            }
            Ok(BurstAnswer::Denied { reason }) => Err(conflict("burst_denied", reason)),
            Err(why) => Err(conflict("host_unreachable", why)),
        }
    }
}

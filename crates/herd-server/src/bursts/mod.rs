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

use crate::cloud::{Cloud, CloudError};
use herd_proto::burst::{BurstAnswer, BurstAsk, BurstLease, BurstLimits};
use herd_proto::wire::ServerMsg;
use std::time::Duration;

/// How long a user's ask waits for its host.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

impl Cloud {
    /// What a VM of `project` may burst by. Every project has the default limits for
    /// now: two vCPUs and 2 GiB more, for up to an hour.
    pub fn burst_limits(&self, _project: &str) -> BurstLimits {
        BurstLimits::default()
    }

    /// Asks the VM's host for a burst and returns its answer: the lease granted, or a
    /// conflict saying why not with the figures the host decided by.
    pub async fn burst(&self, id: &str, ask: BurstAsk) -> Result<BurstLease, CloudError> {
        let vm = self.vm(id)?;
        let conflict = |code: &'static str, message: String| CloudError::Conflict { code, message };
        // What no host could grant is refused here, in the words a host would use.
        ask.check(&self.burst_limits(&vm.project))
            .map_err(|e| crate::cloud::invalid("burst", e.to_string()))?;
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
        let (request, rx) = self.bursts.wait_for(host, vm.id);
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
        self.bursts.forget(request);
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

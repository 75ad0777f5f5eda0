//! The agent's policy backstop: the same self-management policies the guest module enforces,
//! evaluated from host-side measurements, so a guest that kills its module or lies
//! about its usage is still held to its policy.
//!
//! The guest normally acts first; the backstop then has nothing to do. It acts itself
//! when its own verdict is `GRACE` old and the VM still runs, or at once when the guest
//! module has gone silent. Host measurements include the hypervisor's own work (boot,
//! emulation), so usage is counted from the first sample after the guest said hello,
//! not from the QEMU process's start.

use herd_policy::{Evaluator, EvaluatorState, Sample, Verdict, Workload};
use herd_proto::policy::{PolicyAction, PolicySpec};
use herd_proto::wire::{VmId, VmUsage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How long the guest gets to act on a verdict before the backstop does. The guest
/// checks its policies once a second, and its action reaches the agent as the VM's new
/// state; under TCG on a busy host that has taken more than 2 s, and the backstop then
/// acted for a guest that was about to.
pub const GRACE_MS: u64 = 5_000;
/// A guest silent this long is presumed to have lost its module.
pub const GUEST_SILENT_MS: u64 = 8_000;

/// What the backstop keeps per VM, persisted with the agent's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Watched {
    pub policy: PolicySpec,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// When the agent was first asked to run the VM (its birth, for lifespans).
    pub born_ms: u64,
    /// Counters at the first sample after the guest said hello.
    pub base: Option<(u64, u64)>,
    pub evaluator: Option<EvaluatorState>,
    /// The action decided, and since when.
    pub pending: Option<(String, PolicyAction, String, u64)>,
    pub enforced: bool,
}

/// What the backstop decided for one VM in this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enforce {
    pub vm: VmId,
    pub rule: String,
    pub action: PolicyAction,
    pub reason: String,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Backstop {
    pub vms: BTreeMap<VmId, Watched>,
}

impl Backstop {
    /// Starts watching a VM with a policy (idempotent; a new policy replaces the old).
    pub fn watch(
        &mut self,
        vm: VmId,
        policy: PolicySpec,
        vcpus: u32,
        memory_mib: u64,
        now_ms: u64,
    ) {
        if policy.is_empty() {
            self.vms.remove(&vm);
            return;
        }
        match self.vms.get_mut(&vm) {
            Some(watched) if watched.policy == policy => {}
            _ => {
                self.vms.insert(
                    vm,
                    Watched {
                        policy,
                        vcpus,
                        memory_mib,
                        born_ms: now_ms,
                        base: None,
                        evaluator: None,
                        pending: None,
                        enforced: false,
                    },
                );
            }
        }
    }

    pub fn forget(&mut self, vm: VmId) {
        self.vms.remove(&vm);
    }

    /// One round: `usage` is host-side, `running` the VMs running with their guest's
    /// last word (unix ms, `None` if it never said hello), `now_ms` the wall clock.
    pub fn round(
        &mut self,
        now_ms: u64,
        usage: &BTreeMap<VmId, VmUsage>,
        running: &BTreeMap<VmId, Option<u64>>,
    ) -> Vec<Enforce> {
        let mut out = Vec::new();
        for (vm, watched) in self.vms.iter_mut() {
            let (Some(usage), Some(last_guest_word)) = (usage.get(vm), running.get(vm)) else {
                continue;
            };
            if watched.enforced || last_guest_word.is_none() {
                continue;
            }
            let net = usage.net_rx_bytes.saturating_add(usage.net_tx_bytes);
            let (base_cpu, base_net) = *watched.base.get_or_insert((usage.cpu_ms, net));
            let mut evaluator = match watched.evaluator.take() {
                Some(state) => Evaluator::restore(watched.policy, watched.vcpus, state),
                None => Evaluator::new(watched.policy, watched.vcpus, watched.born_ms)
                    .with_memory_mib(watched.memory_mib),
            };
            let sample = Sample {
                unix_ms: now_ms,
                cpu_ms: usage.cpu_ms.saturating_sub(base_cpu),
                mem_kib: usage.mem_kib,
                net_bytes: net.saturating_sub(base_net),
                workload: Workload::Running,
            };
            for verdict in evaluator.observe(&sample) {
                if let Verdict::Act {
                    rule,
                    action,
                    reason,
                } = verdict
                {
                    if watched.pending.is_none() {
                        watched.pending = Some((rule.as_str().to_owned(), action, reason, now_ms));
                    }
                }
            }
            watched.evaluator = Some(evaluator.state());
            if let Some((rule, action, reason, since)) = &watched.pending {
                let guest_silent =
                    last_guest_word.is_some_and(|at| now_ms.saturating_sub(at) > GUEST_SILENT_MS);
                if guest_silent || now_ms.saturating_sub(*since) >= GRACE_MS {
                    watched.enforced = true;
                    out.push(Enforce {
                        vm: *vm,
                        rule: rule.clone(),
                        action: *action,
                        reason: if guest_silent {
                            format!("{reason}; the guest module is silent")
                        } else {
                            format!("{reason}; the guest did not act")
                        },
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::policy::{Budget, Enforcement, Lifespan};

    fn usage(vm: VmId, cpu_ms: u64) -> BTreeMap<VmId, VmUsage> {
        BTreeMap::from([(
            vm,
            VmUsage {
                vm,
                cpu_ms,
                ..VmUsage::default()
            },
        )])
    }

    #[test]
    fn counts_from_hello_and_acts_after_grace_or_at_once_when_silent() {
        let vm = VmId::from_u128(1);
        let policy = PolicySpec {
            budget: Some(Budget {
                cpu_seconds: Some(3),
                mem_gib_hours_milli: None,
                net_bytes: None,
                enforce: Enforcement {
                    action: PolicyAction::Stop,
                    warn: None,
                },
            }),
            ..PolicySpec::default()
        };
        let mut backstop = Backstop::default();
        let t0 = 1_000_000;
        backstop.watch(vm, policy, 1, 128, t0 - 4_000);
        // Booting burned 5 s of host CPU before the guest said hello: not counted.
        let running = BTreeMap::from([(vm, Some(t0))]);
        assert!(backstop.round(t0, &usage(vm, 5_000), &running).is_empty());
        assert!(backstop
            .round(t0 + 1_000, &usage(vm, 7_000), &running)
            .is_empty());
        // 3.5 s since hello: the verdict, but the guest gets its grace period.
        assert!(backstop
            .round(t0 + 2_000, &usage(vm, 8_500), &running)
            .is_empty());
        assert!(backstop
            .round(t0 + 1_000 + GRACE_MS, &usage(vm, 9_000), &running)
            .is_empty());
        let acted = backstop.round(t0 + 2_000 + GRACE_MS, &usage(vm, 9_000), &running);
        assert_eq!(acted.len(), 1);
        assert_eq!(acted[0].action, PolicyAction::Stop);
        // Once.
        assert!(backstop
            .round(t0 + 3_000 + GRACE_MS, &usage(vm, 9_500), &running)
            .is_empty());
    }

    #[test]
    fn silent_guest_gets_no_grace() {
        let vm = VmId::from_u128(2);
        let policy = PolicySpec {
            lifespan: Some(Lifespan {
                max_seconds: Some(5),
                end_at: None,
                enforce: Enforcement {
                    action: PolicyAction::Terminate,
                    warn: None,
                },
            }),
            ..PolicySpec::default()
        };
        let mut backstop = Backstop::default();
        let t0 = 1_000_000;
        backstop.watch(vm, policy, 1, 128, t0);
        let said_hello = BTreeMap::from([(vm, Some(t0))]);
        assert!(backstop.round(t0, &usage(vm, 0), &said_hello).is_empty());
        // Ten seconds later the guest has said nothing since hello.
        let acted = backstop.round(t0 + 10_000, &usage(vm, 0), &said_hello);
        assert_eq!(acted.len(), 1);
        assert!(acted[0].reason.contains("silent"));
    }
}

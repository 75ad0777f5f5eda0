//! What the driver knows of one VM: its persisted record and what it reads from the
//! files QEMU and the guest leave behind (the pid, the console). A VM's state is
//! decided here, from an operation in flight, the record and the live process.

use super::launch::{Accel, VmPaths};
use super::procfs;
use crate::driver::DriverError;
use crate::drivers::channel;
use crate::drivers::console::{console_tail, policy_action_from_console, policy_powered_off};
use crate::persist;
use herd_proto::guest::{GuestMsg, HostMsg};
use herd_proto::wire::VmSpec;
use herd_proto::VmState;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::warn;

/// What the driver decided last about a VM; persisted in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Phase {
    /// A QEMU process should be alive.
    Launched,
    /// Memory saved to the suspend image; no process.
    Suspended,
    /// Powered off (cleanly, or by a stop).
    Stopped,
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct VmRecord {
    pub(super) token: String,
    pub(super) phase: Phase,
    pub(super) accel: Accel,
    pub(super) paused: bool,
    /// The current QEMU's guest said hello with the right token.
    pub(super) hello_seen: bool,
    /// The current QEMU was restored from a suspend image.
    pub(super) restored: bool,
    /// The workload's exit code, as the guest reported it.
    pub(super) exit_code: Option<i32>,
    /// When the VM was created (unix ms); the guest's lifespan counts from it.
    #[serde(default)]
    pub(super) born_unix_ms: Option<u64>,
    /// The guest's policy action of the current run reached the agent.
    #[serde(default)]
    pub(super) policy_reported: bool,
    /// QEMU sent the VM to another host and stopped it here; it stays until the
    /// migration is committed (then it goes) or rolled back (then it runs again).
    #[serde(default)]
    pub(super) migrated_out: bool,
    /// The VM's data disk was made: from then on a missing disk is an error, never
    /// replaced by an empty one.
    #[serde(default)]
    pub(super) disk_made: bool,
}

pub(super) struct Vm {
    pub(super) paths: VmPaths,
    pub(super) spec: VmSpec,
    pub(super) record: VmRecord,
    pub(super) pid: Option<i32>,
    /// An operation in flight and the state it shows meanwhile.
    pub(super) busy: Option<VmState>,
    pub(super) guest_net: (u64, u64),
    /// Bumped on every launch, so a channel task of an old QEMU knows it is obsolete.
    pub(super) generation: u64,
    pub(super) channel: Option<(tokio::task::AbortHandle, mpsc::UnboundedSender<HostMsg>)>,
    /// A policy action the guest took with nobody listening, read back from its console.
    pub(super) unreported: Option<GuestMsg>,
}

impl Vm {
    /// A VM about to get its first QEMU on this host, shown as `busy` meanwhile.
    pub(super) fn new(paths: VmPaths, spec: VmSpec, record: VmRecord, busy: VmState) -> Vm {
        Vm {
            paths,
            spec,
            record,
            pid: None,
            busy: Some(busy),
            guest_net: (0, 0),
            generation: 0,
            channel: None,
            unreported: None,
        }
    }

    pub(super) fn save(&self) -> Result<(), DriverError> {
        let bytes = serde_json::to_vec_pretty(&self.record)
            .map_err(DriverError::encode("the VM's state"))?;
        persist::write_atomic(&self.paths.state(), &bytes).map_err(DriverError::io(format!(
            "saving {}",
            self.paths.state().display()
        )))
    }

    pub(super) fn alive(&self) -> bool {
        self.pid
            .is_some_and(|pid| procfs::is_our_qemu(pid, &self.paths.dir))
    }

    /// Settles the persisted phase against the process and returns the state to show.
    pub(super) fn observe(&mut self) -> VmState {
        if let Some(busy) = self.busy {
            return busy;
        }
        match &self.record.phase {
            Phase::Suspended => VmState::Suspended,
            Phase::Stopped => VmState::Stopped,
            Phase::Failed { .. } => VmState::Error,
            Phase::Launched if self.alive() => {
                if self.record.migrated_out {
                    VmState::Migrating
                } else if self.record.paused {
                    VmState::Paused
                } else if self.record.hello_seen {
                    VmState::Running
                } else if self.record.restored {
                    VmState::Resuming
                } else {
                    VmState::Booting
                }
            }
            Phase::Launched => {
                // The process is gone without us ending it. A guest that reported its
                // workload's exit powered itself off: that is a stop, not a failure.
                // So did one whose policy (enforced by herd-guest) stopped it; its console
                // says so even when no host was connected to hear the report.
                self.record.phase = match self.record.exit_code {
                    Some(_) => Phase::Stopped,
                    None if policy_powered_off(&self.paths.console()) => {
                        if !self.record.policy_reported {
                            // The console is the guest's to write: believe only an action
                            // its policy names.
                            self.unreported = policy_action_from_console(&self.paths.console())
                                .filter(|msg| channel::policy_allows(&self.spec.policy, msg))
                                .map(channel::clamp);
                            self.record.policy_reported = true;
                        }
                        Phase::Stopped
                    }
                    None => Phase::Failed {
                        reason: format!(
                            "qemu exited unexpectedly; console ends with: {}",
                            console_tail(&self.paths.console())
                        ),
                    },
                };
                self.record.paused = false;
                self.pid = None;
                if let Some((handle, _)) = self.channel.take() {
                    handle.abort();
                }
                if let Err(e) = self.save() {
                    warn!("{e}");
                }
                self.observe()
            }
        }
    }
}

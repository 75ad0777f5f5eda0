//! The agent's decisions, without I/O: what each interval reports, when the state must
//! reach the disk, which commands to carry out and which are replays, what the backstop
//! enforces, which usage counters are worth sending. The connection loop feeds it what
//! happened ([`Input`]) and carries out what it answers ([`Action`]), in order; so these
//! rules are property-tested here without a server, a driver or a clock.

use super::state::SavedState;
use crate::backstop::{Backstop, Enforce};
use herd_proto::guest::GuestMsg;
use herd_proto::wire::{
    AgentMsg, Command, CommandId, GuestReport, HostUtil, Report, ServerMsg, VmId, VmUsage,
};
use herd_proto::VmState;
use herd_sync::{events_of, Diff, Reporter};
use std::collections::{BTreeMap, HashMap};
use tracing::{debug, warn};

/// Usage counters are sent when one moved at least this much since last sent.
const USAGE_CPU_MS_STEP: u64 = 1_000;
const USAGE_BYTES_STEP: u64 = 1 << 20;
const USAGE_MEM_KIB_STEP: u64 = 16 * 1024;

/// What happened, as the core needs to know it.
#[derive(Debug)]
pub(crate) enum Input {
    /// A connection to the server came up; it starts with a full report, since the
    /// server may have restarted.
    Connected,
    /// The sync interval came round. `usage` is the host-side usage of the VMs, which
    /// only the backstop reads: empty unless [`Core::watches_policies`].
    Tick {
        observed: BTreeMap<VmId, VmState>,
        usage: BTreeMap<VmId, VmUsage>,
        util: HostUtil,
        now_ms: u64,
    },
    /// The usage interval came round with every VM's counters.
    Usage {
        usage: Vec<VmUsage>,
        now_ms: u64,
    },
    /// A guest module said something on its VM's channel.
    Guest {
        vm: VmId,
        msg: GuestMsg,
        now_ms: u64,
    },
    Server {
        msg: ServerMsg,
        now_ms: u64,
    },
    /// Converging a VM for a command ended.
    Converged {
        id: CommandId,
        error: Option<String>,
    },
}

/// What to do, in order. An action that fails ends the connection and drops the
/// actions after it: that is what makes [`Action::Save`] come before what depends on it.
#[derive(Debug)]
pub(crate) enum Action {
    /// Write this state before anything after it. If the write fails, call
    /// [`Core::save_failed`].
    Save(SavedState),
    /// Carry out a backstop decision on the VM's driver.
    Enforce(Enforce),
    /// Send this interval's report; `changed` lists the VMs whose state it changes.
    Report {
        report: Report,
        changed: Vec<VmId>,
    },
    Send(AgentMsg),
    /// Converge the VM to the command's target, replacing any task converging it for
    /// an older generation.
    Converge(Box<Command>),
    /// Observe now and feed a [`Input::Tick`] (a guest said hello: its VM runs).
    ReportNow,
    /// Read the tail of the VM's console and send it back as `request`'s answer.
    Console {
        request: u64,
        vm: VmId,
        max_bytes: usize,
    },
    /// The server acknowledged reports up to `seq` (for the probe).
    Acked {
        epoch: u64,
        seq: u64,
    },
    /// Carry out (or answer again) an order about a live migration.
    Migration(Box<herd_proto::migration::MigrationOrder>),
    /// Take other hosts' statuses into the peer table.
    Peers(Vec<herd_proto::status::PeerUpdate>),
    /// Carry out (or answer again) an order about a broadcast.
    Broadcast(Box<herd_proto::broadcast::BroadcastOrder>),
    /// Measure round trips to these hosts from now on.
    Neighbours(Vec<herd_proto::proximity::Neighbour>),
    /// Say what this host knows of the others, as `request`'s answer.
    PeersRequest {
        request: u64,
    },
    /// Pass a user's ask for a burst to the host's bursts, to answer as `request`.
    Burst {
        request: u64,
        vm: VmId,
        ask: herd_proto::burst::BurstAsk,
    },
    /// End the connection with this reason.
    Disconnect(String),
}

/// What the agent decides with, across reconnections within one process.
pub(crate) struct Core {
    reporter: Reporter,
    applied: BTreeMap<VmId, u64>,
    backstop: Backstop,
    /// When each VM's guest last said anything (unix ms).
    last_guest_word: HashMap<VmId, u64>,
    usage_sent: HashMap<VmId, VmUsage>,
    /// The generation being converged per VM.
    converging: HashMap<VmId, u64>,
    /// The hypervisor types this host's drivers serve.
    kinds: Vec<String>,
    /// Whether the state is saved before every report that depends on it (else only
    /// when the caller asks for a [`Core::snapshot`]: scale runs).
    durable: bool,
    /// Something the saved state holds may differ from memory.
    dirty: bool,
    /// The epoch last saved.
    saved_epoch: Option<u64>,
}

impl Core {
    pub(crate) fn new(saved: SavedState, kinds: Vec<String>, durable: bool) -> Core {
        Core {
            reporter: Reporter::start(saved.reporter),
            applied: saved.applied,
            backstop: saved.backstop,
            last_guest_word: HashMap::new(),
            usage_sent: HashMap::new(),
            converging: HashMap::new(),
            kinds,
            durable,
            dirty: true,
            saved_epoch: None,
        }
    }

    /// Whether a tick needs the VMs' host-side usage (the backstop watches a policy).
    pub(crate) fn watches_policies(&self) -> bool {
        !self.backstop.vms.is_empty()
    }

    /// The state to save now; it counts as saved.
    pub(crate) fn snapshot(&mut self) -> SavedState {
        let saved = SavedState {
            reporter: self.reporter.state(),
            applied: self.applied.clone(),
            backstop: self.backstop.clone(),
        };
        self.dirty = false;
        self.saved_epoch = Some(saved.reporter.epoch);
        saved
    }

    /// The last [`Action::Save`] did not reach the disk.
    pub(crate) fn save_failed(&mut self) {
        self.dirty = true;
        self.saved_epoch = None;
    }

    pub(crate) fn step(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Connected => self.reporter.request_full(),
            Input::Tick {
                observed,
                usage,
                util,
                now_ms,
            } => self.tick(observed, &usage, util, now_ms, &mut out),
            Input::Usage { usage, now_ms } => {
                let vms = self.usage_delta(usage);
                if !vms.is_empty() {
                    out.push(Action::Send(AgentMsg::Usage {
                        sampled_at_ms: now_ms,
                        vms,
                    }));
                }
            }
            Input::Guest { vm, msg, now_ms } => {
                self.last_guest_word.insert(vm, now_ms);
                if let Some(report) = msg.to_report() {
                    // A hello makes the VM running: report that now, not next interval.
                    let hello = matches!(report, GuestReport::Hello { .. });
                    out.push(Action::Send(AgentMsg::Guest { vm, report }));
                    if hello {
                        out.push(Action::ReportNow);
                    }
                }
            }
            Input::Server { msg, now_ms } => self.server(msg, now_ms, &mut out),
            Input::Converged { id, error } => {
                if self.converging.get(&id.vm) == Some(&id.generation) {
                    self.converging.remove(&id.vm);
                }
                if error.is_none() {
                    let newest = self.applied.entry(id.vm).or_insert(0);
                    *newest = (*newest).max(id.generation);
                    self.dirty = true;
                    self.save(&mut out);
                }
                out.push(Action::Send(AgentMsg::CommandDone { id, error }));
                // What the command did is seen now, not at the next interval.
                out.push(Action::ReportNow);
            }
        }
        out
    }

    fn save(&mut self, out: &mut Vec<Action>) {
        if self.durable && self.dirty {
            out.push(Action::Save(self.snapshot()));
        }
    }

    fn server(&mut self, msg: ServerMsg, now_ms: u64, out: &mut Vec<Action>) {
        match msg {
            ServerMsg::Welcome { .. } => {}
            ServerMsg::Ack { epoch, seq } => {
                self.reporter.on_ack(epoch, seq);
                out.push(Action::Acked { epoch, seq });
            }
            ServerMsg::NeedFull { reason } => {
                debug!("server asks for a full report: {reason}");
                self.reporter.request_full();
            }
            ServerMsg::Refused { reason } => {
                out.push(Action::Disconnect(format!(
                    "server refused this agent: {reason}"
                )));
            }
            ServerMsg::Command(command) => self.accept(command, now_ms, out),
            ServerMsg::Migration(order) => out.push(Action::Migration(order)),
            ServerMsg::Peers(updates) => out.push(Action::Peers(updates)),
            ServerMsg::PeersRequest { request } => out.push(Action::PeersRequest { request }),
            ServerMsg::Neighbours(list) => out.push(Action::Neighbours(list)),
            ServerMsg::Broadcast(order) => out.push(Action::Broadcast(order)),
            ServerMsg::Burst { request, vm, ask } => out.push(Action::Burst { request, vm, ask }),
            ServerMsg::ConsoleRequest {
                request,
                vm,
                max_bytes,
            } => out.push(Action::Console {
                request,
                vm,
                max_bytes: max_bytes as usize,
            }),
        }
    }

    /// Starts converging a VM for a command, unless the command is a replay or older
    /// than the one in progress.
    fn accept(&mut self, command: Box<Command>, now_ms: u64, out: &mut Vec<Action>) {
        let id = command.id;
        // The backstop may start or stop watching the VM below.
        self.dirty = true;
        let applied = self.applied.get(&id.vm).copied().unwrap_or(0);
        if id.generation <= applied {
            debug!(command = %id, "replayed command, already applied");
            out.push(Action::Send(AgentMsg::CommandDone { id, error: None }));
            return;
        }
        if self
            .converging
            .get(&id.vm)
            .is_some_and(|generation| *generation >= id.generation)
        {
            return;
        }
        if !self.kinds.contains(&command.spec.hypervisor) {
            let error = format!(
                "hypervisor type {:?} is not available on this host",
                command.spec.hypervisor
            );
            out.push(Action::Send(AgentMsg::CommandDone {
                id,
                error: Some(error),
            }));
            return;
        }
        if command.target == VmState::Terminated {
            self.backstop.forget(id.vm);
        } else {
            self.backstop.watch(
                id.vm,
                command.spec.policy,
                command.spec.vcpus,
                command.spec.memory_mib,
                now_ms,
            );
        }
        self.converging.insert(id.vm, id.generation);
        out.push(Action::Converge(command));
    }

    /// One interval: check the changes against the flow, let the backstop decide, and
    /// report (a delta, a heartbeat, or a full report if asked), saved first.
    fn tick(
        &mut self,
        observed: BTreeMap<VmId, VmState>,
        usage: &BTreeMap<VmId, VmUsage>,
        util: HostUtil,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        // One comparison with the last report serves the report, the flow check and
        // the saved state.
        let diff = Diff::between(self.reporter.last_reported(), &observed);
        // What this report changes in the saved state: nothing, for most heartbeats.
        if !diff.is_empty() || self.saved_epoch != Some(self.reporter.epoch()) {
            self.dirty = true;
        }
        let changed: Vec<VmId> = diff.changed.iter().map(|change| change.vm).collect();
        // Every change is checked against the flow; the server derives the normal
        // events from the same table, so only anomalies are sent.
        let events: Vec<_> = events_of(&diff.changed)
            .into_iter()
            .filter(|e| e.event.is_none())
            .collect();
        for event in &events {
            warn!(vm = %event.vm, "{}", event.message.as_deref().unwrap_or("unexpected change"));
        }
        let enforced = self.backstop_round(&observed, usage, now_ms);
        out.extend(enforced.iter().cloned().map(Action::Enforce));
        let report = self.reporter.tick_with(observed, &diff, util, events);
        // Saved before the report goes out: a crash after the send cannot leave the
        // disk behind what the server was told.
        self.save(out);
        out.push(Action::Report { report, changed });
        out.extend(enforced.into_iter().map(|e| {
            Action::Send(AgentMsg::PolicyEnforced {
                vm: e.vm,
                rule: e.rule,
                action: e.action,
                reason: e.reason,
            })
        }));
    }

    fn backstop_round(
        &mut self,
        observed: &BTreeMap<VmId, VmState>,
        usage: &BTreeMap<VmId, VmUsage>,
        now_ms: u64,
    ) -> Vec<Enforce> {
        if self.backstop.vms.is_empty() {
            return Vec::new();
        }
        // Its evaluators move every round while it watches any VM.
        self.dirty = true;
        self.backstop.vms.retain(|vm, _| observed.contains_key(vm));
        let running: BTreeMap<VmId, Option<u64>> = observed
            .iter()
            .filter(|(_, state)| **state == VmState::Running)
            .map(|(vm, _)| (*vm, self.last_guest_word.get(vm).copied()))
            .collect();
        let decided = self.backstop.round(now_ms, usage, &running);
        for e in &decided {
            warn!(vm = %e.vm, rule = %e.rule, "backstop enforces {:?}: {}", e.action, e.reason);
        }
        decided
    }

    /// Counters that moved past their threshold since they were last sent.
    fn usage_delta(&mut self, usage: Vec<VmUsage>) -> Vec<VmUsage> {
        let mut moved = Vec::new();
        for usage in usage {
            let send = match self.usage_sent.get(&usage.vm) {
                None => {
                    usage
                        != VmUsage {
                            vm: usage.vm,
                            ..VmUsage::default()
                        }
                }
                Some(last) => {
                    usage.cpu_ms.abs_diff(last.cpu_ms) >= USAGE_CPU_MS_STEP
                        || usage.mem_kib.abs_diff(last.mem_kib) >= USAGE_MEM_KIB_STEP
                        || usage.net_rx_bytes.abs_diff(last.net_rx_bytes) >= USAGE_BYTES_STEP
                        || usage.net_tx_bytes.abs_diff(last.net_tx_bytes) >= USAGE_BYTES_STEP
                        || usage.disk_read_bytes.abs_diff(last.disk_read_bytes) >= USAGE_BYTES_STEP
                        || usage.disk_write_bytes.abs_diff(last.disk_write_bytes)
                            >= USAGE_BYTES_STEP
                }
            };
            if send {
                self.usage_sent.insert(usage.vm, usage);
                moved.push(usage);
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests;

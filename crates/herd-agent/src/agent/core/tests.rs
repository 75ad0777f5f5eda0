//! The core against a model of the server and the disk, with restarts in between.

#![allow(clippy::unwrap_used)]

use super::*;
use herd_proto::wire::VmSpec;
use herd_sync::{Applied, HostView};
use proptest::prelude::*;
use uuid::Uuid;

const KIND: &str = "sim";

fn vm(n: u8) -> VmId {
    Uuid::from_u128(u128::from(n) + 1)
}

fn command(vm_n: u8, generation: u64, target: VmState, hypervisor: &str) -> ServerMsg {
    ServerMsg::Command(Box::new(Command {
        id: CommandId {
            vm: vm(vm_n),
            generation,
        },
        spec: VmSpec {
            name: format!("vm{vm_n}"),
            hypervisor: hypervisor.into(),
            vcpus: 1,
            memory_mib: 64,
            image: "default".into(),
            command: Vec::new(),
            policy: Default::default(),
            keep_running: false,
            disk_mib: 0,
            burst: Default::default(),
            seed: None,
        },
        target,
    }))
}

fn util() -> HostUtil {
    HostUtil {
        cpu_permille: 0,
        mem_used_mib: 0,
        n_vms: 0,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Command {
        vm: u8,
        generation: u64,
        target: VmState,
        known_kind: bool,
    },
    /// One of the converges in flight ends (picked by index), well or not.
    Converged {
        pick: usize,
        ok: bool,
    },
    Tick(BTreeMap<u8, VmState>),
    /// The server acknowledges everything it applied.
    Ack,
    /// The agent process restarts from what it saved.
    Restart,
}

fn state() -> impl Strategy<Value = VmState> {
    prop::sample::select(VmState::ALL.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, 1u64..8, state(), prop::bool::weighted(0.9)).prop_map(
            |(vm, generation, target, known_kind)| Op::Command {
                vm,
                generation,
                target,
                known_kind
            }
        ),
        (0usize..4, prop::bool::weighted(0.8)).prop_map(|(pick, ok)| Op::Converged { pick, ok }),
        prop::collection::btree_map(0u8..4, state(), 0..4).prop_map(Op::Tick),
        Just(Op::Ack),
        Just(Op::Restart),
    ]
}

/// The agent's core against a model of the server and the disk.
struct World {
    core: Core,
    disk: SavedState,
    view: HostView,
    /// The last report the view applied in order, for the next ack.
    last_in_order: Option<(u64, u64)>,
    /// What the model says was applied per VM (the newest generation that
    /// converged well).
    applied: BTreeMap<VmId, u64>,
    in_flight: BTreeMap<VmId, CommandId>,
    /// The epoch of the last report sent.
    reported_epoch: Option<u64>,
}

impl World {
    fn new() -> World {
        World {
            core: Core::new(SavedState::default(), vec![KIND.into()], true),
            disk: SavedState::default(),
            view: HostView::new(),
            last_in_order: None,
            applied: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            reported_epoch: None,
        }
    }

    /// Carries out actions as the session does, checking the rules on the way.
    fn carry_out(&mut self, actions: Vec<Action>) -> Vec<AgentMsg> {
        let mut sent = Vec::new();
        for action in actions {
            match action {
                Action::Save(saved) => self.disk = saved,
                Action::Report { report, changed } => {
                    // The disk is never behind what the server is told.
                    assert_eq!(
                        self.disk.reporter,
                        self.core.reporter.state(),
                        "a report went out before its state was saved"
                    );
                    assert_eq!(self.disk.reporter.epoch, report.epoch);
                    self.reported_epoch = Some(report.epoch);
                    let before = self.view.vms().clone();
                    match self.view.apply(&report) {
                        Applied::InOrder { epoch, seq, .. } => {
                            self.last_in_order = Some((epoch, seq));
                            let now = self.view.vms();
                            let moved: Vec<VmId> = now
                                .iter()
                                .filter(|(vm, state)| before.get(vm) != Some(state))
                                .map(|(vm, _)| *vm)
                                .collect();
                            for vm in moved {
                                assert!(changed.contains(&vm) || report.is_full());
                            }
                        }
                        Applied::Stale => {}
                        Applied::NeedFull { reason } => {
                            let more = self.core.step(Input::Server {
                                msg: ServerMsg::NeedFull { reason },
                                now_ms: 0,
                            });
                            assert!(more.is_empty());
                        }
                    }
                }
                Action::Send(msg) => sent.push(msg),
                Action::Converge(command) => {
                    let id = command.id;
                    assert!(id.generation > self.applied.get(&id.vm).copied().unwrap_or(0));
                    if let Some(old) = self.in_flight.get(&id.vm) {
                        assert!(
                            id.generation > old.generation,
                            "an older command replaced a newer one"
                        );
                    }
                    assert_eq!(command.spec.hypervisor, KIND);
                    self.in_flight.insert(id.vm, id);
                }
                Action::Acked { .. } => {}
                // An early observation: the model's ticks come when the test says.
                Action::ReportNow => {}
                other => panic!("unexpected action {other:?}"),
            }
        }
        sent
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Command {
                vm: n,
                generation,
                target,
                known_kind,
            } => {
                let kind = if known_kind { KIND } else { "xen" };
                let id = CommandId {
                    vm: vm(n),
                    generation,
                };
                let replay = generation <= self.applied.get(&id.vm).copied().unwrap_or(0);
                let older = self
                    .in_flight
                    .get(&id.vm)
                    .is_some_and(|old| old.generation >= generation);
                let actions = self.core.step(Input::Server {
                    msg: command(n, generation, target, kind),
                    now_ms: 0,
                });
                let sent = self.carry_out(actions);
                let done: Vec<_> = sent
                    .iter()
                    .filter_map(|msg| match msg {
                        AgentMsg::CommandDone { id: done, error } if *done == id => {
                            Some(error.clone())
                        }
                        _ => None,
                    })
                    .collect();
                if replay {
                    // A replay is acknowledged at once, as done.
                    assert_eq!(done, vec![None]);
                } else if older {
                    assert!(done.is_empty());
                } else if !known_kind {
                    assert_eq!(done.len(), 1);
                    assert!(done[0].is_some());
                } else {
                    assert!(done.is_empty());
                    assert_eq!(self.in_flight.get(&id.vm), Some(&id));
                }
            }
            Op::Converged { pick, ok } => {
                let Some(id) = self.in_flight.values().nth(pick).copied() else {
                    return;
                };
                self.in_flight.remove(&id.vm);
                let error = (!ok).then(|| "failed".to_owned());
                let actions = self.core.step(Input::Converged {
                    id,
                    error: error.clone(),
                });
                let sent = self.carry_out(actions);
                if ok {
                    let newest = self.applied.entry(id.vm).or_insert(0);
                    *newest = (*newest).max(id.generation);
                    // What was acknowledged as applied is on the disk first.
                    let newest = *newest;
                    assert_eq!(self.disk.applied.get(&id.vm), Some(&newest));
                }
                assert_eq!(sent, vec![AgentMsg::CommandDone { id, error }]);
            }
            Op::Tick(states) => {
                let observed: BTreeMap<VmId, VmState> =
                    states.iter().map(|(n, state)| (vm(*n), *state)).collect();
                for _ in 0..2 {
                    let actions = self.core.step(Input::Tick {
                        observed: observed.clone(),
                        usage: BTreeMap::new(),
                        util: util(),
                        now_ms: 0,
                    });
                    self.carry_out(actions);
                    // A view that had to ask for a full report has it one tick later.
                    if self.view.vms() == &observed {
                        break;
                    }
                }
                assert_eq!(self.view.vms(), &observed, "the server's view is the truth");
            }
            Op::Ack => {
                if let Some((epoch, seq)) = self.last_in_order {
                    let actions = self.core.step(Input::Server {
                        msg: ServerMsg::Ack { epoch, seq },
                        now_ms: 0,
                    });
                    self.carry_out(actions);
                }
            }
            Op::Restart => {
                self.core = Core::new(self.disk.clone(), vec![KIND.into()], true);
                // Reports of the new life are never mistaken for the old one's.
                if let Some(epoch) = self.reported_epoch {
                    assert!(self.core.reporter.epoch() > epoch);
                }
                // Converge tasks died with the process; the server replays them.
                self.in_flight.clear();
                // The commands the server was told were applied stay applied.
                assert_eq!(self.disk.applied, self.applied);
                let actions = self.core.step(Input::Connected);
                self.carry_out(actions);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn commands_reports_and_restarts_keep_their_promises(ops in prop::collection::vec(op(), 1..60)) {
        let mut world = World::new();
        for op in ops {
            world.apply(op);
        }
    }
}

#[test]
fn a_guest_hello_is_reported_at_once() {
    let mut core = Core::new(SavedState::default(), vec![KIND.into()], true);
    let actions = core.step(Input::Guest {
        vm: vm(0),
        msg: GuestMsg::Hello {
            vm_id: vm(0),
            management_token: "t".into(),
            guest_version: "1".into(),
        },
        now_ms: 5,
    });
    assert!(
        matches!(actions.last(), Some(Action::ReportNow)),
        "{actions:?}"
    );
}

#[test]
fn a_command_done_is_reported_at_once_after_its_answer() {
    let mut core = Core::new(SavedState::default(), vec![KIND.into()], true);
    let id = CommandId {
        vm: vm(0),
        generation: 1,
    };
    for error in [None, Some("failed".to_owned())] {
        let actions = core.step(Input::Converged {
            id,
            error: error.clone(),
        });
        let done = actions
            .iter()
            .position(|a| matches!(a, Action::Send(AgentMsg::CommandDone { .. })));
        let now = actions.iter().position(|a| matches!(a, Action::ReportNow));
        assert!(
            matches!((done, now), (Some(d), Some(n)) if d < n),
            "{actions:?}"
        );
    }
}

#[test]
fn usage_is_sent_only_when_it_moved_enough() {
    let mut core = Core::new(SavedState::default(), vec![KIND.into()], true);
    let at = |cpu_ms| VmUsage {
        vm: vm(0),
        cpu_ms,
        ..VmUsage::default()
    };
    // (counters, whether they are sent): the first non-zero sample, then only
    // after a full step from what was last sent.
    for (n, (cpu_ms, expected)) in [(0, false), (10, true), (500, false), (1_010, true)]
        .into_iter()
        .enumerate()
    {
        let actions = core.step(Input::Usage {
            usage: vec![at(cpu_ms)],
            now_ms: n as u64,
        });
        let sent = actions
            .iter()
            .any(|a| matches!(a, Action::Send(AgentMsg::Usage { .. })));
        assert_eq!(sent, expected, "at {cpu_ms} ms");
    }
}

#[test]
fn a_scale_run_saves_only_when_asked() {
    let mut core = Core::new(SavedState::default(), vec![KIND.into()], false);
    let actions = core.step(Input::Tick {
        observed: BTreeMap::from([(vm(0), VmState::Running)]),
        usage: BTreeMap::new(),
        util: util(),
        now_ms: 0,
    });
    assert!(!actions.iter().any(|a| matches!(a, Action::Save(_))));
    assert_eq!(core.snapshot().reporter.last_reported.len(), 1);
}

#[test]
fn a_refusal_ends_the_connection() {
    let mut core = Core::new(SavedState::default(), vec![KIND.into()], true);
    let actions = core.step(Input::Server {
        msg: ServerMsg::Refused {
            reason: "revoked".into(),
        },
        now_ms: 0,
    });
    assert!(matches!(&actions[..], [Action::Disconnect(reason)] if reason.contains("revoked")));
}

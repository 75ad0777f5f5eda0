//! The server side of delta sync: one view per host.

use herd_proto::wire::{Report, ReportBody, VmId};
use herd_proto::VmState;
use std::collections::{BTreeMap, HashMap};

/// One change to the server's view, for the caller to write to its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewChange {
    /// The VM is on the host in `state`; `before` is what the view held.
    Upsert {
        vm: VmId,
        before: Option<VmState>,
        state: VmState,
    },
    /// The VM is no longer on the host.
    Removed { vm: VmId, before: VmState },
}

/// What applying a report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Applied in order; acknowledge `seq`. Lists what changed in the view.
    InOrder {
        epoch: u64,
        seq: u64,
        changes: Vec<ViewChange>,
    },
    /// Already seen, or from an older epoch: nothing changed, nothing to answer.
    Stale,
    /// The view cannot be brought up to date from this report: ask for a full one.
    NeedFull { reason: String },
}

/// The server's view of one host's VMs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    epoch: Option<u64>,
    last_seq: u64,
    vms: BTreeMap<VmId, VmState>,
    /// The agent's current mapping of slots to VMs (see `VmStatus`).
    slots: HashMap<u32, VmId>,
}

impl HostView {
    pub fn new() -> HostView {
        HostView::default()
    }

    /// A view seeded from the store after a server restart. It knows no epoch, so the
    /// agent's next report must be a full one; the seed only lets that full report be
    /// turned into the few changes that really happened.
    pub fn from_store(vms: BTreeMap<VmId, VmState>) -> HostView {
        HostView {
            epoch: None,
            last_seq: 0,
            vms,
            slots: HashMap::new(),
        }
    }

    pub fn vms(&self) -> &BTreeMap<VmId, VmState> {
        &self.vms
    }

    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Forgets the epoch so the next report must be full (e.g. the agent reconnected).
    pub fn invalidate(&mut self) {
        self.epoch = None;
    }

    /// Applies one report.
    pub fn apply(&mut self, report: &Report) -> Applied {
        let known_epoch = self.epoch;
        match &report.body {
            ReportBody::Full { vms } => {
                let newer = match known_epoch {
                    None => true,
                    Some(epoch) => {
                        report.epoch > epoch
                            || (report.epoch == epoch && report.seq > self.last_seq)
                    }
                };
                if !newer {
                    return Applied::Stale;
                }
                let mut next = BTreeMap::new();
                let mut slots = HashMap::new();
                for status in vms {
                    let Some(vm) = status.vm else {
                        return Applied::NeedFull {
                            reason: format!(
                                "full report names slot {} without its VM",
                                status.slot
                            ),
                        };
                    };
                    next.insert(vm, status.state);
                    slots.insert(status.slot, vm);
                }
                let mut changes = Vec::new();
                for (vm, before) in &self.vms {
                    if !next.contains_key(vm) {
                        changes.push(ViewChange::Removed {
                            vm: *vm,
                            before: *before,
                        });
                    }
                }
                for (vm, state) in &next {
                    let before = self.vms.get(vm).copied();
                    if before != Some(*state) {
                        changes.push(ViewChange::Upsert {
                            vm: *vm,
                            before,
                            state: *state,
                        });
                    }
                }
                self.vms = next;
                self.slots = slots;
                self.epoch = Some(report.epoch);
                self.last_seq = report.seq;
                Applied::InOrder {
                    epoch: report.epoch,
                    seq: report.seq,
                    changes,
                }
            }
            ReportBody::Delta { changed, removed } => {
                match known_epoch {
                    None => {
                        return Applied::NeedFull {
                            reason: format!("epoch {} is not known", report.epoch),
                        }
                    }
                    Some(epoch) if report.epoch < epoch => return Applied::Stale,
                    Some(epoch) if report.epoch > epoch => {
                        return Applied::NeedFull {
                            reason: format!("new epoch {} (had {epoch})", report.epoch),
                        }
                    }
                    Some(_) => {}
                }
                if report.seq <= self.last_seq {
                    return Applied::Stale;
                }
                if report.seq != self.last_seq + 1 {
                    return Applied::NeedFull {
                        reason: format!(
                            "gap in sequence: expected {}, got {}",
                            self.last_seq + 1,
                            report.seq
                        ),
                    };
                }
                // Resolve every slot before changing anything: a slot this view does
                // not know means the mappings differ, and only a full report helps.
                let mut slots = self.slots.clone();
                let mut upserts = Vec::with_capacity(changed.len());
                for status in changed {
                    let vm = match status.vm {
                        Some(vm) => {
                            slots.insert(status.slot, vm);
                            vm
                        }
                        None => match slots.get(&status.slot) {
                            Some(vm) => *vm,
                            None => {
                                return Applied::NeedFull {
                                    reason: format!("unknown slot {}", status.slot),
                                }
                            }
                        },
                    };
                    upserts.push((vm, status.state));
                }
                let mut removals = Vec::with_capacity(removed.len());
                for slot in removed {
                    match slots.remove(slot) {
                        Some(vm) => removals.push(vm),
                        None => {
                            return Applied::NeedFull {
                                reason: format!("unknown slot {slot} removed"),
                            }
                        }
                    }
                }
                self.slots = slots;
                let mut changes = Vec::new();
                for vm in removals {
                    if let Some(before) = self.vms.remove(&vm) {
                        changes.push(ViewChange::Removed { vm, before });
                    }
                }
                for (vm, state) in upserts {
                    let before = self.vms.insert(vm, state);
                    if before != Some(state) {
                        changes.push(ViewChange::Upsert { vm, before, state });
                    }
                }
                self.last_seq = report.seq;
                Applied::InOrder {
                    epoch: report.epoch,
                    seq: report.seq,
                    changes,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Reporter, ReporterState};
    use herd_proto::wire::{HostUtil, ServerMsg};
    use proptest::prelude::*;
    use uuid::Uuid;

    const STATES: [VmState; 6] = [
        VmState::Booting,
        VmState::Running,
        VmState::Paused,
        VmState::Suspended,
        VmState::Stopped,
        VmState::Error,
    ];

    /// One step of the simulated world.
    #[derive(Debug, Clone)]
    enum Step {
        /// The truth changes: VM `vm_idx` takes state `state_idx`, or disappears.
        Change { vm_idx: u8, state_idx: Option<u8> },
        /// The agent reports; the network then does one thing to the in-flight queues.
        Tick(Fault),
        /// The agent process restarts (new epoch, persisted state kept).
        RestartAgent,
    }

    #[derive(Debug, Clone, Copy)]
    enum Fault {
        None,
        DropLast,
        Duplicate,
        Swap,
        DeliverOne,
        DeliverAll,
    }

    fn step() -> impl Strategy<Value = Step> {
        let change = (0u8..12, proptest::option::of(0u8..6))
            .prop_map(|(vm_idx, state_idx)| Step::Change { vm_idx, state_idx });
        let fault = prop_oneof![
            Just(Fault::None),
            Just(Fault::DropLast),
            Just(Fault::Duplicate),
            Just(Fault::Swap),
            Just(Fault::DeliverOne),
            Just(Fault::DeliverAll),
        ];
        prop_oneof![
            4 => change,
            6 => fault.prop_map(Step::Tick),
            1 => Just(Step::RestartAgent),
        ]
    }

    fn fault(queue: &mut Vec<impl Clone>, fault: Fault) {
        match fault {
            Fault::None | Fault::DeliverOne | Fault::DeliverAll => {}
            Fault::DropLast => {
                queue.pop();
            }
            Fault::Duplicate => {
                if let Some(last) = queue.last().cloned() {
                    queue.push(last);
                }
            }
            Fault::Swap => {
                let n = queue.len();
                if n >= 2 {
                    queue.swap(n - 1, n - 2);
                }
            }
        }
    }

    /// Delivers a report to the server and returns its answer, as the server does.
    fn serve(view: &mut HostView, report: &Report) -> Option<ServerMsg> {
        match view.apply(report) {
            Applied::InOrder { epoch, seq, .. } => Some(ServerMsg::Ack { epoch, seq }),
            Applied::Stale => None,
            Applied::NeedFull { reason } => Some(ServerMsg::NeedFull { reason }),
        }
    }

    fn receive(reporter: &mut Reporter, msg: ServerMsg) {
        match msg {
            ServerMsg::Ack { epoch, seq } => reporter.on_ack(epoch, seq),
            ServerMsg::NeedFull { .. } => reporter.request_full(),
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the network did, once it delivers in order again the server's view
        /// equals the agent's truth after at most one full report.
        #[test]
        fn view_converges_to_truth(steps in proptest::collection::vec(step(), 0..120)) {
            let vms: Vec<Uuid> = (0..12).map(|n| Uuid::from_u128(n + 1)).collect();
            let mut truth: BTreeMap<VmId, VmState> = BTreeMap::new();
            let mut persisted = ReporterState::default();
            let mut reporter = Reporter::start(persisted.clone());
            let mut view = HostView::new();
            let mut up: Vec<Report> = Vec::new();
            let mut down: Vec<ServerMsg> = Vec::new();

            for step in steps {
                match step {
                    Step::Change { vm_idx, state_idx } => {
                        let vm = vms[vm_idx as usize];
                        match state_idx {
                            Some(idx) => { truth.insert(vm, STATES[idx as usize]); }
                            None => { truth.remove(&vm); }
                        }
                    }
                    Step::RestartAgent => {
                        reporter = Reporter::start(persisted.clone());
                    }
                    Step::Tick(network_fault) => {
                        up.push(reporter.tick(&truth, HostUtil::default(), vec![]));
                        persisted = reporter.state();
                        fault(&mut up, network_fault);
                        fault(&mut down, network_fault);
                        let n_deliver = match network_fault {
                            Fault::DeliverAll => up.len(),
                            Fault::DeliverOne => 1.min(up.len()),
                            _ => 0,
                        };
                        for report in up.drain(..n_deliver).collect::<Vec<_>>() {
                            if let Some(answer) = serve(&mut view, &report) {
                                down.push(answer);
                            }
                        }
                        let n_back = match network_fault {
                            Fault::DeliverAll => down.len(),
                            Fault::DeliverOne => 1.min(down.len()),
                            _ => 0,
                        };
                        for msg in down.drain(..n_back).collect::<Vec<_>>() {
                            receive(&mut reporter, msg);
                        }
                    }
                }
            }

            // The network heals: whatever is still in flight is lost, then every
            // message is delivered at once and in order.
            up.clear();
            down.clear();
            let mut n_full_after_heal = 0;
            for _ in 0..3 {
                let report = reporter.tick(&truth, HostUtil::default(), vec![]);
                if report.is_full() {
                    n_full_after_heal += 1;
                }
                if let Some(answer) = serve(&mut view, &report) {
                    receive(&mut reporter, answer);
                }
            }
            prop_assert!(n_full_after_heal <= 1, "{n_full_after_heal} full reports after heal");
            prop_assert_eq!(view.vms(), &truth);
        }
    }

    #[test]
    fn gap_asks_for_full_and_full_recovers() {
        let vm = Uuid::from_u128(1);
        let mut reporter = Reporter::start(ReporterState::default());
        let mut view = HostView::new();
        let mut truth = BTreeMap::from([(vm, VmState::Running)]);
        let first = reporter.tick(&truth, HostUtil::default(), vec![]);
        assert!(first.is_full());
        assert!(matches!(view.apply(&first), Applied::InOrder { .. }));
        truth.insert(vm, VmState::Paused);
        let _lost = reporter.tick(&truth, HostUtil::default(), vec![]);
        let heartbeat = reporter.tick(&truth, HostUtil::default(), vec![]);
        assert!(matches!(view.apply(&heartbeat), Applied::NeedFull { .. }));
        reporter.request_full();
        let full = reporter.tick(&truth, HostUtil::default(), vec![]);
        let Applied::InOrder { changes, .. } = view.apply(&full) else {
            panic!("full report must apply");
        };
        assert_eq!(
            changes,
            vec![ViewChange::Upsert {
                vm,
                before: Some(VmState::Running),
                state: VmState::Paused
            }]
        );
        assert_eq!(view.vms(), &truth);
    }

    #[test]
    fn unchanged_interval_is_an_empty_delta() {
        let vm = Uuid::from_u128(1);
        let mut reporter = Reporter::start(ReporterState::default());
        let truth = BTreeMap::from([(vm, VmState::Running)]);
        let _ = reporter.tick(&truth, HostUtil::default(), vec![]);
        let report = reporter.tick(&truth, HostUtil::default(), vec![]);
        assert_eq!(
            report.body,
            ReportBody::Delta {
                changed: vec![],
                removed: vec![]
            }
        );
    }
}

//! Target `agent_msgs`: the agent protocol's decoder, and the sync state machines
//! behind it.
//!
//! The server decodes [`AgentMsg`] frames from any host that holds an agent token (and a
//! compromised host is the case to defend against); an agent decodes [`ServerMsg`]
//! frames. Decoding alone is shallow, so the decoded state reports go on into the
//! server's [`HostView`], mixed with reports built to hit its edge cases (stale and future
//! epochs, gaps, unknown and reused slots) and with honest reports of a real
//! [`Reporter`], and decoded acks and full-sync requests go to that reporter. After each
//! report the view's documented behaviour must hold:
//! - a stale report or one that needs a full sync changes nothing;
//! - an applied report acknowledges its own epoch and seq, and the view moves to its
//!   epoch, never back;
//! - the changes it lists, replayed one by one on the view before, give the view after,
//!   each with the right `before` and none a no-op;
//! - an applied full report makes the view exactly the report's VMs.
//!
//! Input: a sequence of operations, each one byte (mod 5) and its operands; see [`run`].

use herd_proto::wire::{self, AgentMsg, HostUtil, Report, ReportBody, ServerMsg, VmId, VmStatus};
use herd_proto::VmState;
use herd_sync::{Applied, HostView, Reporter, ReporterState, ViewChange};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Operation codes (the first byte of each operation, mod 5).
pub const OP_FRAME: u8 = 0;
pub const OP_CRAFTED: u8 = 1;
pub const OP_INVALIDATE: u8 = 2;
pub const OP_RESTART_SERVER: u8 = 3;
pub const OP_AGENT_TICK: u8 = 4;

/// The few VMs crafted reports and the honest agent talk about, so that they collide.
fn vm(idx: u8) -> VmId {
    Uuid::from_u128(u128::from(idx % 4) + 1)
}

fn state(idx: u8) -> VmState {
    VmState::ALL[usize::from(idx) % VmState::ALL.len()]
}

struct World {
    view: HostView,
    reporter: Reporter,
    truth: BTreeMap<VmId, VmState>,
}

/// Runs the operations:
/// - `OP_FRAME len_hi len_lo bytes...`: one frame, decoded as `AgentMsg` (a report goes
///   to the view) and as `ServerMsg` (an ack or a full request goes to the agent).
/// - `OP_CRAFTED ...`: a report from a compact description, see [`crafted_report`].
/// - `OP_INVALIDATE`: the agent reconnected.
/// - `OP_RESTART_SERVER`: the server restarted and seeded the view from its store.
/// - `OP_AGENT_TICK vm state`: the truth changes (a state of 255 removes the VM), and the
///   honest agent reports.
pub fn run(data: &[u8]) {
    let mut world = World {
        view: HostView::new(),
        reporter: Reporter::start(ReporterState::default()),
        truth: BTreeMap::new(),
    };
    let mut rest = data;
    while let Some((&op, after)) = rest.split_first() {
        rest = after;
        match op % 5 {
            OP_FRAME => {
                let (len, after) = match rest {
                    [hi, lo, after @ ..] => (usize::from(*hi) << 8 | usize::from(*lo), after),
                    _ => (rest.len(), &[][..]),
                };
                let (frame, after) = after.split_at(len.min(after.len()));
                rest = after;
                frame_op(&mut world, frame);
            }
            OP_CRAFTED => {
                let (report, after) = crafted_report(rest);
                rest = after;
                apply_checked(&mut world.view, &report);
            }
            OP_INVALIDATE => {
                let before = world.view.clone();
                world.view.invalidate();
                assert_eq!(world.view.epoch(), None);
                assert_eq!(world.view.vms(), before.vms());
            }
            OP_RESTART_SERVER => {
                world.view = HostView::from_store(world.view.vms().clone());
            }
            _ => {
                let (vm_idx, state_idx, after) = match rest {
                    [vm_idx, state_idx, after @ ..] => (*vm_idx, *state_idx, after),
                    _ => (0, 0, &[][..]),
                };
                rest = after;
                if state_idx == 255 {
                    world.truth.remove(&vm(vm_idx));
                } else {
                    world.truth.insert(vm(vm_idx), state(state_idx));
                }
                let report = world
                    .reporter
                    .tick(&world.truth, HostUtil::default(), vec![]);
                let msg = AgentMsg::Report(report.clone());
                assert_eq!(
                    wire::decode::<AgentMsg>(&wire::encode(&msg)).ok(),
                    Some(msg)
                );
                let answer = apply_checked(&mut world.view, &report);
                match answer {
                    Applied::InOrder { epoch, seq, .. } => world.reporter.on_ack(epoch, seq),
                    Applied::NeedFull { .. } => world.reporter.request_full(),
                    Applied::Stale => {}
                }
            }
        }
    }
}

fn frame_op(world: &mut World, frame: &[u8]) {
    if let Ok(msg) = wire::decode::<AgentMsg>(frame) {
        let again = wire::decode::<AgentMsg>(&wire::encode(&msg));
        assert_eq!(
            again.ok().as_ref(),
            Some(&msg),
            "AgentMsg does not round-trip"
        );
        if let AgentMsg::Report(report) = &msg {
            apply_checked(&mut world.view, report);
        }
    }
    if let Ok(msg) = wire::decode::<ServerMsg>(frame) {
        let again = wire::decode::<ServerMsg>(&wire::encode(&msg));
        assert_eq!(
            again.ok().as_ref(),
            Some(&msg),
            "ServerMsg does not round-trip"
        );
        match msg {
            ServerMsg::Ack { epoch, seq } => world.reporter.on_ack(epoch, seq),
            ServerMsg::NeedFull { .. } => world.reporter.request_full(),
            _ => {}
        }
        // Never panics, whatever the acks claimed.
        let _ = world.reporter.n_unacked();
    }
}

/// Builds a report from a compact description, so that the fuzzer reaches the view's
/// edge cases without having to find postcard encodings first:
/// `head epoch seq n (slot vm state)*n m slot*m`, where `head` bit 0 makes it full,
/// `slot`, `vm` and `epoch` are small (mod 4), `vm` 0 leaves the slot unnamed, and the
/// counts are mod 5. Missing bytes read as 0.
pub fn crafted_report(data: &[u8]) -> (Report, &[u8]) {
    let mut rest = data;
    let mut next = || match rest.split_first() {
        Some((&byte, after)) => {
            rest = after;
            byte
        }
        None => 0,
    };
    let head = next();
    let epoch = u64::from(next() % 4);
    let seq = u64::from(next() % 8);
    let n_changed = next() % 5;
    let mut changed = Vec::new();
    for _ in 0..n_changed {
        let slot = u32::from(next() % 4);
        let vm_idx = next();
        let state_idx = next();
        changed.push(VmStatus {
            slot,
            vm: (vm_idx % 5 != 0).then(|| vm(vm_idx % 5 - 1)),
            state: state(state_idx),
        });
    }
    let body = if head & 1 == 1 {
        ReportBody::Full { vms: changed }
    } else {
        let n_removed = next() % 5;
        let removed = (0..n_removed).map(|_| u32::from(next() % 4)).collect();
        ReportBody::Delta { changed, removed }
    };
    let report = Report {
        epoch,
        seq,
        util: HostUtil::default(),
        body,
        events: vec![],
    };
    (report, rest)
}

/// Applies a report and checks the view's invariants (see the module docs).
pub fn apply_checked(view: &mut HostView, report: &Report) -> Applied {
    let before = view.clone();
    let applied = view.apply(report);
    match &applied {
        Applied::Stale | Applied::NeedFull { .. } => {
            assert_eq!(view, &before, "{applied:?} changed the view");
        }
        Applied::InOrder {
            epoch,
            seq,
            changes,
        } => {
            assert_eq!((*epoch, *seq), (report.epoch, report.seq));
            assert_eq!(view.epoch(), Some(report.epoch));
            if let Some(old) = before.epoch() {
                assert!(report.epoch >= old, "epoch went back from {old}");
            }
            let mut replay = before.vms().clone();
            for change in changes {
                match change {
                    ViewChange::Upsert {
                        vm,
                        before: was,
                        state,
                    } => {
                        assert_ne!(*was, Some(*state), "no-op change {change:?}");
                        assert_eq!(replay.get(vm).copied(), *was, "wrong before: {change:?}");
                        replay.insert(*vm, *state);
                    }
                    ViewChange::Removed { vm, before: was } => {
                        assert_eq!(replay.remove(vm), Some(*was), "wrong before: {change:?}");
                    }
                }
            }
            assert_eq!(&replay, view.vms(), "the changes do not explain the view");
            if let ReportBody::Full { vms } = &report.body {
                let mut want = BTreeMap::new();
                for status in vms {
                    if let Some(vm) = status.vm {
                        want.insert(vm, status.state);
                    }
                }
                assert_eq!(view.vms(), &want, "a full report did not replace the view");
            }
        }
    }
    applied
}

//! The agent side of delta sync.

use crate::diff::Diff;
use herd_proto::wire::{HostUtil, Report, ReportBody, VmEvent, VmId, VmStatus};
use herd_proto::VmState;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// What the agent persists between runs so a restart keeps its epochs increasing and
/// can compare what it sees after the restart with what it reported before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReporterState {
    pub epoch: u64,
    pub last_reported: BTreeMap<VmId, VmState>,
}

/// Builds one report per sync interval.
#[derive(Debug, Clone)]
pub struct Reporter {
    epoch: u64,
    next_seq: u64,
    last_reported: BTreeMap<VmId, VmState>,
    full_requested: bool,
    last_acked_seq: Option<u64>,
    /// The slot of each VM in the current mapping (see `VmStatus`).
    slots: HashMap<VmId, u32>,
    next_slot: u32,
}

impl Reporter {
    /// Starts a new epoch after the persisted one. The first report is a full one: the
    /// server cannot know this epoch yet.
    pub fn start(persisted: ReporterState) -> Reporter {
        Reporter {
            epoch: persisted.epoch.saturating_add(1),
            next_seq: 1,
            last_reported: persisted.last_reported,
            full_requested: true,
            last_acked_seq: None,
            slots: HashMap::new(),
            next_slot: 0,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The state to persist after each report.
    pub fn state(&self) -> ReporterState {
        ReporterState {
            epoch: self.epoch,
            last_reported: self.last_reported.clone(),
        }
    }

    pub fn last_reported(&self) -> &BTreeMap<VmId, VmState> {
        &self.last_reported
    }

    fn map(&mut self, vm: VmId) -> u32 {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.slots.insert(vm, slot);
        slot
    }

    /// The server asked for a full report (or the connection is new).
    pub fn request_full(&mut self) {
        self.full_requested = true;
    }

    pub fn on_ack(&mut self, epoch: u64, seq: u64) {
        if epoch == self.epoch && self.last_acked_seq.is_none_or(|acked| seq > acked) {
            self.last_acked_seq = Some(seq);
        }
    }

    /// Reports sent but not yet acknowledged.
    pub fn n_unacked(&self) -> u64 {
        let sent = self.next_seq - 1;
        sent - self.last_acked_seq.unwrap_or(0).min(sent)
    }

    /// Builds this interval's report from the observed truth and records it as
    /// reported. `events` are the lifecycle events derived for this interval.
    pub fn tick(
        &mut self,
        observed: &BTreeMap<VmId, VmState>,
        util: HostUtil,
        events: Vec<VmEvent>,
    ) -> Report {
        let diff = Diff::between(&self.last_reported, observed);
        self.tick_with(observed.clone(), &diff, util, events)
    }

    /// [`Reporter::tick`] for a caller that already compared `observed` with
    /// [`Reporter::last_reported`]: `diff` must be that comparison.
    pub fn tick_with(
        &mut self,
        observed: BTreeMap<VmId, VmState>,
        diff: &Diff,
        util: HostUtil,
        events: Vec<VmEvent>,
    ) -> Report {
        debug_assert_eq!(*diff, Diff::between(&self.last_reported, &observed));
        let seq = self.next_seq;
        self.next_seq += 1;
        let body = if std::mem::take(&mut self.full_requested) {
            // A full report starts a new mapping of slots.
            self.slots.clear();
            self.next_slot = 0;
            let vms = observed
                .iter()
                .map(|(vm, state)| VmStatus {
                    slot: self.map(*vm),
                    vm: Some(*vm),
                    state: *state,
                })
                .collect();
            ReportBody::Full { vms }
        } else {
            let mut changed = Vec::with_capacity(diff.changed.len());
            for change in &diff.changed {
                let (slot, vm) = match self.slots.get(&change.vm) {
                    Some(slot) => (*slot, None),
                    None => (self.map(change.vm), Some(change.vm)),
                };
                changed.push(VmStatus {
                    slot,
                    vm,
                    state: change.to,
                });
            }
            let mut removed = Vec::with_capacity(diff.removed.len());
            for vm in &diff.removed {
                match self.slots.remove(vm) {
                    Some(slot) => removed.push(slot),
                    // Never mapped: only a full report can tell the server.
                    None => self.full_requested = true,
                }
            }
            ReportBody::Delta { changed, removed }
        };
        self.last_reported = observed;
        Report {
            epoch: self.epoch,
            seq,
            util,
            body,
            events,
        }
    }
}

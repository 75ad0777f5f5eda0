//! One migration as a state machine without I/O: what each agent's answer moves it to,
//! which order each phase repeats, and when the record may move to the target.
//!
//! **Invariant:** the VM runs on at most one host, and the server's record names a host
//! that runs it. The record moves (the commit) only once the target says it runs the
//! VM. Before that, a failure rolls back; and once the source may have stopped the VM
//! for the switch-over, the source is told to run it again only after the target has
//! confirmed it holds nothing of the VM. A source that itself reports a failure still
//! runs the VM (its hypervisor never finished sending, so the target cannot run it),
//! which lets a retry start at once while the failed target is cleaned in the
//! background.

use herd_proto::migration::{MigrationId, MigrationOrder, MigrationUpdate, TransferProgress};
use herd_proto::wire::{HostId, VmId, VmSpec};
use serde::{Deserialize, Serialize};

/// Attempts per migration, the first included: a failed attempt tries the next
/// candidate host unless the user named the target.
pub const MAX_ATTEMPTS: u32 = 3;

/// The downtime the source's hypervisor is asked to keep the switch-over within.
pub const MAX_DOWNTIME_MS: u64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The target is asked to expect the VM.
    Preparing,
    /// The source sends the VM to the target.
    Transferring,
    /// The source sent everything and stopped the VM; the target must say it runs it.
    SwitchingOver,
    /// The record names the target; the source's copy is to be removed.
    Committed,
    /// The target is to drop its copy; the source may have stopped the VM.
    RollingBack,
    /// The target holds nothing; the source is to run the VM again.
    Resuming,
    /// Committed and the source's copy removed.
    Done,
    /// Rolled back, with no attempt left: the VM runs on the source.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Transferring => "transferring",
            Phase::SwitchingOver => "switching_over",
            Phase::Committed => "committed",
            Phase::RollingBack => "rolling_back",
            Phase::Resuming => "resuming",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// Whether the migration has ended (stale targets may still be cleaned).
    pub fn is_over(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }

    /// Whether capacity is held on the target for the VM.
    pub fn holds_target(self) -> bool {
        matches!(
            self,
            Phase::Preparing | Phase::Transferring | Phase::SwitchingOver | Phase::RollingBack
        )
    }
}

/// One migration, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    pub id: MigrationId,
    pub vm: VmId,
    pub spec: VmSpec,
    pub source: HostId,
    pub target: HostId,
    /// Where the target waits for the source, once it said.
    pub target_addr: Option<String>,
    pub phase: Phase,
    pub attempt: u32,
    /// The targets tried so far, the current one included.
    pub tried: Vec<HostId>,
    /// The user named the target: no other host is tried.
    pub pinned: bool,
    pub progress: TransferProgress,
    pub downtime_ms: Option<u64>,
    pub transfer_ms: Option<u64>,
    /// Why the last attempt failed, or the migration did.
    pub reason: Option<String>,
    /// Hosts of failed attempts that are still to drop their copy.
    pub cleanup: Vec<HostId>,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    /// The shape held on the target when it is not the spec's: a resize that moves
    /// the VM holds its new size there, and applies it once the move is committed.
    #[serde(default)]
    pub hold: Option<crate::resize::plan::Size>,
}

/// What the coordinator must do after a step, besides saving the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send this order now (the phase's order, or a cleanup's).
    Order(HostId, MigrationOrder),
    /// Move the VM's record to the target, atomically with saving the migration.
    Commit,
    /// Release the capacity held on this former target.
    ReleaseTarget(HostId),
    /// The attempt failed and the VM runs on the source: pick the next target and call
    /// [`Migration::retry`], or [`Migration::fail`] if there is none.
    Retry,
    /// Record this in the VM's events.
    Event(String),
}

impl Migration {
    pub fn new(
        id: MigrationId,
        vm: VmId,
        spec: VmSpec,
        source: HostId,
        target: HostId,
        pinned: bool,
        now_ms: i64,
    ) -> Migration {
        Migration {
            id,
            vm,
            spec,
            source,
            target,
            target_addr: None,
            phase: Phase::Preparing,
            attempt: 1,
            tried: vec![target],
            pinned,
            progress: TransferProgress::default(),
            downtime_ms: None,
            transfer_ms: None,
            reason: None,
            cleanup: Vec::new(),
            started_at_ms: now_ms,
            updated_at_ms: now_ms,
            hold: None,
        }
    }

    /// The spec whose capacity a target holds: the VM's, in the held shape if any.
    pub fn held_spec(&self) -> VmSpec {
        let mut spec = self.spec.clone();
        if let Some(size) = self.hold {
            spec.vcpus = size.vcpus;
            spec.memory_mib = size.memory_mib;
        }
        spec
    }

    /// The order the current phase repeats until it is answered.
    pub fn order(&self) -> Option<(HostId, MigrationOrder)> {
        let (migration, vm) = (self.id, self.vm);
        match self.phase {
            Phase::Preparing | Phase::SwitchingOver => Some((
                self.target,
                MigrationOrder::Expect {
                    migration,
                    attempt: self.attempt,
                    vm,
                    spec: Box::new(self.spec.clone()),
                    source: self.source,
                },
            )),
            Phase::Transferring => self.target_addr.clone().map(|addr| {
                (
                    self.source,
                    MigrationOrder::Send {
                        migration,
                        attempt: self.attempt,
                        vm,
                        target: self.target,
                        addr,
                        max_downtime_ms: MAX_DOWNTIME_MS,
                    },
                )
            }),
            Phase::Committed => Some((self.source, MigrationOrder::Release { migration, vm })),
            Phase::RollingBack => Some((self.target, MigrationOrder::Abort { migration, vm })),
            Phase::Resuming => Some((self.source, MigrationOrder::Resume { migration, vm })),
            Phase::Done | Phase::Failed => None,
        }
    }

    /// Every order to repeat now: the phase's and the cleanups of failed attempts.
    pub fn orders(&self) -> Vec<(HostId, MigrationOrder)> {
        let mut orders: Vec<_> = self.order().into_iter().collect();
        orders.extend(self.cleanup.iter().map(|host| {
            (
                *host,
                MigrationOrder::Abort {
                    migration: self.id,
                    vm: self.vm,
                },
            )
        }));
        orders
    }

    /// Whether anything is left to do: a phase to finish or a target to clean.
    pub fn is_active(&self) -> bool {
        !self.phase.is_over() || !self.cleanup.is_empty()
    }

    fn enter(&mut self, phase: Phase, now_ms: i64, out: &mut Vec<Effect>) {
        let held = self.phase.holds_target();
        self.phase = phase;
        self.updated_at_ms = now_ms;
        if held && !phase.holds_target() && phase != Phase::Committed {
            out.push(Effect::ReleaseTarget(self.target));
        }
        if let Some(order) = self.order() {
            out.push(Effect::Order(order.0, order.1));
        }
    }

    /// The attempt failed while the source still runs the VM: the target is cleaned in
    /// the background and the next attempt may start.
    fn source_runs(&mut self, reason: String, now_ms: i64, out: &mut Vec<Effect>) {
        self.reason = Some(reason.clone());
        if !self.cleanup.contains(&self.target) {
            self.cleanup.push(self.target);
        }
        out.push(Effect::Event(format!(
            "migration attempt {} to host {} failed: {reason}; the VM runs on host {}",
            self.attempt, self.target, self.source
        )));
        if self.phase.holds_target() {
            out.push(Effect::ReleaseTarget(self.target));
        }
        self.phase = Phase::Failed;
        self.updated_at_ms = now_ms;
        out.push(Effect::Order(
            self.target,
            MigrationOrder::Abort {
                migration: self.id,
                vm: self.vm,
            },
        ));
        out.push(Effect::Retry);
    }

    /// The attempt failed and the source may have stopped the VM: clean the target
    /// first, then resume the source.
    fn roll_back(&mut self, reason: String, now_ms: i64, out: &mut Vec<Effect>) {
        self.reason = Some(reason.clone());
        out.push(Effect::Event(format!(
            "migration to host {} failed: {reason}; rolling back",
            self.target
        )));
        self.enter(Phase::RollingBack, now_ms, out);
    }

    /// An agent's answer to an order of `attempt` (0: about the whole migration).
    /// Answers from a host that has no part in the current phase, about an earlier
    /// attempt, or that the phase does not expect, change nothing.
    pub fn on_update(
        &mut self,
        from: HostId,
        attempt: u32,
        update: MigrationUpdate,
        now_ms: i64,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        if from != self.source && from != self.target && !self.cleanup.contains(&from) {
            return out;
        }
        let cleaning = matches!(
            update,
            MigrationUpdate::Aborted | MigrationUpdate::Resumed | MigrationUpdate::Released
        );
        if !cleaning && attempt != self.attempt {
            return out;
        }
        if update == MigrationUpdate::Aborted && self.cleanup.contains(&from) {
            self.cleanup.retain(|host| *host != from);
            if from != self.target || self.phase != Phase::RollingBack {
                return out;
            }
        }
        let from_source = from == self.source;
        let from_target = from == self.target;
        match (self.phase, update) {
            (Phase::Preparing, MigrationUpdate::Expecting { .. }) if from_target => {
                // The address is filled in by the coordinator, which knows where the
                // target connects from.
            }
            (Phase::Preparing, MigrationUpdate::Failed { reason }) if from_target => {
                // The source was never told to send.
                self.source_runs(
                    format!("the target could not prepare: {reason}"),
                    now_ms,
                    &mut out,
                );
            }
            (Phase::Transferring, MigrationUpdate::Progress(progress)) if from_source => {
                self.progress = progress;
                self.updated_at_ms = now_ms;
            }
            (
                Phase::Transferring,
                MigrationUpdate::Sent {
                    downtime_ms,
                    total_ms,
                    transferred_bytes,
                },
            ) if from_source => {
                self.downtime_ms = downtime_ms;
                self.transfer_ms = Some(total_ms);
                self.progress.transferred_bytes = transferred_bytes;
                self.progress.remaining_bytes = 0;
                self.enter(Phase::SwitchingOver, now_ms, &mut out);
            }
            (
                Phase::Committed | Phase::Done,
                MigrationUpdate::Sent {
                    downtime_ms,
                    total_ms,
                    transferred_bytes,
                },
            ) if from_source => {
                // The target ran the VM before the source's word on the transfer came
                // (its relay drains first): the figures still belong to the record.
                self.downtime_ms = downtime_ms;
                self.transfer_ms = Some(total_ms);
                self.progress.transferred_bytes = transferred_bytes;
                self.progress.remaining_bytes = 0;
            }
            (Phase::Transferring | Phase::SwitchingOver, MigrationUpdate::Arrived)
                if from_target =>
            {
                self.phase = Phase::Committed;
                self.updated_at_ms = now_ms;
                out.push(Effect::Commit);
                out.push(Effect::Event(format!(
                    "migrated from host {} to host {}{}",
                    self.source,
                    self.target,
                    self.downtime_ms
                        .map(|ms| format!(" (downtime {ms} ms)"))
                        .unwrap_or_default()
                )));
                if let Some(order) = self.order() {
                    out.push(Effect::Order(order.0, order.1));
                }
            }
            (Phase::Transferring | Phase::RollingBack, MigrationUpdate::Failed { reason })
                if from_source =>
            {
                // Its hypervisor did not finish sending: it still runs the VM.
                self.source_runs(reason, now_ms, &mut out);
            }
            (Phase::Transferring | Phase::SwitchingOver, MigrationUpdate::Failed { reason })
                if from_target =>
            {
                self.roll_back(format!("the target failed: {reason}"), now_ms, &mut out);
            }
            (Phase::RollingBack, MigrationUpdate::Aborted) if from_target => {
                self.enter(Phase::Resuming, now_ms, &mut out);
            }
            (Phase::Resuming, MigrationUpdate::Resumed) if from_source => {
                self.phase = Phase::Failed;
                self.updated_at_ms = now_ms;
                out.push(Effect::Retry);
            }
            (Phase::Committed, MigrationUpdate::Released) if from_source => {
                self.enter(Phase::Done, now_ms, &mut out);
            }
            _ => {}
        }
        out
    }

    /// The target said where it waits: the source is told to send.
    pub fn expecting_at(&mut self, addr: String, now_ms: i64) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.phase == Phase::Preparing {
            self.target_addr = Some(addr);
            self.enter(Phase::Transferring, now_ms, &mut out);
        }
        out
    }

    /// Nothing moved for too long in a phase that waits for an answer.
    pub fn timed_out(&mut self, waited_ms: i64, now_ms: i64) -> Vec<Effect> {
        let mut out = Vec::new();
        let reason = format!("no answer for {} s", waited_ms / 1000);
        match self.phase {
            // The source was never told to send: it runs the VM.
            Phase::Preparing => self.source_runs(
                format!("the target did not get ready: {reason}"),
                now_ms,
                &mut out,
            ),
            Phase::Transferring | Phase::SwitchingOver => self.roll_back(reason, now_ms, &mut out),
            // Cleaning and resuming wait as long as it takes: giving up there could
            // leave the VM on two hosts or none.
            _ => {}
        }
        out
    }

    /// The next attempt, to `target`.
    pub fn retry(&mut self, target: HostId, now_ms: i64) -> Vec<Effect> {
        let mut out = Vec::new();
        self.attempt += 1;
        self.target = target;
        self.target_addr = None;
        self.progress = TransferProgress::default();
        self.downtime_ms = None;
        self.transfer_ms = None;
        self.tried.push(target);
        out.push(Effect::Event(format!(
            "migration attempt {} to host {target}",
            self.attempt
        )));
        self.phase = Phase::Preparing;
        self.updated_at_ms = now_ms;
        if let Some(order) = self.order() {
            out.push(Effect::Order(order.0, order.1));
        }
        out
    }

    /// Whether another attempt may be made.
    pub fn may_retry(&self) -> bool {
        !self.pinned && self.attempt < MAX_ATTEMPTS
    }

    /// No attempt left: the migration failed, the VM runs on the source.
    pub fn fail(&mut self, why: &str, now_ms: i64) -> Vec<Effect> {
        self.phase = Phase::Failed;
        self.updated_at_ms = now_ms;
        let reason = match &self.reason {
            Some(last) => format!("{why} (last attempt: {last})"),
            None => why.to_owned(),
        };
        self.reason = Some(reason.clone());
        vec![Effect::Event(format!(
            "migration failed: {reason}; the VM stays on host {}",
            self.source
        ))]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const SOURCE: HostId = HostId::from_u128(1);
    const T1: HostId = HostId::from_u128(2);
    const T2: HostId = HostId::from_u128(3);

    fn spec() -> VmSpec {
        VmSpec {
            name: "m".into(),
            hypervisor: "qemu".into(),
            vcpus: 1,
            memory_mib: 256,
            image: "default".into(),
            command: vec![],
            policy: Default::default(),
            keep_running: false,
            disk_mib: 0,
            burst: Default::default(),
            seed: None,
        }
    }

    fn new() -> Migration {
        Migration::new(
            MigrationId::from_u128(9),
            VmId::from_u128(7),
            spec(),
            SOURCE,
            T1,
            false,
            0,
        )
    }

    fn sent() -> MigrationUpdate {
        MigrationUpdate::Sent {
            downtime_ms: Some(20),
            total_ms: 800,
            transferred_bytes: 100,
        }
    }

    fn orders_to(effects: &[Effect]) -> Vec<HostId> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Order(host, _) => Some(*host),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_happy_path_commits_only_on_arrival_and_then_releases_the_source() {
        let mut m = new();
        assert!(matches!(
            m.order(),
            Some((T1, MigrationOrder::Expect { .. }))
        ));
        assert!(m
            .on_update(T1, m.attempt, MigrationUpdate::Expecting { port: 4 }, 1)
            .is_empty());
        let effects = m.expecting_at("198.51.100.3:4".into(), 1);
        assert_eq!(m.phase, Phase::Transferring);
        assert_eq!(orders_to(&effects), vec![SOURCE]);
        m.on_update(
            SOURCE,
            m.attempt,
            MigrationUpdate::Progress(TransferProgress::default()),
            2,
        );
        let effects = m.on_update(SOURCE, m.attempt, sent(), 3);
        assert_eq!(m.phase, Phase::SwitchingOver);
        assert!(!effects.contains(&Effect::Commit));
        let effects = m.on_update(T1, m.attempt, MigrationUpdate::Arrived, 4);
        assert!(effects.contains(&Effect::Commit));
        assert_eq!(m.phase, Phase::Committed);
        assert!(matches!(
            m.order(),
            Some((SOURCE, MigrationOrder::Release { .. }))
        ));
        m.on_update(SOURCE, m.attempt, MigrationUpdate::Released, 5);
        assert_eq!(m.phase, Phase::Done);
        assert!(!m.is_active());
        assert_eq!(m.downtime_ms, Some(20));
    }

    #[test]
    fn a_source_failure_retries_at_once_and_cleans_the_old_target_behind() {
        let mut m = new();
        m.expecting_at("a:1".into(), 1);
        let effects = m.on_update(
            SOURCE,
            m.attempt,
            MigrationUpdate::Failed {
                reason: "cut".into(),
            },
            2,
        );
        assert!(effects.contains(&Effect::Retry));
        assert!(effects.contains(&Effect::ReleaseTarget(T1)));
        assert_eq!(m.cleanup, vec![T1]);
        assert!(m.may_retry());
        m.retry(T2, 3);
        assert_eq!(m.phase, Phase::Preparing);
        let to: Vec<HostId> = m.orders().into_iter().map(|(h, _)| h).collect();
        assert_eq!(to, vec![T2, T1]);
        m.on_update(T1, m.attempt, MigrationUpdate::Aborted, 4);
        assert!(m.cleanup.is_empty());
        assert_eq!(m.phase, Phase::Preparing);
    }

    #[test]
    fn after_the_source_stopped_the_source_resumes_only_after_the_target_is_clean() {
        let mut m = new();
        m.expecting_at("a:1".into(), 1);
        m.on_update(SOURCE, m.attempt, sent(), 2);
        let effects = m.on_update(
            T1,
            m.attempt,
            MigrationUpdate::Failed {
                reason: "load".into(),
            },
            3,
        );
        assert_eq!(m.phase, Phase::RollingBack);
        assert_eq!(orders_to(&effects), vec![T1]);
        // A resume now would be too early; nothing tells the source to.
        assert!(matches!(
            m.order(),
            Some((T1, MigrationOrder::Abort { .. }))
        ));
        let effects = m.on_update(T1, m.attempt, MigrationUpdate::Aborted, 4);
        assert_eq!(m.phase, Phase::Resuming);
        assert!(effects.contains(&Effect::ReleaseTarget(T1)));
        assert!(matches!(
            m.order(),
            Some((SOURCE, MigrationOrder::Resume { .. }))
        ));
        let effects = m.on_update(SOURCE, m.attempt, MigrationUpdate::Resumed, 5);
        assert_eq!(effects, vec![Effect::Retry]);
        assert_eq!(m.phase, Phase::Failed);
    }

    #[test]
    fn timeouts_roll_back_but_never_give_up_on_cleaning() {
        let mut m = new();
        let effects = m.timed_out(30_000, 30_000);
        assert!(effects.contains(&Effect::Retry));
        let mut m = new();
        m.expecting_at("a:1".into(), 1);
        m.on_update(SOURCE, m.attempt, sent(), 2);
        m.timed_out(30_000, 30_000);
        assert_eq!(m.phase, Phase::RollingBack);
        assert!(m.timed_out(600_000, 600_000).is_empty());
        assert_eq!(m.phase, Phase::RollingBack);
    }

    #[test]
    fn a_pinned_migration_is_not_retried_elsewhere() {
        let mut m = new();
        m.pinned = true;
        assert!(!m.may_retry());
        m.fail("no other host", 1);
        assert!(m.reason.as_deref().unwrap().starts_with("no other host"));
    }

    fn update() -> impl Strategy<Value = (u8, bool, MigrationUpdate)> {
        let update = prop_oneof![
            Just(MigrationUpdate::Expecting { port: 1 }),
            Just(MigrationUpdate::Progress(TransferProgress::default())),
            Just(MigrationUpdate::Sent {
                downtime_ms: None,
                total_ms: 1,
                transferred_bytes: 1
            }),
            Just(MigrationUpdate::Arrived),
            Just(MigrationUpdate::Failed { reason: "x".into() }),
            Just(MigrationUpdate::Aborted),
            Just(MigrationUpdate::Resumed),
            Just(MigrationUpdate::Released),
        ];
        (0u8..4, any::<bool>(), update)
    }

    proptest! {
        /// Whatever the agents say, in any order, from any host: the commit happens at
        /// most once and only after the current target said it runs the VM; the source
        /// is told to resume only when the target is clean or the source said it still
        /// runs; and the target's capacity is released at most once per attempt.
        #[test]
        fn any_history_keeps_the_vm_on_exactly_one_host(
            steps in proptest::collection::vec(update(), 0..40),
            retry_targets in proptest::collection::vec(2u128..6, 0..4),
        ) {
            let mut m = new();
            let mut commits = 0;
            let mut targets = retry_targets.into_iter();
            let mut target_clean = false;
            for (at, (who, stale, update)) in steps.into_iter().enumerate() {
                let now = at as i64;
                let from = match who {
                    0 => SOURCE,
                    1 => m.target,
                    2 => T2,
                    _ => HostId::from_u128(42),
                };
                let phase_before = m.phase;
                // A stale answer is about the attempt before this one.
                let attempt = if stale { m.attempt.saturating_sub(1) } else { m.attempt };
                let arrived =
                    update == MigrationUpdate::Arrived && from == m.target && attempt == m.attempt;
                if update == MigrationUpdate::Aborted && from == m.target {
                    target_clean = true;
                }
                let mut effects = if let MigrationUpdate::Expecting { .. } = update {
                    let mut e = m.on_update(from, attempt, update, now);
                    if from == m.target && attempt == m.attempt {
                        e.extend(m.expecting_at("x:1".into(), now));
                    }
                    e
                } else {
                    m.on_update(from, attempt, update, now)
                };
                if effects.contains(&Effect::Retry) {
                    match targets.next() {
                        Some(t) if m.may_retry() => {
                            target_clean = false;
                            effects.extend(m.retry(HostId::from_u128(t), now));
                        }
                        _ => effects.extend(m.fail("none", now)),
                    }
                }
                for effect in &effects {
                    match effect {
                        Effect::Commit => {
                            commits += 1;
                            prop_assert!(arrived);
                            prop_assert!(matches!(phase_before, Phase::Transferring | Phase::SwitchingOver));
                        }
                        Effect::Order(host, MigrationOrder::Resume { .. }) => {
                            prop_assert_eq!(*host, SOURCE);
                            prop_assert!(target_clean);
                        }
                        _ => {}
                    }
                }
                prop_assert!(commits <= 1);
                if commits == 1 {
                    prop_assert!(matches!(m.phase, Phase::Committed | Phase::Done));
                }
            }
        }
    }
}

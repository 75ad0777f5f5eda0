//! One broadcast as the server keeps it, and what it does next: a pure state machine
//! of capture -> spread -> ended -> forgotten, fed the hosts' answers and the clock,
//! answering with the orders to send and the copies to make.
//!
//! Every order is repeated until it is answered (a lost message, a restarted agent), a
//! host that goes down is given up on (its children are fed by their grandparent, on
//! the hosts' own initiative), and the broadcast ends when every host is done or given
//! up on. The snapshots stay on the hosts for [`KEEP_FOR_MS`] after that (copies are
//! made from them meanwhile), then every host is told to forget them.

use herd_proto::broadcast::{BroadcastId, BroadcastOrder, BroadcastUpdate, Manifest, TreeHost};
use herd_proto::wire::{HostId, VmId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An unanswered order goes again after this long.
pub const REPEAT_MS: i64 = 2_000;
/// The snapshots stay on the hosts this long after the broadcast ended.
pub const KEEP_FOR_MS: i64 = 10 * 60 * 1000;
/// A source that has not taken the snapshot after this long has failed.
pub const CAPTURE_WITHIN_MS: i64 = 10 * 60 * 1000;

/// In the order they come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Capturing,
    Spreading,
    Ended,
    Forgotten,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostPhase {
    Waiting,
    Receiving,
    Done,
    Failed,
}

/// One receiving host's part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPart {
    pub phase: HostPhase,
    pub chunks: u32,
    pub refetched: u32,
    pub reason: Option<String>,
    pub done_at_ms: Option<i64>,
    /// The copy started from the snapshot here (with `start`).
    pub copy: Option<VmId>,
    /// When its current order was last sent.
    pub sent_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broadcast {
    pub id: BroadcastId,
    pub vm: VmId,
    pub project: String,
    pub source: HostId,
    /// Every receiving host starts a copy once it holds the snapshot.
    pub start: bool,
    pub phase: Phase,
    pub reason: Option<String>,
    /// The tree, source first; each host with its parent.
    pub tree: Vec<TreeHost>,
    pub manifest: Option<Manifest>,
    pub paused_ms: Option<u64>,
    pub hosts: BTreeMap<HostId, HostPart>,
    pub created_at_ms: i64,
    pub captured_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    /// When the capture order (or the forget orders) last went.
    pub sent_at_ms: Option<i64>,
    /// Hosts that said they forgot it.
    pub forgotten: Vec<HostId>,
}

/// What the coordinator does for a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Send(HostId, BroadcastOrder),
    /// Start a copy from the snapshot on this host.
    MakeCopy(HostId),
    Event(String),
}

impl Broadcast {
    pub fn new(
        id: BroadcastId,
        vm: VmId,
        project: String,
        source: HostId,
        tree: Vec<TreeHost>,
        start: bool,
        now_ms: i64,
    ) -> Broadcast {
        let hosts = tree
            .iter()
            .filter(|h| h.host != source)
            .map(|h| {
                (
                    h.host,
                    HostPart {
                        phase: HostPhase::Waiting,
                        chunks: 0,
                        refetched: 0,
                        reason: None,
                        done_at_ms: None,
                        copy: None,
                        sent_at_ms: None,
                    },
                )
            })
            .collect();
        Broadcast {
            id,
            vm,
            project,
            source,
            start,
            phase: Phase::Capturing,
            reason: None,
            tree,
            manifest: None,
            paused_ms: None,
            hosts,
            created_at_ms: now_ms,
            captured_at_ms: None,
            ended_at_ms: None,
            sent_at_ms: None,
            forgotten: Vec::new(),
        }
    }

    pub fn is_active(&self) -> bool {
        !matches!(self.phase, Phase::Forgotten | Phase::Failed)
    }

    fn spread_order(&self) -> Option<BroadcastOrder> {
        Some(BroadcastOrder::Spread {
            manifest: Box::new(self.manifest.clone()?),
            tree: self.tree.clone(),
        })
    }

    fn due(sent: Option<i64>, now_ms: i64) -> bool {
        sent.is_none_or(|at| now_ms - at >= REPEAT_MS)
    }

    /// What is due now; `down` says which hosts are down.
    pub fn tick(&mut self, now_ms: i64, down: &dyn Fn(HostId) -> bool) -> Vec<Effect> {
        let mut out = Vec::new();
        match self.phase {
            Phase::Capturing => {
                if down(self.source) || now_ms - self.created_at_ms > CAPTURE_WITHIN_MS {
                    self.fail("the source host did not take the snapshot".into(), &mut out);
                } else if Self::due(self.sent_at_ms, now_ms) {
                    self.sent_at_ms = Some(now_ms);
                    out.push(Effect::Send(
                        self.source,
                        BroadcastOrder::Capture {
                            broadcast: self.id,
                            vm: self.vm,
                        },
                    ));
                }
            }
            Phase::Spreading => {
                let Some(order) = self.spread_order() else {
                    return out;
                };
                // The source serves the tree's top: it hears the order too.
                if Self::due(self.sent_at_ms, now_ms) {
                    self.sent_at_ms = Some(now_ms);
                    out.push(Effect::Send(self.source, order.clone()));
                }
                for (host, part) in self.hosts.iter_mut() {
                    if matches!(part.phase, HostPhase::Done | HostPhase::Failed) {
                        continue;
                    }
                    if down(*host) {
                        part.phase = HostPhase::Failed;
                        part.reason = Some("the host went down".into());
                        out.push(Effect::Event(format!(
                            "broadcast: host {host} went down; given up"
                        )));
                        continue;
                    }
                    if Self::due(part.sent_at_ms, now_ms) {
                        part.sent_at_ms = Some(now_ms);
                        out.push(Effect::Send(*host, order.clone()));
                    }
                }
                self.end_if_over(now_ms, &mut out);
            }
            Phase::Ended => {
                let kept = self.ended_at_ms.is_some_and(|at| now_ms - at < KEEP_FOR_MS);
                let copies_pending = self
                    .hosts
                    .values()
                    .any(|p| p.phase == HostPhase::Done && self.start && p.copy.is_none());
                if !kept && !copies_pending {
                    self.forget(now_ms, down, &mut out);
                }
            }
            Phase::Forgotten | Phase::Failed => {}
        }
        out
    }

    /// Tells every host still holding the snapshot to drop it, until each has said so
    /// (a host that is down is not waited for).
    fn forget(&mut self, now_ms: i64, down: &dyn Fn(HostId) -> bool, out: &mut Vec<Effect>) {
        let holders: Vec<HostId> = std::iter::once(self.source)
            .chain(self.hosts.keys().copied())
            .filter(|h| !self.forgotten.contains(h) && !down(*h))
            .collect();
        if holders.is_empty() {
            self.phase = Phase::Forgotten;
            return;
        }
        if Self::due(self.sent_at_ms, now_ms) {
            self.sent_at_ms = Some(now_ms);
            for host in holders {
                out.push(Effect::Send(
                    host,
                    BroadcastOrder::Forget { broadcast: self.id },
                ));
            }
        }
    }

    fn end_if_over(&mut self, now_ms: i64, out: &mut Vec<Effect>) {
        if self.phase != Phase::Spreading {
            return;
        }
        let over = self
            .hosts
            .values()
            .all(|p| matches!(p.phase, HostPhase::Done | HostPhase::Failed));
        if over {
            self.phase = Phase::Ended;
            self.ended_at_ms = Some(now_ms);
            self.sent_at_ms = None;
            let done = self
                .hosts
                .values()
                .filter(|p| p.phase == HostPhase::Done)
                .count();
            let secs = (now_ms - self.captured_at_ms.unwrap_or(self.created_at_ms)) as f64 / 1000.0;
            out.push(Effect::Event(format!(
                "broadcast ended: {done} of {} hosts hold the snapshot, {secs:.1} s after it was taken",
                self.hosts.len()
            )));
        }
    }

    fn fail(&mut self, reason: String, out: &mut Vec<Effect>) {
        out.push(Effect::Event(format!("broadcast failed: {reason}")));
        self.phase = Phase::Failed;
        self.reason = Some(reason);
    }

    /// A host's answer.
    pub fn on_update(&mut self, host: HostId, update: BroadcastUpdate, now_ms: i64) -> Vec<Effect> {
        let mut out = Vec::new();
        match update {
            BroadcastUpdate::Captured {
                manifest,
                paused_ms,
            } if host == self.source && self.phase == Phase::Capturing => {
                if manifest.broadcast != self.id || manifest.vm != self.vm {
                    self.fail(
                        "the source answered about another snapshot".into(),
                        &mut out,
                    );
                    return out;
                }
                out.push(Effect::Event(format!(
                    "broadcast: snapshot taken, {:.1} MiB in {} chunks; the VM was paused {paused_ms} ms",
                    manifest.total_bytes() as f64 / f64::from(1 << 20),
                    manifest.chunks()
                )));
                self.manifest = Some(*manifest);
                self.paused_ms = Some(paused_ms);
                self.captured_at_ms = Some(now_ms);
                self.phase = Phase::Spreading;
                self.sent_at_ms = None;
                // Everyone hears the order at once, not at the next tick.
                out.extend(self.tick(now_ms, &|_| false));
            }
            BroadcastUpdate::Failed { reason } if host == self.source => {
                if matches!(self.phase, Phase::Capturing | Phase::Spreading) {
                    self.fail(format!("the source host: {reason}"), &mut out);
                }
            }
            BroadcastUpdate::Progress { chunks, refetched }
            | BroadcastUpdate::Done { chunks, refetched } => {
                let done = matches!(update, BroadcastUpdate::Done { .. });
                let start = self.start;
                if let Some(part) = self.hosts.get_mut(&host) {
                    if matches!(part.phase, HostPhase::Done | HostPhase::Failed) {
                        return out;
                    }
                    part.chunks = part.chunks.max(chunks);
                    part.refetched = part.refetched.max(refetched);
                    part.phase = if done {
                        HostPhase::Done
                    } else {
                        HostPhase::Receiving
                    };
                    if done {
                        part.done_at_ms = Some(now_ms);
                        if start {
                            out.push(Effect::MakeCopy(host));
                        }
                    }
                }
                self.end_if_over(now_ms, &mut out);
            }
            BroadcastUpdate::Failed { reason } => {
                if let Some(part) = self.hosts.get_mut(&host) {
                    if part.phase != HostPhase::Done {
                        part.phase = HostPhase::Failed;
                        out.push(Effect::Event(format!(
                            "broadcast: host {host} failed: {reason}"
                        )));
                        part.reason = Some(reason);
                    }
                }
                self.end_if_over(now_ms, &mut out);
            }
            BroadcastUpdate::Forgotten => {
                if !self.forgotten.contains(&host) {
                    self.forgotten.push(host);
                }
            }
            BroadcastUpdate::Captured { .. } => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use uuid::Uuid;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn chain(n: u128) -> Vec<TreeHost> {
        (1..=n)
            .map(|h| TreeHost {
                host: id(h),
                addr: format!("198.51.100.{h}:1"),
                parent: (h > 1).then(|| id(h - 1)),
            })
            .collect()
    }

    fn manifest() -> Box<Manifest> {
        Box::new(Manifest {
            broadcast: id(100),
            vm: id(200),
            hypervisor: "oci".into(),
            files: vec![herd_proto::broadcast::SnapshotFile {
                name: "layer.tar".into(),
                size: 3 << 20,
            }],
            chunk_bytes: 1 << 20,
            hashes: vec![[1; 32]; 3],
            handoff: vec![],
        })
    }

    fn sends(effects: &[Effect]) -> Vec<HostId> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(h, _) => Some(*h),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn capture_then_spread_to_all_then_copies_then_forget() {
        let mut b = Broadcast::new(id(100), id(200), "p".into(), id(1), chain(3), true, 0);
        let up = |_: HostId| false;
        assert_eq!(sends(&b.tick(0, &up)), vec![id(1)], "the source captures");
        assert!(sends(&b.tick(500, &up)).is_empty(), "not repeated at once");
        assert_eq!(
            sends(&b.tick(2_000, &up)),
            vec![id(1)],
            "repeated when unanswered"
        );
        let fx = b.on_update(
            id(1),
            BroadcastUpdate::Captured {
                manifest: manifest(),
                paused_ms: 40,
            },
            2_100,
        );
        assert_eq!(b.phase, Phase::Spreading);
        assert_eq!(
            sends(&fx),
            vec![id(1), id(2), id(3)],
            "every host of the tree at once"
        );
        b.on_update(
            id(2),
            BroadcastUpdate::Progress {
                chunks: 1,
                refetched: 0,
            },
            2_200,
        );
        assert_eq!(b.hosts[&id(2)].phase, HostPhase::Receiving);
        let fx = b.on_update(
            id(2),
            BroadcastUpdate::Done {
                chunks: 3,
                refetched: 1,
            },
            2_300,
        );
        assert_eq!(fx, vec![Effect::MakeCopy(id(2))]);
        assert_eq!(
            sends(&b.tick(4_200, &up)),
            vec![id(1), id(3)],
            "the unfinished hear it again"
        );
        let fx = b.on_update(
            id(3),
            BroadcastUpdate::Done {
                chunks: 3,
                refetched: 0,
            },
            4_300,
        );
        assert!(fx.contains(&Effect::MakeCopy(id(3))));
        assert_eq!(b.phase, Phase::Ended);
        // Kept a while, and until the copies exist.
        assert!(sends(&b.tick(4_300 + KEEP_FOR_MS + 1, &up)).is_empty());
        b.hosts.get_mut(&id(2)).unwrap().copy = Some(id(12));
        b.hosts.get_mut(&id(3)).unwrap().copy = Some(id(13));
        let fx = b.tick(4_300 + KEEP_FOR_MS + 1, &up);
        assert_eq!(sends(&fx), vec![id(1), id(2), id(3)]);
        for h in 1..=3 {
            b.on_update(id(h), BroadcastUpdate::Forgotten, 0);
        }
        b.tick(4_300 + KEEP_FOR_MS + 10_000, &up);
        assert_eq!(b.phase, Phase::Forgotten);
        assert!(!b.is_active());
    }

    #[test]
    fn a_host_that_goes_down_is_given_up_and_the_rest_end_it() {
        let mut b = Broadcast::new(id(100), id(200), "p".into(), id(1), chain(3), false, 0);
        b.tick(0, &|_| false);
        b.on_update(
            id(1),
            BroadcastUpdate::Captured {
                manifest: manifest(),
                paused_ms: 1,
            },
            10,
        );
        b.on_update(
            id(3),
            BroadcastUpdate::Done {
                chunks: 3,
                refetched: 0,
            },
            20,
        );
        let fx = b.tick(3_000, &|h| h == id(2));
        assert_eq!(b.hosts[&id(2)].phase, HostPhase::Failed);
        assert_eq!(b.phase, Phase::Ended);
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Event(m) if m.contains("1 of 2"))));
        // A late word from the given-up host changes nothing.
        b.on_update(
            id(2),
            BroadcastUpdate::Done {
                chunks: 3,
                refetched: 0,
            },
            4_000,
        );
        assert_eq!(b.hosts[&id(2)].phase, HostPhase::Failed);
    }

    #[test]
    fn a_failed_capture_fails_the_broadcast_and_strangers_are_ignored() {
        let mut b = Broadcast::new(id(100), id(200), "p".into(), id(1), chain(2), false, 0);
        b.on_update(
            id(9),
            BroadcastUpdate::Done {
                chunks: 3,
                refetched: 0,
            },
            1,
        );
        b.on_update(
            id(2),
            BroadcastUpdate::Captured {
                manifest: manifest(),
                paused_ms: 1,
            },
            1,
        );
        assert_eq!(b.phase, Phase::Capturing, "only the source captures");
        b.on_update(
            id(1),
            BroadcastUpdate::Failed {
                reason: "no such VM".into(),
            },
            2,
        );
        assert_eq!(b.phase, Phase::Failed);
        assert!(b.reason.as_deref().unwrap().contains("no such VM"));
        assert!(!b.is_active());
    }
}

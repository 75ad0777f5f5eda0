//! What is measured must be seen where it happens, inside each agent's sync: each
//! host's probe watches its own reports and acks and adds to figures all hosts share.

use herd_agent::agent::unix_ms;
use herd_agent::drivers::sim::SimDriver;
use herd_agent::SyncProbe;
use herd_proto::wire::VmId;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::oneshot;

/// The figures every host's probe adds to.
pub(super) struct Shared {
    /// Changes made in `[from, to)` (unix ms) are measured; both `u64::MAX` until the
    /// churn phase starts.
    pub(super) window_from_ms: AtomicU64,
    pub(super) window_to_ms: AtomicU64,
    lags_ms: Mutex<Vec<u32>>,
    pub(super) n_reports: AtomicU64,
    pub(super) n_report_bytes: AtomicU64,
    pub(super) n_acks: AtomicU64,
    pub(super) n_connected: AtomicUsize,
    pub(super) n_disconnects: AtomicU64,
    pub(super) interval_ms: AtomicU64,
    /// Hosts not killed: a resync is complete when all of them are back.
    pub(super) n_alive: AtomicUsize,
    pub(super) resync: Mutex<ResyncTracker>,
}

impl Shared {
    pub(super) fn new() -> Shared {
        Shared {
            window_from_ms: AtomicU64::new(u64::MAX),
            window_to_ms: AtomicU64::new(u64::MAX),
            lags_ms: Mutex::new(Vec::new()),
            n_reports: AtomicU64::new(0),
            n_report_bytes: AtomicU64::new(0),
            n_acks: AtomicU64::new(0),
            n_connected: AtomicUsize::new(0),
            n_disconnects: AtomicU64::new(0),
            interval_ms: AtomicU64::new(0),
            n_alive: AtomicUsize::new(0),
            resync: Mutex::new(ResyncTracker::default()),
        }
    }

    fn in_window(&self, changed_at_ms: u64) -> bool {
        changed_at_ms >= self.window_from_ms.load(Ordering::Relaxed)
            && changed_at_ms < self.window_to_ms.load(Ordering::Relaxed)
    }

    pub(super) fn n_lags(&self) -> usize {
        self.lags_ms.lock().len()
    }
}

/// Hosts that lost their server, from the first disconnect until each of them holds
/// an ack of a full report again.
#[derive(Default)]
pub(super) struct ResyncTracker {
    pub(super) current: Option<Resync>,
    pub(super) completed: Vec<ResyncDone>,
}

pub(super) struct Resync {
    started_ms: u64,
    first_reconnect_ms: Option<u64>,
    pub(super) n_lost: usize,
    pub(super) n_back: usize,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct ResyncDone {
    /// Hosts that lost their server in this episode.
    pub(super) hosts: usize,
    /// Whether that was every host.
    pub(super) all_hosts: bool,
    /// From the first disconnect until the last host's full report was acked.
    pub(super) resync_ms: u64,
    /// From the first reconnect until then.
    pub(super) from_first_reconnect_ms: Option<u64>,
}

impl ResyncTracker {
    fn host_lost(&mut self, now_ms: u64) {
        let current = self.current.get_or_insert(Resync {
            started_ms: now_ms,
            first_reconnect_ms: None,
            n_lost: 0,
            n_back: 0,
        });
        current.n_lost += 1;
    }

    fn host_connected(&mut self, now_ms: u64) {
        if let Some(current) = &mut self.current {
            current.first_reconnect_ms.get_or_insert(now_ms);
        }
    }

    fn host_back(&mut self, now_ms: u64, n_alive: usize) {
        let Some(current) = &mut self.current else {
            return;
        };
        current.n_back += 1;
        if current.n_back < current.n_lost {
            return;
        }
        self.completed.push(ResyncDone {
            hosts: current.n_lost,
            all_hosts: current.n_lost >= n_alive,
            resync_ms: now_ms.saturating_sub(current.started_ms),
            from_first_reconnect_ms: current
                .first_reconnect_ms
                .map(|at| now_ms.saturating_sub(at)),
        });
        self.current = None;
    }
}

/// One host's view of its own sync, fed by its agent and by the churn.
#[derive(Default)]
pub(super) struct HostSync {
    epoch: u64,
    /// Reports that carried measured changes, not yet acked: (seq, when each change
    /// was made).
    pending: VecDeque<(u64, Vec<u64>)>,
    /// VMs flipped whose change no report has carried yet: not flipped again until
    /// one has, so that each flip is one reported change.
    in_flight: Vec<VmId>,
    /// Lost its server (in the current resync episode) and not yet back.
    lost: bool,
    /// The full report that will bring it back, once sent.
    full_seq: Option<u64>,
    /// The last report that carried any change (or was full), and the newest ack.
    last_change_seq: u64,
    acked_seq: u64,
    pub(super) killed: bool,
}

pub(super) struct HostProbe {
    pub(super) shared: Arc<Shared>,
    pub(super) driver: Arc<SimDriver>,
    pub(super) sync: Mutex<HostSync>,
    /// Told once: the agent connected for the first time, or could not start.
    pub(super) started: Mutex<Option<oneshot::Sender<Result<(), String>>>>,
}

impl HostProbe {
    pub(super) fn start_failed(&self, reason: String) {
        if let Some(tx) = self.started.lock().take() {
            let _ = tx.send(Err(reason));
        }
    }

    /// The server has acked every report that changed anything.
    pub(super) fn caught_up(&self) -> bool {
        let sync = self.sync.lock();
        sync.acked_seq >= sync.last_change_seq
    }

    /// No change in flight and none waiting for an ack.
    pub(super) fn quiet(&self) -> bool {
        let sync = self.sync.lock();
        sync.in_flight.is_empty() && sync.pending.is_empty()
    }

    /// Flips `vm` unless a flip of it is still unreported; says whether it did.
    pub(super) fn flip(&self, vm: VmId) -> bool {
        let mut sync = self.sync.lock();
        if sync.in_flight.contains(&vm) {
            return false;
        }
        // Under the lock: a report cannot slip between the flip and its record.
        if self.driver.flip(vm).is_none() {
            return false;
        }
        sync.in_flight.push(vm);
        true
    }
}

impl SyncProbe for HostProbe {
    fn connected(&self, sync_interval_ms: u64) {
        let shared = &self.shared;
        shared
            .interval_ms
            .fetch_max(sync_interval_ms, Ordering::Relaxed);
        shared.n_connected.fetch_add(1, Ordering::Relaxed);
        if self.sync.lock().lost {
            shared.resync.lock().host_connected(unix_ms());
        }
        if let Some(tx) = self.started.lock().take() {
            let _ = tx.send(Ok(()));
        }
    }

    fn disconnected(&self) {
        let shared = &self.shared;
        shared.n_connected.fetch_sub(1, Ordering::Relaxed);
        shared.n_disconnects.fetch_add(1, Ordering::Relaxed);
        let mut sync = self.sync.lock();
        // A full report sent before this disconnect brings nothing back.
        sync.full_seq = None;
        if !sync.lost && !sync.killed {
            sync.lost = true;
            shared.resync.lock().host_lost(unix_ms());
        }
    }

    fn reported(&self, epoch: u64, seq: u64, full: bool, changed: &[VmId], bytes: usize) {
        let shared = &self.shared;
        shared.n_reports.fetch_add(1, Ordering::Relaxed);
        shared
            .n_report_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        if changed.is_empty() && !full {
            return;
        }
        let mut sync = self.sync.lock();
        if sync.epoch != epoch {
            sync.epoch = epoch;
            sync.pending.clear();
            sync.acked_seq = 0;
        }
        sync.last_change_seq = seq;
        let mut times = Vec::new();
        for vm in changed {
            if let Some(at) = sync.in_flight.iter().position(|v| v == vm) {
                sync.in_flight.swap_remove(at);
            }
            if let Some(changed_at) = self.driver.changed_at_ms(*vm) {
                if shared.in_window(changed_at) {
                    times.push(changed_at);
                }
            }
        }
        if !times.is_empty() {
            sync.pending.push_back((seq, times));
        }
        if full && sync.lost {
            sync.full_seq = Some(seq);
        }
    }

    fn acked(&self, epoch: u64, seq: u64) {
        let shared = &self.shared;
        shared.n_acks.fetch_add(1, Ordering::Relaxed);
        let now = unix_ms();
        let mut lags = Vec::new();
        let mut sync = self.sync.lock();
        if sync.epoch != epoch {
            return;
        }
        sync.acked_seq = sync.acked_seq.max(seq);
        while sync.pending.front().is_some_and(|(sent, _)| *sent <= seq) {
            if let Some((_, times)) = sync.pending.pop_front() {
                lags.extend(
                    times
                        .into_iter()
                        .map(|at| now.saturating_sub(at).min(u64::from(u32::MAX)) as u32),
                );
            }
        }
        if sync.lost && sync.full_seq.is_some_and(|full| full <= seq) {
            sync.lost = false;
            sync.full_seq = None;
            shared
                .resync
                .lock()
                .host_back(now, shared.n_alive.load(Ordering::Relaxed));
        }
        drop(sync);
        if !lags.is_empty() {
            shared.lags_ms.lock().extend(lags);
        }
    }
}

/// The lags measured since the last call, sorted.
pub(super) fn take_lags(shared: &Shared) -> Vec<u32> {
    let mut lags = std::mem::take(&mut *shared.lags_ms.lock());
    lags.sort_unstable();
    lags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resync_completes_when_every_lost_host_is_back() {
        let mut tracker = ResyncTracker::default();
        tracker.host_lost(1_000);
        tracker.host_lost(1_001);
        tracker.host_connected(1_500);
        tracker.host_back(1_600, 2);
        assert!(tracker.completed.is_empty());
        tracker.host_back(1_900, 2);
        let done = &tracker.completed[0];
        assert!(done.all_hosts);
        assert_eq!(
            (done.resync_ms, done.from_first_reconnect_ms),
            (900, Some(400))
        );
        // One of three hosts: partial.
        tracker.host_lost(5_000);
        tracker.host_back(5_100, 3);
        assert!(!tracker.completed[1].all_hosts);
    }
}

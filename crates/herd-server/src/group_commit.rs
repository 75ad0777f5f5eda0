//! Group commit and write-behind: the writes of many agent connections in one
//! transaction, written behind the server's in-memory view.
//!
//! A durable SQLite commit costs an fsync, and at a million VMs each changed VM also
//! costs random pages of its row, its id index and its event: on a 2-core machine, 500
//! changes per transaction run at about 8,000 a second and 30,000 per transaction at
//! about 18,000 (`store-bench`). One transaction per report could not keep up with ten
//! thousand hosts, and waiting for the disk before acknowledging would put the disk in
//! every change's latency.
//!
//! So a connection hands its changes over and goes on. Whoever finds no write in
//! progress becomes the writer and commits everything handed over meanwhile in one
//! transaction, again and again until nothing is left: under load the batches grow by
//! themselves, which is what makes them cheaper. Until its batch is on disk, a change
//! lives in the **overlay**, which every read of a VM's observed state consults first,
//! so the server's view is current the moment a report is applied.
//!
//! What a crash can lose is the overlay: the last moments of reported changes. An
//! agent's state is the truth about its VMs, and after a restart every agent sends a
//! full report that the server compares with the store, so the states come back; the
//! events of those moments come back as inferred ones. Usage samples are different (an
//! agent does not send them twice), so usage waits for the disk before it is taken as
//! received. And the backlog is bounded: past [`MAX_BACKLOG`] changes not yet written,
//! connections wait for the disk, so memory stays bounded and an overloaded store
//! shows as lag rather than loss.
//!
//! Marking a host down (its VMs `unknown`) goes through the same queue, in order: a
//! report handed over before it cannot land after it and undo it, and the liveness
//! check never waits for the disk, so a dead host is marked within its grace period
//! however far behind the store is.

use crate::store::{Observation, Store, StoreError, UsageRow};
use herd_proto::wire::{HostId, VmId};
use herd_proto::VmState;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::oneshot;
use tracing::warn;

/// Changes handed over and not yet written past which connections wait for the disk.
pub const MAX_BACKLOG: usize = 200_000;

/// Why a handed-over write did not reach the disk.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("the batch with this write failed: {0}")]
    Failed(String),
    #[error("the writer stopped before this write was committed")]
    Lost,
}

struct Job {
    ticket: u64,
    observations: Vec<Observation>,
    samples: Vec<(VmId, UsageRow)>,
    /// Mark this host down (and its VMs unknown) after everything handed over before,
    /// unless it came back meanwhile: (host, why, mark).
    host_down: Option<(HostId, String, u64)>,
    done: oneshot::Sender<Result<(), String>>,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// Observations in `jobs`.
    backlog: usize,
    /// A writer is running and will take whatever is queued before it stops.
    writing: bool,
    /// The last ticket handed out.
    issued: u64,
    overlay: Overlay,
}

/// Observed states not yet on disk: the newest per VM, with its host and the ticket of
/// the job that carries it; and per host, its VMs in there (a reconnecting host's seed
/// asks for those, and must not scan a backlog of thousands of hosts).
#[derive(Default)]
struct Overlay {
    by_vm: HashMap<VmId, (HostId, VmState, u64)>,
    by_host: HashMap<HostId, HashSet<VmId>>,
}

impl Overlay {
    fn insert(&mut self, vm: VmId, host: HostId, state: VmState, ticket: u64) {
        if let Some((before, _, _)) = self.by_vm.insert(vm, (host, state, ticket)) {
            if before != host {
                self.forget_on(before, vm);
            }
        }
        self.by_host.entry(host).or_default().insert(vm);
    }

    fn forget_on(&mut self, host: HostId, vm: VmId) {
        if let Some(vms) = self.by_host.get_mut(&host) {
            vms.remove(&vm);
            if vms.is_empty() {
                self.by_host.remove(&host);
            }
        }
    }

    /// Drops what batches up to `ticket` wrote.
    fn written_up_to(&mut self, ticket: u64) {
        let mut gone = Vec::new();
        self.by_vm.retain(|vm, (host, _, queued)| {
            let keep = *queued > ticket;
            if !keep {
                gone.push((*host, *vm));
            }
            keep
        });
        for (host, vm) in gone {
            self.forget_on(host, vm);
        }
    }
}

/// Counters of the batching, for /metrics.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub batches: std::sync::atomic::AtomicU64,
    pub writes: std::sync::atomic::AtomicU64,
}

pub struct GroupCommit {
    store: Arc<Store>,
    queue: Arc<Mutex<Queue>>,
    /// Hosts with a host-down mark queued, and the mark's number. A host that comes
    /// back drops its mark before its write, and the writer skips a mark that is gone,
    /// holding this while it writes one, so the two cannot interleave.
    down: Arc<Mutex<HashMap<HostId, u64>>>,
    pub stats: Arc<CommitStats>,
}

/// A handed-over write: resolves once its batch is on disk.
pub struct Pending {
    committed: oneshot::Receiver<Result<(), String>>,
    /// The backlog was full when it was handed over: the caller should wait.
    pub must_wait: bool,
}

impl Pending {
    /// Whether the write reached the disk: `None` while it is on its way.
    pub fn poll_written(&mut self) -> Option<Result<(), CommitError>> {
        use tokio::sync::oneshot::error::TryRecvError;
        match self.committed.try_recv() {
            Ok(Ok(())) => Some(Ok(())),
            Ok(Err(e)) => Some(Err(CommitError::Failed(e))),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Closed) => Some(Err(CommitError::Lost)),
        }
    }

    pub async fn durable(self) -> Result<(), CommitError> {
        match self.committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CommitError::Failed(e)),
            Err(_) => Err(CommitError::Lost),
        }
    }
}

impl GroupCommit {
    pub fn new(store: Arc<Store>) -> GroupCommit {
        GroupCommit {
            store,
            queue: Arc::default(),
            down: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// Hands observed states (all from `host`) and usage samples to the writer. The
    /// states are in the overlay when this returns; the returned handle tells when
    /// they are on disk.
    pub fn hand_over(
        &self,
        host: Option<HostId>,
        observations: Vec<Observation>,
        samples: Vec<(VmId, UsageRow)>,
    ) -> Pending {
        if observations.is_empty() && samples.is_empty() {
            let (done, committed) = oneshot::channel();
            let _ = done.send(Ok(()));
            return Pending {
                committed,
                must_wait: false,
            };
        }
        self.enqueue(host, observations, samples, None)
    }

    /// Marks a host down and its VMs `unknown`, after every write handed over before,
    /// unless the host is back (see [`GroupCommit::host_up`]) by the time it is written.
    pub fn host_down(&self, host: HostId, why: String) -> Pending {
        let mark = {
            let mut down = self.down.lock();
            let mark = down.get(&host).map_or(1, |mark| mark + 1);
            down.insert(host, mark);
            mark
        };
        self.enqueue(None, Vec::new(), Vec::new(), Some((host, why, mark)))
    }

    /// Drops the host's queued host-down mark, if any: call it before writing the host
    /// up, so that a mark queued before the return cannot land after it. The caller
    /// keeps new marks from being queued meanwhile (the host counts as heard from, or
    /// as down). Nothing is held across the write, which may wait seconds behind a
    /// large batch: the liveness check must not wait that long to mark another host.
    pub fn host_up(&self, host: HostId) {
        self.down.lock().remove(&host);
    }

    fn enqueue(
        &self,
        host: Option<HostId>,
        observations: Vec<Observation>,
        samples: Vec<(VmId, UsageRow)>,
        host_down: Option<(HostId, String, u64)>,
    ) -> Pending {
        let (done, committed) = oneshot::channel();
        let (lead, must_wait) = {
            let mut queue = self.queue.lock();
            queue.issued += 1;
            let ticket = queue.issued;
            if let Some(host) = host {
                for obs in &observations {
                    queue.overlay.insert(obs.vm, host, obs.state, ticket);
                }
            }
            queue.backlog += observations.len();
            let must_wait = queue.backlog > MAX_BACKLOG;
            queue.jobs.push(Job {
                ticket,
                observations,
                samples,
                host_down,
                done,
            });
            (!std::mem::replace(&mut queue.writing, true), must_wait)
        };
        if lead {
            let writer = Writer {
                store: self.store.clone(),
                queue: self.queue.clone(),
                down: self.down.clone(),
                stats: self.stats.clone(),
            };
            tokio::task::spawn_blocking(move || writer.write_until_empty());
        }
        Pending {
            committed,
            must_wait,
        }
    }

    /// How many VMs have an observed state not yet written: the write-behind's
    /// backlog, as /metrics shows it.
    pub fn unwritten(&self) -> usize {
        self.queue.lock().overlay.by_vm.len()
    }

    /// The VM's observed state if a newer one than the store's is on its way there.
    pub fn observed(&self, vm: VmId) -> Option<VmState> {
        self.queue
            .lock()
            .overlay
            .by_vm
            .get(&vm)
            .map(|(_, state, _)| *state)
    }

    /// The not yet written observed states of a host's VMs.
    pub fn observed_on(&self, host: HostId) -> Vec<(VmId, VmState)> {
        let queue = self.queue.lock();
        let Some(vms) = queue.overlay.by_host.get(&host) else {
            return Vec::new();
        };
        vms.iter()
            .filter_map(|vm| {
                let (_, state, _) = queue.overlay.by_vm.get(vm)?;
                Some((*vm, *state))
            })
            .collect()
    }
}

/// What the writer works with.
struct Writer {
    store: Arc<Store>,
    queue: Arc<Mutex<Queue>>,
    down: Arc<Mutex<HashMap<HostId, u64>>>,
    stats: Arc<CommitStats>,
}

impl Writer {
    /// Commits batches until the queue is empty, then stops.
    fn write_until_empty(&self) {
        loop {
            let jobs = {
                let mut queue = self.queue.lock();
                if queue.jobs.is_empty() {
                    queue.writing = false;
                    return;
                }
                queue.backlog = 0;
                std::mem::take(&mut queue.jobs)
            };
            let last_ticket = jobs.last().map_or(0, |job| job.ticket);
            // Everything between two host-down marks goes in one transaction.
            let mut observations = Vec::new();
            let mut samples = Vec::new();
            let mut waiters = Vec::with_capacity(jobs.len());
            let mut failed: Option<String> = None;
            for job in jobs {
                observations.extend(job.observations);
                samples.extend(job.samples);
                if let Some((host, why, mark)) = job.host_down {
                    self.write(&mut observations, &mut samples, &mut failed);
                    self.mark_down(host, &why, mark, &mut failed);
                }
                waiters.push(job.done);
            }
            self.write(&mut observations, &mut samples, &mut failed);
            self.stats
                .writes
                .fetch_add(waiters.len() as u64, Ordering::Relaxed);
            // Written (or failed, and then the next full report repairs it): the store
            // answers for these VMs again, unless a newer change is on its way.
            self.queue.lock().overlay.written_up_to(last_ticket);
            let result = failed.map_or(Ok(()), Err);
            for waiter in waiters {
                // A connection that went away no longer waits; its write is in anyway.
                let _ = waiter.send(result.clone());
            }
        }
    }

    fn write(
        &self,
        observations: &mut Vec<Observation>,
        samples: &mut Vec<(VmId, UsageRow)>,
        failed: &mut Option<String>,
    ) {
        if observations.is_empty() && samples.is_empty() {
            return;
        }
        let result: Result<usize, StoreError> = self.store.write_batch(observations, samples);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            failed.get_or_insert(e.to_string());
        }
        observations.clear();
        samples.clear();
    }

    fn mark_down(&self, host: HostId, why: &str, mark: u64, failed: &mut Option<String>) {
        let mut down = self.down.lock();
        if down.get(&host) != Some(&mark) {
            // Back already, or marked again later: that later mark does the work.
            return;
        }
        down.remove(&host);
        match self.store.host_down(host, why) {
            Ok(marked) => warn!(%host, n_vms = marked.len(), "host marked down: {why}"),
            Err(e) => {
                warn!(%host, "could not mark the host down: {e}");
                failed.get_or_insert(e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewEvent;
    use herd_proto::VmState;

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("herd.db")).expect("open");
        (dir, Arc::new(store))
    }

    /// Many concurrent writers: every write lands, in fewer transactions than writers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_all_land_in_shared_batches() {
        let (_dir, store) = store();
        let commits = Arc::new(GroupCommit::new(store.clone()));
        let vm = uuid::Uuid::from_u128(7);
        let mut tasks = Vec::new();
        for n in 0..200u64 {
            let commits = commits.clone();
            tasks.push(tokio::spawn(async move {
                let sample = UsageRow {
                    sampled_at_ms: n as i64,
                    cpu_ms: n,
                    mem_kib: 0,
                    net_bytes: 0,
                    disk_bytes: 0,
                };
                let event = Observation {
                    vm,
                    state: VmState::Running,
                    purge: false,
                    host: None,
                    events: vec![NewEvent {
                        kind: "test",
                        message: format!("write {n}"),
                        ..NewEvent::default()
                    }],
                };
                commits
                    .hand_over(None, vec![event], vec![(vm, sample)])
                    .durable()
                    .await
            }));
        }
        for task in tasks {
            task.await.expect("join").expect("committed");
        }
        let samples = store.usage_samples(vm, i64::MAX).expect("samples");
        assert_eq!(samples.len(), 200);
        let batches = commits
            .stats
            .batches
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!((1..200).contains(&batches), "{batches} batches");
        assert_eq!(
            commits
                .stats
                .writes
                .load(std::sync::atomic::Ordering::Relaxed),
            200
        );
    }

    /// A handed-over change is the server's view at once, and the store's once it is
    /// written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handed_over_states_show_at_once_and_land_in_the_store() {
        let (_dir, store) = store();
        let commits = GroupCommit::new(store.clone());
        let host = uuid::Uuid::from_u128(1);
        let vm = uuid::Uuid::from_u128(2);
        let flip = |state| Observation {
            vm,
            state,
            purge: false,
            host: None,
            events: vec![],
        };
        let first = commits.hand_over(Some(host), vec![flip(VmState::Running)], vec![]);
        let second = commits.hand_over(Some(host), vec![flip(VmState::Paused)], vec![]);
        assert!(!first.must_wait && !second.must_wait);
        // Newest wins in the overlay, until its own batch is written.
        let seen = commits.observed(vm);
        assert!(
            seen == Some(VmState::Paused) || seen.is_none(),
            "overlay shows {seen:?}"
        );
        first.durable().await.expect("first written");
        second.durable().await.expect("second written");
        assert_eq!(commits.observed(vm), None, "written: the store answers");
        assert!(commits.observed_on(host).is_empty());
    }

    /// A store with one up host holding one running VM.
    fn store_with_vm() -> (tempfile::TempDir, Arc<Store>, HostId, VmId) {
        let (dir, store) = store();
        let host = uuid::Uuid::from_u128(10);
        store
            .insert_token("join-hash", "join", "join", None)
            .expect("token");
        assert!(store
            .join_host("join-hash", host, "h", "agent-hash", &Default::default())
            .expect("join"));
        store
            .host_hello(host, "h", &[], 4, 4096, "test")
            .expect("hello");
        let vm = uuid::Uuid::now_v7();
        let now = crate::store::now_ms();
        let record = crate::store::VmRecord {
            id: vm,
            name: "a".into(),
            project: "default".into(),
            hypervisor: "sim".into(),
            vcpus: 1,
            memory_mib: 64,
            image: "default".into(),
            command: vec![],
            policy: Default::default(),
            keep_running: false,
            disk_mib: 0,
            host: Some(host),
            desired: VmState::Running,
            generation: 1,
            issued_generation: 1,
            observed: VmState::Booting,
            observed_at_ms: now,
            last_error: None,
            deleting: false,
            created_at_ms: now,
            updated_at_ms: now,
            seed: None,
        };
        let event = NewEvent {
            vm: Some(vm),
            kind: "test",
            message: "made".into(),
            ..NewEvent::default()
        };
        store.insert_vms(&[(record, event)]).expect("insert");
        (dir, store, host, vm)
    }

    fn observed_in_store(store: &Store, vm: VmId) -> VmState {
        store.vm(vm).expect("read").expect("row").observed
    }

    /// A host-down mark lands after the reports handed over before it, so an older
    /// report cannot undo it; and a host back before the mark is written drops it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn host_down_marks_keep_their_place_and_yield_to_a_return() {
        let (_dir, store, host, vm) = store_with_vm();
        let commits = GroupCommit::new(store.clone());
        let running = Observation {
            vm,
            state: VmState::Running,
            purge: false,
            host: None,
            events: vec![],
        };
        let report = commits.hand_over(Some(host), vec![running.clone()], vec![]);
        let down = commits.host_down(host, "silent".into());
        report.durable().await.expect("report");
        down.durable().await.expect("mark");
        assert_eq!(observed_in_store(&store, vm), VmState::Unknown);

        // Back: the host reports again, then a mark queued before its return is dropped.
        commits
            .hand_over(Some(host), vec![running], vec![])
            .durable()
            .await
            .expect("report");
        let stale_mark = {
            // The writer may take the mark before or after the return: either way
            // the return must win.
            let mark = commits.host_down(host, "silent again".into());
            commits.host_up(host);
            store
                .host_hello(host, "h", &[], 4, 4096, "test")
                .expect("hello");
            mark
        };
        stale_mark.durable().await.expect("mark");
        let up = store.host(host).expect("host").expect("row").up;
        assert!(up, "the host that came back is up");
    }

    /// The per-host index follows the per-VM map through inserts, moves and writes.
    #[test]
    fn overlay_index_by_host_stays_in_step() {
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let (vm1, vm2) = (uuid::Uuid::from_u128(11), uuid::Uuid::from_u128(12));
        let mut overlay = Overlay::default();
        overlay.insert(vm1, a, VmState::Running, 1);
        overlay.insert(vm2, a, VmState::Paused, 2);
        overlay.insert(vm1, b, VmState::Running, 3);
        assert_eq!(overlay.by_host[&a], HashSet::from([vm2]));
        assert_eq!(overlay.by_host[&b], HashSet::from([vm1]));
        overlay.written_up_to(2);
        assert!(
            !overlay.by_host.contains_key(&a),
            "host a's only VM was written"
        );
        assert_eq!(overlay.by_vm.len(), 1);
        overlay.written_up_to(3);
        assert!(overlay.by_host.is_empty() && overlay.by_vm.is_empty());
    }
}

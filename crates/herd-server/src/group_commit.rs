//! Group commit: the writes of many agent connections in one transaction.
//!
//! Each report that changes something and each usage batch must be durable before the
//! server acknowledges it, and a durable SQLite commit costs an fsync (about 0.2 ms on
//! a good disk, far more on a busy one). Ten thousand hosts reporting every second
//! would need ten thousand fsyncs a second if each wrote alone. Here a connection hands
//! its write over and waits; whoever finds no write in progress becomes the writer and
//! commits everything handed over meanwhile in one transaction, again and again until
//! nothing is left. Under load the batches grow by themselves; with one host the wait is
//! one commit, as before. Nothing is acknowledged before its batch is on disk, so a
//! crash loses only writes no agent was told about, and agents resend those.

use crate::store::{Observation, Store, StoreError, UsageRow};
use herd_proto::wire::VmId;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// Why a handed-over write did not reach the disk.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("the batch with this write failed: {0}")]
    Failed(String),
    #[error("the writer stopped before this write was committed")]
    Lost,
}

struct Job {
    observations: Vec<Observation>,
    samples: Vec<(VmId, UsageRow)>,
    done: oneshot::Sender<Result<(), String>>,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// A writer is running and will take whatever is queued before it stops.
    writing: bool,
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
    pub stats: Arc<CommitStats>,
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // Only pushes and takes happen under the lock; a panic cannot leave it half-done.
    queue.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl GroupCommit {
    pub fn new(store: Arc<Store>) -> GroupCommit {
        GroupCommit {
            store,
            queue: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// Writes observed states and usage samples durably, together with whatever other
    /// connections hand over at the same time. Returns once they are committed.
    pub async fn commit(
        &self,
        observations: Vec<Observation>,
        samples: Vec<(VmId, UsageRow)>,
    ) -> Result<(), CommitError> {
        if observations.is_empty() && samples.is_empty() {
            return Ok(());
        }
        let (done, committed) = oneshot::channel();
        let lead = {
            let mut queue = lock(&self.queue);
            queue.jobs.push(Job {
                observations,
                samples,
                done,
            });
            !std::mem::replace(&mut queue.writing, true)
        };
        if lead {
            let (store, queue, stats) =
                (self.store.clone(), self.queue.clone(), self.stats.clone());
            tokio::task::spawn_blocking(move || write_until_empty(&store, &queue, &stats));
        }
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CommitError::Failed(e)),
            Err(_) => Err(CommitError::Lost),
        }
    }
}

/// The writer: commits batches until the queue is empty, then stops.
fn write_until_empty(store: &Store, queue: &Mutex<Queue>, stats: &CommitStats) {
    use std::sync::atomic::Ordering;
    loop {
        let jobs = {
            let mut queue = lock(queue);
            if queue.jobs.is_empty() {
                queue.writing = false;
                return;
            }
            std::mem::take(&mut queue.jobs)
        };
        let mut observations = Vec::new();
        let mut samples = Vec::new();
        let mut waiters = Vec::with_capacity(jobs.len());
        for job in jobs {
            observations.extend(job.observations);
            samples.extend(job.samples);
            waiters.push(job.done);
        }
        let result: Result<usize, StoreError> = store.write_batch(&observations, &samples);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .writes
            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        let result = result.map(|_| ()).map_err(|e| e.to_string());
        for waiter in waiters {
            // A connection that went away no longer waits; its write is in anyway.
            let _ = waiter.send(result.clone());
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
                    events: vec![NewEvent {
                        kind: "test",
                        message: format!("write {n}"),
                        ..NewEvent::default()
                    }],
                };
                commits.commit(vec![event], vec![(vm, sample)]).await
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
}

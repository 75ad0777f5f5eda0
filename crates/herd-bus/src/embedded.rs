//! The embedded bus: queues in a SQLite file, mirrored in memory, with wake-ups
//! through in-process notifiers.
//!
//! SQLite makes the queues durable; the mirror answers every read. A publish wakes
//! each host it queued for, and ten thousand woken connections reading their queue
//! from SQLite would wait in line behind each other and behind the next publish. From
//! memory they read at once, and SQLite sees only writes.
//!
//! Writes run on tokio's blocking pool, one at a time (the `turn`): a publish of
//! thousands of commands waits for an fsync, and done on an async worker it would
//! stall every agent connection scheduled there. Acks are gathered: whoever gets the
//! turn writes every ack handed in meanwhile in one transaction, since ten thousand
//! hosts finishing commands would otherwise each cost an fsync. An ack is not durable
//! when `ack` returns for everyone; a lost one only makes the agent see its command
//! again after a restart, which it answers as a replay.

use crate::{Bus, BusError, Queued, Subscription};
use async_trait::async_trait;
use herd_proto::wire::{self, Command, CommandId, HostId, VmId};
use parking_lot::Mutex;
use rusqlite::{params, Connection};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

pub struct EmbeddedBus {
    db: Arc<Mutex<Connection>>,
    /// Writers wait here, as tasks, for their turn at the connection, and a publish
    /// holds it until its mirror is updated: seqs appear in the mirror in order, so a
    /// connection that drained up to a seq never misses a lower one.
    turn: tokio::sync::Mutex<()>,
    queues: Mutex<HashMap<HostId, HostQueue>>,
    /// Acks handed in and not yet written: (host, vm, generation).
    acks: Mutex<Vec<(String, String, i64)>>,
    /// Per host, a counter bumped on every publish, which subscriptions watch.
    queued: Mutex<HashMap<HostId, watch::Sender<u64>>>,
}

/// One host's queue in memory: what SQLite holds for it, by seq.
#[derive(Default)]
struct HostQueue {
    by_seq: BTreeMap<u64, Command>,
    /// The generations queued per VM, with their seqs (rarely more than one).
    by_vm: HashMap<VmId, Vec<(u64, u64)>>,
}

impl HostQueue {
    /// Drops the VM's queued generations that `keep` rejects.
    fn retain(&mut self, vm: VmId, keep: impl Fn(u64) -> bool) {
        let Some(queued) = self.by_vm.get_mut(&vm) else {
            return;
        };
        queued.retain(|&(generation, seq)| {
            let kept = keep(generation);
            if !kept {
                self.by_seq.remove(&seq);
            }
            kept
        });
        if queued.is_empty() {
            self.by_vm.remove(&vm);
        }
    }

    fn insert(&mut self, seq: u64, command: Command) {
        self.by_vm
            .entry(command.id.vm)
            .or_default()
            .push((command.id.generation, seq));
        self.by_seq.insert(seq, command);
    }
}

impl From<rusqlite::Error> for BusError {
    fn from(e: rusqlite::Error) -> BusError {
        BusError::Storage(Box::new(e))
    }
}

impl EmbeddedBus {
    fn counter(&self, host: HostId) -> watch::Sender<u64> {
        self.queued
            .lock()
            .entry(host)
            .or_insert_with(|| watch::channel(0).0)
            .clone()
    }

    /// Opens (or creates) the queue file and loads it. Writes are durable before
    /// `publish` returns.
    pub fn open(path: &Path) -> Result<EmbeddedBus, BusError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS commands (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                host TEXT NOT NULL,
                vm TEXT NOT NULL,
                generation INTEGER NOT NULL,
                body BLOB NOT NULL,
                UNIQUE (host, vm, generation)
            );
            CREATE INDEX IF NOT EXISTS commands_by_host ON commands (host, seq);",
        )?;
        let mut queues: HashMap<HostId, HostQueue> = HashMap::new();
        {
            let mut stmt = db.prepare("SELECT seq, host, body FROM commands ORDER BY seq")?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                ))
            })?;
            for row in rows {
                let (seq, host, body) = row?;
                let host: HostId = host
                    .parse()
                    .map_err(|_| BusError::Corrupt(format!("seq {seq}: host {host:?}")))?;
                let command: Command = wire::decode(&body)
                    .map_err(|e| BusError::Corrupt(format!("seq {seq}: {e}")))?;
                queues.entry(host).or_default().insert(seq as u64, command);
            }
        }
        Ok(EmbeddedBus {
            db: Arc::new(Mutex::new(db)),
            turn: tokio::sync::Mutex::new(()),
            queues: Mutex::new(queues),
            acks: Mutex::new(Vec::new()),
            queued: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `f` on the connection, on the blocking pool. Callers hold the turn.
    async fn with_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, BusError> + Send + 'static,
    ) -> Result<T, BusError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&mut db.lock()))
            .await
            .map_err(|e| BusError::Stopped(e.to_string()))?
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, commands: &[(HostId, Command)]) -> Result<(), BusError> {
        if commands.is_empty() {
            return Ok(());
        }
        let rows: Vec<(String, String, i64, Vec<u8>)> = commands
            .iter()
            .map(|(host, command)| {
                (
                    host.to_string(),
                    command.id.vm.to_string(),
                    command.id.generation as i64,
                    wire::encode(command),
                )
            })
            .collect();
        let _turn = self.turn.lock().await;
        // The seq each command got, or None where the same one was queued already.
        let seqs = self
            .with_db(move |db| {
                let tx = db.transaction()?;
                let mut seqs = Vec::with_capacity(rows.len());
                {
                    let mut supersede = tx.prepare_cached(
                        "DELETE FROM commands WHERE host = ?1 AND vm = ?2 AND generation < ?3",
                    )?;
                    let mut insert = tx.prepare_cached(
                        "INSERT OR IGNORE INTO commands (host, vm, generation, body) \
                         VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    for (host, vm, generation, body) in &rows {
                        supersede.execute(params![host, vm, generation])?;
                        let inserted = insert.execute(params![host, vm, generation, body])?;
                        seqs.push((inserted == 1).then(|| tx.last_insert_rowid() as u64));
                    }
                }
                tx.commit()?;
                Ok(seqs)
            })
            .await?;
        {
            // The same steps, in the same order, on the mirror.
            let mut queues = self.queues.lock();
            for ((host, command), seq) in commands.iter().zip(seqs) {
                let queue = queues.entry(*host).or_default();
                let generation = command.id.generation;
                queue.retain(command.id.vm, |queued| queued >= generation);
                if let Some(seq) = seq {
                    queue.insert(seq, command.clone());
                }
            }
        }
        let mut woken = HashSet::new();
        for (host, _) in commands {
            if woken.insert(*host) {
                self.counter(*host).send_modify(|n| *n = n.wrapping_add(1));
            }
        }
        Ok(())
    }

    async fn pending(
        &self,
        host: HostId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Queued>, BusError> {
        Ok(self
            .queues
            .lock()
            .get(&host)
            .map(|queue| {
                queue
                    .by_seq
                    .range(after.saturating_add(1)..)
                    .take(limit)
                    .map(|(seq, command)| Queued {
                        seq: *seq,
                        command: command.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn ack(&self, host: HostId, ids: &[CommandId]) -> Result<(), BusError> {
        if ids.is_empty() {
            return Ok(());
        }
        if let Some(queue) = self.queues.lock().get_mut(&host) {
            for id in ids {
                queue.retain(id.vm, |queued| queued > id.generation);
            }
        }
        {
            let host = host.to_string();
            self.acks.lock().extend(
                ids.iter()
                    .map(|id| (host.clone(), id.vm.to_string(), id.generation as i64)),
            );
        }
        let _turn = self.turn.lock().await;
        let owed = std::mem::take(&mut *self.acks.lock());
        if owed.is_empty() {
            // Written by whoever had the turn before.
            return Ok(());
        }
        self.with_db(move |db| {
            let tx = db.transaction()?;
            {
                let mut delete = tx.prepare_cached(
                    "DELETE FROM commands WHERE host = ?1 AND vm = ?2 AND generation <= ?3",
                )?;
                for (host, vm, generation) in &owed {
                    delete.execute(params![host, vm, generation])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn depth(&self, host: HostId) -> Result<u64, BusError> {
        Ok(self
            .queues
            .lock()
            .get(&host)
            .map_or(0, |queue| queue.by_seq.len() as u64))
    }

    fn subscribe(&self, host: HostId) -> Subscription {
        Subscription::new(self.counter(host).subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::command;
    use uuid::Uuid;

    #[tokio::test]
    async fn keeps_the_bus_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bus.db");
        crate::contract::check(|| Ok(Box::new(EmbeddedBus::open(&path)?) as Box<dyn Bus>))
            .await
            .unwrap_or_else(|breach| panic!("{breach}"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_acks_all_reach_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bus.db");
        let hosts: Vec<HostId> = (0..8).map(|h| Uuid::from_u128(1000 + h)).collect();
        {
            let bus = Arc::new(EmbeddedBus::open(&path).expect("open"));
            let mut batch = Vec::new();
            for (h, host) in hosts.iter().enumerate() {
                for vm in 0..20 {
                    batch.push((*host, command((h * 100 + vm) as u128, 1)));
                }
            }
            bus.publish(&batch).await.expect("publish");
            let mut tasks = Vec::new();
            for (h, host) in hosts.iter().enumerate() {
                let bus = bus.clone();
                let host = *host;
                tasks.push(tokio::spawn(async move {
                    for vm in 0..20 {
                        let id = command((h * 100 + vm) as u128, 1).id;
                        bus.ack(host, &[id]).await.expect("ack");
                    }
                }));
            }
            for task in tasks {
                task.await.expect("task");
            }
            for host in &hosts {
                assert_eq!(bus.depth(*host).await.expect("depth"), 0);
            }
        }
        let bus = EmbeddedBus::open(&path).expect("reopen");
        for host in &hosts {
            assert_eq!(bus.depth(*host).await.expect("depth"), 0, "acks on disk");
        }
    }
}

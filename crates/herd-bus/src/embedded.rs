//! The embedded bus: queues in a SQLite file, wake-ups through in-process notifiers.

use crate::{Bus, BusError, Queued};
use async_trait::async_trait;
use herd_proto::wire::{self, Command, CommandId, HostId};
use rusqlite::{params, Connection};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub struct EmbeddedBus {
    db: Mutex<Connection>,
    wakers: Mutex<HashMap<HostId, Arc<Notify>>>,
}

impl EmbeddedBus {
    /// Opens (or creates) the queue file. Writes are durable before `publish` returns.
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
        Ok(EmbeddedBus {
            db: Mutex::new(db),
            wakers: Mutex::new(HashMap::new()),
        })
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, BusError>,
    ) -> Result<T, BusError> {
        // A poisoned lock means a panic while holding it; the connection itself is
        // still consistent (SQLite transactions roll back), so keep using it.
        let mut db = self.db.lock().unwrap_or_else(|poison| poison.into_inner());
        f(&mut db)
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, commands: &[(HostId, Command)]) -> Result<(), BusError> {
        if commands.is_empty() {
            return Ok(());
        }
        self.with_db(|db| {
            let tx = db.transaction()?;
            {
                let mut supersede = tx.prepare_cached(
                    "DELETE FROM commands WHERE host = ?1 AND vm = ?2 AND generation < ?3",
                )?;
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO commands (host, vm, generation, body) \
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                for (host, command) in commands {
                    let (host, vm) = (host.to_string(), command.id.vm.to_string());
                    let generation = command.id.generation as i64;
                    supersede.execute(params![host, vm, generation])?;
                    insert.execute(params![host, vm, generation, wire::encode(command)])?;
                }
            }
            tx.commit()?;
            Ok(())
        })?;
        let mut woken = HashSet::new();
        for (host, _) in commands {
            if woken.insert(*host) {
                self.waker(*host).notify_one();
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
        self.with_db(|db| {
            let mut stmt = db.prepare_cached(
                "SELECT seq, body FROM commands WHERE host = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![host.to_string(), after as i64, limit as i64],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)),
            )?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, body) = row?;
                let command: Command =
                    wire::decode(&body).map_err(|e| BusError::Corrupt(e.to_string()))?;
                out.push(Queued {
                    seq: seq as u64,
                    command,
                });
            }
            Ok(out)
        })
    }

    async fn ack(&self, host: HostId, ids: &[CommandId]) -> Result<(), BusError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.with_db(|db| {
            let tx = db.transaction()?;
            {
                let mut delete = tx.prepare_cached(
                    "DELETE FROM commands WHERE host = ?1 AND vm = ?2 AND generation <= ?3",
                )?;
                let host = host.to_string();
                for id in ids {
                    delete.execute(params![host, id.vm.to_string(), id.generation as i64])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    async fn depth(&self, host: HostId) -> Result<u64, BusError> {
        self.with_db(|db| {
            let n: i64 = db.query_row(
                "SELECT COUNT(*) FROM commands WHERE host = ?1",
                params![host.to_string()],
                |row| row.get(0),
            )?;
            Ok(n as u64)
        })
    }

    fn waker(&self, host: HostId) -> Arc<Notify> {
        let mut wakers = self
            .wakers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        wakers.entry(host).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::wire::VmSpec;
    use herd_proto::VmState;
    use uuid::Uuid;

    fn command(vm: u128, generation: u64) -> Command {
        Command {
            id: CommandId {
                vm: Uuid::from_u128(vm),
                generation,
            },
            spec: VmSpec {
                name: "a".into(),
                hypervisor: "sim".into(),
                vcpus: 1,
                memory_mib: 64,
                image: "default".into(),
                command: vec![],
                policy: Default::default(),
                keep_running: false,
            },
            target: VmState::Running,
        }
    }

    #[tokio::test]
    async fn queue_survives_reopen_dedups_and_supersedes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bus.db");
        let host = Uuid::from_u128(100);
        {
            let bus = EmbeddedBus::open(&path).expect("open");
            bus.publish(&[(host, command(1, 1))])
                .await
                .expect("publish");
            bus.publish(&[(host, command(1, 1)), (host, command(2, 1))])
                .await
                .expect("publish again, and another");
            bus.publish(&[(host, command(1, 2))])
                .await
                .expect("supersede");
        }
        let bus = EmbeddedBus::open(&path).expect("reopen");
        let pending = bus.pending(host, 0, 10).await.expect("pending");
        let ids: Vec<_> = pending.iter().map(|q| q.command.id).collect();
        assert_eq!(ids, vec![command(2, 1).id, command(1, 2).id]);
        assert_eq!(
            bus.pending(Uuid::from_u128(5), 0, 10)
                .await
                .expect("other")
                .len(),
            0
        );
        bus.ack(host, &[command(1, 2).id]).await.expect("ack");
        assert_eq!(bus.depth(host).await.expect("depth"), 1);
    }
}

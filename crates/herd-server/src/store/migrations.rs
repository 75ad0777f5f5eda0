//! Migrations, each row the whole record of one (its phase, attempts, progress) as the
//! coordinator's state machine keeps it, so a restarted server carries on from the
//! phase it had reached; and the commit, which moves a VM's record to its new host in
//! the same transaction that records the phase.

use super::events::insert_event;
use super::{now_ms, NewEvent, Store, StoreError};
use crate::migration::plan::Migration;
use herd_proto::migration::MigrationId;
use herd_proto::wire::VmId;
use herd_proto::VmState;
use rusqlite::{params, OptionalExtension};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    active INTEGER NOT NULL,
    body TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS migrations_by_vm ON migrations (vm, started_at);
CREATE INDEX IF NOT EXISTS migrations_active ON migrations (id) WHERE active = 1;
";

fn body_of(migration: &Migration) -> Result<String, StoreError> {
    serde_json::to_string(migration).map_err(|e| {
        StoreError::Corrupt(format!("migration {} does not encode: {e}", migration.id))
    })
}

fn migration_of(id: &str, body: &str) -> Result<Migration, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("migration {id}: {e}")))
}

fn write(
    db: &rusqlite::Connection,
    migration: &Migration,
    events: &[NewEvent],
    now: i64,
) -> Result<(), StoreError> {
    db.prepare_cached(
        "INSERT INTO migrations (id, vm, active, body, started_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
         ON CONFLICT (id) DO UPDATE SET active = ?3, body = ?4, updated_at = ?6",
    )?
    .execute(params![
        migration.id.to_string(),
        migration.vm.to_string(),
        migration.is_active() as i64,
        body_of(migration)?,
        migration.started_at_ms,
        now,
    ])?;
    for event in events {
        insert_event(db, event, now)?;
    }
    Ok(())
}

impl Store {
    /// Saves a migration's record with the events its step produced.
    pub fn save_migration(
        &self,
        migration: &Migration,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        write(&tx, migration, events, now_ms())?;
        tx.commit()?;
        Ok(())
    }

    /// The commit: the VM's record names the target and shows it running, in the same
    /// transaction as the migration's committed phase. Returns `false` (and writes
    /// nothing) if the VM is no longer on the migration's source.
    pub fn commit_migration(
        &self,
        migration: &Migration,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = now_ms();
        let moved = tx.execute(
            "UPDATE vms SET host = ?2, observed_state = ?4, observed_at = ?5, updated_at = ?5 \
             WHERE id = ?1 AND host = ?3",
            params![
                migration.vm.to_string(),
                migration.target.to_string(),
                migration.source.to_string(),
                VmState::Running.as_str(),
                now,
            ],
        )?;
        if moved != 1 {
            return Ok(false);
        }
        write(&tx, migration, events, now)?;
        tx.commit()?;
        let mut index = self.index();
        index.move_host(migration.vm, migration.target);
        index.set_state(migration.vm, VmState::Running);
        Ok(true)
    }

    /// Every migration with something left to do, for a restarted server.
    pub fn active_migrations(&self) -> Result<Vec<Migration>, StoreError> {
        self.query_migrations("SELECT id, body FROM migrations WHERE active = 1", [])
    }

    /// A VM's newest migrations, newest first.
    pub fn migrations_of(&self, vm: VmId, limit: usize) -> Result<Vec<Migration>, StoreError> {
        self.query_migrations(
            "SELECT id, body FROM migrations WHERE vm = ?1 \
             ORDER BY started_at DESC, rowid DESC LIMIT ?2",
            params![vm.to_string(), limit as i64],
        )
    }

    fn query_migrations(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<Migration>, StoreError> {
        self.query_records(sql, args, "migration")
    }

    /// One migration by id.
    pub fn migration(&self, id: MigrationId) -> Result<Option<Migration>, StoreError> {
        let db = self.reader();
        let row = db
            .prepare_cached("SELECT body FROM migrations WHERE id = ?1")?
            .query_row(params![id.to_string()], |row| row.get::<_, String>(0))
            .optional()?;
        row.map(|body| migration_of(&id.to_string(), &body))
            .transpose()
    }
}

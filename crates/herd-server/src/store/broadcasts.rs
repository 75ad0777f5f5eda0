//! Broadcasts, each row the whole record of one (its phase, tree, manifest and every
//! host's part) as the coordinator's state machine keeps it, so a restarted server
//! carries on from where it was.

use super::{Store, StoreError};
use crate::broadcast::plan::Broadcast;
use herd_proto::broadcast::BroadcastId;
use herd_proto::wire::VmId;
use rusqlite::params;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS broadcasts (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    active INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS broadcasts_by_vm ON broadcasts (vm, created_at);
CREATE INDEX IF NOT EXISTS broadcasts_active ON broadcasts (id) WHERE active = 1;
";

impl Store {
    pub fn save_broadcast(&self, broadcast: &Broadcast) -> Result<(), StoreError> {
        let body = serde_json::to_string(broadcast).map_err(|e| {
            StoreError::Corrupt(format!("broadcast {} does not encode: {e}", broadcast.id))
        })?;
        self.db()
            .prepare_cached(
                "INSERT INTO broadcasts (id, vm, active, body, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (id) DO UPDATE SET active = ?3, body = ?4",
            )?
            .execute(params![
                broadcast.id.to_string(),
                broadcast.vm.to_string(),
                broadcast.is_active() as i64,
                body,
                broadcast.created_at_ms,
            ])?;
        Ok(())
    }

    /// Every broadcast with something left to do, for a restarted server.
    pub fn active_broadcasts(&self) -> Result<Vec<Broadcast>, StoreError> {
        self.query_broadcasts("SELECT id, body FROM broadcasts WHERE active = 1", [])
    }

    pub fn broadcast_record(&self, id: BroadcastId) -> Result<Option<Broadcast>, StoreError> {
        Ok(self
            .query_broadcasts(
                "SELECT id, body FROM broadcasts WHERE id = ?1",
                params![id.to_string()],
            )?
            .pop())
    }

    /// A VM's newest broadcasts, newest first.
    pub fn broadcasts_of(&self, vm: VmId, limit: usize) -> Result<Vec<Broadcast>, StoreError> {
        self.query_broadcasts(
            "SELECT id, body FROM broadcasts WHERE vm = ?1 \
             ORDER BY created_at DESC, rowid DESC LIMIT ?2",
            params![vm.to_string(), limit as i64],
        )
    }

    fn query_broadcasts(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<Broadcast>, StoreError> {
        self.query_records(sql, args, "broadcast")
    }
}

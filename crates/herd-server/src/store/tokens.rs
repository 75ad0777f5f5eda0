//! Join tokens and the hosts they admit.

use super::events::{insert_event, NewEvent};
use super::rows::parse_uuid;
use super::{now_ms, Store, StoreError};
use herd_proto::wire::HostId;
use rusqlite::{params, OptionalExtension};

impl Store {
    pub fn insert_token(
        &self,
        hash: &str,
        name: &str,
        kind: &str,
        expires_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO tokens (hash, name, kind, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hash, name, kind, now_ms(), expires_at_ms],
        )?;
        Ok(())
    }

    pub fn count_tokens(&self, kind: &str) -> Result<u64, StoreError> {
        let n: i64 = self.db().query_row(
            "SELECT COUNT(*) FROM tokens WHERE kind = ?1",
            params![kind],
            |row| row.get(0),
        )?;
        Ok(n as u64)
    }

    /// Consumes a one-time join token and registers the new host, atomically: two
    /// agents racing with one token cannot both join.
    pub fn join_host(
        &self,
        join_hash: &str,
        host: HostId,
        hostname: &str,
        agent_token_hash: &str,
        labels: &herd_topology::Labels,
    ) -> Result<bool, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = now_ms();
        let used = tx.execute(
            "UPDATE tokens SET used_at = ?2 WHERE hash = ?1 AND kind = 'join' \
             AND used_at IS NULL AND (expires_at IS NULL OR expires_at > ?2)",
            params![join_hash, now],
        )?;
        if used != 1 {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO hosts (id, hostname, token_hash, joined_at, labels) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                host.to_string(),
                hostname,
                agent_token_hash,
                now,
                serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
            ],
        )?;
        insert_event(
            &tx,
            &NewEvent {
                host: Some(host),
                kind: "host.joined",
                message: format!("host {hostname} joined"),
                ..NewEvent::default()
            },
            now,
        )?;
        tx.commit()?;
        Ok(true)
    }

    pub fn host_by_token(&self, hash: &str) -> Result<Option<HostId>, StoreError> {
        let id: Option<String> = self
            .reader()
            .prepare_cached("SELECT id FROM hosts WHERE token_hash = ?1")?
            .query_row(params![hash], |row| row.get(0))
            .optional()?;
        id.as_deref().map(parse_uuid).transpose()
    }
}

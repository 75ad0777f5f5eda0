//! Host rows: what each host said at hello, and what a host-down mark changes.

use super::events::{insert_event, NewEvent};
use super::rows::{host_from_row, parse_state, parse_uuid};
use super::{now_ms, HostRecord, Store, StoreError};
use herd_proto::wire::{HostId, HypervisorInfo, VmId};
use herd_proto::VmState;
use herd_topology::Labels;
use rusqlite::{params, OptionalExtension};

impl Store {
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT id, hostname, hypervisors, cpus, memory_mib, up, joined_at, agent_version, labels \
             FROM hosts ORDER BY hostname, id",
        )?;
        let rows = stmt.query_map([], host_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row??);
        }
        Ok(out)
    }

    pub fn host(&self, id: HostId) -> Result<Option<HostRecord>, StoreError> {
        let db = self.reader();
        let row = db
            .prepare_cached(
                "SELECT id, hostname, hypervisors, cpus, memory_mib, up, joined_at, agent_version, labels \
                 FROM hosts WHERE id = ?1",
            )?
            .query_row(params![id.to_string()], host_from_row)
            .optional()?;
        row.transpose()
    }

    /// Replaces a host's labels; `false` if there is no such host.
    pub fn set_host_labels(&self, id: HostId, labels: &Labels) -> Result<bool, StoreError> {
        let text = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        let changed = self.db().execute(
            "UPDATE hosts SET labels = ?2 WHERE id = ?1",
            params![id.to_string(), text],
        )?;
        Ok(changed == 1)
    }

    /// Records what a host said in its hello and marks it up.
    pub fn host_hello(
        &self,
        id: HostId,
        hostname: &str,
        hypervisors: &[HypervisorInfo],
        cpus: u32,
        memory_mib: u64,
        agent_version: &str,
    ) -> Result<bool, StoreError> {
        let pairs: Vec<(&str, &str)> = hypervisors
            .iter()
            .map(|h| (h.kind.as_str(), h.detail.as_str()))
            .collect();
        let hypervisors = serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into());
        let id_text = id.to_string();
        let memory_mib = memory_mib as i64;
        let said = params![
            id_text,
            hostname,
            hypervisors,
            cpus,
            memory_mib,
            agent_version
        ];
        // A host that reconnects as it was (every host, after a server restart) costs
        // no write: ten thousand of them would be ten thousand fsyncs.
        let unchanged: Option<i64> = self
            .reader()
            .prepare_cached(
                "SELECT 1 FROM hosts WHERE id = ?1 AND up = 1 AND hostname = ?2 \
                 AND hypervisors = ?3 AND cpus = ?4 AND memory_mib = ?5 AND agent_version = ?6",
            )?
            .query_row(said, |row| row.get(0))
            .optional()?;
        if unchanged.is_some() {
            return Ok(false);
        }
        let mut db = self.db();
        let tx = db.transaction()?;
        let was_up: i64 = tx.query_row(
            "SELECT up FROM hosts WHERE id = ?1",
            params![id.to_string()],
            |row| row.get(0),
        )?;
        tx.execute(
            "UPDATE hosts SET hostname = ?2, hypervisors = ?3, cpus = ?4, memory_mib = ?5, \
             up = 1, agent_version = ?6 WHERE id = ?1",
            said,
        )?;
        if was_up == 0 {
            insert_event(
                &tx,
                &NewEvent {
                    host: Some(id),
                    kind: "host.up",
                    message: format!("host {hostname} is up"),
                    ..NewEvent::default()
                },
                now_ms(),
            )?;
        }
        tx.commit()?;
        Ok(was_up == 0)
    }

    /// Marks a host down and every VM on it that an agent had reported as `unknown`.
    /// Returns the VMs marked.
    pub fn host_down(&self, id: HostId, why: &str) -> Result<Vec<VmId>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = now_ms();
        tx.execute(
            "UPDATE hosts SET up = 0 WHERE id = ?1",
            params![id.to_string()],
        )?;
        insert_event(
            &tx,
            &NewEvent {
                host: Some(id),
                kind: "host.down",
                message: why.to_owned(),
                ..NewEvent::default()
            },
            now,
        )?;
        let mut marked = Vec::new();
        {
            let mut stmt = tx.prepare(
                "SELECT id, observed_state FROM vms WHERE host = ?1 \
                 AND observed_state NOT IN ('pending', 'scheduled', 'terminated', 'purged', 'unknown')",
            )?;
            let rows = stmt.query_map(params![id.to_string()], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?;
            for row in rows {
                let (vm, state) = row?;
                marked.push((parse_uuid(&vm)?, parse_state(&state)?));
            }
        }
        for (vm, before) in &marked {
            tx.execute(
                "UPDATE vms SET observed_state = 'unknown', observed_at = ?2, updated_at = ?2 WHERE id = ?1",
                params![vm.to_string(), now],
            )?;
            insert_event(
                &tx,
                &NewEvent {
                    vm: Some(*vm),
                    host: Some(id),
                    kind: "vm.state",
                    from: Some(*before),
                    to: Some(VmState::Unknown),
                    message: "host stopped reporting".into(),
                },
                now,
            )?;
        }
        tx.commit()?;
        let mut index = self.index();
        for (vm, _) in &marked {
            index.set_state(*vm, VmState::Unknown);
        }
        Ok(marked.into_iter().map(|(vm, _)| vm).collect())
    }
}

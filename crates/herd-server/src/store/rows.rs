//! Rows to records: every column a record reads, decoded once, with a clear error for
//! a row this version cannot read.

use super::{HostRecord, StoreError, VmRecord};
use herd_proto::wire::HypervisorInfo;
use herd_proto::VmState;
use rusqlite::Row;

/// Appends `values` to the query's arguments and returns their placeholders, for an
/// `IN (...)` clause.
pub(super) fn in_list(args: &mut Vec<rusqlite::types::Value>, values: &[String]) -> String {
    let mut marks = Vec::with_capacity(values.len());
    for value in values {
        args.push(value.clone().into());
        marks.push(format!("?{}", args.len()));
    }
    marks.join(", ")
}

pub(super) const VM_COLUMNS: &str =
    "id, name, project, hypervisor, vcpus, memory_mib, image, command, host, \
     desired_state, generation, issued_generation, observed_state, observed_at, last_error, \
     deleting, created_at, updated_at, policy, keep_running, disk_mib, seed";

pub(super) fn parse_uuid(text: &str) -> Result<uuid::Uuid, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt(format!("bad id {text:?}")))
}

pub(super) fn parse_state(text: &str) -> Result<VmState, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt(format!("bad state {text:?}")))
}

pub(super) fn vm_from_row(row: &Row<'_>) -> Result<Result<VmRecord, StoreError>, rusqlite::Error> {
    let id: String = row.get(0)?;
    let command: String = row.get(7)?;
    let host: Option<String> = row.get(8)?;
    let desired: String = row.get(9)?;
    let observed: String = row.get(12)?;
    let rest = (
        row.get::<_, String>(1)?,
        row.get::<_, String>(2)?,
        row.get::<_, String>(3)?,
        row.get::<_, i64>(4)?,
        row.get::<_, i64>(5)?,
        row.get::<_, String>(6)?,
        row.get::<_, i64>(10)?,
        row.get::<_, i64>(11)?,
        row.get::<_, i64>(13)?,
        row.get::<_, Option<String>>(14)?,
        row.get::<_, i64>(15)?,
        row.get::<_, i64>(16)?,
        row.get::<_, i64>(17)?,
    );
    let policy: String = row.get(18)?;
    let keep_running: i64 = row.get(19)?;
    let disk_mib: i64 = row.get(20)?;
    let seed: Option<String> = row.get(21)?;
    Ok((|| {
        let (
            name,
            project,
            hypervisor,
            vcpus,
            memory_mib,
            image,
            generation,
            issued,
            observed_at,
            last_error,
            deleting,
            created,
            updated,
        ) = rest;
        Ok(VmRecord {
            id: parse_uuid(&id)?,
            name,
            project,
            hypervisor,
            vcpus: vcpus as u32,
            memory_mib: memory_mib as u64,
            image,
            command: serde_json::from_str(&command)
                .map_err(|e| StoreError::Corrupt(format!("command of VM {id}: {e}")))?,
            policy: serde_json::from_str(&policy)
                .map_err(|e| StoreError::Corrupt(format!("policy of VM {id}: {e}")))?,
            keep_running: keep_running != 0,
            disk_mib: disk_mib.max(0) as u64,
            seed: seed.as_deref().map(parse_uuid).transpose()?,
            host: host.as_deref().map(parse_uuid).transpose()?,
            desired: parse_state(&desired)?,
            generation: generation as u64,
            issued_generation: issued as u64,
            observed: parse_state(&observed)?,
            observed_at_ms: observed_at,
            last_error,
            deleting: deleting != 0,
            created_at_ms: created,
            updated_at_ms: updated,
        })
    })())
}

pub(super) fn collect_vms(
    rows: impl Iterator<Item = Result<Result<VmRecord, StoreError>, rusqlite::Error>>,
) -> Result<Vec<VmRecord>, StoreError> {
    let mut out = Vec::new();
    for row in rows {
        out.push(row??);
    }
    Ok(out)
}

pub(super) fn host_from_row(
    row: &Row<'_>,
) -> Result<Result<HostRecord, StoreError>, rusqlite::Error> {
    let id: String = row.get(0)?;
    let hostname: String = row.get(1)?;
    let hypervisors: String = row.get(2)?;
    let cpus: i64 = row.get(3)?;
    let memory_mib: i64 = row.get(4)?;
    let up: i64 = row.get(5)?;
    let joined_at_ms: i64 = row.get(6)?;
    let agent_version: Option<String> = row.get(7)?;
    let labels: String = row.get(8)?;
    Ok((|| {
        Ok(HostRecord {
            id: parse_uuid(&id)?,
            hostname,
            hypervisors: serde_json::from_str::<Vec<(String, String)>>(&hypervisors)
                .map_err(|e| StoreError::Corrupt(format!("hypervisors of host {id}: {e}")))?
                .into_iter()
                .map(|(kind, detail)| HypervisorInfo { kind, detail })
                .collect(),
            cpus: cpus as u32,
            memory_mib: memory_mib as u64,
            up: up != 0,
            joined_at_ms,
            agent_version,
            labels: serde_json::from_str(&labels)
                .map_err(|e| StoreError::Corrupt(format!("labels of host {id}: {e}")))?,
        })
    })())
}

impl super::Store {
    /// Rows of (id, body) whose body is a whole record as JSON (migrations,
    /// broadcasts), decoded; `what` names the kind in a corruption's message.
    pub(super) fn query_records<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(sql)?;
        let rows = stmt.query_map(args, |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row?;
            out.push(
                serde_json::from_str(&body)
                    .map_err(|e| StoreError::Corrupt(format!("{what} {id}: {e}")))?,
            );
        }
        Ok(out)
    }
}

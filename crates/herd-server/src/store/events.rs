//! The event log: what happened to each VM and host, appended in the same transaction
//! as the change it records.

use super::rows::{in_list, parse_state, parse_uuid};
use super::{now_ms, Store, StoreError};
use herd_proto::wire::{HostId, VmId};
use herd_proto::VmState;
use rusqlite::{params, Connection};

/// One event row.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub id: i64,
    pub time_ms: i64,
    pub vm: Option<VmId>,
    pub host: Option<HostId>,
    pub kind: String,
    pub from: Option<VmState>,
    pub to: Option<VmState>,
    pub message: String,
}

/// An event to append.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub vm: Option<VmId>,
    pub host: Option<HostId>,
    pub kind: &'static str,
    pub from: Option<VmState>,
    pub to: Option<VmState>,
    pub message: String,
}

/// Which events to read.
#[derive(Debug, Clone)]
pub enum EventScope {
    All,
    Vm(VmId),
    /// Events of VMs in these projects (host events are cloud-wide, so not included).
    Projects(Vec<String>),
}

pub(super) fn insert_event(
    db: &Connection,
    event: &NewEvent,
    time_ms: i64,
) -> Result<(), StoreError> {
    db.prepare_cached(
        "INSERT INTO events (time, vm, host, kind, from_state, to_state, message) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        time_ms,
        event.vm.map(|v| v.to_string()),
        event.host.map(|h| h.to_string()),
        event.kind,
        event.from.map(|s| s.as_str()),
        event.to.map(|s| s.as_str()),
        event.message,
    ])?;
    Ok(())
}

impl Store {
    pub fn append_event(&self, event: &NewEvent) -> Result<(), StoreError> {
        insert_event(&self.db(), event, now_ms())
    }

    pub fn events(
        &self,
        scope: &EventScope,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        const COLUMNS: &str =
            "SELECT id, time, vm, host, kind, from_state, to_state, message FROM events";
        let mut args: Vec<rusqlite::types::Value> = vec![after.into()];
        let sql = match scope {
            EventScope::All => format!("{COLUMNS} WHERE id > ?1"),
            EventScope::Vm(vm) => {
                args.push(vm.to_string().into());
                format!("{COLUMNS} WHERE id > ?1 AND vm = ?2")
            }
            EventScope::Projects(projects) => format!(
                "{COLUMNS} WHERE id > ?1 AND vm IN \
                 (SELECT vm FROM vm_ledger WHERE project IN ({}))",
                in_list(&mut args, projects)
            ),
        };
        let sql = format!("{sql} ORDER BY id LIMIT {limit}");
        let db = self.reader();
        let mut stmt = db.prepare_cached(&sql)?;
        let mut out = Vec::new();
        for row in stmt.query_map(rusqlite::params_from_iter(args), event_from_row)? {
            out.push(row??);
        }
        Ok(out)
    }

    /// A VM's newest `limit` events, oldest first.
    pub fn latest_events(&self, vm: VmId, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT id, time, vm, host, kind, from_state, to_state, message FROM events \
             WHERE vm = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let mut out = Vec::new();
        for row in stmt.query_map(
            rusqlite::params![vm.to_string(), limit as i64],
            event_from_row,
        )? {
            out.push(row??);
        }
        out.reverse();
        Ok(out)
    }
}

fn event_from_row(
    row: &rusqlite::Row<'_>,
) -> Result<Result<EventRecord, StoreError>, rusqlite::Error> {
    let id: i64 = row.get(0)?;
    let time_ms: i64 = row.get(1)?;
    let vm: Option<String> = row.get(2)?;
    let host: Option<String> = row.get(3)?;
    let kind: String = row.get(4)?;
    let from: Option<String> = row.get(5)?;
    let to: Option<String> = row.get(6)?;
    let message: String = row.get(7)?;
    Ok((|| {
        Ok(EventRecord {
            id,
            time_ms,
            vm: vm.as_deref().map(parse_uuid).transpose()?,
            host: host.as_deref().map(parse_uuid).transpose()?,
            kind,
            from: from.as_deref().map(parse_state).transpose()?,
            to: to.as_deref().map(parse_state).transpose()?,
            message,
        })
    })())
}

//! Resizes: the latest of each VM as one row holding its whole record, and the new
//! shape itself, written to the VM's row in the same transaction that records the
//! resize as sent, with a new generation so that the VM's host gets a command in it.
//! Every shape a VM had is kept with the time it took effect (`vm_sizes`), for bills.

use super::events::insert_event;
use super::{now_ms, NewEvent, Store, StoreError};
use crate::resize::plan::{Resize, Size};
use herd_proto::wire::VmId;
use rusqlite::{params, OptionalExtension};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS resizes (
    vm TEXT PRIMARY KEY,
    open INTEGER NOT NULL,
    body TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS resizes_open ON resizes (vm) WHERE open = 1;
CREATE TABLE IF NOT EXISTS vm_sizes (
    vm TEXT NOT NULL,
    at INTEGER NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS vm_sizes_by_vm ON vm_sizes (vm, at);
";

fn write(
    db: &rusqlite::Connection,
    resize: &Resize,
    events: &[NewEvent],
    now: i64,
) -> Result<(), StoreError> {
    let body = serde_json::to_string(resize).map_err(|e| {
        StoreError::Corrupt(format!("resize of VM {} does not encode: {e}", resize.vm))
    })?;
    db.prepare_cached(
        "INSERT INTO resizes (vm, open, body, updated_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (vm) DO UPDATE SET open = ?2, body = ?3, updated_at = ?4",
    )?
    .execute(params![
        resize.vm.to_string(),
        resize.is_open() as i64,
        body,
        now
    ])?;
    for event in events {
        insert_event(db, event, now)?;
    }
    Ok(())
}

fn resize_of(vm: &str, body: &str) -> Result<Resize, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("resize of VM {vm}: {e}")))
}

impl Store {
    /// Saves a resize's record with the events its step produced.
    pub fn save_resize(&self, resize: &Resize, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        write(&tx, resize, events, now_ms())?;
        tx.commit()?;
        Ok(())
    }

    /// Gives the VM its new shape and a new generation (so its host is sent a command
    /// in that shape), records the shape's start for bills, and saves the resize as
    /// sent with that generation, in one transaction. Returns the generation, or
    /// `None` (writing nothing) if the VM is gone.
    /// With `keep_stopped`, the VM's desired state becomes stopped: a new generation is
    /// a command its host carries out whole, and a stopped VM asked only for a new shape
    /// must not start.
    pub fn apply_size(
        &self,
        resize: &mut Resize,
        keep_stopped: bool,
        events: &[NewEvent],
    ) -> Result<Option<u64>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = now_ms();
        let vm = resize.vm.to_string();
        let Size { vcpus, memory_mib } = resize.to;
        let changed = tx.execute(
            "UPDATE vms SET vcpus = ?2, memory_mib = ?3, generation = generation + 1, \
             desired_state = CASE WHEN ?5 THEN 'stopped' ELSE desired_state END, \
             last_error = NULL, updated_at = ?4 WHERE id = ?1",
            params![vm, vcpus, memory_mib as i64, now, keep_stopped],
        )?;
        if changed != 1 {
            return Ok(None);
        }
        let generation: i64 = tx.query_row(
            "SELECT generation FROM vms WHERE id = ?1",
            params![vm],
            |row| row.get(0),
        )?;
        tx.execute(
            "INSERT INTO vm_sizes (vm, at, vcpus, memory_mib) VALUES (?1, ?2, ?3, ?4)",
            params![vm, now, vcpus, memory_mib as i64],
        )?;
        resize.generation = Some(generation as u64);
        write(&tx, resize, events, now)?;
        tx.commit()?;
        self.index().resize(resize.vm, vcpus, memory_mib);
        Ok(Some(generation as u64))
    }

    /// The VM's latest resize, if it had one.
    pub fn resize(&self, vm: VmId) -> Result<Option<Resize>, StoreError> {
        let db = self.reader();
        let body: Option<String> = db
            .prepare_cached("SELECT body FROM resizes WHERE vm = ?1")?
            .query_row(params![vm.to_string()], |row| row.get(0))
            .optional()?;
        body.map(|body| resize_of(&vm.to_string(), &body))
            .transpose()
    }

    /// Every resize not finished yet.
    pub fn open_resizes(&self) -> Result<Vec<Resize>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached("SELECT vm, body FROM resizes WHERE open = 1")?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (vm, body) = row?;
            out.push(resize_of(&vm, &body)?);
        }
        Ok(out)
    }

    /// The shapes a VM took after its launch, oldest first: (since, shape).
    pub fn vm_sizes(&self, vm: VmId) -> Result<Vec<(i64, Size)>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT at, vcpus, memory_mib FROM vm_sizes WHERE vm = ?1 ORDER BY at, rowid",
        )?;
        let rows = stmt.query_map(params![vm.to_string()], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                Size {
                    vcpus: row.get::<_, i64>(1)?.max(0) as u32,
                    memory_mib: row.get::<_, i64>(2)?.max(0) as u64,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

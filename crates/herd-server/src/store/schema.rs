//! The tables, the changes an older database needs at open, and the in-memory index
//! built from the rows in one pass.

use super::rows::{parse_state, parse_uuid};
use super::vm_index::{IndexedVm, VmIndex};
use super::StoreError;
use rusqlite::Connection;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    project TEXT NOT NULL,
    hypervisor TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    image TEXT NOT NULL,
    command TEXT NOT NULL,
    host TEXT,
    desired_state TEXT NOT NULL,
    generation INTEGER NOT NULL,
    issued_generation INTEGER NOT NULL DEFAULT 0,
    observed_state TEXT NOT NULL,
    observed_at INTEGER NOT NULL,
    last_error TEXT,
    deleting INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    policy TEXT NOT NULL DEFAULT '{}',
    keep_running INTEGER NOT NULL DEFAULT 0,
    disk_mib INTEGER NOT NULL DEFAULT 0,
    seed TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS vms_by_name ON vms (project, name);
CREATE INDEX IF NOT EXISTS vms_by_host ON vms (host);
-- Listing pages are ordered by id; this lets a project's page stop after `limit` rows
-- instead of scanning a million. Pages by observed state come from the in-memory
-- index (vm_index.rs): an SQL index on it would cost every reported change two
-- random pages.
CREATE INDEX IF NOT EXISTS vms_by_project ON vms (project, id);
-- By name across projects (an admin's search); within a project vms_by_name answers.
CREATE INDEX IF NOT EXISTS vms_by_name_any ON vms (name, id);
-- Partial indexes for the reconciler's questions, asked every pass: the rows they hold
-- are the few VMs with work, not every VM.
CREATE INDEX IF NOT EXISTS vms_needing_work ON vms (id) WHERE
    (host IS NOT NULL AND issued_generation < generation)
    OR (host IS NULL AND observed_state = 'pending');
CREATE INDEX IF NOT EXISTS vms_with_lifespan ON vms (id) WHERE
    json_extract(policy, '$.lifespan') IS NOT NULL;
CREATE INDEX IF NOT EXISTS vms_with_deadline ON vms (id) WHERE
    json_extract(policy, '$.deadline') IS NOT NULL;
CREATE TABLE IF NOT EXISTS hosts (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    hypervisors TEXT NOT NULL DEFAULT '[]',
    cpus INTEGER NOT NULL DEFAULT 0,
    memory_mib INTEGER NOT NULL DEFAULT 0,
    up INTEGER NOT NULL DEFAULT 0,
    joined_at INTEGER NOT NULL,
    agent_version TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    vm TEXT,
    host TEXT,
    kind TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_vm ON events (vm, id);
CREATE TABLE IF NOT EXISTS usage_samples (
    vm TEXT NOT NULL,
    sampled_at INTEGER NOT NULL,
    cpu_ms INTEGER NOT NULL,
    mem_kib INTEGER NOT NULL,
    net_bytes INTEGER NOT NULL,
    disk_bytes INTEGER NOT NULL,
    PRIMARY KEY (vm, sampled_at)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vm_ledger (
    vm TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    project TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rate_cards (
    project TEXT PRIMARY KEY,
    card TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    used_at INTEGER
);
";

/// Columns added since the first schema: (table, column, its declaration).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("vms", "policy", "TEXT NOT NULL DEFAULT '{}'"),
    ("vms", "keep_running", "INTEGER NOT NULL DEFAULT 0"),
    ("vms", "disk_mib", "INTEGER NOT NULL DEFAULT 0"),
    ("projects", "burst", "TEXT"),
    ("hosts", "labels", "TEXT NOT NULL DEFAULT '{}'"),
    ("vms", "seed", "TEXT"),
];

/// Brings a database made by an older herd up to this schema.
pub(super) fn migrate(db: &Connection) -> Result<(), StoreError> {
    for (table, column, declaration) in ADDED_COLUMNS {
        let present: i64 = db.query_row(
            "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |row| row.get(0),
        )?;
        if present == 0 {
            db.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
            ))?;
        }
    }
    // Observed-state indexes of herd before the in-memory index: dropped, or every
    // change would still pay for them.
    db.execute_batch(
        "DROP INDEX IF EXISTS vms_by_state; DROP INDEX IF EXISTS vms_by_project_state;",
    )?;
    Ok(())
}

/// Every VM's id, project, host, observed state and share: what [`VmIndex`] is built
/// from. Read by reference, without a string allocated per column: at a million VMs
/// this is most of the time a restart takes before the server answers.
pub(super) fn load_index(db: &Connection) -> Result<VmIndex, StoreError> {
    let n: i64 = db.query_row("SELECT COUNT(*) FROM vms", [], |row| row.get(0))?;
    let mut builder = super::vm_index::Builder::with_capacity(n.max(0) as usize);
    let mut stmt = db.prepare(
        "SELECT id, project, host, observed_state, vcpus, memory_mib, hypervisor FROM vms",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let str_at = |i: usize| -> Result<Option<&str>, StoreError> {
            Ok(row
                .get_ref(i)?
                .as_str_or_null()
                .map_err(rusqlite::Error::from)?)
        };
        let text_at =
            |i: usize| str_at(i)?.ok_or_else(|| StoreError::Corrupt(format!("NULL in column {i}")));
        builder.add(IndexedVm {
            id: parse_uuid(text_at(0)?)?,
            project: text_at(1)?,
            host: str_at(2)?.map(parse_uuid).transpose()?,
            state: parse_state(text_at(3)?)?,
            vcpus: row.get::<_, i64>(4)? as u32,
            memory_mib: row.get::<_, i64>(5)? as u64,
            hypervisor: text_at(6)?,
        });
    }
    Ok(builder.finish())
}

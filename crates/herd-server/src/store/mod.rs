//! The server's durable state in SQLite.
//!
//! WAL mode with `synchronous=FULL`: a write the API acknowledged survives a kill -9 of
//! the server or a power loss. Desired state (what users asked for, with a generation
//! that bumps on every change) and observed state (what agents report) are separate
//! columns, as Kubernetes separates spec and status; the reconciler drives one toward
//! the other. Only this module writes SQL.

use herd_proto::policy::PolicySpec;
use herd_proto::wire::{HostId, HypervisorInfo, VmId};
use herd_proto::VmState;
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::path::Path;
use std::sync::Mutex;

mod tenancy;
mod vm_index;
pub use tenancy::{
    AuditFilter, AuditRow, MemberRow, ProjectRow, Quota, TenancyRows, TokenRow, UserRow,
};
use vm_index::{IndexedVm, VmIndex};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("a VM named {name:?} already exists in project {project:?}")]
    NameTaken { project: String, name: String },
}

/// The wall clock in the store's unit (signed unix milliseconds, as SQLite keeps them).
pub fn now_ms() -> i64 {
    i64::try_from(herd_proto::clock::unix_ms()).unwrap_or(i64::MAX)
}

/// Stores usage samples inside a transaction; see [`Store::insert_usage`].
fn insert_usage_rows(db: &Connection, samples: &[(VmId, UsageRow)]) -> Result<usize, StoreError> {
    let mut stmt = db.prepare_cached(
        "INSERT OR IGNORE INTO usage_samples \
         (vm, sampled_at, cpu_ms, mem_kib, net_bytes, disk_bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut n_new = 0;
    for (vm, row) in samples {
        n_new += stmt.execute(params![
            vm.to_string(),
            row.sampled_at_ms,
            row.cpu_ms as i64,
            row.mem_kib as i64,
            row.net_bytes as i64,
            row.disk_bytes as i64
        ])?;
    }
    Ok(n_new)
}

/// One VM row.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub id: VmId,
    pub name: String,
    pub project: String,
    pub hypervisor: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub image: String,
    pub command: Vec<String>,
    pub policy: PolicySpec,
    pub keep_running: bool,
    pub host: Option<HostId>,
    pub desired: VmState,
    pub generation: u64,
    pub issued_generation: u64,
    pub observed: VmState,
    pub observed_at_ms: i64,
    pub last_error: Option<String>,
    pub deleting: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One host row.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRecord {
    pub id: HostId,
    pub hostname: String,
    pub hypervisors: Vec<HypervisorInfo>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub up: bool,
    pub joined_at_ms: i64,
    pub agent_version: Option<String>,
}

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

/// Appends `values` to the query's arguments and returns their placeholders, for an
/// `IN (...)` clause.
fn in_list(args: &mut Vec<rusqlite::types::Value>, values: &[String]) -> String {
    let mut marks = Vec::with_capacity(values.len());
    for value in values {
        args.push(value.clone().into());
        marks.push(format!("?{}", args.len()));
    }
    marks.join(", ")
}

/// Which events to read.
#[derive(Debug, Clone)]
pub enum EventScope {
    All,
    Vm(VmId),
    /// Events of VMs in these projects (host events are cloud-wide, so not included).
    Projects(Vec<String>),
}

/// Filters for listing VMs; `after` is the pagination cursor (an id).
#[derive(Debug, Clone, Default)]
pub struct VmFilter {
    pub project: Option<String>,
    /// The caller's scope: only VMs of these projects; `None` is every project.
    pub projects: Option<Vec<String>>,
    pub state: Option<VmState>,
    pub host: Option<HostId>,
    pub name: Option<String>,
    pub after: Option<VmId>,
    pub limit: usize,
}

/// The store: one connection that writes, one that reads. In WAL mode the reader sees
/// every committed write and never waits for a write in progress (a commit's fsync),
/// so agents' lookups and API listings do not queue behind the ingest's batches.
pub struct Store {
    db: Mutex<Connection>,
    /// Read-only connections: lookups and listings run side by side (WAL lets them),
    /// and never wait behind the writer's fsync.
    readers: Vec<Mutex<Connection>>,
    next_reader: std::sync::atomic::AtomicUsize,
    /// VMs by observed state, project and host, in step with the rows: changed under
    /// the writer's lock after each commit. See [`vm_index`].
    index: Mutex<VmIndex>,
}

/// What the ingest needs of a VM to judge a report about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmBrief {
    pub host: Option<HostId>,
    pub desired: VmState,
    pub observed: VmState,
    pub deleting: bool,
}

const SCHEMA: &str = "
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
    keep_running INTEGER NOT NULL DEFAULT 0
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

/// Brings a database made by an older herd up to this schema.
fn migrate(db: &Connection) -> Result<(), StoreError> {
    let has_policy: i64 = db.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('vms') WHERE name = 'policy'",
        [],
        |row| row.get(0),
    )?;
    if has_policy == 0 {
        db.execute_batch("ALTER TABLE vms ADD COLUMN policy TEXT NOT NULL DEFAULT '{}'")?;
    }
    let has_keep: i64 = db.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('vms') WHERE name = 'keep_running'",
        [],
        |row| row.get(0),
    )?;
    if has_keep == 0 {
        db.execute_batch("ALTER TABLE vms ADD COLUMN keep_running INTEGER NOT NULL DEFAULT 0")?;
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
fn load_index(db: &Connection) -> Result<VmIndex, StoreError> {
    let n: i64 = db.query_row("SELECT COUNT(*) FROM vms", [], |row| row.get(0))?;
    let mut builder = vm_index::Builder::with_capacity(n.max(0) as usize);
    let mut stmt =
        db.prepare("SELECT id, project, host, observed_state, vcpus, memory_mib FROM vms")?;
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
        });
    }
    Ok(builder.finish())
}

const VM_COLUMNS: &str = "id, name, project, hypervisor, vcpus, memory_mib, image, command, host, \
     desired_state, generation, issued_generation, observed_state, observed_at, last_error, \
     deleting, created_at, updated_at, policy, keep_running";

fn parse_uuid(text: &str) -> Result<uuid::Uuid, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt(format!("bad id {text:?}")))
}

fn parse_state(text: &str) -> Result<VmState, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt(format!("bad state {text:?}")))
}

fn vm_from_row(row: &Row<'_>) -> Result<Result<VmRecord, StoreError>, rusqlite::Error> {
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

fn collect_vms(
    rows: impl Iterator<Item = Result<Result<VmRecord, StoreError>, rusqlite::Error>>,
) -> Result<Vec<VmRecord>, StoreError> {
    let mut out = Vec::new();
    for row in rows {
        out.push(row??);
    }
    Ok(out)
}

fn host_from_row(row: &Row<'_>) -> Result<Result<HostRecord, StoreError>, rusqlite::Error> {
    let id: String = row.get(0)?;
    let hostname: String = row.get(1)?;
    let hypervisors: String = row.get(2)?;
    let cpus: i64 = row.get(3)?;
    let memory_mib: i64 = row.get(4)?;
    let up: i64 = row.get(5)?;
    let joined_at_ms: i64 = row.get(6)?;
    let agent_version: Option<String> = row.get(7)?;
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
        })
    })())
}

fn event_from_row(row: &Row<'_>) -> Result<Result<EventRecord, StoreError>, rusqlite::Error> {
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

fn insert_event(db: &Connection, event: &NewEvent, time_ms: i64) -> Result<(), StoreError> {
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

/// One usage sample as metered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageRow {
    pub sampled_at_ms: i64,
    pub cpu_ms: u64,
    pub mem_kib: u64,
    pub net_bytes: u64,
    pub disk_bytes: u64,
}

/// A VM as billing remembers it, after its record is gone too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerVm {
    pub vm: VmId,
    pub name: String,
    pub project: String,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// A change of observed state to write, with the events that explain it.
#[derive(Debug, Clone)]
pub struct Observation {
    pub vm: VmId,
    pub state: VmState,
    /// Remove the row (the VM was deleted and is now gone from its host).
    pub purge: bool,
    pub events: Vec<NewEvent>,
}

/// Page cache sizes, in KiB as negative `cache_size` values.
const WRITER_CACHE_KIB: i64 = -128 * 1024;
const READER_CACHE_KIB: i64 = -32 * 1024;
/// Read connections. Each costs its page cache; three keep the ingest's lookups, a
/// reconnect wave's seeding and the API's listings from queueing behind each other.
const READERS: usize = 3;
/// Changes applied to the in-memory index per hold of its lock.
const INDEX_SLICE: usize = 2_000;

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        // A million VMs' rows and indexes run to hundreds of MiB; with SQLite's default
        // 2 MiB cache every commit re-reads its index pages from the kernel and spills
        // dirty ones early. Page caches are counted in the server's memory budget.
        db.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(SCHEMA)?;
        migrate(&db)?;
        db.execute_batch(tenancy::SCHEMA)?;
        tenancy::bootstrap(&db)?;
        let index = Mutex::new(load_index(&db)?);
        let readers = (0..READERS)
            .map(|_| -> Result<Mutex<Connection>, StoreError> {
                let reader = Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                reader.busy_timeout(std::time::Duration::from_secs(5))?;
                reader.pragma_update(None, "cache_size", READER_CACHE_KIB)?;
                Ok(Mutex::new(reader))
            })
            .collect::<Result<_, _>>()?;
        Ok(Store {
            db: Mutex::new(db),
            readers,
            next_reader: Default::default(),
            index,
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, VmIndex> {
        // Its changes are plain collection updates that do not panic midway.
        self.index
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written: transactions
        // roll back. Keep serving.
        self.db.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// A read-only connection, for lookups and listings.
    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A free one if there is one, else wait for the next in turn.
        for reader in &self.readers {
            if let Ok(guard) = reader.try_lock() {
                return guard;
            }
        }
        let turn = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.readers[turn % self.readers.len()]
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    // ---- tokens -------------------------------------------------------------------

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

    /// The token's name and kind if it exists, has not expired and (for one-time
    /// tokens) has not been used.
    pub fn find_token(&self, hash: &str) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .reader()
            .prepare_cached(
                "SELECT name, kind FROM tokens WHERE hash = ?1 \
                 AND (expires_at IS NULL OR expires_at > ?2) AND used_at IS NULL",
            )?
            .query_row(params![hash, now_ms()], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?)
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
            "INSERT INTO hosts (id, hostname, token_hash, joined_at) VALUES (?1, ?2, ?3, ?4)",
            params![host.to_string(), hostname, agent_token_hash, now],
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

    // ---- hosts --------------------------------------------------------------------

    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT id, hostname, hypervisors, cpus, memory_mib, up, joined_at, agent_version \
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
                "SELECT id, hostname, hypervisors, cpus, memory_mib, up, joined_at, agent_version \
                 FROM hosts WHERE id = ?1",
            )?
            .query_row(params![id.to_string()], host_from_row)
            .optional()?;
        row.transpose()
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

    // ---- VMs ----------------------------------------------------------------------

    pub fn insert_vm(&self, vm: &VmRecord, event: &NewEvent) -> Result<(), StoreError> {
        self.insert_vms(&[(vm.clone(), event.clone())])
    }

    /// Inserts VMs, each with its event, in one transaction: all or none.
    pub fn insert_vms(&self, vms: &[(VmRecord, NewEvent)]) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for (vm, event) in vms {
            let result = tx
                .prepare_cached(&format!(
                    "INSERT INTO vms ({VM_COLUMNS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
                ))?
                .execute(params![
                    vm.id.to_string(),
                    vm.name,
                    vm.project,
                    vm.hypervisor,
                    vm.vcpus,
                    vm.memory_mib as i64,
                    vm.image,
                    serde_json::to_string(&vm.command).unwrap_or_else(|_| "[]".into()),
                    vm.host.map(|h| h.to_string()),
                    vm.desired.as_str(),
                    vm.generation as i64,
                    vm.issued_generation as i64,
                    vm.observed.as_str(),
                    vm.observed_at_ms,
                    vm.last_error,
                    vm.deleting as i64,
                    vm.created_at_ms,
                    vm.updated_at_ms,
                    serde_json::to_string(&vm.policy).unwrap_or_else(|_| "{}".into()),
                    vm.keep_running as i64,
                ]);
            match result {
                Err(rusqlite::Error::SqliteFailure(err, _))
                    if err.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    return Err(StoreError::NameTaken {
                        project: vm.project.clone(),
                        name: vm.name.clone(),
                    });
                }
                other => {
                    other?;
                }
            }
            tx.prepare_cached(
                "INSERT OR IGNORE INTO vm_ledger (vm, name, project, vcpus, memory_mib, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                vm.id.to_string(),
                vm.name,
                vm.project,
                vm.vcpus,
                vm.memory_mib as i64,
                vm.created_at_ms
            ])?;
            insert_event(&tx, event, vm.created_at_ms)?;
        }
        tx.commit()?;
        let mut index = self.index();
        for (vm, _) in vms {
            index.insert(IndexedVm {
                id: vm.id,
                project: &vm.project,
                host: vm.host,
                state: vm.observed,
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
            });
        }
        Ok(())
    }

    pub fn vm(&self, id: VmId) -> Result<Option<VmRecord>, StoreError> {
        let db = self.reader();
        let row = db
            .prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"))?
            .query_row(params![id.to_string()], vm_from_row)
            .optional()?;
        row.transpose()
    }

    /// A page of VMs in id order. A filter on the state alone (or with projects) pages
    /// through the in-memory index and reads just the page's rows; with a host or a
    /// name, whose SQL indexes narrow to a few rows, the state is checked on those.
    pub fn list_vms(&self, filter: &VmFilter) -> Result<Vec<VmRecord>, StoreError> {
        if let (Some(state), None, None) = (filter.state, filter.host, &filter.name) {
            let ids = self.index().page(
                state,
                filter.project.as_deref(),
                filter.projects.as_deref(),
                filter.after,
                filter.limit,
            );
            return self.vms_by_id(&ids);
        }
        let mut sql = format!("SELECT {VM_COLUMNS} FROM vms WHERE 1=1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(projects) = &filter.projects {
            let marks = in_list(&mut args, projects);
            sql.push_str(&format!(" AND project IN ({marks})"));
        }
        let mut push = |clause: &str, value: String, sql: &mut String| {
            args.push(value.into());
            sql.push_str(&format!(" AND {clause} ?{}", args.len()));
        };
        if let Some(project) = &filter.project {
            push("project =", project.clone(), &mut sql);
        }
        if let Some(state) = filter.state {
            push("observed_state =", state.as_str().to_owned(), &mut sql);
        }
        if let Some(host) = filter.host {
            push("host =", host.to_string(), &mut sql);
        }
        if let Some(name) = &filter.name {
            push("name =", name.clone(), &mut sql);
        }
        if let Some(after) = filter.after {
            push("id >", after.to_string(), &mut sql);
        }
        sql.push_str(&format!(" ORDER BY id LIMIT {}", filter.limit));
        let db = self.reader();
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), vm_from_row)?;
        collect_vms(rows)
    }

    /// These VMs' rows, in id order; a VM deleted since is left out.
    fn vms_by_id(&self, ids: &[VmId]) -> Result<Vec<VmRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = Vec::new();
        let ids: Vec<String> = ids.iter().map(VmId::to_string).collect();
        let marks = in_list(&mut args, &ids);
        let db = self.reader();
        let mut stmt = db.prepare(&format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE id IN ({marks}) ORDER BY id"
        ))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), vm_from_row)?;
        collect_vms(rows)
    }

    /// What each VM that holds capacity holds, and where: (VM, host, vCPUs, MiB), for
    /// rebuilding the scheduler's accounting at start. From the in-memory index, which
    /// the open's one pass over the rows built.
    pub fn placed_shares(&self) -> Vec<(VmId, HostId, u32, u64)> {
        self.index().placed_shares()
    }

    /// VMs with a lifespan whose desired state still keeps them up. Filtered in SQL:
    /// the reconciler asks every pass, and most VMs have no lifespan.
    pub fn vms_with_lifespan(&self) -> Result<Vec<VmRecord>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(&format!(
            "SELECT {VM_COLUMNS} FROM vms INDEXED BY vms_with_lifespan \
             WHERE json_extract(policy, '$.lifespan') IS NOT NULL \
             AND desired_state NOT IN ('terminated', 'stopped', 'suspended')"
        ))?;
        let rows = stmt.query_map([], vm_from_row)?;
        collect_vms(rows)
    }

    /// VMs the reconciler has work for: a desired generation not yet sent to the host,
    /// or no host yet. At most `limit`, in id order after `after`: a pass over a
    /// million new VMs goes in slices.
    pub fn vms_needing_work(
        &self,
        after: Option<VmId>,
        limit: usize,
    ) -> Result<Vec<VmRecord>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(&format!(
            "SELECT {VM_COLUMNS} FROM vms INDEXED BY vms_needing_work WHERE \
             ((host IS NOT NULL AND issued_generation < generation) \
             OR (host IS NULL AND observed_state = 'pending')) \
             AND id > ?1 ORDER BY id LIMIT ?2"
        ))?;
        let after = after.map(|id| id.to_string()).unwrap_or_default();
        let rows = stmt.query_map(params![after, limit as i64], vm_from_row)?;
        collect_vms(rows)
    }

    /// The few facts the ingest checks a reported VM against.
    pub fn vm_brief(&self, id: VmId) -> Result<Option<VmBrief>, StoreError> {
        let db = self.reader();
        let row = db
            .prepare_cached(
                "SELECT host, desired_state, observed_state, deleting FROM vms WHERE id = ?1",
            )?
            .query_row(params![id.to_string()], |row| {
                Ok((
                    row.get::<_, Option<String>>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                ))
            })
            .optional()?;
        let Some((host, desired, observed, deleting)) = row else {
            return Ok(None);
        };
        Ok(Some(VmBrief {
            host: host.as_deref().map(parse_uuid).transpose()?,
            desired: parse_state(&desired)?,
            observed: parse_state(&observed)?,
            deleting: deleting != 0,
        }))
    }

    /// The VMs placed on a host, with their observed states, for seeding the server's
    /// view of the host on a new connection. From memory: a reconnect wave of thousands
    /// of hosts would otherwise read a hundred random rows per host.
    pub fn vms_on(&self, host: HostId) -> Vec<(VmId, VmState)> {
        self.index().on_host(host)
    }

    /// Sets a new desired state, bumping the generation. Returns the new generation.
    pub fn set_desired(
        &self,
        id: VmId,
        desired: VmState,
        deleting: bool,
        event: &NewEvent,
    ) -> Result<u64, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = now_ms();
        tx.execute(
            "UPDATE vms SET desired_state = ?2, generation = generation + 1, \
             deleting = MAX(deleting, ?3), last_error = NULL, updated_at = ?4 WHERE id = ?1",
            params![id.to_string(), desired.as_str(), deleting as i64, now],
        )?;
        let generation: i64 = tx.query_row(
            "SELECT generation FROM vms WHERE id = ?1",
            params![id.to_string()],
            |row| row.get(0),
        )?;
        insert_event(&tx, event, now)?;
        tx.commit()?;
        Ok(generation as u64)
    }

    pub fn assign_host(&self, id: VmId, host: HostId, event: &NewEvent) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = now_ms();
        let placed = tx.execute(
            "UPDATE vms SET host = ?2, observed_state = 'scheduled', observed_at = ?3, \
             updated_at = ?3 WHERE id = ?1 AND host IS NULL",
            params![id.to_string(), host.to_string(), now],
        )?;
        insert_event(&tx, event, now)?;
        tx.commit()?;
        if placed == 1 {
            self.index().place(id, host);
        }
        Ok(())
    }

    /// Records that these (VM, generation) commands are queued, in one write.
    pub fn mark_issued(&self, issued: &[(VmId, u64)]) -> Result<(), StoreError> {
        if issued.is_empty() {
            return Ok(());
        }
        let mut db = self.db();
        let tx = db.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE vms SET issued_generation = MAX(issued_generation, ?2) WHERE id = ?1",
            )?;
            for (id, generation) in issued {
                stmt.execute(params![id.to_string(), *generation as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn set_error(&self, id: VmId, error: &str, event: &NewEvent) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = now_ms();
        tx.execute(
            "UPDATE vms SET last_error = ?2, updated_at = ?3 WHERE id = ?1",
            params![id.to_string(), error, now],
        )?;
        insert_event(&tx, event, now)?;
        tx.commit()?;
        Ok(())
    }

    /// Applies observed states in one transaction (one fsync).
    pub fn observe(&self, observations: &[Observation]) -> Result<(), StoreError> {
        self.write_batch(observations, &[]).map(|_| ())
    }

    /// Applies observed states and stores usage samples, from any number of hosts, in
    /// one transaction: the ingest's group commit. Returns how many samples were new.
    pub fn write_batch(
        &self,
        observations: &[Observation],
        samples: &[(VmId, UsageRow)],
    ) -> Result<usize, StoreError> {
        if observations.is_empty() && samples.is_empty() {
            return Ok(0);
        }
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = now_ms();
        for obs in observations {
            if obs.purge {
                tx.prepare_cached("DELETE FROM vms WHERE id = ?1")?
                    .execute(params![obs.vm.to_string()])?;
            } else {
                tx.prepare_cached(
                    "UPDATE vms SET observed_state = ?2, observed_at = ?3, updated_at = ?3 WHERE id = ?1",
                )?
                .execute(params![obs.vm.to_string(), obs.state.as_str(), now])?;
            }
            for event in &obs.events {
                insert_event(&tx, event, now)?;
            }
        }
        let n_new = insert_usage_rows(&tx, samples)?;
        tx.commit()?;
        // In slices: a batch of a hundred thousand changes would hold the index from
        // listings and reconnecting hosts for a good part of a second.
        for slice in observations.chunks(INDEX_SLICE) {
            let mut index = self.index();
            for obs in slice {
                if obs.purge {
                    index.remove(obs.vm);
                } else {
                    index.set_state(obs.vm, obs.state);
                }
            }
        }
        Ok(n_new)
    }

    pub fn append_event(&self, event: &NewEvent) -> Result<(), StoreError> {
        insert_event(&self.db(), event, now_ms())
    }

    // ---- metering -----------------------------------------------------------------

    /// Stores usage samples; a sample already stored (same VM, same instant) is kept
    /// once, so a retransmitted batch changes nothing. Returns how many were new.
    pub fn insert_usage(&self, samples: &[(VmId, UsageRow)]) -> Result<usize, StoreError> {
        self.write_batch(&[], samples)
    }

    /// VMs billing knows of, in one project or all.
    pub fn ledger(&self, project: Option<&str>) -> Result<Vec<LedgerVm>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT vm, name, project, vcpus, memory_mib FROM vm_ledger \
             WHERE (?1 IS NULL OR project = ?1) ORDER BY project, name, vm",
        )?;
        let rows = stmt.query_map(params![project], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (vm, name, project, vcpus, memory_mib) = row?;
            out.push(LedgerVm {
                vm: parse_uuid(&vm)?,
                name,
                project,
                vcpus: vcpus as u32,
                memory_mib: memory_mib as u64,
            });
        }
        Ok(out)
    }

    /// A VM's usage samples up to `to_ms`, oldest first.
    pub fn usage_samples(&self, vm: VmId, to_ms: i64) -> Result<Vec<UsageRow>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT sampled_at, cpu_ms, mem_kib, net_bytes, disk_bytes FROM usage_samples \
             WHERE vm = ?1 AND sampled_at <= ?2 ORDER BY sampled_at",
        )?;
        let rows = stmt.query_map(params![vm.to_string(), to_ms], |row| {
            Ok(UsageRow {
                sampled_at_ms: row.get(0)?,
                cpu_ms: row.get::<_, i64>(1)? as u64,
                mem_kib: row.get::<_, i64>(2)? as u64,
                net_bytes: row.get::<_, i64>(3)? as u64,
                disk_bytes: row.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A VM's observed states over time, from its lifecycle events, oldest first.
    pub fn state_history(&self, vm: VmId) -> Result<Vec<(i64, VmState)>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT time, to_state FROM events WHERE vm = ?1 AND to_state IS NOT NULL ORDER BY id",
        )?;
        let rows = stmt.query_map(params![vm.to_string()], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (time, state) = row?;
            out.push((time, parse_state(&state)?));
        }
        Ok(out)
    }

    pub fn set_rate_card(&self, project: &str, card_json: &str) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO rate_cards (project, card, updated_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (project) DO UPDATE SET card = excluded.card, updated_at = excluded.updated_at",
            params![project, card_json, now_ms()],
        )?;
        Ok(())
    }

    pub fn rate_card(&self, project: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .reader()
            .prepare_cached("SELECT card FROM rate_cards WHERE project = ?1")?
            .query_row(params![project], |row| row.get(0))
            .optional()?)
    }

    // ---- events -------------------------------------------------------------------

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

    /// Counts of VMs per observed state, for /metrics.
    pub fn vm_state_counts(&self) -> Vec<(VmState, u64)> {
        self.index().counts().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(n: u128, project: &str) -> (VmRecord, NewEvent) {
        let record = VmRecord {
            id: VmId::from_u128(n),
            name: format!("vm-{n}"),
            project: project.into(),
            hypervisor: "sim".into(),
            vcpus: 1,
            memory_mib: 64,
            image: "default".into(),
            command: vec![],
            policy: PolicySpec::default(),
            keep_running: false,
            host: None,
            desired: VmState::Running,
            generation: 1,
            issued_generation: 0,
            observed: VmState::Pending,
            observed_at_ms: 0,
            last_error: None,
            deleting: false,
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        (record, NewEvent::default())
    }

    fn observed(n: u128, state: VmState, purge: bool) -> Observation {
        Observation {
            vm: VmId::from_u128(n),
            state,
            purge,
            events: vec![],
        }
    }

    /// Pages per state (all projects, and project `b`) and the host's reported VMs.
    type Answers = (Vec<(VmState, Vec<VmId>, Vec<VmId>)>, Vec<(VmId, VmState)>);

    /// What the store answers from its in-memory index.
    fn answers(store: &Store, host: HostId) -> Answers {
        let ids = |filter: VmFilter| -> Vec<VmId> {
            let page = store.list_vms(&filter).expect("list");
            page.into_iter().map(|vm| vm.id).collect()
        };
        let mut on_host = store.vms_on(host);
        on_host.sort();
        let pages = [
            VmState::Pending,
            VmState::Scheduled,
            VmState::Running,
            VmState::Paused,
            VmState::Unknown,
        ]
        .into_iter()
        .map(|state| {
            let all = ids(VmFilter {
                state: Some(state),
                limit: 100,
                ..VmFilter::default()
            });
            let in_b = ids(VmFilter {
                state: Some(state),
                projects: Some(vec!["b".into()]),
                limit: 100,
                ..VmFilter::default()
            });
            (state, all, in_b)
        })
        .collect();
        (pages, on_host)
    }

    /// Placement, reports, a host marked down and a purge keep the in-memory index as a
    /// fresh load from the rows would build it, and as SQL over the rows answers.
    #[test]
    fn index_kept_in_step_answers_as_the_rows_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("herd.db");
        let store = Store::open(&path).expect("open");
        let vms: Vec<_> = (1..=6)
            .map(|n| vm(n, if n % 2 == 0 { "a" } else { "b" }))
            .collect();
        store.insert_vms(&vms).expect("insert");
        let (host, other) = (HostId::from_u128(100), HostId::from_u128(200));
        for (n, on) in [(1, host), (2, host), (3, host), (4, other)] {
            store
                .assign_host(VmId::from_u128(n), on, &NewEvent::default())
                .expect("place");
        }
        store
            .assign_host(VmId::from_u128(1), other, &NewEvent::default())
            .expect("placing twice changes nothing");
        store
            .observe(&[
                observed(1, VmState::Running, false),
                observed(2, VmState::Paused, false),
                observed(3, VmState::Running, false),
                observed(4, VmState::Running, false),
            ])
            .expect("observe");
        store.host_down(host, "test").expect("down");
        store
            .observe(&[
                observed(3, VmState::Running, true),
                observed(9, VmState::Running, false),
            ])
            .expect("purge");
        let kept = answers(&store, host);
        let (pages, on_host) = &kept;
        assert_eq!(
            on_host,
            &[
                (VmId::from_u128(1), VmState::Unknown),
                (VmId::from_u128(2), VmState::Unknown)
            ],
            "the host's VMs are unknown once it is marked down"
        );
        assert_eq!(pages[2].1, vec![VmId::from_u128(4)]);
        assert_eq!(pages[0].2, vec![VmId::from_u128(5)], "pending in project b");
        let db = store.reader();
        for (state, ids, _) in pages {
            let mut stmt = db
                .prepare("SELECT id FROM vms WHERE observed_state = ?1 ORDER BY id")
                .expect("prepare");
            let rows: Vec<VmId> = stmt
                .query_map(params![state.as_str()], |row| row.get::<_, String>(0))
                .expect("query")
                .map(|id| parse_uuid(&id.expect("row")).expect("uuid"))
                .collect();
            assert_eq!(&rows, ids, "{state:?}");
        }
        let mut stmt = db
            .prepare(
                "SELECT id, host, vcpus, memory_mib FROM vms WHERE host IS NOT NULL \
                 AND observed_state NOT IN ('terminated', 'purged') ORDER BY id",
            )
            .expect("prepare");
        let rows: Vec<(VmId, HostId, u32, u64)> = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, u32>(2)?,
                    row.get::<_, u64>(3)?,
                ))
            })
            .expect("query")
            .map(|row| {
                let (vm, host, vcpus, memory_mib) = row.expect("row");
                let vm = parse_uuid(&vm).expect("uuid");
                (vm, parse_uuid(&host).expect("uuid"), vcpus, memory_mib)
            })
            .collect();
        let mut shares = store.placed_shares();
        shares.sort();
        assert_eq!(shares, rows);
        drop(stmt);
        drop(db);
        let counts = store.vm_state_counts();
        drop(store);
        let reopened = Store::open(&path).expect("reopen");
        assert_eq!(answers(&reopened, host), kept);
        assert_eq!(reopened.vm_state_counts(), counts);
    }

    #[test]
    fn opening_an_older_database_drops_its_state_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("herd.db");
        {
            let db = Connection::open(&path).expect("open");
            db.execute_batch(SCHEMA).expect("schema");
            db.execute_batch(
                "CREATE INDEX vms_by_state ON vms (observed_state, id);
                 CREATE INDEX vms_by_project_state ON vms (project, observed_state, id);",
            )
            .expect("old indexes");
        }
        let store = Store::open(&path).expect("open");
        let left: i64 = store
            .reader()
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' \
                 AND name IN ('vms_by_state', 'vms_by_project_state')",
                [],
                |row| row.get(0),
            )
            .expect("count");
        assert_eq!(left, 0);
    }
}

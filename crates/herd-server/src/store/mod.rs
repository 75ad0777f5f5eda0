//! The server's durable state in SQLite.
//!
//! WAL mode with `synchronous=FULL`: a write the API acknowledged survives a kill -9 of
//! the server or a power loss. Desired state (what users asked for, with a generation
//! that bumps on every change) and observed state (what agents report) are separate
//! columns, as Kubernetes separates spec and status; the reconciler drives one toward
//! the other. Only this module writes SQL.

mod broadcasts;
mod bursts;
mod events;
mod hosts;
mod jobs;
mod metering;
mod migrations;
mod resizes;
mod rows;
mod schema;
mod tenancy;
mod tokens;
mod vm_index;
mod vms;

pub use bursts::BurstRow;
pub use events::{EventRecord, EventScope, NewEvent};
pub use metering::{LedgerVm, UsageRow};
pub use tenancy::{
    AuditFilter, AuditRow, MemberRow, ProjectRow, Quota, TenancyRows, TokenRow, UserRow,
};
pub use vm_index::Allocation;

use herd_proto::policy::PolicySpec;
use herd_proto::wire::{HostId, HypervisorInfo, VmId};
use herd_proto::VmState;
use parking_lot::Mutex;
use rusqlite::Connection;
use schema::{load_index, migrate, SCHEMA};
use std::path::Path;
use vm_index::VmIndex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed; the source is its own error. Callers never see which engine.
    #[error("database error")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("a VM named {name:?} already exists in project {project:?}")]
    NameTaken { project: String, name: String },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Engine(Box::new(e))
    }
}

/// The wall clock in the store's unit (signed unix milliseconds, as SQLite keeps them).
pub fn now_ms() -> i64 {
    i64::try_from(herd_proto::clock::unix_ms()).unwrap_or(i64::MAX)
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
    /// The data disk's size in MiB; 0 for none.
    pub disk_mib: u64,
    /// A broadcast's copy: made from that broadcast's snapshot on its host.
    pub seed: Option<uuid::Uuid>,
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
    /// Free-form; `region`, `zone` and `rack` place the host in the proximity tree.
    pub labels: herd_topology::Labels,
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

/// A change of observed state to write, with the events that explain it.
#[derive(Debug, Clone)]
pub struct Observation {
    pub vm: VmId,
    pub state: VmState,
    /// Remove the row (the VM was deleted and is now gone from its host).
    pub purge: bool,
    pub events: Vec<NewEvent>,
    /// The host that reported it: the change applies only while the VM is still on
    /// that host, so a report from a VM's old host that reaches the disk after the VM
    /// moved (a migration's commit) changes nothing. `None` for the server's own marks.
    pub host: Option<HostId>,
}

/// Page cache sizes, in KiB as negative `cache_size` values.
const WRITER_CACHE_KIB: i64 = -128 * 1024;

const READER_CACHE_KIB: i64 = -32 * 1024;

/// Read connections. Each costs its page cache; three keep the ingest's lookups, a
/// reconnect wave's seeding and the API's listings from queueing behind each other.
const READERS: usize = 3;

/// Changes applied to the in-memory index per hold of its lock.
pub(super) const INDEX_SLICE: usize = 2_000;

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
        db.execute_batch(tenancy::SCHEMA)?;
        migrate(&db)?;
        db.execute_batch(migrations::SCHEMA)?;
        db.execute_batch(resizes::SCHEMA)?;
        db.execute_batch(bursts::SCHEMA)?;
        db.execute_batch(broadcasts::SCHEMA)?;
        db.execute_batch(jobs::SCHEMA)?;
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

    pub(super) fn index(&self) -> parking_lot::MutexGuard<'_, VmIndex> {
        // Its changes are plain collection updates that do not panic midway.
        self.index.lock()
    }

    pub(super) fn db(&self) -> parking_lot::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written: transactions
        // roll back. Keep serving.
        self.db.lock()
    }

    /// A read-only connection, for lookups and listings.
    pub(super) fn reader(&self) -> parking_lot::MutexGuard<'_, Connection> {
        // A free one if there is one, else wait for the next in turn.
        for reader in &self.readers {
            if let Some(guard) = reader.try_lock() {
                return guard;
            }
        }
        let turn = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.readers[turn % self.readers.len()].lock()
    }
}

#[cfg(test)]
mod tests {
    use super::rows::parse_uuid;
    use super::*;
    use rusqlite::params;

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
            disk_mib: 0,
            seed: None,
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
            host: None,
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

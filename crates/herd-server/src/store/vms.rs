//! VM rows: desired state as users change it, observed state as hosts report it, and
//! the reconciler's questions.

use super::events::{insert_event, NewEvent};
use super::metering::{insert_usage_rows, UsageRow};
use super::rows::{collect_vms, in_list, parse_state, parse_uuid, vm_from_row, VM_COLUMNS};
use super::vm_index::IndexedVm;
use super::{now_ms, Observation, Store, StoreError, VmBrief, VmFilter, VmRecord, INDEX_SLICE};
use herd_proto::wire::{HostId, VmId};
use herd_proto::VmState;
use rusqlite::{params, OptionalExtension};

impl Store {
    /// Inserts VMs, each with its event, in one transaction: all or none.
    pub fn insert_vms(&self, vms: &[(VmRecord, NewEvent)]) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for (vm, event) in vms {
            let result = tx
                .prepare_cached(&format!(
                    "INSERT INTO vms ({VM_COLUMNS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"
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
                    vm.disk_mib as i64,
                    vm.seed.map(|s| s.to_string()),
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
                hypervisor: &vm.hypervisor,
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
    pub(super) fn vms_by_id(&self, ids: &[VmId]) -> Result<Vec<VmRecord>, StoreError> {
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

    /// What each project's VMs of each type hold per host (see
    /// [`super::vm_index::VmIndex::allocations`]).
    pub fn allocations(&self, project: Option<&str>) -> Vec<super::Allocation> {
        self.index().allocations(project)
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

    /// Running jobs with a deadline (the duplicate-on-deadline policy).
    pub fn vms_with_deadline(&self) -> Result<Vec<VmRecord>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(&format!(
            "SELECT {VM_COLUMNS} FROM vms INDEXED BY vms_with_deadline \
             WHERE json_extract(policy, '$.deadline') IS NOT NULL \
             AND desired_state = 'running'"
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
        // Which observations still applied when they were written (see
        // `Observation::host`).
        let mut applied = Vec::with_capacity(observations.len());
        for obs in observations {
            let host = obs.host.map(|h| h.to_string());
            let changed = if obs.purge {
                tx.prepare_cached("DELETE FROM vms WHERE id = ?1 AND (?2 IS NULL OR host = ?2)")?
                    .execute(params![obs.vm.to_string(), host])?
            } else {
                tx.prepare_cached(
                    "UPDATE vms SET observed_state = ?2, observed_at = ?3, updated_at = ?3 \
                     WHERE id = ?1 AND (?4 IS NULL OR host = ?4)",
                )?
                .execute(params![
                    obs.vm.to_string(),
                    obs.state.as_str(),
                    now,
                    host
                ])?
            };
            if changed == 0 && obs.host.is_some() {
                continue;
            }
            applied.push(obs);
            for event in &obs.events {
                insert_event(&tx, event, now)?;
            }
        }
        let n_new = insert_usage_rows(&tx, samples)?;
        tx.commit()?;
        // In slices: a batch of a hundred thousand changes would hold the index from
        // listings and reconnecting hosts for a good part of a second.
        for slice in applied.chunks(INDEX_SLICE) {
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

    /// Counts of VMs per observed state, for /metrics.
    pub fn vm_state_counts(&self) -> Vec<(VmState, u64)> {
        self.index().counts().collect()
    }

    /// How many VMs of these projects are in each state; states with none are left out.
    pub fn vm_state_counts_in(
        &self,
        projects: &[String],
    ) -> Result<Vec<(VmState, u64)>, StoreError> {
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let marks = in_list(&mut args, projects);
        let db = self.reader();
        let mut stmt = db.prepare(&format!(
            "SELECT observed_state, COUNT(*) FROM vms WHERE project IN ({marks}) GROUP BY observed_state"
        ))?;
        let mut out = Vec::new();
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (state, n) = row?;
            out.push((parse_state(&state)?, n.max(0) as u64));
        }
        Ok(out)
    }
}

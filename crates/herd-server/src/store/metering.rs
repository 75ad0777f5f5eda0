//! Usage samples, the ledger bills are made from, state history and rate cards.

use super::bursts::BurstRow;
use super::rows::{parse_state, parse_uuid};
use super::{now_ms, Store, StoreError};
use herd_proto::wire::VmId;
use herd_proto::VmState;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashMap, HashSet};

/// Stores usage samples inside a transaction; see [`Store::insert_usage`].
pub(super) fn insert_usage_rows(
    db: &Connection,
    samples: &[(VmId, UsageRow)],
) -> Result<usize, StoreError> {
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

/// One usage sample as metered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageRow {
    pub sampled_at_ms: i64,
    pub cpu_ms: u64,
    pub mem_kib: u64,
    pub net_bytes: u64,
    pub disk_bytes: u64,
}

/// Per VM, what a bill needs besides its usage samples (see [`Store::ledger_history`]).
#[derive(Debug, Default)]
pub struct LedgerHistory {
    /// Every memory size it had, with since when.
    pub sizes: HashMap<VmId, Vec<(i64, u64)>>,
    pub bursts: HashMap<VmId, Vec<BurstRow>>,
    /// Its observed states over time, oldest first.
    pub states: HashMap<VmId, Vec<(i64, VmState)>>,
    /// The VMs that have usage samples at all.
    pub sampled: HashSet<VmId>,
}

/// A VM as billing remembers it, after its record is gone too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerVm {
    pub vm: VmId,
    pub name: String,
    pub project: String,
    pub vcpus: u32,
    /// The memory it was launched with.
    pub memory_mib: u64,
    /// Its later memory sizes, each from when its resize was sent (ms), oldest first.
    pub resized: Vec<(i64, u64)>,
    /// Its bursts, oldest first.
    pub bursts: Vec<super::BurstRow>,
}

impl LedgerVm {
    /// The memory the VM held at `at_ms`.
    pub fn memory_at(&self, at_ms: i64) -> u64 {
        self.resized
            .iter()
            .take_while(|(since, _)| *since <= at_ms)
            .last()
            .map_or(self.memory_mib, |(_, memory_mib)| *memory_mib)
    }
}

impl Store {
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
        let rows = stmt.query_map(params![project], ledger_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row??);
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
        let rows = stmt.query_map(params![vm.to_string(), to_ms], usage_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One VM's ledger row, if it has one.
    pub fn ledger_vm(&self, vm: VmId) -> Result<Option<LedgerVm>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT vm, name, project, vcpus, memory_mib FROM vm_ledger WHERE vm = ?1",
        )?;
        let row = stmt
            .query_row(params![vm.to_string()], ledger_from_row)
            .optional()?;
        row.transpose()
    }

    /// What billing reads of every VM in the ledger (of one project, or all): one query
    /// per table, where a query per VM made a bill of 10,000 VMs take 100 ms a pass.
    pub fn ledger_history(&self, project: Option<&str>) -> Result<LedgerHistory, StoreError> {
        const OF: &str = "(?1 IS NULL OR vm IN (SELECT vm FROM vm_ledger WHERE project = ?1))";
        let db = self.reader();
        let mut history = LedgerHistory::default();
        let mut stmt = db.prepare_cached(&format!(
            "SELECT vm, at, memory_mib FROM vm_sizes WHERE {OF} ORDER BY vm, at, rowid"
        ))?;
        let rows = stmt.query_map(params![project], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (vm, at, memory_mib) = row?;
            history
                .sizes
                .entry(parse_uuid(&vm)?)
                .or_default()
                .push((at, memory_mib.max(0) as u64));
        }
        let mut stmt = db.prepare_cached(&format!(
            "SELECT vm, cpus, memory_mib, granted_at, COALESCE(ended_at, expires_at) FROM bursts \
             WHERE {OF} ORDER BY vm, granted_at"
        ))?;
        let rows = stmt.query_map(params![project], |row| {
            Ok((
                row.get::<_, String>(0)?,
                BurstRow {
                    cpus: row.get(1)?,
                    memory_mib: row.get::<_, i64>(2)?.max(0) as u64,
                    from_ms: row.get(3)?,
                    to_ms: row.get(4)?,
                },
            ))
        })?;
        for row in rows {
            let (vm, burst) = row?;
            history
                .bursts
                .entry(parse_uuid(&vm)?)
                .or_default()
                .push(burst);
        }
        let mut stmt = db.prepare_cached(&format!(
            "SELECT vm, time, to_state FROM events \
             WHERE to_state IS NOT NULL AND vm IS NOT NULL AND {OF} ORDER BY id"
        ))?;
        let rows = stmt.query_map(params![project], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (vm, time, state) = row?;
            history
                .states
                .entry(parse_uuid(&vm)?)
                .or_default()
                .push((time, parse_state(&state)?));
        }
        let mut stmt =
            db.prepare_cached(&format!("SELECT DISTINCT vm FROM usage_samples WHERE {OF}"))?;
        let rows = stmt.query_map(params![project], |row| row.get::<_, String>(0))?;
        for vm in rows {
            history.sampled.insert(parse_uuid(&vm?)?);
        }
        Ok(history)
    }

    /// A VM's latest `limit` usage samples, oldest first.
    pub fn recent_usage(&self, vm: VmId, limit: usize) -> Result<Vec<UsageRow>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT sampled_at, cpu_ms, mem_kib, net_bytes, disk_bytes FROM usage_samples \
             WHERE vm = ?1 ORDER BY sampled_at DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![vm.to_string(), limit as i64], usage_from_row)?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
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
}

fn usage_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UsageRow> {
    Ok(UsageRow {
        sampled_at_ms: row.get(0)?,
        cpu_ms: row.get::<_, i64>(1)? as u64,
        mem_kib: row.get::<_, i64>(2)? as u64,
        net_bytes: row.get::<_, i64>(3)? as u64,
        disk_bytes: row.get::<_, i64>(4)? as u64,
    })
}

fn ledger_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<LedgerVm, StoreError>> {
    let vm: String = row.get(0)?;
    let name: String = row.get(1)?;
    let project: String = row.get(2)?;
    let vcpus: i64 = row.get(3)?;
    let memory_mib: i64 = row.get(4)?;
    Ok(parse_uuid(&vm).map(|vm| LedgerVm {
        vm,
        name,
        project,
        vcpus: vcpus as u32,
        memory_mib: memory_mib as u64,
        resized: Vec::new(),
        bursts: Vec::new(),
    }))
}

//! Usage samples, the ledger bills are made from, state history and rate cards.

use super::rows::{parse_state, parse_uuid};
use super::{now_ms, Store, StoreError};
use herd_proto::wire::VmId;
use herd_proto::VmState;
use rusqlite::{params, Connection, OptionalExtension};

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
                resized: Vec::new(),
                bursts: Vec::new(),
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
}

//! Jobs past their deadline, each row the whole record (its copies' broadcast, the
//! winner), so a restarted server neither duplicates a job twice nor forgets its
//! result.

use super::{Store, StoreError};
use crate::jobs::plan::Job;
use rusqlite::params;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    vm TEXT PRIMARY KEY,
    active INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (vm) WHERE active = 1;
";

impl Store {
    pub fn save_job(&self, job: &Job) -> Result<(), StoreError> {
        let body = serde_json::to_string(job)
            .map_err(|e| StoreError::Corrupt(format!("job {} does not encode: {e}", job.vm)))?;
        self.db()
            .prepare_cached(
                "INSERT INTO jobs (vm, active, body) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (vm) DO UPDATE SET active = ?2, body = ?3",
            )?
            .execute(params![job.vm.to_string(), job.is_active() as i64, body])?;
        Ok(())
    }

    /// Every job ever duplicated (few: one per job that missed its deadline).
    pub fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        self.query_records("SELECT vm, body FROM jobs", [], "job")
    }
}

//! Users, projects, roles, API tokens, quotas and the audit log.
//!
//! These tables are small and read on every request, so the server keeps them in
//! memory ([`crate::tenancy`]) and comes here only to write, then reloads. Writes that
//! must hold together (deleting a user revokes their tokens and roles) are one
//! transaction.

use super::{now_ms, Store, StoreError};
use crate::access::Role;
use rusqlite::{params, Connection, OptionalExtension};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    cloud_admin INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    max_vms INTEGER,
    max_vcpus INTEGER,
    max_memory_mib INTEGER,
    budget_micros INTEGER,
    burst TEXT
);
CREATE TABLE IF NOT EXISTS members (
    project TEXT NOT NULL REFERENCES projects (name) ON DELETE CASCADE,
    user TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    role TEXT NOT NULL,
    PRIMARY KEY (project, user)
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    label TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    object TEXT NOT NULL,
    project TEXT,
    status INTEGER NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_project ON audit (project, id);
CREATE INDEX IF NOT EXISTS vms_by_project ON vms (project);
";

/// A quota's burst limits as stored: JSON, or NULL for the defaults.
fn burst_text(quota: &Quota) -> Result<Option<String>, StoreError> {
    quota
        .burst
        .map(|limits| serde_json::to_string(&limits))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("burst limits do not encode: {e}")))
}

/// The first admin and the default project on a new database; a project for every
/// project name VMs of an older herd already carry.
pub(super) fn bootstrap(db: &Connection) -> Result<(), StoreError> {
    let now = now_ms();
    db.execute(
        "INSERT OR IGNORE INTO projects (name, created_at) VALUES ('default', ?1)",
        params![now],
    )?;
    db.execute(
        "INSERT OR IGNORE INTO projects (name, created_at) SELECT DISTINCT project, ?1 FROM vms",
        params![now],
    )?;
    db.execute(
        "INSERT OR IGNORE INTO users (name, cloud_admin, created_at) VALUES ('admin', 1, ?1)",
        params![now],
    )?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub name: String,
    pub cloud_admin: bool,
    pub created_at_ms: i64,
}

/// A project's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub max_vms: Option<u64>,
    pub max_vcpus: Option<u64>,
    pub max_memory_mib: Option<u64>,
    /// Spend over the last 30 days, in micro-units of the currency.
    pub budget_micros: Option<i64>,
    /// The most a VM may burst by; `None` is the default limits.
    pub burst: Option<herd_proto::burst::BurstLimits>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRow {
    pub name: String,
    pub created_at_ms: i64,
    pub quota: Quota,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub project: String,
    pub user: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub user: String,
    pub label: String,
    /// A PHC string (argon2id), or `sha256$<hex>` for an admin token made before
    /// herd had users.
    pub hash: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

/// Everything the in-memory access cache holds.
#[derive(Debug, Clone, Default)]
pub struct TenancyRows {
    pub users: Vec<UserRow>,
    pub projects: Vec<ProjectRow>,
    pub members: Vec<MemberRow>,
    pub tokens: Vec<TokenRow>,
}

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: i64,
    pub time_ms: i64,
    pub actor: String,
    pub action: String,
    pub object: String,
    pub project: Option<String>,
    pub status: u16,
    pub result: String,
}

/// Which audit rows to read: newest first, before the cursor.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// `None`: every project and the cloud-wide rows.
    pub projects: Option<Vec<String>>,
    pub actor: Option<String>,
    pub before: Option<i64>,
    pub limit: usize,
}

fn opt_u64(value: Option<i64>) -> Option<u64> {
    value.map(|v| v.max(0) as u64)
}

fn opt_i64(value: Option<u64>) -> Option<i64> {
    value.map(|v| v.min(i64::MAX as u64) as i64)
}

impl Store {
    pub fn tenancy(&self) -> Result<TenancyRows, StoreError> {
        let db = self.db();
        let mut out = TenancyRows::default();
        let mut stmt = db.prepare_cached("SELECT name, cloud_admin, created_at FROM users")?;
        for row in stmt.query_map([], |row| {
            Ok(UserRow {
                name: row.get(0)?,
                cloud_admin: row.get::<_, i64>(1)? != 0,
                created_at_ms: row.get(2)?,
            })
        })? {
            out.users.push(row?);
        }
        let mut stmt = db.prepare_cached(
            "SELECT name, created_at, max_vms, max_vcpus, max_memory_mib, budget_micros, burst \
             FROM projects",
        )?;
        for row in stmt.query_map([], |row| {
            Ok(ProjectRow {
                name: row.get(0)?,
                created_at_ms: row.get(1)?,
                quota: Quota {
                    max_vms: opt_u64(row.get(2)?),
                    max_vcpus: opt_u64(row.get(3)?),
                    max_memory_mib: opt_u64(row.get(4)?),
                    budget_micros: row.get(5)?,
                    burst: row
                        .get::<_, Option<String>>(6)?
                        .and_then(|text| serde_json::from_str(&text).ok()),
                },
            })
        })? {
            out.projects.push(row?);
        }
        let mut stmt = db.prepare_cached("SELECT project, user, role FROM members")?;
        for row in stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
            ))
        })? {
            let (project, user, role) = row?;
            let role = Role::parse(&role)
                .ok_or_else(|| StoreError::Corrupt(format!("bad role {role:?}")))?;
            out.members.push(MemberRow {
                project,
                user,
                role,
            });
        }
        let mut stmt = db.prepare_cached(
            "SELECT id, user, label, hash, created_at, expires_at, revoked_at FROM api_tokens",
        )?;
        for row in stmt.query_map([], |row| {
            Ok(TokenRow {
                id: row.get(0)?,
                user: row.get(1)?,
                label: row.get(2)?,
                hash: row.get(3)?,
                created_at_ms: row.get(4)?,
                expires_at_ms: row.get(5)?,
                revoked_at_ms: row.get(6)?,
            })
        })? {
            out.tokens.push(row?);
        }
        Ok(out)
    }

    /// Creates a user; false if the name is taken.
    pub fn insert_user(&self, name: &str, cloud_admin: bool) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "INSERT OR IGNORE INTO users (name, cloud_admin, created_at) VALUES (?1, ?2, ?3)",
            params![name, cloud_admin as i64, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// Deletes a user with their roles, and revokes their tokens; false if unknown.
    pub fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let n = tx.execute("DELETE FROM users WHERE name = ?1", params![name])?;
        tx.execute("DELETE FROM members WHERE user = ?1", params![name])?;
        tx.execute(
            "UPDATE api_tokens SET revoked_at = ?2 WHERE user = ?1 AND revoked_at IS NULL",
            params![name, now_ms()],
        )?;
        tx.commit()?;
        Ok(n == 1)
    }

    /// Creates a project; false if the name is taken.
    pub fn insert_project(&self, name: &str, quota: &Quota) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "INSERT OR IGNORE INTO projects \
             (name, created_at, max_vms, max_vcpus, max_memory_mib, budget_micros, burst) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                name,
                now_ms(),
                opt_i64(quota.max_vms),
                opt_i64(quota.max_vcpus),
                opt_i64(quota.max_memory_mib),
                quota.budget_micros,
                burst_text(quota)?
            ],
        )?;
        Ok(n == 1)
    }

    pub fn set_quota(&self, project: &str, quota: &Quota) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "UPDATE projects SET max_vms = ?2, max_vcpus = ?3, max_memory_mib = ?4, \
             budget_micros = ?5, burst = ?6 WHERE name = ?1",
            params![
                project,
                opt_i64(quota.max_vms),
                opt_i64(quota.max_vcpus),
                opt_i64(quota.max_memory_mib),
                quota.budget_micros,
                burst_text(quota)?
            ],
        )?;
        Ok(n == 1)
    }

    /// Deletes a project that holds no VMs. `Ok(None)` if unknown, `Ok(Some(n))` with
    /// the number of VMs that keep it alive (0 when deleted).
    pub fn delete_project(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let vms: i64 = tx.query_row(
            "SELECT COUNT(*) FROM vms WHERE project = ?1",
            params![name],
            |row| row.get(0),
        )?;
        if vms > 0 {
            return Ok(Some(vms as u64));
        }
        let n = tx.execute("DELETE FROM projects WHERE name = ?1", params![name])?;
        tx.execute("DELETE FROM members WHERE project = ?1", params![name])?;
        tx.commit()?;
        Ok((n == 1).then_some(0))
    }

    pub fn set_member(&self, project: &str, user: &str, role: Role) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO members (project, user, role) VALUES (?1, ?2, ?3) \
             ON CONFLICT (project, user) DO UPDATE SET role = excluded.role",
            params![project, user, role.as_str()],
        )?;
        Ok(())
    }

    pub fn remove_member(&self, project: &str, user: &str) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "DELETE FROM members WHERE project = ?1 AND user = ?2",
            params![project, user],
        )?;
        Ok(n == 1)
    }

    pub fn insert_api_token(&self, token: &TokenRow) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO api_tokens (id, user, label, hash, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                token.id,
                token.user,
                token.label,
                token.hash,
                token.created_at_ms,
                token.expires_at_ms
            ],
        )?;
        Ok(())
    }

    /// Revokes a token; false if it is unknown or revoked already.
    pub fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// Admin tokens of a herd that had no users yet, as (sha256 hex) hashes.
    pub fn legacy_admin_token(&self, hash: &str) -> Result<bool, StoreError> {
        Ok(self
            .reader()
            .prepare_cached("SELECT 1 FROM tokens WHERE hash = ?1 AND kind = 'admin'")?
            .query_row(params![hash], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// VMs, vCPUs and MiB a project holds now (every VM not yet purged counts).
    pub fn project_usage(&self, project: &str) -> Result<(u64, u64, u64), StoreError> {
        let (n, vcpus, mem): (i64, i64, i64) = self
            .reader()
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0) \
                 FROM vms WHERE project = ?1",
            )?
            .query_row(params![project], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?;
        Ok((n.max(0) as u64, vcpus.max(0) as u64, mem.max(0) as u64))
    }

    pub fn append_audit(&self, row: &AuditRow) -> Result<(), StoreError> {
        self.db()
            .prepare_cached(
                "INSERT INTO audit (time, actor, action, object, project, status, result) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                row.time_ms,
                row.actor,
                row.action,
                row.object,
                row.project,
                row.status,
                row.result
            ])?;
        Ok(())
    }

    pub fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, StoreError> {
        let mut sql = String::from(
            "SELECT id, time, actor, action, object, project, status, result FROM audit WHERE 1=1",
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(projects) = &filter.projects {
            let marks = super::rows::in_list(&mut args, projects);
            sql.push_str(&format!(" AND project IN ({marks})"));
        }
        if let Some(actor) = &filter.actor {
            args.push(actor.clone().into());
            sql.push_str(&format!(" AND actor = ?{}", args.len()));
        }
        if let Some(before) = filter.before {
            args.push(before.into());
            sql.push_str(&format!(" AND id < ?{}", args.len()));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", filter.limit));
        let db = self.db();
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |row| {
            Ok(AuditRow {
                id: row.get(0)?,
                time_ms: row.get(1)?,
                actor: row.get(2)?,
                action: row.get(3)?,
                object: row.get(4)?,
                project: row.get(5)?,
                status: row.get::<_, i64>(6)?.clamp(0, 999) as u16,
                result: row.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

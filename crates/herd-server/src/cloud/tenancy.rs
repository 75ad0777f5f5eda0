//! Users, projects, roles and API tokens: kept in memory, written through to the store.
//!
//! Every API request needs its caller's roles, so reading them from SQLite each time
//! would put a query (and, for a new token, an argon2 hash) on every request. The
//! tables are small, so the whole of them lives here, behind one lock, and every write
//! goes to the store first and then reloads this copy: the store stays the truth and a
//! restart loses nothing.

use crate::access::{Denied, Perm, Principal, Role};
use crate::auth::{self, Identity};
use crate::billing::format_money;
use crate::cloud::{valid_name, Cloud, CloudError};
use crate::store::{
    now_ms, AuditFilter, AuditRow, ProjectRow, Quota, Store, StoreError, TokenRow, UserRow,
};
use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tracing::{info, warn};

/// Verified tokens remembered at most; past it the memory is cleared, which only costs
/// one argon2 hash per token on its next use.
const MAX_VERIFIED: usize = 10_000;

/// The longest an API token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 86_400);

#[derive(Debug, Default)]
struct Tables {
    users: HashMap<String, UserRow>,
    projects: BTreeMap<String, ProjectRow>,
    /// user -> project -> role
    roles: HashMap<String, BTreeMap<String, Role>>,
    tokens: HashMap<String, TokenRow>,
}

pub struct Tenancy {
    tables: RwLock<Tables>,
    /// SHA-256 of tokens whose argon2 hash matched, with their id.
    verified: Mutex<HashMap<[u8; 32], String>>,
}

impl Tenancy {
    pub fn load(store: &Store) -> Result<Tenancy, StoreError> {
        let tenancy = Tenancy {
            tables: RwLock::new(Tables::default()),
            verified: Mutex::new(HashMap::new()),
        };
        tenancy.reload(store)?;
        Ok(tenancy)
    }

    fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let rows = store.tenancy()?;
        let mut tables = Tables::default();
        for user in rows.users {
            tables.users.insert(user.name.clone(), user);
        }
        for project in rows.projects {
            tables.projects.insert(project.name.clone(), project);
        }
        for member in rows.members {
            tables
                .roles
                .entry(member.user)
                .or_default()
                .insert(member.project, member.role);
        }
        for token in rows.tokens {
            tables.tokens.insert(token.id.clone(), token);
        }
        *self.tables.write() = tables;
        // A revoked token or a deleted user must not live on in the memory of
        // verified tokens.
        let tables = self.tables.read();
        self.verified.lock().retain(|_, id| {
            tables
                .tokens
                .get(id)
                .is_some_and(|t| t.revoked_at_ms.is_none() && tables.users.contains_key(&t.user))
        });
        Ok(())
    }

    fn principal_in(tables: &Tables, user: &str) -> Option<Principal> {
        let row = tables.users.get(user)?;
        Some(Principal {
            user: row.name.clone(),
            cloud_admin: row.cloud_admin,
            roles: tables.roles.get(user).cloned().unwrap_or_default(),
        })
    }

    /// The user an API token belongs to, if it is valid now.
    pub fn authenticate(&self, token: &str, now_ms: i64) -> Option<Principal> {
        let id = auth::api_token_id(token)?;
        let (user, hash) = {
            let tables = self.tables.read();
            let row = tables.tokens.get(id)?;
            if row.revoked_at_ms.is_some() || row.expires_at_ms.is_some_and(|at| at <= now_ms) {
                return None;
            }
            (row.user.clone(), row.hash.clone())
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let known = self.verified.lock().get(&digest).is_some_and(|v| v == id);
        if !known {
            if !auth::verify_api_token(token, &hash) {
                return None;
            }
            let mut verified = self.verified.lock();
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(digest, id.to_owned());
        }
        Tenancy::principal_in(&self.tables.read(), &user)
    }

    pub fn principal(&self, user: &str) -> Option<Principal> {
        Tenancy::principal_in(&self.tables.read(), user)
    }

    pub fn project(&self, name: &str) -> Option<ProjectRow> {
        self.tables.read().projects.get(name).cloned()
    }

    /// The most a VM of the project may burst by: what an admin set, else the defaults.
    pub fn burst_limits(&self, project: &str) -> herd_proto::burst::BurstLimits {
        self.tables
            .read()
            .projects
            .get(project)
            .and_then(|p| p.quota.burst)
            .unwrap_or_default()
    }

    pub fn projects(&self) -> Vec<ProjectRow> {
        self.tables.read().projects.values().cloned().collect()
    }

    pub fn members(&self, project: &str) -> Vec<(String, Role)> {
        let tables = self.tables.read();
        let mut out: Vec<(String, Role)> = tables
            .roles
            .iter()
            .filter_map(|(user, roles)| roles.get(project).map(|&role| (user.clone(), role)))
            .collect();
        out.sort();
        out
    }

    pub fn users(&self) -> Vec<UserRow> {
        let mut out: Vec<UserRow> = self.tables.read().users.values().cloned().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn tokens_of(&self, user: Option<&str>) -> Vec<TokenRow> {
        let mut out: Vec<TokenRow> = self
            .tables
            .read()
            .tokens
            .values()
            .filter(|t| user.is_none_or(|u| t.user == u))
            .cloned()
            .collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        out
    }

    pub fn token(&self, id: &str) -> Option<TokenRow> {
        self.tables.read().tokens.get(id).cloned()
    }
}

/// What a denial looks like to the caller: another project's object does not exist.
pub fn denied(denied: Denied, kind: &'static str, id: &str) -> CloudError {
    match denied {
        Denied::Hidden => CloudError::NotFound {
            kind,
            id: id.to_owned(),
        },
        Denied::Forbidden => CloudError::Forbidden,
    }
}

fn check_name(field: &'static str, name: &str) -> Result<(), CloudError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(CloudError::Invalid {
            field,
            message: "use 1 to 63 lowercase letters, digits and '-', not starting with '-'".into(),
        })
    }
}

fn conflict(code: &'static str, message: String) -> CloudError {
    CloudError::Conflict { code, message }
}

/// A token as created: its row and the secret, shown once.
pub struct NewToken {
    pub row: TokenRow,
    pub secret: String,
}

impl Cloud {
    /// Who is calling, from the bearer token.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<Identity, CloudError> {
        let token = bearer.ok_or(CloudError::Unauthorized)?;
        if let Some(principal) = self.tenancy.authenticate(token, now_ms()) {
            return Ok(Identity::User(principal));
        }
        if auth::api_token_id(token).is_none() {
            let hash = auth::hash_token(token);
            if let Some(host) = self.store.host_by_token(&hash)? {
                return Ok(Identity::Agent { host });
            }
            if self.store.legacy_admin_token(&hash)? {
                if let Some(admin) = self.tenancy.principal("admin") {
                    return Ok(Identity::User(admin));
                }
            }
        }
        Err(CloudError::Unauthorized)
    }

    /// Records one audited request.
    pub fn record_audit(&self, row: &AuditRow) -> Result<(), CloudError> {
        Ok(self.store.append_audit(row)?)
    }

    /// The audit log, newest first, as `filter` narrows it.
    pub fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, CloudError> {
        Ok(self.store.audit(filter)?)
    }

    /// A project's VMs, vCPUs and memory (MiB) in use.
    pub fn project_usage(&self, project: &str) -> Result<(u64, u64, u64), CloudError> {
        Ok(self.store.project_usage(project)?)
    }

    /// Writes an audit row for something that did not come through a REST route
    /// (a refused agent session, a refused join). Failures are logged, not raised: the
    /// refusal stands either way.
    pub fn audit_system(&self, actor: &str, action: &str, object: &str, status: u16, result: &str) {
        let row = AuditRow {
            id: 0,
            time_ms: now_ms(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            object: object.to_owned(),
            project: None,
            status,
            result: result.to_owned(),
        };
        if let Err(e) = self.store.append_audit(&row) {
            warn!(error = %e, "cannot write the audit log");
        }
    }

    fn reload_tenancy(&self) -> Result<(), CloudError> {
        Ok(self.tenancy.reload(&self.store)?)
    }

    /// Creates the first admin token if no token exists yet; returns it (shown once).
    pub fn ensure_admin_token(&self) -> Result<Option<String>, CloudError> {
        if !self.tenancy.tokens_of(None).is_empty() || self.store.count_tokens("admin")? > 0 {
            return Ok(None);
        }
        let token = self.create_token("admin", "bootstrap", None)?;
        Ok(Some(token.secret))
    }

    pub fn create_user(&self, name: &str, cloud_admin: bool) -> Result<UserRow, CloudError> {
        check_name("name", name)?;
        if !self.store.insert_user(name, cloud_admin)? {
            return Err(conflict("user_exists", format!("user {name:?} exists")));
        }
        self.reload_tenancy()?;
        info!(user = name, cloud_admin, "user created");
        self.tenancy
            .users()
            .into_iter()
            .find(|u| u.name == name)
            .ok_or_else(|| CloudError::NotFound {
                kind: "user",
                id: name.to_owned(),
            })
    }

    pub fn delete_user(&self, name: &str) -> Result<(), CloudError> {
        if self.tenancy.principal(name).is_some_and(|p| p.cloud_admin)
            && self
                .tenancy
                .users()
                .iter()
                .filter(|u| u.cloud_admin)
                .count()
                <= 1
        {
            return Err(conflict(
                "last_admin",
                format!("{name:?} is the last cloud admin; make another first"),
            ));
        }
        if !self.store.delete_user(name)? {
            return Err(CloudError::NotFound {
                kind: "user",
                id: name.to_owned(),
            });
        }
        self.reload_tenancy()?;
        info!(user = name, "user deleted, tokens revoked");
        Ok(())
    }

    /// A new API token for `user`, valid for `ttl` (forever with `None`).
    pub fn create_token(
        &self,
        user: &str,
        label: &str,
        ttl: Option<Duration>,
    ) -> Result<NewToken, CloudError> {
        if self.tenancy.principal(user).is_none() {
            return Err(CloudError::NotFound {
                kind: "user",
                id: user.to_owned(),
            });
        }
        if label.len() > 100 || label.chars().any(char::is_control) {
            return Err(CloudError::Invalid {
                field: "label",
                message: "at most 100 printable characters".into(),
            });
        }
        if ttl.is_some_and(|ttl| ttl.is_zero() || ttl > MAX_TOKEN_TTL) {
            return Err(CloudError::Invalid {
                field: "ttl_seconds",
                message: format!("between 1 and {} seconds", MAX_TOKEN_TTL.as_secs()),
            });
        }
        let (id, secret) = auth::new_api_token();
        let hash = auth::hash_api_token(&secret).map_err(|e| CloudError::Invalid {
            field: "token",
            message: format!("cannot hash the token: {e}"),
        })?;
        let now = now_ms();
        let row = TokenRow {
            id,
            user: user.to_owned(),
            label: label.to_owned(),
            hash,
            created_at_ms: now,
            expires_at_ms: ttl.map(|ttl| now.saturating_add(ttl.as_millis() as i64)),
            revoked_at_ms: None,
        };
        self.store.insert_api_token(&row)?;
        self.reload_tenancy()?;
        Ok(NewToken { row, secret })
    }

    /// Revokes a token: at once, for every request after this one.
    pub fn revoke_token(&self, id: &str) -> Result<(), CloudError> {
        if !self.store.revoke_token(id)? {
            return Err(CloudError::NotFound {
                kind: "token",
                id: id.to_owned(),
            });
        }
        self.reload_tenancy()?;
        Ok(())
    }

    pub fn create_project(&self, name: &str, quota: &Quota) -> Result<ProjectRow, CloudError> {
        check_name("name", name)?;
        if !self.store.insert_project(name, quota)? {
            return Err(conflict(
                "project_exists",
                format!("project {name:?} exists"),
            ));
        }
        self.reload_tenancy()?;
        self.project(name)
    }

    pub fn project(&self, name: &str) -> Result<ProjectRow, CloudError> {
        self.tenancy
            .project(name)
            .ok_or_else(|| CloudError::NotFound {
                kind: "project",
                id: name.to_owned(),
            })
    }

    pub fn set_quota(&self, name: &str, quota: &Quota) -> Result<ProjectRow, CloudError> {
        if !self.store.set_quota(name, quota)? {
            return Err(CloudError::NotFound {
                kind: "project",
                id: name.to_owned(),
            });
        }
        self.reload_tenancy()?;
        self.project(name)
    }

    pub fn delete_project(&self, name: &str) -> Result<(), CloudError> {
        if name == "default" {
            return Err(conflict(
                "project_in_use",
                "the default project cannot be deleted".into(),
            ));
        }
        match self.store.delete_project(name)? {
            None => Err(CloudError::NotFound {
                kind: "project",
                id: name.to_owned(),
            }),
            Some(0) => self.reload_tenancy(),
            Some(n) => Err(conflict(
                "project_in_use",
                format!("project {name:?} still has {n} VMs; delete them first"),
            )),
        }
    }

    pub fn set_member(&self, project: &str, user: &str, role: Role) -> Result<(), CloudError> {
        self.project(project)?;
        if self.tenancy.principal(user).is_none() {
            return Err(CloudError::NotFound {
                kind: "user",
                id: user.to_owned(),
            });
        }
        self.store.set_member(project, user, role)?;
        self.reload_tenancy()
    }

    pub fn remove_member(&self, project: &str, user: &str) -> Result<(), CloudError> {
        if !self.store.remove_member(project, user)? {
            return Err(CloudError::NotFound {
                kind: "member",
                id: format!("{user} in {project}"),
            });
        }
        self.reload_tenancy()
    }

    /// Refuses a launch that would take `project` past its quota. Called under the
    /// placement lock, which every launch holds while it counts and inserts, so two
    /// concurrent launches cannot both squeeze under the limit.
    /// Whether `project` may take `n` more VMs of this size.
    pub(crate) fn check_quota(
        &self,
        project: &str,
        n: u64,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<(), CloudError> {
        self.check_quota_adding(
            project,
            n,
            n.saturating_mul(u64::from(vcpus)),
            n.saturating_mul(memory_mib),
        )
    }

    /// What the project's VMs cost over the last 30 days, bursts included (what its
    /// budget counts), in micro-units.
    pub(crate) fn spent_last_30_days(&self, project: &str) -> Result<u64, CloudError> {
        let now = now_ms();
        Ok(self
            .bill(Some(project), now - 30 * 86_400_000, now)?
            .iter()
            .map(|line| line.cost_micros)
            .sum())
    }

    /// Whether the project may hold `vms` more VMs and `vcpus` and `memory_mib` more
    /// in all (a launch, or a resize that grows a VM).
    pub(crate) fn check_quota_adding(
        &self,
        project: &str,
        n: u64,
        vcpus: u64,
        memory_mib: u64,
    ) -> Result<(), CloudError> {
        let quota = self.project(project)?.quota;
        if quota == Quota::default() {
            return Ok(());
        }
        let (vms, used_vcpus, used_mem) = self.store.project_usage(project)?;
        let over = |what: &str, used: u64, asked: u64, max: Option<u64>| match max {
            Some(max) if used.saturating_add(asked) > max => Err(conflict(
                "quota_exceeded",
                format!("project {project:?} may hold {max} {what}; it holds {used}"),
            )),
            _ => Ok(()),
        };
        over("VMs", vms, n, quota.max_vms)?;
        over("vCPUs", used_vcpus, vcpus, quota.max_vcpus)?;
        over("MiB of memory", used_mem, memory_mib, quota.max_memory_mib)?;
        if let Some(budget) = quota.budget_micros {
            let spent = self.spent_last_30_days(project)?;
            if spent >= budget.max(0) as u64 {
                warn!(project, spent, budget, "launch refused: budget spent");
                return Err(conflict(
                    "quota_exceeded",
                    format!(
                        "project {project:?} has spent {} of its 30-day budget of {}",
                        format_money(spent),
                        format_money(budget.max(0) as u64)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The principal's view of a project, or the right error.
    pub fn project_for(
        &self,
        principal: &Principal,
        name: &str,
        perm: Perm,
    ) -> Result<ProjectRow, CloudError> {
        principal
            .check(name, perm)
            .map_err(|d| denied(d, "project", name))?;
        self.project(name)
    }
}

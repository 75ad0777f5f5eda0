//! Routes for projects, users, roles and API tokens.
//!
//! Cloud admins make users and projects and set quotas; a project's admins grant roles
//! in it; every user manages their own tokens. A token's secret appears in exactly one
//! response, the one that created it.

use super::{ApiError, ApiJson, ApiPath, AppState, CloudAdmin, ErrorBody, User};
use crate::access::{Perm, Role};
use crate::cloud::tenancy::NewToken;
use crate::cloud::CloudError;
use crate::store::{ProjectRow, Quota, TokenRow, UserRow};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use utoipa::ToSchema;

use super::rfc3339;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub user: String,
    pub cloud_admin: bool,
    /// Project -> role.
    pub roles: BTreeMap<String, Role>,
}

/// A project's limits; a missing field is unlimited.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaView {
    pub max_vms: Option<u64>,
    pub max_vcpus: Option<u64>,
    pub max_memory_mib: Option<u64>,
    /// Spend allowed over the last 30 days, in millionths of the currency unit.
    pub budget_micros: Option<u64>,
    /// The most one VM may burst by (absent: +2 vCPUs, +2048 MiB, 3600 s).
    #[serde(default)]
    pub burst: Option<herd_proto::burst::BurstLimits>,
}

impl QuotaView {
    fn of(quota: &Quota) -> QuotaView {
        QuotaView {
            max_vms: quota.max_vms,
            max_vcpus: quota.max_vcpus,
            max_memory_mib: quota.max_memory_mib,
            budget_micros: quota.budget_micros.map(|b| b.max(0) as u64),
            burst: quota.burst,
        }
    }

    fn quota(&self) -> Result<Quota, ApiError> {
        let budget_micros = self
            .budget_micros
            .map(i64::try_from)
            .transpose()
            .map_err(|_| ApiError::bad_request("invalid_request", "budget_micros: too large"))?;
        if let Some(limits) = self.burst {
            if limits.max_seconds > herd_proto::burst::MAX_BURST_SECONDS {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!(
                        "burst.max_seconds: at most {} (a week)",
                        herd_proto::burst::MAX_BURST_SECONDS
                    ),
                ));
            }
        }
        Ok(Quota {
            max_vms: self.max_vms,
            max_vcpus: self.max_vcpus,
            max_memory_mib: self.max_memory_mib,
            budget_micros,
            burst: self.burst,
        })
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UsageView {
    pub vms: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    pub name: String,
    pub created_at: String,
    pub quota: QuotaView,
    /// What the project holds now (shown with the project, not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageView>,
}

impl ProjectView {
    fn of(row: &ProjectRow, usage: Option<UsageView>) -> ProjectView {
        ProjectView {
            name: row.name.clone(),
            created_at: rfc3339(row.created_at_ms),
            quota: QuotaView::of(&row.quota),
            usage,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    pub name: String,
    pub quota: Option<QuotaView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    pub user: String,
    pub role: Role,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutMember {
    pub role: Role,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub name: String,
    pub cloud_admin: bool,
    pub created_at: String,
}

impl UserView {
    fn of(row: &UserRow) -> UserView {
        UserView {
            name: row.name.clone(),
            cloud_admin: row.cloud_admin,
            created_at: rfc3339(row.created_at_ms),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
    #[serde(default)]
    pub cloud_admin: bool,
    /// Grant this role in this project at once.
    pub project: Option<String>,
    pub role: Option<Role>,
    /// Lifetime of the user's first token; default 90 days.
    pub token_ttl_seconds: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedUser {
    pub user: UserView,
    /// The user's first API token. Shown once: it cannot be read back.
    pub token: CreatedToken,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub user: String,
    pub label: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl TokenView {
    fn of(row: &TokenRow) -> TokenView {
        TokenView {
            id: row.id.clone(),
            user: row.user.clone(),
            label: row.label.clone(),
            created_at: rfc3339(row.created_at_ms),
            expires_at: row.expires_at_ms.map(rfc3339),
            revoked_at: row.revoked_at_ms.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenView,
    /// The secret. Shown once: only its argon2 hash is stored.
    pub token: String,
}

impl CreatedToken {
    fn of(token: NewToken) -> CreatedToken {
        CreatedToken {
            info: TokenView::of(&token.row),
            token: token.secret,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    #[serde(default)]
    pub label: String,
    /// Lifetime in seconds; default 90 days. `0` makes a token that never expires
    /// (cloud admins only).
    pub ttl_seconds: Option<u64>,
    /// Make the token for another user (cloud admins only).
    pub user: Option<String>,
}

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(90 * 86_400);

fn ttl(seconds: Option<u64>, user: &User) -> Result<Option<Duration>, ApiError> {
    match seconds {
        None => Ok(Some(DEFAULT_TOKEN_TTL)),
        Some(0) => {
            user.check_cloud_admin()?;
            Ok(None)
        }
        Some(s) => Ok(Some(Duration::from_secs(s))),
    }
}

/// The caller: user name, cloud admin or not, roles per project.
#[utoipa::path(get, path = "/v1/whoami", responses((status = 200, body = WhoAmI)))]
pub async fn whoami(user: User) -> Json<WhoAmI> {
    Json(WhoAmI {
        user: user.principal.user,
        cloud_admin: user.principal.cloud_admin,
        roles: user.principal.roles,
    })
}

/// The projects the caller holds a role in (every project for cloud admins).
#[utoipa::path(get, path = "/v1/projects", responses((status = 200, body = Vec<ProjectView>)))]
pub async fn list_projects(user: User, State(cloud): State<AppState>) -> Json<Vec<ProjectView>> {
    Json(
        cloud
            .tenancy
            .projects()
            .iter()
            .filter(|p| user.principal.check(&p.name, Perm::Read).is_ok())
            .map(|p| ProjectView::of(p, None))
            .collect(),
    )
}

/// Create a project (cloud admins).
#[utoipa::path(post, path = "/v1/projects", request_body = CreateProject,
    responses((status = 201, body = ProjectView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_project(
    CloudAdmin(user): CloudAdmin,
    State(cloud): State<AppState>,
    ApiJson(request): ApiJson<CreateProject>,
) -> Result<(StatusCode, Json<ProjectView>), ApiError> {
    let quota = request.quota.unwrap_or_default().quota()?;
    user.note.project(&request.name);
    let row = cloud.create_project(&request.name, &quota)?;
    user.note.created(&row.name);
    Ok((StatusCode::CREATED, Json(ProjectView::of(&row, None))))
}

/// One project with its quota and what it holds now.
#[utoipa::path(get, path = "/v1/projects/{project}", params(("project" = String, Path, description = "project")),
    responses((status = 200, body = ProjectView), (status = 404, body = ErrorBody)))]
pub async fn get_project(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(project): ApiPath<String>,
) -> Result<Json<ProjectView>, ApiError> {
    let row = cloud.project_for(&user.principal, &project, Perm::Read)?;
    let (vms, vcpus, memory_mib) = cloud.project_usage(&project)?;
    Ok(Json(ProjectView::of(
        &row,
        Some(UsageView {
            vms,
            vcpus,
            memory_mib,
        }),
    )))
}

/// Delete a project that holds no VMs (cloud admins).
#[utoipa::path(delete, path = "/v1/projects/{project}", params(("project" = String, Path, description = "project")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_project(
    CloudAdmin(user): CloudAdmin,
    State(cloud): State<AppState>,
    ApiPath(project): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    user.note.project(&project);
    cloud.delete_project(&project)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set a project's quota (cloud admins). Lowering it below what the project holds
/// refuses new launches; it stops nothing.
#[utoipa::path(put, path = "/v1/projects/{project}/quota", params(("project" = String, Path, description = "project")),
    request_body = QuotaView, responses((status = 200, body = ProjectView), (status = 404, body = ErrorBody)))]
pub async fn put_quota(
    CloudAdmin(user): CloudAdmin,
    State(cloud): State<AppState>,
    ApiPath(project): ApiPath<String>,
    ApiJson(quota): ApiJson<QuotaView>,
) -> Result<Json<ProjectView>, ApiError> {
    user.note.project(&project);
    let row = cloud.set_quota(&project, &quota.quota()?)?;
    Ok(Json(ProjectView::of(&row, None)))
}

/// Who holds which role in a project.
#[utoipa::path(get, path = "/v1/projects/{project}/members", params(("project" = String, Path, description = "project")),
    responses((status = 200, body = Vec<MemberView>), (status = 404, body = ErrorBody)))]
pub async fn list_members(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(project): ApiPath<String>,
) -> Result<Json<Vec<MemberView>>, ApiError> {
    cloud.project_for(&user.principal, &project, Perm::Read)?;
    Ok(Json(
        cloud
            .tenancy
            .members(&project)
            .into_iter()
            .map(|(user, role)| MemberView { user, role })
            .collect(),
    ))
}

/// Grant a user a role in a project (the project's admins).
#[utoipa::path(put, path = "/v1/projects/{project}/members/{user}",
    params(("project" = String, Path, description = "project"), ("user" = String, Path, description = "user")),
    request_body = PutMember, responses((status = 200, body = MemberView), (status = 404, body = ErrorBody)))]
pub async fn put_member(
    user: User,
    State(cloud): State<AppState>,
    ApiPath((project, member)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<PutMember>,
) -> Result<Json<MemberView>, ApiError> {
    user.check(&project, Perm::Administer, "project", &project)?;
    cloud.set_member(&project, &member, request.role)?;
    Ok(Json(MemberView {
        user: member,
        role: request.role,
    }))
}

/// Take a user's role in a project away (the project's admins).
#[utoipa::path(delete, path = "/v1/projects/{project}/members/{user}",
    params(("project" = String, Path, description = "project"), ("user" = String, Path, description = "user")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_member(
    user: User,
    State(cloud): State<AppState>,
    ApiPath((project, member)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    user.check(&project, Perm::Administer, "project", &project)?;
    cloud.remove_member(&project, &member)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every user (cloud admins).
#[utoipa::path(get, path = "/v1/users", responses((status = 200, body = Vec<UserView>)))]
pub async fn list_users(_: CloudAdmin, State(cloud): State<AppState>) -> Json<Vec<UserView>> {
    Json(cloud.tenancy.users().iter().map(UserView::of).collect())
}

/// Create a user and their first token (cloud admins).
#[utoipa::path(post, path = "/v1/users", request_body = CreateUser,
    responses((status = 201, body = CreatedUser), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_user(
    CloudAdmin(admin): CloudAdmin,
    State(cloud): State<AppState>,
    ApiJson(request): ApiJson<CreateUser>,
) -> Result<(StatusCode, Json<CreatedUser>), ApiError> {
    let grant = match (&request.project, request.role) {
        (Some(project), role) => Some((project.clone(), role.unwrap_or(Role::Member))),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "role: name the project it is granted in",
            ))
        }
    };
    if let Some((project, _)) = &grant {
        cloud.project(project)?;
        admin.note.project(project);
    }
    let token_ttl = ttl(request.token_ttl_seconds, &admin)?;
    let row = cloud.create_user(&request.name, request.cloud_admin)?;
    if let Some((project, role)) = grant {
        cloud.set_member(&project, &row.name, role)?;
    }
    let token = cloud.create_token(&row.name, "first token", token_ttl)?;
    admin.note.created(&row.name);
    Ok((
        StatusCode::CREATED,
        Json(CreatedUser {
            user: UserView::of(&row),
            token: CreatedToken::of(token),
        }),
    ))
}

/// Delete a user: their roles go and their tokens are revoked (cloud admins).
#[utoipa::path(delete, path = "/v1/users/{user}", params(("user" = String, Path, description = "user")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_user(
    _: CloudAdmin,
    State(cloud): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    cloud.delete_user(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's tokens (every user's for cloud admins), without secrets.
#[utoipa::path(get, path = "/v1/tokens", responses((status = 200, body = Vec<TokenView>)))]
pub async fn list_tokens(user: User, State(cloud): State<AppState>) -> Json<Vec<TokenView>> {
    let whose = (!user.principal.cloud_admin).then_some(user.principal.user.as_str());
    Json(
        cloud
            .tenancy
            .tokens_of(whose)
            .iter()
            .map(TokenView::of)
            .collect(),
    )
}

/// Make a new API token for the caller (or, for cloud admins, for another user).
#[utoipa::path(post, path = "/v1/tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody)))]
pub async fn create_token(
    user: User,
    State(cloud): State<AppState>,
    ApiJson(request): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let owner = match &request.user {
        Some(other) if *other != user.principal.user => {
            user.check_cloud_admin()?;
            other.clone()
        }
        _ => user.principal.user.clone(),
    };
    let token = cloud.create_token(&owner, &request.label, ttl(request.ttl_seconds, &user)?)?;
    user.note.created(&token.row.id);
    Ok((StatusCode::CREATED, Json(CreatedToken::of(token))))
}

/// Revoke a token at once: the caller's own, or any for cloud admins.
#[utoipa::path(delete, path = "/v1/tokens/{id}", params(("id" = String, Path, description = "token id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn revoke_token(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let mine = cloud
        .tenancy
        .token(&id)
        .is_some_and(|t| t.user == user.principal.user);
    if !mine && !user.principal.cloud_admin {
        return Err(CloudError::NotFound { kind: "token", id }.into());
    }
    cloud.revoke_token(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

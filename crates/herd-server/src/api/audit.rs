//! The audit log: one row for every mutating request, whoever made it and however it
//! ended.
//!
//! Auditing is a layer around the routes rather than a line in each handler, so a new
//! route cannot forget it: every POST, PUT, PATCH and DELETE that reaches a route is
//! written down with its caller, route, object, project and result. Handlers only add
//! what the layer cannot see (the project the request touched, the id of what it made)
//! through the [`AuditNote`] that the caller's extractor carries.

use super::{page_size, ApiError, ApiQuery, AppState, ErrorCode, User};
use crate::access::Perm;
use crate::store::{now_ms, AuditFilter, AuditRow};
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tracing::error;
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Default)]
struct Facts {
    actor: Option<String>,
    project: Option<String>,
    created: Option<String>,
}

/// What a handler learned about a request, for its audit row.
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<Mutex<Facts>>);

impl AuditNote {
    fn with(&self, f: impl FnOnce(&mut Facts)) {
        f(&mut self.0.lock());
    }

    pub fn actor(&self, actor: impl Into<String>) {
        self.with(|facts| facts.actor = Some(actor.into()));
    }

    pub fn project(&self, project: &str) {
        self.with(|facts| facts.project = Some(project.to_owned()));
    }

    pub fn created(&self, id: impl ToString) {
        self.with(|facts| facts.created = Some(id.to_string()));
    }
}

fn mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The layer: lets the request run, then writes its row.
pub async fn record(State(cloud): State<AppState>, mut request: Request, next: Next) -> Response {
    if !mutating(request.method()) {
        return next.run(request).await;
    }
    let note = AuditNote::default();
    request.extensions_mut().insert(note.clone());
    let path = request.uri().path().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| path.clone());
    let action = format!("{} {route}", request.method());
    let response = next.run(request).await;
    let status = response.status();
    // A form of the web UI answers a success with a redirect to the page it changed.
    let result = if status.is_success() || status.is_redirection() {
        "ok".to_owned()
    } else {
        response
            .extensions()
            .get::<ErrorCode>()
            .map(|code| code.0.to_owned())
            .unwrap_or_else(|| status.as_u16().to_string())
    };
    let facts = std::mem::take(&mut *note.0.lock());
    let object = match facts.created {
        Some(id) => format!("{path} -> {id}"),
        None => path,
    };
    let row = AuditRow {
        id: 0,
        time_ms: now_ms(),
        actor: facts.actor.unwrap_or_else(|| "anonymous".into()),
        action,
        object,
        project: facts.project,
        status: status.as_u16(),
        result,
    };
    if let Err(e) = cloud.record_audit(&row) {
        error!(error = %e, action = %row.action, actor = %row.actor, "cannot write the audit log");
    }
    response
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only this project's rows (project admins must name one of theirs).
    pub project: Option<String>,
    /// Only this caller's rows (a user name, `host:<id>` or `anonymous`).
    pub actor: Option<String>,
    /// Cursor: rows older than this id.
    pub before: Option<i64>,
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub time: String,
    pub actor: String,
    /// Method and route, e.g. `POST /v1/vms/{id}/actions/{action}`.
    pub action: String,
    /// The path the request named, and what it created if anything.
    pub object: String,
    pub project: Option<String>,
    pub status: u16,
    /// `ok` or the error code.
    pub result: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    /// Newest first.
    pub items: Vec<AuditEntry>,
    pub next_before: Option<i64>,
}

/// The audit log, newest first: every project for cloud admins, their projects for
/// project admins.
#[utoipa::path(get, path = "/v1/audit", params(AuditQuery),
    responses((status = 200, body = AuditList), (status = 403, body = super::ErrorBody)))]
pub async fn list(
    user: User,
    State(cloud): State<AppState>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<AuditList>, ApiError> {
    let limit = page_size(query.limit)?;
    let projects = match &query.project {
        Some(project) => {
            cloud.project_for(&user.principal, project, Perm::Administer)?;
            Some(vec![project.clone()])
        }
        None => match user.principal.scope(Perm::Administer) {
            None => None,
            Some(scope) if scope.is_empty() => {
                return Err(ApiError::forbidden(
                    "only cloud admins and project admins may read the audit log",
                ))
            }
            Some(scope) => Some(scope),
        },
    };
    let rows = cloud.audit_log(&AuditFilter {
        projects,
        actor: query.actor,
        before: query.before,
        limit,
    })?;
    let next_before = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(Json(AuditList {
        items: rows
            .into_iter()
            .map(|row| AuditEntry {
                id: row.id,
                time: super::rfc3339(row.time_ms),
                actor: row.actor,
                action: row.action,
                object: row.object,
                project: row.project,
                status: row.status,
                result: row.result,
            })
            .collect(),
        next_before,
    }))
}

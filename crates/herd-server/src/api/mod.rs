//! The REST API under `/v1`, JSON in and out.
//!
//! **API Boundary:** handlers only authenticate, parse into plain values and call one
//! [`Cloud`] method; the core never sees HTTP or JSON. The request and response types
//! here are the API schema, and `/openapi.json` is generated from them, so the
//! published schema cannot drift from the code.

pub mod audit;
mod error;
pub mod tenants;
mod types;

pub use audit::AuditNote;
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use types::*;

use crate::access::{Perm, Principal};
use crate::auth::{self, Identity};
use crate::cloud::{Cloud, CloudError, LaunchSpec, Metrics};
use crate::store::{EventScope, VmFilter, VmRecord};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use herd_proto::join::{Discovery, JoinRequest, JoinResponse};
use herd_proto::lifecycle::Action;
use herd_proto::policy::RateCard;
use herd_proto::wire::{HostId, MAX_FRAME_BYTES};
use herd_proto::VmState;
use serde::de::DeserializeOwned;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use utoipa::OpenApi;

type AppState = Arc<Cloud>;

/// Largest request body the API accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

// ---- extractors -------------------------------------------------------------------

/// A JSON body whose rejections become [`ApiError`]s with stable codes.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(value)| ApiJson(value))
            .map_err(ApiError::from)
    }
}

/// Path parameters whose rejections (e.g. bytes that are not UTF-8) become
/// [`ApiError`]s.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection| ApiError::bad_request("invalid_path", rejection.body_text()))
    }
}

/// A query string whose rejections become [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(ApiError::from)
    }
}

fn identity(parts: &Parts, cloud: &Cloud) -> Result<Identity, ApiError> {
    Metrics::inc(&cloud.metrics.api_requests);
    let header = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let identity = cloud.authenticate(auth::bearer(header));
    if let Some(note) = parts.extensions.get::<AuditNote>() {
        match &identity {
            Ok(Identity::User(principal)) => note.actor(&principal.user),
            Ok(Identity::Agent { host }) => note.actor(format!("host:{host}")),
            Err(_) => {}
        }
    }
    Ok(identity?)
}

/// A caller with a user's API token, and the roles they hold.
pub struct User {
    pub principal: Principal,
    /// Where the handler adds what the audit row should say (mutating requests only).
    pub note: AuditNote,
}

impl User {
    /// Checks a right in a project and remembers the project for the audit log.
    /// Another project's object is reported as missing (`kind` and `id` say which).
    pub fn check(
        &self,
        project: &str,
        perm: Perm,
        kind: &'static str,
        id: &str,
    ) -> Result<(), ApiError> {
        self.note.project(project);
        self.principal
            .check(project, perm)
            .map_err(|d| crate::tenancy::denied(d, kind, id).into())
    }

    pub fn check_cloud_admin(&self) -> Result<(), ApiError> {
        self.principal
            .check_cloud_admin()
            .map_err(|_| ApiError::forbidden("only a cloud admin may do this"))
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, cloud: &AppState) -> Result<Self, ApiError> {
        match identity(parts, cloud)? {
            Identity::User(principal) => Ok(User {
                principal,
                note: parts
                    .extensions
                    .get::<AuditNote>()
                    .cloned()
                    .unwrap_or_default(),
            }),
            Identity::Agent { .. } => Err(ApiError::forbidden(
                "an agent credential may only use the /v1/agent routes",
            )),
        }
    }
}

/// A cloud-wide admin.
pub struct CloudAdmin(pub User);

impl FromRequestParts<AppState> for CloudAdmin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, cloud: &AppState) -> Result<Self, ApiError> {
        let user = User::from_request_parts(parts, cloud).await?;
        user.check_cloud_admin()?;
        Ok(CloudAdmin(user))
    }
}

/// A caller with an agent credential, speaking for its host. Over HTTPS the connection
/// must also present that host's client certificate: the token alone is not enough.
/// Over plain HTTP (insecure mode, no `PeerCert` in the request) the token is.
pub struct AgentHost(pub HostId);

impl FromRequestParts<AppState> for AgentHost {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, cloud: &AppState) -> Result<Self, ApiError> {
        match identity(parts, cloud)? {
            Identity::Agent { host } => {
                if let Some(peer) = parts.extensions.get::<herd_tls::PeerCert>() {
                    if peer.host != Some(host) {
                        tracing::warn!(%host, cert_host = ?peer.host,
                            "agent token refused: the client certificate is not this host's");
                        return Err(CloudError::Forbidden.into());
                    }
                }
                Ok(AgentHost(host))
            }
            Identity::User(_) => Err(ApiError::forbidden("this route is for agents")),
        }
    }
}

// ---- router -----------------------------------------------------------------------

pub fn router(cloud: Arc<Cloud>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/vms", post(launch_vm).get(list_vms))
        .route("/v1/vms/batch", post(launch_batch))
        .route("/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{id}/actions/{action}", post(vm_action))
        .route("/v1/vms/{id}/events", get(vm_events))
        .route("/v1/vms/{id}/console", get(vm_console))
        .route("/v1/events", get(list_events))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{id}", get(get_host))
        .route("/v1/join-tokens", post(create_join_token))
        .route(
            "/v1/rate-cards/{project}",
            get(get_rate_card).put(put_rate_card),
        )
        .route("/v1/billing", get(get_bill))
        .route("/v1/whoami", get(tenants::whoami))
        .route(
            "/v1/projects",
            get(tenants::list_projects).post(tenants::create_project),
        )
        .route(
            "/v1/projects/{project}",
            get(tenants::get_project).delete(tenants::delete_project),
        )
        .route("/v1/projects/{project}/quota", put(tenants::put_quota))
        .route("/v1/projects/{project}/members", get(tenants::list_members))
        .route(
            "/v1/projects/{project}/members/{user}",
            put(tenants::put_member).delete(tenants::delete_member),
        )
        .route(
            "/v1/users",
            get(tenants::list_users).post(tenants::create_user),
        )
        .route("/v1/users/{user}", delete(tenants::delete_user))
        .route(
            "/v1/tokens",
            get(tenants::list_tokens).post(tenants::create_token),
        )
        .route("/v1/tokens/{id}", delete(tenants::revoke_token))
        .route("/v1/audit", get(audit::list))
        .route("/v1/agent/join", post(agent_join))
        .route("/v1/agent/discovery", get(agent_discovery))
        .route("/v1/agent/bus", get(agent_bus))
        .route_layer(axum::middleware::from_fn_with_state(
            cloud.clone(),
            audit::record,
        ))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(cloud)
}

async fn no_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        "no such route; see /openapi.json",
    )
}

async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /openapi.json",
    )
}

#[derive(OpenApi)]
#[openapi(
    info(title = "herd", description = "A self-hosted cloud for virtual machines and system containers."),
    paths(
        healthz, metrics, launch_vm, launch_batch, list_vms, get_vm, delete_vm, vm_action, vm_events, vm_console,
        list_events, list_hosts, get_host, create_join_token, get_rate_card, put_rate_card,
        get_bill, agent_join, agent_discovery, agent_bus,
        tenants::whoami, tenants::list_projects, tenants::create_project, tenants::get_project,
        tenants::delete_project, tenants::put_quota, tenants::list_members, tenants::put_member,
        tenants::delete_member, tenants::list_users, tenants::create_user, tenants::delete_user,
        tenants::list_tokens, tenants::create_token, tenants::revoke_token, audit::list
    ),
    components(schemas(ErrorBody, VmState, Action, JoinRequest, JoinResponse, Discovery, RateCard, crate::access::Role)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

// ---- meta -------------------------------------------------------------------------

/// Liveness; the only route without a token.
#[utoipa::path(get, path = "/healthz", security(()), responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

async fn openapi_json(_: User) -> Json<utoipa::openapi::OpenApi> {
    let mut doc = ApiDoc::openapi();
    // Describe this route too, so the schema lists every route the server serves.
    doc.paths.paths.insert(
        "/openapi.json".into(),
        utoipa::openapi::path::PathItem::new(
            utoipa::openapi::HttpMethod::Get,
            utoipa::openapi::path::OperationBuilder::new()
                .summary(Some("This document"))
                .response(
                    "200",
                    utoipa::openapi::Response::new("The OpenAPI document"),
                )
                .build(),
        ),
    );
    Json(doc)
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics(_: CloudAdmin, State(cloud): State<AppState>) -> Result<Response, ApiError> {
    let m = &cloud.metrics;
    let mut out = String::new();
    let counters = [
        ("herd_sync_reports_total{kind=\"delta\"}", &m.reports_delta),
        ("herd_sync_reports_total{kind=\"full\"}", &m.reports_full),
        ("herd_sync_bytes_received_total", &m.report_bytes),
        ("herd_sync_full_requests_total", &m.full_requests),
        ("herd_vm_state_changes_total", &m.vm_state_changes),
        ("herd_commands_published_total", &m.commands_published),
        ("herd_command_errors_total", &m.command_errors),
        ("herd_agent_messages_rejected_total", &m.rejected_reports),
        ("herd_api_requests_total", &m.api_requests),
        ("herd_hosts_marked_down_total", &m.hosts_marked_down),
        ("herd_agent_discoveries_total", &m.agent_discoveries),
    ];
    for (name, counter) in counters {
        let base = name.split('{').next().unwrap_or(name);
        if !out.contains(&format!("# TYPE {base} ")) {
            out.push_str(&format!("# TYPE {base} counter\n"));
        }
        out.push_str(&format!("{name} {}\n", counter.load(Ordering::Relaxed)));
    }
    let batching = &cloud.commits.stats;
    out.push_str("# TYPE herd_store_batches_total counter\n");
    out.push_str(&format!(
        "herd_store_batches_total {}\n",
        batching.batches.load(Ordering::Relaxed)
    ));
    out.push_str("# TYPE herd_store_batched_writes_total counter\n");
    out.push_str(&format!(
        "herd_store_batched_writes_total {}\n",
        batching.writes.load(Ordering::Relaxed)
    ));
    out.push_str("# TYPE herd_store_unwritten_states gauge\n");
    out.push_str(&format!(
        "herd_store_unwritten_states {}\n",
        cloud.commits.unwritten()
    ));
    out.push_str("# TYPE herd_vms gauge\n");
    for (state, n) in cloud.store.vm_state_counts() {
        out.push_str(&format!("herd_vms{{state=\"{}\"}} {n}\n", state.as_str()));
    }
    let hosts = cloud.hosts()?;
    let n_up = hosts.iter().filter(|host| host.record.up).count();
    out.push_str("# TYPE herd_hosts gauge\n");
    out.push_str(&format!("herd_hosts{{state=\"up\"}} {n_up}\n"));
    out.push_str(&format!(
        "herd_hosts{{state=\"down\"}} {}\n",
        hosts.len() - n_up
    ));
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

// ---- VMs --------------------------------------------------------------------------

/// The launch a request asks for, in the project it names (or the caller's only
/// project, else `default`), once the caller may launch there.
fn launch_spec(user: &User, request: LaunchRequest) -> Result<LaunchSpec, ApiError> {
    let project = request.project.unwrap_or_else(|| {
        match (user.principal.cloud_admin, user.principal.roles.len()) {
            (false, 1) => user.principal.roles.keys().next().cloned(),
            _ => None,
        }
        .unwrap_or_else(|| "default".into())
    });
    user.check(&project, Perm::OperateVms, "project", &project)?;
    Ok(LaunchSpec {
        name: request.name,
        project: Some(project),
        hypervisor: request.hypervisor,
        vcpus: request.vcpus,
        memory_mib: request.memory_mib,
        image: request.image,
        command: request.command.unwrap_or_default(),
        policy: request.policy.unwrap_or_default(),
        keep_running: request.keep_running.unwrap_or(false),
    })
}

/// Launch a VM. It is placed at once if a host fits, else it waits as `pending`.
#[utoipa::path(post, path = "/v1/vms", request_body = LaunchRequest,
    responses((status = 201, body = VmView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn launch_vm(
    user: User,
    State(cloud): State<AppState>,
    ApiJson(request): ApiJson<LaunchRequest>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    let spec = launch_spec(&user, request)?;
    let record = crate::blocking(|| cloud.launch(spec))?;
    user.note.created(record.id);
    Ok((StatusCode::CREATED, Json(VmView::of(&record, None, None))))
}

/// Launch up to 1,000 alike VMs at once, named `{name}-1` to `{name}-{count}`: each
/// placed like a single launch, all stored in one transaction (all or none).
#[utoipa::path(post, path = "/v1/vms/batch", request_body = BatchLaunchRequest,
    responses((status = 201, body = BatchLaunched), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn launch_batch(
    user: User,
    State(cloud): State<AppState>,
    ApiJson(request): ApiJson<BatchLaunchRequest>,
) -> Result<(StatusCode, Json<BatchLaunched>), ApiError> {
    let spec = launch_spec(&user, request.vm)?;
    let records = crate::blocking(|| cloud.launch_batch(spec, Some(request.count)))?;
    if let (Some(first), Some(last)) = (records.first(), records.last()) {
        user.note.created(format!(
            "{} VMs, {} to {}",
            records.len(),
            first.id,
            last.id
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(BatchLaunched {
            ids: records.iter().map(|record| record.id.to_string()).collect(),
        }),
    ))
}

/// List VMs, filtered, in pages ordered by id.
#[utoipa::path(get, path = "/v1/vms", params(VmQuery),
    responses((status = 200, body = VmList), (status = 400, body = ErrorBody)))]
async fn list_vms(
    user: User,
    State(cloud): State<AppState>,
    ApiQuery(query): ApiQuery<VmQuery>,
) -> Result<Json<VmList>, ApiError> {
    let limit = page_size(query.limit)?;
    if let Some(project) = &query.project {
        user.check(project, Perm::Read, "project", project)?;
    }
    let state = query
        .state
        .as_deref()
        .map(|s| {
            s.parse::<VmState>()
                .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))
        })
        .transpose()?;
    let host = query
        .host
        .as_deref()
        .map(|h| {
            h.parse::<HostId>()
                .map_err(|_| ApiError::bad_request("invalid_query", "host: not a host id"))
        })
        .transpose()?;
    let after = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<uuid::Uuid>().map_err(|_| {
                ApiError::bad_request("invalid_query", "cursor: not a cursor from a previous page")
            })
        })
        .transpose()?;
    let records = cloud.list_vms(&VmFilter {
        project: query.project,
        projects: user.principal.scope(Perm::Read),
        state,
        host,
        name: query.name,
        after,
        limit: limit + 1,
    })?;
    let has_more = records.len() > limit;
    let items: Vec<VmView> = records
        .iter()
        .take(limit)
        .map(|r| VmView::of(r, None, cloud.guest(r.id)))
        .collect();
    let next_cursor = if has_more {
        items.last().map(|v| v.id.to_string())
    } else {
        None
    };
    Ok(Json(VmList { items, next_cursor }))
}

/// A VM the caller may take `perm` on; another project's VM does not exist.
fn vm_for(cloud: &Cloud, user: &User, id: &str, perm: Perm) -> Result<VmRecord, ApiError> {
    let record = cloud.vm(id)?;
    user.check(&record.project, perm, "VM", id)?;
    Ok(record)
}

pub(crate) fn page_size(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {MAX_PAGE}"),
        )),
    }
}

/// One VM, with its latest usage counters.
#[utoipa::path(get, path = "/v1/vms/{id}", params(("id" = String, Path, description = "VM id")),
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody)))]
async fn get_vm(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<VmView>, ApiError> {
    let record = vm_for(&cloud, &user, &id, Perm::Read)?;
    let usage = cloud.vm_usage(record.id);
    Ok(Json(VmView::of(&record, usage, cloud.guest(record.id))))
}

/// Delete a VM: terminate it on its host, then drop the record.
#[utoipa::path(delete, path = "/v1/vms/{id}", params(("id" = String, Path, description = "VM id")),
    responses((status = 202, body = VmView, description = "terminating; the record goes when the host confirms"),
              (status = 204, description = "deleted"), (status = 404, body = ErrorBody)))]
async fn delete_vm(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    vm_for(&cloud, &user, &id, Perm::OperateVms)?;
    Ok(match crate::blocking(|| cloud.delete(&id))? {
        Some(record) => {
            (StatusCode::ACCEPTED, Json(VmView::of(&record, None, None))).into_response()
        }
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// Ask for a new desired state: start, stop, pause, resume, suspend or terminate.
#[utoipa::path(post, path = "/v1/vms/{id}/actions/{action}",
    params(("id" = String, Path, description = "VM id"),
           ("action" = String, Path, description = "start, stop, pause, resume, suspend or terminate")),
    responses((status = 202, body = VmView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn vm_action(
    user: User,
    State(cloud): State<AppState>,
    ApiPath((id, action)): ApiPath<(String, String)>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    vm_for(&cloud, &user, &id, Perm::OperateVms)?;
    let Some(action) = Action::parse(&action) else {
        return Err(ApiError::not_found(format!(
            "no action {action:?}; actions are start, stop, pause, resume, suspend, terminate"
        )));
    };
    let record = crate::blocking(|| cloud.act(&id, action))?;
    Ok((StatusCode::ACCEPTED, Json(VmView::of(&record, None, None))))
}

/// A VM's events, oldest first.
#[utoipa::path(get, path = "/v1/vms/{id}/events", params(("id" = String, Path, description = "VM id"), EventQuery),
    responses((status = 200, body = EventList), (status = 404, body = ErrorBody)))]
async fn vm_events(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventQuery>,
) -> Result<Json<EventList>, ApiError> {
    let record = vm_for(&cloud, &user, &id, Perm::Read)?;
    events_page(&cloud, EventScope::Vm(record.id), query)
}

/// The tail of a VM's serial console, fetched from its host.
#[utoipa::path(get, path = "/v1/vms/{id}/console", params(("id" = String, Path, description = "VM id"), ConsoleQuery),
    responses((status = 200, description = "console text", content_type = "text/plain"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn vm_console(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ConsoleQuery>,
) -> Result<Response, ApiError> {
    vm_for(&cloud, &user, &id, Perm::ReadConsole)?;
    let max_bytes = query.bytes.unwrap_or(64 * 1024);
    if !(1..=1 << 20).contains(&max_bytes) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "bytes must be between 1 and 1048576",
        ));
    }
    let bytes = cloud.console(&id, max_bytes).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&bytes).into_owned(),
    )
        .into_response())
}

/// Every event the caller may see, oldest first: all of them for cloud admins, the
/// events of their projects' VMs for everyone else.
#[utoipa::path(get, path = "/v1/events", params(EventQuery),
    responses((status = 200, body = EventList)))]
async fn list_events(
    user: User,
    State(cloud): State<AppState>,
    ApiQuery(query): ApiQuery<EventQuery>,
) -> Result<Json<EventList>, ApiError> {
    let scope = match user.principal.scope(Perm::Read) {
        None => EventScope::All,
        Some(projects) => EventScope::Projects(projects),
    };
    events_page(&cloud, scope, query)
}

fn events_page(
    cloud: &Cloud,
    scope: EventScope,
    query: EventQuery,
) -> Result<Json<EventList>, ApiError> {
    let limit = page_size(query.limit)?;
    let records = cloud
        .store
        .events(&scope, query.after.unwrap_or(0), limit)
        .map_err(CloudError::from)?;
    let next_after = records.last().map(|e| e.id);
    Ok(Json(EventList {
        items: records.iter().map(EventView::of).collect(),
        next_after,
    }))
}

// ---- hosts ------------------------------------------------------------------------

/// Every host, with capacity, allocation and live utilization.
#[utoipa::path(get, path = "/v1/hosts", responses((status = 200, body = Vec<HostInfo>)))]
async fn list_hosts(
    _: CloudAdmin,
    State(cloud): State<AppState>,
) -> Result<Json<Vec<HostInfo>>, ApiError> {
    Ok(Json(cloud.hosts()?.iter().map(HostInfo::of).collect()))
}

/// One host.
#[utoipa::path(get, path = "/v1/hosts/{id}", params(("id" = String, Path, description = "host id")),
    responses((status = 200, body = HostInfo), (status = 404, body = ErrorBody)))]
async fn get_host(
    _: CloudAdmin,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<HostInfo>, ApiError> {
    Ok(Json(HostInfo::of(&cloud.host(&id)?)))
}

/// Create a one-time join token for a new host.
#[utoipa::path(post, path = "/v1/join-tokens", request_body = JoinTokenRequest,
    responses((status = 201, body = JoinTokenView), (status = 400, body = ErrorBody)))]
async fn create_join_token(
    _: CloudAdmin,
    State(cloud): State<AppState>,
    ApiJson(request): ApiJson<JoinTokenRequest>,
) -> Result<(StatusCode, Json<JoinTokenView>), ApiError> {
    let ttl_s = request.ttl_seconds.unwrap_or(3600);
    if !(1..=7 * 24 * 3600).contains(&ttl_s) {
        return Err(ApiError::bad_request(
            "invalid_request",
            "ttl_seconds: must be between 1 and 604800 (7 days)",
        ));
    }
    let (token, expires_ms) = cloud.create_join_token(Duration::from_secs(ttl_s))?;
    let mut command = format!(
        "herd agent --join {} --token {token}",
        cloud.config.public_url
    );
    // The new host pins the CA by its fingerprint for its very first call.
    if let Some(ca) = &cloud.ca {
        command.push_str(&format!(" --ca-fingerprint {}", ca.fingerprint()));
    }
    Ok((
        StatusCode::CREATED,
        Json(JoinTokenView {
            token,
            expires_at: types::rfc3339(expires_ms),
            command,
        }),
    ))
}

// ---- billing ----------------------------------------------------------------------

/// A project's rate card.
#[utoipa::path(get, path = "/v1/rate-cards/{project}", params(("project" = String, Path, description = "project")),
    responses((status = 200, body = RateCard), (status = 404, body = ErrorBody)))]
async fn get_rate_card(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(project): ApiPath<String>,
) -> Result<Json<RateCard>, ApiError> {
    user.check(&project, Perm::Read, "project", &project)?;
    cloud
        .rate_card(&project)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("project {project:?} has no rate card")))
}

/// Set a project's rate card (prices in millionths of the currency unit).
#[utoipa::path(put, path = "/v1/rate-cards/{project}", params(("project" = String, Path, description = "project")),
    request_body = RateCard, responses((status = 200, body = RateCard), (status = 400, body = ErrorBody)))]
async fn put_rate_card(
    _: CloudAdmin,
    State(cloud): State<AppState>,
    ApiPath(project): ApiPath<String>,
    ApiJson(card): ApiJson<RateCard>,
) -> Result<Json<RateCard>, ApiError> {
    cloud.set_rate_card(&project, &card)?;
    Ok(Json(card))
}

fn parse_time(field: &'static str, text: &str) -> Result<i64, ApiError> {
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(seconds.saturating_mul(1000));
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("{field}: not RFC 3339 or unix seconds"),
            )
        })
}

/// Per-VM charges and the total over a period.
#[utoipa::path(get, path = "/v1/billing", params(BillQuery),
    responses((status = 200, body = BillView), (status = 400, body = ErrorBody)))]
async fn get_bill(
    user: User,
    State(cloud): State<AppState>,
    ApiQuery(query): ApiQuery<BillQuery>,
) -> Result<Json<BillView>, ApiError> {
    let now = crate::store::now_ms();
    let from = query
        .from
        .as_deref()
        .map(|t| parse_time("from", t))
        .transpose()?
        .unwrap_or(now - 30 * 86_400_000);
    let to = query
        .to
        .as_deref()
        .map(|t| parse_time("to", t))
        .transpose()?
        .unwrap_or(now)
        .min(now);
    if from >= to {
        return Err(ApiError::bad_request(
            "invalid_query",
            "from must be before to",
        ));
    }
    let lines = match (&query.project, user.principal.scope(Perm::ReadBill)) {
        (Some(project), _) => {
            user.check(project, Perm::ReadBill, "project", project)?;
            crate::blocking(|| cloud.bill(Some(project), from, to))?
        }
        (None, None) => crate::blocking(|| cloud.bill(None, from, to))?,
        (None, Some(projects)) => {
            let mut lines = Vec::new();
            for project in projects {
                lines.extend(crate::blocking(|| cloud.bill(Some(&project), from, to))?);
            }
            lines
        }
    };
    Ok(Json(BillView::of(&lines, from, to)))
}

// ---- agents -----------------------------------------------------------------------

/// A new host joins with a one-time join token and receives its credential.
#[utoipa::path(post, path = "/v1/agent/join", request_body = JoinRequest, security(()),
    responses((status = 201, body = JoinResponse), (status = 401, body = ErrorBody)))]
async fn agent_join(
    State(cloud): State<AppState>,
    note: Option<axum::Extension<AuditNote>>,
    ApiJson(request): ApiJson<JoinRequest>,
) -> Result<(StatusCode, Json<JoinResponse>), ApiError> {
    let note = note.map(|axum::Extension(note)| note).unwrap_or_default();
    note.actor(format!(
        "joining host {:?}",
        request.hostname.chars().take(64).collect::<String>()
    ));
    let response = crate::blocking(|| cloud.join(&request))?;
    note.created(response.host_id);
    Ok((StatusCode::CREATED, Json(response)))
}

/// What an agent needs to configure itself.
#[utoipa::path(get, path = "/v1/agent/discovery", responses((status = 200, body = Discovery)))]
async fn agent_discovery(_agent: AgentHost, State(cloud): State<AppState>) -> Json<Discovery> {
    Metrics::inc(&cloud.metrics.agent_discoveries);
    Json(cloud.discovery())
}

/// The agent's bus connection (WebSocket, binary frames).
#[utoipa::path(get, path = "/v1/agent/bus", responses((status = 101, description = "switching to WebSocket")))]
async fn agent_bus(
    agent: AgentHost,
    State(cloud): State<AppState>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Buffers are per connection and a server holds one connection per host: the
    // library's 128 KiB read buffer, reserved up front, would cost 1.25 GiB at 10,000
    // hosts. Agents' frames are small (a full report of 100 VMs is about 3 KiB) and
    // larger ones are read in several chunks; writes go out as they are sent.
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| crate::ingest::serve_agent_apart(cloud, agent.0, socket))
}

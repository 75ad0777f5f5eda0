//! The REST API under `/v1`, JSON in and out.
//!
//! **API Boundary:** handlers only authenticate, parse into plain values and call one
//! [`Cloud`] method; the core never sees HTTP or JSON. The request and response types
//! here are the API schema, and `/openapi.json` is generated from them, so the
//! published schema cannot drift from the code.
//!
//! This module is the route table and what all routes share; each resource's handlers
//! are in a module of their own, so a route's handler is found by its resource.

mod agents;
pub mod audit;
pub(crate) mod billing;
mod broadcast_types;
mod error;
mod extract;
pub(crate) mod hosts;
mod meta;
mod openapi;
pub mod tenants;
mod types;
pub(crate) mod vms;

pub use audit::AuditNote;
pub use broadcast_types::*;
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use extract::{AgentHost, ApiJson, ApiPath, ApiQuery, CloudAdmin, User};
pub use openapi::ApiDoc;
pub use types::*;

use crate::cloud::Cloud;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{delete, get, post, put};
use axum::Router;
use std::sync::Arc;

type AppState = Arc<Cloud>;

/// A time the store keeps as milliseconds since the epoch, as the API shows it.
pub fn rfc3339(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Largest request body the API accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

pub fn router(cloud: Arc<Cloud>) -> Router {
    Router::new()
        .route("/healthz", get(meta::healthz))
        .route("/metrics", get(meta::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/v1/vms", post(vms::launch_vm).get(vms::list_vms))
        .route("/v1/vms/batch", post(vms::launch_batch))
        .route("/v1/vms/{id}", get(vms::get_vm).delete(vms::delete_vm))
        .route("/v1/vms/{id}/actions/{action}", post(vms::vm_action))
        .route("/v1/vms/{id}/migrate", post(vms::migrate_vm))
        .route("/v1/vms/{id}/migrations", get(vms::vm_migrations))
        .route("/v1/vms/{id}/resize", post(vms::resize_vm))
        .route("/v1/vms/{id}/resizes", get(vms::vm_resizes))
        .route("/v1/vms/{id}/bursts", post(vms::burst_vm))
        .route("/v1/vms/{id}/broadcast", post(vms::broadcast_vm))
        .route("/v1/vms/{id}/broadcasts", get(vms::vm_broadcasts))
        .route("/v1/vms/{id}/events", get(vms::vm_events))
        .route("/v1/vms/{id}/console", get(vms::vm_console))
        .route("/v1/events", get(vms::list_events))
        .route("/v1/hosts", get(hosts::list_hosts))
        .route("/v1/hosts/{id}", get(hosts::get_host))
        .route("/v1/hosts/{id}/status", get(hosts::host_status))
        .route("/v1/hosts/{id}/labels", post(hosts::label_host))
        .route("/v1/topology", get(hosts::get_topology))
        .route("/v1/map", get(hosts::get_map))
        .route("/v1/join-tokens", post(hosts::create_join_token))
        .route(
            "/v1/rate-cards/{project}",
            get(billing::get_rate_card).put(billing::put_rate_card),
        )
        .route("/v1/billing", get(billing::get_bill))
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
        .route("/v1/agent/join", post(agents::agent_join))
        .route("/v1/agent/discovery", get(agents::agent_discovery))
        .route("/v1/agent/bus", get(agents::agent_bus))
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

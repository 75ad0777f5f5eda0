//! The browser interface, served by the server itself under `/ui`.
//!
//! Pages are rendered on the server (maud: templates checked at compile time, every
//! interpolated value HTML-escaped) and read without JavaScript. One small script of
//! our own makes them live: a page names its live region and an SSE stream
//! (`/ui/live/...`) sends that region again whenever it changes, so a VM's new state
//! shows within a second without a reload. No Node, no bundler, nothing fetched from
//! elsewhere: the CSS and the script are built into the binary.
//!
//! **The UI has no rights of its own.** Each handler builds the same [`api::User`] the
//! REST API does, from the token behind the session, and calls the API's own handler
//! functions, so a viewer is refused an action and another project's VM is a 404 here
//! exactly as there. Every POST passes through [`Posted`], which checks the session's
//! CSRF token and the request's Origin before anything runs.

mod assets;
mod audit;
mod billing;
mod caller;
mod chart;
mod hosts;
mod launch;
mod layout;
mod live;
mod login;
mod operate;
mod overview;
mod projects;
pub mod session;
mod vms;

pub use caller::{Caller, Posted, WebError};

use crate::cloud::Cloud;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue};
use axum::response::Redirect;
use axum::routing::{get, post};
use axum::Router;
use session::Sessions;
use std::sync::Arc;

/// What the UI's handlers share: the cloud and the open sessions.
pub struct Web {
    pub cloud: Arc<Cloud>,
    pub sessions: Sessions,
}

type WebState = Arc<Web>;

/// A session ends after this long without a request.
const SESSION_IDLE_MS: i64 = 8 * 3_600_000;
/// At most this many open sessions.
const MAX_SESSIONS: usize = 10_000;
/// Rows on a page of a list.
const PAGE: usize = 50;

/// Pages may load only their own CSS, script and images, and no other site may frame
/// them.
const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn router(cloud: Arc<Cloud>) -> Router {
    let web = Arc::new(Web {
        cloud: cloud.clone(),
        sessions: Sessions::new(SESSION_IDLE_MS, MAX_SESSIONS),
    });
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui") }))
        .route("/ui", get(overview::page))
        .route("/ui/login", get(login::form).post(login::submit))
        .route("/ui/logout", post(login::logout))
        .route("/ui/vms", get(vms::list))
        .route("/ui/vms/new", get(launch::launch_form).post(launch::launch))
        .route("/ui/vms/{id}", get(vms::detail))
        .route("/ui/vms/{id}/actions/{action}", post(vms::act))
        .route("/ui/vms/{id}/console", get(vms::console))
        .route("/ui/vms/{id}/resize", post(operate::resize))
        .route("/ui/vms/{id}/burst", post(operate::burst))
        .route("/ui/vms/{id}/broadcast", post(operate::broadcast))
        .route("/ui/vms/{id}/migrate", post(operate::migrate))
        .route("/ui/projects", get(projects::page))
        .route("/ui/projects/{project}/members", post(projects::put_member))
        .route(
            "/ui/projects/{project}/members/{user}/remove",
            post(projects::remove_member),
        )
        .route("/ui/projects/{project}/quota", post(projects::put_quota))
        .route("/ui/hosts", get(hosts::page))
        .route("/ui/billing", get(billing::page))
        .route("/ui/billing.csv", get(billing::csv))
        .route("/ui/audit", get(audit::page))
        .route("/ui/live/overview", get(live::overview))
        .route("/ui/live/vms", get(live::vm_list))
        .route("/ui/live/vms/{id}", get(live::vm_detail))
        .route("/ui/live/vms/{id}/console", get(live::console))
        .route("/ui/assets/{file}", get(assets::serve))
        .route_layer(axum::middleware::from_fn_with_state(
            cloud,
            crate::api::audit::record,
        ))
        .layer(DefaultBodyLimit::max(crate::api::MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(web)
}

/// Headers every UI response carries.
async fn secure_headers(mut response: axum::response::Response) -> axum::response::Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// A form field's text, trimmed; `None` when it was left empty (forms send every field).
fn given(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

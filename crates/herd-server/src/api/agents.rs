//! The routes agents call, not people: they hold a host's credential instead of a
//! user's token, so they are kept apart from the routes users may call.

use super::{AgentHost, ApiError, ApiJson, AppState, AuditNote, ErrorBody};
use crate::cloud::Metrics;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use axum::Json;
use herd_proto::join::{Discovery, JoinRequest, JoinResponse};
use herd_proto::wire::MAX_FRAME_BYTES;

/// A new host joins with a one-time join token and receives its credential.
#[utoipa::path(post, path = "/v1/agent/join", request_body = JoinRequest, security(()),
    responses((status = 201, body = JoinResponse), (status = 401, body = ErrorBody)))]
pub(super) async fn agent_join(
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
pub(super) async fn agent_discovery(
    _agent: AgentHost,
    State(cloud): State<AppState>,
) -> Json<Discovery> {
    Metrics::inc(&cloud.metrics.agent_discoveries);
    Json(cloud.discovery())
}

/// The agent's bus connection (WebSocket, binary frames).
#[utoipa::path(get, path = "/v1/agent/bus", responses((status = 101, description = "switching to WebSocket")))]
pub(super) async fn agent_bus(
    agent: AgentHost,
    State(cloud): State<AppState>,
    remote: Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Other agents reach this one where it connects from (migration transfers).
    if let Some(Extension(ConnectInfo(remote))) = remote {
        cloud.topology.connected_from(agent.0, remote.ip());
    }
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

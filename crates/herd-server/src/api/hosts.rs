//! Hosts are a cloud admin's business: what the fleet holds, and the join tokens that
//! add to it.

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, AppState, CloudAdmin, ErrorBody, HostInfo,
    JoinTokenRequest, JoinTokenView, User,
};
use crate::access::Perm;
use crate::map::{MapScope, ResourceMap};
use crate::topology::{LabelChange, TopologyView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use std::time::Duration;

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct HostQuery {
    /// Only hosts in this state: `up`, `joining` or `down`.
    pub state: Option<String>,
    /// Only hosts that offer this hypervisor type.
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// Every host, with capacity, allocation and live utilization: the ones up first, then
/// joining, then down, each by name, so that live hosts are not buried under dead ones.
#[utoipa::path(get, path = "/v1/hosts", params(HostQuery),
    responses((status = 200, body = Vec<HostInfo>), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_hosts(
    _: CloudAdmin,
    State(cloud): State<AppState>,
    ApiQuery(query): ApiQuery<HostQuery>,
) -> Result<Json<Vec<HostInfo>>, ApiError> {
    if let Some(state) = &query.state {
        if !HOST_STATES.contains(&state.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("state: {state:?} is not one of up, joining, down"),
            ));
        }
    }
    let mut hosts: Vec<HostInfo> = cloud
        .hosts()?
        .iter()
        .map(HostInfo::of)
        .filter(|h| query.state.as_ref().is_none_or(|s| &h.state == s))
        .filter(|h| {
            query
                .kind
                .as_ref()
                .is_none_or(|k| h.hypervisors.iter().any(|hv| &hv.kind == k))
        })
        .collect();
    hosts.sort_by(|a, b| {
        (state_rank(&a.state), &a.hostname).cmp(&(state_rank(&b.state), &b.hostname))
    });
    Ok(Json(hosts))
}

/// A host's states, in the order hosts are listed.
const HOST_STATES: [&str; 3] = ["up", "joining", "down"];

fn state_rank(state: &str) -> usize {
    HOST_STATES
        .iter()
        .position(|s| *s == state)
        .unwrap_or(HOST_STATES.len())
}

/// What a host knows of the others, from their status messages: each one's latest
/// figures and age, stale when it has been silent two intervals. Asked of the host.
#[utoipa::path(get, path = "/v1/hosts/{id}/status", params(("id" = String, Path, description = "host id")),
    responses((status = 200, body = Vec<herd_proto::status::PeerView>), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn host_status(
    _: CloudAdmin,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Vec<herd_proto::status::PeerView>>, ApiError> {
    Ok(Json(cloud.host_peers(&id).await?))
}

/// Set and remove a host's labels (`region`, `zone` and `rack` place it in the
/// proximity tree); answers its labels after the change.
#[utoipa::path(post, path = "/v1/hosts/{id}/labels", params(("id" = String, Path, description = "host id")),
    request_body = LabelChange,
    responses((status = 200, body = std::collections::BTreeMap<String, String>), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn label_host(
    _: CloudAdmin,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(change): ApiJson<LabelChange>,
) -> Result<Json<herd_topology::Labels>, ApiError> {
    Ok(Json(crate::blocking(|| cloud.label_host(&id, &change))?))
}

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopologyQuery {
    /// The host the tree grows from (default: the first up host by name).
    root: Option<String>,
    /// At most this many children per host (1 to 64; 1 is a chain).
    fanout: Option<usize>,
}

/// The proximity tree of the hosts that are up: grouped by their region, zone and rack
/// labels, ordered by the round trips the agents measured.
#[utoipa::path(get, path = "/v1/topology", params(TopologyQuery),
    responses((status = 200, body = TopologyView), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn get_topology(
    _: CloudAdmin,
    State(cloud): State<AppState>,
    ApiQuery(query): ApiQuery<TopologyQuery>,
) -> Result<Json<TopologyView>, ApiError> {
    let fanout = query.fanout.unwrap_or(4);
    Ok(Json(cloud.topology_tree(query.root.as_deref(), fanout)?))
}

/// One host.
#[utoipa::path(get, path = "/v1/hosts/{id}", params(("id" = String, Path, description = "host id")),
    responses((status = 200, body = HostInfo), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_host(
    _: CloudAdmin,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<HostInfo>, ApiError> {
    Ok(Json(HostInfo::of(&cloud.host(&id)?)))
}

/// The live resource map: capacity, allocation and measured use per hypervisor type
/// and per host. A cloud admin sees every host; anyone else sees the aggregates of the
/// projects they can read, without hosts or free figures.
#[utoipa::path(get, path = "/v1/map", responses((status = 200, body = ResourceMap)))]
pub(crate) async fn get_map(
    user: User,
    State(cloud): State<AppState>,
) -> Result<Json<ResourceMap>, ApiError> {
    let scope = match user.principal.scope(Perm::Read) {
        None => MapScope::Cloud,
        Some(projects) => MapScope::Projects(projects),
    };
    Ok(Json(cloud.resource_map(&scope)?))
}

/// Create a one-time join token for a new host.
#[utoipa::path(post, path = "/v1/join-tokens", request_body = JoinTokenRequest,
    responses((status = 201, body = JoinTokenView), (status = 400, body = ErrorBody)))]
pub(crate) async fn create_join_token(
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
            expires_at: super::rfc3339(expires_ms),
            command,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::state_rank;

    #[test]
    fn hosts_list_up_then_joining_then_down() {
        let mut states = vec!["down", "weird", "up", "joining"];
        states.sort_by_key(|s| state_rank(s));
        assert_eq!(states, vec!["up", "joining", "down", "weird"]);
    }
}

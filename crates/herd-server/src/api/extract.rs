//! Handlers take their inputs through these extractors so that the caller is
//! authenticated, and a malformed body, path or query refused with a stable error code,
//! before any handler runs.

use super::{ApiError, AppState, AuditNote};
use crate::access::{Perm, Principal};
use crate::auth::{self, Identity};
use crate::cloud::{Cloud, CloudError, Metrics};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header;
use axum::http::request::Parts;
use axum::Json;
use herd_proto::wire::HostId;
use serde::de::DeserializeOwned;

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
    let header = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    identify(parts, cloud, auth::bearer(header))
}

fn identify(parts: &Parts, cloud: &Cloud, token: Option<&str>) -> Result<Identity, ApiError> {
    Metrics::inc(&cloud.metrics.api_requests);
    let identity = cloud.authenticate(token);
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
#[derive(Clone)]
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
            .map_err(|d| crate::cloud::tenancy::denied(d, kind, id).into())
    }

    pub fn check_cloud_admin(&self) -> Result<(), ApiError> {
        self.principal
            .check_cloud_admin()
            .map_err(|_| ApiError::forbidden("only a cloud admin may do this"))
    }
}

impl User {
    fn of(parts: &Parts, identity: Identity) -> Result<User, ApiError> {
        match identity {
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

    /// The user behind a token that came some other way than the `Authorization`
    /// header (the web UI keeps it behind a session cookie), checked the same way.
    pub(crate) fn with_token(parts: &Parts, cloud: &Cloud, token: &str) -> Result<User, ApiError> {
        User::of(parts, identify(parts, cloud, Some(token))?)
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, cloud: &AppState) -> Result<Self, ApiError> {
        User::of(parts, identity(parts, cloud)?)
    }
}

/// A cloud-wide admin. Only made by checking ([`CloudAdmin::of`] or the extractor), so
/// holding one proves the check was done.
pub struct CloudAdmin(pub(super) User);

impl CloudAdmin {
    pub fn of(user: User) -> Result<CloudAdmin, ApiError> {
        user.check_cloud_admin()?;
        Ok(CloudAdmin(user))
    }
}

impl FromRequestParts<AppState> for CloudAdmin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, cloud: &AppState) -> Result<Self, ApiError> {
        CloudAdmin::of(User::from_request_parts(parts, cloud).await?)
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

//! Who is asking, for the UI: the session cookie's user, authenticated anew on every
//! request; and for forms, the proof that the form came from one of our pages.

use super::layout;
use super::session::{self, Session};
use super::{Web, WebState};
use crate::api::{ApiError, User};
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::de::DeserializeOwned;

/// Why a UI request did not produce its page.
#[derive(Debug)]
pub enum WebError {
    /// No live session: go and log in, then come back to `next`.
    LoginNeeded { next: String },
    /// What the API would have answered, shown as a page.
    Api(ApiError),
}

impl From<ApiError> for WebError {
    fn from(err: ApiError) -> WebError {
        WebError::Api(err)
    }
}

impl From<crate::cloud::CloudError> for WebError {
    fn from(err: crate::cloud::CloudError) -> WebError {
        WebError::Api(err.into())
    }
}

impl WebError {
    pub fn refused(message: impl Into<String>) -> WebError {
        WebError::Api(ApiError::forbidden(message))
    }

    pub fn bad_form(message: impl Into<String>) -> WebError {
        WebError::Api(ApiError::bad_request("invalid_form", message))
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        match self {
            WebError::LoginNeeded { next } => {
                let query = serde_urlencoded::to_string([("next", &next)]).unwrap_or_default();
                let target = format!("/ui/login?{query}");
                Redirect::to(&target).into_response()
            }
            WebError::Api(err) => {
                let mut response =
                    (err.status, layout::error_page(err.status, &err.message)).into_response();
                // For the audit log, as the API's errors carry it.
                response
                    .extensions_mut()
                    .insert(crate::api::ErrorCode(err.code));
                response
            }
        }
    }
}

/// A logged-in user of the UI.
pub struct Caller {
    pub user: User,
    pub session_id: String,
    pub session: Session,
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.user.principal.user
    }

    pub fn is_cloud_admin(&self) -> bool {
        self.user.principal.cloud_admin
    }

    /// Whether the caller holds `perm` in `project` (what to show; the API's handlers
    /// check again when asked to act).
    pub fn may(&self, project: &str, perm: crate::access::Perm) -> bool {
        self.user.principal.check(project, perm).is_ok()
    }

    pub(super) fn authenticate(parts: &Parts, web: &Web) -> Result<Caller, WebError> {
        // Back to the page after logging in; a form's target is no page to return to.
        let next = match parts.method {
            Method::GET | Method::HEAD => parts
                .uri
                .path_and_query()
                .map_or("/ui".to_owned(), |p| p.as_str().to_owned()),
            _ => "/ui".to_owned(),
        };
        let login = || WebError::LoginNeeded { next: next.clone() };
        let id = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(session::cookie_id)
            .ok_or_else(login)?;
        let session = web
            .sessions
            .get(id, crate::store::now_ms())
            .ok_or_else(login)?;
        match User::with_token(parts, &web.cloud, &session.token) {
            Ok(user) => Ok(Caller {
                user,
                session_id: id.to_owned(),
                session,
            }),
            Err(err) if err.status == StatusCode::UNAUTHORIZED => {
                // The token was revoked or expired: the session goes with it.
                web.sessions.close(id);
                Err(login())
            }
            Err(err) => Err(err.into()),
        }
    }
}

impl FromRequestParts<WebState> for Caller {
    type Rejection = WebError;
    async fn from_request_parts(parts: &mut Parts, web: &WebState) -> Result<Self, WebError> {
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            // A form must prove where it came from: see `Posted`.
            return Err(WebError::refused("this form lacks its CSRF token"));
        }
        Caller::authenticate(parts, web)
    }
}

/// A form posted from one of our own pages by a logged-in user: the request's Origin
/// (when the browser sends one, as all do on POST) is this server, and the form's
/// `csrf` field is the session's token. `T` is the form's other fields.
pub struct Posted<T> {
    pub caller: Caller,
    pub form: T,
}

/// The Origin header, when present, must name the host the request was sent to.
pub fn same_origin(parts: &Parts) -> bool {
    let Some(origin) = parts.headers.get(header::ORIGIN) else {
        return true;
    };
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()));
    match (origin.to_str().ok(), host) {
        (Some(origin), Some(host)) => {
            let origin_host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            origin_host == Some(host)
        }
        _ => false,
    }
}

/// The body of a form, checked against the session's CSRF token, then parsed.
pub(super) async fn form_body<T: DeserializeOwned>(
    req: Request,
    web: &WebState,
    csrf: Option<&str>,
) -> Result<(Parts, T), WebError> {
    let (parts, body) = req.into_parts();
    if !same_origin(&parts) {
        return Err(WebError::refused(
            "this form was sent from another site's page",
        ));
    }
    let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), web)
        .await
        .map_err(|_| WebError::bad_form("the form is too large or unreadable"))?;
    if let Some(expected) = csrf {
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
            .map_err(|e| WebError::bad_form(format!("the form is not readable: {e}")))?;
        let sent = fields
            .iter()
            .find(|(name, _)| name == "csrf")
            .map(|(_, value)| value.as_str());
        if !sent.is_some_and(|sent| session::same_secret(sent, expected)) {
            return Err(WebError::refused(
                "this form's CSRF token is missing or out of date; reload the page and try again",
            ));
        }
    }
    let form = serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| WebError::bad_form(format!("the form is not valid: {e}")))?;
    Ok((parts, form))
}

impl<T: DeserializeOwned> FromRequest<WebState> for Posted<T> {
    type Rejection = WebError;
    async fn from_request(req: Request, web: &WebState) -> Result<Self, WebError> {
        let (parts, body) = req.into_parts();
        let caller = Caller::authenticate(&parts, web)?;
        let csrf = caller.session.csrf.clone();
        let (_, form) = form_body(Request::from_parts(parts, body), web, Some(&csrf)).await?;
        Ok(Posted { caller, form })
    }
}

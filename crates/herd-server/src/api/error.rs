//! The one error type of the REST API: a status, a stable machine-readable code, and a
//! message for people. Internals (SQL errors, paths) are logged, never returned.

use crate::cloud::CloudError;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tracing::error;
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `not_found`, `invalid_request`, `unknown_field`.
    pub code: String,
    pub message: String,
}

/// The stable code of an error response, for the audit log.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<CloudError> for ApiError {
    fn from(err: CloudError) -> ApiError {
        match err {
            CloudError::NotFound { .. } => ApiError::not_found(err.to_string()),
            CloudError::Invalid { .. } => ApiError::bad_request("invalid_request", err.to_string()),
            CloudError::Conflict { code, message } => {
                ApiError::new(StatusCode::CONFLICT, code, message)
            }
            CloudError::Unauthorized => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing, unknown or expired token",
            ),
            CloudError::Forbidden => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "your role does not allow this; ask an admin of the project",
            ),
            CloudError::Store(crate::store::StoreError::NameTaken { project, name }) => {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "name_taken",
                    format!("a VM named {name:?} already exists in project {project:?}"),
                )
            }
            CloudError::Store(_) | CloudError::Bus(_) | CloudError::Commit(_) => {
                let mut chain = err.to_string();
                let mut source = std::error::Error::source(&err);
                while let Some(cause) = source {
                    chain.push_str(": ");
                    chain.push_str(&cause.to_string());
                    source = cause.source();
                }
                error!("internal error: {chain}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server log",
                )
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        match rejection {
            JsonRejection::JsonDataError(e) => {
                let text = e.body_text();
                let detail = text
                    .split_once(": ")
                    .map(|(_, rest)| rest.to_owned())
                    .unwrap_or(text);
                let code = if detail.contains("unknown field") {
                    "unknown_field"
                } else {
                    "invalid_body"
                };
                ApiError::bad_request(code, format!("request body: {detail}"))
            }
            JsonRejection::JsonSyntaxError(e) => {
                let text = e.body_text();
                let detail = text
                    .split_once(": ")
                    .map(|(_, rest)| rest.to_owned())
                    .unwrap_or(text);
                ApiError::bad_request(
                    "malformed_json",
                    format!("request body is not JSON: {detail}"),
                )
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            ),
            JsonRejection::BytesRejection(e) => {
                let status = e.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        status,
                        "body_too_large",
                        "request body is larger than 64 KiB",
                    )
                } else {
                    ApiError::new(status, "invalid_body", e.body_text())
                }
            }
            other => ApiError::bad_request("invalid_body", other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        let text = rejection.body_text();
        let detail = text
            .split_once(": ")
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or(text);
        ApiError::bad_request("invalid_query", format!("query string: {detail}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        // The audit layer records the code as the request's result.
        response.extensions_mut().insert(ErrorCode(self.code));
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

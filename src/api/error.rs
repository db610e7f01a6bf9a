//! The one place where errors become HTTP status codes and the JSON error shape
//! `{"error": {"code": "...", "message": "..."}}`.

use crate::model::Status;
use crate::store::StoreError;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApiError {
    /// The body or a parameter is well-formed but not acceptable.
    #[error("{0}")]
    Validation(String),
    /// The body is not JSON at all.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("{0:?} is not a UUID")]
    InvalidUuid(String),
    #[error("no request {0}")]
    NotFound(String),
    #[error("no such route")]
    NoRoute,
    #[error(
        "cannot change a {current} request to {target}; {}",
        allowed_text(allowed)
    )]
    Conflict {
        current: Status,
        target: Status,
        allowed: Vec<Status>,
    },
    #[error("missing or wrong bearer token (Authorization: Bearer <SQLITE_SIM_API_TOKEN>)")]
    Unauthorized,
    #[error("database busy, retry shortly: {0}")]
    Busy(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn allowed_text(allowed: &[Status]) -> String {
    if allowed.is_empty() {
        "it allows no change".to_string()
    } else {
        let names: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
        format!("allowed: {}", names.join(", "))
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

impl ApiError {
    /// HTTP status and stable machine-readable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_error"),
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::InvalidUuid(_) => (StatusCode::BAD_REQUEST, "invalid_uuid"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, "invalid_transition"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "database_busy"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _))
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                ApiError::Busy(e.to_string())
            }
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => ApiError::Validation(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => ApiError::MalformedJson(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge
            }
            other => ApiError::Validation(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::Validation(r.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_never_5xx() {
        for e in [
            ApiError::Validation("x".into()),
            ApiError::MalformedJson("x".into()),
            ApiError::UnsupportedMediaType,
            ApiError::PayloadTooLarge,
            ApiError::InvalidUuid("x".into()),
            ApiError::NotFound("x".into()),
            ApiError::NoRoute,
            ApiError::Unauthorized,
            ApiError::Conflict {
                current: Status::Done,
                target: Status::Hold,
                allowed: vec![],
            },
        ] {
            assert!(e.status_and_code().0.is_client_error(), "{e}");
        }
        assert_eq!(
            ApiError::Busy("x".into()).status_and_code().0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let c = ApiError::Conflict {
            current: Status::Running,
            target: Status::Pending,
            allowed: vec![Status::Hold, Status::Cancelled],
        };
        assert_eq!(
            c.to_string(),
            "cannot change a running request to pending; allowed: hold, cancelled"
        );
    }
}

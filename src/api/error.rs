//! The one place where errors become HTTP status codes and the JSON error shape
//! `{"error": {"code": "...", "message": "..."}}`. The OpenAPI document takes its error
//! responses from here too ([`ErrorCode::status`], the input families below and the markers
//! such as [`InvalidTransitionResponse`]), so what it documents is what the server answers.

use crate::model::Status;
use crate::store::StoreError;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::collections::BTreeMap;
use thiserror::Error;
use utoipa::openapi::{RefOr, ResponseBuilder};

#[derive(Debug, Error)]
pub enum ApiError {
    /// The body or a parameter is well-formed but not acceptable.
    #[error("{0}")]
    Validation(String),
    /// The body is not JSON at all.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// A `multipart/form-data` body that does not parse.
    #[error("malformed multipart body: {0}")]
    MalformedMultipart(String),
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("request body must be JSON (Content-Type: application/json) or multipart/form-data")]
    UnsupportedSubmission,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("the files carry at least {size} bytes; SQLITE_SIM_MAX_UPLOAD allows {limit}")]
    UploadTooLarge { size: u64, limit: u64 },
    #[error(
        "the multipart body passes {limit} bytes: SQLITE_SIM_MAX_UPLOAD plus room for the \
         request part and the part headers"
    )]
    MultipartTooLarge { limit: u64 },
    #[error("the request part passes {limit} bytes")]
    RequestPartTooLarge { limit: usize },
    #[error("{0:?} is not a UUID")]
    InvalidUuid(String),
    #[error("no request {0}")]
    NotFound(String),
    /// The name as shown in the message (quoted, or described when it cannot be shown).
    #[error("{0} is not a VM name: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    InvalidName(String),
    #[error("unknown VM {name:?}; available: {}", if available.is_empty() { "none".to_string() } else { available.join(", ") })]
    UnknownVm {
        name: String,
        available: Vec<String>,
    },
    #[error("VM {0} has no template")]
    NoTemplate(String),
    #[error("VM {0} does not set WARM=\"on\" in its config, so no request would use a template")]
    NotWarm(String),
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed on this route; the Allow header lists the allowed ones")]
    MethodNotAllowed,
    #[error(
        "cannot change a {current} request to {target}; {}",
        allowed_text(allowed)
    )]
    Conflict {
        current: Status,
        target: Status,
        allowed: Vec<Status>,
    },
    #[error("cannot release a {0} request: only a run kept after a failure (running with kept_until set) can be released")]
    NotKept(Status),
    #[error("this is a WebSocket endpoint: connect with Upgrade: websocket")]
    UpgradeRequired,
    #[error("missing, unknown, expired or revoked bearer token (Authorization: Bearer <token>)")]
    Unauthorized,
    /// A valid token whose role may not do this; the message says what may.
    #[error("{0}")]
    Forbidden(String),
    #[error("token name {0:?} already has an active token: revoke it first")]
    NameTaken(String),
    #[error("no active token named {0:?}")]
    NoSuchToken(String),
    /// The labels a submission requires are had by no registered host; the words name what
    /// each one lacks.
    #[error("{0}")]
    NoCapableHost(String),
    #[error("database busy, retry shortly: {0}")]
    Busy(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A refused `callback_url` (bad URL, or a host `SQLITE_SIM_WEBHOOK_ALLOW` does not list) is
/// a `422 validation_error` whose message names the host and the variable.
impl From<crate::webhooks::WebhookError> for ApiError {
    fn from(e: crate::webhooks::WebhookError) -> Self {
        ApiError::Validation(e.to_string())
    }
}

/// The stable, machine-readable `code` of an error, which fixes its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorCode {
    MalformedJson,
    MalformedMultipart,
    InvalidUuid,
    InvalidName,
    Unauthorized,
    Forbidden,
    NotFound,
    NoRoute,
    MethodNotAllowed,
    InvalidTransition,
    NotWarm,
    NameTaken,
    UpgradeRequired,
    PayloadTooLarge,
    UnsupportedMediaType,
    Validation,
    NoCapableHost,
    Internal,
    DatabaseBusy,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::MalformedJson,
        ErrorCode::MalformedMultipart,
        ErrorCode::InvalidUuid,
        ErrorCode::InvalidName,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::NoRoute,
        ErrorCode::MethodNotAllowed,
        ErrorCode::InvalidTransition,
        ErrorCode::NotWarm,
        ErrorCode::NameTaken,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::Validation,
        ErrorCode::NoCapableHost,
        ErrorCode::UpgradeRequired,
        ErrorCode::Internal,
        ErrorCode::DatabaseBusy,
    ];

    /// The HTTP status every error with this code is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::MalformedJson
            | ErrorCode::MalformedMultipart
            | ErrorCode::InvalidUuid
            | ErrorCode::InvalidName => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound | ErrorCode::NoRoute => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::InvalidTransition | ErrorCode::NotWarm | ErrorCode::NameTaken => {
                StatusCode::CONFLICT
            }
            ErrorCode::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::Validation | ErrorCode::NoCapableHost => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::DatabaseBusy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::MalformedMultipart => "malformed_multipart",
            ErrorCode::InvalidUuid => "invalid_uuid",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NoRoute => "no_route",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::InvalidTransition => "invalid_transition",
            ErrorCode::NotWarm => "not_warm",
            ErrorCode::UpgradeRequired => "upgrade_required",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::Validation => "validation_error",
            ErrorCode::NoCapableHost => "no_capable_host",
            ErrorCode::Internal => "internal",
            ErrorCode::DatabaseBusy => "database_busy",
        }
    }

    /// When it is answered, for the OpenAPI document.
    pub fn meaning(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => {
                "the body (or the `request` part of a multipart body) is not well-formed JSON"
            }
            ErrorCode::MalformedMultipart => {
                "the body is not well-formed `multipart/form-data` (no boundary, a part cut short)"
            }
            ErrorCode::InvalidUuid => "the `uuid` in the path is not a UUID",
            ErrorCode::InvalidName => "the `name` in the path is not a VM name",
            ErrorCode::Unauthorized => {
                "missing, unknown, expired or revoked `Authorization: Bearer` token"
            }
            ErrorCode::Forbidden => {
                "the token is valid but its role may not do this (the operation's description \
                 names the roles that may), or a submission's `priority` is above a submitter \
                 token's allowance (`SQLITE_SIM_MAX_SUBMITTER_PRIORITY`)"
            }
            ErrorCode::NameTaken => "the token name already has an active token; revoke it first",
            ErrorCode::NotFound => {
                "the request, VM, template or artifact that the path names does not exist"
            }
            ErrorCode::NoRoute => "no route has this path",
            ErrorCode::MethodNotAllowed => "the route does not take this method",
            ErrorCode::InvalidTransition => {
                "the request's state does not allow the change; the message names the allowed targets"
            }
            ErrorCode::NotWarm => {
                "the VM's config does not set `WARM=\"on\"`, so no request would use a template"
            }
            ErrorCode::UpgradeRequired => {
                "a WebSocket endpoint was called without `Upgrade: websocket`"
            }
            ErrorCode::PayloadTooLarge => {
                "a JSON body is larger than 128 KiB (a multipart body's `request` part, 1 MiB), \
                 or the files a submission carries pass `SQLITE_SIM_MAX_UPLOAD`"
            }
            ErrorCode::UnsupportedMediaType => {
                "the body is not sent as `application/json` (or as `multipart/form-data`, where \
                 the operation takes it)"
            }
            ErrorCode::Validation => {
                "a parameter or the body breaks a rule of its schema, or the VM it names has a \
                 config that does not load; the message says which"
            }
            ErrorCode::NoCapableHost => {
                "hosts have reported, but none has every label the request requires (its VM \
                 config's `REQUIRES` and its `requires`); the message names what each lacks"
            }
            ErrorCode::Internal => "a server fault, never caused by the input",
            ErrorCode::DatabaseBusy => "the database stayed locked; retry shortly",
        }
    }
}

/// Errors every operation can answer with: each one reads or writes the database.
pub const ANY_OPERATION: &[ErrorCode] = &[ErrorCode::DatabaseBusy, ErrorCode::Internal];
/// Errors a `{uuid}` path parameter brings: it is parsed, then looked up.
pub const UUID_PATH: &[ErrorCode] = &[ErrorCode::InvalidUuid, ErrorCode::NotFound];
/// Errors a `{name}` (VM name) path parameter brings: it is checked, then looked up.
pub const NAME_PATH: &[ErrorCode] = &[ErrorCode::InvalidName, ErrorCode::NotFound];
/// Errors query or header parameters bring (unknown query parameters are refused too).
pub const PARAMETERS: &[ErrorCode] = &[ErrorCode::Validation];
/// Errors a JSON request body brings: what `From<JsonRejection>` below maps to, plus the rules
/// the handler checks itself.
pub const JSON_BODY: &[ErrorCode] = &[
    ErrorCode::MalformedJson,
    ErrorCode::UnsupportedMediaType,
    ErrorCode::PayloadTooLarge,
    ErrorCode::Validation,
];
/// Errors a `multipart/form-data` body brings, beyond a JSON body's: it may not parse, its
/// `request` part is JSON, and its files are checked and counted.
pub const MULTIPART_BODY: &[ErrorCode] = &[
    ErrorCode::MalformedMultipart,
    ErrorCode::MalformedJson,
    ErrorCode::PayloadTooLarge,
    ErrorCode::Validation,
];
/// Errors an artifact's `{path}` brings: it names one of the request's stored artifacts.
pub const ARTIFACT_PATH: &[ErrorCode] = &[ErrorCode::NotFound];
/// Errors of an operation behind the bearer token, when authentication is on.
pub const AUTHENTICATED: &[ErrorCode] = &[ErrorCode::Unauthorized];
/// Errors of an operation that not every role may do, when authentication is on.
pub const AUTHORIZED: &[ErrorCode] = &[ErrorCode::Forbidden];

/// `forbidden` whether or not authentication is on: creating a token over the API while it
/// is off (the first token is made with the CLI, on the store).
pub struct ForbiddenResponse;

impl utoipa::IntoResponses for ForbiddenResponse {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        declared(&[ErrorCode::Forbidden])
    }
}

/// `name_taken`: creating a token whose name has an active one.
pub struct NameTakenResponse;

impl utoipa::IntoResponses for NameTakenResponse {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        declared(&[ErrorCode::NameTaken])
    }
}

/// The OpenAPI extension through which an operation declares error codes its inputs do not
/// imply; the document builder turns them into responses and removes it.
pub const DECLARED_CODES: &str = "x-error-codes";

/// Declares, in a handler's `responses(...)`, the errors of an operation that its inputs do not
/// imply, by code; their statuses come from [`ErrorCode::status`].
fn declared(codes: &[ErrorCode]) -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
    let mut by_status: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for c in codes {
        by_status
            .entry(c.status().as_u16().to_string())
            .or_default()
            .push(c.as_str());
    }
    by_status
        .into_iter()
        .map(|(status, names)| {
            let extensions = utoipa::openapi::extensions::ExtensionsBuilder::new()
                .add(DECLARED_CODES, names)
                .build();
            let response = ResponseBuilder::new()
                .description("declared error")
                .extensions(Some(extensions))
                .build();
            (status, RefOr::T(response))
        })
        .collect()
}

/// `invalid_transition`: for operations that change a request's state.
pub struct InvalidTransitionResponse;

impl utoipa::IntoResponses for InvalidTransitionResponse {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        declared(&[ErrorCode::InvalidTransition])
    }
}

/// `not_warm`: for operations that only make sense for a VM with `WARM="on"`.
pub struct UpgradeRequiredResponse;

impl utoipa::IntoResponses for UpgradeRequiredResponse {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        declared(&[ErrorCode::UpgradeRequired])
    }
}

pub struct NotWarmResponse;

impl utoipa::IntoResponses for NotWarmResponse {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        declared(&[ErrorCode::NotWarm])
    }
}

/// `validation_error` for an operation without a body or query: the VM it names has a config
/// that does not load.
pub struct InvalidVmConfigResponse;

impl utoipa::IntoResponses for InvalidVmConfigResponse {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        declared(&[ErrorCode::Validation])
    }
}

/// `no_capable_host`: for submissions, whose required labels no registered host has.
pub struct NoCapableHostResponse;

impl utoipa::IntoResponses for NoCapableHostResponse {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        declared(&[ErrorCode::NoCapableHost])
    }
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
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Validation(_) => ErrorCode::Validation,
            ApiError::MalformedJson(_) => ErrorCode::MalformedJson,
            ApiError::MalformedMultipart(_) => ErrorCode::MalformedMultipart,
            ApiError::UnsupportedMediaType | ApiError::UnsupportedSubmission => {
                ErrorCode::UnsupportedMediaType
            }
            ApiError::PayloadTooLarge
            | ApiError::UploadTooLarge { .. }
            | ApiError::MultipartTooLarge { .. }
            | ApiError::RequestPartTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::InvalidUuid(_) => ErrorCode::InvalidUuid,
            ApiError::NotFound(_)
            | ApiError::UnknownVm { .. }
            | ApiError::NoTemplate(_)
            | ApiError::NoSuchToken(_) => ErrorCode::NotFound,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::NameTaken(_) => ErrorCode::NameTaken,
            ApiError::InvalidName(_) => ErrorCode::InvalidName,
            ApiError::NotWarm(_) => ErrorCode::NotWarm,
            ApiError::NoRoute => ErrorCode::NoRoute,
            ApiError::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            ApiError::Conflict { .. } | ApiError::NotKept(_) => ErrorCode::InvalidTransition,
            ApiError::UpgradeRequired => ErrorCode::UpgradeRequired,
            ApiError::Unauthorized => ErrorCode::Unauthorized,
            ApiError::NoCapableHost(_) => ErrorCode::NoCapableHost,
            ApiError::Busy(_) => ErrorCode::DatabaseBusy,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// HTTP status and stable machine-readable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        let code = self.code();
        (code.status(), code.as_str())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // The body was left unread: the connection cannot carry another request.
        let unread = matches!(
            self,
            ApiError::MultipartTooLarge { .. } | ApiError::MalformedMultipart(_)
        );
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
        if status == StatusCode::UPGRADE_REQUIRED {
            resp.headers_mut().insert(
                axum::http::header::UPGRADE,
                axum::http::HeaderValue::from_static("websocket"),
            );
        }
        if unread {
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
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
    /// Engine-neutral: SQLite's busy/locked and PostgreSQL's unreachable server (down,
    /// restarting, connection lost after the store's own retries) are both a 503 to retry;
    /// everything else (a constraint, a full disk, a corrupt row) is a 500 on either engine.
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            ApiError::Busy(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
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

impl From<MultipartRejection> for ApiError {
    fn from(r: MultipartRejection) -> Self {
        ApiError::MalformedMultipart(r.body_text())
    }
}

impl ApiError {
    /// A multipart body that failed to read: past its route's limit (`limit` bytes), or
    /// malformed.
    pub fn from_multipart(e: MultipartError, limit: u64) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::MultipartTooLarge { limit }
        } else {
            ApiError::MalformedMultipart(e.body_text())
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
            ApiError::MalformedMultipart("x".into()),
            ApiError::UnsupportedMediaType,
            ApiError::UnsupportedSubmission,
            ApiError::PayloadTooLarge,
            ApiError::UploadTooLarge { size: 2, limit: 1 },
            ApiError::MultipartTooLarge { limit: 1 },
            ApiError::RequestPartTooLarge { limit: 1 },
            ApiError::InvalidUuid("x".into()),
            ApiError::NotFound("x".into()),
            ApiError::InvalidName("x".into()),
            ApiError::UnknownVm {
                name: "x".into(),
                available: vec![],
            },
            ApiError::NoTemplate("x".into()),
            ApiError::NotWarm("x".into()),
            ApiError::NoRoute,
            ApiError::MethodNotAllowed,
            ApiError::Unauthorized,
            ApiError::Forbidden("x".into()),
            ApiError::NameTaken("x".into()),
            ApiError::NoSuchToken("x".into()),
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

    #[test]
    fn codes_are_distinct_and_all_listed() {
        let names: std::collections::BTreeSet<&str> =
            ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        // The statuses README's errors table documents.
        let table: Vec<(u16, &str)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.status().as_u16(), c.as_str()))
            .collect();
        assert_eq!(
            table,
            [
                (400, "malformed_json"),
                (400, "malformed_multipart"),
                (400, "invalid_uuid"),
                (400, "invalid_name"),
                (401, "unauthorized"),
                (403, "forbidden"),
                (404, "not_found"),
                (404, "no_route"),
                (405, "method_not_allowed"),
                (409, "invalid_transition"),
                (409, "not_warm"),
                (409, "name_taken"),
                (413, "payload_too_large"),
                (415, "unsupported_media_type"),
                (422, "validation_error"),
                (422, "no_capable_host"),
                (426, "upgrade_required"),
                (500, "internal"),
                (503, "database_busy"),
            ]
        );
    }

    #[test]
    fn markers_declare_codes_by_status() {
        use utoipa::IntoResponses;
        let r = InvalidTransitionResponse::responses();
        let v = serde_json::to_value(&r["409"]).unwrap();
        assert_eq!(v[DECLARED_CODES], serde_json::json!(["invalid_transition"]));
        assert_eq!(r.len(), 1);
        let r = NotWarmResponse::responses();
        assert_eq!(
            serde_json::to_value(&r["409"]).unwrap()[DECLARED_CODES],
            serde_json::json!(["not_warm"])
        );
        let r = InvalidVmConfigResponse::responses();
        assert_eq!(
            serde_json::to_value(&r["422"]).unwrap()[DECLARED_CODES],
            serde_json::json!(["validation_error"])
        );
    }

    #[test]
    fn store_errors_map_the_same_on_both_engines() {
        use crate::store::postgres::PgError;
        let sqlite_busy = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        let pg_down = StoreError::Postgres(PgError::Pool("connection refused".into()));
        for e in [sqlite_busy, pg_down] {
            assert_eq!(
                ApiError::from(e).status_and_code().0,
                StatusCode::SERVICE_UNAVAILABLE
            );
        }
        let corrupt = StoreError::Corrupt("x".into());
        assert_eq!(
            ApiError::from(corrupt).status_and_code().0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}

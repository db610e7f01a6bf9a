//! `/requests` resource: submit, read, read logs.

use super::error::ApiError;
use super::AppState;
use crate::config::vm::{is_valid_vm_name, VmConfigError};
use crate::model::{LogEntry, LogType, NewRequest, Request, RequestId, Status};
use crate::store::LogQuery;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};

/// Largest accepted `commands` text.
pub const MAX_COMMANDS: usize = 64 * 1024;

/// `POST /requests` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub vm_name: String,
    pub commands: String,
    pub timeout: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct Created {
    pub uuid: RequestId,
    pub status: Status,
    pub message: &'static str,
}

/// Checks a submission against the settings and the VMs that exist; nothing is stored on error.
fn validate(state: &AppState, body: CreateBody) -> Result<NewRequest, ApiError> {
    if !is_valid_vm_name(&body.vm_name) {
        let shown: String = body.vm_name.chars().take(80).collect();
        return Err(ApiError::Validation(format!(
            "vm_name {shown:?} is invalid: use 1-64 letters, digits, '.', '_' or '-', starting \
             with a letter or digit; available: {}",
            state.catalog.available().join(", ")
        )));
    }
    match state.catalog.load(&body.vm_name) {
        Ok(_) => {}
        Err(e @ VmConfigError::Unknown { .. }) => return Err(ApiError::Validation(e.to_string())),
        Err(e) => {
            return Err(ApiError::Validation(format!(
                "VM {} is misconfigured: {e}",
                body.vm_name
            )))
        }
    }
    if body.commands.trim().is_empty() {
        return Err(ApiError::Validation("commands must not be empty".into()));
    }
    if body.commands.len() > MAX_COMMANDS {
        return Err(ApiError::Validation(format!(
            "commands is {} bytes; the limit is {MAX_COMMANDS}",
            body.commands.len()
        )));
    }
    let max = state.settings.max_timeout;
    let timeout = body.timeout.unwrap_or(state.settings.default_timeout);
    if timeout == 0 || timeout > max {
        return Err(ApiError::Validation(format!(
            "timeout must be from 1 to {max} seconds, got {timeout}"
        )));
    }
    Ok(NewRequest {
        vm_name: body.vm_name,
        commands: body.commands,
        timeout,
    })
}

pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(body) = body?;
    let new = validate(&state, body)?;
    let req = state.store.create(new).await?;
    tracing::info!(request = %req.uuid, vm = %req.vm_name, "request created");
    state.wake.notify_waiters();
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/requests/{}", req.uuid))],
        Json(Created {
            uuid: req.uuid,
            status: req.status,
            message: "Request created successfully",
        }),
    ))
}

pub(super) fn parse_id(raw: &str) -> Result<RequestId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::InvalidUuid(raw.chars().take(80).collect()))
}

pub(super) async fn load(state: &AppState, raw: &str) -> Result<Request, ApiError> {
    let id = parse_id(raw)?;
    state
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(id.to_string()))
}

pub async fn show(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
) -> Result<Json<Request>, ApiError> {
    Ok(Json(load(&state, &uuid).await?))
}

/// `GET /requests/{uuid}/logs` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    pub log_type: Option<String>,
    pub after: Option<i64>,
    pub limit: Option<u32>,
}

/// One log entry as JSON; `output` is the bytes as UTF-8 (invalid sequences replaced; the
/// exact bytes are in the database).
#[derive(Debug, Serialize)]
pub struct LogView {
    pub id: i64,
    pub timestamp: String,
    pub log_type: LogType,
    pub output: String,
}

impl From<LogEntry> for LogView {
    fn from(e: LogEntry) -> Self {
        LogView {
            id: e.id,
            timestamp: e.timestamp,
            log_type: e.log_type,
            output: String::from_utf8_lossy(&e.output).into_owned(),
        }
    }
}

pub async fn logs(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
    params: Result<Query<LogParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<LogView>>, ApiError> {
    let Query(p) = params?;
    let req = load(&state, &uuid).await?;
    let log_type = p
        .log_type
        .map(|t| t.parse::<LogType>())
        .transpose()
        .map_err(|e| ApiError::Validation(e.to_string()))?;
    if p.limit == Some(0) || p.limit.is_some_and(|l| l > 100_000) {
        return Err(ApiError::Validation(
            "limit must be from 1 to 100000".into(),
        ));
    }
    let entries = state
        .store
        .logs(
            req.uuid,
            LogQuery {
                log_type,
                after: p.after,
                limit: p.limit,
            },
        )
        .await?;
    Ok(Json(entries.into_iter().map(LogView::from).collect()))
}

//! `/requests`: submit, list, read, control (hold/resume/cancel) and delete.

use super::error::ApiError;
use super::AppState;
use crate::config::vm::{is_valid_vm_name, VmConfigError};
use crate::model::{NewRequest, Request, RequestId, Status};
use crate::store::{ControlOutcome, DeleteOutcome, RequestQuery};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::ToSchema;

/// Largest accepted `commands` text.
pub const MAX_COMMANDS: usize = 64 * 1024;
/// How long a control call waits for the owning agent to apply the change before answering
/// `202 Accepted` with `"applied": false`.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// `POST /requests` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`, naming a config or image.
    pub vm_name: String,
    /// Shell script run in the guest (1 byte to 64 KiB).
    pub commands: String,
    /// Seconds, from 1 to `SQLITE_SIM_MAX_TIMEOUT`; default `SQLITE_SIM_DEFAULT_TIMEOUT`.
    pub timeout: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
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

/// Submit a request.
#[utoipa::path(post, path = "/requests", request_body = CreateBody, tag = "requests",
    responses((status = 201, body = Created), (status = 422, description = "invalid submission")))]
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

/// One request.
#[utoipa::path(get, path = "/requests/{uuid}", tag = "requests",
    params(("uuid" = String, Path, description = "request id")),
    responses((status = 200, body = Request), (status = 404, description = "no such request")))]
pub async fn show(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
) -> Result<Json<Request>, ApiError> {
    Ok(Json(load(&state, &uuid).await?))
}

/// A page of requests, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestList {
    pub requests: Vec<Request>,
    /// How many requests match the filters in all.
    pub total: u64,
    pub limit: u32,
    pub offset: u32,
}

/// Parses `?status=a&status=b,c&vm_name=x&limit=n&offset=m`.
pub(super) fn parse_list_query(raw: Option<&str>) -> Result<RequestQuery, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::Validation(format!("query: {e}")))?;
    let mut q = RequestQuery {
        limit: 50,
        ..Default::default()
    };
    let number = |k: &str, v: &str, max: u32| -> Result<u32, ApiError> {
        v.parse::<u32>()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| ApiError::Validation(format!("{k} must be a whole number up to {max}")))
    };
    for (k, v) in pairs {
        match k.as_str() {
            "status" => {
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    q.statuses
                        .push(s.parse().map_err(|e: crate::model::UnknownName| {
                            ApiError::Validation(e.to_string())
                        })?);
                }
            }
            "vm_name" => q.vm_name = Some(v),
            "uuid_prefix" => {
                if v.is_empty()
                    || v.len() > 36
                    || !v.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
                {
                    return Err(ApiError::Validation(
                        "uuid_prefix must be 1-36 hex digits or hyphens".into(),
                    ));
                }
                q.uuid_prefix = Some(v.to_ascii_lowercase());
            }
            "limit" => {
                q.limit = number("limit", &v, 1000)?;
                if q.limit == 0 {
                    return Err(ApiError::Validation("limit must be from 1 to 1000".into()));
                }
            }
            "offset" => q.offset = number("offset", &v, u32::MAX)?,
            other => {
                return Err(ApiError::Validation(format!(
                    "unknown query parameter {other:?}; use status, vm_name, uuid_prefix, limit, offset"
                )))
            }
        }
    }
    Ok(q)
}

/// List requests: `status` (repeatable or comma-separated), `vm_name`, `limit` (default 50,
/// at most 1000), `offset`; newest first.
#[utoipa::path(get, path = "/requests", tag = "requests",
    params(
        ("status" = Option<Vec<Status>>, Query, description = "repeatable"),
        ("vm_name" = Option<String>, Query),
        ("uuid_prefix" = Option<String>, Query, description = "requests whose id starts with this"),
        ("limit" = Option<u32>, Query, description = "1..=1000, default 50"),
        ("offset" = Option<u32>, Query),
    ),
    responses((status = 200, body = RequestList)))]
pub async fn list(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<RequestList>, ApiError> {
    let q = parse_list_query(raw.as_deref())?;
    let (limit, offset) = (q.limit, q.offset);
    let (requests, total) = state.store.list(q).await?;
    Ok(Json(RequestList {
        requests,
        total,
        limit,
        offset,
    }))
}

/// `PUT /requests/{uuid}/status` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusBody {
    /// `hold`, `pending` (resume a held request that has no VM yet), `running` (resume a
    /// paused VM) or `cancelled`.
    pub status: Status,
}

/// The request after a control call, and whether the change has taken effect.
#[derive(Debug, Serialize, ToSchema)]
pub struct ControlResponse {
    #[serde(flatten)]
    pub request: Request,
    /// False: recorded, and the owning agent has not applied it yet.
    pub applied: bool,
}

/// Hold, resume or cancel a request.
#[utoipa::path(put, path = "/requests/{uuid}/status", tag = "requests", request_body = StatusBody,
    params(("uuid" = String, Path)),
    responses(
        (status = 200, body = ControlResponse, description = "applied"),
        (status = 202, body = ControlResponse, description = "recorded; the agent applies it"),
        (status = 409, description = "transition not allowed; the allowed ones are listed"),
    ))]
pub async fn set_status(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
    body: Result<Json<StatusBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&uuid)?;
    let Json(body) = body?;
    control(&state, id, body.status).await
}

/// Runs a control change and answers with its effect.
async fn control(state: &AppState, id: RequestId, target: Status) -> Result<Response, ApiError> {
    let outcome = state.store.control(id, target).await?;
    let req = match outcome {
        ControlOutcome::NotFound => return Err(ApiError::NotFound(id.to_string())),
        ControlOutcome::Refused { current, allowed } => {
            return Err(ApiError::Conflict {
                current,
                target,
                allowed,
            })
        }
        ControlOutcome::Applied(req) => {
            tracing::info!(request = %id, status = %req.status, "control applied");
            if req.status == Status::Pending {
                state.wake.notify_waiters();
            }
            return Ok((
                StatusCode::OK,
                Json(ControlResponse {
                    request: req,
                    applied: true,
                }),
            )
                .into_response());
        }
        ControlOutcome::Requested(req) => req,
    };
    tracing::info!(request = %id, desired = %target, "control requested");
    let applied = wait_applied(state, id, target).await?;
    let (code, request) = match applied {
        Some(r) => (StatusCode::OK, r),
        None => (
            StatusCode::ACCEPTED,
            state.store.get(id).await?.unwrap_or(req),
        ),
    };
    let applied = code == StatusCode::OK;
    Ok((code, Json(ControlResponse { request, applied })).into_response())
}

/// Waits (bounded) until the agent has applied `target`; the request as it then is.
async fn wait_applied(
    state: &AppState,
    id: RequestId,
    target: Status,
) -> Result<Option<Request>, ApiError> {
    let mut changes = state.store.subscribe();
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    loop {
        let Some(r) = state.store.get(id).await? else {
            return Ok(None);
        };
        let done = match target {
            Status::Cancelled => r.status.is_terminal(),
            _ => r.desired_status != Some(target),
        };
        if done {
            return Ok(Some(r));
        }
        // Another process's agent is seen by polling; this process's at once.
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
        }
    }
}

/// Cancel an active request (200, or 202 while the agent shuts it down), or delete a finished
/// one and its logs (204).
#[utoipa::path(delete, path = "/requests/{uuid}", tag = "requests",
    params(("uuid" = String, Path)),
    responses(
        (status = 204, description = "finished request deleted with its logs"),
        (status = 200, body = ControlResponse, description = "active request cancelled"),
        (status = 202, body = ControlResponse, description = "cancel recorded; the agent applies it"),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&uuid)?;
    match state.store.delete_finished(id).await? {
        DeleteOutcome::Deleted => {
            tracing::info!(request = %id, "request deleted");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        DeleteOutcome::NotFound => Err(ApiError::NotFound(id.to_string())),
        DeleteOutcome::Active(_) => control(&state, id, Status::Cancelled).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_parsing() {
        let q = parse_list_query(Some(
            "status=running&status=hold,pending&vm_name=tiny&limit=5&offset=10",
        ))
        .unwrap();
        assert_eq!(q.statuses, [Status::Running, Status::Hold, Status::Pending]);
        assert_eq!(q.vm_name.as_deref(), Some("tiny"));
        assert_eq!((q.limit, q.offset), (5, 10));
        assert_eq!(parse_list_query(None).unwrap().limit, 50);
        for bad in [
            "status=finished",
            "limit=0",
            "limit=1001",
            "limit=-1",
            "offset=x",
            "sort=asc",
        ] {
            assert!(parse_list_query(Some(bad)).is_err(), "{bad}");
        }
        let q = parse_list_query(Some("vm_name=%27%3B%20DROP%20TABLE%20requests%3B--")).unwrap();
        assert_eq!(q.vm_name.as_deref(), Some("'; DROP TABLE requests;--"));
    }
}

/// `POST /prune` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneBody {
    /// Delete finished requests that finished more than this many seconds ago.
    pub older_than_seconds: u64,
    /// Only count what would be deleted.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Pruned {
    pub requests: u64,
    pub log_bytes: u64,
    pub dry_run: bool,
    /// Requests that finished before this time were selected.
    pub finished_before: String,
}

/// Delete old finished requests and their logs (active ones are never touched).
#[utoipa::path(post, path = "/prune", tag = "requests", request_body = PruneBody,
    responses((status = 200, body = Pruned)))]
pub async fn prune(
    State(state): State<AppState>,
    body: Result<Json<PruneBody>, JsonRejection>,
) -> Result<Json<Pruned>, ApiError> {
    let Json(body) = body?;
    let cutoff = time::OffsetDateTime::now_utc()
        .checked_sub(time::Duration::seconds(
            i64::try_from(body.older_than_seconds).unwrap_or(i64::MAX),
        ))
        .ok_or_else(|| ApiError::Validation("older_than_seconds is too large".into()))?;
    let before = crate::timefmt::format(cutoff);
    let (requests, log_bytes) = state.store.prune(before.clone(), body.dry_run).await?;
    tracing::info!(requests, log_bytes, dry_run = body.dry_run, "pruned");
    Ok(Json(Pruned {
        requests,
        log_bytes,
        dry_run: body.dry_run,
        finished_before: before,
    }))
}

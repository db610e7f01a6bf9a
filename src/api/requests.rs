//! `/requests`: submit, list, read, control (hold/resume/cancel) and delete.

use super::error::{ApiError, InvalidTransitionResponse, NoCapableHostResponse};
use super::files;
use super::input::{self, Object};
use super::upload;
use super::{AppState, BODY_LIMIT};
use crate::config::vm::{is_valid_vm_name, VmConfigError};
use crate::model::{
    BootChoice, Label, NewRequest, Request, RequestId, Status, CONTROL_TARGETS, MAX_PRIORITY,
    MAX_RETRIES, MIN_PRIORITY,
};
use crate::store::{ControlOutcome, DeleteOutcome, Placement, ReleaseOutcome, RequestQuery};
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// Largest accepted `commands` text, in bytes of UTF-8.
pub const MAX_COMMANDS: usize = 64 * 1024;
/// Most labels a submission may require.
const MAX_REQUIRES: usize = 32;
/// How long a control call waits for the owning agent to apply the change before answering
/// `202 Accepted` with `"applied": false`.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// `POST /requests` body. The document served by this server lists its VMs as the `vm_name`
/// enum and its `SQLITE_SIM_MAX_TIMEOUT` as the `timeout` maximum.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// A VM this server has: a config or an image. Names match
    /// `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`.
    #[schema(
        pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub vm_name: String,
    /// Shell script run in the guest: at most 65536 bytes of UTF-8 (`maxLength` counts
    /// characters, so text with multi-byte characters reaches the byte limit first), with at
    /// least one character that is not ASCII whitespace (space, tab, LF, CR, form feed).
    #[schema(min_length = 1, max_length = 65536, pattern = r"[^\t\n\f\r ]")]
    pub commands: String,
    /// Seconds, from 1 to `SQLITE_SIM_MAX_TIMEOUT`, counted from `running`; absent or null:
    /// `SQLITE_SIM_DEFAULT_TIMEOUT`.
    #[serde(default, deserialize_with = "input::optional_whole_number")]
    #[schema(value_type = Option<i64>, minimum = 1)]
    pub timeout: Option<i128>,
    /// `warm`: restore a clone of the VM's template (cold while it has none ready); only for a
    /// VM whose config sets `WARM="on"` (this document's `anyOf` lists them). `cold`: boot from
    /// the disk image. Absent or null: the VM's `WARM` setting decides.
    #[serde(default)]
    pub boot: Option<BootChoice>,
    /// Small files put in place in the guest before the commands run (larger ones travel as
    /// `multipart/form-data`). Their decoded bytes count against `SQLITE_SIM_MAX_UPLOAD`.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub files: Option<Vec<files::InlineFile>>,
    /// Absolute guest paths or globs (`*`, `?`, `[…]`) collected after the commands, also when
    /// they failed or timed out; a directory brings everything under it.
    #[serde(default)]
    #[schema(max_items = 64, value_type = Option<Vec<files::GuestPath>>)]
    pub artifacts: Option<Vec<String>>,
    /// Labels the host that runs it must have, besides its VM config's `REQUIRES` (e.g.
    /// `big`, `accel:kvm`, `vm:tiny`). Unknown labels are accepted while some host could still
    /// report them; when hosts have reported and none has them all: `422 no_capable_host`.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub requires: Option<Vec<Label>>,
    /// Seconds, from 1 to `SQLITE_SIM_MAX_KEEP`: when the commands exit non-zero, time out or
    /// the run fails after the guest booted, keep the VM up this long (the request stays
    /// `running` with `kept_until` set) to attach to its console; `release`, `cancelled`,
    /// `DELETE` or expiry end it, with the failure's own outcome.
    #[serde(default, deserialize_with = "input::optional_whole_number")]
    #[schema(value_type = Option<i64>, minimum = 1)]
    pub keep_on_failure: Option<i128>,
    /// An `http` URL (no credentials, at most 2048 bytes; `https` is refused: the server's
    /// HTTP client has no TLS) that is POSTed the
    /// request's JSON, signed (`X-Sqlite-Sim-Signature`), once it is `done`, `failed` or
    /// `cancelled`. Its host must be listed in `SQLITE_SIM_WEBHOOK_ALLOW`, else `422`.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub callback_url: Option<String>,
    /// From 0 to 10: how many times a run that fails for an infrastructure reason (QEMU
    /// exiting unexpectedly, a boot timeout, the agent lost or stopping) is re-queued as a new
    /// attempt on a fresh VM. The commands' own outcome (their exit status, their timeout) is
    /// never retried. Absent or null: `SQLITE_SIM_DEFAULT_RETRIES`.
    #[serde(default, deserialize_with = "input::optional_whole_number")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 10)]
    pub retries: Option<i128>,
    /// From -100 to 100; absent or null: 0. Claims take the highest first, and within a level
    /// go round-robin between submitters, oldest first within each. A submitter token may ask
    /// for at most `SQLITE_SIM_MAX_SUBMITTER_PRIORITY` (`403 forbidden` above it); operators
    /// and admins, and everyone while authentication is off, for the whole range.
    #[serde(default, deserialize_with = "input::optional_whole_number")]
    #[schema(value_type = Option<i64>, minimum = -100, maximum = 100)]
    pub priority: Option<i128>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    pub uuid: RequestId,
    pub status: Status,
    pub message: &'static str,
}

/// Checks a submission against the settings and the VMs that exist; nothing is stored on error.
/// Its inline files are returned to be staged.
pub(super) fn validate(
    state: &AppState,
    body: CreateBody,
) -> Result<(NewRequest, Vec<files::Pending>), ApiError> {
    if !is_valid_vm_name(&body.vm_name) {
        let shown: String = body.vm_name.chars().take(80).collect();
        return Err(ApiError::Validation(format!(
            "vm_name {shown:?} is invalid: use 1-64 letters, digits, '.', '_' or '-', starting \
             with a letter or digit; available: {}",
            state.catalog.available().join(", ")
        )));
    }
    let vm = match state.catalog.load(&body.vm_name) {
        Ok(vm) => vm,
        Err(e @ VmConfigError::Unknown { .. }) => return Err(ApiError::Validation(e.to_string())),
        Err(e) => {
            return Err(ApiError::Validation(format!(
                "VM {} is misconfigured: {e}",
                body.vm_name
            )))
        }
    };
    if body.boot == Some(BootChoice::Warm) && !vm.warm {
        return Err(ApiError::Validation(format!(
            "boot \"warm\" needs WARM=\"on\" in the config of VM {}; submit with boot \"cold\" \
             or without boot",
            body.vm_name
        )));
    }
    if body.commands.bytes().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::Validation(
            "commands must not be empty or only whitespace".into(),
        ));
    }
    if body.commands.len() > MAX_COMMANDS {
        return Err(ApiError::Validation(format!(
            "commands is {} bytes; the limit is {MAX_COMMANDS}",
            body.commands.len()
        )));
    }
    let max = state.settings.max_timeout;
    let timeout = match body.timeout {
        None => state.settings.default_timeout,
        Some(t) => u32::try_from(t)
            .ok()
            .filter(|t| (1..=max).contains(t))
            .ok_or_else(|| {
                ApiError::Validation(format!("timeout must be from 1 to {max} seconds, got {t}"))
            })?,
    };
    let max_keep = state.settings.max_keep;
    let keep_on_failure = body
        .keep_on_failure
        .map(|k| {
            u32::try_from(k)
                .ok()
                .filter(|k| (1..=max_keep).contains(k))
                .ok_or_else(|| {
                    ApiError::Validation(format!(
                        "keep_on_failure must be from 1 to {max_keep} seconds (SQLITE_SIM_MAX_KEEP), got {k}"
                    ))
                })
        })
        .transpose()?;
    // Before anything is staged: a refused callback leaves nothing behind.
    let webhook_urls = state
        .settings
        .webhooks
        .targets(body.callback_url.as_deref())?;
    let retries = match body.retries {
        None => state.settings.default_retries,
        Some(r) => u32::try_from(r)
            .ok()
            .filter(|r| *r <= MAX_RETRIES)
            .ok_or_else(|| {
                ApiError::Validation(format!("retries must be from 0 to {MAX_RETRIES}, got {r}"))
            })?,
    };
    let priority = match body.priority {
        None => 0,
        Some(p) => i32::try_from(p)
            .ok()
            .filter(|p| (MIN_PRIORITY..=MAX_PRIORITY).contains(p))
            .ok_or_else(|| {
                ApiError::Validation(format!(
                    "priority must be from {MIN_PRIORITY} to {MAX_PRIORITY}, got {p}"
                ))
            })?,
    };
    let pending = files::inline(body.files.unwrap_or_default())?;
    let artifacts = files::globs(body.artifacts.unwrap_or_default())?;
    let asked = body.requires.unwrap_or_default();
    if asked.len() > MAX_REQUIRES {
        return Err(ApiError::Validation(format!(
            "requires lists {} labels; the limit is {MAX_REQUIRES}",
            asked.len()
        )));
    }
    let mut requires: Vec<Label> = vm.requires.iter().cloned().chain(asked).collect();
    requires.sort();
    requires.dedup();
    Ok((
        NewRequest {
            vm_name: body.vm_name,
            commands: body.commands,
            timeout,
            boot: body.boot,
            uploads: Vec::new(),
            artifacts,
            requires,
            keep_on_failure,
            submitted_by: None,
            callback_url: body.callback_url,
            webhook_urls,
            retries,
            priority,
        },
        pending,
    ))
}

/// Submit a request: a JSON body, or `multipart/form-data` with the JSON as its `request` part
/// and `file` parts, each streamed into the store as it arrives.
#[utoipa::path(post, path = "/requests", tag = "requests",
    request_body(description = "The submission as JSON (at most 128 KiB, small files inline), \
        or as `multipart/form-data`: the same JSON in a `request` part (at most 1 MiB), and `file` parts whose \
        `filename` is their absolute guest destination (ending in `/`: a tar archive extracted \
        into that directory), with an optional `X-Mode` part header (octal, default 0644) for a \
        single file. Inline files come first, then the parts in the order sent; at most 64 of each, \
        no destination twice, their bytes at most `SQLITE_SIM_MAX_UPLOAD` in all.",
        content((CreateBody = "application/json"), ("multipart/form-data"))),
    responses((status = 201, body = Created, description = "stored as `pending`",
        headers(("Location" = String, description = "`/requests/{uuid}` of the new request"))),
        NoCapableHostResponse))]
pub async fn create(
    State(state): State<AppState>,
    axum::Extension(who): axum::Extension<crate::auth::Principal>,
    req: axum::extract::Request,
) -> Result<impl IntoResponse, ApiError> {
    let mut new = if upload::is_multipart(req.headers()) {
        upload::submission(&state, req).await?
    } else {
        // The route admits multipart bodies up to the upload limit; JSON keeps its own.
        let req = req.map(|b| Body::new(http_body_util::Limited::new(b, BODY_LIMIT)));
        let body = Json::<Object<CreateBody>>::from_request(req, &state).await;
        let body = match body {
            Err(JsonRejection::MissingJsonContentType(_)) => {
                return Err(ApiError::UnsupportedSubmission)
            }
            other => input::body(other)?,
        };
        let (mut new, pending) = validate(&state, body)?;
        new.uploads = files::stage(&state.store, pending, state.settings.max_upload).await?;
        new
    };
    new.submitted_by = who.submitter_name();
    let staged = new.uploads.clone();
    if let Err(e) =
        super::priority::check(&who, new.priority, state.settings.max_submitter_priority)
    {
        let _ = state.store.discard_uploads(staged).await;
        return Err(e);
    }
    // Refused only when hosts have reported and none has the labels: with no host yet (an
    // API started before its agents) there is nothing to judge by, and a host that is down
    // may come back (the request waits, and says why).
    if !new.requires.is_empty() {
        let placement = match state.store.placement(new.requires.clone()).await {
            Ok(p) => p,
            Err(e) => {
                let _ = state.store.discard_uploads(staged).await;
                return Err(e.into());
            }
        };
        if let Placement::Impossible(why) = placement {
            let _ = state.store.discard_uploads(staged).await;
            return Err(ApiError::NoCapableHost(why));
        }
    }
    let req = match state.store.create(new).await {
        Ok(r) => r,
        Err(e) => {
            let _ = state.store.discard_uploads(staged).await;
            return Err(e.into());
        }
    };
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

/// A request id from the path: the hyphenated form only (`format: uuid`), in either case. The
/// simple, braced and URN forms that `Uuid::parse_str` also knows are refused, as the document
/// says.
pub(super) fn parse_id(raw: &str) -> Result<RequestId, ApiError> {
    Some(raw)
        .filter(|r| r.len() == 36)
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| ApiError::InvalidUuid(raw.chars().take(80).collect()))
}

pub(super) async fn load(state: &AppState, raw: &str) -> Result<Request, ApiError> {
    let id = parse_id(raw)?;
    state
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(id.to_string()))
}

/// One request (a pending one with its `queue_position`).
#[utoipa::path(get, path = "/requests/{uuid}", tag = "requests",
    params(("uuid" = inline(RequestId), Path, description = "request id")),
    responses((status = 200, body = Request, description = "the request")))]
pub async fn show(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
) -> Result<Json<Request>, ApiError> {
    let id = parse_id(&uuid)?;
    let req = state
        .store
        .show(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(id.to_string()))?;
    Ok(Json(req))
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
    // Digits only: `u32::from_str` would also take a leading `+`, which no integer schema does.
    let number = |k: &str, v: &str, max: u32| -> Result<u32, ApiError> {
        Some(v)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|n| *n <= max)
            .ok_or_else(|| ApiError::Validation(format!("{k} must be a whole number up to {max}")))
    };
    for (k, v) in pairs {
        match k.as_str() {
            "status" => {
                // Empty names (`status=`, `a,,b`) are refused: the schema's pattern has none.
                for s in v.split(',') {
                    q.statuses
                        .push(s.parse().map_err(|e: crate::model::UnknownName| {
                            ApiError::Validation(e.to_string())
                        })?);
                }
            }
            "vm_name" => q.vm_name = Some(v),
            "submitted_by" => q.submitted_by = Some(v),
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
                    "unknown query parameter {other:?}; use status, vm_name, submitted_by, uuid_prefix, limit, offset"
                )))
            }
        }
    }
    Ok(q)
}

/// One `status` query value: a status, or several joined by commas.
pub struct StatusFilter;

impl StatusFilter {
    /// `^(pending|…)(,(pending|…))*$`, built from [`Status::ALL`].
    pub fn pattern() -> String {
        let one = Status::ALL.map(Status::as_str).join("|");
        format!("^({one})(,({one}))*$")
    }
}

impl utoipa::PartialSchema for StatusFilter {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(Self::pattern()))
            .description(Some("A status, or several joined by commas."))
            .into()
    }
}

impl ToSchema for StatusFilter {}

/// List requests, newest first. Unknown query parameters are refused. Pending requests carry
/// their `queue_position` in the claim order (highest `priority` first, round-robin between
/// submitters within a level).
#[utoipa::path(get, path = "/requests", tag = "requests",
    params(
        ("status" = inline(Option<Vec<StatusFilter>>), Query, style = Form, explode,
            description = "Only these statuses: repeatable, and each value may list several, comma-separated."),
        ("vm_name" = Option<String>, Query, description = "Only requests for this VM."),
        ("submitted_by" = Option<String>, Query,
            description = "Only requests this principal (token name) submitted."),
        ("uuid_prefix" = Option<String>, Query, pattern = "^[0-9A-Fa-f-]{1,36}$",
            min_length = 1, max_length = 36, description = "Only requests whose id starts with this."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000,
            description = "Page size; default 50."),
        ("offset" = Option<i64>, Query, minimum = 0, maximum = 4294967295_i64,
            description = "Requests skipped, newest first; default 0."),
    ),
    responses((status = 200, body = RequestList, description = "one page and the total")))]
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
#[schema(examples(json!({ "status": "hold" })))]
pub struct StatusBody {
    pub status: ControlTarget,
}

/// What an operator may ask for: one of [`CONTROL_TARGETS`], or `release` (end a kept run).
/// The other statuses are the agents' to set, so they are refused as invalid input (`422`),
/// whatever the request's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ControlTarget {
    Status(Status),
    /// Shut a VM kept after a failure down now; the request keeps the failure's outcome.
    Release,
}

/// The action that ends a kept run, beside the statuses.
pub const RELEASE: &str = "release";

impl TryFrom<String> for ControlTarget {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == RELEASE {
            return Ok(ControlTarget::Release);
        }
        let names = CONTROL_TARGETS.map(Status::as_str).join(", ");
        s.parse::<Status>()
            .ok()
            .filter(|st| CONTROL_TARGETS.contains(st))
            .map(ControlTarget::Status)
            .ok_or_else(|| {
                let shown: String = s.chars().take(40).collect();
                format!("status must be one of {names}, {RELEASE}; got {shown:?}")
            })
    }
}

impl utoipa::PartialSchema for ControlTarget {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(
                CONTROL_TARGETS
                    .map(Status::as_str)
                    .into_iter()
                    .chain([RELEASE]),
            ))
            .description(Some(
                "`hold`; `pending` (resume a held request that has no VM yet); `running` \
                 (resume a paused VM, or withdraw a hold not yet applied); `cancelled`; \
                 `release` (shut down a VM kept after a failure, `kept_until` set: the request \
                 ends with the failure's own status and `exit_code`; `409` for any other \
                 request).",
            ))
            .into()
    }
}

impl ToSchema for ControlTarget {}

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
    params(("uuid" = inline(RequestId), Path, description = "request id")),
    responses(
        (status = 200, body = ControlResponse, description = "applied"),
        (status = 202, body = ControlResponse, description = "recorded; the agent applies it"),
        InvalidTransitionResponse,
    ))]
pub async fn set_status(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
    body: Result<Json<Object<StatusBody>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&uuid)?;
    let body: StatusBody = input::body(body)?;
    match body.status {
        ControlTarget::Status(target) => control(&state, id, target).await,
        ControlTarget::Release => release(&state, id).await,
    }
}

/// Ends a kept run: its agent shuts the VM down and records the original outcome.
async fn release(state: &AppState, id: RequestId) -> Result<Response, ApiError> {
    let req = match state.store.release_kept(id).await? {
        ReleaseOutcome::NotFound => return Err(ApiError::NotFound(id.to_string())),
        ReleaseOutcome::NotKept(current) => return Err(ApiError::NotKept(current)),
        ReleaseOutcome::Released(req) => *req,
    };
    tracing::info!(request = %id, "release of a kept run requested");
    let (code, request) = match wait_applied(state, id, Status::Cancelled).await? {
        Some(r) => (StatusCode::OK, r),
        None => (
            StatusCode::ACCEPTED,
            state.store.get(id).await?.unwrap_or(req),
        ),
    };
    let applied = code == StatusCode::OK;
    Ok((code, Json(ControlResponse { request, applied })).into_response())
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
        // Any process's commit wakes this (`Store::watch_commits`); the sleep is a safety net.
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
        }
    }
}

/// Delete a request and its logs. An active request's VM is shut down first (as a cancel
/// does); the request is gone from the API at once either way. To stop a request and keep its
/// logs, `PUT /requests/{uuid}/status` with `cancelled`.
#[utoipa::path(delete, path = "/requests/{uuid}", tag = "requests",
    params(("uuid" = inline(RequestId), Path, description = "request id")),
    responses(
        (status = 204, description = "deleted with its logs (an active request's VM was shut down first)"),
        (status = 202, body = ControlResponse, description = "its VM is still being shut down: the request is already gone from the API and is removed with its logs when the VM is down"),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&uuid)?;
    let req = match state.store.delete(id).await? {
        DeleteOutcome::Deleted => {
            tracing::info!(request = %id, "request deleted");
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        DeleteOutcome::NotFound => return Err(ApiError::NotFound(id.to_string())),
        DeleteOutcome::Deleting(req) => req,
    };
    tracing::info!(request = %id, "request deleting: its VM is being shut down");
    // Its agent removes it once the VM is down; within the wait that is a plain 204.
    let mut changes = state.store.subscribe();
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    while state.store.exists(id).await? {
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Ok((
                    StatusCode::ACCEPTED,
                    Json(ControlResponse { request: *req, applied: false }),
                )
                    .into_response());
            }
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /prune` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "older_than_seconds": 2_592_000, "dry_run": true })))]
pub struct PruneBody {
    /// Delete finished requests that finished more than this many seconds ago. Ages beyond
    /// year 0 select nothing.
    #[serde(deserialize_with = "input::whole_number")]
    #[schema(value_type = i64, minimum = 0, maximum = 9223372036854775807_i64)]
    pub older_than_seconds: i128,
    /// Only count what would be deleted.
    #[serde(default)]
    #[schema(default = false)]
    pub dry_run: bool,
}

/// `now - age`, floored at the start of year 0: the fixed-width timestamps have four-digit
/// years, and nothing finished before then, so an older cutoff selects the same (nothing).
fn prune_cutoff(now: time::OffsetDateTime, age: i64) -> time::OffsetDateTime {
    let floor = time::Date::from_calendar_date(0, time::Month::January, 1)
        .expect("year 0 is in range")
        .midnight()
        .assume_utc();
    now.checked_sub(time::Duration::seconds(age))
        .map_or(floor, |t| t.max(floor))
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
    responses((status = 200, body = Pruned, description = "what was (or would be) deleted")))]
pub async fn prune(
    State(state): State<AppState>,
    body: Result<Json<Object<PruneBody>>, JsonRejection>,
) -> Result<Json<Pruned>, ApiError> {
    let body: PruneBody = input::body(body)?;
    let age = i64::try_from(body.older_than_seconds)
        .ok()
        .filter(|s| *s >= 0)
        .ok_or_else(|| {
            ApiError::Validation(format!(
                "older_than_seconds must be from 0 to {}, got {}",
                i64::MAX,
                body.older_than_seconds
            ))
        })?;
    let before = crate::timefmt::format(prune_cutoff(time::OffsetDateTime::now_utc(), age));
    let (requests, log_bytes) = state.store.prune(before.clone(), body.dry_run).await?;
    tracing::info!(requests, log_bytes, dry_run = body.dry_run, "pruned");
    Ok(Json(Pruned {
        requests,
        log_bytes,
        dry_run: body.dry_run,
        finished_before: before,
    }))
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

    /// The `pattern` of one property of a schema.
    fn pattern<T: utoipa::PartialSchema>(property: Option<&str>) -> regex::Regex {
        let v = serde_json::to_value(T::schema()).unwrap();
        let p = match property {
            Some(name) => &v["properties"][name]["pattern"],
            None => &v["pattern"],
        };
        // These patterns use nothing on which ECMA-262 (the schema's dialect) and Rust differ.
        regex::Regex::new(p.as_str().expect("a pattern")).unwrap()
    }

    #[test]
    fn the_vm_name_pattern_is_the_rule_the_server_applies() {
        let re = pattern::<CreateBody>(Some("vm_name"));
        let long = "a".repeat(64);
        let too_long = "a".repeat(65);
        for name in [
            "tiny", "a", "A-1._x", "9", &long, &too_long, "", "-a", ".a", "_a", "a/b", "../x",
            "a b", "é", "tiny\n", "\ntiny", "a\u{0}b",
        ] {
            assert_eq!(re.is_match(name), is_valid_vm_name(name), "{name:?}");
        }
    }

    #[test]
    fn the_commands_pattern_is_the_rule_the_server_applies() {
        let re = pattern::<CreateBody>(Some("commands"));
        let blank = |c: &str| c.bytes().all(|b| b.is_ascii_whitespace());
        for text in [
            "",
            " ",
            "\t\n\r\x0C ",
            "\x0B",
            "\u{3000}",
            "\u{85}",
            "\u{a0}",
            " x ",
            "echo hi",
        ] {
            assert_eq!(re.is_match(text), !blank(text), "{text:?}");
        }
    }

    #[test]
    fn the_status_filter_pattern_is_what_the_list_accepts() {
        let re = pattern::<StatusFilter>(None);
        for value in [
            "pending",
            "hold,done",
            "done,failed,cancelled",
            "",
            ",",
            "pending,",
            ",pending",
            "pending,,hold",
            "Pending",
            "finished",
            "pending hold",
        ] {
            let query = serde_urlencoded::to_string([("status", value)]).unwrap();
            assert_eq!(
                re.is_match(value),
                parse_list_query(Some(&query)).is_ok(),
                "{value:?}"
            );
        }
        for bad in ["limit=+5", "limit=", "offset=+1", "offset=4294967296"] {
            assert!(parse_list_query(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(
            parse_list_query(Some("offset=4294967295")).unwrap().offset,
            u32::MAX
        );
    }

    #[test]
    fn path_ids_are_hyphenated_uuids_only() {
        let id = "123e4567-e89b-12d3-a456-426614174000";
        assert_eq!(parse_id(id).unwrap().to_string(), id);
        assert_eq!(parse_id(&id.to_uppercase()).unwrap().to_string(), id);
        for bad in [
            "123e4567e89b12d3a456426614174000",
            "{123e4567-e89b-12d3-a456-426614174000}",
            "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
            "123e4567-e89b-12d3-a456-42661417400g",
            "0",
        ] {
            assert!(
                matches!(parse_id(bad), Err(ApiError::InvalidUuid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_control_targets_are_accepted_as_status() {
        for target in CONTROL_TARGETS {
            let body: StatusBody =
                serde_json::from_value(serde_json::json!({ "status": target })).unwrap();
            assert_eq!(body.status, ControlTarget::Status(target));
        }
        let body: StatusBody =
            serde_json::from_value(serde_json::json!({ "status": "release" })).unwrap();
        assert_eq!(body.status, ControlTarget::Release);
        for other in ["done", "failed", "acknowledged", "paused", ""] {
            let e = serde_json::from_value::<StatusBody>(serde_json::json!({ "status": other }))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("must be one of hold, pending, running, cancelled, release"),
                "{e}"
            );
        }
    }

    #[test]
    fn prune_cutoffs_never_leave_the_four_digit_years() {
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert_eq!(prune_cutoff(now, 86_400), now - time::Duration::days(1));
        assert_eq!(prune_cutoff(now, 0), now);
        for age in [i64::MAX, 100_000_000_000] {
            assert_eq!(
                crate::timefmt::format(prune_cutoff(now, age)),
                "0000-01-01T00:00:00.000000Z",
                "{age}"
            );
        }
    }
}

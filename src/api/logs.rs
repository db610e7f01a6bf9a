//! A request's logs: as JSON, as raw bytes, and live as Server-Sent Events.

use super::error::ApiError;
use super::requests::load;
use super::AppState;
use crate::model::{LogEntry, LogType, Request, RequestId, Status};
use crate::store::{LogQuery, Store};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};

/// Rows fetched per database round trip when streaming.
const PAGE: u32 = 256;
/// How often a follower re-reads the database when nothing woke it: a safety net only, since
/// this process's writes and (through `Store::watch_commits`) other processes' commits wake
/// it at once.
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// Largest `limit` of `GET /requests/{uuid}/logs`.
const MAX_LOG_LIMIT: u32 = 100_000;

/// `GET /requests/{uuid}/logs` query. Unknown parameters are refused.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    /// Only entries of this type.
    #[param(inline)]
    pub log_type: Option<LogType>,
    /// Only entries with `id > after`, for incremental polling.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    pub after: Option<i64>,
    /// At most this many entries; default all.
    #[param(minimum = 1, maximum = 100000)]
    pub limit: Option<u32>,
    /// Only entries of this attempt (see the request's `attempt`): each run after an
    /// infrastructure failure is a new attempt with its own entries.
    #[param(minimum = 1, maximum = 4294967295_i64)]
    pub attempt: Option<u32>,
}

/// One log entry as JSON. `output` is UTF-8 (invalid sequences replaced); when the bytes are
/// not valid UTF-8, `output_base64` carries them exactly.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogView {
    pub id: i64,
    /// The attempt (run) it belongs to, from 1.
    #[schema(format = Int64, minimum = 1)]
    pub attempt: u32,
    pub timestamp: String,
    pub log_type: LogType,
    pub output: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_base64: Option<String>,
}

impl From<LogEntry> for LogView {
    fn from(e: LogEntry) -> Self {
        let (output, output_base64) = match String::from_utf8(e.output) {
            Ok(s) => (s, None),
            Err(err) => {
                let bytes = err.into_bytes();
                (
                    String::from_utf8_lossy(&bytes).into_owned(),
                    Some(base64::engine::general_purpose::STANDARD.encode(&bytes)),
                )
            }
        };
        LogView {
            id: e.id,
            attempt: e.attempt,
            timestamp: e.timestamp,
            log_type: e.log_type,
            output,
            output_base64,
        }
    }
}

/// A log id to resume after: ids start at 1, so a negative one is a mistake, not "everything".
fn check_after(name: &str, after: Option<i64>) -> Result<Option<i64>, ApiError> {
    match after {
        Some(a) if a < 0 => Err(ApiError::Validation(format!(
            "{name} must be a log id from 0 to {}, got {a}",
            i64::MAX
        ))),
        _ => Ok(after),
    }
}

/// A request's log entries, in order.
#[utoipa::path(get, path = "/requests/{uuid}/logs", tag = "logs",
    params(("uuid" = inline(RequestId), Path, description = "request id"), LogParams),
    responses((status = 200, body = Vec<LogView>, description = "the entries, oldest first")))]
pub async fn logs(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
    params: Result<Query<LogParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<LogView>>, ApiError> {
    let Query(p) = params?;
    let req = load(&state, &uuid).await?;
    let after = check_after("after", p.after)?;
    if p.limit == Some(0) || p.limit.is_some_and(|l| l > MAX_LOG_LIMIT) {
        return Err(ApiError::Validation(format!(
            "limit must be from 1 to {MAX_LOG_LIMIT}"
        )));
    }
    if p.attempt == Some(0) {
        return Err(ApiError::Validation(
            "attempt must be from 1 (attempts are counted from 1)".into(),
        ));
    }
    let entries = state
        .store
        .logs(
            req.uuid,
            LogQuery {
                log_type: p.log_type,
                attempt: p.attempt,
                after,
                limit: p.limit,
            },
        )
        .await?;
    Ok(Json(entries.into_iter().map(LogView::from).collect()))
}

/// `GET /requests/{uuid}/logs/raw` query. Unknown parameters are refused.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RawParams {
    /// Which log; default `stdout`.
    #[param(inline)]
    pub log_type: Option<LogType>,
}

/// The exact bytes of one log type, concatenated, streamed page by page.
#[utoipa::path(get, path = "/requests/{uuid}/logs/raw", tag = "logs",
    params(("uuid" = inline(RequestId), Path, description = "request id"), RawParams),
    responses((status = 200, content_type = "application/octet-stream",
        description = "the bytes, exactly as the guest wrote them")))]
pub async fn raw(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
    params: Result<Query<RawParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params?;
    let req = load(&state, &uuid).await?;
    let log_type = p.log_type.unwrap_or(LogType::Stdout);
    let store = state.store.clone();
    let body = stream::unfold(Some(0i64), move |after| {
        let store = store.clone();
        async move {
            let after = after?;
            let q = LogQuery {
                log_type: Some(log_type),
                after: Some(after),
                limit: Some(PAGE),
                attempt: None,
            };
            match store.logs(req.uuid, q).await {
                Ok(rows) if rows.is_empty() => None,
                Ok(rows) => {
                    let next = rows.last().map(|r| r.id);
                    let more = rows.len() as u32 == PAGE;
                    let bytes: Vec<u8> = rows.into_iter().flat_map(|r| r.output).collect();
                    Some((
                        Ok::<_, std::io::Error>(Bytes::from(bytes)),
                        next.filter(|_| more),
                    ))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(body),
    )
        .into_response())
}

/// `GET /requests/{uuid}/logs/stream` query. Unknown parameters are refused.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamParams {
    /// Resume after this log id (as `Last-Event-ID` does, which wins when both are given).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    pub after: Option<i64>,
    /// Only entries of this type (ids stay the request's log ids).
    #[param(inline)]
    pub log_type: Option<LogType>,
}

/// Live log: `log` events (id = log id, data = a log entry), `status` events (data = the
/// request) whenever its status or desired status changes, and a final `end` event once the
/// request is finished and every entry was sent. `Last-Event-ID` (or `?after=`) resumes
/// without gaps or duplicates.
#[utoipa::path(get, path = "/requests/{uuid}/logs/stream", tag = "logs",
    params(
        ("uuid" = inline(RequestId), Path, description = "request id"),
        StreamParams,
        ("Last-Event-ID" = Option<i64>, Header, minimum = 0, maximum = 9223372036854775807_i64,
            description = "The id of the last `log` event received: resume after it."),
    ),
    responses((status = 200, content_type = "text/event-stream",
        description = "`log`, `status` and a final `end` event")))]
pub async fn stream_logs(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    params: Result<Query<StreamParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(p) = params?;
    let req = load(&state, &uuid).await?;
    let log_type = p.log_type;
    let after = check_after("after", p.after)?;
    let resume = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| ApiError::Validation("Last-Event-ID must be a log id".into()))
        })
        .transpose()?;
    let resume = check_after("Last-Event-ID", resume)?;
    let follower = Follower {
        changes: state.store.subscribe(),
        store: state.store.clone(),
        id: req.uuid,
        log_type,
        after: resume.or(after).unwrap_or(0),
        last: None,
        queue: VecDeque::new(),
        done: false,
    };
    let events = stream::unfold(follower, |mut f| async move {
        let ev = f.next().await?;
        Some((Ok(ev), f))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// State of one SSE follower.
struct Follower {
    store: Store,
    changes: tokio::sync::watch::Receiver<u64>,
    id: RequestId,
    log_type: Option<LogType>,
    after: i64,
    last: Option<(Status, Option<Status>)>,
    queue: VecDeque<Event>,
    done: bool,
}

fn json_event(kind: &str, data: &impl Serialize) -> Event {
    Event::default()
        .event(kind)
        .data(serde_json::to_string(data).expect("serialisable"))
}

impl Follower {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            match self.poll().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.done = true;
                    return Some(json_event(
                        "error",
                        &serde_json::json!({ "message": e.to_string() }),
                    ));
                }
            }
            tokio::select! {
                _ = self.changes.changed() => {}
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    }

    /// Reads what is new; true if events were queued. The status is read *before* the logs:
    /// logs are committed before a request turns terminal, so a terminal status followed by an
    /// empty page means everything was sent.
    async fn poll(&mut self) -> Result<bool, crate::store::StoreError> {
        let req: Option<Request> = self.store.get(self.id).await?;
        let q = LogQuery {
            log_type: self.log_type,
            after: Some(self.after),
            limit: Some(PAGE),
            attempt: None,
        };
        let rows = self.store.logs(self.id, q).await?;
        let full_page = rows.len() as u32 == PAGE;
        for row in rows {
            self.after = row.id;
            let id = row.id;
            self.queue
                .push_back(json_event("log", &LogView::from(row)).id(id.to_string()));
        }
        let Some(req) = req else {
            self.queue
                .push_back(json_event("end", &serde_json::json!({ "deleted": true })));
            self.done = true;
            return Ok(true);
        };
        let now = (req.status, req.desired_status);
        if self.last != Some(now) {
            self.last = Some(now);
            self.queue.push_back(json_event("status", &req));
        }
        if req.status.is_terminal() && !full_page {
            self.queue.push_back(json_event("end", &req));
            self.done = true;
        }
        Ok(!self.queue.is_empty())
    }
}

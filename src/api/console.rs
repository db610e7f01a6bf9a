//! `GET /requests/{uuid}/console`: the live serial console over a WebSocket.
//!
//! Server → client binary frames are the raw console stream (`store::console`) from `?from=`
//! (default 0, so a late viewer sees the whole screen); client → server binary frames are
//! keystrokes, queued in the store for the agent that owns the VM (in whatever process). Text
//! frames are JSON control messages (see the README, *Live console*):
//! `hello`, `missed`, `typist`, `status`, `error` from the server; `take` and `release` from
//! the client. Viewers of a request in this API process share a [`Room`], which knows the one
//! typist.
//!
//! Every viewer reads the stream from the store at its own pace, so a slow viewer never holds
//! anything up; it only falls behind. Once past what was stored when it connected, a viewer
//! more than [`MAX_LAG`] bytes behind the head is moved to the head and told how many bytes it
//! missed: its buffer is bounded by that window (the bytes stay in the log).

use super::error::ApiError;
use super::requests::load;
use super::AppState;
use crate::model::{RequestId, Status};
use crate::store::Store;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Extension;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use utoipa::IntoParams;

/// The subprotocol a client may ask for (the dashboard does, with `bearer.<token>` beside it).
pub const SUBPROTOCOL: &str = "sqlite-sim.console";
/// The prefix of a token carried as a subprotocol entry (browsers cannot set headers).
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";
/// Largest binary frame sent.
const FRAME: usize = 64 * 1024;
/// How far behind the head a viewer may fall before frames are dropped for it.
pub const MAX_LAG: u64 = 1024 * 1024;
/// How often the store is read when nothing in this process signals a write (the agents run
/// in another process).
const POLL: Duration = Duration::from_millis(100);
/// Largest keystroke frame accepted.
const MAX_INPUT: usize = 4096;

/// Why a console session ended early.
#[derive(Debug, Error)]
enum SessionError {
    #[error("websocket: {0}")]
    Socket(#[from] axum::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// `GET /requests/{uuid}/console` query. Unknown parameters are refused.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConsoleParams {
    /// Offset in the console byte stream to start from (default 0: everything logged). Past
    /// the end, the stream starts at its end.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    pub from: Option<u64>,
    /// `1` or `true`: a viewer that can never take the console.
    #[param(inline, pattern = "^(0|1|true|false)$")]
    pub read_only: Option<String>,
}

/// The WebSocket handshake (RFC 6455), as the document states it so that a generated request can
/// open the console; anything else is `426`. Values are read case-insensitively where the RFC
/// says so.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct Handshake {
    /// A list of tokens with `upgrade` among them.
    #[param(
        rename = "Connection",
        pattern = "^(.*,[ \\t]*)?[Uu][Pp][Gg][Rr][Aa][Dd][Ee]([ \\t]*,.*)?$"
    )]
    connection: String,
    #[param(rename = "Upgrade", pattern = "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$")]
    upgrade: String,
    #[param(rename = "Sec-WebSocket-Version", pattern = "^13$")]
    version: String,
    /// 16 random bytes in base64.
    #[param(rename = "Sec-WebSocket-Key", pattern = "^[A-Za-z0-9+/]{22}==$")]
    key: String,
}

/// The handshake's key as RFC 6455 requires it (axum only checks it is there).
fn valid_key(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|k| {
            let (body, pad) = k.split_at(k.len().min(22));
            body.len() == 22
                && pad == "=="
                && body
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        })
}

/// Server → client control messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMsg {
    Hello {
        offset: u64,
        status: Status,
        typist: Option<String>,
    },
    Missed {
        bytes: u64,
        offset: u64,
    },
    Typist {
        who: Option<String>,
        you: bool,
    },
    Status {
        status: Status,
    },
    Error {
        message: String,
    },
}

/// Client → server control messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientMsg {
    Take,
    Release,
}

/// The viewers of one request in this process, and its typist.
#[derive(Default)]
pub struct Room {
    inner: Mutex<RoomState>,
}

#[derive(Default)]
struct RoomState {
    viewers: HashMap<u64, mpsc::UnboundedSender<ServerMsg>>,
    typist: Option<(u64, String)>,
}

impl Room {
    fn join(&self, viewer: u64, tx: mpsc::UnboundedSender<ServerMsg>) -> Option<String> {
        let mut st = self.inner.lock().expect("room lock");
        st.viewers.insert(viewer, tx);
        st.typist.as_ref().map(|(_, who)| who.clone())
    }

    /// The viewer becomes the typist, taking over from any other; everyone is told.
    pub fn take(&self, viewer: u64, who: &str) {
        let mut st = self.inner.lock().expect("room lock");
        st.typist = Some((viewer, who.to_string()));
        st.announce();
    }

    /// The viewer stops typing, if it was the typist.
    pub fn release(&self, viewer: u64) {
        let mut st = self.inner.lock().expect("room lock");
        if st.typist.as_ref().is_some_and(|(v, _)| *v == viewer) {
            st.typist = None;
            st.announce();
        }
    }

    pub fn is_typist(&self, viewer: u64) -> bool {
        let st = self.inner.lock().expect("room lock");
        st.typist.as_ref().is_some_and(|(v, _)| *v == viewer)
    }

    /// Whether the room is empty now.
    fn leave(&self, viewer: u64) -> bool {
        self.release(viewer);
        let mut st = self.inner.lock().expect("room lock");
        st.viewers.remove(&viewer);
        st.viewers.is_empty()
    }
}

impl RoomState {
    fn announce(&self) {
        let who = self.typist.as_ref().map(|(_, w)| w.clone());
        for (id, tx) in &self.viewers {
            let you = self.typist.as_ref().is_some_and(|(v, _)| v == id);
            let _ = tx.send(ServerMsg::Typist {
                who: who.clone(),
                you,
            });
        }
    }
}

/// Every room of this API process.
#[derive(Default)]
pub struct Hub {
    rooms: Mutex<HashMap<RequestId, Arc<Room>>>,
    next: AtomicU64,
}

impl Hub {
    fn room(&self, id: RequestId) -> Arc<Room> {
        self.rooms
            .lock()
            .expect("hub lock")
            .entry(id)
            .or_default()
            .clone()
    }

    fn leave(&self, id: RequestId, room: &Room, viewer: u64) {
        let mut rooms = self.rooms.lock().expect("hub lock");
        if room.leave(viewer) {
            rooms.remove(&id);
        }
    }
}

/// Where a viewer reads next, given the stream's end: the pure part of the slow-viewer rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub offset: u64,
    /// The stream's end when the viewer connected: it catches up to here without drops.
    pub caught_up_at: u64,
}

impl Cursor {
    /// Moves a viewer that fell more than `max_lag` behind `end` to `end`; the bytes skipped.
    pub fn skip_if_behind(&mut self, end: u64, max_lag: u64) -> Option<u64> {
        if self.offset < self.caught_up_at || end.saturating_sub(self.offset) <= max_lag {
            return None;
        }
        let skipped = end - self.offset;
        self.offset = end;
        Some(skipped)
    }
}

/// Watch a request's serial console live, and type into it. A WebSocket (`101`); see the
/// README (*Live console*) for the protocol. Binary frames server → client are the raw console
/// bytes from `from` on; text frames are JSON: `{"type":"hello","offset":N,"status":S,
/// "typist":W|null}` first, `{"type":"missed","bytes":N,"offset":M}` when a slow viewer's
/// frames were dropped, `{"type":"typist","who":W|null,"you":B}`, `{"type":"status",
/// "status":S}`, `{"type":"error","message":T}`; a normal close once the request is finished
/// and every byte was sent. Client → server: `{"type":"take"}`, `{"type":"release"}`, and
/// binary keystrokes, typed only for the typist of a `running` request. The token may be sent
/// as a `Sec-WebSocket-Protocol` entry `bearer.<token>` beside `sqlite-sim.console`.
#[utoipa::path(get, path = "/requests/{uuid}/console", tag = "logs",
    params(("uuid" = inline(RequestId), Path, description = "request id"), ConsoleParams, Handshake),
    responses(
        (status = 101, description = "switching to the WebSocket console protocol"),
        super::error::UpgradeRequiredResponse,
    ))]
pub async fn console(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
    params: Result<Query<ConsoleParams>, QueryRejection>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Extension(principal): Extension<crate::auth::Principal>,
    headers: axum::http::HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params?;
    let read_only = match p.read_only.as_deref() {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => {
            let shown: String = other.chars().take(20).collect();
            return Err(ApiError::Validation(format!(
                "read_only must be 1, true, 0 or false; got {shown:?}"
            )));
        }
    };
    if p.from.is_some_and(|f| f > i64::MAX as u64) {
        return Err(ApiError::Validation(format!(
            "from must be from 0 to {}",
            i64::MAX
        )));
    }
    let req = load(&state, &uuid).await?;
    let ws = ws
        .ok()
        .filter(|_| valid_key(&headers))
        .ok_or(ApiError::UpgradeRequired)?;
    // Watching is a read; typing is control of this request, which a viewer (or a
    // submitter, on another's request) may not do: their connection is read-only.
    let read_only = read_only
        || !principal.may(
            crate::auth::Permission::ControlRequest,
            req.submitted_by.as_deref(),
        );
    let who = identity(&principal, peer.map(|Extension(ConnectInfo(a))| a));
    let from = p.from.unwrap_or(0);
    Ok(ws
        .protocols([SUBPROTOCOL])
        .on_upgrade(move |socket| async move {
            let id = req.uuid;
            if let Err(e) = session(state, id, socket, read_only, who, from).await {
                tracing::debug!(request = %id, error = %e, "console session ended");
            }
        }))
}

/// Who a viewer is, for the typist message and the `input` log: the principal's name (never
/// the token; `anonymous` with authentication off), and the peer address.
fn identity(principal: &crate::auth::Principal, peer: Option<SocketAddr>) -> String {
    let base = principal.name.clone();
    match peer {
        Some(p) => format!("{base}@{p}"),
        None => base,
    }
}

fn text(msg: &ServerMsg) -> Message {
    Message::Text(serde_json::to_string(msg).expect("serialisable").into())
}

async fn session(
    state: AppState,
    id: RequestId,
    socket: WebSocket,
    read_only: bool,
    who: String,
    from: u64,
) -> Result<(), SessionError> {
    let store: Store = state.store.clone();
    let viewer = state.consoles.next.fetch_add(1, Ordering::Relaxed);
    let room = state.consoles.room(id);
    let (notices_tx, mut notices) = mpsc::unbounded_channel();
    let typist = room.join(viewer, notices_tx);
    let result = async {
        let (mut tx, mut rx) = socket.split();
        let mut changes = store.subscribe();
        let Some(req) = store.get(id).await? else {
            return Ok(());
        };
        let head = store.console_since(id, from, 0).await?;
        let mut cursor = Cursor {
            offset: head.start,
            caught_up_at: head.end,
        };
        let mut last_status = req.status;
        tx.send(text(&ServerMsg::Hello {
            offset: cursor.offset,
            status: req.status,
            typist,
        }))
        .await?;
        loop {
            // Control traffic is served between data frames too, so a busy console never
            // delays a takeover or a refusal.
            while let Ok(n) = notices.try_recv() {
                tx.send(text(&n)).await?;
            }
            while let Some(m) = rx.next().now_or_never() {
                match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(m)) => {
                        if let Some(reply) = handle(&store, &room, id, viewer, &who, read_only, m).await? {
                            tx.send(text(&reply)).await?;
                        }
                    }
                }
            }
            // The status first: the stream is complete before a request turns terminal, so a
            // terminal status followed by no more bytes is the end.
            let status = store.get(id).await?.map(|r| r.status);
            if let Some(st) = status.filter(|s| *s != last_status) {
                last_status = st;
                tx.send(text(&ServerMsg::Status { status: st })).await?;
            }
            let slice = store.console_since(id, cursor.offset, FRAME).await?;
            if let Some(bytes) = cursor.skip_if_behind(slice.end, MAX_LAG) {
                tx.send(text(&ServerMsg::Missed {
                    bytes,
                    offset: cursor.offset,
                }))
                .await?;
                continue;
            }
            if !slice.bytes.is_empty() {
                cursor.offset = slice.start + slice.bytes.len() as u64;
                tx.send(Message::Binary(slice.bytes.into())).await?;
                continue;
            }
            if status.is_none_or(Status::is_terminal) {
                tx.send(Message::Close(Some(CloseFrame {
                    code: axum::extract::ws::close_code::NORMAL,
                    reason: "request finished".into(),
                })))
                .await?;
                return Ok(());
            }
            tokio::select! {
                n = notices.recv() => {
                    if let Some(n) = n {
                        tx.send(text(&n)).await?;
                    }
                }
                m = rx.next() => match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(m)) => {
                        if let Some(reply) = handle(&store, &room, id, viewer, &who, read_only, m).await? {
                            tx.send(text(&reply)).await?;
                        }
                    }
                },
                _ = changes.changed() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
    .await;
    state.consoles.leave(id, &room, viewer);
    result
}

/// One client frame; the error to send back, if any.
async fn handle(
    store: &Store,
    room: &Room,
    id: RequestId,
    viewer: u64,
    who: &str,
    read_only: bool,
    m: Message,
) -> Result<Option<ServerMsg>, SessionError> {
    let error = |message: &str| {
        Ok(Some(ServerMsg::Error {
            message: message.to_string(),
        }))
    };
    match m {
        Message::Text(t) => match serde_json::from_str::<ClientMsg>(t.as_str()) {
            Ok(ClientMsg::Take) if read_only => {
                error("this connection is read-only (?read_only=1, or a role that may not control this request): it cannot take the console")
            }
            Ok(ClientMsg::Take) => {
                room.take(viewer, who);
                Ok(None)
            }
            Ok(ClientMsg::Release) => {
                room.release(viewer);
                Ok(None)
            }
            Err(_) => error(r#"unknown message: send {"type":"take"} or {"type":"release"}"#),
        },
        Message::Binary(bytes) => {
            if read_only {
                return error("this connection is read-only (?read_only=1, or a role that may not control this request): input refused");
            }
            if !room.is_typist(viewer) {
                return error(
                    r#"you are not the typist: send {"type":"take"} first; input refused"#,
                );
            }
            if bytes.len() > MAX_INPUT {
                return error(&format!(
                    "input frames are at most {MAX_INPUT} bytes; refused"
                ));
            }
            if store
                .push_input(id, who.to_string(), bytes.to_vec())
                .await?
            {
                Ok(None)
            } else {
                error("the request is not running: input refused")
            }
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests;

//! QMP client: handshake, typed commands from the `qapi` crate, and an event stream that keeps
//! messages it does not understand.
//!
//! qapi's own async stream decodes every message into a closed enum and drops the connection on
//! an event it does not know (any QEMU newer than its schema sends some). Here each line is read
//! as raw JSON first: replies are matched to commands by `id` and decoded into the command's typed
//! result; events are decoded into `qapi::qmp::Event` when possible and kept as raw JSON always.

use qapi::qmp::QapiCapabilities;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Error)]
pub enum QmpError {
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP handshake: {0}")]
    Handshake(String),
    #[error("QMP connection closed")]
    Disconnected,
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: &'static str,
        class: String,
        desc: String,
    },
    #[error("QMP reply to {command} could not be decoded: {source}")]
    Decode {
        command: &'static str,
        source: serde_json::Error,
    },
    #[error("QMP command {0} got no reply in time")]
    Timeout(&'static str),
}

/// One asynchronous QMP event.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// `(seconds, microseconds)` from QEMU.
    pub timestamp: Option<(u64, u64)>,
    /// The event decoded with qapi's schema; `None` for events this build does not know.
    pub typed: Option<qapi::qmp::Event>,
    /// The message exactly as received.
    pub raw: Value,
}

impl QmpEvent {
    fn from_raw(raw: Value) -> Self {
        let name = raw["event"].as_str().unwrap_or_default().to_string();
        let data = raw.get("data").cloned().unwrap_or(Value::Null);
        let timestamp = raw
            .get("timestamp")
            .and_then(|t| Some((t["seconds"].as_u64()?, t["microseconds"].as_u64()?)));
        let typed = serde_json::from_value::<qapi::qmp::Event>(raw.clone()).ok();
        QmpEvent {
            name,
            data,
            timestamp,
            typed,
            raw,
        }
    }

    /// `SHUTDOWN` event: was it initiated by the guest, and why.
    pub fn shutdown_reason(&self) -> Option<(bool, String)> {
        (self.name == "SHUTDOWN").then(|| {
            (
                self.data["guest"].as_bool().unwrap_or(false),
                self.data["reason"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_string(),
            )
        })
    }
}

/// Receives the events of one connection; ends when QEMU closes the socket.
pub type QmpEvents = mpsc::UnboundedReceiver<QmpEvent>;

/// Waiters by command id; `None` once the read loop has ended, so no new waiter can be left
/// behind (it would only ever see the reply timeout).
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Value>>>>>;

/// A connected, negotiated QMP session.
pub struct Qmp {
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Pending,
    next_id: AtomicU64,
    greeting: QapiCapabilities,
    reply_timeout: Duration,
}

/// Default bound on how long any command may wait for its reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

impl Qmp {
    /// Connects to a QMP unix socket and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<(Qmp, QmpEvents), QmpError> {
        let stream = tokio::net::UnixStream::connect(path).await?;
        let (r, w) = stream.into_split();
        Self::handshake(r, w).await
    }

    /// Negotiates over any byte stream: reads the greeting, sends `qmp_capabilities`.
    pub async fn handshake<R, W>(reader: R, writer: W) -> Result<(Qmp, QmpEvents), QmpError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut reader = BufReader::new(reader);
        let mut line = String::new();
        let n = tokio::time::timeout(REPLY_TIMEOUT, reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Handshake("no greeting from QEMU".into()))??;
        if n == 0 {
            return Err(QmpError::Handshake(
                "connection closed before the greeting".into(),
            ));
        }
        let greeting: QapiCapabilities = serde_json::from_str(&line)
            .map_err(|e| QmpError::Handshake(format!("bad greeting {:?}: {e}", line.trim())))?;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(read_loop(reader, pending.clone(), tx));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(Box::new(writer)),
            pending,
            next_id: AtomicU64::new(1),
            greeting,
            reply_timeout: REPLY_TIMEOUT,
        };
        qmp.execute(&qapi::qmp::qmp_capabilities { enable: None })
            .await
            .map_err(|e| QmpError::Handshake(e.to_string()))?;
        Ok((qmp, rx))
    }

    /// QEMU's version as it announced it, e.g. `7.2.22`.
    pub fn version(&self) -> String {
        let v = &self.greeting.QMP.version.qemu;
        format!("{}.{}.{}", v.major, v.minor, v.micro)
    }

    /// Runs one typed command and decodes its typed result.
    pub async fn execute<C: qapi::Command>(&self, cmd: &C) -> Result<C::Ok, QmpError> {
        let reply = self
            .execute_raw(
                C::NAME,
                serde_json::to_value(cmd).map_err(|source| QmpError::Decode {
                    command: C::NAME,
                    source,
                })?,
            )
            .await?;
        if let Some(err) = reply.get("error") {
            return Err(QmpError::Command {
                command: C::NAME,
                class: err["class"].as_str().unwrap_or("?").to_string(),
                desc: err["desc"].as_str().unwrap_or("?").to_string(),
            });
        }
        serde_json::from_value(reply.get("return").cloned().unwrap_or(Value::Null)).map_err(
            |source| QmpError::Decode {
                command: C::NAME,
                source,
            },
        )
    }

    async fn execute_raw(&self, name: &'static str, args: Value) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().expect("pending lock").as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(QmpError::Disconnected),
        };
        let mut msg = serde_json::json!({ "execute": name, "id": id });
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).expect("a JSON value serialises");
        line.push(b'\n');
        let written = {
            let mut w = self.writer.lock().await;
            match w.write_all(&line).await {
                Ok(()) => w.flush().await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            self.forget(id);
            return Err(if e.kind() == std::io::ErrorKind::BrokenPipe {
                QmpError::Disconnected
            } else {
                QmpError::Io(e)
            });
        }
        match tokio::time::timeout(self.reply_timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout(name))
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Some(pending) = self.pending.lock().expect("pending lock").as_mut() {
            pending.remove(&id);
        }
    }
}

/// Routes replies to their commands and events to the event channel until EOF.
async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: BufReader<R>,
    pending: Pending,
    events: mpsc::UnboundedSender<QmpEvent>,
) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "QMP read failed");
                break;
            }
        }
        let msg: Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, line = %String::from_utf8_lossy(&line), "QMP sent invalid JSON; skipped");
                continue;
            }
        };
        if msg.get("event").is_some() {
            let ev = QmpEvent::from_raw(msg);
            if ev.typed.is_none() {
                tracing::info!(event = %ev.name, raw = %ev.raw, "QMP event unknown to the qapi schema; kept as raw JSON");
            }
            // A closed receiver only means nobody listens any more.
            let _ = events.send(ev);
        } else if msg.get("return").is_some() || msg.get("error").is_some() {
            let waiter = msg
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|id| pending.lock().expect("pending lock").as_mut()?.remove(&id));
            match waiter {
                Some(tx) => {
                    let _ = tx.send(msg);
                }
                None => tracing::warn!(reply = %msg, "QMP reply matches no pending command"),
            }
        } else {
            tracing::info!(raw = %msg, "QMP message of unknown shape; ignored");
        }
    }
    // Dropping the senders wakes every waiter with `Disconnected`; later commands fail at once.
    pending.lock().expect("pending lock").take();
}

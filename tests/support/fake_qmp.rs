//! A fake QMP server for tests: replays one transcript from `qmp-fixtures/` (see its README)
//! over a real unix socket in a temporary directory.
//!
//! `recv` lines are sent to the client in order, ending in `\r\n` like QEMU does. At each `send`
//! line the server reads one line from the client and checks its `execute` and `arguments`
//! against the recording. A difference is recorded (and printed) as a mismatch instead of
//! panicking inside the server task, so the test can assert on [`Transcript::mismatches`]. The
//! client picks its own command ids, so each recorded id is mapped to the id the client sent and
//! the replies are rewritten to match.
//!
//! After the last line the server closes the connection (as QEMU does after `quit` or a guest
//! power-off), or keeps reading until the client disconnects ([`AtEnd`]); anything the client
//! sends after the end of the recording is a mismatch too.

// Each test crate that includes this module uses a different subset of it.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

/// One line of a fixture: a message from QEMU (`send == false`) or from the client.
#[derive(Debug, Clone)]
pub struct Line {
    pub send: bool,
    pub msg: Value,
}

/// What the server does after the last fixture line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtEnd {
    /// Close the connection, like QEMU exiting.
    Close,
    /// Keep the connection open until the client disconnects.
    WaitForClient,
    /// Shut down the sending half only (the client reads EOF), keep reading until the client
    /// disconnects.
    HalfClose,
}

/// What the server saw during one session.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Every message the client sent, in order (with the client's own ids).
    pub received: Vec<Value>,
    /// How the client strayed from the fixture; empty when it did exactly what was recorded.
    pub mismatches: Vec<String>,
}

impl Transcript {
    /// The `execute` of every received message, in order.
    pub fn commands(&self) -> Vec<&str> {
        self.received
            .iter()
            .map(|m| m["execute"].as_str().unwrap_or("<no execute>"))
            .collect()
    }

    fn mismatch(&mut self, what: String) {
        eprintln!("fake QMP server: MISMATCH: {what}");
        self.mismatches.push(what);
    }
}

/// Reads `qmp-fixtures/<name>.jsonl`.
pub fn load_fixture(name: &str) -> Vec<Line> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("qmp-fixtures")
        .join(format!("{name}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display()));
            let send = match v["dir"].as_str() {
                Some("send") => true,
                Some("recv") => false,
                other => panic!("{}: bad dir {other:?}", path.display()),
            };
            Line {
                send,
                msg: v["msg"].clone(),
            }
        })
        .collect()
}

/// A running fake server; connect a client to [`FakeQmp::path`].
pub struct FakeQmp {
    pub path: PathBuf,
    task: JoinHandle<Transcript>,
    _dir: tempfile::TempDir,
}

impl FakeQmp {
    /// Replays `qmp-fixtures/<name>.jsonl`, closing at the end for `quit` and `powerdown`
    /// (where QEMU exits) and waiting for the client otherwise.
    pub fn start(name: &str) -> FakeQmp {
        let at_end = match name {
            "quit" | "powerdown" => AtEnd::Close,
            _ => AtEnd::WaitForClient,
        };
        Self::replay(load_fixture(name), at_end)
    }

    /// Replays arbitrary lines, e.g. a truncated fixture. Must run inside a tokio runtime.
    pub fn replay(lines: Vec<Line>, at_end: AtEnd) -> FakeQmp {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind the fake QMP socket");
        let task = tokio::spawn(serve(listener, lines, at_end));
        FakeQmp {
            path,
            task,
            _dir: dir,
        }
    }

    /// Waits for the session to end and returns what the server saw. With
    /// [`AtEnd::WaitForClient`] the client must have been dropped first.
    pub async fn finish(self) -> Transcript {
        self.task.await.expect("fake QMP server task")
    }
}

async fn serve(listener: UnixListener, lines: Vec<Line>, at_end: AtEnd) -> Transcript {
    let mut t = Transcript::default();
    let (stream, _) = listener.accept().await.expect("accept a QMP client");
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    // Recorded id (as JSON text) -> the id the client actually sent.
    let mut ids: HashMap<String, Value> = HashMap::new();
    for line in lines {
        let expected = line.msg;
        if !line.send {
            let mut msg = expected;
            if let Some(id) = msg.get("id").and_then(|id| ids.get(&id.to_string())) {
                msg["id"] = id.clone();
            }
            let mut bytes = serde_json::to_vec(&msg).expect("JSON serialises");
            bytes.extend_from_slice(b"\r\n");
            if w.write_all(&bytes).await.is_err() {
                t.mismatch(format!("client went away before being sent {msg}"));
                return t;
            }
            continue;
        }
        let Some(got) = read_msg(&mut reader, &mut t).await else {
            t.mismatch(format!("client disconnected instead of sending {expected}"));
            return t;
        };
        let args = |m: &Value| match m.get("arguments") {
            None => serde_json::json!({}),
            Some(a) => a.clone(),
        };
        if got.get("execute") != expected.get("execute") || args(&got) != args(&expected) {
            t.mismatch(format!("expected {expected}, client sent {got}"));
        }
        if let (Some(recorded), Some(actual)) = (expected.get("id"), got.get("id")) {
            ids.insert(recorded.to_string(), actual.clone());
        }
    }
    if at_end == AtEnd::HalfClose {
        let _ = w.shutdown().await;
    }
    if at_end != AtEnd::Close {
        while let Some(extra) = read_msg(&mut reader, &mut t).await {
            t.mismatch(format!("client sent {extra} after the end of the fixture"));
        }
    }
    // Dropping both halves closes the connection.
    t
}

/// Reads one client message and records it; `None` once the client has disconnected.
async fn read_msg(reader: &mut BufReader<OwnedReadHalf>, t: &mut Transcript) -> Option<Value> {
    let mut line = String::new();
    match reader.read_line(&mut line).await {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    let msg = serde_json::from_str(&line).unwrap_or_else(|e| {
        t.mismatch(format!("client sent invalid JSON {line:?}: {e}"));
        Value::String(line.clone())
    });
    t.received.push(msg.clone());
    Some(msg)
}

//! Following `GET /requests/{uuid}/logs/stream`: its Server-Sent Events parsed one by one.

use super::{Client, Method};
use futures_util::StreamExt;
use serde_json::Value;
use std::time::Duration;

/// One Server-Sent Event as the log stream sends it.
#[derive(Debug)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<i64>,
    pub data: Value,
}

/// Reads SSE events from `path` until `stop` says so or the server ends the stream.
pub async fn follow(
    s: &Client,
    path: &str,
    last_id: Option<i64>,
    mut stop: impl FnMut(&SseEvent) -> bool,
) -> Vec<SseEvent> {
    let mut req = s.request(Method::GET, path);
    if let Some(id) = last_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(60), body.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut ev = SseEvent {
                event: "message".into(),
                id: None,
                data: Value::Null,
            };
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    ev.event = v.trim().into();
                } else if let Some(v) = line.strip_prefix("id:") {
                    ev.id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue; // keep-alive comment
            }
            ev.data = serde_json::from_str(&data).unwrap();
            let done = stop(&ev);
            out.push(ev);
            if done {
                return out;
            }
        }
    }
    out
}

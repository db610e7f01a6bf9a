//! Following a request over SSE, reconnecting with `Last-Event-ID` when the connection drops.

use super::client::{ApiClient, CliError};
use crate::model::{LogType, Request, RequestId};
use futures_util::StreamExt;
use serde_json::Value;
use std::time::{Duration, Instant};

/// How long the API may stay unreachable while following before giving up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// One parsed SSE event.
#[derive(Debug, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<i64>,
    pub data: String,
}

/// Incremental SSE parser (events end with a blank line; `:` lines are comments).
#[derive(Default)]
pub struct SseParser {
    buf: String,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.push_str(&String::from_utf8_lossy(chunk));
        let mut out = Vec::new();
        while let Some(end) = self.buf.find("\n\n") {
            let block: String = self.buf.drain(..end + 2).collect();
            let mut ev = SseEvent {
                event: "message".into(),
                id: None,
                data: String::new(),
            };
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    ev.event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("id:") {
                    ev.id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !ev.data.is_empty() {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if !ev.data.is_empty() {
                out.push(ev);
            }
        }
        out
    }
}

/// Streams `id`'s log entries to `on_log` and its status changes to `on_status` until the
/// request ends; returns the final request (`None` if it was deleted meanwhile).
pub async fn follow(
    client: &ApiClient,
    id: RequestId,
    log_type: Option<LogType>,
    mut on_log: impl FnMut(&Value) -> std::io::Result<()>,
    mut on_status: impl FnMut(&Request),
) -> Result<Option<Request>, CliError> {
    let mut last_id: Option<i64> = None;
    let mut failing_since: Option<Instant> = None;
    let path = match log_type {
        Some(t) => format!("/requests/{id}/logs/stream?log_type={t}"),
        None => format!("/requests/{id}/logs/stream"),
    };
    loop {
        let mut req = client.request(reqwest::Method::GET, &path);
        if let Some(last) = last_id {
            req = req.header("Last-Event-ID", last.to_string());
        }
        let resp = match client.send(req).await {
            Ok(r) => r,
            Err(e @ CliError::Unreachable { .. }) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > GIVE_UP_AFTER {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        failing_since = None;
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else {
                break; // dropped: reconnect and resume
            };
            for ev in parser.push(&chunk) {
                let data: Value = serde_json::from_str(&ev.data)
                    .map_err(|e| CliError::Protocol(format!("SSE data: {e}")))?;
                match ev.event.as_str() {
                    "log" => {
                        on_log(&data)?;
                        last_id = ev.id.or(last_id);
                    }
                    "status" => {
                        if let Ok(r) = serde_json::from_value::<Request>(data) {
                            on_status(&r);
                        }
                    }
                    "end" => return Ok(serde_json::from_value::<Request>(data).ok()),
                    "error" => {
                        return Err(CliError::Protocol(
                            data["message"]
                                .as_str()
                                .unwrap_or("stream error")
                                .to_string(),
                        ))
                    }
                    _ => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_anywhere() {
        let stream =
            b"event: log\ndata: {\"a\":1}\nid: 7\n\n: keep-alive\n\nevent: end\ndata: {}\n\n";
        for split in 1..stream.len() {
            let mut p = SseParser::default();
            let mut evs = p.push(&stream[..split]);
            evs.extend(p.push(&stream[split..]));
            assert_eq!(
                evs,
                vec![
                    SseEvent {
                        event: "log".into(),
                        id: Some(7),
                        data: "{\"a\":1}".into()
                    },
                    SseEvent {
                        event: "end".into(),
                        id: None,
                        data: "{}".into()
                    },
                ],
                "split at {split}"
            );
        }
    }
}

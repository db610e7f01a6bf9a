//! `sqlite-sim cli attach`: a request's serial console in this terminal, over the API's
//! console WebSocket, so it works against a remote server. The terminal is put in raw mode
//! (every key goes to the guest, as `virsh console` does) and restored on the way out;
//! `Ctrl-]` detaches. Without `--read-only` it takes the console as typist at once.

use super::client::{ApiClient, CliError};
use futures_util::{SinkExt, StreamExt};
use std::io::{IsTerminal, Write};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The detach key, Ctrl-].
pub const DETACH: u8 = 0x1d;

/// The terminal's settings before raw mode, put back when dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    /// Raw mode on standard input when it is a terminal; `None` otherwise (piped input).
    fn enable() -> Option<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// A notice on stderr, on a line of its own whatever the terminal mode.
fn notice(text: &str) {
    eprint!("\r\nsqlite-sim: {text}\r\n");
}

pub async fn attach(client: &ApiClient, id: &str, read_only: bool) -> Result<u8, CliError> {
    let req = client.resolve(id).await?;
    let query = if read_only { "?read_only=1" } else { "" };
    let url = client.ws_url(&format!("/requests/{}/console{query}", req.uuid))?;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| CliError::Input(format!("{url}: {e}")))?;
    if let Some(token) = client.token() {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| CliError::Input("SQLITE_SIM_API_TOKEN is not a valid header".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| CliError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let (mut tx, mut rx) = ws.split();
    eprintln!(
        "sqlite-sim: attached to {} ({}){}; Ctrl-] detaches",
        req.uuid,
        req.status,
        if read_only { ", read-only" } else { "" }
    );
    if !read_only {
        tx.send(Message::Text(r#"{"type":"take"}"#.into()))
            .await
            .map_err(|e| CliError::Protocol(e.to_string()))?;
    }
    let raw = RawMode::enable();
    let mut stdin = tokio::io::stdin();
    let mut stdin_open = true;
    let mut buf = vec![0u8; 4096];
    let mut stdout = std::io::stdout();
    let ended = loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    stdout.write_all(&b)?;
                    stdout.flush()?;
                }
                Some(Ok(Message::Text(t))) => {
                    if let Some(text) = describe(t.as_str()) {
                        notice(&text);
                    }
                }
                Some(Ok(Message::Close(_))) | None => break "the console closed: the request finished",
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    drop(raw);
                    return Err(CliError::Protocol(e.to_string()));
                }
            },
            n = stdin.read(&mut buf), if stdin_open => match n {
                // End of input: keep watching until the request ends or Ctrl-C.
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => {
                    let keys = &buf[..n];
                    let (typed, detach) = match memchr::memchr(DETACH, keys) {
                        Some(at) => (&keys[..at], true),
                        None => (keys, false),
                    };
                    if !typed.is_empty() && !read_only {
                        tx.send(Message::Binary(typed.to_vec().into()))
                            .await
                            .map_err(|e| CliError::Protocol(e.to_string()))?;
                    }
                    if detach {
                        break "detached";
                    }
                }
            },
            _ = tokio::signal::ctrl_c(), if raw.is_none() => break "interrupted",
        }
    };
    drop(raw);
    let _ = tx.close().await;
    notice(ended);
    Ok(0)
}

/// A control message as a line for the operator; `None` for the ones not worth a line.
fn describe(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let s = |k: &str| v[k].as_str().unwrap_or("none").to_string();
    Some(match v["type"].as_str()? {
        "hello" => return None,
        "missed" => format!(
            "{} bytes not shown (the terminal fell behind); they are in the log",
            v["bytes"]
        ),
        "typist" if v["you"] == true => "you are typing".into(),
        "typist" => format!("typist: {}", s("who")),
        "status" => format!("status: {}", s("status")),
        "error" => s("message"),
        other => format!("{other}: {json}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_read_as_lines() {
        assert_eq!(describe(r#"{"type":"hello","offset":0}"#), None);
        assert_eq!(
            describe(r#"{"type":"typist","who":"x@1","you":false}"#).unwrap(),
            "typist: x@1"
        );
        assert_eq!(
            describe(r#"{"type":"typist","who":"x@1","you":true}"#).unwrap(),
            "you are typing"
        );
        assert!(describe(r#"{"type":"missed","bytes":12,"offset":40}"#)
            .unwrap()
            .starts_with("12 bytes"));
    }
}

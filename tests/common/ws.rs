//! A client of `/requests/{uuid}/console`: the WebSocket console, its binary stream and its JSON
//! control messages.

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One console connection, and everything it received so far.
pub struct Console {
    ws: Ws,
    /// Console bytes received, in order.
    pub bytes: Vec<u8>,
    /// Control messages received, in order.
    pub messages: Vec<Value>,
    pub closed: bool,
}

impl Console {
    /// Connects to `base` (`http://host:port`) for request `id`, with `query` (`""` or `?…`).
    pub async fn connect(base: &str, id: &str, query: &str) -> Console {
        let url = format!(
            "{}/requests/{id}/console{query}",
            base.replacen("http://", "ws://", 1)
        );
        let req = url.into_client_request().unwrap();
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        Console {
            ws,
            bytes: Vec::new(),
            messages: Vec::new(),
            closed: false,
        }
    }

    /// Reads one frame (false once closed or after `limit`).
    async fn read_one(&mut self, limit: Duration) -> bool {
        if self.closed {
            return false;
        }
        match tokio::time::timeout(limit, self.ws.next()).await {
            Err(_) => false,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => {
                self.closed = true;
                false
            }
            Ok(Some(Ok(Message::Binary(b)))) => {
                self.bytes.extend_from_slice(&b);
                true
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                self.messages
                    .push(serde_json::from_str(t.as_str()).unwrap());
                true
            }
            Ok(Some(Ok(_))) => true,
        }
    }

    /// Reads until the console bytes contain `needle`; panics with what came after `limit`.
    pub async fn until_output(&mut self, needle: &str, limit: Duration) {
        let end = Instant::now() + limit;
        while !String::from_utf8_lossy(&self.bytes).contains(needle) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || (!self.read_one(left).await && self.closed) {
                panic!(
                    "{needle:?} not on the console within {limit:?} (closed: {}); got:\n{}\nmessages: {:?}",
                    self.closed,
                    String::from_utf8_lossy(&self.bytes),
                    self.messages
                );
            }
        }
    }

    /// Reads until a control message satisfies `pred`; returns it.
    pub async fn until_message(&mut self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + limit;
        let mut seen = 0;
        loop {
            if let Some(m) = self.messages[seen..].iter().find(|m| pred(m)) {
                return m.clone();
            }
            seen = self.messages.len();
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || (!self.read_one(left).await && self.closed) {
                panic!("no such message within {limit:?}; got {:?}", self.messages);
            }
        }
    }

    /// Reads until the server closes the socket.
    pub async fn until_closed(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        while !self.closed {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "not closed within {limit:?}");
            self.read_one(left).await;
        }
    }

    pub async fn take(&mut self) {
        self.ws
            .send(Message::Text(r#"{"type":"take"}"#.into()))
            .await
            .unwrap();
        self.until_message(Duration::from_secs(10), |m| {
            m["type"] == "typist" && m["you"] == true
        })
        .await;
    }

    /// Sends keystrokes.
    pub async fn type_text(&mut self, text: &str) {
        self.ws
            .send(Message::Binary(text.as_bytes().to_vec().into()))
            .await
            .unwrap();
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

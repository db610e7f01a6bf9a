//! A webhook receiver for the tests: a small axum server on `127.0.0.1` that records every
//! POST (path, headers, body) and answers each path as told: a queue of statuses to answer
//! first (then `200`), or a redirect. It can be started on a chosen port, so a test can take
//! a receiver down and bring it back where the server keeps sending.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One POST as received.
#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// The status it was answered with.
    pub answered: u16,
}

impl Hit {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|s| s.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

#[derive(Default)]
struct Inner {
    hits: Vec<Hit>,
    /// Statuses to answer per path before answering 200.
    queued: HashMap<String, VecDeque<u16>>,
    /// Paths answered with `302 Location: <target>`.
    redirects: HashMap<String, String>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

async fn record(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/{path}");
    let mut g = inner.lock().unwrap();
    let redirect = g.redirects.get(&path).cloned();
    let status = match &redirect {
        Some(_) => 302,
        None => g
            .queued
            .get_mut(&path)
            .and_then(|q| q.pop_front())
            .unwrap_or(200),
    };
    g.hits.push(Hit {
        path,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        body: body.to_vec(),
        answered: status,
    });
    let code = StatusCode::from_u16(status).unwrap();
    match redirect {
        Some(to) => (code, [("location", to)]).into_response(),
        None => code.into_response(),
    }
}

impl Receiver {
    /// On a free port.
    pub async fn start() -> Receiver {
        Self::start_on(0).await
    }

    /// On `port` (0: any free one).
    pub async fn start_on(port: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(record))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { addr, inner, task }
    }

    /// `http://127.0.0.1:PORT/PATH`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next POSTs to `path` are answered with these statuses, in order; then 200.
    pub fn answer(&self, path: &str, statuses: &[u16]) {
        self.inner
            .lock()
            .unwrap()
            .queued
            .insert(path.into(), statuses.iter().copied().collect());
    }

    /// POSTs to `path` are answered `302 Location: target`.
    pub fn redirect(&self, path: &str, target: &str) {
        self.inner
            .lock()
            .unwrap()
            .redirects
            .insert(path.into(), target.into());
    }

    pub fn hits(&self, path: &str) -> Vec<Hit> {
        let g = self.inner.lock().unwrap();
        g.hits.iter().filter(|h| h.path == path).cloned().collect()
    }

    /// Waits until `path` got at least `n` POSTs; panics after `limit`.
    pub async fn wait_hits(&self, path: &str, n: usize, limit: Duration) -> Vec<Hit> {
        let start = Instant::now();
        loop {
            let hits = self.hits(path);
            if hits.len() >= n {
                return hits;
            }
            assert!(
                start.elapsed() < limit,
                "{path} got {} of {n} webhook POSTs in {limit:?}",
                hits.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops listening (connections are refused from now on); the port may be taken again
    /// with [`Receiver::start_on`].
    pub async fn stop(self) -> u16 {
        self.task.abort();
        let _ = self.task.await;
        self.addr.port()
    }
}

//! HTTP client for the REST API: JSON calls, the error shape, uuid-prefix resolution.

use super::exit;
use crate::model::Request;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CliError {
    #[error("cannot reach the API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error("{0}")]
    Input(String),
    #[error("unexpected answer from the API: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => exit::UNREACHABLE,
            _ => exit::ERROR,
        }
    }
}

/// A request as control calls return it.
#[derive(Debug, Deserialize)]
pub struct Controlled {
    #[serde(flatten)]
    pub request: Request,
    pub applied: bool,
}

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(api_url: &str) -> Self {
        let token = std::env::var("SQLITE_SIM_API_TOKEN").ok().or_else(|| {
            crate::config::load_env_file(std::path::Path::new(".env"))
                .ok()
                .and_then(|m| m.get("SQLITE_SIM_API_TOKEN").cloned())
        });
        ApiClient {
            base: api_url.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(5))
                .build()
                .expect("a plain HTTP client builds"),
        }
    }

    /// The WebSocket URL of `path` (`ws://` for `http://`).
    pub fn ws_url(&self, path: &str) -> Result<String, CliError> {
        match self.base.strip_prefix("http://") {
            Some(rest) => Ok(format!("ws://{rest}{path}")),
            None => Err(CliError::Input(format!(
                "attach needs an http:// API URL (no TLS client is built in), not {}",
                self.base
            ))),
        }
    }

    /// The bearer token, if one is configured.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// `method` on the API path made of `segments`, each percent-encoded as one segment (an
    /// artifact's guest path is several).
    pub fn request_segments(
        &self,
        method: reqwest::Method,
        segments: &[String],
    ) -> Result<reqwest::RequestBuilder, CliError> {
        let bad = || CliError::Input(format!("{:?} is not an http:// URL", self.base));
        let mut url = reqwest::Url::parse(&self.base).map_err(|_| bad())?;
        url.path_segments_mut()
            .map_err(|_| bad())?
            .pop_if_empty()
            .extend(segments);
        let r = self.http.request(method, url);
        Ok(match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        })
    }

    pub fn transport_error(&self, e: reqwest::Error) -> CliError {
        if e.is_connect() || e.is_timeout() || e.is_request() {
            CliError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            }
        } else {
            CliError::Protocol(root_cause(&e))
        }
    }

    /// Sends and checks the status; an error status becomes [`CliError::Api`].
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, CliError> {
        let resp = req.send().await.map_err(|e| self.transport_error(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        Err(CliError::Api {
            status,
            code: body["error"]["code"]
                .as_str()
                .unwrap_or("http_error")
                .to_string(),
            message: body["error"]["message"]
                .as_str()
                .unwrap_or("the API answered with an error")
                .to_string(),
        })
    }

    pub async fn json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, CliError> {
        self.send(req)
            .await?
            .json()
            .await
            .map_err(|e| CliError::Protocol(root_cause(&e)))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.json(self.request(reqwest::Method::GET, path)).await
    }

    /// A full uuid, or a unique prefix of one.
    pub async fn resolve(&self, id: &str) -> Result<Request, CliError> {
        let id = id.trim();
        if id.len() == 36 {
            return match self.get::<Request>(&format!("/requests/{id}")).await {
                Err(CliError::Api { status: 404, .. }) => {
                    Err(CliError::NotFound(format!("no request {id}")))
                }
                other => other,
            };
        }
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(CliError::Input(format!(
                "{id:?} is not a request id or a prefix of one (hex digits)"
            )));
        }
        let list: Value = self
            .get(&format!(
                "/requests?uuid_prefix={}&limit=20",
                id.to_ascii_lowercase()
            ))
            .await?;
        let matches: Vec<Request> = serde_json::from_value(list["requests"].clone())
            .map_err(|e| CliError::Protocol(e.to_string()))?;
        match matches.len() {
            0 => Err(CliError::NotFound(format!("no request matches {id:?}"))),
            1 => Ok(matches.into_iter().next().expect("one")),
            _ => {
                let total = list["total"].as_u64().unwrap_or(matches.len() as u64);
                let lines: Vec<String> = matches
                    .iter()
                    .map(|r| format!("  {}  {}  {}", r.uuid, r.vm_name, r.status))
                    .collect();
                Err(CliError::Ambiguous(format!(
                    "{id:?} matches {total} requests; give more of the uuid:\n{}",
                    lines.join("\n")
                )))
            }
        }
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

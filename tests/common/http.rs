//! HTTP plumbing shared by the tests: a [`Client`] for one server's API and the whole
//! [`Reply`] it reads.
//!
//! - Generic calls: [`Client::get_json`], [`Client::post_json`], [`Client::put_json`] and
//!   [`Client::delete`] return `(status, JSON body)`, the body `Value::Null` when it is empty
//!   or not JSON; [`Client::fetch`], [`Client::call`] and [`Client::post_bytes`] return the
//!   whole [`Reply`] (status, headers, bytes) for tests that look at headers or raw bodies;
//!   [`Client::request`] plus [`Client::send`] cover anything else (extra headers, streaming).
//!   The `try_` variants return an error instead of panicking when the server cannot be reached.
//! - The API's shortcuts: [`Client::submit`], [`Client::submit_json`], [`Client::get`],
//!   [`Client::logs_of`], [`Client::output`], [`Client::wait_output`], [`Client::put_status`],
//!   [`Client::delete_request`], [`Client::raw`].
//! - Authorization: [`Client::with_authorization`] sends an `Authorization` header with every
//!   request.
//!
//! A [`super::Server`] derefs to its client, so `s.get_json("/requests")` works on a server;
//! `Server::api()` hands out a clone for spawned tasks.

use reqwest::header::HeaderMap;
pub use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A whole HTTP reply, read to its end.
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON; panics, quoting it, when it is not JSON.
    pub fn json(&self) -> Value {
        self.try_json()
            .unwrap_or_else(|| panic!("{} reply is not JSON: {}", self.status, self.text()))
    }

    /// The body as JSON, or `None` when it is not JSON.
    pub fn try_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body as JSON, or `Value::Null` when it is empty or not JSON.
    pub fn json_or_null(&self) -> Value {
        self.try_json().unwrap_or(Value::Null)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The value of header `name`; panics when the reply has none.
    pub fn header(&self, name: &str) -> &str {
        self.headers[name].to_str().unwrap()
    }
}

/// A client for one server's API. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct Client {
    /// `http://HOST:PORT`, as `SQLITE_SIM_API_URL` wants it.
    pub url: String,
    http: reqwest::Client,
    authorization: Option<String>,
}

impl Client {
    pub fn new(url: String) -> Client {
        Client {
            url,
            http: reqwest::Client::new(),
            authorization: None,
        }
    }

    /// The same client, sending `Authorization: {value}` with every request.
    pub fn with_authorization(&self, value: &str) -> Client {
        Client {
            authorization: Some(value.to_string()),
            ..self.clone()
        }
    }

    /// A request to `path` (e.g. `/requests?status=done`), with this client's authorization.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.url));
        match &self.authorization {
            Some(a) => req.header("authorization", a),
            None => req,
        }
    }

    /// Sends `req` and reads the whole reply; an error when the server cannot be reached or
    /// the reply is cut short.
    pub async fn try_send(&self, req: reqwest::RequestBuilder) -> reqwest::Result<Reply> {
        let r = req.send().await?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await?.to_vec();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Sends `req` and reads the whole reply; panics when the server cannot be reached.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        self.try_send(req).await.unwrap()
    }

    /// `method path`, with `body` as JSON if given.
    pub async fn try_call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Result<Reply> {
        let req = self.request(method, path);
        self.try_send(match body {
            Some(b) => req.json(b),
            None => req,
        })
        .await
    }

    /// `method path`, with `body` as JSON if given; panics when the server cannot be reached.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Reply {
        self.try_call(method, path, body).await.unwrap()
    }

    async fn call_json(&self, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let r = self.call(method, path, body).await;
        (r.status, r.json_or_null())
    }

    /// `GET path`, the whole reply.
    pub async fn fetch(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }

    /// `GET path` (e.g. `/requests?status=done`) as JSON, with its status code.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        self.call_json(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call_json(Method::POST, path, Some(body)).await
    }

    /// `PUT path` with a JSON body.
    pub async fn put_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call_json(Method::PUT, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.call_json(Method::DELETE, path, None).await
    }

    /// `POST path` with raw bytes and, if given, a `Content-Type`.
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>, content_type: Option<&str>) -> Reply {
        let req = self.request(Method::POST, path).body(body);
        self.send(match content_type {
            Some(c) => req.header("content-type", c),
            None => req,
        })
        .await
    }

    // The API's shortcuts.

    /// `POST /requests` with `body` exactly as given (valid or not).
    pub async fn submit_json(&self, body: &Value) -> (u16, Value) {
        self.post_json("/requests", body).await
    }

    /// Submits `commands` for `vm`, asserts it was accepted, and returns its uuid.
    pub async fn submit(&self, vm: &str, commands: &str, timeout: u32) -> String {
        let body = json!({"vm_name": vm, "commands": commands, "timeout": timeout});
        let r = self.call(Method::POST, "/requests", Some(&body)).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let body = r.json();
        assert_eq!(body["status"], "pending");
        assert_eq!(body["message"], "Request created successfully");
        body["uuid"].as_str().unwrap().to_string()
    }

    /// `GET /hosts`'s hosts.
    pub async fn hosts(&self) -> Vec<Value> {
        let (code, v) = self.get_json("/hosts").await;
        assert_eq!(code, 200, "{v}");
        v["hosts"].as_array().unwrap().clone()
    }

    /// Waits until `GET /hosts` shows exactly these hosts live (`ids` sorted; no others live);
    /// panics after `limit` with `logs()` (the processes' stderr).
    pub async fn wait_live(
        &self,
        ids: &[&str],
        limit: std::time::Duration,
        logs: impl Fn() -> String,
    ) -> Vec<Value> {
        let start = std::time::Instant::now();
        loop {
            let hs = self.hosts().await;
            let mut live: Vec<&str> = hs
                .iter()
                .filter(|h| h["live"] == true)
                .map(|h| h["host_id"].as_str().unwrap())
                .collect();
            live.sort();
            if live == ids {
                return hs;
            }
            assert!(
                start.elapsed() < limit,
                "hosts {hs:?}, want {ids:?} live\n{}",
                logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// `GET /requests/{uuid}`: the request as JSON.
    pub async fn get(&self, uuid: &str) -> Value {
        self.fetch(&format!("/requests/{uuid}")).await.json()
    }

    /// Every log entry of a request.
    pub async fn logs_of(&self, uuid: &str) -> Vec<Value> {
        let v = self.fetch(&format!("/requests/{uuid}/logs")).await.json();
        v.as_array().unwrap().clone()
    }

    /// `PUT /requests/{id}/status`.
    pub async fn put_status(&self, id: &str, status: &str) -> (u16, Value) {
        self.put_json(
            &format!("/requests/{id}/status"),
            &json!({ "status": status }),
        )
        .await
    }

    /// `DELETE /requests/{id}`: cancels an active request, deletes a finished one.
    pub async fn delete_request(&self, id: &str) -> (u16, Value) {
        self.delete(&format!("/requests/{id}")).await
    }

    /// The exact bytes of one log type (`GET /logs/raw`; the server's default when `None`).
    pub async fn raw(&self, id: &str, log_type: Option<&str>) -> Vec<u8> {
        let query = log_type
            .map(|t| format!("?log_type={t}"))
            .unwrap_or_default();
        self.fetch(&format!("/requests/{id}/logs/raw{query}"))
            .await
            .body
    }

    /// Waits until `needle` appears in the request's `log_type` output.
    pub async fn wait_output(&self, id: &str, log_type: &str, needle: &str) {
        self.wait_output_within(id, log_type, needle, Duration::from_secs(180))
            .await
    }

    /// Like [`Client::wait_output`], giving up after `limit`.
    pub async fn wait_output_within(
        &self,
        id: &str,
        log_type: &str,
        needle: &str,
        limit: Duration,
    ) {
        let start = Instant::now();
        loop {
            let out = self.output(id, log_type).await;
            if out.contains(needle) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{needle:?} never appeared in {log_type} within {limit:?}:\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Concatenated output of one log type.
    pub async fn output(&self, uuid: &str, log_type: &str) -> String {
        self.logs_of(uuid)
            .await
            .iter()
            .filter(|e| e["log_type"] == log_type)
            .map(|e| e["output"].as_str().unwrap().to_string())
            .collect()
    }
}

/// One part of a hand-built `multipart/form-data` body (hand-built so that a test controls
/// every byte of its names, including hostile ones).
pub struct FormPart<'a> {
    pub name: &'a str,
    pub filename: Option<&'a str>,
    /// Extra part headers, e.g. `("X-Mode", "0755")`.
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: Vec<u8>,
}

impl<'a> FormPart<'a> {
    /// The `request` part: the submission's JSON.
    pub fn request(json: &Value) -> FormPart<'a> {
        FormPart {
            name: "request",
            filename: None,
            headers: vec![("Content-Type", "application/json")],
            body: json.to_string().into_bytes(),
        }
    }

    /// A `file` part bound for `destination`.
    pub fn file(destination: &'a str, body: Vec<u8>) -> FormPart<'a> {
        FormPart {
            name: "file",
            filename: Some(destination),
            headers: Vec::new(),
            body,
        }
    }
}

/// A `multipart/form-data` body and its `Content-Type`.
pub fn multipart(parts: &[FormPart]) -> (Vec<u8>, String) {
    let boundary = "sqsim-test-boundary-7d1f0c";
    let mut body = Vec::new();
    for p in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{}\"", p.name);
        if let Some(f) = p.filename {
            disposition.push_str(&format!("; filename=\"{f}\""));
        }
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"\r\n");
        for (k, v) in &p.headers {
            body.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(&p.body);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (body, format!("multipart/form-data; boundary={boundary}"))
}

impl Client {
    /// `POST /requests` as a multipart submission.
    pub async fn submit_multipart(&self, parts: &[FormPart<'_>]) -> Reply {
        let (body, ct) = multipart(parts);
        self.post_bytes("/requests", body, Some(&ct)).await
    }
}

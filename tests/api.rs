//! The REST API's contract without booting VMs: the `api` process alone, so nothing is claimed.
//! Every rejection is a 4xx with the JSON error shape, and changes nothing.

mod common;

use common::{Mode, Options, Server};
use serde_json::{json, Value};

async fn api() -> Server {
    Server::start(Options {
        mode: Mode::Api,
        ..Default::default()
    })
    .await
}

async fn post(s: &Server, body: Value) -> (u16, Value) {
    let r = s
        .request(reqwest::Method::POST, "/requests")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        !body["error"]["message"].as_str().unwrap_or("").is_empty(),
        "{body}"
    );
}

fn count_requests(s: &Server) -> i64 {
    s.query_i64("SELECT COUNT(*) FROM requests")
}

#[tokio::test]
async fn create_and_read_back() {
    let s = api().await;
    let r = s
        .request(reqwest::Method::POST, "/requests")
        .json(&json!({"vm_name": "tiny", "commands": "echo hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    let uuid = body["uuid"].as_str().unwrap();
    assert_eq!(location, format!("/requests/{uuid}"));
    assert_eq!(body["message"], "Request created successfully");

    let got = s.get(uuid).await;
    assert_eq!(got["uuid"], uuid);
    assert_eq!(got["vm_name"], "tiny");
    assert_eq!(got["commands"], "echo hi");
    assert_eq!(got["timeout"], 300, "SQLITE_SIM_DEFAULT_TIMEOUT applies");
    assert_eq!(got["status"], "pending");
    for f in [
        "exit_code",
        "error",
        "started_at",
        "finished_at",
        "agent_id",
    ] {
        assert!(got[f].is_null(), "{f}: {got}");
    }
    let created = got["created_at"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.len() == 27, "{created}");
    assert_eq!(s.logs_of(uuid).await, Vec::<Value>::new());
}

#[tokio::test]
async fn invalid_submissions_are_rejected_and_change_nothing() {
    let s = api().await;
    let big = "x".repeat(64 * 1024 + 1);
    let long_name = "a".repeat(1024);
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"vm_name": "nope", "commands": "x"}),
            "available: tiny",
        ),
        (json!({"vm_name": "../x", "commands": "x"}), "is invalid"),
        (json!({"vm_name": "/abs", "commands": "x"}), "is invalid"),
        (json!({"vm_name": "a/b", "commands": "x"}), "is invalid"),
        (json!({"vm_name": "a\u{0}b", "commands": "x"}), "is invalid"),
        (json!({"vm_name": long_name, "commands": "x"}), "is invalid"),
        (json!({"vm_name": "", "commands": "x"}), "is invalid"),
        (
            json!({"vm_name": "tiny", "commands": ""}),
            "must not be empty",
        ),
        (
            json!({"vm_name": "tiny", "commands": " \n\t"}),
            "must not be empty",
        ),
        (
            json!({"vm_name": "tiny", "commands": big}),
            "the limit is 65536",
        ),
        (
            json!({"vm_name": "tiny", "commands": "x", "timeout": 0}),
            "timeout must be from 1 to 3600",
        ),
        (
            json!({"vm_name": "tiny", "commands": "x", "timeout": 3601}),
            "timeout must be from 1 to 3600",
        ),
        (
            json!({"vm_name": "tiny", "commands": "x", "timeout": -1}),
            "timeout",
        ),
        (
            json!({"vm_name": "tiny", "commands": "x", "timeout": 1e12}),
            "timeout",
        ),
        (
            json!({"vm_name": "tiny", "commands": "x", "timeout": "300"}),
            "timeout",
        ),
        (json!({"vm_name": "tiny", "commands": 5}), "commands"),
        (json!({"vm_name": "tiny"}), "commands"),
        (
            json!({"vm_name": "tiny", "commands": "x", "extra": 1}),
            "unknown field",
        ),
        (json!(["tiny", "x"]), ""),
    ];
    for (body, needle) in cases {
        let (status, resp) = post(&s, body.clone()).await;
        assert_error(status, &resp, 422, "validation_error");
        let msg = resp["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body} → {msg}");
    }
    let exactly_max = "y".repeat(64 * 1024);
    let (status, _) = post(&s, json!({"vm_name": "tiny", "commands": exactly_max})).await;
    assert_eq!(status, 201, "64 KiB is allowed");
    // What the schema admits is accepted: an integer written with a fraction part of zero (JSON
    // Schema's `integer`), a null timeout, non-ASCII whitespace.
    for body in [
        json!({"vm_name": "tiny", "commands": "x", "timeout": 300.0}),
        json!({"vm_name": "tiny", "commands": "x", "timeout": null}),
        json!({"vm_name": "tiny", "commands": "\u{3000}"}),
    ] {
        let (status, resp) = post(&s, body.clone()).await;
        assert_eq!(status, 201, "{body} → {resp}");
    }
    assert_eq!(
        count_requests(&s),
        4,
        "only the valid submissions were stored"
    );
}

#[tokio::test]
async fn malformed_bodies_get_4xx_never_5xx() {
    let s = api().await;
    let send = |body: Vec<u8>, ctype: Option<&'static str>| {
        let mut r = s.request(reqwest::Method::POST, "/requests").body(body);
        if let Some(c) = ctype {
            r = r.header("content-type", c);
        }
        r.send()
    };
    let r = send(b"{\"vm_name\": ".to_vec(), Some("application/json"))
        .await
        .unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 400, "malformed_json");
    let r = send(
        b"{\"vm_name\":\"tiny\",\"commands\":\"\xff\xfe\"}".to_vec(),
        Some("application/json"),
    )
    .await
    .unwrap();
    assert!(
        r.status().is_client_error(),
        "invalid UTF-8: {}",
        r.status()
    );
    let r = send(b"{}".to_vec(), None).await.unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 415, "unsupported_media_type");
    let huge = format!(
        "{{\"vm_name\":\"tiny\",\"commands\":\"{}\"}}",
        "z".repeat(200 * 1024)
    );
    let r = send(huge.into_bytes(), Some("application/json"))
        .await
        .unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 413, "payload_too_large");
    assert_eq!(count_requests(&s), 0);
}

#[tokio::test]
async fn reads_of_bad_or_unknown_ids() {
    let s = api().await;
    for path in ["/requests/not-a-uuid", "/requests/1%27%20OR%201=1--/logs"] {
        let r = s.request(reqwest::Method::GET, path).send().await.unwrap();
        let st = r.status().as_u16();
        assert_error(st, &r.json().await.unwrap(), 400, "invalid_uuid");
    }
    let unknown = "123e4567-e89b-12d3-a456-426614174000";
    for path in [
        format!("/requests/{unknown}"),
        format!("/requests/{unknown}/logs"),
    ] {
        let r = s.request(reqwest::Method::GET, &path).send().await.unwrap();
        let st = r.status().as_u16();
        assert_error(st, &r.json().await.unwrap(), 404, "not_found");
    }
    let r = s
        .request(reqwest::Method::GET, "/nope")
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 404, "no_route");
}

#[tokio::test]
async fn log_filters_are_validated() {
    let s = api().await;
    let id = s.submit("tiny", "echo x", 30).await;
    for q in [
        "log_type=bogus",
        "limit=0",
        "limit=100001",
        "after=abc",
        "after=-1",
        "nonsense=1",
    ] {
        let r = s
            .request(reqwest::Method::GET, &format!("/requests/{id}/logs?{q}"))
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        assert_error(st, &r.json().await.unwrap(), 422, "validation_error");
    }
    let r = s
        .request(
            reqwest::Method::GET,
            &format!("/requests/{id}/logs?log_type=stdout&after=0&limit=10"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn health_reports_the_database() {
    let s = api().await;
    let r = s
        .request(reqwest::Method::GET, "/health")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["database"], "ok");
}

#[tokio::test]
async fn list_filters_pages_and_counts() {
    let s = api().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(s.submit("tiny", &format!("echo {i}"), 30).await);
    }
    s.put_status(&ids[0], "hold").await;
    s.put_status(&ids[1], "cancelled").await;
    let list = |q: &'static str| {
        let s = &s;
        async move {
            let r = s
                .request(reqwest::Method::GET, &format!("/requests{q}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{q}");
            r.json::<Value>().await.unwrap()
        }
    };
    let all = list("").await;
    assert_eq!(all["total"], 5);
    assert_eq!(all["limit"], 50);
    let got: Vec<&str> = all["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uuid"].as_str().unwrap())
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(got, newest_first);
    let page = list("?limit=2&offset=1").await;
    assert_eq!(page["total"], 5);
    assert_eq!(page["requests"].as_array().unwrap().len(), 2);
    assert_eq!(page["requests"][0]["uuid"], ids[3]);
    let held = list("?status=hold&status=cancelled").await;
    assert_eq!(held["total"], 2);
    let held = list("?status=hold,cancelled&vm_name=tiny").await;
    assert_eq!(held["total"], 2);
    assert_eq!(list("?vm_name=other").await["total"], 0);
    assert_eq!(list("?vm_name=%27%20OR%201%3D1%20--").await["total"], 0);
    for bad in [
        "?status=paused",
        "?limit=0",
        "?limit=1001",
        "?offset=-1",
        "?order=asc",
    ] {
        let r = s
            .request(reqwest::Method::GET, &format!("/requests{bad}"))
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        assert_error(st, &r.json().await.unwrap(), 422, "validation_error");
    }
}

#[tokio::test]
async fn control_of_requests_without_a_vm() {
    let s = api().await;
    let id = s.submit("tiny", "echo x", 30).await;
    let (code, r) = s.put_status(&id, "hold").await;
    assert_eq!(
        (code, r["status"].as_str(), r["applied"].as_bool()),
        (200, Some("hold"), Some(true))
    );
    let (code, r) = s.put_status(&id, "running").await;
    assert_error(code, &r, 409, "invalid_transition");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("allowed: pending, cancelled"),
        "{r}"
    );
    let (code, r) = s.put_status(&id, "pending").await;
    assert_eq!((code, r["status"].as_str()), (200, Some("pending")));
    let (code, r) = s.put_status(&id, "pending").await;
    assert_error(code, &r, 409, "invalid_transition");
    // The agents' states are never an operator's target: invalid input, whatever the state.
    for target in ["done", "failed", "acknowledged"] {
        let (code, r) = s.put_status(&id, target).await;
        assert_error(code, &r, 422, "validation_error");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("must be one of hold, pending, running, cancelled"),
            "{r}"
        );
    }
    let (code, r) = s.put_status(&id, "paused").await;
    assert_error(code, &r, 422, "validation_error");
    let r = s
        .request(reqwest::Method::PUT, &format!("/requests/{id}/status"))
        .json(&json!({"status": "hold", "force": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "unknown fields rejected");

    // A cancel keeps the request and its logs; control of it is then refused.
    let (code, body) = s.put_status(&id, "cancelled").await;
    assert_eq!(code, 200);
    assert_eq!(
        (body["status"].as_str(), body["applied"].as_bool()),
        (Some("cancelled"), Some(true))
    );
    assert!(body["finished_at"].is_string());
    let (code, r) = s.put_status(&id, "pending").await;
    assert_error(code, &r, 409, "invalid_transition");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allows no change"),
        "{r}"
    );
    let (code, got) = s.get_json(&format!("/requests/{id}")).await;
    assert_eq!(
        (code, got["status"].as_str()),
        (200, Some("cancelled")),
        "a cancel keeps the request"
    );
    // DELETE removes it: nothing under its path answers any more.
    let r = s
        .request(reqwest::Method::DELETE, &format!("/requests/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    for path in [
        format!("/requests/{id}"),
        format!("/requests/{id}/logs"),
        format!("/requests/{id}/logs/raw"),
        format!("/requests/{id}/logs/stream"),
    ] {
        let (code, r) = s.get_json(&path).await;
        assert_error(code, &r, 404, "not_found");
    }
    let r = s
        .request(reqwest::Method::DELETE, &format!("/requests/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // So does DELETE of a pending request: it had no VM to stop.
    let pending = s.submit("tiny", "echo x", 30).await;
    assert_eq!(s.delete_request(&pending).await.0, 204);
    assert_eq!(s.get_json(&format!("/requests/{pending}")).await.0, 404);
    assert_eq!(count_requests(&s), 0);
}

#[tokio::test]
async fn raw_logs_of_a_request_without_output_are_empty() {
    let s = api().await;
    let id = s.submit("tiny", "echo x", 30).await;
    let r = s
        .request(reqwest::Method::GET, &format!("/requests/{id}/logs/raw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert!(r.bytes().await.unwrap().is_empty());
    let r = s
        .request(
            reqwest::Method::GET,
            &format!("/requests/{id}/logs/raw?log_type=nope"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
}

#[tokio::test]
async fn bearer_token_guards_everything_but_health() {
    let s = Server::start(Options {
        mode: Mode::Api,
        env: vec![("SQLITE_SIM_API_TOKEN".into(), "s3cret-token".into())],
        ..Default::default()
    })
    .await;
    let get = |path: &'static str, token: Option<&'static str>| {
        let mut r = s.request(reqwest::Method::GET, path);
        if let Some(t) = token {
            r = r.header("authorization", t);
        }
        r.send()
    };
    assert_eq!(get("/health", None).await.unwrap().status(), 200);
    for path in ["/requests", "/metrics", "/openapi.json", "/vms"] {
        let r = get(path, None).await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
        assert_eq!(get(path, Some("Bearer wrong")).await.unwrap().status(), 401);
        assert_eq!(get(path, Some("s3cret-token")).await.unwrap().status(), 401);
        assert_eq!(
            get(path, Some("Bearer s3cret-token"))
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
    let r = s
        .request(reqwest::Method::POST, "/requests")
        .json(&json!({"vm_name": "tiny", "commands": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(count_requests(&s), 0);
    assert!(
        !s.logs().contains("s3cret-token"),
        "the token is never logged"
    );
}

async fn openapi(s: &Server, token: Option<&str>) -> Value {
    let mut r = s.request(reqwest::Method::GET, "/openapi.json");
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Whether `doc` lists `status` for `method path`, with `code` among its codes.
fn documents(doc: &Value, method: &str, path: &str, status: u16, code: &str) -> bool {
    let r = &doc["paths"][path][method]["responses"][status.to_string()];
    let all_of = &r["content"]["application/json"]["schema"]["allOf"];
    all_of[0]["$ref"] == "#/components/schemas/Error"
        && all_of[1]["properties"]["error"]["properties"]["code"]["enum"]
            .as_array()
            .is_some_and(|codes| codes.iter().any(|c| c == code))
}

/// Every documented operation is served, and every other method on its path is refused with
/// `405`, whose `Allow` header lists exactly the documented methods.
#[tokio::test]
async fn openapi_lists_exactly_the_routes_served_and_docs_are_served() {
    let s = api().await;
    let doc = openapi(&s, None).await;
    let paths = doc["paths"].as_object().unwrap();
    let mut listed: Vec<String> = Vec::new();
    for (path, item) in paths {
        let url = path
            .replace("{uuid}", &uuid::Uuid::nil().to_string())
            .replace("{name}", "tiny");
        let mut methods: Vec<String> = item
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        for m in &methods {
            listed.push(format!("{m} {path}"));
            let r = s.request(m.parse().unwrap(), &url).send().await.unwrap();
            let code = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert!(
                ![405].contains(&code) && body["error"]["code"] != "no_route",
                "{m} {path}: {code} {body}"
            );
        }
        if methods.iter().any(|m| m == "GET") {
            methods.push("HEAD".into());
        }
        let r = s
            .request(reqwest::Method::PATCH, &url)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "PATCH {path}");
        let mut allow: Vec<String> = r.headers()["allow"]
            .to_str()
            .unwrap()
            .split(',')
            .map(|m| m.trim().to_string())
            .collect();
        allow.sort();
        methods.sort();
        assert_eq!(allow, methods, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "method_not_allowed", "{path}");
    }
    listed.sort();
    assert_eq!(
        listed,
        [
            "DELETE /requests/{uuid}",
            "DELETE /tokens/{name}",
            "DELETE /vms/{name}/template",
            "GET /audit",
            "GET /health",
            "GET /hosts",
            "GET /metrics",
            "GET /requests",
            "GET /requests/{uuid}",
            "GET /requests/{uuid}/artifacts",
            "GET /requests/{uuid}/artifacts.tar",
            "GET /requests/{uuid}/artifacts/{path}",
            "GET /requests/{uuid}/console",
            "GET /requests/{uuid}/logs",
            "GET /requests/{uuid}/logs/raw",
            "GET /requests/{uuid}/logs/stream",
            "GET /stats",
            "GET /tokens",
            "GET /vms",
            "GET /vms/{name}",
            "POST /prune",
            "POST /requests",
            "POST /tokens",
            "POST /vms/{name}/template",
            "PUT /requests/{uuid}/status",
        ]
    );
    let r = s
        .request(reqwest::Method::GET, "/docs/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("swagger"), "Swagger UI served offline");
    let r = s
        .request(reqwest::Method::GET, "/docs/swagger-initializer.js")
        .send()
        .await
        .unwrap();
    assert!(
        r.text().await.unwrap().contains("/openapi.json"),
        "Swagger UI shows the served document"
    );
}

/// Each error answer the server gives is documented for its operation, with its code.
#[tokio::test]
async fn every_error_answer_is_documented_for_its_operation() {
    let s = Server::start(Options {
        mode: Mode::Api,
        env: vec![("SQLITE_SIM_API_TOKEN".into(), "t0ken".into())],
        configs: vec![
            ("warm".into(), "KERNEL=\"/k\"\nWARM=\"on\"\n".into()),
            ("broken".into(), "MEMROY=\"1G\"\n".into()),
        ],
        ..Default::default()
    })
    .await;
    let doc = openapi(&s, Some("t0ken")).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let r = s
        .request(reqwest::Method::POST, "/requests")
        .bearer_auth("t0ken")
        .json(&json!({"vm_name": "tiny", "commands": "echo x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let big = format!("{{\"x\":\"{}\"}}", "z".repeat(200 * 1024));
    let json = Some("application/json");
    // (method, documented path, concrete path, content type, body, extra header)
    type Case<'a> = (
        &'a str,
        &'a str,
        String,
        Option<&'a str>,
        String,
        Option<(&'a str, &'a str)>,
    );
    let mut cases: Vec<Case> = Vec::new();
    for (m, p) in [
        ("get", "/requests/{uuid}"),
        ("delete", "/requests/{uuid}"),
        ("get", "/requests/{uuid}/logs"),
        ("get", "/requests/{uuid}/logs/raw"),
        ("get", "/requests/{uuid}/logs/stream"),
    ] {
        cases.push((m, p, p.replace("{uuid}", "nope"), None, String::new(), None));
        cases.push((
            m,
            p,
            p.replace("{uuid}", &unknown),
            None,
            String::new(),
            None,
        ));
    }
    let status = "/requests/{uuid}/status";
    let mine = status.replace("{uuid}", &id);
    for (ctype, body) in [
        (json, r#"{"status":"hold""#.to_string()),
        (None, r#"{"status":"hold"}"#.to_string()),
        (json, big.clone()),
        (json, r#"{"status":"done"}"#.to_string()),
        (json, r#"["hold"]"#.to_string()),
        (json, r#"{"status":"running"}"#.to_string()),
    ] {
        cases.push(("put", status, mine.clone(), ctype, body, None));
    }
    cases.push((
        "put",
        status,
        status.replace("{uuid}", "nope"),
        json,
        r#"{"status":"hold"}"#.into(),
        None,
    ));
    cases.push((
        "put",
        status,
        status.replace("{uuid}", &unknown),
        json,
        r#"{"status":"hold"}"#.into(),
        None,
    ));
    for path in ["/requests", "/prune"] {
        for (ctype, body) in [
            (json, "{".to_string()),
            (None, "{}".to_string()),
            (Some("text/plain"), "{}".to_string()),
            (json, big.clone()),
            (json, "{}".to_string()),
            (json, "[]".to_string()),
        ] {
            cases.push(("post", path, path.to_string(), ctype, body, None));
        }
    }
    for q in [
        "?limit=0",
        "?status=",
        "?uuid_prefix=xyz",
        "?offset=-1",
        "?sort=asc",
    ] {
        cases.push((
            "get",
            "/requests",
            format!("/requests{q}"),
            None,
            String::new(),
            None,
        ));
    }
    for q in ["?limit=0", "?after=-1", "?log_type=x"] {
        let p = "/requests/{uuid}/logs";
        cases.push((
            "get",
            p,
            format!("/requests/{id}/logs{q}"),
            None,
            String::new(),
            None,
        ));
    }
    cases.push((
        "get",
        "/requests/{uuid}/logs/raw",
        format!("/requests/{id}/logs/raw?log_type=x"),
        None,
        String::new(),
        None,
    ));
    let stream = "/requests/{uuid}/logs/stream";
    cases.push((
        "get",
        stream,
        format!("/requests/{id}/logs/stream?after=-1"),
        None,
        String::new(),
        None,
    ));
    cases.push((
        "get",
        stream,
        format!("/requests/{id}/logs/stream"),
        None,
        String::new(),
        Some(("last-event-id", "x")),
    ));
    cases.push((
        "get",
        stream,
        format!("/requests/{id}/logs/stream"),
        None,
        String::new(),
        Some(("last-event-id", "-1")),
    ));

    let template = "/vms/{name}/template";
    // A bad name, an unknown VM; a broken config, a VM that is not warm; a VM with no template.
    for (m, p, names) in [
        ("get", "/vms/{name}", &["..x", "nope"][..]),
        ("post", template, &["..x", "nope", "broken", "tiny"]),
        ("delete", template, &["..x", "nope", "warm"]),
    ] {
        for name in names {
            cases.push((m, p, p.replace("{name}", name), None, String::new(), None));
        }
    }
    cases.push((
        "post",
        "/requests",
        "/requests".into(),
        json,
        r#"{"vm_name":"tiny","commands":"x","boot":"warm"}"#.into(),
        None,
    ));

    let mut seen = std::collections::BTreeSet::new();
    for (method, path, concrete, ctype, body, header) in cases {
        let oversized = body.len() > 128 * 1024;
        for auth in [true, false] {
            if !auth && oversized {
                // Refused before any of the body is read: the connection is closed under the
                // upload, and the client rarely sees the answer.
                continue;
            }
            let send = || {
                let mut r = s
                    .request(method.to_uppercase().parse().unwrap(), &concrete)
                    .body(body.clone());
                if auth {
                    r = r.bearer_auth("t0ken");
                }
                if let Some(c) = ctype {
                    r = r.header("content-type", c);
                }
                if let Some((k, v)) = header {
                    r = r.header(k, v);
                }
                r.send()
            };
            // A 413 is sent before the rest of the body is read and the connection closed, so
            // the client can see a reset instead, on that call or on the next one that reuses
            // the connection: retry. A server that died would fail every try.
            let mut sent = send().await;
            for _ in 0..5 {
                if sent.is_ok() {
                    break;
                }
                sent = send().await;
            }
            let r = sent.unwrap();
            let code = r.status().as_u16();
            let resp: Value = r.json().await.unwrap_or(Value::Null);
            let name = resp["error"]["code"].as_str().unwrap_or("");
            assert!(
                code >= 400 && !name.is_empty(),
                "{method} {concrete} {body:.40}: {code} {resp}"
            );
            assert!(
                documents(&doc, method, path, code, name),
                "{method} {path}: {code} {name} is not documented ({concrete} {body:.40})"
            );
            seen.insert((code, name.to_string()));
        }
    }
    let codes: Vec<u16> = seen.iter().map(|(c, _)| *c).collect();
    for status in [400, 401, 404, 409, 413, 415, 422] {
        assert!(
            codes.contains(&status),
            "no case produced {status}: {seen:?}"
        );
    }
    for code in [
        "invalid_name",
        "not_warm",
        "invalid_transition",
        "validation_error",
    ] {
        assert!(
            seen.iter().any(|(_, c)| c == code),
            "no case produced {code}: {seen:?}"
        );
    }
    assert_eq!(count_requests(&s), 1, "no rejected call stored anything");
}

/// The document describes this server: its VMs (as they are now) and its timeout maximum,
/// and what it admits is accepted.
#[tokio::test]
async fn openapi_describes_this_servers_vms_and_limits() {
    let s = Server::start(Options {
        mode: Mode::Api,
        env: vec![("SQLITE_SIM_MAX_TIMEOUT".into(), "1234".into())],
        ..Default::default()
    })
    .await;
    let body_schema =
        |doc: &Value| doc["components"]["schemas"]["CreateBody"]["properties"].clone();
    let props = body_schema(&openapi(&s, None).await);
    assert_eq!(props["vm_name"]["enum"], json!(["tiny"]));
    assert_eq!(props["timeout"]["maximum"], 1234);
    let (code, _) = post(
        &s,
        json!({"vm_name": "tiny", "commands": "x", "timeout": 1234}),
    )
    .await;
    assert_eq!(code, 201, "the documented maximum is accepted");
    let (code, r) = post(
        &s,
        json!({"vm_name": "tiny", "commands": "x", "timeout": 1235}),
    )
    .await;
    assert_error(code, &r, 422, "validation_error");

    // A config added while the server runs is listed, and accepted; a broken one is neither.
    std::fs::write(s.config_dir.join("extra.conf"), "MEMORY=\"256M\"\n").unwrap();
    std::fs::write(s.config_dir.join("broken.conf"), "NO_SUCH_KEY=1\n").unwrap();
    let props = body_schema(&openapi(&s, None).await);
    assert_eq!(props["vm_name"]["enum"], json!(["extra", "tiny"]));
    let (code, r) = post(&s, json!({"vm_name": "extra", "commands": "x"})).await;
    assert_eq!(code, 201, "{r}");
    let (code, r) = post(&s, json!({"vm_name": "broken", "commands": "x"})).await;
    assert_error(code, &r, 422, "validation_error");
    assert_eq!(count_requests(&s), 2);
}

#[tokio::test]
async fn cors_only_when_enabled() {
    let origin = "http://example.test";
    for (enabled, expect) in [(false, false), (true, true)] {
        let s = Server::start(Options {
            mode: Mode::Api,
            env: vec![
                ("SQLITE_SIM_ENABLE_CORS".into(), enabled.to_string()),
                ("SQLITE_SIM_ALLOWED_ORIGINS".into(), origin.into()),
            ],
            ..Default::default()
        })
        .await;
        let r = s
            .request(reqwest::Method::GET, "/requests")
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers().get("access-control-allow-origin").is_some(),
            expect,
            "enabled={enabled}"
        );
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let s = api().await;
    s.submit("tiny", "echo x", 30).await;
    let r = s
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    for needle in [
        "# TYPE sqlite_sim_requests gauge",
        "sqlite_sim_requests{status=\"pending\"} 1",
        "sqlite_sim_vms_running 0",
        "# TYPE sqlite_sim_boot_seconds histogram",
        "sqlite_sim_run_seconds_bucket{le=\"+Inf\"} 0",
        "sqlite_sim_shutdown_seconds_count 0",
        "sqlite_sim_log_bytes_total 0",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
}

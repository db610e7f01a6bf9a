//! Users, tokens and roles, and the audit log, against a real `api` process (on PostgreSQL too
//! when `SQLITE_SIM_TEST_DATABASE_URL` is set): every role against every operation, a
//! submitter's own requests, expiry and revocation taking effect at once, tokens made with the
//! CLI on the store with no API running, the audit of refused attempts, and no token ever in
//! the logs.

mod common;

use common::http::{Client, Method};
use common::{Mode, Options, Server};
use serde_json::{json, Value};
use std::time::Duration;

const ENV_TOKEN: &str = "env-admin-token-0123456789";

async fn api(env_token: bool) -> Server {
    Server::start(Options {
        mode: Mode::Api,
        env: if env_token {
            vec![("SQLITE_SIM_API_TOKEN".into(), ENV_TOKEN.into())]
        } else {
            Vec::new()
        },
        ..Default::default()
    })
    .await
}

/// `sqlite-sim token create` on the server's store; the token it printed.
fn cli_token(s: &Server, name: &str, role: &str, extra: &[&str]) -> String {
    s.make_token(name, role, extra)
}

/// One operation of the matrix: method, path, body, the roles that may, the status then.
type Case = (Method, String, Option<Value>, &'static [&'static str], u16);

fn bearer(s: &Server, token: &str) -> Client {
    s.bearer(token)
}

async fn submit(c: &Client) -> String {
    let r = c
        .call(
            Method::POST,
            "/requests",
            Some(&json!({"vm_name": "tiny", "commands": "echo hi", "timeout": 30})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["uuid"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn every_role_against_every_operation() {
    let s = api(true).await;
    let admin = bearer(&s, ENV_TOKEN);
    let tokens = [
        ("viewer", cli_token(&s, "v", "viewer", &[])),
        ("submitter", cli_token(&s, "sub", "submitter", &[])),
        ("operator", cli_token(&s, "op", "operator", &[])),
    ];
    let mut clients: Vec<(&str, Client)> =
        tokens.iter().map(|(r, t)| (*r, bearer(&s, t))).collect();
    clients.push(("admin", admin.clone()));
    const ANYONE: &[&str] = &["viewer", "submitter", "operator", "admin"];
    const SUBMITTERS: &[&str] = &["submitter", "operator", "admin"];
    const OPERATORS: &[&str] = &["operator", "admin"];
    const ADMINS: &[&str] = &["admin"];
    let (anyone, submitters, operators, admins) = (ANYONE, SUBMITTERS, OPERATORS, ADMINS);
    // A request of someone else's (admin's), for the reads.
    let theirs = submit(&admin).await;
    for (role, c) in &clients {
        // (method, path, body, who may, the status when allowed)
        let other = submit(&admin).await; // fresh each time: control changes it
        let other2 = submit(&admin).await;
        let cases: Vec<Case> = vec![
            (Method::GET, "/requests".into(), None, anyone, 200),
            (
                Method::GET,
                format!("/requests/{theirs}"),
                None,
                anyone,
                200,
            ),
            (
                Method::GET,
                format!("/requests/{theirs}/logs"),
                None,
                anyone,
                200,
            ),
            (
                Method::GET,
                format!("/requests/{theirs}/logs/raw"),
                None,
                anyone,
                200,
            ),
            (
                Method::GET,
                format!("/requests/{theirs}/artifacts"),
                None,
                anyone,
                200,
            ),
            (
                Method::GET,
                format!("/requests/{theirs}/artifacts.tar"),
                None,
                anyone,
                200,
            ),
            (
                Method::GET,
                format!("/requests/{theirs}/console"),
                None,
                anyone,
                426,
            ),
            (Method::GET, "/hosts".into(), None, anyone, 200),
            (Method::GET, "/vms".into(), None, anyone, 200),
            (Method::GET, "/vms/tiny".into(), None, anyone, 200),
            (Method::GET, "/metrics".into(), None, anyone, 200),
            (Method::GET, "/stats".into(), None, anyone, 200),
            (Method::GET, "/openapi.json".into(), None, anyone, 200),
            (
                Method::POST,
                "/requests".into(),
                Some(json!({"vm_name": "tiny", "commands": "echo", "timeout": 5})),
                submitters,
                201,
            ),
            (
                Method::PUT,
                format!("/requests/{other}/status"),
                Some(json!({"status": "hold"})),
                operators,
                200,
            ),
            (
                Method::DELETE,
                format!("/requests/{other2}"),
                None,
                operators,
                204,
            ),
            (
                Method::POST,
                "/prune".into(),
                Some(json!({"older_than_seconds": 86400, "dry_run": true})),
                operators,
                200,
            ),
            // The shipped configs are cold in tests: allowed means 409 not_warm / 404.
            (
                Method::POST,
                "/vms/tiny/template".into(),
                None,
                operators,
                409,
            ),
            (
                Method::DELETE,
                "/vms/tiny/template".into(),
                None,
                operators,
                404,
            ),
            (Method::GET, "/audit".into(), None, operators, 200),
            (Method::GET, "/tokens".into(), None, admins, 200),
            (
                Method::POST,
                "/tokens".into(),
                Some(json!({"name": format!("made-by-{role}"), "role": "viewer"})),
                admins,
                201,
            ),
            (Method::DELETE, "/tokens/nobody".into(), None, admins, 404),
        ];
        for (method, path, body, may, ok) in cases {
            let r = c.call(method.clone(), &path, body.as_ref()).await;
            let want = if may.contains(role) { ok } else { 403 };
            assert_eq!(r.status, want, "{role} {method} {path}: {}", r.text());
            if want == 403 {
                assert_eq!(r.json()["error"]["code"], "forbidden", "{}", r.text());
            }
            // Nobody gets in without a valid token.
            let anon = s.call(method.clone(), &path, body.as_ref()).await;
            assert_eq!(anon.status, 401, "anonymous {method} {path}");
            let wrong = bearer(&s, "sqs_not-a-token");
            assert_eq!(
                wrong
                    .call(method.clone(), &path, body.as_ref())
                    .await
                    .status,
                401,
                "wrong token {method} {path}"
            );
        }
    }
    assert_eq!(s.fetch("/health").await.status, 200);
    // The document says who may, and lists 403 where not everyone may.
    let doc = admin.fetch("/openapi.json").await.json();
    let prune = &doc["paths"]["/prune"]["post"];
    assert!(prune["responses"]["403"].is_object(), "{prune}");
    assert_eq!(prune["x-roles"], json!(["operator", "admin"]));
    assert!(doc["paths"]["/requests"]["get"]["responses"]["403"].is_null());
    assert!(doc["paths"]["/tokens"]["post"]["responses"]["401"].is_object());
}

#[tokio::test]
async fn submitters_control_only_their_own_requests() {
    let s = api(true).await;
    let a = bearer(&s, &cli_token(&s, "ci-a", "submitter", &[]));
    let b = bearer(&s, &cli_token(&s, "ci-b", "submitter", &[]));
    let mine = submit(&a).await;
    let theirs = submit(&b).await;
    assert_eq!(a.get(&mine).await["submitted_by"], "ci-a");
    let (st, body) = a.put_status(&theirs, "cancelled").await;
    assert_eq!(st, 403, "{body}");
    assert_eq!(b.get(&theirs).await["status"], "pending");
    assert_eq!(a.delete_request(&theirs).await.0, 403);
    let (st, body) = a.put_status(&mine, "cancelled").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(a.delete_request(&mine).await.0, 204);
    // An unknown request is a 404 to a submitter too, not a 403.
    let unknown = "123e4567-e89b-12d3-a456-426614174000";
    assert_eq!(a.put_status(unknown, "hold").await.0, 404);
    // Listing by submitter.
    submit(&a).await;
    let (st, list) = a.get_json("/requests?submitted_by=ci-b").await;
    assert_eq!(st, 200);
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["requests"][0]["uuid"], theirs.as_str());
    let (_, list) = a.get_json("/requests?submitted_by=ci-a").await;
    assert_eq!(list["total"], 1, "{list}");
}

#[tokio::test]
async fn expiry_and_revocation_take_effect_at_once() {
    let s = api(true).await;
    let admin = bearer(&s, ENV_TOKEN);
    let (st, made) = admin
        .post_json(
            "/tokens",
            &json!({"name": "brief", "role": "viewer", "expires_in_seconds": 2}),
        )
        .await;
    assert_eq!(st, 201, "{made}");
    let secret = made["token"].as_str().unwrap().to_string();
    assert!(made["expires_at"].is_string());
    let brief = bearer(&s, &secret);
    assert_eq!(brief.fetch("/requests").await.status, 200);
    // The secret is never shown again.
    let (_, list) = admin.get_json("/tokens").await;
    assert!(!list.to_string().contains(&secret), "{list}");
    assert!(!list.to_string().contains(&common_digest(&secret)));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(brief.fetch("/requests").await.status, 401);
    let (_, list) = admin.get_json("/tokens").await;
    let row = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "brief")
        .unwrap()
        .clone();
    assert_eq!(row["state"], "expired", "{row}");

    let (st, made) = admin
        .post_json("/tokens", &json!({"name": "ops", "role": "operator"}))
        .await;
    assert_eq!(st, 201);
    let ops = bearer(&s, made["token"].as_str().unwrap());
    assert_eq!(ops.fetch("/audit").await.status, 200);
    // Same name while active: refused.
    let (st, body) = admin
        .post_json("/tokens", &json!({"name": "ops", "role": "viewer"}))
        .await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (409, Some("name_taken"))
    );
    let (st, revoked) = admin.delete("/tokens/ops").await;
    assert_eq!(st, 200, "{revoked}");
    assert_eq!(revoked["state"], "revoked");
    assert_eq!(ops.fetch("/audit").await.status, 401);
    // Revoked on the CLI, too, at once.
    let cli = bearer(&s, &cli_token(&s, "cli-made", "viewer", &[]));
    assert_eq!(cli.fetch("/stats").await.status, 200);
    let out = s.run_command(&["token", "revoke", "cli-made"]);
    assert!(out.status.success());
    assert_eq!(cli.fetch("/stats").await.status, 401);
    // `token list` shows states, never secrets.
    let out = s.run_command(&["token", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cli-made") && text.contains("revoked"),
        "{text}"
    );
    assert!(!text.contains(&secret));
    // Reserved and invalid names.
    for name in ["admin", "a b", ""] {
        let (st, _) = admin
            .post_json("/tokens", &json!({"name": name, "role": "viewer"}))
            .await;
        assert_eq!(st, 422, "{name:?}");
    }
    assert!(!s.logs().contains(&secret), "a token appeared in the logs");
    assert!(!s.logs().contains(ENV_TOKEN));
}

fn common_digest(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn audit_records_allowed_and_refused_actions() {
    let s = api(true).await;
    let admin = bearer(&s, ENV_TOKEN);
    let viewer = bearer(&s, &cli_token(&s, "watcher", "viewer", &[]));
    let op = bearer(&s, &cli_token(&s, "oper", "operator", &[]));
    let id = submit(&admin).await;
    assert_eq!(viewer.put_status(&id, "hold").await.0, 403);
    assert_eq!(op.put_status(&id, "hold").await.0, 200);
    assert_eq!(op.put_status(&id, "pending").await.0, 200);
    assert_eq!(
        s.put_status(&id, "cancelled").await.0,
        401,
        "no token at all"
    );
    assert_eq!(op.put_status(&id, "cancelled").await.0, 200);
    let (_, _) = op
        .post_json("/prune", &json!({"older_than_seconds": 1, "dry_run": true}))
        .await;
    let (st, made) = admin
        .post_json("/tokens", &json!({"name": "later", "role": "viewer"}))
        .await;
    assert_eq!(st, 201);
    let secret = made["token"].as_str().unwrap().to_string();
    assert_eq!(admin.delete("/tokens/later").await.0, 200);

    assert_eq!(viewer.fetch("/audit").await.status, 403);
    let (st, page) = op.get_json(&format!("/audit?request={id}")).await;
    assert_eq!(st, 200, "{page}");
    let entries = page["entries"].as_array().unwrap();
    let seen: Vec<(String, String, String, u64)> = entries
        .iter()
        .rev()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["principal"].as_str().unwrap_or("-").to_string(),
                e["outcome"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, String, String, u64)> = [
        ("hold", "watcher", "refused", 403),
        ("hold", "oper", "allowed", 200),
        ("resume", "oper", "allowed", 200),
        ("cancel", "-", "refused", 401),
        ("cancel", "oper", "allowed", 200),
    ]
    .iter()
    .map(|(a, p, o, s)| (a.to_string(), p.to_string(), o.to_string(), *s))
    .collect();
    assert_eq!(seen, want);
    assert!(entries.iter().all(|e| e["address"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:"))));
    assert!(entries.iter().all(|e| e["at"].is_string()));
    // In the request's system log as well.
    let system = admin.output(&id, "system").await;
    assert!(
        system.contains("audit: hold by watcher (viewer)"),
        "{system}"
    );
    assert!(system.contains("refused (403)"), "{system}");
    assert!(
        system.contains("audit: cancel by oper (operator)"),
        "{system}"
    );
    // Filters and paging.
    let (_, page) = op.get_json("/audit?action=token_create").await;
    assert_eq!(page["entries"][0]["target"], "later", "{page}");
    assert_eq!(page["entries"][0]["principal"], "admin");
    let (_, page) = op.get_json("/audit?principal=oper&limit=2").await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 2);
    let before = page["next_before"].as_i64().unwrap();
    let (_, next) = op
        .get_json(&format!("/audit?principal=oper&limit=2&before={before}"))
        .await;
    assert!(next["entries"][0]["id"].as_i64().unwrap() < before);
    let (_, page) = op.get_json("/audit?action=prune").await;
    assert_eq!(page["entries"][0]["outcome"], "allowed");
    let (_, page) = op.get_json("/audit?since=2999-01-01T00:00:00Z").await;
    assert_eq!(page["entries"], json!([]));
    assert_eq!(op.fetch("/audit?bogus=1").await.status, 422);
    let (_, all) = admin.get_json("/audit?limit=1000").await;
    assert!(!all.to_string().contains(&secret));
    assert!(!s.logs().contains(&secret));
}

#[tokio::test]
async fn cli_tokens_work_with_no_api_running_and_auth_off_is_as_before() {
    let mut s = api(false).await;
    // Auth off: anyone may do anything; nobody is recorded as the submitter.
    let id = submit(&s).await;
    assert!(s.get(&id).await["submitted_by"].is_null());
    assert_eq!(s.fetch("/tokens").await.status, 200);
    // The API cannot turn authentication on: the first token is the store owner's to make.
    let (st, body) = s
        .post_json("/tokens", &json!({"name": "sneaky", "role": "admin"}))
        .await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert_eq!(s.fetch("/requests").await.status, 200, "auth is still off");
    let status = s.run_command(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("auth: off"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let config = s.run_command(&["config"]);
    assert!(String::from_utf8_lossy(&config.stdout).contains("auth: off"));
    // The API stops; the first admin token is made on the store.
    s.stop();
    let token = cli_token(&s, "root-ops", "admin", &["--expires", "90d"]);
    let status = s.run_command(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        text.contains("auth: on") && text.contains("1 admin"),
        "{text}"
    );
    s.restart_hard(Mode::Api).await;
    assert_eq!(s.fetch("/requests").await.status, 401);
    let admin = bearer(&s, &token);
    assert_eq!(admin.fetch("/requests").await.status, 200);
    let (_, list) = admin.get_json("/tokens").await;
    assert_eq!(list["tokens"][0]["name"], "root-ops");
    assert!(list["tokens"][0]["expires_at"].is_string());
    let id = submit(&admin).await;
    assert_eq!(admin.get(&id).await["submitted_by"], "root-ops");
    // The document now says bearer auth.
    let doc = admin.fetch("/openapi.json").await.json();
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(!s.logs().contains(&token));
}

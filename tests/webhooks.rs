//! Webhooks against a real server (on PostgreSQL too when `SQLITE_SIM_TEST_DATABASE_URL` is
//! set) and a local receiver (`common::receiver`): the final state POSTed and signed (checked
//! here with an HMAC of our own), one delivery id across retries, a receiver that answers 500
//! or is down and comes back, a pending delivery sent after a hard restart, redirects not
//! followed, disallowed hosts refused with 422 and nothing stored, and one real run on the
//! tiny guest. Most cases cancel a pending request on an `api` server (no agents), which is
//! final at once without a VM.

mod common;

use common::http::FormPart;
use common::receiver::{Hit, Receiver};
use common::{Mode, Options, Server};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::time::Duration;

const SECRET: &str = "webhook-test-secret";
const LIMIT: Duration = Duration::from_secs(30);

async fn server(mode: Mode, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        (
            "SQLITE_SIM_WEBHOOK_ALLOW".to_string(),
            "127.0.0.1".to_string(),
        ),
        ("SQLITE_SIM_WEBHOOK_SECRET".into(), SECRET.into()),
        ("SQLITE_SIM_WEBHOOK_TIMEOUT".into(), "5".into()),
        ("SQLITE_SIM_WEBHOOK_RETRY_FOR".into(), "120".into()),
    ];
    for (k, v) in extra {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.to_string()));
    }
    Server::start(Options {
        mode,
        env,
        ..Default::default()
    })
    .await
}

/// A port nothing listens on (bound once by us, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Submits a request with `callback_url` on an `api` server and cancels it while pending:
/// final at once, no VM. Returns its id.
async fn cancelled_with_callback(s: &Server, url: &str) -> String {
    let (status, body) = s
        .submit_json(&json!({"vm_name": "tiny", "commands": "true", "callback_url": url}))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["uuid"].as_str().unwrap().to_string();
    let (status, body) = s.put_status(&id, "cancelled").await;
    assert!((200..300).contains(&status), "{status} {body}");
    id
}

/// Waits until the request's deliveries satisfy `pred`; returns them.
async fn wait_webhooks(s: &Server, id: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let r = s
        .wait_for(id, LIMIT, |r| {
            r["webhooks"].as_array().is_some_and(|w| pred(w))
        })
        .await;
    r["webhooks"].as_array().unwrap().clone()
}

/// The signature computed here, independently of the server's code.
fn expected_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

fn assert_signed(hit: &Hit) {
    assert_eq!(
        hit.header("x-sqlite-sim-signature"),
        Some(expected_signature(&hit.body).as_str()),
        "signature of {:?}",
        String::from_utf8_lossy(&hit.body)
    );
    assert_eq!(hit.header("x-sqlite-sim-event"), Some("finished"));
    assert_eq!(hit.header("content-type"), Some("application/json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_state_is_posted_signed_and_retried_with_one_delivery_id() {
    let rx = Receiver::start().await;
    let all = rx.url("/all");
    let s = server(Mode::Api, &[("SQLITE_SIM_WEBHOOK_URL", all.as_str())]).await;
    // Two failures first: the third attempt is delivered.
    rx.answer("/hook", &[500, 503]);
    let id = cancelled_with_callback(&s, &rx.url("/hook")).await;
    let hits = rx.wait_hits("/hook", 3, LIMIT).await;
    assert_eq!(
        hits.iter().map(|h| h.answered).collect::<Vec<_>>(),
        [500, 503, 200]
    );
    let delivery = hits[0].header("x-sqlite-sim-delivery").unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&delivery).is_ok(), "{delivery}");
    for h in &hits {
        assert_signed(h);
        assert_eq!(h.header("x-sqlite-sim-delivery"), Some(delivery.as_str()));
        let body = h.json();
        assert_eq!(body["uuid"], id.as_str());
        assert_eq!(body["status"], "cancelled");
        assert_eq!(body["callback_url"], rx.url("/hook").as_str());
        assert!(body.get("webhooks").is_none(), "{body}");
    }
    // SQLITE_SIM_WEBHOOK_URL gets every request's events too, with a delivery of its own.
    let global = rx.wait_hits("/all", 1, LIMIT).await;
    assert_signed(&global[0]);
    assert_ne!(
        global[0].header("x-sqlite-sim-delivery"),
        Some(delivery.as_str())
    );
    let w = wait_webhooks(&s, &id, |w| {
        w.len() == 2 && w.iter().all(|d| d["state"] == "delivered")
    })
    .await;
    let hook = w
        .iter()
        .find(|d| d["url"] == rx.url("/hook").as_str())
        .unwrap();
    assert_eq!(hook["id"], delivery.as_str());
    assert_eq!(hook["event"], "finished");
    assert_eq!(hook["attempts"], 3);
    assert_eq!(hook["last_status"], 200);
    assert!(hook["delivered_at"].is_string() && hook["next_attempt_at"].is_null());
    // Lists stay cheap: no deliveries in them.
    let (_, list) = s.get_json("/requests").await;
    assert!(list["requests"][0].get("webhooks").is_none(), "{list}");
    assert_eq!(
        list["requests"][0]["callback_url"],
        rx.url("/hook").as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_down_gets_the_delivery_once_it_is_up() {
    let port = free_port();
    let s = server(Mode::Api, &[]).await;
    let id = cancelled_with_callback(&s, &format!("http://127.0.0.1:{port}/late")).await;
    let w = wait_webhooks(&s, &id, |w| w[0]["attempts"].as_i64() >= Some(2)).await;
    assert_eq!(w[0]["state"], "pending", "{w:?}");
    assert!(w[0]["last_status"].is_null());
    assert!(
        w[0]["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{w:?}"
    );
    assert!(w[0]["next_attempt_at"].is_string());
    let rx = Receiver::start_on(port).await;
    let hits = rx.wait_hits("/late", 1, LIMIT).await;
    assert_signed(&hits[0]);
    assert_eq!(hits[0].header("x-sqlite-sim-delivery"), w[0]["id"].as_str());
    let w = wait_webhooks(&s, &id, |w| w[0]["state"] == "delivered").await;
    assert!(w[0]["attempts"].as_i64().unwrap() > 2, "{w:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_delivery_is_sent_after_a_hard_restart() {
    let port = free_port();
    let mut s = server(Mode::Api, &[]).await;
    let id = cancelled_with_callback(&s, &format!("http://127.0.0.1:{port}/after")).await;
    wait_webhooks(&s, &id, |w| w[0]["attempts"].as_i64() >= Some(1)).await;
    s.restart_hard(Mode::Api).await;
    let rx = Receiver::start_on(port).await;
    let hits = rx.wait_hits("/after", 1, LIMIT).await;
    assert_signed(&hits[0]);
    assert_eq!(hits[0].json()["uuid"], id.as_str());
    let w = wait_webhooks(&s, &id, |w| w[0]["state"] == "delivered").await;
    assert!(w[0]["attempts"].as_i64().unwrap() >= 2, "{w:?}");
}

/// Two API processes on one store: each delivery is claimed by one of them, so every one
/// arrives once (its first attempt succeeds), whichever process sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_api_processes_send_each_delivery_once() {
    let rx = Receiver::start().await;
    let s = server(Mode::Api, &[]).await;
    let _second = s.spawn_process(Mode::Api);
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(cancelled_with_callback(&s, &rx.url("/many")).await);
    }
    rx.wait_hits("/many", ids.len(), LIMIT).await;
    // A duplicate would come within a wake-up of the first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx.hits("/many").len(),
        ids.len(),
        "a delivery was sent twice"
    );
    let mut delivered: Vec<String> = rx
        .hits("/many")
        .iter()
        .map(|h| h.json()["uuid"].as_str().unwrap().to_string())
        .collect();
    delivered.sort();
    ids.sort();
    assert_eq!(delivered, ids);
    for id in &ids {
        let w = wait_webhooks(&s, id, |w| w[0]["state"] == "delivered").await;
        assert_eq!(w[0]["attempts"], 1, "{w:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_and_retries_end() {
    let rx = Receiver::start().await;
    rx.redirect("/moved", &rx.url("/target"));
    // Retried for 2 s: attempts at 0, 1 and 2 s, then it gives up.
    let s = server(Mode::Api, &[("SQLITE_SIM_WEBHOOK_RETRY_FOR", "2")]).await;
    let id = cancelled_with_callback(&s, &rx.url("/moved")).await;
    let w = wait_webhooks(&s, &id, |w| w[0]["state"] == "gave_up").await;
    assert_eq!(w[0]["last_status"], 302, "{w:?}");
    assert!(w[0]["attempts"].as_i64().unwrap() >= 2, "{w:?}");
    assert!(
        w[0]["last_error"].as_str().unwrap().contains("redirect"),
        "{w:?}"
    );
    assert!(!rx.hits("/moved").is_empty());
    assert!(rx.hits("/target").is_empty(), "the redirect was followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_callbacks_are_refused_with_422_and_store_nothing() {
    let s = server(Mode::Api, &[]).await;
    for (url, needle) in [
        ("http://10.1.2.3:8080/hook", "10.1.2.3:8080"),
        ("http://localhost:9/hook", "localhost:9"),
        ("ftp://127.0.0.1/hook", "must be http"),
        ("https://127.0.0.1/hook", "no TLS"),
        ("http://user:pw@127.0.0.1/hook", "credentials"),
        ("not a url", "callback_url"),
    ] {
        let (status, body) = s
            .submit_json(&json!({"vm_name": "tiny", "commands": "true", "callback_url": url}))
            .await;
        assert_eq!(status, 422, "{url}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{url}: {msg}");
        if needle.contains(':') {
            assert!(msg.contains("SQLITE_SIM_WEBHOOK_ALLOW"), "{msg}");
        }
    }
    // The same check for a multipart submission, whose files are not kept either.
    let request = json!({"vm_name": "tiny", "commands": "true",
                         "callback_url": "http://192.168.0.1/hook"});
    let r = s
        .submit_multipart(&[
            FormPart::request(&request),
            FormPart::file("/root/x.bin", vec![7u8; 4096]),
        ])
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(s.query_i64("SELECT COUNT(*) FROM requests"), 0);
    assert_eq!(s.query_i64("SELECT COUNT(*) FROM uploads"), 0);
    // A server that allows no host refuses every callback, naming the variable.
    let closed = Server::start(Options::with_mode(Mode::Api)).await;
    let (status, body) = closed
        .submit_json(&json!({"vm_name": "tiny", "commands": "true",
                             "callback_url": "http://127.0.0.1:9/hook"}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("SQLITE_SIM_WEBHOOK_ALLOW"));
    assert_eq!(closed.query_i64("SELECT COUNT(*) FROM requests"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_settings_that_do_not_fit_together_stop_the_server() {
    let s = Server::start(Options::with_mode(Mode::Api)).await;
    for (env, var) in [
        (
            vec![("SQLITE_SIM_WEBHOOK_ALLOW", "127.0.0.1")],
            "SQLITE_SIM_WEBHOOK_SECRET",
        ),
        (
            vec![
                ("SQLITE_SIM_WEBHOOK_ALLOW", "127.0.0.1"),
                ("SQLITE_SIM_WEBHOOK_SECRET", "s"),
                ("SQLITE_SIM_WEBHOOK_URL", "http://10.0.0.1/all"),
            ],
            "SQLITE_SIM_WEBHOOK_URL",
        ),
    ] {
        let mut cmd = s.cli(&["config"]);
        cmd.envs(env);
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_run_posts_its_final_state() {
    common::require_image();
    let _slot = common::vm_slot();
    let rx = Receiver::start().await;
    let s = server(Mode::All, &[]).await;
    let out = s
        .cli(&[
            "submit",
            "--vm",
            "tiny",
            "-c",
            "echo webhook; exit 3",
            "--wait",
            "--callback-url",
            &rx.url("/run"),
        ])
        .output()
        .unwrap();
    let hits = rx.wait_hits("/run", 1, Duration::from_secs(120)).await;
    assert_signed(&hits[0]);
    let body = hits[0].json();
    assert_eq!(
        (body["status"].as_str(), body["exit_code"].as_i64()),
        (Some("done"), Some(3)),
        "{body}"
    );
    let id = body["uuid"].as_str().unwrap().to_string();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = wait_webhooks(&s, &id, |w| w.len() == 1 && w[0]["state"] == "delivered").await;
    assert_eq!(w[0]["attempts"], 1);
}

//! Priorities, fairness and queue positions, against real processes (on PostgreSQL too when
//! `SQLITE_SIM_TEST_DATABASE_URL` is set): who may ask for which priority (403 above a
//! submitter's allowance, 422 outside the range, nothing stored either way), the positions
//! pending requests show while no agent runs, and the order in which one agents process with
//! one VM slot then claims them.

mod common;

use common::http::FormPart;
use common::{env_pairs, Mode, Options, Server};
use serde_json::{json, Value};
use std::time::Duration;

async fn api(env: &[(&str, &str)]) -> Server {
    Server::start(Options {
        mode: Mode::Api,
        env: env_pairs(env),
        ..Default::default()
    })
    .await
}

fn body(priority: Value) -> Value {
    json!({"vm_name": "tiny", "commands": "true", "timeout": 300, "priority": priority})
}

/// Waits until the store's tokens have turned authentication on.
async fn auth_on(s: &Server) {
    for _ in 0..100 {
        if s.fetch("/requests").await.status == 401 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("authentication did not turn on");
}

async fn total(c: &common::http::Client) -> u64 {
    let (st, v) = c.get_json("/requests").await;
    assert_eq!(st, 200, "{v}");
    v["total"].as_u64().unwrap()
}

#[tokio::test]
async fn priority_allowance_and_range() {
    let s = api(&[("SQLITE_SIM_MAX_SUBMITTER_PRIORITY", "5")]).await;
    // Authentication off: every caller acts as admin, so the whole range is open.
    let (st, v) = s.submit_json(&body(json!(100))).await;
    assert_eq!(st, 201, "{v}");
    let anon = v["uuid"].as_str().unwrap().to_string();
    assert_eq!(s.get(&anon).await["priority"], 100);
    let sub = s.bearer(&s.make_token("ci-a", "submitter", &[]));
    let op = s.bearer(&s.make_token("ops", "operator", &[]));
    auth_on(&s).await;
    let before = total(&op).await;
    for (who, p) in [(&sub, 6), (&sub, 100)] {
        let (st, v) = who.submit_json(&body(json!(p))).await;
        assert_eq!(st, 403, "{v}");
        assert_eq!(v["error"]["code"], "forbidden");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("at most 5") && msg.contains(&format!("priority {p}")),
            "{msg}"
        );
    }
    // Multipart submissions are held to the same allowance, their staged file dropped.
    let r = sub
        .submit_multipart(&[
            FormPart::request(&body(json!(6))),
            FormPart::file("/root/f", b"x".to_vec()),
        ])
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    for bad in [
        json!(101),
        json!(-101),
        json!(1.5),
        json!("high"),
        json!(4294967296_i64),
    ] {
        for who in [&sub, &op] {
            let (st, v) = who.submit_json(&body(bad.clone())).await;
            assert_eq!(st, 422, "{bad}: {v}");
            assert_eq!(v["error"]["code"], "validation_error", "{bad}: {v}");
        }
    }
    let r = op
        .submit_multipart(&[FormPart::request(&body(json!(101)))])
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(
        total(&op).await,
        before,
        "a refused submission stores nothing"
    );
    for (who, p) in [(&sub, 5), (&sub, -100), (&op, 100), (&op, -100)] {
        let (st, v) = who.submit_json(&body(json!(p))).await;
        assert_eq!(st, 201, "{p}: {v}");
        assert_eq!(op.get(v["uuid"].as_str().unwrap()).await["priority"], p);
    }
    let (st, v) = sub
        .submit_json(&json!({"vm_name": "tiny", "commands": "true"}))
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        op.get(v["uuid"].as_str().unwrap()).await["priority"],
        0,
        "the default"
    );
    let r = sub
        .submit_multipart(&[FormPart::request(&body(json!(-3)))])
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    // The document says so: priority's bounds, and 403 on POST /requests.
    let (_, doc) = op.get_json("/openapi.json").await;
    let p = &doc["components"]["schemas"]["CreateBody"]["properties"]["priority"];
    assert_eq!(
        (p["minimum"].as_i64(), p["maximum"].as_i64()),
        (Some(-100), Some(100))
    );
    let forbidden = &doc["paths"]["/requests"]["post"]["responses"]["403"]["description"];
    assert!(
        forbidden.as_str().unwrap().contains("priority"),
        "{forbidden}"
    );
    let listed = &doc["components"]["schemas"]["Request"]["properties"];
    assert!(listed.get("queue_position").is_some() && listed.get("priority").is_some());
}

/// Pending request ids, in the order of their `queue_position`, as the list shows them; each
/// position also as `GET /requests/{id}` shows it.
async fn queue(c: &common::http::Client) -> Vec<String> {
    let (st, v) = c.get_json("/requests?status=pending&limit=100").await;
    assert_eq!(st, 200, "{v}");
    let mut rows: Vec<(u64, String)> = v["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let pos = r["queue_position"]
                .as_u64()
                .expect("a pending request has a position");
            (pos, r["uuid"].as_str().unwrap().to_string())
        })
        .collect();
    rows.sort();
    for (i, (pos, id)) in rows.iter().enumerate() {
        assert_eq!(*pos, i as u64 + 1, "positions count 1, 2, 3…: {v}");
        assert_eq!(c.get(id).await["queue_position"], *pos);
    }
    rows.into_iter().map(|(_, id)| id).collect()
}

#[tokio::test]
async fn claims_follow_priority_then_round_robin_between_submitters() {
    let _slot = common::guest_slot();
    let s = api(&[]).await;
    let a = s.bearer(&s.make_token("pipeline-a", "submitter", &[]));
    let b = s.bearer(&s.make_token("pipeline-b", "submitter", &[]));
    let op = s.bearer(&s.make_token("ops", "operator", &[]));
    auth_on(&s).await;
    let submit = |c: common::http::Client, p: i64| async move {
        let (st, v) = c.submit_json(&body(json!(p))).await;
        assert_eq!(st, 201, "{v}");
        v["uuid"].as_str().unwrap().to_string()
    };
    // Submitted with no agents running: pipeline A floods, B and an operator come later.
    let a1 = submit(a.clone(), 0).await;
    let a2 = submit(a.clone(), 0).await;
    let a3 = submit(a.clone(), 0).await;
    let low = submit(a.clone(), -1).await;
    let b1 = submit(b.clone(), 0).await;
    let urgent = submit(op.clone(), 10).await;
    let held = submit(b.clone(), 0).await;
    let (st, v) = b.put_status(&held, "hold").await;
    assert!(st == 200 || st == 202, "{v}");
    let order = [&urgent, &a1, &b1, &a2, &a3, &low];
    assert_eq!(
        queue(&op).await,
        order.map(String::clone),
        "held ones are not queued"
    );
    assert!(op.get(&held).await["queue_position"].is_null());
    // One agents process, one VM at a time: the claims follow the queue.
    let _agents = s.spawn_process_with(
        Mode::Agents,
        &[("SQLITE_SIM_MAX_CONCURRENT_VMS", "1".into())],
    );
    let limit = Duration::from_secs(300);
    let mut started = Vec::new();
    for id in &order[..4] {
        // The order is the point, not the runs' outcomes (a TCG guest on a loaded machine may
        // fail to boot): each one ran, and when it started says when it was claimed.
        let r = s.wait_terminal_as(&op, id, limit).await;
        let at = r["started_at"]
            .as_str()
            .unwrap_or_else(|| panic!("never ran: {r}"));
        started.push((at.to_string(), (*id).clone()));
    }
    started.sort();
    let claimed: Vec<String> = started.into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        claimed,
        order[..4].iter().map(|s| (*s).clone()).collect::<Vec<_>>()
    );
    // The rest are cancelled, not run: four VMs are enough for one test. The lowest first, so
    // that it cannot be claimed once a3 (next in line, perhaps running by now) is cancelled.
    for id in [&low, &held, &a3] {
        let (st, v) = op.put_status(id, "cancelled").await;
        assert!(st == 200 || st == 202 || st == 409, "{v}");
    }
    for id in [&a3, &low, &held] {
        s.wait_terminal_as(&op, id, limit).await;
    }
    let low_now = op.get(&low).await;
    assert!(
        low_now["started_at"].is_null(),
        "the lowest priority was not claimed before a3: {low_now}"
    );
}

//! Automatic retries of infrastructure failures, against the real tiny guest: QEMU killed while
//! the guest boots is re-queued and ends `done` on attempt 2 with both attempts' logs intact and
//! told apart; the commands' own failure is never retried; `retries: 0` keeps the failure.
//! Bad `retries` values are refused. Runs on SQLite, and on PostgreSQL in `scripts/test.sh`.

mod common;

use common::sse::follow;
use common::{require_image, signal_and_wait, vm_slot, Mode, Options, Server};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);

async fn submit(s: &Server, commands: &str, retries: Option<u32>) -> String {
    let mut body = json!({"vm_name": "tiny", "commands": commands, "timeout": 120});
    if let Some(n) = retries {
        body["retries"] = n.into();
    }
    let (code, r) = s.submit_json(&body).await;
    assert_eq!(code, 201, "{r}");
    r["uuid"].as_str().unwrap().to_string()
}

/// `GET /requests/{id}/logs` with `query`.
async fn entries(s: &Server, id: &str, query: &str) -> Vec<Value> {
    let (code, v) = s.get_json(&format!("/requests/{id}/logs{query}")).await;
    assert_eq!(code, 200, "{v}");
    v.as_array().unwrap().clone()
}

fn text_of(entries: &[Value], log_type: &str) -> String {
    entries
        .iter()
        .filter(|e| e["log_type"] == log_type)
        .map(|e| e["output"].as_str().unwrap())
        .collect()
}

/// Kills the request's QEMU with SIGKILL once it runs and the guest printed its first boot
/// bytes (so attempt 1 has some), well before the prompt the commands need.
async fn kill_qemu_during_boot(s: &Server, id: &str) {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < LIMIT, "the guest never started booting");
        let pids = s.qemu_processes();
        if pids.len() == 1 && s.get(id).await["status"] == "running" {
            let boot = entries(s, id, "?attempt=1&log_type=boot").await;
            if !boot.is_empty() {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), Signal::SIGKILL)
                    .unwrap();
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for `id` to end and checks it ended `done` with `exit_code` on attempt `attempt`.
async fn done_on(s: &Server, id: &str, exit_code: i64, attempt: i64) -> Value {
    let r = s.wait_terminal(id, LIMIT).await;
    assert_eq!(
        (
            r["status"].as_str(),
            r["exit_code"].as_i64(),
            r["attempt"].as_i64()
        ),
        (Some("done"), Some(exit_code), Some(attempt)),
        "{r}"
    );
    r
}

#[tokio::test]
async fn qemu_killed_during_boot_is_retried_and_ends_done_on_attempt_2() {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(Options::default()).await;
    let id = submit(&s, "echo hello-from-$((6*7))", Some(1)).await;
    let created = s.get(&id).await;
    assert_eq!(
        (created["retries"].as_i64(), created["attempt"].as_i64()),
        (Some(1), Some(1))
    );
    // A follower from the start sees both attempts and ends only with the request.
    let follower = {
        let client = s.api();
        let path = format!("/requests/{id}/logs/stream");
        tokio::spawn(async move { follow(&client, &path, None, |e| e.event == "end").await })
    };
    kill_qemu_during_boot(&s, &id).await;
    let r = done_on(&s, &id, 0, 2).await;
    assert_eq!(r["error"], Value::Null);
    let earlier = r["attempts"].as_array().unwrap();
    assert_eq!(earlier.len(), 1, "{r}");
    assert_eq!(earlier[0]["attempt"], 1);
    let why = earlier[0]["error"].as_str().unwrap();
    assert!(
        why.contains("QEMU exited unexpectedly (killed by SIGKILL)"),
        "{why}"
    );
    assert!(earlier[0]["host"].is_string() && earlier[0]["finished_at"].is_string());

    // Attempt 1: its boot bytes and the failure, no command output.
    let first = entries(&s, &id, "?attempt=1").await;
    assert!(first.iter().all(|e| e["attempt"] == 1));
    assert!(
        !text_of(&first, "boot").is_empty(),
        "attempt 1's boot bytes kept"
    );
    let system = text_of(&first, "system");
    assert!(
        system.contains("failed: QEMU exited unexpectedly"),
        "{system}"
    );
    assert!(
        system.contains("attempt 1 failed (QEMU exited unexpectedly (killed by SIGKILL)")
            && system.contains("re-queued as attempt 2 of 2"),
        "{system}"
    );
    assert_eq!(
        text_of(&first, "stdout"),
        "",
        "attempt 1 never reached the commands"
    );
    // Attempt 2: a full run of its own.
    let second = entries(&s, &id, "?attempt=2").await;
    assert!(second.iter().all(|e| e["attempt"] == 2));
    assert!(!text_of(&second, "boot").is_empty());
    assert_eq!(text_of(&second, "stdout"), "hello-from-42\n");
    let system = text_of(&second, "system");
    assert!(system.contains("(attempt 2 of 2)"), "{system}");
    assert!(system.contains("commands exited with status 0"), "{system}");
    // Together they are the whole log, attempt 1 entirely before attempt 2, ids increasing.
    let all = entries(&s, &id, "").await;
    assert_eq!(all.len(), first.len() + second.len());
    let ids: Vec<i64> = all.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let last_of_first = first.last().unwrap()["id"].as_i64().unwrap();
    assert!(second
        .iter()
        .all(|e| e["id"].as_i64().unwrap() > last_of_first));
    assert_eq!(s.raw(&id, Some("stdout")).await, b"hello-from-42\n");

    // The follower did not stop at attempt 1's end: it got everything, then `end`.
    let events = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .expect("the follower ends with the request")
        .unwrap();
    let streamed: Vec<i64> = events
        .iter()
        .filter(|e| e.event == "log")
        .map(|e| e.id.unwrap())
        .collect();
    assert_eq!(streamed, ids, "the stream carried both attempts");
    let end = events.last().unwrap();
    assert_eq!(
        (end.event.as_str(), &end.data["attempt"]),
        ("end", &json!(2))
    );
    s.no_qemu_left().await;
}

#[tokio::test]
async fn a_run_lost_with_its_agents_process_is_requeued_by_lease_recovery_and_finishes() {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(Options {
        mode: Mode::Api,
        env: vec![("SQLITE_SIM_AGENT_LEASE".into(), "3".into())],
        ..Default::default()
    })
    .await;
    // Only host "a" may run it, so the re-queued attempt waits for that host to come back
    // while host "b", on the same run directory, recovers the lease and cleans up leftovers.
    let host = |id: &str, labels: &str| {
        [
            ("SQLITE_SIM_HOST_ID", id.to_string()),
            ("SQLITE_SIM_AGENT_LABELS", labels.to_string()),
        ]
    };
    let mut agents = s.spawn_process_with(Mode::Agents, &host("a", "lost-host"));
    let (code, r) = s
        .submit_json(&json!({
            "vm_name": "tiny", "commands": "echo started; sleep 6; echo finished",
            "timeout": 120, "retries": 1, "requires": ["lost-host"],
        }))
        .await;
    assert_eq!(code, 201, "{r}");
    let id = r["uuid"].as_str().unwrap().to_string();
    s.wait_output(&id, "stdout", "started").await;
    // The host goes away mid-command: its QEMU dies with it (PR_SET_PDEATHSIG).
    signal_and_wait(&mut agents, Signal::SIGKILL);
    s.no_qemu_left().await;
    let _b = s.spawn_process_with(Mode::Agents, &host("b", ""));
    let start = Instant::now();
    loop {
        let r = s.get(&id).await;
        if r["status"] == "pending" && r["attempt"] == 2 {
            break;
        }
        assert!(start.elapsed() < LIMIT, "never re-queued: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A re-queued request may be claimed again at any moment: its old directory is the next
    // attempt's to clear, never the reaper's (it once deleted a new attempt's disk).
    tokio::time::sleep(Duration::from_secs(4)).await; // over two reaper passes
    assert!(
        s.run_dir.join(&id).exists(),
        "a pending request's run directory was removed by another host's reaper"
    );
    let _a = s.spawn_process_with(Mode::Agents, &host("a", "lost-host"));
    let r = done_on(&s, &id, 0, 2).await;
    assert_eq!(r["attempts"][0]["error"], "agent lost", "{r}");
    let first = entries(&s, &id, "?attempt=1").await;
    assert_eq!(
        text_of(&first, "stdout"),
        "started\n",
        "attempt 1's output up to the loss"
    );
    let system = text_of(&first, "system");
    assert!(
        system.contains(
            "lost (lease expired); attempt 1 failed (agent lost); re-queued as attempt 2 of 2"
        ),
        "{system}"
    );
    let second = entries(&s, &id, "?attempt=2").await;
    assert_eq!(text_of(&second, "stdout"), "started\nfinished\n");
    s.no_qemu_left().await;
}

#[tokio::test]
async fn the_commands_own_failure_is_never_retried() {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(Options::default()).await;
    let id = submit(&s, "echo once; exit 3", Some(2)).await;
    let r = done_on(&s, &id, 3, 1).await;
    assert_eq!(r["attempts"], json!([]));
    let all = entries(&s, &id, "").await;
    assert!(all.iter().all(|e| e["attempt"] == 1));
    assert_eq!(text_of(&all, "stdout"), "once\n");
    assert!(!text_of(&all, "system").contains("re-queued"));
    assert!(entries(&s, &id, "?attempt=2").await.is_empty());
    s.no_qemu_left().await;
}

#[tokio::test]
async fn without_retries_the_same_kill_fails_at_attempt_1() {
    require_image();
    let _slot = vm_slot();
    // The server's default of 1 retry, overridden by the submission's 0.
    let s = Server::start(Options {
        env: vec![("SQLITE_SIM_DEFAULT_RETRIES".into(), "1".into())],
        ..Default::default()
    })
    .await;
    let id = submit(&s, "echo never", Some(0)).await;
    kill_qemu_during_boot(&s, &id).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (r["status"].as_str(), r["attempt"].as_i64()),
        (Some("failed"), Some(1)),
        "{r}"
    );
    assert!(
        r["error"].as_str().unwrap().contains("killed by SIGKILL"),
        "{r}"
    );
    assert_eq!(r["attempts"], json!([]));
    assert!(!text_of(&entries(&s, &id, "").await, "system").contains("re-queued"));
    s.no_qemu_left().await;
}

#[tokio::test]
async fn bad_retries_are_refused_and_nothing_is_stored() {
    let s = Server::start(Options {
        mode: common::Mode::Api,
        env: vec![("SQLITE_SIM_DEFAULT_RETRIES".into(), "3".into())],
        ..Default::default()
    })
    .await;
    for bad in [json!(-1), json!(11), json!(1.5), json!("2"), json!(1e30)] {
        let (code, r) = s
            .submit_json(&json!({"vm_name": "tiny", "commands": "true", "retries": bad}))
            .await;
        assert_eq!(code, 422, "{bad}: {r}");
        assert!(r.to_string().contains("retries"), "{bad}: {r}");
    }
    let (_, page) = s.get_json("/requests").await;
    assert_eq!(page["total"], 0, "nothing stored");
    // The default applies when absent or null; the bounds are in the document.
    let mut last = String::new();
    for (body, want) in [
        (json!({"vm_name": "tiny", "commands": "true"}), 3),
        (
            json!({"vm_name": "tiny", "commands": "true", "retries": null}),
            3,
        ),
        (
            json!({"vm_name": "tiny", "commands": "true", "retries": 10}),
            10,
        ),
        (
            json!({"vm_name": "tiny", "commands": "true", "retries": 0}),
            0,
        ),
    ] {
        let (code, r) = s.submit_json(&body).await;
        assert_eq!(code, 201, "{r}");
        last = r["uuid"].as_str().unwrap().to_string();
        let got = s.get(&last).await;
        assert_eq!(
            (got["retries"].as_i64(), got["attempt"].as_i64()),
            (Some(want), Some(1))
        );
    }
    let (code, v) = s
        .get_json(&format!("/requests/{last}/logs?attempt=0"))
        .await;
    assert_eq!(code, 422, "{v}");
    let (code, v) = s
        .get_json(&format!("/requests/{last}/logs?attempt=1"))
        .await;
    assert_eq!((code, v), (200, json!([])));
    let (_, doc) = s.get_json("/openapi.json").await;
    let retries = &doc["components"]["schemas"]["CreateBody"]["properties"]["retries"];
    assert_eq!(
        (retries["minimum"].as_i64(), retries["maximum"].as_i64()),
        (Some(0), Some(10))
    );
}

//! Many hosts on one store, simulated with separate processes: an `api` process and `agents`
//! processes with their own `SQLITE_SIM_HOST_ID`, run directory and labels, sharing the
//! database. Routing by label, the registry (`GET /hosts`, `cli hosts`), refusals and waits,
//! wake-ups across processes, and fencing of an agent that lost its lease.

mod common;

use common::{
    eventually, qemu_processes_under, require_image, vm_slot, Mode, Options, Proc, Server,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

/// An API-only server whose agents poll only every 5 s: anything quicker is the wake-up.
async fn api(lease: &str) -> Server {
    Server::start(Options {
        mode: Mode::Api,
        env: vec![
            ("SQLITE_SIM_AGENT_POLL_INTERVAL".into(), "5".into()),
            ("SQLITE_SIM_AGENT_LEASE".into(), lease.into()),
        ],
        ..Default::default()
    })
    .await
}

/// An agents process as host `id` with `labels`, in a run directory of its own.
fn host(s: &Server, id: &str, labels: &str) -> Proc {
    let run = s.dir.path().join(format!("run-{id}"));
    s.spawn_process_with(
        Mode::Agents,
        &[
            ("SQLITE_SIM_HOST_ID", id.to_string()),
            ("SQLITE_SIM_RUN_DIR", run.display().to_string()),
            ("SQLITE_SIM_AGENT_LABELS", labels.to_string()),
        ],
    )
}

async fn hosts(s: &Server) -> Vec<Value> {
    s.hosts().await
}

/// Waits until the registry shows these hosts live (and no others live).
async fn wait_live(s: &Server, ids: &[&str]) -> Vec<Value> {
    s.wait_live(ids, Duration::from_secs(30), || s.logs()).await
}

fn labels(h: &Value) -> Vec<&str> {
    h["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect()
}

fn submission(commands: &str, requires: &[&str]) -> Value {
    json!({"vm_name": "tiny", "commands": commands, "timeout": 60, "requires": requires})
}

#[tokio::test]
async fn a_label_only_one_host_has_routes_there_and_the_registry_shows_both() {
    require_image();
    let _slot = vm_slot();
    let s = api("30").await;
    let _a = host(&s, "h-big", "big,fast");
    let _b = host(&s, "h-small", "");
    let hs = wait_live(&s, &["h-big", "h-small"]).await;
    let (big, small) = (&hs[0], &hs[1]);
    assert_eq!(big["host_id"], "h-big");
    for l in ["big", "fast", "accel:tcg", "vm:tiny"] {
        assert!(labels(big).contains(&l), "{big}");
    }
    assert!(
        !labels(small).contains(&"big") && labels(small).contains(&"vm:tiny"),
        "{small}"
    );
    for h in &hs {
        assert_eq!(h["slots_in_use"], 0, "{h}");
        assert_eq!(h["max_concurrent_vms"], 10, "{h}");
        assert_eq!(h["agents"].as_array().unwrap().len(), 1, "{h}");
        assert!(h["agents"][0]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", h["host_id"].as_str().unwrap())));
        assert!(h["vms"].as_array().unwrap().contains(&json!("tiny")), "{h}");
    }

    // Nobody has `gpu`: refused, naming what each host lacks. Malformed labels: refused too.
    let (code, v) = s.submit_json(&submission("true", &["gpu", "big"])).await;
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["error"]["code"], "no_capable_host");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("h-big lacks gpu") && msg.contains("h-small lacks big, gpu"),
        "{msg}"
    );
    let (_, doc) = s.get_json("/openapi.json").await;
    let codes = &doc["paths"]["/requests"]["post"]["responses"]["422"]["content"]
        ["application/json"]["schema"]["allOf"][1]["properties"]["error"]["properties"]["code"]
        ["enum"];
    assert!(
        codes
            .as_array()
            .unwrap()
            .contains(&json!("no_capable_host")),
        "documented as served: {codes}"
    );
    let hosts_op = &doc["paths"]["/hosts"]["get"]["responses"]["200"];
    assert!(!hosts_op.is_null(), "GET /hosts documented");
    let (code, v) = s.submit_json(&submission("true", &["-bad label"])).await;
    assert_eq!(
        (code, &v["error"]["code"]),
        (422, &json!("validation_error")),
        "{v}"
    );

    // Only h-big can run it; it is picked up long before the 5 s poll.
    let started = Instant::now();
    let (code, v) = s
        .submit_json(&submission("echo routed; sleep 2", &["big"]))
        .await;
    assert_eq!(code, 201, "{v}");
    let id = v["uuid"].as_str().unwrap().to_string();
    let mut picked = None;
    while started.elapsed() < Duration::from_secs(10) {
        let r = s.get(&id).await;
        if r["status"] != "pending" {
            picked = Some(started.elapsed());
            assert_eq!(r["host"], "h-big", "{r}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let picked = picked.expect("picked up");
    eprintln!("split-mode pickup (created → acknowledged): {picked:?}");
    assert!(picked < Duration::from_secs(2), "pickup took {picked:?}");
    // While it runs, its host shows the slot in use.
    let start = Instant::now();
    while hosts(&s).await[0]["slots_in_use"] != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            hosts(&s).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = s.cli(&["cli", "hosts"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{table}");
    let head: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        [
            "HOST",
            "STATE",
            "SLOTS",
            "LAST",
            "HEARTBEAT",
            "AGENTS",
            "LABELS"
        ]
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("h-big") && l.contains(" live ") && l.contains(" 1/10 ")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("h-small") && l.contains(" 0/10 ")),
        "{table}"
    );
    let out = s.cli(&["cli", "hosts", "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hosts"].as_array().unwrap().len(), 2);

    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (&r["status"], &r["host"]),
        (&json!("done"), &json!("h-big")),
        "{r}"
    );
    assert_eq!(r["requires"], json!(["big"]));
    assert!(r["waiting_for"].is_null());
    assert!(s.output(&id, "stdout").await.contains("routed"));
    let out = s.cli(&["cli", "list-requests"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(table.lines().nth(1).unwrap().contains(" h-big "), "{table}");
    // Requests that need nothing still run anywhere.
    let plain = s.submit("tiny", "true", 60).await;
    let r = s.wait_terminal(&plain, LIMIT).await;
    assert_eq!(r["status"], "done", "{r}");
    assert!(r["host"] == "h-big" || r["host"] == "h-small", "{r}");
}

#[tokio::test]
async fn a_request_waits_for_its_only_capable_host_and_runs_when_it_returns() {
    require_image();
    let _slot = vm_slot();
    let s = api("30").await;
    let mut a = host(&s, "h-kvm", "kvm");
    let _b = host(&s, "h-plain", "");
    wait_live(&s, &["h-kvm", "h-plain"]).await;
    // Stopped cleanly: down at once (not after its lease), still known with its labels.
    common::signal_and_wait(&mut a, Signal::SIGTERM);
    let hs = wait_live(&s, &["h-plain"]).await;
    assert_eq!(
        (&hs[0]["host_id"], &hs[0]["live"]),
        (&json!("h-kvm"), &json!(false))
    );
    assert!(labels(&hs[0]).contains(&"kvm"));

    let (code, v) = s.submit_json(&submission("echo back", &["kvm"])).await;
    assert_eq!(code, 201, "accepted while a capable host is known: {v}");
    let id = v["uuid"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = s.get(&id).await;
    assert_eq!(r["status"], "pending", "h-plain must not take it: {r}");
    let why = r["waiting_for"].as_str().unwrap();
    assert!(
        why.starts_with("no live host has labels kvm (h-kvm last seen "),
        "{why}"
    );
    let (_, list) = s.get_json("/requests?status=pending").await;
    assert_eq!(list["requests"][0]["waiting_for"], json!(why));

    let _a = host(&s, "h-kvm", "kvm");
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (&r["status"], &r["host"]),
        (&json!("done"), &json!("h-kvm")),
        "{r}"
    );
    assert!(r["waiting_for"].is_null());
}

/// Fencing with real processes: an agents process paused (SIGSTOP) past its lease loses its
/// running request to recovery by another host; woken again (SIGCONT), it must not overwrite
/// the recovered outcome, and its VM must end.
#[tokio::test]
async fn a_paused_agent_that_lost_its_lease_does_not_finish_what_it_lost() {
    require_image();
    let _slot = vm_slot();
    let s = api("2").await;
    let mut a = host(&s, "h-a", "only-a");
    let _b = host(&s, "h-b", "");
    wait_live(&s, &["h-a", "h-b"]).await;
    let (code, v) = s
        .submit_json(&submission(
            "echo started; sleep 20; echo finished",
            &["only-a"],
        ))
        .await;
    assert_eq!(code, 201, "{v}");
    let id = v["uuid"].as_str().unwrap().to_string();
    s.wait_output(&id, "stdout", "started").await;
    let run_a = s.dir.path().join("run-h-a");
    assert_eq!(qemu_processes_under(&run_a).len(), 1);

    let pid = Pid::from_raw(a.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    // h-b's reaper recovers it once the 2 s lease has run out.
    let start = Instant::now();
    let r = loop {
        let r = s.get(&id).await;
        if r["status"] == "failed" {
            break r;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = kill(pid, Signal::SIGCONT);
            panic!("not recovered: {r}\n{}", s.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r["error"], "agent lost", "{r}");
    kill(pid, Signal::SIGCONT).unwrap();

    // Its heartbeat finds the claim gone: it stops the run and its QEMU ends.
    assert!(
        eventually(Duration::from_secs(60), || qemu_processes_under(&run_a)
            .is_empty())
        .await,
        "h-a's QEMU still runs\n{}",
        s.logs()
    );
    // Whatever it tried to record afterwards, the recovered outcome stands.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = s.get(&id).await;
    assert_eq!(
        (&after["status"], &after["error"], &after["exit_code"]),
        (&json!("failed"), &json!("agent lost"), &Value::Null),
        "{after}"
    );
    assert_eq!(after["finished_at"], r["finished_at"], "{after}");
    let logs = s.output(&id, "stdout").await;
    assert!(!logs.contains("finished"), "{logs}");
    let log = s.logs();
    assert!(
        log.contains("lease lost"),
        "h-a noticed it lost the claim\n{log}"
    );
    assert!(a.try_wait().unwrap().is_none(), "h-a keeps serving");
    common::signal_and_wait(&mut a, Signal::SIGTERM);
    assert!(
        qemu_processes_under(s.dir.path()).is_empty(),
        "no QEMU leaked"
    );
}

//! Across hosts, on one machine: network namespaces joined by veth pairs to a bridge stand for
//! the hosts (`tests/support/netns.rs`): PostgreSQL in one, the API in another, agents in two
//! more, each with its own run directory, host id and labels, all talking TCP to PostgreSQL at
//! its own address. The test reaches the API over a veth of its own. Cases: twenty requests
//! spread over both hosts and run once each; a host crashing (every process SIGKILLed) and one
//! cut off (`ip link set … down`) past its lease, then back; PostgreSQL restarted mid-run;
//! routing by labels; a proxy that loses the answer to a `COMMIT` that did commit, and one
//! that cuts a host off in the middle of a transaction.
//! Needs root and iproute2: without them the tests skip, loudly, and fail under `CI=true`.

mod common;
#[path = "support/netns.rs"]
mod netns;

use common::{eventually, require_image, vm_slot};
use netns::{Cluster, Lost, Proxy};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);

/// Skips the test (fails it under `CI=true`) when namespaces cannot be made here.
/// `SQLITE_SIM_TEST_SKIP_NETNS=1` skips it on purpose: `scripts/test.sh` runs these once, in
/// its PostgreSQL phase, not again with every other test binary.
macro_rules! require_netns {
    () => {
        if std::env::var("SQLITE_SIM_TEST_SKIP_NETNS").as_deref() == Ok("1") {
            eprintln!("skipped: SQLITE_SIM_TEST_SKIP_NETNS=1 (scripts/test.sh runs these later)");
            return;
        }
        if let Some(why) = netns::unavailable() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cross-host tests need network namespaces (root, iproute2): {why}"
            );
            eprintln!("SKIPPED: cross-host tests need network namespaces (root, iproute2): {why}");
            return;
        }
    };
}

/// An API and agents hosts `ids` (with labels), every process on PostgreSQL over TCP.
async fn cluster(lease: &str, hosts: &[(&str, &str)]) -> Cluster {
    Cluster::with_hosts(lease, false, hosts).await
}

fn submission(commands: &str, requires: &[&str]) -> Value {
    json!({"vm_name": "tiny", "commands": commands, "timeout": 90, "requires": requires})
}

async fn submit(c: &Cluster, commands: &str, requires: &[&str]) -> String {
    let (code, v) = c.api.submit_json(&submission(commands, requires)).await;
    assert_eq!(code, 201, "{v}");
    v["uuid"].as_str().unwrap().to_string()
}

/// The request's `system` log lines that say an agent claimed it: one per run.
async fn claims(c: &Cluster, id: &str) -> usize {
    c.api
        .output(id, "system")
        .await
        .lines()
        .filter(|l| l.starts_with("claimed by agent"))
        .count()
}

/// How many `run finished` lines naming request `id` the agents processes logged: one per run,
/// whichever host ran it.
fn runs_logged(c: &Cluster, id: &str) -> usize {
    c.hosts
        .iter()
        .map(|h| {
            c.log_of(&format!("agents-{}", h.id))
                .lines()
                .filter(|l| l.contains("run finished") && l.contains(id))
                .count()
        })
        .sum()
}

/// No log entry stored twice (same time, type and bytes), as a retried batch would be.
async fn assert_no_duplicate_logs(c: &Cluster, id: &str) {
    let logs = c.api.logs_of(id).await;
    let mut seen = HashMap::new();
    for e in &logs {
        let key = (
            e["timestamp"].to_string(),
            e["log_type"].to_string(),
            e["output"].to_string(),
        );
        *seen.entry(key).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "log entries stored twice: {twice:?}");
}

/// Case 1: twenty requests, both hosts run some, each exactly once. Warm (each host builds
/// its own template, then restores clones), so twenty guests take seconds, not minutes.
#[tokio::test]
async fn twenty_requests_spread_over_two_hosts_each_run_once() {
    require_netns!();
    require_image();
    let _slot = vm_slot();
    let c = Cluster::with_hosts("10", true, &[("h-a", ""), ("h-b", "")]).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(submit(&c, "echo hi", &[]).await);
    }
    let mut per_host: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let r = c.wait_terminal(id, LIMIT).await;
        assert_eq!(
            (&r["status"], &r["exit_code"]),
            (&json!("done"), &json!(0)),
            "{r}"
        );
        let host = r["host"].as_str().unwrap().to_string();
        assert!(host == "h-a" || host == "h-b", "{r}");
        *per_host.entry(host).or_default() += 1;
        assert_eq!(c.api.raw(id, Some("stdout")).await, b"hi\n", "{r}");
        assert_eq!(
            claims(&c, id).await,
            1,
            "claimed once: {:?}",
            c.api.logs_of(id).await
        );
        assert_no_duplicate_logs(&c, id).await;
    }
    // Each ran exactly once: one `run finished` across both hosts' logs, on the host the
    // request names.
    for id in &ids {
        assert_eq!(runs_logged(&c, id), 1, "{id} ran once\n{}", c.logs());
    }
    eprintln!("requests per host: {per_host:?}");
    assert_eq!(per_host.len(), 2, "both hosts ran some: {per_host:?}");
    let (_, list) = c.api.get_json("/requests?limit=100").await;
    assert_eq!(list["total"], 20, "nothing created twice: {list}");
    assert!(c.qemu_of("h-a").is_empty() && c.qemu_of("h-b").is_empty());
    c.close();
}

/// Case 2: a whole host crashes mid-run (every process in its namespace SIGKILLed, QEMU
/// included). The other host's agents recover its requests after the lease, as the README
/// says for lost agents: one whose VM ran is `failed` / `agent lost`, one it had only claimed
/// runs again elsewhere. Restarted, the host cleans its leftovers and serves again.
#[tokio::test]
async fn a_host_killed_mid_run_is_recovered_by_the_other_after_its_lease() {
    require_netns!();
    require_image();
    let _slot = vm_slot();
    let mut c = cluster("3", &[("h-a", "ha"), ("h-b", "")]).await;
    // The first runs on h-a (only it may); the rest on whichever host is free.
    let on_a = submit(&c, "echo started; sleep 30; echo finished", &["ha"]).await;
    let mut rest = Vec::new();
    for i in 0..3 {
        rest.push(submit(&c, &format!("echo rest-{i}"), &[]).await);
    }
    c.api.wait_output(&on_a, "stdout", "started").await;
    assert_eq!(c.qemu_of("h-a").len(), 1);
    c.crash_host("h-a");
    assert!(c.qemu_of("h-a").is_empty(), "QEMU died with its host");
    let leftover = c.run_dir("h-a").join(&on_a);
    assert!(leftover.exists(), "the crash left {}", leftover.display());
    let start = Instant::now();
    let r = c.wait_terminal(&on_a, Duration::from_secs(60)).await;
    eprintln!("recovered after {:?}", start.elapsed());
    assert_eq!(
        (&r["status"], &r["error"], &r["host"], &r["exit_code"]),
        (
            &json!("failed"),
            &json!("agent lost"),
            &json!("h-a"),
            &Value::Null
        ),
        "{r}"
    );
    let recovered_at = r["finished_at"].clone();
    let system = c.api.output(&on_a, "system").await;
    assert!(
        system.contains("agent h-a:") && system.contains("lost (lease expired)"),
        "{system}"
    );
    assert!(!c.api.output(&on_a, "stdout").await.contains("finished"));
    for id in &rest {
        let r = c.wait_terminal(id, LIMIT).await;
        match (r["status"].as_str(), r["host"].as_str()) {
            (Some("done"), _) => assert_eq!(r["exit_code"], 0, "{r}"),
            // h-a may have been running one of these too when it died.
            (Some("failed"), Some("h-a")) => assert_eq!(r["error"], "agent lost", "{r}"),
            _ => panic!("{r}"),
        }
        assert!(runs_logged(&c, id) <= 1, "{id} ran at most once");
    }
    c.wait_live(&["h-b"]).await;

    // Back again: its leftover run directory is cleaned, and it serves what only it can.
    c.start_agents("h-a");
    c.wait_live(&["h-a", "h-b"]).await;
    let again = submit(&c, "echo back", &["ha"]).await;
    let r = c.wait_terminal(&again, LIMIT).await;
    assert_eq!(
        (&r["status"], &r["host"]),
        (&json!("done"), &json!("h-a")),
        "{r}"
    );
    assert!(
        eventually(Duration::from_secs(10), || !leftover.exists()).await,
        "{} left",
        leftover.display()
    );
    // The lost request stays as recovered.
    let after = c.api.get(&on_a).await;
    assert_eq!(
        (&after["status"], &after["error"], &after["finished_at"]),
        (&json!("failed"), &json!("agent lost"), &recovered_at),
        "{after}"
    );
    c.close();
}

/// Case 3: a host cut off (its link down) past its lease loses its running request to the
/// other host's recovery; brought back, its heartbeat finds the claim gone, it stops the run
/// (its QEMU ends) and writes nothing over the recovered outcome. The other host works on
/// through the cut.
#[tokio::test]
async fn a_host_cut_off_past_its_lease_does_not_finish_what_it_lost() {
    require_netns!();
    require_image();
    let _slot = vm_slot();
    let c = cluster("3", &[("h-a", "ha"), ("h-b", "")]).await;
    let lost = submit(&c, "echo started; sleep 40; echo finished", &["ha"]).await;
    c.api.wait_output(&lost, "stdout", "started").await;
    assert_eq!(c.qemu_of("h-a").len(), 1);

    c.set_link("h-a", false);
    let cut = Instant::now();
    // h-b goes on serving while h-a is away.
    let meanwhile = submit(&c, "echo meanwhile", &[]).await;
    let r = c.wait_terminal(&lost, Duration::from_secs(60)).await;
    eprintln!("recovered {:?} after the cut", cut.elapsed());
    assert_eq!(
        (&r["status"], &r["error"], &r["host"]),
        (&json!("failed"), &json!("agent lost"), &json!("h-a")),
        "{r}"
    );
    let system = c.api.output(&lost, "system").await;
    assert!(system.contains("lost (lease expired)"), "{system}");
    let m = c.wait_terminal(&meanwhile, LIMIT).await;
    assert_eq!(
        (&m["status"], &m["host"], &m["exit_code"]),
        (&json!("done"), &json!("h-b"), &json!(0)),
        "{m}"
    );
    // Cut off, h-a still runs its VM: it cannot know yet.
    assert_eq!(
        c.qemu_of("h-a").len(),
        1,
        "h-a's VM runs on while it is cut off"
    );
    c.set_link("h-a", true);

    // Its heartbeat gets through, finds the claim gone: the run stops, QEMU ends.
    assert!(
        eventually(Duration::from_secs(90), || c.qemu_of("h-a").is_empty()).await,
        "h-a's QEMU still runs\n{}",
        c.log_of("agents-h-a")
    );
    // Whichever of its own tasks gets through first notices: the run's heartbeat (its
    // connection may wait out TCP's retransmission back-off) or the periodic clean-up of runs
    // no live claim holds, which kills that QEMU.
    let log = c.log_of("agents-h-a");
    assert!(
        log.contains("lease lost") || log.contains("cleaning up a run whose agent was lost"),
        "h-a noticed it lost the claim\n{log}"
    );
    // Whatever it tried to record afterwards, the recovered outcome stands.
    let after = c.api.get(&lost).await;
    assert_eq!(
        (
            &after["status"],
            &after["error"],
            &after["exit_code"],
            &after["finished_at"]
        ),
        (
            &json!("failed"),
            &json!("agent lost"),
            &Value::Null,
            &r["finished_at"]
        ),
        "{after}"
    );
    assert!(!c.api.output(&lost, "stdout").await.contains("finished"));
    assert!(
        eventually(Duration::from_secs(30), || runs_logged(&c, &lost) == 1).await,
        "h-a's one run ends\n{}",
        c.log_of("agents-h-a")
    );
    // Its log appends are fenced too: nothing it wrote after coming back (its `failed: …`
    // system line, the guest's last console bytes) follows the recovery's line. Its run has
    // ended (above), so nothing of it is still on its way.
    let logs = c.api.logs_of(&lost).await;
    let recovered = logs
        .iter()
        .position(|e| {
            e["log_type"] == "system"
                && e["output"]
                    .as_str()
                    .is_some_and(|o| o.contains("lost (lease expired)"))
        })
        .unwrap_or_else(|| panic!("no recovery line: {logs:?}"));
    assert_eq!(
        &logs[recovered + 1..],
        &[] as &[Value],
        "h-a wrote after the recovery\n{}",
        c.log_of("agents-h-a")
    );
    // Reconnected, h-a serves again.
    c.wait_live(&["h-a", "h-b"]).await;
    let back = submit(&c, "echo back", &["ha"]).await;
    let b = c.wait_terminal(&back, LIMIT).await;
    assert_eq!(
        (&b["status"], &b["host"]),
        (&json!("done"), &json!("h-a")),
        "{b}"
    );
    assert_eq!(c.api.get(&lost).await["finished_at"], r["finished_at"]);
    c.close();
}

/// Case 4: PostgreSQL restarted while requests stream output on both hosts: every session is
/// ended, the engine retries, and every request finishes with its whole output, once; the
/// API takes new work after the restart.
#[tokio::test]
async fn a_postgres_restart_mid_run_loses_nothing_and_runs_nothing_twice() {
    require_netns!();
    require_image();
    let _slot = vm_slot();
    // A lease far longer than the outage: nobody's claim should expire through it.
    let c = cluster("20", &[("h-a", "ha"), ("h-b", "hb")]).await;
    let script = "for i in $(seq 1 40); do echo line-$i; sleep 0.1; done";
    let expected: String = (1..=40).map(|i| format!("line-{i}\n")).collect();
    let ids = [
        submit(&c, script, &["ha"]).await,
        submit(&c, script, &["hb"]).await,
    ];
    for id in &ids {
        c.api.wait_output(id, "stdout", "line-3").await;
    }
    c.restart_pg();
    eprintln!("postgres restarted");
    for id in &ids {
        let r = c.wait_terminal(id, LIMIT).await;
        assert_eq!(
            (&r["status"], &r["exit_code"]),
            (&json!("done"), &json!(0)),
            "{r}"
        );
        let out = String::from_utf8(c.api.raw(id, Some("stdout")).await).unwrap();
        assert_eq!(out, expected, "{r}");
        assert_eq!(claims(&c, id).await, 1);
        assert_eq!(runs_logged(&c, id), 1);
        assert_no_duplicate_logs(&c, id).await;
    }
    assert_eq!(c.api.get(&ids[0]).await["host"], "h-a");
    assert_eq!(c.api.get(&ids[1]).await["host"], "h-b");
    // Every process saw the restart (its listener reconnected).
    for name in ["api", "agents-h-a", "agents-h-b"] {
        assert!(
            c.log_of(name).contains("listener lost its connection"),
            "{name} did not notice the restart\n{}",
            c.log_of(name)
        );
    }
    let after = submit(&c, "echo after", &[]).await;
    let r = c.wait_terminal(&after, LIMIT).await;
    assert_eq!(
        (&r["status"], &r["exit_code"]),
        (&json!("done"), &json!(0)),
        "{r}"
    );
    assert_eq!(c.api.raw(&after, Some("stdout")).await, b"after\n");
    c.close();
}

/// Case 5: a request that only one host's labels allow runs there, every time; one no host
/// can run is refused naming what each lacks.
#[tokio::test]
async fn a_request_only_one_hosts_labels_allow_runs_there() {
    require_netns!();
    require_image();
    let _slot = vm_slot();
    let c = cluster("10", &[("h-a", "ha,big"), ("h-b", "hb")]).await;
    let (code, v) = c.api.submit_json(&submission("true", &["ha", "hb"])).await;
    assert_eq!(
        (code, &v["error"]["code"]),
        (422, &json!("no_capable_host")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("h-a lacks hb") && msg.contains("h-b lacks ha"),
        "{msg}"
    );
    let mut want = Vec::new();
    for _ in 0..2 {
        want.push((submit(&c, "echo on-a", &["big"]).await, "h-a"));
        want.push((submit(&c, "echo on-b", &["hb"]).await, "h-b"));
    }
    for (id, host) in &want {
        let r = c.wait_terminal(id, LIMIT).await;
        assert_eq!(
            (&r["status"], &r["host"], &r["exit_code"]),
            (&json!("done"), &json!(host), &json!(0)),
            "{r}"
        );
        let out = String::from_utf8(c.api.raw(id, Some("stdout")).await).unwrap();
        assert_eq!(out, if *host == "h-a" { "on-a\n" } else { "on-b\n" });
        assert_eq!(runs_logged(&c, id), 1);
    }
    c.close();
}

/// A `COMMIT` that commits but whose answer never reaches the client (a proxy between the
/// processes and PostgreSQL cuts the connection once the server has answered it): for a
/// request's create, claim, start, log batch and finish, the engine re-checks what happened
/// instead of doing it again. Two requests wait before the only agent starts, so a claim run
/// again would take the second one and leave the first orphaned (re-queued after its lease).
#[tokio::test]
async fn a_lost_commit_answer_neither_runs_a_request_twice_nor_loses_its_result() {
    require_netns!();
    require_image();
    let _slot = vm_slot();
    let mut c = Cluster::start("3").await;
    let proxy = Proxy::start(&c.root_addr, c.pg_addr()).await;
    c.api_via(proxy.url.clone());
    c.start_api().await;
    c.add_host("h-a", "");
    c.host_via("h-a", proxy.url.clone());
    // Both wait before any agent runs (with no host registered, the API takes them).
    proxy.arm(&[Lost::Create]);
    let first = submit(&c, "echo hi", &[]).await;
    assert_eq!(proxy.lost(), [Lost::Create], "the create's answer was lost");
    let second = submit(&c, "echo second", &[]).await;
    let (_, list) = c.api.get_json("/requests").await;
    assert_eq!(list["total"], 2, "created once: {list}");

    let agent_side = [Lost::Claim, Lost::MarkRunning, Lost::Logs, Lost::Finish];
    proxy.arm(&agent_side);
    c.start_agents("h-a");
    for (id, out) in [(&first, "hi\n"), (&second, "second\n")] {
        let r = c.wait_terminal(id, LIMIT).await;
        assert_eq!(
            (&r["status"], &r["exit_code"], &r["host"]),
            (&json!("done"), &json!(0), &json!("h-a")),
            "{r}"
        );
        assert_eq!(
            String::from_utf8(c.api.raw(id, Some("stdout")).await).unwrap(),
            out
        );
        assert_eq!(claims(&c, id).await, 1, "{:?}", c.api.logs_of(id).await);
        assert_eq!(runs_logged(&c, id), 1);
        assert_no_duplicate_logs(&c, id).await;
        // No claim was orphaned and recovered: no lease ran out.
        let system = c.api.output(id, "system").await;
        assert!(!system.contains("lease expired"), "{system}");
    }
    let mut lost = proxy.lost();
    lost.sort_by_key(|k| format!("{k:?}"));
    let mut want = vec![Lost::Create];
    want.extend(agent_side);
    want.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(lost, want, "every armed COMMIT answer was lost");
    // The first request took them all, and the engine said it retried each.
    let log = c.log_of("agents-h-a");
    for op in ["claim", "mark_running", "append_logs", "finish"] {
        assert!(
            log.lines()
                .any(|l| l.contains("retrying") && l.contains(&format!("\"{op}\""))),
            "{op} was retried\n{log}"
        );
    }
    assert!(c.qemu_of("h-a").is_empty());
    c.close();
}

/// A host cut off in the middle of a transaction: the proxy in front of it freezes at the
/// `COMMIT` of a log batch, so PostgreSQL holds that session open, idle in its transaction,
/// with the request's row locked (as when a host loses power or its link between two
/// statements: no FIN ever arrives). The other host's recovery must not wait for TCP to give
/// up on it: the engine's sessions end a transaction left idle, so the lock goes and the
/// request is recovered after its lease. Thawed, the cut host overwrites nothing.
#[tokio::test]
async fn a_host_cut_off_inside_a_transaction_does_not_block_its_recovery() {
    require_netns!();
    require_image();
    let _slot = vm_slot();
    let mut c = Cluster::start("3").await;
    let proxy = Proxy::start(&c.root_addr, c.pg_addr()).await;
    c.start_api().await;
    c.add_hosts(&[("h-a", "ha"), ("h-b", "")]);
    c.host_via("h-a", proxy.url.clone());
    c.start_every_host().await;
    let id = submit(&c, "echo started; sleep 4; echo more; sleep 60", &["ha"]).await;
    c.api.wait_output(&id, "stdout", "started").await;
    // "more" is the next log batch.
    proxy.freeze_at(Lost::Logs);
    let frozen = Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || proxy.held() == Some(Lost::Logs)).await,
        "no log batch reached its COMMIT"
    );
    let r = c.wait_terminal(&id, Duration::from_secs(60)).await;
    eprintln!("recovered {:?} after the freeze", frozen.elapsed());
    assert_eq!(
        (&r["status"], &r["error"], &r["host"]),
        (&json!("failed"), &json!("agent lost"), &json!("h-a")),
        "{r}"
    );
    proxy.thaw();
    assert!(
        eventually(Duration::from_secs(90), || c.qemu_of("h-a").is_empty()).await,
        "h-a's QEMU still runs\n{}",
        c.log_of("agents-h-a")
    );
    let after = c.api.get(&id).await;
    assert_eq!(
        (&after["status"], &after["error"], &after["finished_at"]),
        (&json!("failed"), &json!("agent lost"), &r["finished_at"]),
        "{after}"
    );
    c.close();
}

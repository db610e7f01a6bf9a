//! The operator CLI and `submit` against a real server (and, where a VM is involved, the real
//! tiny guest).

mod common;

use common::{require_image, vm_slot, Mode, Options, Server};
use serde_json::Value;
use std::process::{Output, Stdio};
use std::time::Duration;

fn sqlite_sim(s: &Server, args: &[&str]) -> Output {
    s.cli(args)
        .env_remove("SQLITE_SIM_API_TOKEN")
        .current_dir(s.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Starts `submit --wait` in the background; returns it and the uuid it printed.
fn submit_waiting(s: &Server, commands: &str) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = s
        .cli(&["submit", "--vm", "tiny", "-c", commands, "--wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().to_string())
}

async fn api_only() -> Server {
    Server::start(Options {
        mode: Mode::Api,
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn list_show_and_prefixes() {
    let s = api_only().await;
    // 17 requests: two must share their first hex digit.
    let mut ids = Vec::new();
    for i in 0..17 {
        ids.push(s.submit("tiny", &format!("echo {i}"), 30).await);
    }
    let out = sqlite_sim(&s, &["cli", "list-requests", "--limit", "100"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let mut lines = table.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["UUID", "VM", "STATUS", "EXIT", "ATTEMPT", "HOST", "PRIO", "QUEUE", "AGE", "DURATION"]
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 17);
    assert!(rows[0].starts_with(&ids[16][..8]), "newest first: {table}");
    assert!(rows
        .iter()
        .all(|r| r.contains(" tiny ") && r.contains(" pending ")));
    // Same priority, no submitter: the queue is oldest first, so the newest is 17th.
    let cells = |r: &str| r.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(cells(rows[0])[6..8], ["0", "17"], "{table}");
    assert_eq!(cells(rows[16])[6..8], ["0", "1"], "{table}");

    let json = sqlite_sim(
        &s,
        &["cli", "list-requests", "--json", "--status", "pending"],
    );
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["total"], 17);

    // A unique prefix works for every command that takes an id.
    let target = &ids[3];
    let unique = (4..=36)
        .map(|n| &target[..n])
        .find(|p| ids.iter().filter(|i| i.starts_with(p)).count() == 1)
        .unwrap();
    let out = sqlite_sim(&s, &["cli", "show-request", unique, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["uuid"], target.as_str());
    let out = sqlite_sim(&s, &["cli", "show-request", unique]);
    let shown = text(&out.stdout);
    assert!(
        shown.contains(target) && shown.contains("echo 3"),
        "{shown}"
    );

    // An ambiguous prefix is an error listing the candidates.
    let first = ids
        .iter()
        .map(|i| &i[..1])
        .find(|p| ids.iter().filter(|i| i.starts_with(p)).count() > 1)
        .unwrap();
    let out = sqlite_sim(&s, &["cli", "show-request", first]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("matches") && err.contains("give more of the uuid"),
        "{err}"
    );
    assert!(err.lines().count() >= 3, "candidates listed: {err}");

    let out = sqlite_sim(&s, &["cli", "show-request", "ffffffff-ffff"]);
    let none_match = ids.iter().all(|i| !i.starts_with("ffffffff-ffff"));
    if none_match {
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains("no request matches"));
    }
    let out = sqlite_sim(&s, &["cli", "show-request", "not-hex"]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn control_commands_and_delete() {
    let s = api_only().await;
    let id = s.submit("tiny", "echo x", 30).await;
    let out = sqlite_sim(&s, &["cli", "hold", &id[..13]]);
    assert!(
        text(&out.stdout).contains("is now hold"),
        "{}",
        text(&out.stderr)
    );
    let out = sqlite_sim(&s, &["cli", "resume", &id, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["request"]["status"].as_str(), v["applied"].as_bool()),
        (Some("pending"), Some(true))
    );
    let out = sqlite_sim(&s, &["cli", "resume", &id]);
    assert_eq!(out.status.code(), Some(1), "refused: not held");
    assert!(
        text(&out.stderr).contains("invalid_transition"),
        "{}",
        text(&out.stderr)
    );
    let out = sqlite_sim(&s, &["cli", "cancel", &id]);
    assert!(
        text(&out.stdout).contains("is now cancelled"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(s.get(&id).await["status"], "cancelled", "a cancel keeps it");
    let out = sqlite_sim(&s, &["cli", "delete-request", &id]);
    assert!(
        text(&out.stdout).contains("deleted"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(s.fetch(&format!("/requests/{id}")).await.status, 404);
    let out = sqlite_sim(&s, &["cli", "cancel", &id]);
    assert_eq!(out.status.code(), Some(1));
}

/// A template row as a host's agents write it.
fn put_template_row(s: &Server, vm: &str, state: &str, error: Option<&str>, failures: i64) {
    let c = rusqlite::Connection::open(&s.db).unwrap();
    c.execute(
        "INSERT OR REPLACE INTO templates (host_id, vm_name, state, error, failures, size_bytes,
             updated_at)
         VALUES ('h1', ?1, ?2, ?3, ?4, 432013312, '2026-12-01T10:00:00.000000Z')",
        rusqlite::params![vm, state, error, failures],
    )
    .unwrap();
}

#[tokio::test]
async fn vms_and_template_commands() {
    let s = Server::start(Options {
        mode: Mode::Api,
        configs: vec![
            (
                "warm".into(),
                "KERNEL=\"/k\"\nWARM=\"on\"\nWARM_POOL=\"3\"\nLOGIN_PASSWORD=\"s3cr3t-pw\"\n"
                    .into(),
            ),
            ("broken".into(), "MEMROY=\"1G\"\n".into()),
        ],
        ..Default::default()
    })
    .await;
    put_template_row(&s, "warm", "failed", Some("boot timeout after 120 s"), 2);
    let out = sqlite_sim(&s, &["cli", "vms"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(!table.contains("s3cr3t-pw"), "{table}");
    let mut lines = table.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["NAME", "VALID", "WARM", "POOL", "ACCEL", "TEMPLATE", "SIZE", "RESTORE", "P50", "ERROR"]
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert_eq!(
        &rows[0][..6],
        ["broken", "no", "-", "-", "-", "none"],
        "{table}"
    );
    assert!(rows[0].join(" ").contains("unknown key MEMROY"), "{table}");
    assert_eq!(
        &rows[1][..6],
        ["tiny", "yes", "off", "0", "tcg", "none"],
        "{table}"
    );
    assert_eq!(
        &rows[2][..7],
        ["warm", "yes", "on", "3", "tcg", "failed,", "2×"],
        "{table}"
    );
    assert!(
        rows[2].join(" ").ends_with("h1: boot timeout after 120 s"),
        "the last template error: {table}"
    );

    let out = sqlite_sim(&s, &["cli", "vms", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        s.get_json("/vms").await.1,
        "--json is the API's document"
    );

    let out = sqlite_sim(&s, &["cli", "template", "build", "warm"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.starts_with("warm: template build ordered (order 1)"),
        "{said}"
    );
    assert!(
        said.contains(
            "failed 2× on h1: boot timeout after 120 s [build ordered, not yet carried out]"
        ),
        "{said}"
    );
    let out = sqlite_sim(&s, &["cli", "template", "build", "warm", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["template"]["orders"]["build"], 2);

    // Refusals are one line and exit code 1; nothing is ordered.
    for (args, needle) in [
        (
            &["cli", "template", "build", "tiny"][..],
            "not_warm, HTTP 409",
        ),
        (
            &["cli", "template", "build", "broken"],
            "validation_error, HTTP 422",
        ),
        (&["cli", "template", "build", "nope"], "not_found, HTTP 404"),
        (
            &["cli", "template", "delete", "tiny"],
            "VM tiny has no template",
        ),
        (
            &["cli", "template", "delete", "../x", "--yes"],
            "is not a VM name",
        ),
    ] {
        let out = sqlite_sim(&s, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(needle) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    // Deleting asks only on a terminal; stdin is not one here.
    let out = sqlite_sim(&s, &["cli", "template", "delete", "warm"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        // One sequence for builds and deletes: this comes after builds 1 and 2.
        text(&out.stdout).starts_with("warm: template deletion ordered (order 3)"),
        "{}",
        text(&out.stdout)
    );
    let (_, vm) = s.get_json("/vms/warm").await;
    assert_eq!(
        vm["template"]["orders"],
        serde_json::json!({"build": 2, "delete": 3, "outstanding": true})
    );
}

#[tokio::test]
async fn unreachable_api_is_one_line_and_its_own_exit_code() {
    let s = api_only().await;
    for args in [
        &["cli", "--api-url", "http://127.0.0.1:9", "stats"][..],
        &["cli", "list-requests", "--api-url", "http://127.0.0.1:9"],
        &[
            "submit",
            "--api-url",
            "http://127.0.0.1:9",
            "--vm",
            "tiny",
            "-c",
            "true",
            "--wait",
        ],
    ] {
        let out = sqlite_sim(&s, args);
        assert_eq!(out.status.code(), Some(243), "{args:?}");
        let err = text(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains("cannot reach the API at http://127.0.0.1:9"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn submit_input_is_validated_before_sending() {
    let s = api_only().await;
    let out = sqlite_sim(&s, &["submit", "--vm", "tiny"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("exactly one way"));
    let out = sqlite_sim(&s, &["submit", "--vm", "nope", "-c", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("available: tiny"),
        "{}",
        text(&out.stderr)
    );
    let out = sqlite_sim(&s, &["completions", "bash"]);
    let script = text(&out.stdout);
    assert!(out.status.success() && script.contains("sqlite-sim"));
    for word in ["vms", "template", "build"] {
        assert!(script.contains(word), "completions know {word}");
    }
}

#[tokio::test]
async fn submit_wait_exit_codes() {
    require_image();
    let _slot = vm_slot();
    let broken = "IMAGE=\"tiny.qcow2\"\nACCEL=\"tcg\"\nADDITIONAL_ARGS=\"-no-such-option\"\n";
    let s = Server::start(Options {
        configs: vec![("broken".into(), broken.into())],
        ..Default::default()
    })
    .await;
    let out = sqlite_sim(&s, &["submit", "--vm", "tiny", "-c", "echo ok", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    assert_eq!(id.len(), 36, "prints the uuid");
    let out = sqlite_sim(&s, &["submit", "--vm", "tiny", "-c", "exit 7", "--wait"]);
    assert_eq!(out.status.code(), Some(7));
    assert!(text(&out.stderr).contains("done, exit code 7"));
    let out = sqlite_sim(&s, &["submit", "--vm", "broken", "-c", "true", "--wait"]);
    assert_eq!(out.status.code(), Some(240), "failed");
    let out = sqlite_sim(
        &s,
        &[
            "submit",
            "--vm",
            "tiny",
            "-c",
            "sleep 60",
            "--timeout",
            "6",
            "--wait",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(241),
        "timeout: {}",
        text(&out.stderr)
    );
    let out = sqlite_sim(
        &s,
        &["submit", "--vm", "tiny", "-c", "true", "--wait", "--json"],
    );
    let last: Value = serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "done");

    // Cancelled by someone else while waiting.
    let (mut child, id) = submit_waiting(&s, "sleep 60");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = sqlite_sim(&s, &["cli", "cancel", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(242), "cancelled");
}

#[tokio::test]
async fn ctrl_c_while_waiting_cancels_the_request() {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(Options::default()).await;
    let (child, id) = submit_waiting(&s, "sleep 60");
    tokio::time::sleep(Duration::from_millis(500)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(
        text(&out.stderr).contains(&format!("cancelled request {id}")),
        "{}",
        text(&out.stderr)
    );
    let r = s.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(r["status"], "cancelled");
}

#[tokio::test]
async fn follow_output_equals_the_stored_bytes() {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(Options::default()).await;
    let script =
        r"for i in 1 2 3; do echo line $i; sleep 0.3; done; printf 'bin\001\377'; echo e >&2";
    // submit --follow, piped: the commands' stdout only, on stdout.
    let out = sqlite_sim(&s, &["submit", "--vm", "tiny", "-c", script, "--follow"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"line 1\nline 2\nline 3\nbin\x01\xff");
    assert!(text(&out.stderr).contains("e\n"), "stderr on stderr");
    let id = text(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("submitted "))
        .unwrap()
        .to_string();
    let raw = s.raw(&id, None).await;
    assert_eq!(out.stdout, &raw[..]);

    // show-logs --follow on a finished request replays and ends; piped bytes are exact.
    let out = sqlite_sim(
        &s,
        &["cli", "show-logs", &id, "--follow", "--log-type", "stdout"],
    );
    assert!(out.status.success());
    assert_eq!(out.stdout, &raw[..]);
    let out = sqlite_sim(&s, &["cli", "show-logs", &id, "--log-type", "stdout"]);
    assert_eq!(out.stdout, &raw[..]);
    // JSON lines while following; a JSON document otherwise.
    let out = sqlite_sim(&s, &["cli", "show-logs", &id, "--follow", "--json"]);
    let entries: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), s.logs_of(&id).await.len());
    let out = sqlite_sim(&s, &["cli", "show-logs", &id, "--json", "--limit", "2"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let out = sqlite_sim(&s, &["cli", "stats", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["by_status"]["done"], 1);
    assert!(v["boot"]["p95_ms"].as_i64().unwrap() > 0);
    let out = sqlite_sim(&s, &["cli", "stats"]);
    assert!(
        text(&out.stdout).contains("success rate  100.0% of 1 finished"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn prune_deletes_old_finished_requests_only() {
    let s = api_only().await;
    let done = s.submit("tiny", "echo a", 30).await;
    let active = s.submit("tiny", "echo b", 30).await;
    let out = sqlite_sim(&s, &["cli", "cancel", &done]);
    assert!(out.status.success());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = sqlite_sim(&s, &["cli", "prune", "--older-than", "30d"]);
    assert!(
        text(&out.stdout).starts_with("deleted 0 finished requests"),
        "{}",
        text(&out.stdout)
    );
    let out = sqlite_sim(
        &s,
        &["cli", "prune", "--older-than", "1s", "--dry-run", "--json"],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["requests"].as_u64(), v["dry_run"].as_bool()),
        (Some(1), Some(true))
    );
    let out = sqlite_sim(&s, &["cli", "prune", "--older-than", "1s"]);
    assert!(
        text(&out.stdout).starts_with("deleted 1 finished requests"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(s.fetch(&format!("/requests/{done}")).await.status, 404);
    assert_eq!(s.get(&active).await["status"], "pending");
    let out = sqlite_sim(&s, &["cli", "prune", "--older-than", "soon"]);
    assert_eq!(out.status.code(), Some(2), "bad durations are usage errors");
}

#[tokio::test]
async fn follow_survives_an_api_restart() {
    require_image();
    let _slot = vm_slot();
    let mut s = api_only().await;
    let mut agents = s.spawn_process(Mode::Agents);
    let id = s
        .submit(
            "tiny",
            "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.5; done",
            120,
        )
        .await;
    let follower = s
        .cli(&["cli", "show-logs", &id, "--follow", "--log-type", "stdout"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    s.wait_output(&id, "stdout", "tick 2").await;
    // The API dies mid-stream and comes back on the same address.
    s.restart_hard(Mode::Api).await;
    let out = tokio::task::spawn_blocking(move || follower.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want: String = (1..=8).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(
        text(&out.stdout),
        want,
        "every line exactly once across the reconnect"
    );
    common::signal_and_wait(&mut agents, nix::sys::signal::Signal::SIGTERM);
}

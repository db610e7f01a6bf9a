//! The live console and keep-on-failure against the real tiny guest: a late viewer sees the
//! whole console, typing reaches the guest (and the `input` log), a failed run kept up can be
//! attached to, typed into and released, and every way a keep ends leaves no QEMU behind.

mod common;

use common::ws::Console;
use common::{guest_slot, Mode, Options, Server};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

/// Submits `commands` with `keep_on_failure` and waits until its VM is kept.
async fn kept(s: &Server, commands: &str, timeout: u32, keep: u32) -> (String, Value) {
    let (code, r) = s
        .submit_json(
            &json!({"vm_name": "tiny", "commands": commands, "timeout": timeout,
                             "keep_on_failure": keep}),
        )
        .await;
    assert_eq!(code, 201, "{r}");
    let id = r["uuid"].as_str().unwrap().to_string();
    let r = s
        .wait_for(&id, LIMIT, |r| {
            !r["kept_until"].is_null() || r["finished_at"].is_string()
        })
        .await;
    assert_eq!(r["status"], "running", "a kept run stays running: {r}");
    assert_eq!(r["keep_on_failure"], keep);
    // The reason reaches the log just after `kept_until`.
    s.wait_output_within(&id, "system", "kept for up to", Duration::from_secs(5))
        .await;
    (id, r)
}

/// The console bytes the logs hold, in order: everything the serial console carried.
async fn logged_console(s: &Server, id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for e in s.logs_of(id).await {
        if matches!(e["log_type"].as_str(), Some("boot" | "shutdown"))
            || (e["log_type"] == "stdout" && s.get(id).await["channel"] == "console")
        {
            match e["output_base64"].as_str() {
                Some(b) => out.extend(base64_decode(b)),
                None => out.extend(e["output"].as_str().unwrap().as_bytes()),
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[tokio::test]
async fn a_late_viewer_sees_the_whole_console_and_typing_reaches_the_guest() {
    let _slot = guest_slot();
    let s = Server::start(Options::default()).await;
    // The script reads a line from the console itself (its stdin is /dev/null).
    let script = "read line </dev/ttyS0; echo got-$line; echo seen-$line >/dev/ttyS0";
    let id = s.submit("tiny", script, 60).await;
    s.wait_output_within(&id, "system", "commands started", LIMIT)
        .await;
    let mut late = Console::connect(&s.url, &id, "").await;
    let hello = late
        .until_message(Duration::from_secs(5), |m| m["type"] == "hello")
        .await;
    assert_eq!(
        (hello["offset"].clone(), hello["status"].clone()),
        (json!(0), json!("running"))
    );
    late.take().await;
    late.type_text("hello\r").await;
    late.until_output("seen-hello", Duration::from_secs(30))
        .await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(0)),
        "{r}"
    );
    assert!(s.output(&id, "stdout").await.contains("got-hello"));
    // The keystrokes are on record, with who typed them.
    let input = s.output(&id, "input").await;
    assert!(
        input.starts_with("anonymous@127.0.0.1:") && input.contains(": hello\\r"),
        "{input}"
    );
    late.until_closed(Duration::from_secs(10)).await;
    // The stream is the console the logs hold, byte for byte; a viewer of the finished
    // request gets all of it, then a normal close.
    let logged = logged_console(&s, &id).await;
    assert!(logged.len() > 1000, "the boot is on the console");
    assert!(
        late.bytes == logged,
        "live viewer's stream differs from the logged console"
    );
    let mut after = Console::connect(&s.url, &id, "?read_only=1").await;
    after.until_closed(Duration::from_secs(10)).await;
    assert!(after.bytes == logged);
    let mut tail = Console::connect(&s.url, &id, &format!("?from={}", logged.len() - 10)).await;
    tail.until_closed(Duration::from_secs(10)).await;
    assert_eq!(tail.bytes, logged[logged.len() - 10..]);
    assert_eq!(tail.messages[0]["status"], "done");
    s.no_qemu_left().await;
}

#[tokio::test]
async fn a_kept_failure_can_be_attached_typed_into_and_released_with_its_outcome() {
    let _slot = guest_slot();
    let s = Server::start(Options::default()).await;
    // A 15 s timeout: the keep outlasts it, because the clock stops when the run is kept.
    let (id, r) = kept(&s, "false", 15, 60).await;
    let kept_at = Instant::now();
    assert!(r["kept_until"].is_string(), "{r}");
    let system = s.output(&id, "system").await;
    assert!(
        system.contains("kept for up to 60 s") && system.contains("exited with status 1"),
        "{system}"
    );
    let mut c = Console::connect(&s.url, &id, "").await;
    c.until_output("(kept) # ", Duration::from_secs(20)).await;
    c.take().await;
    c.type_text("echo typed-$((6*7))\r").await;
    c.until_output("typed-42", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(16).saturating_sub(kept_at.elapsed())).await;
    assert_eq!(
        s.get(&id).await["status"],
        "running",
        "the timeout clock stopped"
    );
    assert!(!s.output(&id, "system").await.contains("timed out"));
    let (code, r) = s.put_status(&id, "release").await;
    assert!(code == 200 || code == 202, "{code} {r}");
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(1)),
        "the original outcome: {r}"
    );
    assert!(r["kept_ms"].as_i64().unwrap() > 0, "{r}");
    let system = s.output(&id, "system").await;
    assert!(
        system.contains("keep ended after") && system.contains("released by an operator"),
        "{system}"
    );
    assert!(s
        .output(&id, "input")
        .await
        .contains("echo typed-$((6*7))\\r"));
    c.until_message(Duration::from_secs(10), |m| {
        m["type"] == "status" && m["status"] == "done"
    })
    .await;
    c.until_closed(Duration::from_secs(10)).await;
    s.no_qemu_left().await;
    // Releasing a finished request is refused.
    let (code, r) = s.put_status(&id, "release").await;
    assert_eq!(
        (code, r["error"]["code"].as_str()),
        (409, Some("invalid_transition")),
        "{r}"
    );
}

#[tokio::test]
async fn a_short_keep_expires_a_cancelled_one_keeps_its_outcome_and_a_deleted_one_is_shut_down() {
    let _slot = guest_slot();
    let s = Server::start(Options::default()).await;
    // `submit --wait` says how to attach when the run is kept, and exits with the outcome.
    let mut submit = s
        .cli(&[
            "submit",
            "--vm",
            "tiny",
            "-c",
            "exit 3",
            "--wait",
            "--keep-on-failure",
            "3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    submit
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let id = out.trim().to_string();
    let mut err = String::new();
    submit
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(wait_exit(&mut submit, LIMIT).code(), Some(3), "{err}");
    assert!(
        err.contains(&format!("sqlite-sim cli attach {id}")),
        "{err}"
    );
    let r = s.get(&id).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(3)),
        "{r}"
    );
    assert!(r["kept_ms"].as_i64().unwrap() >= 2900, "{r}");
    assert!(s
        .output(&id, "system")
        .await
        .contains("keep_on_failure expired"));
    s.no_qemu_left().await;

    // A cancel ends the debugging session, not the run, which had already failed: the
    // outcome stays the failure's.
    let (id, _) = kept(&s, "false", 60, 60).await;
    let (code, r) = s.put_status(&id, "cancelled").await;
    assert!(code == 200 || code == 202, "{code} {r}");
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(1)),
        "{r}"
    );
    assert!(s.output(&id, "system").await.contains("keep ended after"));
    assert!(s
        .output(&id, "system")
        .await
        .contains("cancelled by an operator"));
    s.no_qemu_left().await;

    // A timeout is a failure worth keeping too; DELETE ends it and removes it.
    let (id, _) = kept(&s, "sleep 600", 20, 60).await;
    let system = s.output(&id, "system").await;
    assert!(system.contains("timed out after"), "{system}");
    // The shell was given back (Ctrl-C) and set up for a person.
    let mut c = Console::connect(&s.url, &id, "?read_only=1").await;
    c.until_output("(kept) # ", Duration::from_secs(20)).await;
    let (code, _) = s.delete_request(&id).await;
    assert!(code == 204 || code == 202, "{code}");
    let (code, _) = s.get_json(&format!("/requests/{id}")).await;
    assert_eq!(code, 404);
    s.no_qemu_left().await;
}

/// Split processes: the API types into an agents process's VM through the store, `cli attach`
/// works against the API URL, and stopping the agents ends a kept run with its outcome.
#[tokio::test]
async fn across_processes_attach_types_and_stopping_the_agents_ends_the_keep() {
    let _slot = guest_slot();
    let (s, mut agents) = Server::start_split().await;
    let (id, _) = kept(&s, "false", 60, 120).await;
    let prefix = &id[..8];

    // Read-only: the console shows, typed keys are not sent, Ctrl-] detaches.
    let mut ro = s
        .cli(&["cli", "attach", prefix, "--read-only"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ro_out = ro.stdout.take().unwrap();
    let seen = read_until(&mut ro_out, "(kept) # ", Duration::from_secs(20));
    let logged = logged_console(&s, &id).await;
    assert!(
        logged.len() > 1000 && seen.starts_with(&logged[..1000]),
        "the whole console, from its first byte"
    );
    let mut ro_in = ro.stdin.take().unwrap();
    ro_in.write_all(b"echo nope-$((1+1))\r\x1d").unwrap();
    drop(ro_in);
    assert!(wait_exit(&mut ro, Duration::from_secs(10)).success());
    let mut err = String::new();
    ro.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        err.contains("read-only") && err.contains("detached"),
        "{err}"
    );

    // Typing, through the CLI's piped stdin, into the agents process's VM.
    let mut rw = s
        .cli(&["cli", "attach", prefix])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut rw_out = rw.stdout.take().unwrap();
    let mut rw_in = rw.stdin.take().unwrap();
    read_until(&mut rw_out, "(kept) # ", Duration::from_secs(20));
    // Give the take a moment to land before typing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    rw_in.write_all(b"echo typed-$((6*7))\r").unwrap();
    read_until(&mut rw_out, "typed-42", Duration::from_secs(30));
    rw_in.write_all(b"\x1d").unwrap();
    assert!(wait_exit(&mut rw, Duration::from_secs(10)).success());
    let input = s.output(&id, "input").await;
    assert!(
        !input.contains("nope-"),
        "read-only keys were typed: {input}"
    );
    assert!(input.contains("typed-$((6*7))"), "{input}");
    assert_eq!(
        s.get(&id).await["status"],
        "running",
        "detaching never affects the run"
    );

    // The agents stop: the keep ends through the ladder, with the original outcome.
    common::signal_and_wait(&mut agents, nix::sys::signal::Signal::SIGTERM);
    let r = s.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(1)),
        "{r}"
    );
    assert!(s
        .output(&id, "system")
        .await
        .contains("the agent is stopping"));
    s.no_qemu_left().await;
}

#[tokio::test]
async fn bad_keep_on_failure_values_are_refused_and_nothing_is_stored() {
    let s = Server::start(Options {
        mode: Mode::Api,
        env: vec![("SQLITE_SIM_MAX_KEEP".into(), "600".into())],
        ..Default::default()
    })
    .await;
    for bad in [json!(0), json!(601), json!(1.5), json!("60"), json!(-1)] {
        let (code, r) = s
            .submit_json(&json!({"vm_name": "tiny", "commands": "false", "keep_on_failure": bad}))
            .await;
        assert_eq!(
            (code, r["error"]["code"].as_str()),
            (422, Some("validation_error")),
            "{bad}: {r}"
        );
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("keep_on_failure"),
            "{r}"
        );
    }
    let (_, list) = s.get_json("/requests").await;
    assert_eq!(list["total"], 0, "nothing stored");
    let (code, r) = s
        .submit_json(&json!({"vm_name": "tiny", "commands": "false", "keep_on_failure": 600.0}))
        .await;
    assert_eq!(code, 201, "{r}");
    let id = r["uuid"].as_str().unwrap();
    let r = s.get(id).await;
    assert_eq!(
        (r["keep_on_failure"].clone(), r["kept_until"].clone()),
        (json!(600), Value::Null)
    );
    // Not kept (still pending): release is refused.
    let (code, r) = s.put_status(id, "release").await;
    assert_eq!(code, 409, "{r}");
    let (_, doc) = s.get_json("/openapi.json").await;
    assert_eq!(
        doc["components"]["schemas"]["CreateBody"]["properties"]["keep_on_failure"]["maximum"],
        600
    );
    assert!(doc["paths"]["/requests/{uuid}/console"]["get"]["responses"]["426"].is_object());
}

/// Reads `out` until it contains `needle`; everything read.
fn read_until(out: &mut impl Read, needle: &str, limit: Duration) -> Vec<u8> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        assert!(
            start.elapsed() < limit,
            "{needle:?} not seen; got:\n{}",
            String::from_utf8_lossy(&seen)
        );
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "{needle:?} not seen before EOF; got:\n{}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("attach did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

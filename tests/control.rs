//! Lifecycle control against the real tiny guest: hold/resume through QMP stop/cont, cancel
//! during boot and during a command, from the same process and across processes.

mod common;

use common::{eventually, guest_slot, signal_and_wait, Mode, Options, Server};
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

async fn stdout_entries(s: &Server, id: &str) -> usize {
    s.logs_of(id)
        .await
        .iter()
        .filter(|e| e["log_type"] == "stdout")
        .count()
}

const TICKS: &str = "for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.5; done";

/// Hold a running script: the console stays silent while held, the held time does not count
/// towards the timeout, and the script finishes after resume.
async fn hold_and_resume(s: &Server) {
    // Boot (3 s under TCG, up to ~15 s on a loaded machine) and 3 s of work fit a 25 s
    // timeout; held for 27 s more, the run only finishes if time held is not counted.
    let id = s.submit("tiny", TICKS, 25).await;
    s.wait_output(&id, "stdout", "tick 2").await;
    let (code, r) = s.put_status(&id, "hold").await;
    assert!(code == 200 || code == 202, "{code} {r}");
    let r = s
        .wait_for(&id, Duration::from_secs(10), |r| r["status"] == "hold")
        .await;
    assert!(r["desired_status"].is_null(), "{r}");
    let before = stdout_entries(s, &id).await;
    tokio::time::sleep(Duration::from_secs(27)).await;
    assert_eq!(
        stdout_entries(s, &id).await,
        before,
        "console silent while held"
    );
    assert_eq!(s.get(&id).await["status"], "hold");
    let (code, r) = s.put_status(&id, "running").await;
    assert!(code == 200 || code == 202, "{code} {r}");
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(0)),
        "{r}"
    );
    let out = s.output(&id, "stdout").await;
    assert_eq!(out.lines().count(), 6, "{out}");
    let system = s.output(&id, "system").await;
    for needle in [
        "QMP event STOP at ",
        "QMP event RESUME at ",
        "held: vCPUs stopped",
        "resumed",
    ] {
        assert!(system.contains(needle), "{needle} missing:\n{system}");
    }
    assert!(s.qemu_processes().is_empty());
}

#[tokio::test]
async fn hold_pauses_the_vm_and_resume_continues_it() {
    let _slot = guest_slot();
    let s = Server::start(Options::default()).await;
    hold_and_resume(&s).await;
}

#[tokio::test]
async fn hold_before_an_agent_claims_keeps_the_request_waiting() {
    let _slot = guest_slot();
    let s = Server::start(Options::with_mode(Mode::Api)).await;
    let id = s.submit("tiny", "echo released", 60).await;
    let (code, r) = s.put_status(&id, "hold").await;
    assert_eq!((code, r["status"].as_str()), (200, Some("hold")));
    let mut agents = s.spawn_process(Mode::Agents);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = s.get(&id).await;
    assert_eq!(r["status"], "hold", "never claimed while held: {r}");
    assert!(r["agent_id"].is_null());
    let (code, r) = s.put_status(&id, "pending").await;
    assert_eq!((code, r["status"].as_str()), (200, Some("pending")));
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(s.output(&id, "stdout").await, "released\n");
    signal_and_wait(&mut agents, Signal::SIGTERM);
}

#[tokio::test]
async fn cancel_during_boot_ends_qemu_promptly() {
    let _slot = guest_slot();
    let s = Server::start(Options::default()).await;
    let id = s.submit("tiny", "echo never", 60).await;
    s.wait_for(&id, LIMIT, |r| r["status"] == "running").await;
    assert!(
        !s.output(&id, "system").await.contains("shell prompt"),
        "still booting"
    );
    let start = Instant::now();
    let (code, r) = s.put_status(&id, "cancelled").await;
    assert!(matches!(code, 200 | 202), "{code} {r}");
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["status"], "cancelled", "{r}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "took {:?}",
        start.elapsed()
    );
    assert!(r["exit_code"].is_null());
    assert!(r["shutdown_step"].is_string());
    assert!(
        eventually(Duration::from_secs(5), || s.qemu_processes().is_empty()).await,
        "QEMU gone"
    );
    assert!(!s.output(&id, "system").await.is_empty(), "logs kept");
    assert_eq!(s.output(&id, "stdout").await, "");
}

#[tokio::test]
async fn cancel_during_a_command() {
    let _slot = guest_slot();
    let s = Server::start(Options::default()).await;
    let id = s.submit("tiny", "echo started; sleep 600", 300).await;
    s.wait_output(&id, "stdout", "started").await;
    let start = Instant::now();
    let (code, r) = s.put_status(&id, "cancelled").await;
    assert_eq!(code, 200, "applied within the wait: {r}");
    assert_eq!(
        (r["status"].as_str(), r["applied"].as_bool()),
        (Some("cancelled"), Some(true))
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(
        r["shutdown_step"], "powerdown",
        "a cooperative guest powers off"
    );
    assert!(
        s.qemu_processes().is_empty(),
        "QEMU gone when cancelled is reported"
    );
    assert_eq!(s.output(&id, "stdout").await, "started\n");
    // Finished now: further control is refused, deletion works.
    let (code, _) = s.put_status(&id, "hold").await;
    assert_eq!(code, 409);
    let (code, _) = s.delete_request(&id).await;
    assert_eq!(code, 204);
}

#[tokio::test]
async fn delete_of_a_running_request_stops_its_vm_and_removes_it() {
    let _slot = guest_slot();
    let s = Server::start(Options::default()).await;
    let id = s.submit("tiny", "echo started; sleep 600", 300).await;
    s.wait_output(&id, "stdout", "started").await;
    let (code, r) = s.delete_request(&id).await;
    assert_eq!(code, 204, "the VM powers off within the wait: {r}");
    assert!(
        s.qemu_processes().is_empty(),
        "QEMU gone when 204 is answered"
    );
    assert_eq!(s.fetch(&format!("/requests/{id}")).await.status, 404);
    assert_eq!(s.fetch(&format!("/requests/{id}/logs")).await.status, 404);
    let (_, list) = s.get_json("/requests").await;
    assert_eq!(list["total"], 0, "{list}");
}

#[tokio::test]
async fn control_crosses_from_the_api_process_to_an_agents_process() {
    let _slot = guest_slot();
    let (s, mut agents) = Server::start_split().await;
    hold_and_resume(&s).await;
    // And a cancel across processes.
    let id = s.submit("tiny", "echo started; sleep 600", 300).await;
    s.wait_output(&id, "stdout", "started").await;
    let (code, _) = s.put_status(&id, "cancelled").await;
    assert!(code == 200 || code == 202);
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["status"], "cancelled");
    assert!(eventually(Duration::from_secs(5), || s.qemu_processes().is_empty()).await);
    signal_and_wait(&mut agents, Signal::SIGTERM);
}

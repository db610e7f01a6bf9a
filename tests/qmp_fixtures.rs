//! The QMP client against transcripts recorded from real QEMU 7.2 (`qmp-fixtures/`), replayed by
//! a fake server over a real unix socket.

mod support;

use qapi::qmp::{self, Event, RunState, ShutdownCause};
use sqlite_sim::qemu::qmp::{Qmp, QmpError, QmpEvent, QmpEvents};
use std::future::Future;
use std::time::Duration;
use support::fake_qmp::{load_fixture, AtEnd, FakeQmp, Transcript};

/// Fails the test instead of hanging when the client or the fake server gets stuck.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("test timed out")
}

async fn connect(server: &FakeQmp) -> (Qmp, QmpEvents) {
    Qmp::connect(&server.path).await.expect("QMP handshake")
}

async fn next_event(events: &mut QmpEvents) -> QmpEvent {
    events
        .recv()
        .await
        .expect("an event before the channel ends")
}

/// The client sent exactly `commands`, each matching the fixture.
fn assert_saw(t: &Transcript, commands: &[&str]) {
    assert!(t.mismatches.is_empty(), "mismatches: {:#?}", t.mismatches);
    assert_eq!(t.commands(), commands, "received: {:#?}", t.received);
}

/// A command qemu does not have.
#[derive(serde::Serialize)]
struct NoSuchCommand {}

impl qapi::Command for NoSuchCommand {
    type Ok = qapi::Empty;
    const NAME: &'static str = "no-such-command";
    const ALLOW_OOB: bool = false;
}

/// `query-status` with an argument it does not take.
#[derive(serde::Serialize)]
struct QueryStatusBogus {
    bogus: i32,
}

impl qapi::Command for QueryStatusBogus {
    type Ok = qmp::StatusInfo;
    const NAME: &'static str = "query-status";
    const ALLOW_OOB: bool = false;
}

#[tokio::test]
async fn handshake() {
    within(async {
        let server = FakeQmp::start("handshake");
        let (qmp, _events) = connect(&server).await;
        assert_eq!(qmp.version(), "7.2.22");
        drop(qmp);
        let t = server.finish().await;
        assert_saw(&t, &["qmp_capabilities"]);
        let first = t.received[0].as_object().expect("an object");
        assert!(first["id"].is_u64(), "{first:?}");
        assert!(!first.contains_key("arguments"), "{first:?}");
    })
    .await
}

#[tokio::test]
async fn query_status_then_cont() {
    within(async {
        let server = FakeQmp::start("query-status");
        let (qmp, mut events) = connect(&server).await;

        let status = qmp.execute(&qmp::query_status {}).await.unwrap();
        assert_eq!(status.status, RunState::prelaunch);
        assert!(!status.running);

        qmp.execute(&qmp::cont {}).await.unwrap();
        let ev = next_event(&mut events).await;
        assert_eq!(ev.name, "RESUME");
        assert!(matches!(ev.typed, Some(Event::RESUME { .. })), "{ev:?}");

        let status = qmp.execute(&qmp::query_status {}).await.unwrap();
        assert_eq!(status.status, RunState::running);
        assert!(status.running);

        drop(qmp);
        let t = server.finish().await;
        assert_saw(
            &t,
            &["qmp_capabilities", "query-status", "cont", "query-status"],
        );
        assert!(events.try_recv().is_err(), "no further events");
    })
    .await
}

#[tokio::test]
async fn stop_then_cont() {
    within(async {
        let server = FakeQmp::start("stop-cont");
        let (qmp, mut events) = connect(&server).await;

        qmp.execute(&qmp::stop {}).await.unwrap();
        let stop = next_event(&mut events).await;
        assert_eq!(stop.name, "STOP");
        assert!(matches!(stop.typed, Some(Event::STOP { .. })), "{stop:?}");
        assert_eq!(stop.timestamp, Some((1795958966, 239484)));

        let status = qmp.execute(&qmp::query_status {}).await.unwrap();
        assert_eq!(status.status, RunState::paused);
        assert!(!status.running);

        qmp.execute(&qmp::cont {}).await.unwrap();
        let resume = next_event(&mut events).await;
        assert_eq!(resume.name, "RESUME");
        assert!(
            matches!(resume.typed, Some(Event::RESUME { .. })),
            "{resume:?}"
        );
        assert_eq!(resume.timestamp, Some((1795958966, 239909)));

        drop(qmp);
        let t = server.finish().await;
        assert_saw(&t, &["qmp_capabilities", "stop", "query-status", "cont"]);
    })
    .await
}

#[tokio::test]
async fn system_powerdown_then_guest_shutdown() {
    within(async {
        let server = FakeQmp::start("powerdown");
        let (qmp, mut events) = connect(&server).await;

        qmp.execute(&qmp::system_powerdown {}).await.unwrap();
        let powerdown = next_event(&mut events).await;
        assert_eq!(powerdown.name, "POWERDOWN");
        assert!(matches!(powerdown.typed, Some(Event::POWERDOWN { .. })));
        assert_eq!(powerdown.shutdown_reason(), None);

        let shutdown = next_event(&mut events).await;
        assert_eq!(
            shutdown.shutdown_reason(),
            Some((true, "guest-shutdown".to_string()))
        );
        match &shutdown.typed {
            Some(Event::SHUTDOWN { data, .. }) => {
                assert!(data.guest);
                assert_eq!(data.reason, ShutdownCause::guest_shutdown);
            }
            other => panic!("expected a typed SHUTDOWN, got {other:?}"),
        }
        // QEMU exited: the socket closed and so does the event channel.
        assert!(events.recv().await.is_none());

        let t = server.finish().await;
        assert_saw(&t, &["qmp_capabilities", "system_powerdown"]);
    })
    .await
}

#[tokio::test]
async fn quit_then_disconnected() {
    within(async {
        let server = FakeQmp::start("quit");
        let (qmp, mut events) = connect(&server).await;

        qmp.execute(&qmp::quit {}).await.unwrap();
        let shutdown = next_event(&mut events).await;
        assert_eq!(
            shutdown.shutdown_reason(),
            Some((false, "host-qmp-quit".to_string()))
        );
        assert!(
            events.recv().await.is_none(),
            "channel ends with the socket"
        );

        let err = qmp.execute(&qmp::query_status {}).await.unwrap_err();
        assert!(
            matches!(err, QmpError::Disconnected | QmpError::Io(_)),
            "{err:?}"
        );

        let t = server.finish().await;
        assert_saw(&t, &["qmp_capabilities", "quit"]);
    })
    .await
}

#[tokio::test]
async fn command_errors() {
    within(async {
        let server = FakeQmp::start("error");
        let (qmp, _events) = connect(&server).await;

        match qmp.execute(&NoSuchCommand {}).await {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "no-such-command");
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command no-such-command has not been found");
            }
            other => panic!("expected CommandNotFound, got {other:?}"),
        }
        match qmp.execute(&QueryStatusBogus { bogus: 1 }).await {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "query-status");
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "Parameter 'bogus' is unexpected");
            }
            other => panic!("expected GenericError, got {other:?}"),
        }

        drop(qmp);
        let t = server.finish().await;
        assert_saw(&t, &["qmp_capabilities", "no-such-command", "query-status"]);
        assert_eq!(t.received[2]["arguments"], serde_json::json!({"bogus": 1}));
    })
    .await
}

#[tokio::test]
async fn unknown_event_is_kept_and_connection_survives() {
    within(async {
        let recorded = load_fixture("unknown-event")
            .into_iter()
            .find(|l| l.msg["event"] == "X_SQLITE_SIM_FUTURE_EVENT")
            .expect("the fixture has the synthetic event")
            .msg;
        let server = FakeQmp::start("unknown-event");
        let (qmp, mut events) = connect(&server).await;

        // The event arrives between this command and its reply.
        let status = qmp.execute(&qmp::query_status {}).await.unwrap();
        assert_eq!(status.status, RunState::prelaunch);

        let ev = next_event(&mut events).await;
        assert_eq!(ev.name, "X_SQLITE_SIM_FUTURE_EVENT");
        assert!(ev.typed.is_none(), "{ev:?}");
        assert_eq!(ev.raw, recorded);
        assert_eq!(ev.data["reason"], "forward-compatibility test");
        assert_eq!(ev.data["count"], 1);
        assert_eq!(ev.timestamp, Some((1795958973, 887911)));

        drop(qmp);
        let t = server.finish().await;
        assert_saw(&t, &["qmp_capabilities", "query-status"]);
    })
    .await
}

#[tokio::test]
async fn server_closing_mid_command_gives_disconnected() {
    within(async {
        // The query-status fixture up to (and including) the client's `query-status`, then close.
        let lines: Vec<_> = load_fixture("query-status").into_iter().take(4).collect();
        assert_eq!(lines[3].msg["execute"], "query-status");
        let server = FakeQmp::replay(lines, AtEnd::Close);
        let (qmp, mut events) = connect(&server).await;

        let err = qmp.execute(&qmp::query_status {}).await.unwrap_err();
        assert!(matches!(err, QmpError::Disconnected), "{err:?}");
        assert!(events.recv().await.is_none());

        let t = server.finish().await;
        assert_saw(&t, &["qmp_capabilities", "query-status"]);
    })
    .await
}

/// Once the read side has ended, a new command fails at once instead of waiting out the reply
/// timeout, even when its write still succeeds (here the server only shut down its sending half).
#[tokio::test]
async fn command_after_eof_gives_disconnected_promptly() {
    within(async {
        let server = FakeQmp::replay(load_fixture("handshake"), AtEnd::HalfClose);
        let (qmp, mut events) = connect(&server).await;
        assert!(events.recv().await.is_none());

        let started = std::time::Instant::now();
        let err = qmp.execute(&qmp::query_status {}).await.unwrap_err();
        assert!(matches!(err, QmpError::Disconnected), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );

        drop(qmp);
        let t = server.finish().await;
        assert_saw(&t, &["qmp_capabilities"]);
    })
    .await
}

/// The fake server itself: a client that strays from the fixture is reported.
#[tokio::test]
async fn fake_server_reports_mismatches() {
    within(async {
        // The fixture expects `query-status` next; send `stop` instead. The server records the
        // mismatch and still replays the recorded reply, so the client does not hang.
        let lines: Vec<_> = load_fixture("query-status").into_iter().take(5).collect();
        let server = FakeQmp::replay(lines, AtEnd::WaitForClient);
        let (qmp, _events) = connect(&server).await;
        qmp.execute(&qmp::stop {}).await.unwrap();
        drop(qmp);
        let t = server.finish().await;
        assert_eq!(t.commands(), ["qmp_capabilities", "stop"]);
        assert_eq!(t.mismatches.len(), 1, "{:#?}", t.mismatches);
        assert!(t.mismatches[0].contains("\"stop\""), "{:?}", t.mismatches);
    })
    .await
}

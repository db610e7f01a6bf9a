//! Following a request live (SSE) and reading exact bytes, against the real tiny guest.

mod common;

use base64::Engine;
use common::sse::follow;
use common::{require_image, vm_slot, Options, Server};
use std::time::Duration;

const TICKS: &str = "for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.5; done";

#[tokio::test]
async fn sse_streams_output_live_and_resumes_without_gaps() {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(Options::default()).await;
    let id = s.submit("tiny", TICKS, 60).await;
    let stream = format!("/requests/{id}/logs/stream");

    // First connection: stop right after "tick 2" arrives, while the command still runs.
    let first = follow(&s, &stream, None, |e| {
        e.event == "log" && e.data["output"].as_str().unwrap_or("").contains("tick 2")
    })
    .await;
    let status_now = s.get(&id).await["status"].clone();
    assert_eq!(
        status_now, "running",
        "output arrived while the command ran"
    );
    assert!(
        first.iter().any(|e| e.event == "status"),
        "status events too"
    );
    let last = first.iter().rev().find_map(|e| e.id).unwrap();

    // Second connection resumes after the last id seen and runs to the end.
    let second = follow(&s, &stream, Some(last), |e| e.event == "end").await;
    let end = second.last().unwrap();
    assert_eq!(end.event, "end");
    assert_eq!(end.data["status"], "done");
    assert_eq!(end.data["exit_code"], 0);

    let streamed: Vec<i64> = first
        .iter()
        .chain(second.iter())
        .filter_map(|e| e.id)
        .collect();
    let stored: Vec<i64> = s
        .logs_of(&id)
        .await
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(streamed, stored, "every entry exactly once, in order");
    let stdout: String = first
        .iter()
        .chain(second.iter())
        .filter(|e| e.event == "log" && e.data["log_type"] == "stdout")
        .map(|e| e.data["output"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        stdout,
        (1..=6).map(|i| format!("tick {i}\n")).collect::<String>()
    );

    // A finished request's stream replays everything and ends at once.
    let replay = follow(&s, &stream, None, |e| e.event == "end").await;
    assert_eq!(
        replay.iter().filter_map(|e| e.id).collect::<Vec<_>>(),
        stored
    );
}

#[tokio::test]
async fn raw_logs_are_the_exact_bytes() {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(Options::default()).await;
    let id = s
        .submit(
            "tiny",
            r"printf 'a\377\376b\n'; printf '\000x'; printf 'err\001' >&2",
            60,
        )
        .await;
    let r = s.wait_terminal(&id, Duration::from_secs(120)).await;
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(s.raw(&id, Some("stdout")).await, b"a\xff\xfeb\n\x00x");
    assert_eq!(s.raw(&id, Some("stderr")).await, b"err\x01");
    let default = s.raw(&id, None).await;
    assert_eq!(&default[..], b"a\xff\xfeb\n\x00x", "stdout is the default");
    // The JSON view carries invalid UTF-8 exactly in output_base64.
    let logs = s.logs_of(&id).await;
    let bytes: Vec<u8> = logs
        .iter()
        .filter(|e| e["log_type"] == "stdout")
        .flat_map(|e| match e["output_base64"].as_str() {
            Some(b) => base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
            None => e["output"].as_str().unwrap().as_bytes().to_vec(),
        })
        .collect();
    assert_eq!(bytes, b"a\xff\xfeb\n\x00x");
}

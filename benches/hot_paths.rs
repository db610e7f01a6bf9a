//! Micro-benchmarks of the hot paths, run by `cargo bench --bench hot_paths` (and by
//! `scripts/bench.sh`). Each prints one JSON line per figure: median, min and max over runs.
//!
//! - marker scanning: the console parser over command output;
//! - log append: the batching sink into SQLite;
//! - synthetic console ingest (figure 4a): a unix socket standing in for QEMU's chardev, at full
//!   speed, through the real console pump, parser and sink into SQLite, checked byte-exact;
//! - follow latency (figure 5): a byte handed to the sink until an SSE client of the real API
//!   sees it;
//! - SSE fan-out: the same with 50 followers at once.

use sha2::{Digest, Sha256};
use sqlite_sim::api::{router, AppState};
use sqlite_sim::config::Settings;
use sqlite_sim::model::{LogType, NewRequest, RequestId};
use sqlite_sim::qemu::console::protocol::ConsoleParser;
use sqlite_sim::qemu::console::Console;
use sqlite_sim::store::sink::LogSink;
use sqlite_sim::store::{LogQuery, Store};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const TOKEN: &str = "0123456789abcdef";

fn stats(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

#[allow(clippy::too_many_arguments)]
fn report(
    figure: &str,
    name: &str,
    unit: &str,
    xs: Vec<f64>,
    target: &str,
    ok: Option<bool>,
    note: &str,
) {
    let runs = xs.len();
    let (median, min, max) = stats(xs);
    println!(
        "{}",
        serde_json::json!({
            "figure": figure, "name": name, "unit": unit, "median": median, "min": min,
            "max": max, "runs": runs, "target": target, "ok": ok, "note": note,
        })
    );
}

/// Command output with lines of varying length and some bytes that look like marker starts.
fn payload(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 64);
    let mut i = 0u64;
    while out.len() < bytes {
        out.extend_from_slice(
            format!("line {i} SQSIM_ {}\n", "x".repeat((i % 61) as usize)).as_bytes(),
        );
        i += 1;
    }
    out.truncate(bytes);
    out
}

fn prompt_regex() -> regex::Regex {
    regex::Regex::new(r"(?:root@tiny:[^#]*# )$").unwrap()
}

fn session_prefix() -> Vec<u8> {
    format!("root@tiny:~# SQSIM_{TOKEN}_GO\n").into_bytes()
}

fn marker_scanning(runs: usize) {
    let data = payload(64 << 20);
    let mut xs = Vec::new();
    for _ in 0..runs {
        let mut p = ConsoleParser::new(TOKEN, prompt_regex());
        p.feed(b"root@tiny:~# ");
        p.feed(format!("SQSIM_{TOKEN}_GO\n").as_bytes());
        let t = Instant::now();
        let mut n = 0;
        for chunk in data.chunks(64 * 1024) {
            n += p
                .feed(chunk)
                .logs
                .iter()
                .map(|(_, b)| b.len())
                .sum::<usize>();
        }
        let secs = t.elapsed().as_secs_f64();
        assert!(n + 64 >= data.len());
        xs.push(data.len() as f64 / secs / 1e6);
    }
    report(
        "micro",
        "console parser (marker scanning), 64 KiB reads",
        "MB/s",
        xs,
        "",
        None,
        "",
    );
}

async fn new_store(dir: &std::path::Path) -> (Store, RequestId) {
    let store = Store::open(dir.join("b.db")).await.unwrap();
    let req = store
        .create(NewRequest {
            vm_name: "tiny".into(),
            commands: "bench".into(),
            timeout: 60,
            ..Default::default()
        })
        .await
        .unwrap();
    (store, req.uuid)
}

async fn stored_stdout(store: &Store, id: RequestId) -> Vec<u8> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let q = LogQuery {
            log_type: Some(LogType::Stdout),
            after: Some(after),
            limit: Some(1024),
            attempt: None,
        };
        let rows = store.logs(id, q).await.unwrap();
        if rows.is_empty() {
            return out;
        }
        after = rows.last().unwrap().id;
        for r in rows {
            out.extend(r.output);
        }
    }
}

async fn log_append(runs: usize) {
    let data = payload(128 << 20);
    let mut xs = Vec::new();
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let (store, id) = new_store(dir.path()).await;
        let (sink, task) = LogSink::start(store.clone(), id);
        let t = Instant::now();
        for chunk in data.chunks(16 * 1024) {
            sink.write(LogType::Stdout, chunk.to_vec()).await;
        }
        drop(sink);
        let st = task.close().await;
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(st.bytes as usize, data.len());
        xs.push(data.len() as f64 / secs / 1e6);
    }
    report(
        "micro",
        "log sink into SQLite (16 KiB chunks, batched)",
        "MB/s",
        xs,
        "",
        None,
        "",
    );
}

/// Figure 4a: a fake chardev socket at full speed through pump, parser and sink into SQLite.
async fn socket_ingest(runs: usize, mb: usize) {
    let data = payload(mb << 20);
    let want = Sha256::digest(&data);
    let mut xs = Vec::new();
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let (store, id) = new_store(dir.path()).await;
        let sock = dir.path().join("console.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let producer_data = data.clone();
        let producer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&session_prefix()).await.unwrap();
            s.write_all(&producer_data).await.unwrap();
            s.write_all(format!("SQSIM_{TOKEN}:0;").as_bytes())
                .await
                .unwrap();
            s.shutdown().await.unwrap();
        });
        let (sink, task) = LogSink::start(store.clone(), id);
        let t = Instant::now();
        let (r, w) = sqlite_sim::qemu::console::connect_socket(&sock)
            .await
            .unwrap();
        let console = Console::start(
            r,
            w,
            ConsoleParser::new(TOKEN, prompt_regex()),
            Vec::new(),
            None,
            sink,
        );
        producer.await.unwrap();
        console.drain(Duration::from_secs(60)).await;
        task.close().await;
        let secs = t.elapsed().as_secs_f64();
        let got = stored_stdout(&store, id).await;
        assert_eq!(Sha256::digest(&got), want, "byte-exact");
        xs.push(data.len() as f64 / secs / 1e6);
    }
    let ok = stats(xs.clone()).0 >= 100.0;
    report(
        "4a",
        &format!("console ingest, synthetic socket -> SQLite ({mb} MiB, byte-exact)"),
        "MB/s",
        xs,
        ">= 100",
        Some(ok),
        "unix socket -> console pump -> parser -> batching sink -> SQLite (WAL), SHA-256 checked",
    );
}

/// Starts the real API on a free port over `store`; returns its base URL.
async fn api(store: Store) -> String {
    let settings = Settings::from_lookup(|_| None).unwrap();
    let state = AppState::new(
        Arc::new(settings),
        store,
        Arc::new(tokio::sync::Notify::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    format!("http://{addr}")
}

/// Follows `id` over SSE and returns, per stdout entry, the delay from the nanosecond stamp in
/// its text to its arrival.
async fn follower(url: String, lines: usize, ready: tokio::sync::mpsc::Sender<()>) -> Vec<f64> {
    use futures_util::StreamExt;
    let resp = reqwest::Client::new().get(url).send().await.unwrap();
    let _ = ready.send(()).await;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut delays = Vec::new();
    while delays.len() < lines {
        let Some(Ok(chunk)) = body.next().await else {
            break;
        };
        let now = now_nanos();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if !block.contains("event: log") {
                continue;
            }
            // A batch may carry several lines, each with its own stamp.
            for (pos, _) in block.match_indices("stamp=") {
                let digits: String = block[pos + 6..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                if let Ok(sent) = digits.parse::<u128>() {
                    delays.push((now - sent) as f64 / 1e6);
                }
            }
        }
    }
    delays
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Figures 5 and fan-out: lines handed to the sink every 20 ms, timed to SSE arrival.
async fn follow_latency(followers: usize, lines: usize) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let (store, id) = new_store(dir.path()).await;
    let base = api(store.clone()).await;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(followers);
    let mut tasks = Vec::new();
    for _ in 0..followers {
        let url = format!("{base}/requests/{id}/logs/stream");
        tasks.push(tokio::spawn(follower(url, lines, ready_tx.clone())));
    }
    for _ in 0..followers {
        ready_rx.recv().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (sink, task) = LogSink::start(store.clone(), id);
    for _ in 0..lines {
        sink.write(
            LogType::Stdout,
            format!("stamp={}\n", now_nanos()).into_bytes(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut all = Vec::new();
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(30), t).await {
            Ok(d) => all.extend(d.unwrap()),
            Err(_) => panic!(
                "a follower got only part of the lines ({} from others)",
                all.len()
            ),
        }
    }
    drop(sink);
    task.close().await;
    all
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; a quick mode for CI-like smoke runs.
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var("BENCH_QUICK").is_ok();
    let runs = if quick { 1 } else { 5 };
    marker_scanning(runs);
    log_append(runs).await;
    socket_ingest(runs, if quick { 16 } else { 256 }).await;
    let delays = follow_latency(1, if quick { 50 } else { 250 }).await;
    let ok = stats(delays.clone()).0 <= 50.0;
    report(
        "5",
        "follow latency, sink -> SSE client",
        "ms",
        delays,
        "p50 <= 50",
        Some(ok),
        "median is the p50 over all lines; min/max over lines",
    );
    let fan = follow_latency(50, if quick { 20 } else { 100 }).await;
    report(
        "micro",
        "SSE fan-out: latency with 50 followers",
        "ms",
        fan,
        "",
        None,
        "over all lines of all followers",
    );
}

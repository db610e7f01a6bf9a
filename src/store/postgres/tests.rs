//! Promises only the PostgreSQL engine makes, on a real server (skipped unless
//! `SQLITE_SIM_TEST_DATABASE_URL` names a cluster): claims across many handles, fencing of an
//! agent whose lease ran out, wake-ups across handles by `LISTEN/NOTIFY`, and surviving a
//! server restart (its own private cluster, so other tests are not disturbed).

use crate::model::{AgentId, LogType, NewRequest, RequestId, Status};
use crate::store::sink::LogSink;
use crate::store::test_support::{pending_request, temp_store};
use crate::store::{Finish, LogQuery, Store};
use std::time::{Duration, Instant};

fn on_pg() -> bool {
    super::test_support::admin_url().is_some()
}

fn new() -> NewRequest {
    NewRequest {
        vm_name: "t".into(),
        commands: "x".into(),
        timeout: 9,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_handles_and_tasks_claim_each_request_once() {
    if !on_pg() {
        return;
    }
    let (s, d) = temp_store().await;
    const HANDLES: usize = 4;
    const TASKS: usize = 4;
    const CLAIMS: usize = 10;
    for _ in 0..HANDLES * TASKS * CLAIMS {
        s.create(new()).await.unwrap();
    }
    let mut tasks = Vec::new();
    for h in 0..HANDLES {
        let store = d.reopen().await;
        for t in 0..TASKS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let agent = AgentId(format!("h{h}:t{t}"));
                let mut got = Vec::new();
                for _ in 0..CLAIMS {
                    let r = store.claim(&agent, Duration::from_secs(30)).await.unwrap();
                    got.push(r.expect("enough for everyone").uuid);
                }
                got
            }));
        }
    }
    let mut all: Vec<RequestId> = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(n, HANDLES * TASKS * CLAIMS);
    assert_eq!(all.len(), n, "a request was claimed twice");
    assert!(s
        .claim(&AgentId("late".into()), Duration::from_secs(1))
        .await
        .unwrap()
        .is_none());
}

/// Concurrent submissions are inserted in batches (group commit: rows of one batch share a
/// transaction), each answered with its own row; a row the server refuses (text with a NUL
/// byte, which PostgreSQL cannot store) fails only its own request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_are_batched_and_a_bad_row_fails_alone() {
    if !on_pg() {
        return;
    }
    let (s, d) = temp_store().await;
    const N: usize = 200;
    let mut tasks = Vec::new();
    for i in 0..N {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = new();
            n.commands = if i == N / 2 {
                "bad\0row".into()
            } else {
                format!("echo {i}")
            };
            (i, s.create(n).await)
        }));
    }
    let mut made = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        if i == N / 2 {
            assert!(r.is_err(), "a NUL byte cannot be stored: {r:?}");
            continue;
        }
        let r = r.unwrap();
        assert_eq!(
            r.commands,
            format!("echo {i}"),
            "each answered with its own row"
        );
        assert_eq!(r.status, Status::Pending);
        assert_eq!(s.get(r.uuid).await.unwrap().unwrap().commands, r.commands);
        made.push(r.uuid);
    }
    let c = d.pg_client().await.unwrap();
    let rows: i64 = c
        .query_one("SELECT COUNT(*) FROM requests", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows as usize,
        N - 1,
        "every good row once, the bad one not at all"
    );
    let transactions: i64 = c
        .query_one("SELECT COUNT(DISTINCT xmin::text) FROM requests", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        (transactions as usize) < N / 2,
        "{N} concurrent creates took {transactions} transactions: not batched, or a refused \
         batch was split row by row"
    );
}

/// An agent paused past its lease wakes up to find its request recovered and claimed by
/// another agent: none of its writes land.
#[tokio::test]
async fn an_agent_that_lost_its_lease_is_fenced_off() {
    if !on_pg() {
        return;
    }
    let (s, _d) = temp_store().await;
    let (paused, other) = (AgentId("paused".into()), AgentId("other".into()));
    let r = s.create(new()).await.unwrap();
    s.claim(&paused, Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        s.reap_expired().await.unwrap(),
        vec![(r.uuid, Status::Pending)]
    );
    let again = s
        .claim(&other, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.uuid, r.uuid);
    // The paused agent wakes up.
    assert!(!s.mark_running(r.uuid, &paused).await.unwrap());
    assert!(!s
        .heartbeat(r.uuid, &paused, Duration::from_secs(30))
        .await
        .unwrap());
    assert!(!s
        .apply_desired(r.uuid, &paused, Status::Hold)
        .await
        .unwrap());
    let lost = Finish {
        status: Status::Failed,
        error: Some("stale".into()),
        ..Default::default()
    };
    assert!(!s.finish(r.uuid, &paused, lost).await.unwrap());
    let now = s.get(r.uuid).await.unwrap().unwrap();
    assert_eq!(
        (now.status, now.agent_id.as_deref()),
        (Status::Acknowledged, Some("other"))
    );
    // The new owner goes on.
    assert!(s.mark_running(r.uuid, &other).await.unwrap());
    let done = Finish {
        status: Status::Done,
        exit_code: Some(0),
        ..Default::default()
    };
    assert!(s.finish(r.uuid, &other, done).await.unwrap());
    // A request whose VM ran ends failed when its agent is lost; the agent cannot revive it.
    let r = s.create(new()).await.unwrap();
    s.claim(&paused, Duration::from_millis(1)).await.unwrap();
    s.mark_running(r.uuid, &paused).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.reap_expired().await.unwrap();
    let fin = Finish {
        status: Status::Done,
        exit_code: Some(0),
        ..Default::default()
    };
    assert!(!s.finish(r.uuid, &paused, fin).await.unwrap());
    let x = s.get(r.uuid).await.unwrap().unwrap();
    assert_eq!(
        (x.status, x.error.as_deref()),
        (Status::Failed, Some("agent lost"))
    );
}

/// Waits until `rx` changes; how long it took.
async fn woken(rx: &mut tokio::sync::watch::Receiver<u64>, within: Duration) -> Duration {
    let start = Instant::now();
    tokio::time::timeout(within, rx.changed())
        .await
        .expect("no wake-up in time")
        .unwrap();
    start.elapsed()
}

#[tokio::test]
async fn a_write_through_one_handle_wakes_another_at_once() {
    if !on_pg() {
        return;
    }
    let (a, d) = temp_store().await;
    let b = d.reopen().await;
    let mut rx = b.subscribe();
    // The listener's first connection bumps once; start from a quiet receiver.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.borrow_and_update();
    let r = a.create(new()).await.unwrap();
    let took = woken(&mut rx, Duration::from_secs(2)).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    rx.borrow_and_update();
    a.control(r.uuid, Status::Hold).await.unwrap();
    woken(&mut rx, Duration::from_secs(2)).await;
}

/// The data directory of this test process's private cluster: fresh, never one another run
/// (or another branch's newer schema) left behind at the same port.
fn cluster_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sqlite-sim-pg-restart-{}", std::process::id()))
}

/// `scripts/postgres.sh` on a private cluster of this test's own.
fn cluster(cmd: &str, port: u16) -> String {
    let out = std::process::Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh"),
    )
    .arg(cmd)
    .env("SQLITE_SIM_TEST_PG_PORT", port.to_string())
    .env("SQLITE_SIM_TEST_PG_DIR", cluster_dir())
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "postgres.sh {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Cluster(u16);

impl Drop for Cluster {
    fn drop(&mut self) {
        cluster("stop", self.0);
        let _ = std::fs::remove_dir_all(cluster_dir());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_is_survived_and_loses_no_log_bytes() {
    if !on_pg() {
        return;
    }
    let port = 55400 + (std::process::id() % 20) as u16;
    let url = tokio::task::spawn_blocking(move || cluster("start", port))
        .await
        .unwrap();
    let _guard = Cluster(port);
    let s = Store::open_postgres(super::parse_url(&url).unwrap())
        .await
        .unwrap();
    let other = Store::open_postgres(super::parse_url(&url).unwrap())
        .await
        .unwrap();
    let r = pending_request(&s).await;
    let (sink, task) = LogSink::start(s.clone(), r.uuid);
    sink.write(LogType::Stdout, b"before\n".to_vec()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    tokio::task::spawn_blocking(move || cluster("stop", port))
        .await
        .unwrap();
    // Buffered while the server is down; its flush retries.
    sink.write(LogType::Stdout, b"during\n".to_vec()).await;
    let read = tokio::spawn({
        let s = s.clone();
        async move { s.get(r.uuid).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::spawn_blocking(move || cluster("start", port))
        .await
        .unwrap();
    let got = read
        .await
        .unwrap()
        .expect("a read retried through the outage");
    assert_eq!(got.unwrap().uuid, r.uuid);
    sink.write(LogType::Stdout, b"after\n".to_vec()).await;
    drop(sink);
    let stats = task.close().await;
    assert_eq!(stats.lost_bytes, 0, "{:?}", stats.last_error);
    let out: Vec<u8> = s
        .logs(r.uuid, LogQuery::default())
        .await
        .unwrap()
        .into_iter()
        .flat_map(|e| e.output)
        .collect();
    assert_eq!(out, b"before\nduring\nafter\n", "every byte once");
    // Writes go on, and the other handle's listener reconnected.
    let mut rx = other.subscribe();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    rx.borrow_and_update();
    let agent = AgentId("a".into());
    assert!(s
        .claim(&agent, Duration::from_secs(9))
        .await
        .unwrap()
        .is_some());
    woken(&mut rx, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn only_connection_errors_are_retried() {
    // No server needed: a refused connection is retried, a bad URL is not.
    let bad = super::parse_url("postgres://u@h:notaport/db").unwrap_err();
    assert!(!bad.is_unavailable(), "{bad}");
    let refused = Store::open_postgres(
        super::parse_url("postgres://u@/db?host=/nonexistent-sqlite-sim-dir&port=1").unwrap(),
    )
    .await
    .err()
    .expect("nothing listens there");
    assert!(refused.is_unavailable(), "{refused}");
    let mut attempt = super::Attempt::new("t");
    let start = Instant::now();
    assert!(attempt.again(bad).await.is_err());
    assert!(
        start.elapsed() < Duration::from_millis(20),
        "not waited for"
    );
    if !on_pg() {
        return;
    }
    // A value that does not convert is a bug, reported at once.
    let (s, _d) = temp_store().await;
    let pg = s.pg.as_ref().unwrap();
    let c = pg.client().await.unwrap();
    let e: crate::store::StoreError = c
        .query_one("SELECT 'x'::text", &[])
        .await
        .unwrap()
        .try_get::<_, i64>(0)
        .unwrap_err()
        .into();
    assert!(!e.is_unavailable(), "{e}");
}

#[test]
fn urls_in_libpq_forms_parse() {
    use tokio_postgres::config::Host;
    let c = super::parse_url("postgres://sim@db.example:5433/sim").unwrap();
    assert_eq!(c.get_hosts(), [Host::Tcp("db.example".into())]);
    assert_eq!((c.get_ports(), c.get_dbname()), (&[5433][..], Some("sim")));
    let c = super::parse_url("postgresql://sim@/sim?host=/run/postgresql&port=55432").unwrap();
    assert_eq!(c.get_hosts(), [Host::Unix("/run/postgresql".into())]);
    assert_eq!(c.get_ports(), [55432]);
    assert!(
        c.get_connect_timeout().is_some(),
        "a bound on every connect"
    );
    // A session left idle inside a transaction is ended by the server; the URL's own options
    // come after ours, so they can override it.
    let ours = "-c idle_in_transaction_session_timeout=10s";
    assert_eq!(c.get_options(), Some(ours));
    let c = super::parse_url("postgres://sim@h/sim?options=-c%20statement_timeout%3D5s").unwrap();
    assert_eq!(
        c.get_options(),
        Some(format!("{ours} -c statement_timeout=5s").as_str())
    );
}

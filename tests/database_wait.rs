//! Start-up against a PostgreSQL that is not there yet (`SQLITE_SIM_DATABASE_WAIT`): the
//! server retries with back-off, logging each failure without the URL's password, and serves
//! once the cluster is up; what retrying cannot cure (a database that does not exist) and an
//! exhausted wait fail at once with a clear message. Each test has a private cluster of its
//! own (`scripts/postgres.sh`, its own directory and socket), started and stopped by the test.
//! Runs in `scripts/test.sh`'s PostgreSQL phase (skipped without `SQLITE_SIM_TEST_DATABASE_URL`).

mod common;

use common::{repo, Options, Server};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A password the logs must never show (trust authentication accepts any).
const PASSWORD: &str = "s3cret-Pw-9";

/// A private cluster: initialised, not started until asked; stopped and removed on drop.
struct Cluster {
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    fn init(port: u16) -> Cluster {
        let c = Cluster {
            dir: PathBuf::from(format!("/tmp/sqs-pgwait-{}-{port}", std::process::id())),
            port,
        };
        c.script("init");
        c
    }

    fn script(&self, what: &str) {
        pg_script(&self.dir, self.port, what);
    }

    /// The URL of database `db`, with a password in it.
    fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@/{db}?host={}&port={}",
            self.dir.join("sock").display(),
            self.port
        )
    }
}

fn pg_script(dir: &Path, port: u16, what: &str) {
    let out = Command::new(repo().join("scripts/postgres.sh"))
        .arg(what)
        .env("SQLITE_SIM_TEST_PG_PORT", port.to_string())
        .env("SQLITE_SIM_TEST_PG_DIR", dir)
        .env_remove("SQLITE_SIM_TEST_PG_LISTEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "postgres.sh {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Cluster {
    fn drop(&mut self) {
        pg_script(&self.dir, self.port, "stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

macro_rules! require_pg_phase {
    () => {
        if std::env::var("SQLITE_SIM_TEST_DATABASE_URL").map_or(true, |u| u.is_empty()) {
            eprintln!("skipped: runs in scripts/test.sh's PostgreSQL phase");
            return;
        }
    };
}

/// `sqlite-sim api` on `url` with `wait` seconds to wait, run to its end: (success, stderr,
/// how long it took).
fn api_exit(url: &str, wait: &str) -> (bool, String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sqlite-sim"))
        .arg("api")
        .current_dir(dir.path())
        .env("SQLITE_SIM_DATABASE_URL", url)
        .env("SQLITE_SIM_DATABASE_WAIT", wait)
        .env("SQLITE_SIM_API_PORT", "0")
        .env("SQLITE_SIM_RUN_DIR", dir.path().join("run"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = start.elapsed();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), text, took)
}

#[tokio::test]
async fn a_server_started_before_postgres_waits_for_it_and_serves() {
    require_pg_phase!();
    let pg = Cluster::init(55481);
    // The cluster comes up a few seconds after the server started.
    let starter = {
        let (dir, port) = (pg.dir.clone(), pg.port);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            pg_script(&dir, port, "start");
        })
    };
    let s = Server::start(Options {
        mode: common::Mode::Api,
        env: vec![
            ("SQLITE_SIM_DATABASE_URL".into(), pg.url("postgres")),
            ("SQLITE_SIM_DATABASE_WAIT".into(), "60".into()),
        ],
        ..Default::default()
    })
    .await;
    starter.join().unwrap();
    let (code, v) = s
        .submit_json(&json!({"vm_name": "tiny", "commands": "true", "timeout": 30}))
        .await;
    assert_eq!(code, 201, "{v}");
    let id = v["uuid"].as_str().unwrap();
    assert_eq!(s.get(id).await["status"], "pending");
    let log = s.logs();
    assert!(
        log.contains("PostgreSQL cannot be reached yet; retrying") && log.contains("attempt=2"),
        "each failed attempt is logged\n{log}"
    );
    assert!(!log.contains(PASSWORD), "the password was logged\n{log}");
}

#[tokio::test]
async fn what_waiting_cannot_cure_fails_at_once_and_a_spent_wait_says_so() {
    require_pg_phase!();
    let pg = Cluster::init(55482);
    // Nothing listens: with no wait, one attempt and a clear error.
    let (ok, err, took) = api_exit(&pg.url("postgres"), "0");
    assert!(
        !ok && err.contains("still unreachable after 1 attempts"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!err.contains(PASSWORD), "the password was printed\n{err}");
    // Up, but no such database: not worth waiting for, even with a minute to wait.
    pg.script("start");
    let (ok, err, took) = api_exit(&pg.url("no_such_db"), "60");
    assert!(
        !ok && err.contains("no_such_db") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("retrying"), "{err}");
    assert!(took < Duration::from_secs(10), "failed at once: {took:?}");
    assert!(!err.contains(PASSWORD), "the password was printed\n{err}");
}

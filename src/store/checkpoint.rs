//! WAL checkpoints on a thread of their own, off the group-commit writer's path.
//!
//! SQLite's automatic checkpoint runs inside the `COMMIT` that pushes the WAL past its
//! threshold: the committing connection copies the WAL's pages back into the database and
//! syncs both, while every write queued behind it waits. Under a steady stream of submissions
//! that connection is the writer thread, the one serial part of the write path. Here a
//! thread with its own connection runs a `PASSIVE` checkpoint (it never blocks writers or
//! readers) whenever commits happened since its last one, at most every [`EVERY`]; this
//! process's connections keep automatic checkpoints only as a backstop at [`BACKSTOP_PAGES`],
//! so the WAL stays bounded even if this thread falls behind. Other processes on the same
//! database keep SQLite's default and checkpoint as before.

use super::{Inner, StoreError};
use rusqlite::Connection;
use std::sync::Weak;
use std::time::Duration;

/// Most time between a commit and the checkpoint that copies it back.
const EVERY: Duration = Duration::from_millis(50);

/// WAL pages past which a committing connection of this process checkpoints after all
/// (SQLite's default is 1,000): about 40 MB of WAL at 4 KiB pages.
pub(super) const BACKSTOP_PAGES: u32 = 10_000;

/// Starts the thread on `conn`; it ends with the store (`alive`). It checkpoints only after
/// commits, of any connection of any process, as `PRAGMA data_version` tells.
pub(super) fn start(conn: Connection, alive: Weak<Inner>) -> Result<(), StoreError> {
    let version = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row("PRAGMA data_version", [], |r| r.get(0))
    };
    std::thread::Builder::new()
        .name("store-checkpoint".into())
        .spawn(move || {
            // None: the first pass always checkpoints, so commits made before this thread first
            // looked (it may start late on a busy host) are not missed.
            let mut seen = None;
            loop {
                std::thread::sleep(EVERY);
                if alive.strong_count() == 0 {
                    return;
                }
                let now = version(&conn).ok();
                if now.is_some() && now == seen {
                    continue;
                }
                seen = now;
                // PASSIVE copies what no reader still needs and waits for no one.
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                }
            }
        })
        .map_err(|e| StoreError::Task(format!("starting the checkpoint thread: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::store::test_support::pending_request;
    use crate::store::Store;
    use std::time::{Duration, Instant};

    /// Rows committed by the writer reach the database file itself soon after, with no further
    /// commit to trigger an automatic checkpoint (a handful of rows is far below any
    /// threshold): read from a copy of the file alone, without its WAL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_are_copied_back_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = Store::open(&path).await.unwrap();
        for _ in 0..5 {
            pending_request(&store).await;
        }
        let copy = dir.path().join("copy.db");
        let start = Instant::now();
        let rows = loop {
            std::fs::copy(&path, &copy).unwrap();
            let n: i64 = rusqlite::Connection::open(&copy)
                .unwrap()
                .query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
                .unwrap_or(0);
            if n == 5 || start.elapsed() > Duration::from_secs(5) {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            rows,
            5,
            "the WAL was not checkpointed into {}",
            path.display()
        );
    }
}

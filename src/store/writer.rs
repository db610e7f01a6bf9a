//! Group commit on SQLite: one thread owns a write connection and commits, in one transaction,
//! every small write that is queued when it gets to them.
//!
//! Submitters ([`Writer::submit`]) put an operation on a bounded queue and await its answer on
//! a oneshot channel; no blocking-pool thread is woken per write. The thread takes the first
//! operation, drains whatever else is queued (at most [`BATCH`]), and runs them all between one
//! `BEGIN IMMEDIATE` and one `COMMIT`: one lock acquisition and one WAL sync point for the lot,
//! where one transaction per write paid both every time.
//!
//! Each operation runs inside a savepoint of its own, so a failing one is rolled back alone
//! and answered with its error while the others commit. An operation of exactly one
//! statement ([`Writer::submit_statement`]) needs none: SQLite undoes a failed statement by
//! itself, and a savepoint costs a copy of every page the operation is the first to touch
//! (the sub-journal), a tenth of the thread's time when every submission is one `INSERT`.
//! An error that makes SQLite roll back the whole transaction (a full disk, an I/O error)
//! ends the batch either way. Answers are sent only after `COMMIT` returned: an operation
//! answered `Ok` is committed, with the durability the connection is configured for (WAL,
//! `synchronous = NORMAL`, as every other connection of the store). When
//! the `COMMIT` itself fails (a full disk, an I/O error) every operation of the batch gets that
//! error, and nothing of it is kept.
//!
//! The thread takes the store's write turn for each batch, so it and the store's other writers
//! of this process take turns as before; other processes are arbitrated by SQLite's lock.

use super::StoreError;
use rusqlite::Connection;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Most operations one transaction commits, so that a deep queue cannot hold the write lock
/// (and keep other processes' writers waiting) for long.
const BATCH: usize = 256;
/// Operations queued for the writer before submitters wait for room.
const QUEUE: usize = 1024;

/// Errors of the writer itself (an operation's own errors are [`StoreError`]s).
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("starting the store's writer thread: {0}")]
    Spawn(std::io::Error),
    #[error("the store's writer thread has stopped")]
    Stopped,
    #[error("the write operation panicked")]
    Panicked,
}

/// One queued write, typed away so that operations of any result type share the queue.
trait Op: Send {
    /// Whether it needs a savepoint of its own (more than one statement).
    fn savepoint(&self) -> bool;
    /// Runs the operation in the open transaction; what to answer once the commit is known.
    fn run(self: Box<Self>, c: &Connection) -> Box<dyn Ran>;
    /// Answers without running: the transaction could not be started or was given up.
    fn fail(self: Box<Self>, e: &rusqlite::Error);
}

/// An operation that ran, waiting for the outcome of the commit.
trait Ran: Send {
    /// `Ok`: committed; the operation's own result is answered. `Err`: nothing was kept.
    fn finish(self: Box<Self>, commit: Result<(), &rusqlite::Error>);
    /// Whether the operation failed (and was rolled back to its savepoint).
    fn failed(&self) -> bool;
}

struct Job<F, R> {
    f: F,
    savepoint: bool,
    answer: oneshot::Sender<Result<R, StoreError>>,
}

struct Done<R> {
    result: Result<R, StoreError>,
    answer: oneshot::Sender<Result<R, StoreError>>,
}

impl<F, R> Op for Job<F, R>
where
    F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    R: Send + 'static,
{
    fn savepoint(&self) -> bool {
        self.savepoint
    }

    fn run(self: Box<Self>, c: &Connection) -> Box<dyn Ran> {
        let Job { f, answer, .. } = *self;
        let result = catch_unwind(AssertUnwindSafe(|| f(c)))
            .unwrap_or_else(|_| Err(StoreError::Writer(WriterError::Panicked)));
        Box::new(Done { result, answer })
    }

    fn fail(self: Box<Self>, e: &rusqlite::Error) {
        let _ = self.answer.send(Err(duplicate(e)));
    }
}

impl<R: Send> Ran for Done<R> {
    fn finish(self: Box<Self>, commit: Result<(), &rusqlite::Error>) {
        let result = match commit {
            Ok(()) => self.result,
            // Also an operation that had failed gets the commit's error: neither was kept.
            Err(e) => Err(duplicate(e)),
        };
        let _ = self.answer.send(result);
    }

    fn failed(&self) -> bool {
        self.result.is_err()
    }
}

/// A copy of an SQLite error that keeps its code, so that callers still tell a full disk or a
/// busy database from the rest ([`StoreError::is_full`], [`StoreError::is_unavailable`]).
fn duplicate(e: &rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, msg) => {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(*f, msg.clone()))
        }
        other => StoreError::Task(format!("group commit: {other}")),
    }
}

/// The handle on the writer thread; the thread ends when the last handle is dropped.
pub(super) struct Writer {
    queue: mpsc::Sender<Box<dyn Op>>,
}

impl Writer {
    /// Starts the thread on `conn`, taking `turn` around each batch.
    pub(super) fn start(conn: Connection, turn: Arc<Mutex<()>>) -> Result<Writer, WriterError> {
        let (queue, mut ops) = mpsc::channel::<Box<dyn Op>>(QUEUE);
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(BATCH);
                while let Some(first) = ops.blocking_recv() {
                    batch.push(first);
                    while batch.len() < BATCH {
                        match ops.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    let _turn = turn.lock().unwrap_or_else(|p| p.into_inner());
                    commit(&conn, batch.drain(..));
                }
            })
            .map_err(WriterError::Spawn)?;
        Ok(Writer { queue })
    }

    /// Runs `f` in the writer's next transaction; its result once that transaction committed.
    pub(super) async fn submit<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        self.queue_job(f, true).await
    }

    /// [`Writer::submit`] for an `f` that runs exactly one statement (and nothing else that
    /// can fail after it): no savepoint, since a statement that fails leaves nothing.
    pub(super) async fn submit_statement<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        self.queue_job(f, false).await
    }

    async fn queue_job<R, F>(&self, f: F, savepoint: bool) -> Result<R, StoreError>
    where
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Box::new(Job {
                f,
                savepoint,
                answer,
            }))
            .await
            .map_err(|_| WriterError::Stopped)?;
        // A dropped answer: the operation panicked, or the thread is gone.
        answered.await.unwrap_or(Err(WriterError::Panicked.into()))
    }
}

/// Runs one statement that takes no parameters, from the connection's statement cache.
fn exec(c: &Connection, sql: &str) -> rusqlite::Result<()> {
    c.prepare_cached(sql)?.execute([]).map(drop)
}

/// One transaction: every operation in a savepoint of its own (if it needs one), one `COMMIT`,
/// then the answers.
fn commit(c: &Connection, mut ops: impl Iterator<Item = Box<dyn Op>>) {
    if let Err(e) = exec(c, "BEGIN IMMEDIATE") {
        ops.for_each(|op| op.fail(&e));
        return;
    }
    let mut ran: Vec<Box<dyn Ran>> = Vec::new();
    let mut broken = None;
    for op in ops.by_ref() {
        let own = op.savepoint();
        if own {
            if let Err(e) = exec(c, "SAVEPOINT op") {
                op.fail(&e);
                broken = Some(e);
                break;
            }
        }
        let done = op.run(c);
        let closed = if !own {
            // Some errors (a full disk, I/O) roll the whole transaction back: what follows
            // would run, and commit, on its own, while this batch is answered as failed.
            if done.failed() && c.is_autocommit() {
                Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                    Some("the transaction was rolled back by a failed write".into()),
                ))
            } else {
                Ok(())
            }
        } else if done.failed() {
            exec(c, "ROLLBACK TO op").and_then(|()| exec(c, "RELEASE op"))
        } else {
            exec(c, "RELEASE op")
        };
        ran.push(done);
        if let Err(e) = closed {
            broken = Some(e);
            break;
        }
    }
    let outcome = match broken {
        None => exec(c, "COMMIT"),
        Some(e) => Err(e),
    };
    match outcome {
        Ok(()) => ran.into_iter().for_each(|r| r.finish(Ok(()))),
        Err(e) => {
            // The transaction may still be open (a COMMIT that failed, a savepoint that would
            // not close): nothing of it is kept.
            if !c.is_autocommit() {
                let _ = c.execute_batch("ROLLBACK");
            }
            tracing::warn!(error = %e, operations = ran.len(), "group commit failed");
            ran.into_iter().for_each(|r| r.finish(Err(&e)));
            ops.for_each(|op| op.fail(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{Store, StoreError};
    use std::time::Duration;

    fn insert(c: &rusqlite::Connection, uuid: &str) -> Result<(), StoreError> {
        c.execute(
            "INSERT INTO requests (uuid, vm_name, commands, timeout, status, created_at, updated_at)
             VALUES (?1, 't', 'x', 1, 'pending', '2026-01-01T00:00:00.000000Z',
                     '2026-01-01T00:00:00.000000Z')",
            [uuid],
        )?;
        Ok(())
    }

    /// A one-statement write that fails with a full disk takes SQLite's whole transaction with
    /// it: the batch ends there, every write of it is answered with an error and none is kept
    /// (without the check, the third would commit on its own while answered as failed).
    #[test]
    fn a_statement_that_rolls_the_transaction_back_ends_the_batch() {
        use super::{commit, Job, Op};
        let dir = tempfile::tempdir().unwrap();
        let c = rusqlite::Connection::open(dir.path().join("f.db")).unwrap();
        c.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x)")
            .unwrap();
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        c.pragma_update(None, "max_page_count", pages + 2).unwrap();
        let mut answers = Vec::new();
        let mut job = |sql: &'static str| -> Box<dyn Op> {
            let (answer, answered) = tokio::sync::oneshot::channel();
            answers.push(answered);
            Box::new(Job {
                f: move |c: &rusqlite::Connection| -> Result<(), StoreError> {
                    c.execute(sql, [])?;
                    Ok(())
                },
                savepoint: false,
                answer,
            })
        };
        let ops = vec![
            job("INSERT INTO t VALUES ('a')"),
            job("INSERT INTO t VALUES (randomblob(1000000))"),
            job("INSERT INTO t VALUES ('c')"),
        ];
        commit(&c, ops.into_iter());
        for (i, mut a) in answers.into_iter().enumerate() {
            assert!(a.try_recv().unwrap().is_err(), "write {i} answered Ok");
        }
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "a write of the failed batch was kept");
    }

    /// One statement inserting `uuid` and then a duplicate key: it fails as a whole.
    fn insert_two(c: &rusqlite::Connection, uuid: &str) -> Result<(), StoreError> {
        c.execute(
            "INSERT INTO requests (uuid, vm_name, commands, timeout, status, created_at, updated_at)
             VALUES (?1, 't', 'x', 1, 'pending', '2026-01-01T00:00:00.000000Z',
                     '2026-01-01T00:00:00.000000Z'),
                    ('taken', 't', 'x', 1, 'pending', '2026-01-01T00:00:00.000000Z',
                     '2026-01-01T00:00:00.000000Z')",
            [uuid],
        )?;
        Ok(())
    }

    /// Every fourth write inserts its row and then fails (a duplicate key): it is answered
    /// with its own error and leaves nothing, while the others of its batch commit. So does
    /// every fourth but one, a single statement without a savepoint whose second row fails. The write
    /// turn is held while they queue, so that they meet in one batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_leaves_the_rest_of_its_batch_committed() {
        for group_commit in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open_sqlite(&dir.path().join("t.db"), group_commit)
                .await
                .unwrap();
            s.call_batched(|c| insert(c, "taken")).await.unwrap();
            let turn = s.inner.write_turn.clone();
            let (held, holding) = std::sync::mpsc::channel();
            let holder = std::thread::spawn(move || {
                let _turn = turn.lock().unwrap();
                held.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(200));
            });
            holding.recv().unwrap();
            let tasks: Vec<_> = (0..40)
                .map(|i| {
                    let s = s.clone();
                    tokio::spawn(async move {
                        let id = format!("r{i}");
                        match i % 4 {
                            1 => s
                                .call_batched_statement(move |c| insert_two(c, &id))
                                .await
                                .map(|()| i),
                            _ => {
                                s.call_batched(move |c| {
                                    insert(c, &id)?;
                                    if i % 4 == 0 {
                                        insert(c, "taken")?;
                                    }
                                    Ok(i)
                                })
                                .await
                            }
                        }
                    })
                })
                .collect();
            for (i, t) in tasks.into_iter().enumerate() {
                match t.await.unwrap() {
                    Ok(n) => assert!(n == i && i % 4 > 1, "write {i} answered Ok({n})"),
                    Err(e) => assert!(
                        i % 4 <= 1 && e.to_string().contains("UNIQUE constraint failed"),
                        "write {i}: {e}"
                    ),
                }
            }
            holder.join().unwrap();
            let kept: Vec<String> = s
                .call(|c| {
                    let mut st = c.prepare("SELECT uuid FROM requests WHERE uuid LIKE 'r%'")?;
                    let rows = st.query_map([], |r| r.get(0))?;
                    Ok(rows.collect::<rusqlite::Result<_>>()?)
                })
                .await
                .unwrap();
            let mut want: Vec<String> = (0..40)
                .filter(|i| i % 4 > 1)
                .map(|i| format!("r{i}"))
                .collect();
            let mut kept = kept;
            kept.sort();
            want.sort();
            assert_eq!(kept, want, "group commit {group_commit}");
        }
    }
}

//! Group commit of new requests on PostgreSQL, the twin of SQLite's writer thread
//! (`store/writer.rs`): concurrent `create`s without uploads are queued, and a few tasks insert
//! whatever is queued with one statement (`INSERT … SELECT FROM UNNEST` of one array per
//! column, with its `NOTIFY`), committed on its own. Where one statement per request paid a
//! parse, a plan, a commit and a notification each, a batch pays them once.
//!
//! Each row's id is chosen before it is queued, so a batch whose answer was lost (the
//! connection dropped after the statement was sent) is re-checked by id: rows that landed are
//! answered from the table, the others are sent again. A batch the server refuses for a reason
//! other than an outage is split in halves until the refused rows stand alone, so one bad row
//! fails only its own request and the good rows around it still share a few transactions.

use super::requests::{from_row, COLUMNS};
use super::{Attempt, CHANNEL};
use crate::model::Request;
use crate::store::StoreError;
use deadpool_postgres::Pool;
use std::sync::{Arc, LazyLock};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_postgres::types::{ToSql, Type};

/// Most rows one statement inserts.
const BATCH: usize = 256;
/// Rows queued before submitters wait for room.
const QUEUE: usize = 1024;
/// Tasks inserting batches: while one waits for the server, the next batch gathers and goes.
const INSERTERS: usize = 2;

/// A new request's row, as the insert binds it.
pub(super) struct NewRow {
    pub uuid: String,
    pub vm_name: String,
    pub commands: String,
    pub timeout: i64,
    pub created_at: String,
    pub boot: Option<String>,
    pub globs: Option<String>,
    pub requires: Option<String>,
    pub keep: Option<i64>,
    pub submitted_by: Option<String>,
    pub priority: i32,
    pub callback_url: Option<String>,
    /// Where its final state is POSTed (a JSON array), decided at submission.
    pub webhook_urls: Option<String>,
    pub retries: i64,
}

struct Job {
    row: NewRow,
    answer: oneshot::Sender<Result<Request, StoreError>>,
}

/// The queue of new rows; the inserting tasks end when it is dropped.
pub(super) struct Batcher {
    queue: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the inserting tasks on `pool`; `changes` is bumped after every batch.
    pub(super) fn start(pool: Pool, changes: watch::Sender<u64>) -> Batcher {
        let (queue, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..INSERTERS {
            let (pool, changes, rx) = (pool.clone(), changes.clone(), rx.clone());
            tokio::spawn(async move {
                let mut jobs = Vec::with_capacity(BATCH);
                loop {
                    // One task gathers at a time; it lets go of the queue before inserting.
                    if rx.lock().await.recv_many(&mut jobs, BATCH).await == 0 {
                        return;
                    }
                    insert(&pool, std::mem::take(&mut jobs)).await;
                    changes.send_modify(|v| *v = v.wrapping_add(1));
                }
            });
        }
        Batcher { queue }
    }

    /// Inserts `row` with the next batch; the request as stored.
    pub(super) async fn create(&self, row: NewRow) -> Result<Request, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Job { row, answer })
            .await
            .map_err(|_| StoreError::Task("the request inserter has stopped".into()))?;
        answered
            .await
            .unwrap_or_else(|_| Err(StoreError::Task("the request inserter has stopped".into())))
    }
}

/// Inserts `jobs` and answers each: retried through outages, split when the server refuses.
async fn insert(pool: &Pool, mut jobs: Vec<Job>) {
    let mut attempt = Attempt::new("create");
    let mut ambiguous = false;
    loop {
        let r = async {
            let c = pool.get().await?;
            if ambiguous {
                answer_landed(&c, &mut jobs).await?;
                if jobs.is_empty() {
                    return Ok(());
                }
            }
            ambiguous = true;
            let cols = Columns::of(&jobs);
            // Prepared once per connection: planning this statement (its CTE and the turn
            // subqueries) took about 2 ms, more than inserting a small batch.
            let insert = c.prepare_typed_cached(&INSERT, &Columns::TYPES).await?;
            let rows = c.query(&insert, &cols.params()).await?;
            answer_rows(&mut jobs, &rows);
            Ok::<_, StoreError>(())
        }
        .await;
        let e = match r {
            // A row the statement did not return (it cannot happen) is answered by the drop.
            Ok(()) => return,
            Err(e) => e,
        };
        match attempt.again(e).await {
            Ok(()) => {}
            Err(e) if jobs.len() > 1 && !e.is_unavailable() => {
                // A refusal (a value the server rejects): halve the batch until the refused
                // row stands alone, rather than pay a transaction for every good row.
                let rest = jobs.split_off(jobs.len() / 2);
                Box::pin(insert(pool, jobs)).await;
                Box::pin(insert(pool, rest)).await;
                return;
            }
            Err(e) => {
                let why = e.to_string();
                let mut jobs = jobs.into_iter();
                if let Some(first) = jobs.next() {
                    let _ = first.answer.send(Err(e));
                }
                for job in jobs {
                    let _ = job.answer.send(Err(StoreError::Task(why.clone())));
                }
                return;
            }
        }
    }
}

/// One statement for any number of rows: one array per column, unnested into rows.
static INSERT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH x AS (
             SELECT x.*, ROW_NUMBER() OVER (PARTITION BY p, COALESCE(s, '') ORDER BY o) AS nth
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::int8[], $10::text[],
                         $11::int4[], $12::text[], $13::text[], $14::int8[])
                  WITH ORDINALITY AS x(u, v, c, t, n, b, g, r, k, s, p, cb, w, rt, o)),
         new AS (
             INSERT INTO requests (uuid, vm_name, commands, timeout, status, created_at,
                                   updated_at, boot, artifact_globs, requires,
                                   keep_on_failure, submitted_by, priority, callback_url,
                                   webhook_urls, retries, queue_tag)
             SELECT u, v, c, t, 'pending', n, n, b, g, r, k, s, p, cb, w, rt, {} + nth
             FROM x ORDER BY o
             RETURNING {COLUMNS})
         SELECT new.*, pg_notify('{CHANNEL}', 'work')::text FROM new",
        // The turns are read before the statement's rows exist: a submitter's rows within one
        // batch take the turns after its base one by one (`nth`), as separate inserts would.
        super::queue::turn_base("x.p", "x.s")
    )
});

/// The column arrays of [`INSERT`].
struct Columns {
    uuid: Vec<String>,
    vm_name: Vec<String>,
    commands: Vec<String>,
    timeout: Vec<i64>,
    created_at: Vec<String>,
    boot: Vec<Option<String>>,
    globs: Vec<Option<String>>,
    requires: Vec<Option<String>>,
    keep: Vec<Option<i64>>,
    submitted_by: Vec<Option<String>>,
    priority: Vec<i32>,
    callback_url: Vec<Option<String>>,
    webhook_urls: Vec<Option<String>>,
    retries: Vec<i64>,
}

impl Columns {
    fn of(jobs: &[Job]) -> Columns {
        fn col<T: Clone>(jobs: &[Job], f: impl Fn(&NewRow) -> &T) -> Vec<T> {
            jobs.iter().map(|j| f(&j.row).clone()).collect()
        }
        Columns {
            uuid: col(jobs, |r| &r.uuid),
            vm_name: col(jobs, |r| &r.vm_name),
            commands: col(jobs, |r| &r.commands),
            timeout: col(jobs, |r| &r.timeout),
            created_at: col(jobs, |r| &r.created_at),
            boot: col(jobs, |r| &r.boot),
            globs: col(jobs, |r| &r.globs),
            requires: col(jobs, |r| &r.requires),
            keep: col(jobs, |r| &r.keep),
            submitted_by: col(jobs, |r| &r.submitted_by),
            priority: col(jobs, |r| &r.priority),
            callback_url: col(jobs, |r| &r.callback_url),
            webhook_urls: col(jobs, |r| &r.webhook_urls),
            retries: col(jobs, |r| &r.retries),
        }
    }

    /// The parameters' types, in [`Columns::params`]' order.
    const TYPES: [Type; 14] = [
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::INT8_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::INT8_ARRAY,
        Type::TEXT_ARRAY,
        Type::INT4_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::INT8_ARRAY,
    ];

    /// The parameters of [`INSERT`], typed as [`Columns::TYPES`] says.
    fn params(&self) -> [&(dyn ToSql + Sync); 14] {
        [
            &self.uuid,
            &self.vm_name,
            &self.commands,
            &self.timeout,
            &self.created_at,
            &self.boot,
            &self.globs,
            &self.requires,
            &self.keep,
            &self.submitted_by,
            &self.priority,
            &self.callback_url,
            &self.webhook_urls,
            &self.retries,
        ]
    }
}

/// Answers the jobs whose rows are among `rows`, removing them from `jobs`.
fn answer_rows(jobs: &mut Vec<Job>, rows: &[tokio_postgres::Row]) {
    for row in rows {
        let req = from_row(row);
        let uuid = row.try_get::<_, String>(0).ok();
        if let Some(i) = jobs.iter().position(|j| Some(&j.row.uuid) == uuid.as_ref()) {
            let _ = jobs.swap_remove(i).answer.send(req);
        }
    }
}

/// After a lost answer: the rows that landed, answered from the table.
async fn answer_landed(c: &tokio_postgres::Client, jobs: &mut Vec<Job>) -> Result<(), StoreError> {
    let ids: Vec<String> = jobs.iter().map(|j| j.row.uuid.clone()).collect();
    let rows = c
        .query_typed(
            &format!("SELECT {COLUMNS} FROM requests WHERE uuid = ANY($1)"),
            &[(&ids, Type::TEXT_ARRAY)],
        )
        .await?;
    answer_rows(jobs, &rows);
    Ok(())
}

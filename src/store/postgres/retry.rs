//! Re-queues of infrastructure failures on PostgreSQL: the SQL of `store/retry.rs`, whose
//! decision ([`requeue`](crate::store::retry::requeue)) both engines share.

use crate::store::retry::{AttemptRow, Requeue, ATTEMPT_COLUMNS, CLEARED};
use crate::store::StoreError;

/// A stored attempt count as a `u32`.
fn count(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|e| StoreError::Corrupt(format!("{what} {v}: {e}")))
}

/// The row's retry state, locked (`FOR UPDATE`), where `cond` (SQL over `$1`, `$2`…) holds.
pub(super) async fn attempt_row(
    tx: &tokio_postgres::Transaction<'_>,
    cond: &str,
    args: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<AttemptRow>, StoreError> {
    let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM requests WHERE {cond} FOR UPDATE");
    let Some(r) = tx.query_opt(&sql, args).await? else {
        return Ok(None);
    };
    Ok(Some(AttemptRow {
        status: r.try_get(0)?,
        desired: r.try_get(1)?,
        attempt: count(r.try_get(2)?, "attempt")?,
        retries: count(r.try_get(3)?, "retries")?,
        attempts: r.try_get(4)?,
        agent: r.try_get(5)?,
        host: r.try_get(6)?,
        started_at: r.try_get(7)?,
        kept: r.try_get::<_, Option<String>>(8)?.is_some(),
    }))
}

/// Writes a re-queue as `store/retry.rs` does: the row back to `pending` (or `hold`) as the
/// next attempt, its keystrokes dropped, the line in the failed attempt's log.
pub(super) async fn requeue_in(
    tx: &tokio_postgres::Transaction<'_>,
    uuid: &str,
    q: &Requeue,
    now: &str,
) -> Result<(), StoreError> {
    let sql = format!(
        "UPDATE requests SET status = $1, attempt = $2, attempts = $3, updated_at = $4, {CLEARED}
         WHERE uuid = $5"
    );
    tx.execute(
        &sql,
        &[
            &q.status.as_str(),
            &i64::from(q.attempt),
            &q.attempts,
            &now,
            &uuid,
        ],
    )
    .await?;
    tx.execute(
        "DELETE FROM console_input WHERE request_uuid = $1",
        &[&uuid],
    )
    .await?;
    super::logs::system_line_in(tx, uuid, q.failed, now, &q.line).await
}

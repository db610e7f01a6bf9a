//! Priorities and fair queueing on PostgreSQL: the SQL of `store/queue.rs` (whose doc says
//! how turns make the claim order), with `row_id` for SQLite's `rowid` and `GREATEST` for
//! its `MAX`. The claim stays one `SELECT … ORDER BY {CLAIM_ORDER} LIMIT 1 FOR UPDATE SKIP
//! LOCKED`: the order is an index order, with no window function (which `FOR UPDATE` refuses).

use crate::model::{Request, Status};
use crate::store::StoreError;
use std::collections::HashMap;
use tokio_postgres::GenericClient;

/// How claims order pending requests (and how queue positions count).
pub(super) const CLAIM_ORDER: &str = "priority DESC, queue_tag, created_at, row_id";

/// The latest turn a new request at priority `p` by submitter `s` (SQL expressions) comes
/// after: its turn is this plus one, plus the requests of the same submitter and level ahead
/// of it in the same batch. `GREATEST` skips `NULL`s; the `COALESCE`s say what each missing
/// term counts as, as on SQLite.
pub(super) fn turn_base(p: &str, s: &str) -> String {
    format!(
        "GREATEST(
        COALESCE((SELECT MAX(queue_tag) FROM requests
                  WHERE priority = {p} AND host_id IS NOT NULL AND requires IS NULL), 0),
        COALESCE((SELECT MIN(queue_tag) FROM requests
                  WHERE status = 'pending' AND priority = {p}), 1) - 1,
        COALESCE((SELECT MAX(queue_tag) FROM requests
                  WHERE status = 'pending' AND priority = {p}
                    AND COALESCE(submitted_by, '') = COALESCE({s}, '')), 0))"
    )
}

/// A pending request's place in the claim order, the request row being `r`; `NULL` when it
/// is not pending.
pub(super) const POSITION: &str = "CASE WHEN r.status = 'pending' THEN 1
        + (SELECT COUNT(*) FROM requests o WHERE o.status = 'pending' AND o.priority > r.priority)
        + (SELECT COUNT(*) FROM requests o WHERE o.status = 'pending' AND o.priority = r.priority
             AND (o.queue_tag, o.created_at, o.row_id) < (r.queue_tag, r.created_at, r.row_id))
        END";

/// Fills `queue_position` of the pending requests among `reqs`: one statement, counting for
/// a few, one pass over the queue in claim order for many.
pub(super) async fn fill_positions(
    c: &impl GenericClient,
    reqs: &mut [Request],
) -> Result<(), StoreError> {
    let pending: Vec<String> = reqs
        .iter()
        .filter(|r| r.status == Status::Pending)
        .map(|r| r.uuid.to_string())
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let sql = if pending.len() <= 4 {
        format!("SELECT r.uuid, {POSITION} FROM requests r WHERE r.uuid = ANY($1)")
    } else {
        format!(
            "SELECT uuid, pos FROM (
                 SELECT uuid, ROW_NUMBER() OVER (ORDER BY {CLAIM_ORDER}) AS pos
                 FROM requests WHERE status = 'pending') q
             WHERE uuid = ANY($1)"
        )
    };
    let found: HashMap<String, u64> = c
        .query(&sql, &[&pending])
        .await?
        .iter()
        .filter_map(|row| {
            let pos: Option<i64> = row.get(1);
            pos.map(|p| (row.get(0), p as u64))
        })
        .collect();
    for r in reqs.iter_mut().filter(|r| r.status == Status::Pending) {
        r.queue_position = found.get(&r.uuid.to_string()).copied();
    }
    Ok(())
}

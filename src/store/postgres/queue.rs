//! Priorities and fair queueing on PostgreSQL: the SQL of `store/queue.rs` (whose doc says
//! how turns make the claim order), with `row_id` for SQLite's `rowid` and `GREATEST` for
//! its `MAX`. The claim stays one `SELECT … ORDER BY {CLAIM_ORDER} LIMIT 1 FOR UPDATE SKIP
//! LOCKED`: the order is an index order, with no window function (which `FOR UPDATE` refuses).

use super::Pg;
use crate::model::Request;
use crate::store::queue::{ClaimKey, Place, EXACT};
use crate::store::StoreError;
use std::sync::LazyLock;
use tokio_postgres::GenericClient;

/// How claims order pending requests (and how queue positions count).
pub(super) const CLAIM_ORDER: &str = "priority DESC, queue_tag, created_at, row_id";

/// The latest turn a new request at priority `p` by submitter `s` (SQL expressions) comes
/// after: its turn is this plus one, plus the requests of the same submitter and level ahead
/// of it in the same batch. `GREATEST` skips `NULL`s; the `COALESCE`s say what each missing
/// term counts as, as on SQLite.
///
/// Each term is an `ORDER BY … LIMIT 1` in its index's own order rather than a `MIN`/`MAX`:
/// on a table that grew faster than autovacuum analysed it, the planner served the head's
/// `MIN` from `requests_lane` (whose rows are not in turn order at one level) and read every
/// pending request of the level for each new row. An order the index gives leaves it no such
/// choice.
pub(super) fn turn_base(p: &str, s: &str) -> String {
    format!(
        "GREATEST(
        COALESCE((SELECT queue_tag FROM requests
                  WHERE priority = {p} AND host_id IS NOT NULL AND requires IS NULL
                  ORDER BY queue_tag DESC LIMIT 1), 0),
        COALESCE((SELECT queue_tag FROM requests
                  WHERE status = 'pending' AND priority = {p}
                  ORDER BY status, priority DESC, queue_tag LIMIT 1), 1) - 1,
        COALESCE((SELECT queue_tag FROM requests
                  WHERE status = 'pending' AND priority = {p}
                    AND COALESCE(submitted_by, '') = COALESCE({s}, '')
                  ORDER BY queue_tag DESC LIMIT 1), 0))"
    )
}

/// The extra columns after `COLUMNS` that place a row in the claim order.
pub(super) const KEY_COLUMNS: &str = "queue_tag, row_id";

/// [`AHEAD`](crate::store::queue::AHEAD) of SQLite: the requests ahead of a pending row `r`,
/// each count stopping at `EXACT`. The `ORDER BY` (the index's order) is for the planner:
/// without it, a `LIMIT` over a parameter's range looked cheapest as a sequential scan that
/// stops early, but for a request at the head nothing matches and the scan read the whole
/// table (100 ms a GET at 125,000 rows; 0.3 ms through `requests_queue`).
pub(super) static AHEAD: LazyLock<String> = LazyLock::new(|| {
    let order = CLAIM_ORDER.replace(", ", ", o.");
    format!(
        "CASE WHEN r.status = 'pending' THEN (SELECT COUNT(*) FROM (
            SELECT 1 FROM requests o WHERE o.status = 'pending' AND o.priority > r.priority
            ORDER BY o.status, o.{order} LIMIT {EXACT}) a) END,
        CASE WHEN r.status = 'pending' THEN (SELECT COUNT(*) FROM (
            SELECT 1 FROM requests o WHERE o.status = 'pending' AND o.priority = r.priority
              AND (o.queue_tag, o.created_at, o.row_id) < (r.queue_tag, r.created_at, r.row_id)
            ORDER BY o.status, o.{order} LIMIT {EXACT}) b) END"
    )
});

/// The first `EXACT` pending requests in the claim order.
static HEAD: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT uuid FROM requests WHERE status = 'pending' ORDER BY {CLAIM_ORDER} LIMIT {EXACT}"
    )
});

/// Every pending request's place in the claim order, for a snapshot.
const ALL: &str = "SELECT priority, queue_tag, created_at, row_id FROM requests
     WHERE status = 'pending'";

/// The uuids of the first `EXACT` pending requests in the claim order.
pub(super) async fn head(c: &impl GenericClient) -> Result<Vec<String>, StoreError> {
    let rows = c.query_typed(&HEAD, &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

impl Pg {
    /// Fills in the queue positions of `reqs` from `places` (this engine's half of
    /// `Positions::fill`: the snapshot's query).
    pub(super) async fn fill_positions(
        &self,
        reqs: &mut [Request],
        places: Vec<Place>,
    ) -> Result<(), StoreError> {
        let take = || async {
            retry!(self, "queue positions", |c| {
                let rows = c.query_typed(ALL, &[]).await?;
                rows.iter()
                    .map(|r| {
                        Ok(ClaimKey::new(
                            r.try_get(0)?,
                            r.try_get(1)?,
                            r.try_get(2)?,
                            r.try_get(3)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })
        };
        self.positions.fill(reqs, places, take).await
    }
}

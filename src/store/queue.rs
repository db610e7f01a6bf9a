//! Priorities and fair queueing: the order in which pending requests are claimed, and each
//! one's place in it (`queue_position`).
//!
//! Claims take the highest `priority` first. Within a level they go round-robin between
//! submitters (`submitted_by`; requests without one are one submitter), oldest first within a
//! submitter. That is done with a *turn* (`queue_tag`) given to each request when it is
//! submitted, start-time fair queueing in one integer:
//!
//! `turn = max(served, head - 1, own) + 1`, where, at the request's level, `served` is the
//! latest turn claimed (of requests without labels: those no host skips), `head` the earliest
//! pending turn, and `own` the submitter's latest pending turn (0 for each when there is none).
//!
//! Claims then take `priority DESC, queue_tag, created_at`: a plain index order, so a claim
//! reads the index from its start to the first row the host can run (no sort, no window
//! function), and on PostgreSQL it stays one `SELECT … FOR UPDATE SKIP LOCKED` (a window
//! function could not be combined with `FOR UPDATE`). A queue position is a count over the
//! same index, stopped at [`EXACT`]; past that, a binary search in a [`Snapshot`] of the
//! queue, so that no read costs the length of a long queue.
//!
//! Why a turn given at submission, rather than ranking each submitter's pending requests
//! (`ROW_NUMBER() OVER (PARTITION BY submitter)`) at every claim: the rank forgets what was
//! claimed. Once the flooding submitter's first request is claimed, its second becomes rank 1
//! again and, being older, beats the newcomer's rank 1 — every time, so the newcomer waits for
//! the whole flood. A turn remembers: the newcomer starts at the turn being served (`served`,
//! or the head of the queue), so it goes right after the request being served now, and each
//! further request of a submitter waits one more round. Turns come from pending requests
//! and claimed ones only, so a submitter whose queued requests were cancelled or deleted
//! starts again at the current turn, not behind its own withdrawn flood; and a submitter idle
//! for a while gets no credit for it. Labels make the order per host: a host takes the first
//! request in this order that it can run.

/// How claims order pending requests (and how queue positions count).
pub(super) const CLAIM_ORDER: &str = "priority DESC, queue_tag, created_at, rowid";

/// The turn of a new request at priority `?11` by submitter `?10` (see the module doc).
/// Three index lookups: `requests_served`, `requests_queue`, `requests_lane`.
pub(super) const NEXT_TURN: &str = "MAX(
        COALESCE((SELECT MAX(queue_tag) FROM requests
                  WHERE priority = ?11 AND host_id IS NOT NULL AND requires IS NULL), 0),
        COALESCE((SELECT MIN(queue_tag) FROM requests
                  WHERE status = 'pending' AND priority = ?11), 1) - 1,
        COALESCE((SELECT MAX(queue_tag) FROM requests
                  WHERE status = 'pending' AND priority = ?11
                    AND COALESCE(submitted_by, '') = COALESCE(?10, '')), 0)) + 1";

/// The requests ahead of a pending one, each count stopping at [`EXACT`], as extra columns of a
/// read of the request row `r` (`NULL`s when it is not pending): those at higher levels, then
/// those earlier in its own level. Both index range scans of `requests_queue`, in its order
/// (which keeps PostgreSQL's planner from a sequential scan, see its twin).
pub(super) static AHEAD: LazyLock<String> = LazyLock::new(|| {
    let order = CLAIM_ORDER.replace(", ", ", o.");
    format!(
        "CASE WHEN r.status = 'pending' THEN (SELECT COUNT(*) FROM (
            SELECT 1 FROM requests o WHERE o.status = 'pending' AND o.priority > r.priority
            ORDER BY o.status, o.{order} LIMIT {EXACT})) END,
        CASE WHEN r.status = 'pending' THEN (SELECT COUNT(*) FROM (
            SELECT 1 FROM requests o WHERE o.status = 'pending' AND o.priority = r.priority
              AND (o.queue_tag, o.created_at, o.rowid) < (r.queue_tag, r.created_at, r.rowid)
            ORDER BY o.status, o.{order} LIMIT {EXACT})) END"
    )
});

/// The first [`EXACT`] pending requests in the claim order.
static HEAD: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT uuid FROM requests WHERE status = 'pending' ORDER BY {CLAIM_ORDER} LIMIT {EXACT}"
    )
});

/// Every pending request's place in the claim order, for a [`Snapshot`].
const ALL: &str = "SELECT priority, queue_tag, created_at, rowid FROM requests
     WHERE status = 'pending'";

use super::{Store, StoreError};
use crate::model::{Request, Status};
use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests ahead of a pending one that reads count exactly (the `LIMIT`s of [`AHEAD`] and
/// [`HEAD`], and their PostgreSQL twins): up to this far back a position costs at most this
/// many index entries, and is exact and current. Deeper in a long queue, counting would make
/// every read of a pending request cost its whole position, so deeper positions come from a
/// [`Snapshot`].
pub(super) const EXACT: i64 = 1000;

/// How long one snapshot of the queue serves the positions past [`EXACT`]: the cost of a
/// deep position is then one pass over the queue a second, shared by every read in the
/// process, and such a position may be off by the requests queued or claimed since.
const SNAPSHOT_FOR: Duration = Duration::from_secs(1);

/// Where a pending request sorts in the claim order (`CLAIM_ORDER`'s columns, in its order).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ClaimKey {
    priority: Reverse<i32>,
    turn: i64,
    created_at: String,
    row: i64,
}

impl ClaimKey {
    pub(super) fn new(priority: i32, turn: i64, created_at: String, row: i64) -> ClaimKey {
        ClaimKey {
            priority: Reverse(priority),
            turn,
            created_at,
            row,
        }
    }
}

/// A pending request as a read found it: its place in the claim order and, when fewer than
/// [`EXACT`] are ahead of it, its exact position.
pub(super) struct Place {
    key: ClaimKey,
    exact: Option<u64>,
}

impl Place {
    /// From [`AHEAD`]'s two counts: exact when neither reached its limit.
    pub(super) fn counted(key: ClaimKey, higher: i64, earlier: i64) -> Place {
        let exact = (higher < EXACT && earlier < EXACT).then(|| 1 + (higher + earlier) as u64);
        Place { key, exact }
    }

    /// A request of a list: exact when it is among the head of the queue (`head`: uuid →
    /// position).
    fn listed(key: ClaimKey, uuid: &str, head: &HashMap<&str, u64>) -> Place {
        let exact = head.get(uuid).copied();
        Place { key, exact }
    }
}

/// The whole pending queue's places, sorted, as one pass read them.
struct Snapshot {
    taken: Instant,
    keys: Vec<ClaimKey>,
}

impl Snapshot {
    /// One more than the places ahead of `key`.
    fn position(&self, key: &ClaimKey) -> u64 {
        self.keys.partition_point(|k| k < key) as u64 + 1
    }
}

/// This process's latest [`Snapshot`], shared by both engines' reads.
#[derive(Default)]
pub(super) struct Positions {
    latest: Mutex<Option<Arc<Snapshot>>>,
    /// Held while a snapshot is taken: readers that need one at once wait for one pass
    /// rather than each making its own.
    taking: tokio::sync::Mutex<()>,
}

impl Positions {
    fn fresh(&self) -> Option<Arc<Snapshot>> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest
            .as_ref()
            .filter(|s| s.taken.elapsed() < SNAPSHOT_FOR)
            .cloned()
    }

    /// A snapshot under [`SNAPSHOT_FOR`] old, `take`n (the pending queue's keys, any order)
    /// when there is none.
    async fn snapshot<F>(&self, take: impl FnOnce() -> F) -> Result<Arc<Snapshot>, StoreError>
    where
        F: std::future::Future<Output = Result<Vec<ClaimKey>, StoreError>>,
    {
        if let Some(s) = self.fresh() {
            return Ok(s);
        }
        let _turn = self.taking.lock().await;
        if let Some(s) = self.fresh() {
            return Ok(s);
        }
        let taken = Instant::now();
        let mut keys = take().await?;
        // The engine reads them in claim order already; sorting by the same key here makes
        // the binary search's order Rust's, whatever the database's collation.
        keys.sort_unstable();
        let s = Arc::new(Snapshot { taken, keys });
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
        Ok(s)
    }

    /// Sets the `queue_position` of each pending request of `reqs` from its `places` (in the
    /// same order, one per pending request): its exact count, or else the snapshot.
    pub(super) async fn fill<F>(
        &self,
        reqs: &mut [Request],
        places: Vec<Place>,
        take: impl FnOnce() -> F,
    ) -> Result<(), StoreError>
    where
        F: std::future::Future<Output = Result<Vec<ClaimKey>, StoreError>>,
    {
        let snapshot = if places.iter().any(|p| p.exact.is_none()) {
            Some(self.snapshot(take).await?)
        } else {
            None
        };
        let pending = reqs.iter_mut().filter(|r| r.status == Status::Pending);
        for (r, place) in pending.zip(places) {
            r.queue_position = place
                .exact
                .or_else(|| snapshot.as_ref().map(|s| s.position(&place.key)));
        }
        Ok(())
    }

    /// The places of the pending requests of a list, whose rows came with `(queue_tag, row id)`
    /// in `keys` (one per request): exact for those among the `head` of the queue.
    pub(super) fn listed(reqs: &[Request], keys: &[(i64, i64)], head: &[String]) -> Vec<Place> {
        // A map, not a search of the head per row: a page may hold 1,000 pending requests.
        let head: HashMap<&str, u64> = (head.iter().map(String::as_str)).zip(1..).collect();
        reqs.iter()
            .zip(keys)
            .filter(|(r, _)| r.status == Status::Pending)
            .map(|(r, &(turn, row))| {
                let key = ClaimKey::new(r.priority, turn, r.created_at.clone(), row);
                Place::listed(key, &r.uuid.to_string(), &head)
            })
            .collect()
    }
}

/// The uuids of the first [`EXACT`] pending requests in the claim order.
pub(super) fn head(c: &rusqlite::Connection) -> Result<Vec<String>, StoreError> {
    let mut stmt = c.prepare_cached(&HEAD)?;
    let rows = stmt.query_map([], |row| row.get(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
}

impl Store {
    /// Fills in the queue positions of `reqs` from `places` (SQLite's half of
    /// [`Positions::fill`]: a snapshot is read on the blocking pool).
    pub(super) async fn fill_positions(
        &self,
        reqs: &mut [Request],
        places: Vec<Place>,
    ) -> Result<(), StoreError> {
        let take = || {
            self.call(|c| {
                let mut stmt = c.prepare_cached(ALL)?;
                let rows = stmt.query_map([], |row| {
                    Ok(ClaimKey::new(
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                    ))
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
        };
        self.inner.positions.fill(reqs, places, take).await
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{AgentId, Label, NewRequest, RequestId, Status};
    use crate::store::test_support::temp_store;
    use crate::store::{Capabilities, RequestQuery, Store};
    use std::time::Duration;

    fn new(by: Option<&str>, priority: i32) -> NewRequest {
        NewRequest {
            vm_name: by.unwrap_or("anon").into(),
            commands: "true".into(),
            timeout: 9,
            submitted_by: by.map(str::to_string),
            priority,
            ..Default::default()
        }
    }

    async fn submit(s: &Store, by: Option<&str>, priority: i32) -> RequestId {
        s.create(new(by, priority)).await.unwrap().uuid
    }

    async fn claim(s: &Store) -> Option<RequestId> {
        let agent = AgentId("h:1:0".into());
        s.claim(&agent, Duration::from_secs(30))
            .await
            .unwrap()
            .map(|r| r.uuid)
    }

    /// Positions of the pending requests, as `GET /requests/{id}` and the list show them.
    async fn positions(s: &Store, ids: &[RequestId]) -> Vec<Option<u64>> {
        let mut one = Vec::new();
        for id in ids {
            one.push(s.get(*id).await.unwrap().unwrap().queue_position);
        }
        let (page, _) = s
            .list(RequestQuery {
                statuses: vec![Status::Pending],
                limit: 5000,
                ..Default::default()
            })
            .await
            .unwrap();
        let listed: Vec<Option<u64>> = ids
            .iter()
            .map(|id| {
                page.iter()
                    .find(|r| r.uuid == *id)
                    .and_then(|r| r.queue_position)
            })
            .collect();
        assert_eq!(
            one, listed,
            "a request's position is the same read alone or listed"
        );
        one
    }

    #[tokio::test]
    async fn highest_priority_first_then_round_robin_between_submitters() {
        let (s, _d) = temp_store().await;
        let a1 = submit(&s, Some("a"), 0).await;
        let a2 = submit(&s, Some("a"), 0).await;
        let a3 = submit(&s, Some("a"), 0).await;
        let b1 = submit(&s, Some("b"), 0).await;
        let b2 = submit(&s, Some("b"), 0).await;
        let low = submit(&s, None, -5).await;
        let n1 = submit(&s, None, 0).await;
        let urgent = submit(&s, Some("b"), 10).await;
        let want = [urgent, a1, b1, n1, a2, b2, a3, low];
        let expected: Vec<Option<u64>> = (1..=want.len() as u64).map(Some).collect();
        assert_eq!(positions(&s, &want).await, expected);
        for id in want {
            assert_eq!(claim(&s).await, Some(id));
        }
        assert_eq!(claim(&s).await, None);
    }

    /// The case a per-claim rank gets wrong: a newcomer behind a flood that is being claimed
    /// goes next, and then alternates with the flood.
    #[tokio::test]
    async fn a_newcomer_is_not_starved_by_a_flood_being_claimed() {
        let (s, _d) = temp_store().await;
        let mut flood = Vec::new();
        for _ in 0..10 {
            flood.push(submit(&s, Some("a"), 0).await);
        }
        assert_eq!(claim(&s).await, Some(flood[0]));
        assert_eq!(claim(&s).await, Some(flood[1]));
        let b1 = submit(&s, Some("b"), 0).await;
        let b2 = submit(&s, Some("b"), 0).await;
        assert_eq!(
            positions(&s, &[flood[2], b1, flood[3], b2]).await,
            [Some(1), Some(2), Some(3), Some(4)]
        );
        for id in [flood[2], b1, flood[3], b2, flood[4], flood[5]] {
            assert_eq!(claim(&s).await, Some(id));
        }
    }

    /// Submissions that arrive together (one group commit on either engine) still take one
    /// turn each, so a burst is not one turn that a later submitter must wait behind.
    #[tokio::test]
    async fn a_burst_of_submissions_takes_successive_turns() {
        let (s, _d) = temp_store().await;
        let burst: Vec<_> = (0..6).map(|_| s.create(new(Some("a"), 0))).collect();
        for r in futures_util::future::join_all(burst).await {
            r.unwrap();
        }
        let b1 = submit(&s, Some("b"), 0).await;
        claim(&s).await.unwrap();
        assert_eq!(claim(&s).await, Some(b1), "b waits for one of a's, not six");
    }

    /// A submitter whose queued flood was withdrawn starts again at the current turn.
    #[tokio::test]
    async fn withdrawn_requests_leave_no_debt() {
        let (s, _d) = temp_store().await;
        let mut mine = Vec::new();
        for _ in 0..5 {
            mine.push(submit(&s, Some("a"), 0).await);
        }
        let b1 = submit(&s, Some("b"), 0).await;
        let b2 = submit(&s, Some("b"), 0).await;
        let b3 = submit(&s, Some("b"), 0).await;
        for id in &mine[1..] {
            s.delete(*id).await.unwrap();
        }
        let a_again = submit(&s, Some("a"), 0).await;
        // Its new turn follows its one remaining request (b2 has that turn too, and is older).
        for id in [mine[0], b1, b2, a_again, b3] {
            assert_eq!(claim(&s).await, Some(id));
        }
    }

    #[tokio::test]
    async fn held_requests_are_not_in_the_queue_and_labels_are_kept() {
        let (s, _d) = temp_store().await;
        let big = s
            .create(NewRequest {
                requires: vec!["big".parse::<Label>().unwrap()],
                ..new(Some("a"), 50)
            })
            .await
            .unwrap()
            .uuid;
        let held = submit(&s, Some("a"), 0).await;
        let plain = submit(&s, Some("b"), 0).await;
        s.control(held, Status::Hold).await.unwrap();
        assert_eq!(
            positions(&s, &[big, held, plain]).await,
            [Some(1), None, Some(2)]
        );
        // A host without the label skips the first in the order, not the order itself.
        let small = Capabilities {
            host_id: "h".into(),
            labels: Vec::new(),
        };
        let agent = AgentId("h:1:0".into());
        let got = s.claim_as(&agent, &small, Duration::from_secs(30)).await;
        assert_eq!(got.unwrap().map(|r| r.uuid), Some(plain));
        assert_eq!(claim_big(&s).await, Some(big));
    }

    async fn claim_big(s: &Store) -> Option<RequestId> {
        let caps = Capabilities {
            host_id: "g".into(),
            labels: vec!["big".parse().unwrap()],
        };
        let agent = AgentId("g:1:0".into());
        s.claim_as(&agent, &caps, Duration::from_secs(30))
            .await
            .unwrap()
            .map(|r| r.uuid)
    }

    #[tokio::test]
    async fn priority_is_stored_and_shown() {
        let (s, _d) = temp_store().await;
        let id = submit(&s, None, -100).await;
        let r = s.get(id).await.unwrap().unwrap();
        assert_eq!((r.priority, r.queue_position), (-100, Some(1)));
        claim(&s).await.unwrap();
        let r = s.get(id).await.unwrap().unwrap();
        assert_eq!((r.priority, r.queue_position), (-100, None));
    }

    /// Past [`super::EXACT`] requests ahead, positions come from a snapshot of the queue: the
    /// same positions, read alone or listed, and renewed once the snapshot has aged out.
    #[tokio::test]
    async fn positions_deep_in_a_long_queue_agree_with_the_claim_order() {
        let (s, _d) = temp_store().await;
        let n = super::EXACT as usize + 100;
        let mut flood = Vec::with_capacity(n);
        for _ in 0..n {
            flood.push(submit(&s, Some("a"), 0).await);
        }
        let b = submit(&s, Some("b"), 0).await;
        let urgent = submit(&s, Some("c"), 5).await;
        // urgent, a's first, b (the same turn, later), then the rest of a's.
        let mut want = vec![urgent, flood[0], b];
        want.extend(&flood[1..]);
        let expected: Vec<Option<u64>> = (1..=want.len() as u64).map(Some).collect();
        assert_eq!(positions(&s, &want).await, expected);

        assert_eq!(claim(&s).await, Some(urgent));
        let last = *flood.last().unwrap();
        // Exact near the head at once; deep, once the snapshot that counted `urgent` is gone.
        assert_eq!(
            s.get(flood[1]).await.unwrap().unwrap().queue_position,
            Some(3)
        );
        tokio::time::sleep(super::SNAPSHOT_FOR + Duration::from_millis(50)).await;
        let deep = s.get(last).await.unwrap().unwrap().queue_position;
        assert_eq!(deep, Some(want.len() as u64 - 1));
    }
}

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
//! same index.
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

/// A pending request's place in the claim order, with the request row as `r`; `NULL` when it
/// is not pending. Two counts over `requests_queue`: higher levels, then earlier turns of its
/// own level.
pub(super) const POSITION: &str = "CASE WHEN r.status = 'pending' THEN 1
        + (SELECT COUNT(*) FROM requests o WHERE o.status = 'pending' AND o.priority > r.priority)
        + (SELECT COUNT(*) FROM requests o WHERE o.status = 'pending' AND o.priority = r.priority
             AND (o.queue_tag, o.created_at, o.rowid) < (r.queue_tag, r.created_at, r.rowid))
        END";

use super::StoreError;
use crate::model::{Request, Status};
use std::collections::HashMap;

/// Fills `queue_position` of the pending requests among `reqs`: one count each when there
/// are few, else one pass over the whole queue in claim order.
pub(super) fn fill_positions(
    c: &rusqlite::Connection,
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
    let mut found: HashMap<String, u64> = HashMap::new();
    if pending.len() <= 4 {
        let mut stmt = c.prepare_cached(&format!(
            "SELECT {POSITION} FROM requests r WHERE r.uuid = ?1"
        ))?;
        for id in &pending {
            let pos: Option<Option<i64>> =
                rusqlite::OptionalExtension::optional(stmt.query_row([id], |row| row.get(0)))?;
            if let Some(Some(p)) = pos {
                found.insert(id.clone(), p as u64);
            }
        }
    } else {
        let mut stmt = c.prepare_cached(&format!(
            "SELECT uuid, ROW_NUMBER() OVER (ORDER BY {CLAIM_ORDER}) FROM requests
             WHERE status = 'pending'"
        ))?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))?;
        for row in rows {
            let (id, pos): (String, u64) = row?;
            found.insert(id, pos);
        }
    }
    for r in reqs.iter_mut().filter(|r| r.status == Status::Pending) {
        r.queue_position = found.get(&r.uuid.to_string()).copied();
    }
    Ok(())
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
                limit: 1000,
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
}

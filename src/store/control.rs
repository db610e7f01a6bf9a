//! Operator control (hold, resume, cancel) as desired state, its application by the owning
//! agent, and deletion of finished requests.

use super::requests::{get_in, is_deleting};
use super::retry::{self, AttemptRow, Requeue};
use super::{webhooks, Store, StoreError};
use crate::model::{transition, AgentId, Request, RequestId, Status, Transition};
use crate::timefmt;
use crate::webhooks::Event;
use rusqlite::{params, TransactionBehavior};

/// Result of an operator's status change.
#[derive(Debug)]
pub enum ControlOutcome {
    /// Done at once (no VM involved).
    Applied(Request),
    /// Recorded as desired state for the owning agent.
    Requested(Request),
    Refused {
        current: Status,
        allowed: Vec<Status>,
    },
    NotFound,
}

#[derive(Debug)]
pub enum DeleteOutcome {
    /// Gone, with its logs.
    Deleted,
    /// Its VM is being shut down (a cancel was recorded); hidden already, and removed by its
    /// agent once the VM is down.
    Deleting(Box<Request>),
    NotFound,
}

// --- Engine-neutral decisions ------------------------------------------------------------------
// What control, lease recovery and deletion do to a request, decided from the row as read. Both
// engines call these and differ only in their SQL (and in how they lock the row).

/// What `control` writes, decided from the row as read.
pub(super) struct ControlWrite {
    /// The new status; `None` leaves it as it is.
    pub status: Option<Status>,
    /// The new desired status, always written (an immediate change clears it).
    pub desired: Option<Status>,
    /// The change ends the request: `finished_at` is set.
    pub finishes: bool,
    /// The answer, given the row as written.
    pub outcome: fn(Request) -> ControlOutcome,
}

impl ControlWrite {
    /// `finished_at` to write (`now`), or `None` to keep it.
    pub fn finished_at<'a>(&self, now: &'a str) -> Option<&'a str> {
        self.finishes.then_some(now)
    }
}

/// The control state machine ([`transition`]) applied to `req`: what to write, or the refusal.
/// The refusal is boxed: it carries no request, but the outcome type can.
pub(super) fn plan_control(
    req: &Request,
    target: Status,
) -> Result<ControlWrite, Box<ControlOutcome>> {
    match transition(
        req.status,
        req.agent_id.is_some(),
        req.desired_status,
        target,
    ) {
        Transition::Refused(allowed) => Err(Box::new(ControlOutcome::Refused {
            current: req.status,
            allowed,
        })),
        Transition::Immediate(status) => Ok(ControlWrite {
            status: Some(status),
            desired: None,
            finishes: status.is_terminal(),
            outcome: ControlOutcome::Applied,
        }),
        Transition::Desired(status) => Ok(ControlWrite {
            status: None,
            desired: Some(status),
            finishes: false,
            outcome: ControlOutcome::Requested,
        }),
    }
}

/// How lease recovery ends a request whose agent stopped heart-beating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Recovery {
    pub status: Status,
    /// `error` to write (`None` keeps it).
    pub error: Option<&'static str>,
    /// The `system` log line that says what happened.
    pub line: String,
    /// A request whose VM ran, with retries left: re-queued as its next attempt (written
    /// instead of `status` and `error`; its `line` is the one above).
    pub requeue: Option<Requeue>,
}

impl Recovery {
    /// `finished_at` to write (`now`), or `None` to keep it.
    pub fn finished_at<'a>(&self, now: &'a str) -> Option<&'a str> {
        self.status.is_terminal().then_some(now)
    }
}

/// A request that never started running goes back to `pending` (or to its pending hold or
/// cancel); one whose VM ran lost it with the agent, an infrastructure failure: re-queued as
/// its next attempt while it has retries left ([`retry::requeue`]), else `failed` with
/// `agent lost`.
pub(super) fn recover(row: &AttemptRow, now: &str) -> Result<Recovery, StoreError> {
    let lost = format!(
        "agent {} lost (lease expired); ",
        row.agent.as_deref().unwrap_or_default()
    );
    let (new, note) = match (row.status.as_str(), row.desired.as_deref()) {
        ("acknowledged", Some("cancelled")) => (Status::Cancelled, "cancelled"),
        ("acknowledged", Some("hold")) => (Status::Hold, "held, no VM"),
        ("acknowledged", _) => (Status::Pending, "re-queued: it had not started"),
        _ => (Status::Failed, "failed: its VM ended with the agent"),
    };
    if new == Status::Failed {
        if let Some(mut q) = retry::requeue(row, "agent lost", now)? {
            q.line = format!("{lost}{}", q.line);
            return Ok(Recovery {
                status: q.status,
                error: None,
                line: q.line.clone(),
                requeue: Some(q),
            });
        }
    }
    Ok(Recovery {
        status: new,
        error: (new == Status::Failed).then_some("agent lost"),
        line: format!("{lost}request {note}\n"),
        requeue: None,
    })
}

/// `DELETE` removes at once a finished request or one without a VM (no agent owns it);
/// otherwise the VM is cancelled first and the row hidden meanwhile.
pub(super) fn deletes_at_once(req: &Request) -> bool {
    req.status.is_terminal() || req.agent_id.is_none()
}

/// A stored uuid as a request id.
pub(super) fn parse_id(uuid: &str) -> Result<RequestId, StoreError> {
    uuid.parse()
        .map_err(|e| StoreError::Corrupt(format!("uuid {uuid}: {e}")))
}

/// The row just written, re-read in the same transaction.
pub(super) fn written(req: Option<Request>) -> Result<Request, StoreError> {
    req.ok_or_else(|| StoreError::Corrupt("row vanished".into()))
}

/// The request as control and deletion see it: `None` when it is gone or being deleted.
pub(super) fn visible_in(
    c: &rusqlite::Connection,
    id: RequestId,
) -> Result<Option<Request>, StoreError> {
    match get_in(c, id)? {
        Some(req) if !is_deleting(c, id)? => Ok(Some(req)),
        _ => Ok(None),
    }
}

impl Store {
    /// Applies the control state machine atomically: concurrent calls are serialised by
    /// `BEGIN IMMEDIATE`, so no update is lost.
    pub async fn control(
        &self,
        id: RequestId,
        target: Status,
    ) -> Result<ControlOutcome, StoreError> {
        on_pg!(self.control(id, target));
        self.call_write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(req) = visible_in(&tx, id)? else {
                return Ok(ControlOutcome::NotFound);
            };
            let write = match plan_control(&req, target) {
                Ok(write) => write,
                Err(refused) => return Ok(*refused),
            };
            let now = timefmt::now();
            tx.execute(
                "UPDATE requests SET status = COALESCE(?1, status), desired_status = ?2,
                        updated_at = ?3, finished_at = COALESCE(?4, finished_at)
                 WHERE uuid = ?5",
                params![
                    write.status.map(Status::as_str),
                    write.desired.map(Status::as_str),
                    now,
                    write.finished_at(&now),
                    id.to_string()
                ],
            )?;
            if write.finishes {
                webhooks::enqueue_in(&tx, &id.to_string(), Event::Finished, &now)?;
            }
            let req = written(get_in(&tx, id)?)?;
            tx.commit()?;
            Ok((write.outcome)(req))
        })
        .await
        .inspect(|_| self.bump())
    }

    /// The owning agent records that it applied the desired state: the request is now
    /// `status`. The desired state is cleared only if it is still `status`, so a newer request
    /// (say, a cancel that arrived meanwhile) is never lost. False if the agent no longer owns
    /// an active request.
    pub async fn apply_desired(
        &self,
        id: RequestId,
        agent: &AgentId,
        status: Status,
    ) -> Result<bool, StoreError> {
        on_pg!(self.apply_desired(id, agent, status));
        let agent = agent.0.clone();
        self.call_write(move |c| {
            let n = c.execute(
                "UPDATE requests SET status = ?1, updated_at = ?2,
                        desired_status = CASE WHEN desired_status = ?1 THEN NULL ELSE desired_status END
                 WHERE uuid = ?3 AND agent_id = ?4 AND status IN ('acknowledged','running','hold')",
                params![status.as_str(), timefmt::now(), id.to_string(), agent],
            )?;
            Ok(n == 1)
        })
        .await
        .inspect(|_| self.bump())
    }

    /// Recovers requests whose agent stopped heart-beating: one that never started running
    /// goes back to `pending` (or to its pending hold/cancel); one whose VM ran ends `failed`
    /// with `agent lost` (its VM died with the agent). A `system` log line says which.
    pub async fn reap_expired(&self) -> Result<Vec<(RequestId, Status)>, StoreError> {
        on_pg!(self.reap_expired());
        let reaped = self
            .call_write(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = timefmt::now();
                // Deletions whose agent was lost: nothing is left to wait for.
                tx.execute(
                    "DELETE FROM requests WHERE deleting = 1 AND lease_expires_at < ?1",
                    [&now],
                )?;
                let expired: Vec<String> = {
                    let mut stmt = tx.prepare(
                        "SELECT uuid FROM requests
                         WHERE status IN ('acknowledged','running','hold') AND agent_id IS NOT NULL
                           AND lease_expires_at IS NOT NULL AND lease_expires_at < ?1",
                    )?;
                    let rows = stmt.query_map([&now], |r| r.get(0))?;
                    rows.collect::<rusqlite::Result<_>>()?
                };
                let mut out = Vec::new();
                for uuid in expired {
                    let Some(row) = retry::attempt_row(&tx, "uuid = ?1", [&uuid])? else {
                        continue;
                    };
                    let r = recover(&row, &now)?;
                    if let Some(q) = &r.requeue {
                        retry::requeue_in(&tx, &uuid, q, &now)?;
                        out.push((parse_id(&uuid)?, r.status));
                        continue;
                    }
                    tx.execute(
                        "UPDATE requests SET status = ?1, error = COALESCE(?2, error), updated_at = ?3,
                                finished_at = COALESCE(?4, finished_at), desired_status = NULL,
                                lease_expires_at = NULL,
                                agent_id = CASE WHEN ?1 IN ('pending','hold') THEN NULL ELSE agent_id END,
                                host_id = CASE WHEN ?1 IN ('pending','hold') THEN NULL ELSE host_id END
                         WHERE uuid = ?5",
                        params![r.status.as_str(), r.error, now, r.finished_at(&now), uuid],
                    )?;
                    super::logs::system_line_in(&tx, &uuid, row.attempt, &now, &r.line)?;
                    if r.status.is_terminal() {
                        webhooks::enqueue_in(&tx, &uuid, Event::Finished, &now)?;
                    }
                    out.push((parse_id(&uuid)?, r.status));
                }
                tx.commit()?;
                Ok(out)
            })
            .await?;
        if !reaped.is_empty() {
            self.bump();
        }
        Ok(reaped)
    }

    /// Deletes finished requests (and their logs) that finished before `before` (RFC 3339),
    /// in batches so the write lock is never held for long. Returns (requests, log bytes); with
    /// `dry_run`, counts only.
    pub async fn prune(&self, before: String, dry_run: bool) -> Result<(u64, u64), StoreError> {
        on_pg!(self.prune(before, dry_run));
        const SELECTED: &str = "SELECT uuid FROM requests
             WHERE status IN ('done','failed','cancelled') AND finished_at < ?1";
        let (count, bytes): (i64, i64) = self
            .call({
                let before = before.clone();
                move |c| {
                    Ok(c.query_row(
                        &format!(
                            "SELECT (SELECT COUNT(*) FROM ({SELECTED})),
                                    (SELECT COALESCE(SUM(length(output)), 0) FROM work_log
                                     WHERE request_uuid IN ({SELECTED}))"
                        ),
                        [&before],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )?)
                }
            })
            .await?;
        if dry_run || count == 0 {
            return Ok((count as u64, bytes as u64));
        }
        loop {
            let before = before.clone();
            let n = self
                .call_write(move |c| {
                    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let n = tx.execute(
                        &format!("DELETE FROM requests WHERE uuid IN ({SELECTED} LIMIT 200)"),
                        [&before],
                    )?;
                    tx.commit()?;
                    Ok(n)
                })
                .await?;
            if n == 0 {
                break;
            }
        }
        self.bump();
        Ok((count as u64, bytes as u64))
    }

    /// The desired state of a request, if any (what the agent polls).
    pub async fn desired(&self, id: RequestId) -> Result<Option<Status>, StoreError> {
        on_pg!(self.desired(id));
        // Not through `get`: a request being deleted is hidden from the API, not from its agent.
        self.call_point_read(move |c| Ok(get_in(c, id)?.and_then(|r| r.desired_status)))
    }

    /// `DELETE`: a finished request, or one that has no VM (pending, or held before it got
    /// one), goes at once with its logs. One with a VM is cancelled and hidden; its agent
    /// removes it once the VM is down (`finish`), or lease recovery does if the agent is lost.
    pub async fn delete(&self, id: RequestId) -> Result<DeleteOutcome, StoreError> {
        on_pg!(self.delete(id));
        self.call_write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(req) = visible_in(&tx, id)? else {
                return Ok(DeleteOutcome::NotFound);
            };
            if deletes_at_once(&req) {
                tx.execute("DELETE FROM requests WHERE uuid = ?1", [id.to_string()])?;
                tx.commit()?;
                return Ok(DeleteOutcome::Deleted);
            }
            tx.execute(
                "UPDATE requests SET deleting = 1, desired_status = 'cancelled', updated_at = ?1
                 WHERE uuid = ?2",
                params![timefmt::now(), id.to_string()],
            )?;
            let req = written(get_in(&tx, id)?)?;
            tx.commit()?;
            Ok(DeleteOutcome::Deleting(Box::new(req)))
        })
        .await
        .inspect(|_| self.bump())
    }

    /// Whether the row still exists at all (a deletion in progress counts).
    pub async fn exists(&self, id: RequestId) -> Result<bool, StoreError> {
        on_pg!(self.exists(id));
        self.call_point_read(move |c| Ok(get_in(c, id)?.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{pending_request, temp_store};
    use crate::store::{LogQuery, RequestQuery};
    use std::time::Duration;

    #[tokio::test]
    async fn held_pending_requests_are_not_claimed_until_resumed() {
        let (s, _d) = temp_store().await;
        let r = pending_request(&s).await;
        let agent = AgentId("a".into());
        assert!(
            matches!(s.control(r.uuid, Status::Hold).await.unwrap(), ControlOutcome::Applied(x) if x.status == Status::Hold)
        );
        assert!(s
            .claim(&agent, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none());
        assert!(
            matches!(s.control(r.uuid, Status::Pending).await.unwrap(), ControlOutcome::Applied(x) if x.status == Status::Pending)
        );
        assert!(s
            .claim(&agent, Duration::from_secs(5))
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn running_requests_get_desired_state_for_the_agent() {
        let (s, _d) = temp_store().await;
        let r = pending_request(&s).await;
        let agent = AgentId("a".into());
        s.claim(&agent, Duration::from_secs(5)).await.unwrap();
        s.mark_running(r.uuid, &agent).await.unwrap();
        match s.control(r.uuid, Status::Hold).await.unwrap() {
            ControlOutcome::Requested(x) => {
                assert_eq!(
                    (x.status, x.desired_status),
                    (Status::Running, Some(Status::Hold))
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.desired(r.uuid).await.unwrap(), Some(Status::Hold));
        assert!(!s
            .apply_desired(r.uuid, &AgentId("other".into()), Status::Hold)
            .await
            .unwrap());
        assert!(s.apply_desired(r.uuid, &agent, Status::Hold).await.unwrap());
        let x = s.get(r.uuid).await.unwrap().unwrap();
        assert_eq!((x.status, x.desired_status), (Status::Hold, None));
        // A cancel that lands while the agent applies a resume is kept.
        s.control(r.uuid, Status::Running).await.unwrap();
        s.control(r.uuid, Status::Cancelled).await.unwrap();
        assert!(s
            .apply_desired(r.uuid, &agent, Status::Running)
            .await
            .unwrap());
        let x = s.get(r.uuid).await.unwrap().unwrap();
        assert_eq!(
            (x.status, x.desired_status),
            (Status::Running, Some(Status::Cancelled))
        );
        s.apply_desired(r.uuid, &agent, Status::Hold).await.unwrap();
        match s.control(r.uuid, Status::Pending).await.unwrap() {
            ControlOutcome::Refused { current, allowed } => {
                assert_eq!(current, Status::Hold);
                assert_eq!(
                    allowed,
                    vec![Status::Cancelled],
                    "a pending cancel is final"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn delete_removes_at_once_unless_a_vm_must_be_shut_down_first() {
        let (s, _d) = temp_store().await;
        let log = |ty| vec![("t".into(), ty, b"x".to_vec())];
        // Pending: no VM, gone at once with its logs.
        let r = pending_request(&s).await;
        s.append_logs(r.uuid, log(crate::model::LogType::Boot))
            .await
            .unwrap();
        assert!(matches!(
            s.delete(r.uuid).await.unwrap(),
            DeleteOutcome::Deleted
        ));
        assert!(!s.exists(r.uuid).await.unwrap());
        assert!(s
            .logs(r.uuid, LogQuery::default())
            .await
            .unwrap()
            .is_empty());
        assert!(matches!(
            s.delete(r.uuid).await.unwrap(),
            DeleteOutcome::NotFound
        ));
        // Running: cancelled and hidden; the agent's finish removes it.
        let r = pending_request(&s).await;
        let agent = AgentId("a".into());
        s.claim(&agent, Duration::from_secs(30)).await.unwrap();
        s.mark_running(r.uuid, &agent).await.unwrap();
        match s.delete(r.uuid).await.unwrap() {
            DeleteOutcome::Deleting(x) => {
                assert_eq!(x.desired_status, Some(Status::Cancelled))
            }
            other => panic!("{other:?}"),
        }
        assert!(s.get(r.uuid).await.unwrap().is_none(), "hidden at once");
        assert_eq!(
            s.list(RequestQuery {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .1,
            0
        );
        assert!(matches!(
            s.control(r.uuid, Status::Hold).await.unwrap(),
            ControlOutcome::NotFound
        ));
        assert_eq!(
            s.desired(r.uuid).await.unwrap(),
            Some(Status::Cancelled),
            "its agent still sees the cancel"
        );
        assert!(s.exists(r.uuid).await.unwrap());
        let fin = crate::store::Finish {
            status: Status::Cancelled,
            ..Default::default()
        };
        assert!(s.finish(r.uuid, &agent, fin).await.unwrap());
        assert!(
            !s.exists(r.uuid).await.unwrap(),
            "removed once its VM is down"
        );
        // A deletion whose agent is lost is completed by lease recovery.
        let r = pending_request(&s).await;
        s.claim(&agent, Duration::from_millis(1)).await.unwrap();
        s.delete(r.uuid).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.reap_expired().await.unwrap();
        assert!(!s.exists(r.uuid).await.unwrap());
    }

    #[tokio::test]
    async fn expired_leases_are_recovered_truthfully() {
        let (s, _d) = temp_store().await;
        let agent = AgentId("dead".into());
        let short = Duration::from_millis(1);
        let ack = pending_request(&s).await;
        let run = pending_request(&s).await;
        let held = pending_request(&s).await;
        s.claim(&agent, short).await.unwrap();
        s.claim(&agent, short).await.unwrap();
        s.mark_running(run.uuid, &agent).await.unwrap();
        s.control(held.uuid, Status::Hold).await.unwrap(); // unclaimed hold: no lease
        let live = pending_request(&s).await;
        s.claim(&AgentId("alive".into()), Duration::from_secs(60))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut reaped = s.reap_expired().await.unwrap();
        reaped.sort_by_key(|(id, _)| *id);
        let mut want = vec![(ack.uuid, Status::Pending), (run.uuid, Status::Failed)];
        want.sort_by_key(|(id, _)| *id);
        assert_eq!(reaped, want);
        let r = s.get(run.uuid).await.unwrap().unwrap();
        assert_eq!(
            (r.status, r.error.as_deref()),
            (Status::Failed, Some("agent lost"))
        );
        assert!(r.finished_at.is_some());
        let a = s.get(ack.uuid).await.unwrap().unwrap();
        assert_eq!((a.status, a.agent_id), (Status::Pending, None));
        assert_eq!(
            s.get(held.uuid).await.unwrap().unwrap().status,
            Status::Hold
        );
        assert_eq!(
            s.get(live.uuid).await.unwrap().unwrap().status,
            Status::Acknowledged
        );
        let log = s.logs(run.uuid, LogQuery::default()).await.unwrap();
        assert!(String::from_utf8_lossy(&log[0].output).contains("agent dead lost"));
        assert!(s.reap_expired().await.unwrap().is_empty(), "idempotent");
    }

    #[tokio::test]
    async fn prune_deletes_only_old_finished_requests() {
        let (s, _d) = temp_store().await;
        let old = pending_request(&s).await;
        s.append_logs(
            old.uuid,
            vec![("t".into(), crate::model::LogType::Stdout, vec![1; 100])],
        )
        .await
        .unwrap();
        s.control(old.uuid, Status::Cancelled).await.unwrap();
        let active = pending_request(&s).await;
        let cutoff = timefmt::format(time::OffsetDateTime::now_utc() + Duration::from_secs(60));
        assert_eq!(s.prune(cutoff.clone(), true).await.unwrap(), (1, 100));
        assert!(
            s.get(old.uuid).await.unwrap().is_some(),
            "dry run deletes nothing"
        );
        let past = timefmt::format(time::OffsetDateTime::now_utc() - Duration::from_secs(60));
        assert_eq!(
            s.prune(past, false).await.unwrap(),
            (0, 0),
            "not old enough"
        );
        assert_eq!(s.prune(cutoff, false).await.unwrap(), (1, 100));
        assert!(s.get(old.uuid).await.unwrap().is_none());
        assert!(s
            .logs(old.uuid, LogQuery::default())
            .await
            .unwrap()
            .is_empty());
        assert!(
            s.get(active.uuid).await.unwrap().is_some(),
            "active requests are kept"
        );
    }

    fn row(status: &str, desired: Option<&str>, agent: &str) -> AttemptRow {
        AttemptRow {
            status: status.into(),
            desired: desired.map(Into::into),
            attempt: 1,
            agent: Some(agent.into()),
            ..Default::default()
        }
    }

    #[test]
    fn recovery_is_decided_by_how_far_the_request_got() {
        let r = recover(&row("acknowledged", None, "h:1:0"), "now").unwrap();
        assert_eq!(
            (r.status, r.error, &r.requeue),
            (Status::Pending, None, &None)
        );
        assert_eq!(
            r.line,
            "agent h:1:0 lost (lease expired); request re-queued: it had not started\n"
        );
        assert_eq!(
            recover(&row("acknowledged", Some("hold"), "a"), "now")
                .unwrap()
                .status,
            Status::Hold
        );
        let c = recover(&row("acknowledged", Some("cancelled"), "a"), "now").unwrap();
        assert_eq!(
            (c.status, c.finished_at("now")),
            (Status::Cancelled, Some("now"))
        );
        for status in ["running", "hold"] {
            let f = recover(&row(status, Some("cancelled"), "a"), "now").unwrap();
            assert_eq!((f.status, f.error), (Status::Failed, Some("agent lost")));
            assert!(f.requeue.is_none());
        }
    }

    #[test]
    fn a_lost_run_with_retries_left_is_requeued_not_failed() {
        let with_retries = |status, desired, attempt| AttemptRow {
            retries: 1,
            attempt,
            ..row(status, desired, "h:1:0")
        };
        let r = recover(&with_retries("running", None, 1), "now").unwrap();
        let q = r.requeue.clone().expect("re-queued");
        assert_eq!((r.status, r.error, q.attempt), (Status::Pending, None, 2));
        assert_eq!(
            r.line,
            "agent h:1:0 lost (lease expired); attempt 1 failed (agent lost); re-queued as \
             attempt 2 of 2\n"
        );
        assert_eq!(r.finished_at("now"), None);
        // A held VM lost with its agent waits held for its next attempt.
        let h = recover(&with_retries("hold", None, 1), "now").unwrap();
        assert_eq!(
            (h.status, h.requeue.map(|q| q.attempt)),
            (Status::Hold, Some(2))
        );
        // None left: failed as without retries.
        let f = recover(&with_retries("running", None, 2), "now").unwrap();
        assert_eq!((f.status, f.error), (Status::Failed, Some("agent lost")));
        assert!(f.requeue.is_none());
        // Not started: re-queued as the same attempt (nothing ran).
        let a = recover(&with_retries("acknowledged", None, 1), "now").unwrap();
        assert_eq!((a.status, a.requeue), (Status::Pending, None));
    }

    #[tokio::test]
    async fn concurrent_controls_are_serialised() {
        let (s, _d) = temp_store().await;
        let r = pending_request(&s).await;
        // Ten racing holds on a pending request: exactly one applies, the rest are refused.
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.control(r.uuid, Status::Hold).await.unwrap()
            }));
        }
        let mut applied = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), ControlOutcome::Applied(_)) {
                applied += 1;
            }
        }
        assert_eq!(applied, 1);
    }
}

//! Operator control (hold, resume, cancel) as desired state, its application by the owning
//! agent, and deletion of finished requests.

use super::requests::get_in;
use super::{Store, StoreError};
use crate::model::{transition, AgentId, Request, RequestId, Status, Transition};
use crate::timefmt;
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
    Deleted,
    /// Still active: cancel it instead.
    Active(Box<Request>),
    NotFound,
}

impl Store {
    /// Applies the control state machine atomically: concurrent calls are serialised by
    /// `BEGIN IMMEDIATE`, so no update is lost.
    pub async fn control(
        &self,
        id: RequestId,
        target: Status,
    ) -> Result<ControlOutcome, StoreError> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(req) = get_in(&tx, id)? else {
                return Ok(ControlOutcome::NotFound);
            };
            let now = timefmt::now();
            let uuid = id.to_string();
            let outcome = match transition(
                req.status,
                req.agent_id.is_some(),
                req.desired_status,
                target,
            ) {
                Transition::Refused(allowed) => {
                    return Ok(ControlOutcome::Refused {
                        current: req.status,
                        allowed,
                    })
                }
                Transition::Immediate(status) => {
                    let finished = status.is_terminal().then_some(now.as_str());
                    tx.execute(
                        "UPDATE requests SET status = ?1, desired_status = NULL, updated_at = ?2,
                                finished_at = COALESCE(?3, finished_at)
                         WHERE uuid = ?4",
                        params![status.as_str(), now, finished, uuid],
                    )?;
                    ControlOutcome::Applied
                }
                Transition::Desired(status) => {
                    tx.execute(
                        "UPDATE requests SET desired_status = ?1, updated_at = ?2 WHERE uuid = ?3",
                        params![status.as_str(), now, uuid],
                    )?;
                    ControlOutcome::Requested
                }
            };
            let req = get_in(&tx, id)?.ok_or_else(|| StoreError::Corrupt("row vanished".into()))?;
            tx.commit()?;
            Ok(outcome(req))
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
        let agent = agent.0.clone();
        self.call(move |c| {
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

    /// The desired state of a request, if any (what the agent polls).
    pub async fn desired(&self, id: RequestId) -> Result<Option<Status>, StoreError> {
        Ok(self.get(id).await?.and_then(|r| r.desired_status))
    }

    /// Deletes a finished request and (by cascade) its logs.
    pub async fn delete_finished(&self, id: RequestId) -> Result<DeleteOutcome, StoreError> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(req) = get_in(&tx, id)? else {
                return Ok(DeleteOutcome::NotFound);
            };
            if !req.status.is_terminal() {
                return Ok(DeleteOutcome::Active(Box::new(req)));
            }
            tx.execute("DELETE FROM requests WHERE uuid = ?1", [id.to_string()])?;
            tx.commit()?;
            Ok(DeleteOutcome::Deleted)
        })
        .await
        .inspect(|_| self.bump())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NewRequest;
    use crate::store::test_support::temp_store;
    use crate::store::LogQuery;
    use std::time::Duration;

    fn new() -> NewRequest {
        NewRequest {
            vm_name: "t".into(),
            commands: "x".into(),
            timeout: 9,
        }
    }

    #[tokio::test]
    async fn held_pending_requests_are_not_claimed_until_resumed() {
        let (s, _d) = temp_store().await;
        let r = s.create(new()).await.unwrap();
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
        let r = s.create(new()).await.unwrap();
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
    async fn only_finished_requests_are_deleted_with_their_logs() {
        let (s, _d) = temp_store().await;
        let r = s.create(new()).await.unwrap();
        s.append_logs(
            r.uuid,
            vec![("t".into(), crate::model::LogType::Boot, b"x".to_vec())],
        )
        .await
        .unwrap();
        assert!(matches!(
            s.delete_finished(r.uuid).await.unwrap(),
            DeleteOutcome::Active(_)
        ));
        s.control(r.uuid, Status::Cancelled).await.unwrap();
        let cancelled = s.get(r.uuid).await.unwrap().unwrap();
        assert!(cancelled.finished_at.is_some());
        assert!(matches!(
            s.delete_finished(r.uuid).await.unwrap(),
            DeleteOutcome::Deleted
        ));
        assert!(s.get(r.uuid).await.unwrap().is_none());
        assert!(s
            .logs(r.uuid, LogQuery::default())
            .await
            .unwrap()
            .is_empty());
        assert!(matches!(
            s.delete_finished(r.uuid).await.unwrap(),
            DeleteOutcome::NotFound
        ));
    }

    #[tokio::test]
    async fn concurrent_controls_are_serialised() {
        let (s, _d) = temp_store().await;
        let r = s.create(new()).await.unwrap();
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

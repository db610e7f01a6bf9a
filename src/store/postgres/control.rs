//! Operator control, its application by the owning agent, lease recovery and deletion on
//! PostgreSQL. Where SQLite serialises with `BEGIN IMMEDIATE`, these lock the row they decide on
//! (`FOR UPDATE`), so concurrent calls are serialised per request and no update is lost.

use super::requests::{get_in, COLUMNS};
use super::Pg;
use crate::model::{transition, AgentId, RequestId, Status, Transition};
use crate::store::{ControlOutcome, DeleteOutcome, StoreError};
use crate::timefmt;

impl Pg {
    pub(crate) async fn control(
        &self,
        id: RequestId,
        target: Status,
    ) -> Result<ControlOutcome, StoreError> {
        let (uuid, now) = (id.to_string(), timefmt::now());
        let locked = format!("SELECT {COLUMNS}, deleting FROM requests WHERE uuid = $1 FOR UPDATE");
        write_tx!(
            self,
            "control",
            |tx| async {
                let Some(row) = tx.query_opt(&locked, &[&uuid]).await? else {
                    return Ok(ControlOutcome::NotFound);
                };
                if row.try_get::<_, bool>("deleting")? {
                    return Ok(ControlOutcome::NotFound);
                }
                let req = super::requests::from_row(&row)?;
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
                        "UPDATE requests SET status = $1, desired_status = NULL, updated_at = $2,
                                finished_at = COALESCE($3, finished_at)
                         WHERE uuid = $4",
                        &[&status.as_str(), &now, &finished, &uuid],
                    )
                    .await?;
                        ControlOutcome::Applied
                    }
                    Transition::Desired(status) => {
                        tx.execute(
                        "UPDATE requests SET desired_status = $1, updated_at = $2 WHERE uuid = $3",
                        &[&status.as_str(), &now, &uuid],
                    )
                    .await?;
                        ControlOutcome::Requested
                    }
                };
                let req = get_in(&tx, id)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt("row vanished".into()))?;
                Ok(outcome(req))
            }
            .await,
            recheck | c | {
                // A change that carries our timestamp is ours.
                Ok(get_in(c, id)
                    .await?
                    .filter(|r| r.updated_at == now)
                    .map(|r| {
                        if r.desired_status.is_some() {
                            ControlOutcome::Requested(r)
                        } else {
                            ControlOutcome::Applied(r)
                        }
                    }))
            }
        )
    }

    /// Idempotent: applying the same state twice leaves the same row.
    pub(crate) async fn apply_desired(
        &self,
        id: RequestId,
        agent: &AgentId,
        status: Status,
    ) -> Result<bool, StoreError> {
        let (agent, uuid) = (agent.0.clone(), id.to_string());
        write_tx!(self, "apply_desired", |tx| async {
            let n = tx
                .execute(
                    "UPDATE requests SET status = $1, updated_at = $2,
                            desired_status = CASE WHEN desired_status = $1 THEN NULL
                                                  ELSE desired_status END
                     WHERE uuid = $3 AND agent_id = $4
                       AND status IN ('acknowledged','running','hold')",
                    &[&status.as_str(), &timefmt::now(), &uuid, &agent],
                )
                .await?;
            Ok(n == 1)
        }
        .await)
    }

    /// Rows are locked with `SKIP LOCKED`, so reapers in several processes never recover (and
    /// log) the same request twice. A lost COMMIT is simply run again: what it did is no longer
    /// expired.
    pub(crate) async fn reap_expired(&self) -> Result<Vec<(RequestId, Status)>, StoreError> {
        write_tx!(
            self,
            "reap_expired",
            |tx| async {
                let now = timefmt::now();
                tx.execute(
                    "DELETE FROM requests WHERE deleting AND lease_expires_at < $1",
                    &[&now],
                )
                .await?;
                let expired = tx
                    .query(
                        "SELECT uuid, status, desired_status, agent_id FROM requests
                     WHERE status IN ('acknowledged','running','hold') AND agent_id IS NOT NULL
                       AND lease_expires_at IS NOT NULL AND lease_expires_at < $1
                     FOR UPDATE SKIP LOCKED",
                        &[&now],
                    )
                    .await?;
                let mut out = Vec::new();
                for row in expired {
                    let uuid: String = row.try_get(0)?;
                    let status: String = row.try_get(1)?;
                    let desired: Option<String> = row.try_get(2)?;
                    let agent: String = row.try_get::<_, Option<String>>(3)?.unwrap_or_default();
                    let (new, note) = match (status.as_str(), desired.as_deref()) {
                        ("acknowledged", Some("cancelled")) => (Status::Cancelled, "cancelled"),
                        ("acknowledged", Some("hold")) => (Status::Hold, "held, no VM"),
                        ("acknowledged", _) => (Status::Pending, "re-queued: it had not started"),
                        _ => (Status::Failed, "failed: its VM ended with the agent"),
                    };
                    let finished = new.is_terminal().then_some(now.as_str());
                    let error = (new == Status::Failed).then_some("agent lost");
                    tx.execute(
                    "UPDATE requests SET status = $1, error = COALESCE($2, error), updated_at = $3,
                            finished_at = COALESCE($4, finished_at), desired_status = NULL,
                            lease_expires_at = NULL,
                            agent_id = CASE WHEN $1 IN ('pending','hold') THEN NULL
                                            ELSE agent_id END,
                            host_id = CASE WHEN $1 IN ('pending','hold') THEN NULL
                                           ELSE host_id END
                     WHERE uuid = $5",
                    &[&new.as_str(), &error, &now, &finished, &uuid],
                )
                .await?;
                    let line = format!("agent {agent} lost (lease expired); request {note}\n");
                    tx.execute(
                        "INSERT INTO work_log (request_uuid, seq, timestamp, log_type, output)
                     VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM work_log
                                  WHERE request_uuid = $1), $2, 'system', $3)",
                        &[&uuid, &now, &line.into_bytes()],
                    )
                    .await?;
                    let id = uuid
                        .parse()
                        .map_err(|e| StoreError::Corrupt(format!("uuid {uuid}: {e}")))?;
                    out.push((id, new));
                }
                Ok(out)
            }
            .await,
            quiet_if | v | v.is_empty()
        )
    }

    pub(crate) async fn claimed_alive(&self, id: RequestId) -> Result<bool, StoreError> {
        let uuid = id.to_string();
        retry!(self, "claimed_alive", |c| {
            let n: i64 = c
                .query_one(
                    "SELECT COUNT(*) FROM requests WHERE uuid = $1
                       AND status IN ('acknowledged','running','hold') AND agent_id IS NOT NULL
                       AND lease_expires_at >= $2",
                    &[&uuid, &timefmt::now()],
                )
                .await?
                .get(0);
            Ok(n > 0)
        })
    }

    /// Batched deletes, each idempotent, so a retry only finds less to delete.
    pub(crate) async fn prune(
        &self,
        before: String,
        dry_run: bool,
    ) -> Result<(u64, u64), StoreError> {
        const SELECTED: &str = "SELECT uuid FROM requests
             WHERE status IN ('done','failed','cancelled') AND finished_at < $1";
        let counts = format!(
            "SELECT (SELECT COUNT(*) FROM ({SELECTED}) s),
                    (SELECT COALESCE(SUM(octet_length(output)), 0)::bigint FROM work_log
                     WHERE request_uuid IN ({SELECTED}))"
        );
        let (count, bytes): (i64, i64) = retry!(self, "prune", |c| {
            let r = c.query_one(&counts, &[&before]).await?;
            Ok((r.try_get(0)?, r.try_get(1)?))
        })?;
        if dry_run || count == 0 {
            return Ok((count as u64, bytes as u64));
        }
        let batch = format!("DELETE FROM requests WHERE uuid IN ({SELECTED} LIMIT 200)");
        loop {
            let n = write_tx!(
                self,
                "prune",
                |tx| async { Ok(tx.execute(&batch, &[&before]).await?) }.await,
                quiet_if | n | *n == 0
            )?;
            if n == 0 {
                break;
            }
        }
        Ok((count as u64, bytes as u64))
    }

    pub(crate) async fn desired(&self, id: RequestId) -> Result<Option<Status>, StoreError> {
        let uuid = id.to_string();
        retry!(self, "desired", |c| {
            let row = c
                .query_opt(
                    "SELECT desired_status FROM requests WHERE uuid = $1",
                    &[&uuid],
                )
                .await?;
            match row.and_then(|r| r.get::<_, Option<String>>(0)) {
                Some(s) => {
                    Ok(Some(s.parse().map_err(|e| {
                        StoreError::Corrupt(format!("request {uuid}: {e}"))
                    })?))
                }
                None => Ok(None),
            }
        })
    }

    pub(crate) async fn delete(&self, id: RequestId) -> Result<DeleteOutcome, StoreError> {
        let (uuid, now) = (id.to_string(), timefmt::now());
        let locked = format!("SELECT {COLUMNS}, deleting FROM requests WHERE uuid = $1 FOR UPDATE");
        write_tx!(
            self,
            "delete",
            |tx| async {
                let Some(row) = tx.query_opt(&locked, &[&uuid]).await? else {
                    return Ok(DeleteOutcome::NotFound);
                };
                if row.try_get::<_, bool>("deleting")? {
                    return Ok(DeleteOutcome::NotFound);
                }
                let req = super::requests::from_row(&row)?;
                if req.status.is_terminal() || req.agent_id.is_none() {
                    tx.execute("DELETE FROM requests WHERE uuid = $1", &[&uuid])
                        .await?;
                    return Ok(DeleteOutcome::Deleted);
                }
                tx.execute(
                "UPDATE requests SET deleting = TRUE, desired_status = 'cancelled', updated_at = $1
                 WHERE uuid = $2",
                &[&now, &uuid],
            )
            .await?;
                let req = get_in(&tx, id)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt("row vanished".into()))?;
                Ok(DeleteOutcome::Deleting(Box::new(req)))
            }
            .await,
            recheck | c | {
                // Gone, or hidden with our timestamp: the lost COMMIT went through.
                let row = c
                    .query_opt(
                        &format!("SELECT {COLUMNS}, deleting FROM requests WHERE uuid = $1"),
                        &[&uuid],
                    )
                    .await?;
                Ok(match row {
                    None => Some(DeleteOutcome::Deleted),
                    Some(r) => {
                        let req = super::requests::from_row(&r)?;
                        (r.try_get::<_, bool>("deleting")? && req.updated_at == now)
                            .then(|| DeleteOutcome::Deleting(Box::new(req)))
                    }
                })
            }
        )
    }

    pub(crate) async fn exists(&self, id: RequestId) -> Result<bool, StoreError> {
        let uuid = id.to_string();
        retry!(self, "exists", |c| {
            Ok(
                c.query_opt("SELECT 1 FROM requests WHERE uuid = $1", &[&uuid])
                    .await?
                    .is_some(),
            )
        })
    }
}

//! Operator control, its application by the owning agent, lease recovery and deletion on
//! PostgreSQL. Where SQLite serialises with `BEGIN IMMEDIATE`, these lock the row they decide on
//! (`FOR UPDATE`), so concurrent calls are serialised per request and no update is lost.

use super::requests::{from_row, get_in, COLUMNS};
use super::retry;
use super::Pg;
use crate::model::{AgentId, Request, RequestId, Status};
use crate::store::control::{deletes_at_once, parse_id, plan_control, recover, written};
use crate::store::{ControlOutcome, DeleteOutcome, StoreError};
use crate::timefmt;
use crate::webhooks::Event;

/// The request's row, locked (`FOR UPDATE`) until the transaction ends, as control, deletion
/// and release see it: `None` when it is gone or being deleted.
pub(super) async fn lock_visible(
    tx: &tokio_postgres::Transaction<'_>,
    uuid: &str,
) -> Result<Option<Request>, StoreError> {
    let locked = format!("SELECT {COLUMNS}, deleting FROM requests WHERE uuid = $1 FOR UPDATE");
    match tx.query_opt(&locked, &[&uuid]).await? {
        Some(row) if !row.try_get::<_, bool>("deleting")? => Ok(Some(from_row(&row)?)),
        _ => Ok(None),
    }
}

impl Pg {
    pub(crate) async fn control(
        &self,
        id: RequestId,
        target: Status,
    ) -> Result<ControlOutcome, StoreError> {
        let (uuid, now) = (id.to_string(), timefmt::now());
        write_tx!(
            self,
            "control",
            |tx| async {
                let Some(req) = lock_visible(&tx, &uuid).await? else {
                    return Ok(ControlOutcome::NotFound);
                };
                let write = match plan_control(&req, target) {
                    Ok(write) => write,
                    Err(refused) => return Ok(*refused),
                };
                tx.execute(
                    "UPDATE requests SET status = COALESCE($1, status), desired_status = $2,
                            updated_at = $3, finished_at = COALESCE($4, finished_at)
                     WHERE uuid = $5",
                    &[
                        &write.status.map(Status::as_str),
                        &write.desired.map(Status::as_str),
                        &now,
                        &write.finished_at(&now),
                        &uuid,
                    ],
                )
                .await?;
                if write.finishes {
                    super::webhooks::enqueue_in(&tx, &uuid, Event::Finished, &now).await?;
                }
                Ok((write.outcome)(written(get_in(&tx, id).await?)?))
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
                        "SELECT uuid FROM requests
                     WHERE status IN ('acknowledged','running','hold') AND agent_id IS NOT NULL
                       AND lease_expires_at IS NOT NULL AND lease_expires_at < $1
                     FOR UPDATE SKIP LOCKED",
                        &[&now],
                    )
                    .await?;
                let mut out = Vec::new();
                for found in expired {
                    let uuid: String = found.try_get(0)?;
                    let Some(row) = retry::attempt_row(&tx, "uuid = $1", &[&uuid]).await? else {
                        continue;
                    };
                    let r = recover(&row, &now)?;
                    if let Some(q) = &r.requeue {
                        retry::requeue_in(&tx, &uuid, q, &now).await?;
                        out.push((parse_id(&uuid)?, r.status));
                        continue;
                    }
                    tx.execute(
                        "UPDATE requests SET status = $1, error = COALESCE($2, error),
                                updated_at = $3, finished_at = COALESCE($4, finished_at),
                                desired_status = NULL, lease_expires_at = NULL,
                                agent_id = CASE WHEN $1 IN ('pending','hold') THEN NULL
                                                ELSE agent_id END,
                                host_id = CASE WHEN $1 IN ('pending','hold') THEN NULL
                                               ELSE host_id END
                         WHERE uuid = $5",
                        &[
                            &r.status.as_str(),
                            &r.error,
                            &now,
                            &r.finished_at(&now),
                            &uuid,
                        ],
                    )
                    .await?;
                    super::logs::system_line_in(&tx, &uuid, row.attempt, &now, &r.line).await?;
                    if r.status.is_terminal() {
                        super::webhooks::enqueue_in(&tx, &uuid, Event::Finished, &now).await?;
                    }
                    out.push((parse_id(&uuid)?, r.status));
                }
                Ok(out)
            }
            .await,
            quiet_if | v | v.is_empty()
        )
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
        write_tx!(
            self,
            "delete",
            |tx| async {
                let Some(req) = lock_visible(&tx, &uuid).await? else {
                    return Ok(DeleteOutcome::NotFound);
                };
                if deletes_at_once(&req) {
                    tx.execute("DELETE FROM requests WHERE uuid = $1", &[&uuid])
                        .await?;
                    return Ok(DeleteOutcome::Deleted);
                }
                tx.execute(
                    "UPDATE requests SET deleting = TRUE, desired_status = 'cancelled',
                            updated_at = $1
                     WHERE uuid = $2",
                    &[&now, &uuid],
                )
                .await?;
                Ok(DeleteOutcome::Deleting(Box::new(written(
                    get_in(&tx, id).await?,
                )?)))
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
                        let req = from_row(&r)?;
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

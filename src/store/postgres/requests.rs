//! Request rows on PostgreSQL: create, read, claim (`FOR UPDATE SKIP LOCKED`, one round trip)
//! and the agent's state changes, each guarded by ownership as in `store/requests.rs`.

use super::batch::NewRow;
use super::hosts::{fill_waiting, ELIGIBLE};
use super::queue::{self, turn_base, AHEAD, CLAIM_ORDER, KEY_COLUMNS};
use super::retry;
use super::Pg;
use crate::model::{AgentId, NewRequest, Request, RequestId};
use crate::store::queue::{ClaimKey, Place, Positions};
use crate::store::{Capabilities, Finish, RequestQuery, StoreError};
use crate::timefmt;
use crate::webhooks::Event;
use std::time::Duration;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row};

pub(super) const COLUMNS: &str =
    "uuid, vm_name, commands, timeout, status, created_at, updated_at, \
     started_at, finished_at, exit_code, error, agent_id, desired_status, shutdown_step, \
     boot_ms, run_ms, shutdown_ms, boot, boot_mode, restore_ms, artifact_globs, channel, \
     requires, host_id, keep_on_failure, kept_until, kept_ms, submitted_by, callback_url, \
     retries, attempt, attempts, priority";

/// A request, with its place in the claim order and the requests ahead of it.
static GET: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {COLUMNS}, {KEY_COLUMNS}, {ahead}, webhook_urls IS NOT NULL FROM requests r
         WHERE uuid = $1 AND NOT deleting",
        ahead = *AHEAD
    )
});

/// How many columns `COLUMNS` names (a query's extra columns come after them).
const COLUMN_COUNT: usize = 33;

/// `(queue_tag, row_id)` of a row read with `KEY_COLUMNS` after `COLUMNS`.
fn key_columns(r: &Row) -> Result<(i64, i64), StoreError> {
    Ok((r.try_get(COLUMN_COUNT)?, r.try_get(COLUMN_COUNT + 1)?))
}

pub(super) fn from_row(r: &Row) -> Result<Request, StoreError> {
    let uuid: String = r.try_get(0)?;
    let bad = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("request {uuid}: {e}"));
    let parse_opt = |i: usize| -> Result<Option<String>, StoreError> { Ok(r.try_get(i)?) };
    let status: String = r.try_get(4)?;
    let timeout: i64 = r.try_get(3)?;
    Ok(Request {
        uuid: uuid.parse().map_err(|e| bad(&e))?,
        vm_name: r.try_get(1)?,
        commands: r.try_get(2)?,
        timeout: u32::try_from(timeout).map_err(|e| bad(&e))?,
        status: status.parse().map_err(|e| bad(&e))?,
        created_at: r.try_get(5)?,
        updated_at: r.try_get(6)?,
        started_at: r.try_get(7)?,
        finished_at: r.try_get(8)?,
        exit_code: r.try_get(9)?,
        error: r.try_get(10)?,
        agent_id: r.try_get(11)?,
        desired_status: parse_opt(12)?
            .map(|s| s.parse())
            .transpose()
            .map_err(|e| bad(&e))?,
        shutdown_step: parse_opt(13)?
            .map(|s| s.parse())
            .transpose()
            .map_err(|e| bad(&e))?,
        boot_ms: r.try_get(14)?,
        run_ms: r.try_get(15)?,
        shutdown_ms: r.try_get(16)?,
        boot: parse_opt(17)?
            .map(|s| s.parse())
            .transpose()
            .map_err(|e| bad(&e))?,
        boot_mode: parse_opt(18)?
            .map(|s| s.parse())
            .transpose()
            .map_err(|e| bad(&e))?,
        restore_ms: r.try_get(19)?,
        artifacts: match parse_opt(20)? {
            Some(j) => serde_json::from_str(&j).map_err(|e| bad(&e))?,
            None => Vec::new(),
        },
        channel: parse_opt(21)?
            .map(|s| s.parse())
            .transpose()
            .map_err(|e| bad(&e))?,
        requires: match parse_opt(22)? {
            Some(j) => serde_json::from_str(&j).map_err(|e| bad(&e))?,
            None => Vec::new(),
        },
        host: r.try_get(23)?,
        waiting_for: None,
        keep_on_failure: r
            .try_get::<_, Option<i64>>(24)?
            .map(u32::try_from)
            .transpose()
            .map_err(|e| bad(&e))?,
        kept_until: r.try_get(25)?,
        kept_ms: r.try_get(26)?,
        submitted_by: r.try_get(27)?,
        callback_url: r.try_get(28)?,
        webhooks: None,
        retries: u32::try_from(r.try_get::<_, i64>(29)?).map_err(|e| bad(&e))?,
        attempt: u32::try_from(r.try_get::<_, i64>(30)?).map_err(|e| bad(&e))?,
        attempts: match parse_opt(31)? {
            Some(j) => serde_json::from_str(&j).map_err(|e| bad(&e))?,
            None => Vec::new(),
        },
        priority: r.try_get(32)?,
        queue_position: None,
    })
}

/// The row whatever its state (a deletion in progress included).
pub(super) async fn get_in(
    c: &impl GenericClient,
    id: RequestId,
) -> Result<Option<Request>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM requests WHERE uuid = $1");
    c.query_opt(&sql, &[&id.to_string()])
        .await?
        .map(|r| from_row(&r))
        .transpose()
}

fn lease_until(lease: Duration) -> String {
    timefmt::format(time::OffsetDateTime::now_utc() + lease)
}

impl Pg {
    pub(crate) async fn create(&self, new: NewRequest) -> Result<Request, StoreError> {
        // Chosen once, so a retry after a lost COMMIT can tell whether the insert landed.
        let id = RequestId::new();
        let uuid = id.to_string();
        let globs = (!new.artifacts.is_empty())
            .then(|| serde_json::to_string(&new.artifacts).expect("json"));
        let boot = new.boot.map(|b| b.as_str());
        let requires = {
            let mut need = new.requires.clone();
            need.sort();
            need.dedup();
            (!need.is_empty()).then(|| serde_json::to_string(&need).expect("json"))
        };
        let webhook_urls = (!new.webhook_urls.is_empty())
            .then(|| serde_json::to_string(&new.webhook_urls).expect("json"));
        if new.uploads.is_empty() {
            // The row as stored, as on SQLite (`waiting_for` is for reads).
            return self
                .inserts
                .create(NewRow {
                    uuid,
                    vm_name: new.vm_name,
                    commands: new.commands,
                    timeout: i64::from(new.timeout),
                    created_at: timefmt::now(),
                    boot: boot.map(str::to_string),
                    globs,
                    requires,
                    keep: new.keep_on_failure.map(i64::from),
                    submitted_by: new.submitted_by,
                    callback_url: new.callback_url,
                    webhook_urls,
                    retries: i64::from(new.retries),
                    priority: new.priority,
                })
                .await;
        }
        let insert = format!(
            "INSERT INTO requests (uuid, vm_name, commands, timeout, status, created_at,
                                   updated_at, boot, artifact_globs, requires,
                                   keep_on_failure, submitted_by, priority, callback_url,
                                   webhook_urls, retries, queue_tag)
             VALUES ($1, $2, $3, $4, 'pending', $5, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                     {} + 1)",
            turn_base("$11", "$10")
        );
        let req = write_tx!(
            self,
            "create",
            |tx| async {
                let now = timefmt::now();
                tx.execute(
                    &insert,
                    &[
                        &uuid,
                        &new.vm_name,
                        &new.commands,
                        &i64::from(new.timeout),
                        &now,
                        &boot,
                        &globs,
                        &requires,
                        &new.keep_on_failure.map(i64::from),
                        &new.submitted_by,
                        &new.priority,
                        &new.callback_url,
                        &webhook_urls,
                        &i64::from(new.retries),
                    ],
                )
                .await?;
                for (seq, upload) in new.uploads.iter().enumerate() {
                    let n = tx
                        .execute(
                            "UPDATE uploads SET request_uuid = $1, seq = $2
                         WHERE id = $3 AND request_uuid IS NULL",
                            &[&uuid, &(seq as i64), upload],
                        )
                        .await?;
                    if n != 1 {
                        return Err(StoreError::Corrupt(format!(
                            "upload {upload} is not staged (already linked, or dropped)"
                        )));
                    }
                }
                get_in(&tx, id)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt("insert vanished".into()))
            }
            .await,
            recheck | c | get_in(c, id).await
        )?;
        Ok(req)
    }

    /// `waiting_for` filled in, as every read shows it.
    async fn with_waiting(&self, mut reqs: Vec<Request>) -> Result<Vec<Request>, StoreError> {
        retry!(self, "waiting_for", |c| {
            fill_waiting(c, &self.hosts, &mut reqs).await?;
            Ok(())
        })?;
        Ok(reqs)
    }

    /// `Store::get` (`deliveries` false) and `Store::show` (true): the deliveries cost a round
    /// trip more, and only for a request submitted with webhook targets (one without has none).
    pub(crate) async fn read_one(
        &self,
        id: RequestId,
        deliveries: bool,
    ) -> Result<Option<Request>, StoreError> {
        let uuid = id.to_string();
        let got = retry!(self, "get", pooled, |c| {
            // Prepared once per connection: planning it (the position's two subqueries) cost
            // more than running it, and a prepared statement is still one round trip.
            let get = c.prepare_typed_cached(&GET, &[Type::TEXT]).await?;
            c.query_opt(&get, &[&uuid])
                .await?
                .map(|r| {
                    let req = from_row(&r)?;
                    let (turn, row) = key_columns(&r)?;
                    let ahead: (Option<i64>, Option<i64>) =
                        (r.try_get(COLUMN_COUNT + 2)?, r.try_get(COLUMN_COUNT + 3)?);
                    let place = match ahead {
                        (Some(higher), Some(earlier)) => {
                            let key =
                                ClaimKey::new(req.priority, turn, req.created_at.clone(), row);
                            vec![Place::counted(key, higher, earlier)]
                        }
                        _ => Vec::new(),
                    };
                    let has_targets: bool = r.try_get(COLUMN_COUNT + 4)?;
                    Ok((req, place, has_targets))
                })
                .transpose()
        })?;
        let Some((mut req, place, has_targets)) = got else {
            return Ok(None);
        };
        if deliveries {
            req.webhooks = Some(match has_targets {
                true => self.deliveries(id).await?,
                false => Vec::new(),
            });
        }
        let mut reqs = self.with_waiting(vec![req]).await?;
        self.fill_positions(&mut reqs, place).await?;
        Ok(reqs.pop())
    }

    pub(crate) async fn list(&self, q: RequestQuery) -> Result<(Vec<Request>, u64), StoreError> {
        let mut wh = vec!["NOT deleting".to_string()];
        let mut args: Vec<String> = Vec::new();
        if !q.statuses.is_empty() {
            args.extend(q.statuses.iter().map(|s| s.as_str().to_string()));
            let marks: Vec<String> = (1..=args.len()).map(|i| format!("${i}")).collect();
            wh.push(format!("status IN ({})", marks.join(",")));
        }
        if let Some(vm) = &q.vm_name {
            args.push(vm.clone());
            wh.push(format!("vm_name = ${}", args.len()));
        }
        if let Some(by) = &q.submitted_by {
            args.push(by.clone());
            wh.push(format!("submitted_by = ${}", args.len()));
        }
        if let Some(p) = &q.uuid_prefix {
            debug_assert!(p.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
            args.push(p.to_ascii_lowercase());
            // left() keeps it a prefix match with no LIKE wildcards to escape.
            wh.push(format!("left(uuid, {}) = ${}", p.len(), args.len()));
        }
        let wh = format!("WHERE {}", wh.join(" AND "));
        let count_sql = format!("SELECT COUNT(*) FROM requests {wh}");
        let sql = format!(
            "SELECT {COLUMNS}, {KEY_COLUMNS} FROM requests {wh} \
             ORDER BY created_at DESC, row_id DESC LIMIT {} OFFSET {}",
            q.limit, q.offset
        );
        let params: Vec<&(dyn ToSql + Sync)> =
            args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let listed = retry!(self, "list", |c| {
            let total: i64 = c.query_one(&count_sql, &params).await?.get(0);
            let rows = c.query(&sql, &params).await?;
            let keys = rows
                .iter()
                .map(key_columns)
                .collect::<Result<Vec<_>, _>>()?;
            let mut rows = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
            fill_waiting(c, &self.hosts, &mut rows).await?;
            let head = if crate::store::hosts::any_pending(&rows) {
                queue::head(c).await?
            } else {
                Vec::new()
            };
            let places = Positions::listed(&rows, &keys, &head);
            Ok((rows, places, total as u64))
        });
        let (mut rows, places, total) = listed?;
        self.fill_positions(&mut rows, places).await?;
        Ok((rows, total))
    }

    /// One statement: the subquery locks the first pending row in the claim order
    /// (`store/queue.rs`) that this host can run, skipping
    /// rows other claimers hold, so concurrent claimers never wait on each other nor take the
    /// same row. A claim that finds nothing sends no `NOTIFY`.
    pub(crate) async fn claim_as(
        &self,
        agent: &AgentId,
        caps: &Capabilities,
        lease: Duration,
    ) -> Result<Option<Request>, StoreError> {
        let agent = agent.0.clone();
        let labels = serde_json::to_string(&caps.labels).expect("labels serialise");
        let host = caps.host_id.clone();
        // One `now` across retries: a claim whose COMMIT was lost is found by it (an agent id
        // claims one request at a time).
        let now = timefmt::now();
        let sql = format!(
            "UPDATE requests
             SET status = 'acknowledged', agent_id = $2, lease_expires_at = $3, updated_at = $4,
                 host_id = $5
             WHERE uuid = (SELECT uuid FROM requests WHERE status = 'pending' AND {ELIGIBLE}
                           ORDER BY {CLAIM_ORDER} LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING {COLUMNS}"
        );
        let found = format!(
            "SELECT {COLUMNS} FROM requests
             WHERE agent_id = $1 AND updated_at = $2 AND status = 'acknowledged'"
        );
        write_tx!(
            self,
            "claim",
            |tx| async {
                tx.query_typed_opt(
                    &sql,
                    &[
                        (&labels, Type::TEXT),
                        (&agent, Type::TEXT),
                        (&lease_until(lease), Type::TEXT),
                        (&now, Type::TEXT),
                        (&host, Type::TEXT),
                    ],
                )
                .await?
                .map(|r| from_row(&r))
                .transpose()
            }
            .await,
            recheck | c | {
                match c.query_opt(&found, &[&agent, &now]).await? {
                    Some(r) => Ok(Some(Some(from_row(&r)?))),
                    None => Ok(None),
                }
            },
            quiet_if | v | v.is_none()
        )
    }

    pub(crate) async fn mark_running(
        &self,
        id: RequestId,
        agent: &AgentId,
    ) -> Result<bool, StoreError> {
        let (agent, uuid, now) = (agent.0.clone(), id.to_string(), timefmt::now());
        write_tx!(
            self,
            "mark_running",
            |tx| async {
                let n = tx
                    .execute_typed(
                        "UPDATE requests SET status = 'running', started_at = $1, updated_at = $1
                     WHERE uuid = $2 AND agent_id = $3 AND status = 'acknowledged'",
                        &[
                            (&now, Type::TEXT),
                            (&uuid, Type::TEXT),
                            (&agent, Type::TEXT),
                        ],
                    )
                    .await?;
                Ok(n == 1)
            }
            .await,
            recheck | c | {
                let n = c
                .execute(
                    "SELECT 1 FROM requests WHERE uuid = $1 AND agent_id = $2 AND started_at = $3",
                    &[&uuid, &agent, &now],
                )
                .await?;
                Ok((n == 1).then_some(true))
            }
        )
    }

    /// Idempotent (the lease is set, not added to), so simply retried.
    pub(crate) async fn heartbeat(
        &self,
        id: RequestId,
        agent: &AgentId,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let (agent, uuid) = (agent.0.clone(), id.to_string());
        retry!(self, "heartbeat", |c| {
            let n = c
                .execute_typed(
                    "UPDATE requests SET lease_expires_at = $1
                     WHERE uuid = $2 AND agent_id = $3
                       AND status IN ('acknowledged','running','hold')",
                    &[
                        (&lease_until(lease), Type::TEXT),
                        (&uuid, Type::TEXT),
                        (&agent, Type::TEXT),
                    ],
                )
                .await?;
            Ok(n == 1)
        })
    }

    pub(crate) async fn finish(
        &self,
        id: RequestId,
        agent: &AgentId,
        fin: Finish,
    ) -> Result<bool, StoreError> {
        debug_assert!(fin.status.is_terminal());
        let (agent, uuid, now) = (agent.0.clone(), id.to_string(), timefmt::now());
        let status = fin.status.as_str();
        let step = fin.shutdown_step.map(|s| s.as_str());
        let mode = fin.boot_mode.map(|m| m.as_str());
        let channel = fin.channel.map(|c| c.as_str());
        write_tx!(
            self,
            "finish",
            |tx| async {
                // Deleted while it ran: now that its VM is down, it goes with its logs.
                let gone = tx
                    .execute_typed(
                        "DELETE FROM requests WHERE uuid = $1 AND agent_id = $2 AND deleting",
                        &[(&uuid, Type::TEXT), (&agent, Type::TEXT)],
                    )
                    .await?;
                if gone == 1 {
                    return Ok(true);
                }
                let owned = retry::attempt_row(
                    &tx,
                    "uuid = $1 AND agent_id = $2 AND status NOT IN ('done','failed','cancelled')",
                    &[&uuid, &agent],
                )
                .await?;
                let Some(row) = owned else {
                    return Ok(false);
                };
                let requeue = match (&fin.error, fin.retryable) {
                    (Some(error), true) => crate::store::retry::requeue(&row, error, &now)?,
                    _ => None,
                };
                if let Some(q) = requeue {
                    retry::requeue_in(&tx, &uuid, &q, &now).await?;
                    return Ok(true);
                }
                let n = tx
                    .execute_typed(
                        "UPDATE requests SET status = $1, exit_code = $2, error = $3,
                            shutdown_step = $4, finished_at = $5, updated_at = $5,
                            lease_expires_at = NULL, desired_status = NULL, boot_ms = $8,
                            run_ms = $9, shutdown_ms = $10, boot_mode = $11, restore_ms = $12,
                            channel = $13, kept_ms = $14
                     WHERE uuid = $6 AND agent_id = $7
                       AND status NOT IN ('done','failed','cancelled')",
                        &[
                            (&status, Type::TEXT),
                            (&fin.exit_code, Type::INT4),
                            (&fin.error, Type::TEXT),
                            (&step, Type::TEXT),
                            (&now, Type::TEXT),
                            (&uuid, Type::TEXT),
                            (&agent, Type::TEXT),
                            (&fin.boot_ms, Type::INT8),
                            (&fin.run_ms, Type::INT8),
                            (&fin.shutdown_ms, Type::INT8),
                            (&mode, Type::TEXT),
                            (&fin.restore_ms, Type::INT8),
                            (&channel, Type::TEXT),
                            (&fin.kept_ms, Type::INT8),
                        ],
                    )
                    .await?;
                // Keystrokes nobody will type any more.
                tx.execute_typed(
                    "DELETE FROM console_input WHERE request_uuid = $1",
                    &[(&uuid, Type::TEXT)],
                )
                .await?;
                if n == 1 {
                    super::webhooks::enqueue_in(&tx, &uuid, Event::Finished, &now).await?;
                }
                Ok(n == 1)
            }
            .await,
            recheck | c | {
                // Ours if it carries this very finish time, or this re-queue's time with no
                // owner, or if it is gone (a deletion we ran).
                let row = c
                    .query_opt(
                        "SELECT (finished_at = $2 AND agent_id = $3)
                                OR (updated_at = $2 AND agent_id IS NULL AND attempts IS NOT NULL)
                         FROM requests WHERE uuid = $1",
                        &[&uuid, &now, &agent],
                    )
                    .await?;
                Ok(match row {
                    None => Some(true),
                    Some(r) => r.get::<_, Option<bool>>(0).unwrap_or(false).then_some(true),
                })
            }
        )
    }
}

//! Request rows: create, read, claim, and the agent's state changes.

use super::hosts::{self, Capabilities, ELIGIBLE};
use super::queue::{self, ClaimKey, Place, Positions, AHEAD, CLAIM_ORDER, NEXT_TURN};
use super::retry;
use super::{webhooks, Store, StoreError};
use crate::model::{
    AgentId, BootMode, Channel, NewRequest, Request, RequestId, ShutdownStep, Status,
};
use crate::timefmt;
use crate::webhooks::Event;
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use std::time::Duration;

const COLUMNS: &str = "uuid, vm_name, commands, timeout, status, created_at, updated_at, \
     started_at, finished_at, exit_code, error, agent_id, desired_status, shutdown_step, \
     boot_ms, run_ms, shutdown_ms, boot, boot_mode, restore_ms, artifact_globs, channel, \
     requires, host_id, keep_on_failure, kept_until, kept_ms, submitted_by, callback_url, \
     retries, attempt, attempts, priority";

/// How many columns `COLUMNS` names (a query's extra columns come after them).
const COLUMN_COUNT: usize = 33;

/// One request by uuid: its columns, its place in the claim order (`KEY_COLUMNS`, then
/// `AHEAD`'s two counts) and whether it has webhook targets (whether it can have deliveries).
static GET: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {COLUMNS}, {KEY_COLUMNS}, {ahead}, webhook_urls IS NOT NULL FROM requests r
         WHERE uuid = ?1 AND deleting = 0",
        ahead = *AHEAD
    )
});

/// The extra columns after `COLUMNS` that place a row in the claim order.
const KEY_COLUMNS: &str = "queue_tag, rowid";

/// `(queue_tag, rowid)` of a row read with [`KEY_COLUMNS`] after `COLUMNS`.
fn key_columns(r: &Row<'_>) -> rusqlite::Result<(i64, i64)> {
    Ok((r.get(COLUMN_COUNT)?, r.get(COLUMN_COUNT + 1)?))
}

pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<Result<Request, StoreError>> {
    let uuid: String = r.get(0)?;
    let status: String = r.get(4)?;
    let desired: Option<String> = r.get(12)?;
    let step: Option<String> = r.get(13)?;
    let boot: Option<String> = r.get(17)?;
    let boot_mode: Option<String> = r.get(18)?;
    let globs: Option<String> = r.get(20)?;
    let channel: Option<String> = r.get(21)?;
    let requires: Option<String> = r.get(22)?;
    let attempts: Option<String> = r.get(31)?;
    let build = || -> Result<Request, StoreError> {
        let bad = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("request {uuid}: {e}"));
        Ok(Request {
            uuid: uuid.parse().map_err(|e| bad(&e))?,
            vm_name: r.get(1)?,
            commands: r.get(2)?,
            timeout: r.get(3)?,
            status: status.parse().map_err(|e| bad(&e))?,
            created_at: r.get(5)?,
            updated_at: r.get(6)?,
            started_at: r.get(7)?,
            finished_at: r.get(8)?,
            exit_code: r.get(9)?,
            error: r.get(10)?,
            agent_id: r.get(11)?,
            desired_status: desired
                .map(|s| s.parse())
                .transpose()
                .map_err(|e| bad(&e))?,
            shutdown_step: step.map(|s| s.parse()).transpose().map_err(|e| bad(&e))?,
            boot_ms: r.get(14)?,
            run_ms: r.get(15)?,
            shutdown_ms: r.get(16)?,
            boot: boot.map(|s| s.parse()).transpose().map_err(|e| bad(&e))?,
            boot_mode: boot_mode
                .map(|s| s.parse())
                .transpose()
                .map_err(|e| bad(&e))?,
            restore_ms: r.get(19)?,
            artifacts: match globs {
                Some(j) => serde_json::from_str(&j).map_err(|e| bad(&e))?,
                None => Vec::new(),
            },
            channel: channel
                .map(|s| s.parse())
                .transpose()
                .map_err(|e| bad(&e))?,
            requires: match requires {
                Some(j) => serde_json::from_str(&j).map_err(|e| bad(&e))?,
                None => Vec::new(),
            },
            host: r.get(23)?,
            waiting_for: None,
            keep_on_failure: r.get(24)?,
            kept_until: r.get(25)?,
            kept_ms: r.get(26)?,
            submitted_by: r.get(27)?,
            callback_url: r.get(28)?,
            webhooks: None,
            retries: r.get(29)?,
            attempt: r.get(30)?,
            attempts: match attempts {
                Some(j) => serde_json::from_str(&j).map_err(|e| bad(&e))?,
                None => Vec::new(),
            },
            priority: r.get(32)?,
            queue_position: None,
        })
    };
    Ok(build())
}

/// Filters for listing requests, newest first.
#[derive(Debug, Clone, Default)]
pub struct RequestQuery {
    pub statuses: Vec<Status>,
    pub vm_name: Option<String>,
    /// Lower-case hex digits and hyphens only (checked by the caller), so it is a plain prefix.
    pub uuid_prefix: Option<String>,
    /// Only requests this principal submitted.
    pub submitted_by: Option<String>,
    pub limit: u32,
    pub offset: u32,
}

/// How a run ended, as the agent records it.
#[derive(Debug, Clone, Default)]
pub struct Finish {
    pub status: Status,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub shutdown_step: Option<ShutdownStep>,
    /// Start of the vCPUs to the shell prompt.
    pub boot_ms: Option<i64>,
    /// Prompt to the end of the commands (time held excluded).
    pub run_ms: Option<i64>,
    /// The shutdown ladder.
    pub shutdown_ms: Option<i64>,
    /// How the guest got to its prompt, once it did.
    pub boot_mode: Option<BootMode>,
    /// QEMU start to a restored guest's readiness.
    pub restore_ms: Option<i64>,
    /// How the commands' output travelled, once they ran.
    pub channel: Option<Channel>,
    /// How long a failed run's VM was kept, if it was.
    pub kept_ms: Option<i64>,
    /// The run failed for an infrastructure reason (`agent/retry.rs`): with retries left, the
    /// request is re-queued as its next attempt instead (see `store/retry.rs`).
    pub retryable: bool,
}

/// Says why pending requests wait when no live host can claim them now (one read of the
/// registry for all of them).
fn fill_waiting(
    c: &rusqlite::Connection,
    cache: &hosts::HostsCache,
    reqs: &mut [Request],
) -> Result<(), StoreError> {
    if !hosts::any_pending(reqs) {
        return Ok(());
    }
    let hosts = match cache.fresh() {
        Some(h) => h,
        None => cache.keep(hosts::hosts_in(c, false)?),
    };
    hosts::say_why(reqs, &hosts);
    Ok(())
}

fn lease_until(lease: Duration) -> String {
    timefmt::format(time::OffsetDateTime::now_utc() + lease)
}

impl Store {
    /// Stores a new `pending` request; the row as stored (`waiting_for`, which reads work out
    /// from the hosts, is left out: the API answers a submission with its id and status).
    pub async fn create(&self, new: NewRequest) -> Result<Request, StoreError> {
        on_pg!(self.create(new));
        let id = RequestId::new();
        let now = timefmt::now();
        let mut requires = new.requires;
        requires.sort();
        requires.dedup();
        // The row as it is inserted (what reading it back would return); the writer thread
        // only writes, so that its one thread does as little per request as it can.
        let req = Request {
            uuid: id,
            vm_name: new.vm_name,
            commands: new.commands,
            timeout: new.timeout,
            status: Status::Pending,
            created_at: now.clone(),
            updated_at: now,
            started_at: None,
            finished_at: None,
            exit_code: None,
            error: None,
            agent_id: None,
            desired_status: None,
            shutdown_step: None,
            boot_ms: None,
            run_ms: None,
            shutdown_ms: None,
            boot: new.boot,
            boot_mode: None,
            restore_ms: None,
            artifacts: new.artifacts,
            channel: None,
            requires,
            host: None,
            waiting_for: None,
            keep_on_failure: new.keep_on_failure,
            kept_until: None,
            kept_ms: None,
            submitted_by: new.submitted_by,
            callback_url: new.callback_url,
            webhooks: None,
            retries: new.retries,
            attempt: 1,
            attempts: Vec::new(),
            priority: new.priority,
            // Not counted here (a count per submission); reads show it.
            queue_position: None,
        };
        let webhook_urls = (!new.webhook_urls.is_empty())
            .then(|| serde_json::to_string(&new.webhook_urls).expect("json"));
        let row = req.clone();
        let uploads = new.uploads;
        // Committed with whatever other writes are queued (group commit); the insert and the
        // linking of its uploads are one savepoint, so a failure takes back both, and only them.
        // Without uploads it is the one INSERT, which needs no savepoint.
        let single = uploads.is_empty();
        let op = move |tx: &rusqlite::Connection| {
            tx.prepare_cached(&format!(
                "INSERT INTO requests (uuid, vm_name, commands, timeout, status, created_at, updated_at,
                                       boot, artifact_globs, requires, keep_on_failure,
                                       submitted_by, priority, callback_url, webhook_urls, retries,
                                       queue_tag)
                 VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14,
                         {NEXT_TURN})"
            ))?
            .execute(params![
                id.to_string(),
                row.vm_name,
                row.commands,
                row.timeout,
                row.created_at,
                row.boot.map(|b| b.as_str()),
                (!row.artifacts.is_empty())
                    .then(|| serde_json::to_string(&row.artifacts).expect("json")),
                (!row.requires.is_empty())
                    .then(|| serde_json::to_string(&row.requires).expect("json")),
                row.keep_on_failure,
                row.submitted_by,
                row.priority,
                row.callback_url,
                webhook_urls,
                row.retries,
            ])?;
            for (seq, upload) in uploads.iter().enumerate() {
                let n = tx
                    .prepare_cached(
                        "UPDATE uploads SET request_uuid = ?1, seq = ?2
                         WHERE id = ?3 AND request_uuid IS NULL",
                    )?
                    .execute(params![id.to_string(), seq as i64, upload])?;
                if n != 1 {
                    return Err(StoreError::Corrupt(format!(
                        "upload {upload} is not staged (already linked, or dropped)"
                    )));
                }
            }
            Ok(())
        };
        if single {
            self.call_batched_statement(op).await?;
        } else {
            self.call_batched(op).await?;
        }
        self.bump();
        Ok(req)
    }

    /// The request as the API shows it: one being deleted is already gone.
    pub async fn get(&self, id: RequestId) -> Result<Option<Request>, StoreError> {
        on_pg!(self.read_one(id, false));
        self.read_one(id, false).await
    }

    /// A request as `GET /requests/{uuid}` shows it: [`Store::get`] with its webhook
    /// deliveries (on SQLite from the same snapshot as the row; on PostgreSQL by a second
    /// query right after it).
    pub async fn show(&self, id: RequestId) -> Result<Option<Request>, StoreError> {
        on_pg!(self.read_one(id, true));
        self.read_one(id, true).await
    }

    async fn read_one(
        &self,
        id: RequestId,
        deliveries: bool,
    ) -> Result<Option<Request>, StoreError> {
        let found = self.call_point_read(move |c| {
            let mut stmt = c.prepare_cached(&GET)?;
            let mut rows = stmt.query([id.to_string()])?;
            let Some(row) = rows.next()? else {
                return Ok(None);
            };
            let mut req = from_row(row)??;
            let (turn, rowid) = key_columns(row)?;
            let ahead: (Option<i64>, Option<i64>) =
                (row.get(COLUMN_COUNT + 2)?, row.get(COLUMN_COUNT + 3)?);
            let has_targets: bool = row.get(COLUMN_COUNT + 4)?;
            let place = match ahead {
                (Some(higher), Some(earlier)) => {
                    let key = ClaimKey::new(req.priority, turn, req.created_at.clone(), rowid);
                    vec![Place::counted(key, higher, earlier)]
                }
                _ => Vec::new(),
            };
            // `rows` is still open, so its read transaction (and snapshot) spans these reads:
            // one transaction for the whole answer, and deliveries consistent with the row. A
            // request submitted without targets has none to read.
            if deliveries {
                req.webhooks = Some(match has_targets {
                    true => webhooks::deliveries_in(c, id)?,
                    false => Vec::new(),
                });
            }
            fill_waiting(c, &self.inner.hosts, std::slice::from_mut(&mut req))?;
            drop(rows);
            Ok(Some((req, place)))
        })?;
        let Some((mut req, place)) = found else {
            return Ok(None);
        };
        self.fill_positions(std::slice::from_mut(&mut req), place)
            .await?;
        Ok(Some(req))
    }

    /// Requests matching `q`, newest first, and the total number matching (ignoring limit/offset).
    pub async fn list(&self, q: RequestQuery) -> Result<(Vec<Request>, u64), StoreError> {
        on_pg!(self.list(q));
        let inner = self.inner.clone();
        let listed = self
            .call(move |c| {
                let mut wh = vec!["deleting = 0".to_string()];
                let mut args: Vec<String> = Vec::new();
                if !q.statuses.is_empty() {
                    let marks = vec!["?"; q.statuses.len()].join(",");
                    wh.push(format!("status IN ({marks})"));
                    args.extend(q.statuses.iter().map(|s| s.as_str().to_string()));
                }
                if let Some(vm) = &q.vm_name {
                    wh.push("vm_name = ?".into());
                    args.push(vm.clone());
                }
                if let Some(by) = &q.submitted_by {
                    wh.push("submitted_by = ?".into());
                    args.push(by.clone());
                }
                if let Some(p) = &q.uuid_prefix {
                    debug_assert!(p.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
                    // substr keeps it a prefix match with no LIKE wildcards to escape.
                    wh.push(format!("substr(uuid, 1, {}) = ?", p.len()));
                    args.push(p.to_ascii_lowercase());
                }
                let wh = format!("WHERE {}", wh.join(" AND "));
                let total: u64 = c.query_row(
                    &format!("SELECT COUNT(*) FROM requests {wh}"),
                    rusqlite::params_from_iter(args.iter()),
                    |r| r.get(0),
                )?;
                let sql = format!(
                    "SELECT {COLUMNS}, {KEY_COLUMNS} FROM requests {wh}
                 ORDER BY created_at DESC, rowid DESC LIMIT {} OFFSET {}",
                    q.limit, q.offset
                );
                let mut stmt = c.prepare(&sql)?;
                let (mut rows, keys): (Vec<Request>, Vec<(i64, i64)>) = stmt
                    .query_map(rusqlite::params_from_iter(args.iter()), |row| {
                        Ok(from_row(row)?.map(|req| (req, key_columns(row))))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?
                    .into_iter()
                    .map(|r| r.and_then(|(req, key)| Ok((req, key?))))
                    .collect::<Result<Vec<_>, StoreError>>()?
                    .into_iter()
                    .unzip();
                fill_waiting(c, &inner.hosts, &mut rows)?;
                let head = if hosts::any_pending(&rows) {
                    queue::head(c)?
                } else {
                    Vec::new()
                };
                let places = Positions::listed(&rows, &keys, &head);
                Ok((rows, places, total))
            })
            .await?;
        let (mut rows, places, total) = listed;
        self.fill_positions(&mut rows, places).await?;
        Ok((rows, total))
    }

    /// Atomically takes the first `pending` request in the claim order (`store/queue.rs`) that
    /// needs no labels, for `agent` (whose
    /// host is the part of its id before the first `:`), or `None`.
    pub async fn claim(
        &self,
        agent: &AgentId,
        lease: Duration,
    ) -> Result<Option<Request>, StoreError> {
        let host = agent.0.split(':').next().unwrap_or_default().to_string();
        let caps = Capabilities {
            host_id: host,
            labels: Vec::new(),
        };
        self.claim_as(agent, &caps, lease).await
    }

    /// Atomically takes the first `pending` request in the claim order (`store/queue.rs`:
    /// priority, then round-robin between submitters) whose required labels are all among
    /// `caps.labels`, for `agent` on `caps.host_id`, or `None`. The filter is inside the one
    /// `UPDATE`, and `BEGIN IMMEDIATE` serialises claimers across processes, so no request is
    /// ever run twice and none is skipped for a later one in the order that the same host could run.
    pub async fn claim_as(
        &self,
        agent: &AgentId,
        caps: &Capabilities,
        lease: Duration,
    ) -> Result<Option<Request>, StoreError> {
        on_pg!(self.claim_as(agent, caps, lease));
        let agent = agent.0.clone();
        let labels = serde_json::to_string(&caps.labels).expect("labels serialise");
        let host = caps.host_id.clone();
        self.call_write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = timefmt::now();
            let id: Option<String> = tx
                .query_row(
                    &format!(
                        "UPDATE requests
                         SET status = 'acknowledged', agent_id = ?2, lease_expires_at = ?3,
                             updated_at = ?4, host_id = ?5
                         WHERE uuid = (SELECT uuid FROM requests WHERE status = 'pending'
                                         AND {ELIGIBLE}
                                       ORDER BY {CLAIM_ORDER} LIMIT 1)
                         RETURNING uuid"
                    ),
                    params![labels, agent, lease_until(lease), now, host],
                    |r| r.get(0),
                )
                .optional()?;
            let req = match id {
                Some(id) => get_in(
                    &tx,
                    id.parse()
                        .map_err(|e| StoreError::Corrupt(format!("uuid {id}: {e}")))?,
                )?,
                None => None,
            };
            tx.commit()?;
            Ok(req)
        })
        .await
        .inspect(|r| {
            if r.is_some() {
                self.bump()
            }
        })
    }

    /// `acknowledged → running`, recording when the VM started.
    pub async fn mark_running(&self, id: RequestId, agent: &AgentId) -> Result<bool, StoreError> {
        on_pg!(self.mark_running(id, agent));
        let agent = agent.0.clone();
        self.call_batched_statement(move |c| {
            let now = timefmt::now();
            let n = c
                .prepare_cached(
                    "UPDATE requests SET status = 'running', started_at = ?1, updated_at = ?1
                 WHERE uuid = ?2 AND agent_id = ?3 AND status = 'acknowledged'",
                )?
                .execute(params![now, id.to_string(), agent])?;
            Ok(n == 1)
        })
        .await
        .inspect(|_| self.bump())
    }

    /// Extends the lease of a request the agent still owns.
    pub async fn heartbeat(
        &self,
        id: RequestId,
        agent: &AgentId,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        on_pg!(self.heartbeat(id, agent, lease));
        let agent = agent.0.clone();
        self.call_batched_statement(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE requests SET lease_expires_at = ?1
                 WHERE uuid = ?2 AND agent_id = ?3 AND status IN ('acknowledged','running','hold')",
                )?
                .execute(params![lease_until(lease), id.to_string(), agent])?;
            Ok(n == 1)
        })
        .await
    }

    /// Records the final state of a run the agent owns; a request already terminal is left
    /// alone. A retryable failure with retries left re-queues the request as its next attempt
    /// instead, fenced by the same ownership. True when something was written.
    pub async fn finish(
        &self,
        id: RequestId,
        agent: &AgentId,
        fin: Finish,
    ) -> Result<bool, StoreError> {
        on_pg!(self.finish(id, agent, fin));
        debug_assert!(fin.status.is_terminal());
        let agent = agent.0.clone();
        self.call_write(move |c| {
            // One transaction: the final state (or the re-queue) and the webhook deliveries a
            // final state causes.
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = timefmt::now();
            let uuid = id.to_string();
            // Deleted while it ran: now that its VM is down, it goes with its logs.
            let gone = tx.execute(
                "DELETE FROM requests WHERE uuid = ?1 AND agent_id = ?2 AND deleting = 1",
                params![uuid, agent],
            )?;
            if gone == 1 {
                tx.commit()?;
                return Ok(true);
            }
            let owned = retry::attempt_row(
                &tx,
                "uuid = ?1 AND agent_id = ?2 AND status NOT IN ('done','failed','cancelled')",
                params![uuid, agent],
            )?;
            let Some(row) = owned else {
                return Ok(false);
            };
            let requeue = match (&fin.error, fin.retryable) {
                (Some(error), true) => retry::requeue(&row, error, &now)?,
                _ => None,
            };
            if let Some(q) = requeue {
                retry::requeue_in(&tx, &uuid, &q, &now)?;
                tx.commit()?;
                return Ok(true);
            }
            let n = tx.execute(
                "UPDATE requests SET status = ?1, exit_code = ?2, error = ?3, shutdown_step = ?4,
                        finished_at = ?5, updated_at = ?5, lease_expires_at = NULL, desired_status = NULL,
                        boot_ms = ?8, run_ms = ?9, shutdown_ms = ?10, boot_mode = ?11, restore_ms = ?12,
                        channel = ?13, kept_ms = ?14
                 WHERE uuid = ?6 AND agent_id = ?7
                   AND status NOT IN ('done','failed','cancelled')",
                params![
                    fin.status.as_str(),
                    fin.exit_code,
                    fin.error,
                    fin.shutdown_step.map(|s| s.as_str()),
                    now,
                    uuid,
                    agent,
                    fin.boot_ms,
                    fin.run_ms,
                    fin.shutdown_ms,
                    fin.boot_mode.map(|m| m.as_str()),
                    fin.restore_ms,
                    fin.channel.map(|c| c.as_str()),
                    fin.kept_ms,
                ],
            )?;
            // Keystrokes nobody will type any more.
            tx.execute("DELETE FROM console_input WHERE request_uuid = ?1", [&uuid])?;
            if n == 1 {
                webhooks::enqueue_in(&tx, &uuid, Event::Finished, &now)?;
            }
            tx.commit()?;
            Ok(n == 1)
        })
        .await
        .inspect(|_| self.bump())
    }
}

/// Whether a DELETE is removing the request (hidden from the API until its agent is done).
pub(super) fn is_deleting(c: &rusqlite::Connection, id: RequestId) -> Result<bool, StoreError> {
    let d: Option<bool> = c
        .query_row(
            "SELECT deleting FROM requests WHERE uuid = ?1",
            [id.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    Ok(d.unwrap_or(false))
}

pub(super) fn get_in(
    c: &rusqlite::Connection,
    id: RequestId,
) -> Result<Option<Request>, StoreError> {
    let row = c
        .prepare_cached(&format!("SELECT {COLUMNS} FROM requests WHERE uuid = ?1"))?
        .query_row([id.to_string()], from_row)
        .optional()?;
    row.transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    fn new(vm: &str) -> NewRequest {
        NewRequest {
            vm_name: vm.into(),
            commands: "echo hi".into(),
            timeout: 30,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn create_get_round_trip() {
        let (s, _d) = temp_store().await;
        let r = s.create(new("tiny")).await.unwrap();
        assert_eq!(r.status, Status::Pending);
        assert_eq!(r.created_at, r.updated_at);
        let got = s.get(r.uuid).await.unwrap().unwrap();
        assert_eq!(got.queue_position, Some(1), "reads count the queue");
        assert_eq!(
            got.waiting_for.as_deref(),
            Some("no agents host has reported yet")
        );
        assert_eq!(
            Request {
                waiting_for: None,
                queue_position: None,
                ..got
            },
            r
        );
        assert!(s.get(RequestId::new()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn claim_takes_oldest_once() {
        let (s, _d) = temp_store().await;
        let a = s.create(new("a")).await.unwrap();
        let b = s.create(new("b")).await.unwrap();
        let agent = AgentId("t:1:0".into());
        let lease = Duration::from_secs(30);
        let c1 = s.claim(&agent, lease).await.unwrap().unwrap();
        assert_eq!((c1.uuid, c1.status), (a.uuid, Status::Acknowledged));
        assert_eq!(c1.agent_id.as_deref(), Some("t:1:0"));
        assert_eq!(s.claim(&agent, lease).await.unwrap().unwrap().uuid, b.uuid);
        assert!(s.claim(&agent, lease).await.unwrap().is_none());
    }

    /// Claims with one agent per store until nothing is left; asserts nothing was claimed twice
    /// and returns how many were claimed.
    async fn claim_all_concurrently(stores: Vec<Store>) -> usize {
        let mut tasks = Vec::new();
        for (i, s) in stores.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let agent = AgentId(format!("t:1:{i}"));
                let mut got = Vec::new();
                while let Some(r) = s.claim(&agent, Duration::from_secs(30)).await.unwrap() {
                    got.push(r.uuid);
                }
                got
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(n, all.len(), "a request was claimed twice");
        n
    }

    #[tokio::test]
    async fn concurrent_claims_never_share_a_request() {
        let (s, _d) = temp_store().await;
        for _ in 0..40 {
            s.create(new("x")).await.unwrap();
        }
        // One store: its pool's connections claim in parallel.
        assert_eq!(claim_all_concurrently(vec![s.clone(); 8]).await, 40);
    }

    #[tokio::test]
    async fn separate_handles_on_one_file_never_share_a_request() {
        // Each Store has its own connections, as separate processes would.
        let (first, dir) = temp_store().await;
        for _ in 0..30 {
            first.create(new("x")).await.unwrap();
        }
        let mut stores = Vec::new();
        for _ in 0..4 {
            stores.push(dir.reopen().await);
        }
        assert_eq!(claim_all_concurrently(stores).await, 30);
    }

    #[tokio::test]
    async fn running_and_finish_need_ownership() {
        let (s, _d) = temp_store().await;
        let r = s.create(new("a")).await.unwrap();
        let me = AgentId("me".into());
        let other = AgentId("other".into());
        s.claim(&me, Duration::from_secs(30)).await.unwrap();
        assert!(!s.mark_running(r.uuid, &other).await.unwrap());
        assert!(s.mark_running(r.uuid, &me).await.unwrap());
        assert!(s
            .heartbeat(r.uuid, &me, Duration::from_secs(5))
            .await
            .unwrap());
        let fin = Finish {
            status: Status::Done,
            exit_code: Some(3),
            shutdown_step: Some(ShutdownStep::Powerdown),
            boot_ms: Some(2500),
            ..Default::default()
        };
        assert!(!s.finish(r.uuid, &other, fin.clone()).await.unwrap());
        assert!(s.finish(r.uuid, &me, fin.clone()).await.unwrap());
        assert!(
            !s.finish(r.uuid, &me, fin).await.unwrap(),
            "terminal stays terminal"
        );
        let got = s.get(r.uuid).await.unwrap().unwrap();
        assert_eq!(got.status, Status::Done);
        assert_eq!(got.exit_code, Some(3));
        assert_eq!(got.shutdown_step, Some(ShutdownStep::Powerdown));
        assert_eq!(got.boot_ms, Some(2500));
        assert!(got.started_at.is_some() && got.finished_at.is_some());
    }

    /// Fencing: an agent whose lease expired and whose request was recovered writes nothing
    /// over the state that is no longer its own (the new owner's, or the recovered outcome).
    #[tokio::test]
    async fn an_agent_that_lost_its_lease_cannot_overwrite_the_new_owner() {
        let (s, _d) = temp_store().await;
        let old = AgentId("h1:1:0".into());
        let new_owner = AgentId("h2:2:0".into());
        let short = Duration::from_millis(1);
        let fin = Finish {
            status: Status::Done,
            exit_code: Some(0),
            ..Default::default()
        };
        // Lost before it ran: re-queued, claimed by another agent.
        let r = s.create(new("a")).await.unwrap();
        s.claim(&old, short).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(s.reap_expired().await.unwrap(), [(r.uuid, Status::Pending)]);
        let got = s
            .claim(&new_owner, Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((got.uuid, got.host.as_deref()), (r.uuid, Some("h2")));
        assert!(!s.mark_running(r.uuid, &old).await.unwrap());
        assert!(!s.heartbeat(r.uuid, &old, short).await.unwrap());
        assert!(!s.apply_desired(r.uuid, &old, Status::Hold).await.unwrap());
        assert!(!s.finish(r.uuid, &old, fin.clone()).await.unwrap());
        let now = s.get(r.uuid).await.unwrap().unwrap();
        assert_eq!(now.status, Status::Acknowledged);
        assert_eq!(now.agent_id.as_deref(), Some("h2:2:0"));
        assert!(s.mark_running(r.uuid, &new_owner).await.unwrap());
        assert!(s.finish(r.uuid, &new_owner, fin.clone()).await.unwrap());
        // Lost while it ran: recovered as failed, which the old agent's late finish keeps.
        let r = s.create(new("b")).await.unwrap();
        s.claim(&old, short).await.unwrap().unwrap();
        assert!(s.mark_running(r.uuid, &old).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(s.reap_expired().await.unwrap(), [(r.uuid, Status::Failed)]);
        assert!(!s.heartbeat(r.uuid, &old, short).await.unwrap());
        assert!(!s
            .apply_desired(r.uuid, &old, Status::Running)
            .await
            .unwrap());
        assert!(!s.finish(r.uuid, &old, fin).await.unwrap());
        let now = s.get(r.uuid).await.unwrap().unwrap();
        assert_eq!(
            (now.status, now.error.as_deref()),
            (Status::Failed, Some("agent lost"))
        );
        assert_eq!(now.exit_code, None);
    }

    #[tokio::test]
    async fn list_filters_newest_first() {
        let (s, _d) = temp_store().await;
        let a = s.create(new("a")).await.unwrap();
        let b = s.create(new("b")).await.unwrap();
        s.claim(&AgentId("x".into()), Duration::from_secs(9))
            .await
            .unwrap();
        let (all, total) = s
            .list(RequestQuery {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(total, 2);
        assert_eq!(
            all.iter().map(|r| r.uuid).collect::<Vec<_>>(),
            [b.uuid, a.uuid]
        );
        let (pending, total) = s
            .list(RequestQuery {
                statuses: vec![Status::Pending],
                vm_name: Some("b' OR 1=1 --".into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            pending.is_empty() && total == 0,
            "filters are bound, not spliced"
        );
    }
}

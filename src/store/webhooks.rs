//! Webhook deliveries on SQLite: queued inside the transaction that ends a request
//! ([`enqueue_in`]), claimed by the API processes' workers under a lease, and their attempts
//! recorded. The retry decision is [`crate::webhooks::after_failure`], shared by both engines.

use super::{Store, StoreError};
use crate::model::RequestId;
use crate::timefmt;
use crate::webhooks::{Attempt, Delivery, Due, Event};
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use std::time::Duration;

/// The columns [`delivery_from_row`] reads (the PostgreSQL engine uses the same list).
pub(super) const DELIVERY_COLUMNS: &str = "delivery_id, event, url, state, attempts, \
     last_status, last_error, created_at, next_attempt_at, delivered_at";

/// The request's stored targets (`webhook_urls`, a JSON list), as both engines store them.
pub(super) fn parse_targets(json: Option<String>) -> Result<Vec<String>, StoreError> {
    match json {
        None => Ok(Vec::new()),
        Some(j) => serde_json::from_str(&j)
            .map_err(|e| StoreError::Corrupt(format!("webhook_urls {j:?}: {e}"))),
    }
}

/// A stored word as its type, or a corruption error naming it.
pub(super) fn word<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, StoreError> {
    s.parse().map_err(StoreError::Corrupt)
}

pub(super) fn parse_uuid(s: &str) -> Result<uuid::Uuid, StoreError> {
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("delivery id {s}: {e}")))
}

/// Queues one `event` delivery per target the request was submitted with; none for a request
/// without targets. Runs inside the caller's transaction, so the delivery exists if and only
/// if the state change that causes it was committed.
pub(super) fn enqueue_in(
    c: &rusqlite::Connection,
    id: &str,
    event: Event,
    now: &str,
) -> Result<(), StoreError> {
    let json: Option<String> = c
        .prepare_cached("SELECT webhook_urls FROM requests WHERE uuid = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?
        .flatten();
    for url in parse_targets(json)? {
        c.prepare_cached(
            "INSERT INTO webhook_deliveries (delivery_id, request_uuid, event, url, state,
                                             attempts, next_attempt_at, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?5, ?5)",
        )?
        .execute(params![
            uuid::Uuid::new_v4().to_string(),
            id,
            event.as_str(),
            url,
            now
        ])?;
    }
    Ok(())
}

/// A request's deliveries, oldest first, read on `c` (inside the caller's snapshot).
pub(super) fn deliveries_in(
    c: &rusqlite::Connection,
    id: RequestId,
) -> Result<Vec<Delivery>, StoreError> {
    let mut stmt = c.prepare_cached(&DELIVERIES)?;
    let rows = stmt
        .query_map([id.to_string()], delivery_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().collect()
}

static DELIVERIES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE request_uuid = ?1 ORDER BY id")
});

fn delivery_from_row(r: &Row<'_>) -> rusqlite::Result<Result<Delivery, StoreError>> {
    let id: String = r.get(0)?;
    let event: String = r.get(1)?;
    let state: String = r.get(3)?;
    let next: String = r.get(8)?;
    let (url, attempts, last_status, last_error, created_at, delivered_at) = (
        r.get(2)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(9)?,
    );
    Ok((|| {
        let state = word(&state)?;
        Ok(Delivery {
            id: parse_uuid(&id)?,
            event: word(&event)?,
            url,
            state,
            attempts,
            last_status,
            last_error,
            created_at,
            next_attempt_at: (state == crate::webhooks::DeliveryState::Pending).then_some(next),
            delivered_at,
        })
    })())
}

impl Store {
    /// A request's deliveries, oldest first (what `GET /requests/{uuid}` shows).
    pub async fn deliveries(&self, id: RequestId) -> Result<Vec<Delivery>, StoreError> {
        on_pg!(self.deliveries(id));
        self.call_point_read(move |c| deliveries_in(c, id))
    }

    /// Claims up to `limit` due deliveries for one attempt each: `attempts` counts it, and
    /// the lease keeps other workers off it until `lease` has passed (a worker that dies
    /// mid-attempt loses it to another then).
    pub async fn claim_deliveries(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<Due>, StoreError> {
        on_pg!(self.claim_deliveries(limit, lease));
        let claimed = self
            .call_write(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = timefmt::now();
                let until = timefmt::format(time::OffsetDateTime::now_utc() + lease);
                let rows: Vec<(i64, String, String, String, String, i64, String)> = {
                    let mut stmt = tx.prepare_cached(
                        "UPDATE webhook_deliveries
                         SET attempts = attempts + 1, leased_until = ?1, updated_at = ?2
                         WHERE id IN (SELECT id FROM webhook_deliveries
                                      WHERE state = 'pending' AND next_attempt_at <= ?2
                                        AND (leased_until IS NULL OR leased_until < ?2)
                                      ORDER BY next_attempt_at LIMIT ?3)
                         RETURNING id, delivery_id, request_uuid, event, url, attempts, created_at",
                    )?;
                    let rows = stmt.query_map(params![until, now, limit], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                        ))
                    })?;
                    rows.collect::<rusqlite::Result<_>>()?
                };
                tx.commit()?;
                Ok(rows)
            })
            .await?;
        claimed
            .into_iter()
            .map(|(row, id, req, event, url, attempts, created_at)| {
                Ok(Due {
                    row,
                    id: parse_uuid(&id)?,
                    request: super::control::parse_id(&req)?,
                    event: word(&event)?,
                    url,
                    attempts,
                    created_at,
                })
            })
            .collect()
    }

    /// Records an attempt's outcome and releases the lease.
    pub async fn record_attempt(&self, row: i64, a: Attempt) -> Result<(), StoreError> {
        on_pg!(self.record_attempt(row, a));
        self.call_write(move |c| {
            c.execute(
                "UPDATE webhook_deliveries
                 SET state = ?1, last_status = ?2, last_error = ?3,
                     next_attempt_at = COALESCE(?4, next_attempt_at), leased_until = NULL,
                     updated_at = ?5,
                     delivered_at = CASE WHEN ?1 = 'delivered' THEN ?5 ELSE delivered_at END
                 WHERE id = ?6",
                params![
                    a.state.as_str(),
                    a.status,
                    a.error,
                    a.next_attempt_at,
                    a.at,
                    row
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// When the next pending delivery is due (or its lease ends, for one another worker is
    /// sending), if any is pending.
    pub async fn next_delivery_due(&self) -> Result<Option<String>, StoreError> {
        on_pg!(self.next_delivery_due());
        self.call_point_read(|c| {
            Ok(c.prepare_cached(
                "SELECT MIN(MAX(next_attempt_at, COALESCE(leased_until, '')))
                 FROM webhook_deliveries WHERE state = 'pending'",
            )?
            .query_row([], |r| r.get(0))?)
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{AgentId, NewRequest, RequestId, Status};
    use crate::store::test_support::temp_store;
    use crate::store::{Finish, Store};
    use crate::webhooks::{Attempt, DeliveryState};
    use std::time::Duration;

    async fn with_targets(s: &Store, urls: &[&str]) -> crate::model::Request {
        s.create(NewRequest {
            vm_name: "t".into(),
            commands: "x".into(),
            timeout: 1,
            callback_url: urls.first().map(|u| u.to_string()),
            webhook_urls: urls.iter().map(|u| u.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
    }

    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_cancel_queues_one_delivery_per_target_in_its_transaction() {
        let (s, _d) = temp_store().await;
        let r = with_targets(&s, &["http://a/1", "http://b/2"]).await;
        assert_eq!(r.callback_url.as_deref(), Some("http://a/1"));
        assert!(s.deliveries(r.uuid).await.unwrap().is_empty());
        // Hold is not final: nothing is queued.
        s.control(r.uuid, Status::Hold).await.unwrap();
        assert!(s.deliveries(r.uuid).await.unwrap().is_empty());
        s.control(r.uuid, Status::Cancelled).await.unwrap();
        let d = s.deliveries(r.uuid).await.unwrap();
        assert_eq!(
            d.iter().map(|d| d.url.as_str()).collect::<Vec<_>>(),
            ["http://a/1", "http://b/2"]
        );
        assert!(d
            .iter()
            .all(|d| d.state == DeliveryState::Pending && d.attempts == 0));
        assert_ne!(d[0].id, d[1].id);
        // The request as shown carries them, in order; `get` leaves them out.
        let shown = s.show(r.uuid).await.unwrap().unwrap().webhooks.unwrap();
        assert_eq!(
            shown.iter().map(|d| d.id).collect::<Vec<_>>(),
            [d[0].id, d[1].id]
        );
        assert!(s.get(r.uuid).await.unwrap().unwrap().webhooks.is_none());
        // A request without targets queues nothing.
        let plain = with_targets(&s, &[]).await;
        s.control(plain.uuid, Status::Cancelled).await.unwrap();
        assert!(s.deliveries(plain.uuid).await.unwrap().is_empty());
        let shown = s.show(plain.uuid).await.unwrap().unwrap();
        assert!(shown.webhooks.is_some_and(|w| w.is_empty()));
        assert!(s.show(RequestId::new()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn claims_are_exclusive_and_attempts_are_recorded() {
        let (s, dir) = temp_store().await;
        let other = dir.reopen().await;
        let r = with_targets(&s, &["http://a/1"]).await;
        let agent = AgentId("h:1:0".into());
        s.claim(&agent, LEASE).await.unwrap().unwrap();
        s.mark_running(r.uuid, &agent).await.unwrap();
        let fin = Finish {
            status: Status::Done,
            exit_code: Some(0),
            ..Default::default()
        };
        assert!(s.finish(r.uuid, &agent, fin.clone()).await.unwrap());
        // A repeated finish changes nothing, and queues nothing more.
        assert!(!s.finish(r.uuid, &agent, fin).await.unwrap());
        assert_eq!(s.deliveries(r.uuid).await.unwrap().len(), 1);
        let due = s.claim_deliveries(10, LEASE).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].request, due[0].attempts), (r.uuid, 1));
        // Leased: no other worker (another process) gets it.
        assert!(other.claim_deliveries(10, LEASE).await.unwrap().is_empty());
        assert!(s.next_delivery_due().await.unwrap().is_some());
        let soon = crate::timefmt::format(time::OffsetDateTime::now_utc());
        s.record_attempt(
            due[0].row,
            Attempt {
                state: DeliveryState::Pending,
                status: Some(500),
                error: Some("HTTP 500".into()),
                next_attempt_at: Some(soon),
                at: crate::timefmt::now(),
            },
        )
        .await
        .unwrap();
        let again = other.claim_deliveries(10, LEASE).await.unwrap();
        assert_eq!((again.len(), again[0].attempts), (1, 2));
        assert_eq!(again[0].id, due[0].id, "the delivery id is stable");
        other
            .record_attempt(
                again[0].row,
                Attempt {
                    state: DeliveryState::Delivered,
                    status: Some(204),
                    error: None,
                    next_attempt_at: None,
                    at: crate::timefmt::now(),
                },
            )
            .await
            .unwrap();
        let d = &s.deliveries(r.uuid).await.unwrap()[0];
        assert_eq!(
            (d.state, d.attempts, d.last_status),
            (DeliveryState::Delivered, 2, Some(204))
        );
        assert!(d.delivered_at.is_some() && d.next_attempt_at.is_none());
        assert!(s.next_delivery_due().await.unwrap().is_none());
        assert!(s.claim_deliveries(10, LEASE).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn lease_recovery_that_fails_a_request_queues_its_delivery_and_delete_drops_them() {
        let (s, _d) = temp_store().await;
        let r = with_targets(&s, &["http://a/1"]).await;
        let agent = AgentId("h:1:0".into());
        s.claim(&agent, Duration::from_millis(1))
            .await
            .unwrap()
            .unwrap();
        s.mark_running(r.uuid, &agent).await.unwrap();
        // Re-queued (never ran) would not be final; this one ran, so it ends failed.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(s.reap_expired().await.unwrap(), [(r.uuid, Status::Failed)]);
        assert_eq!(s.deliveries(r.uuid).await.unwrap().len(), 1);
        let q = with_targets(&s, &["http://a/1"]).await;
        s.claim(&agent, Duration::from_millis(1))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(s.reap_expired().await.unwrap(), [(q.uuid, Status::Pending)]);
        assert!(s.deliveries(q.uuid).await.unwrap().is_empty());
        // Deleting the request deletes its deliveries.
        s.delete(r.uuid).await.unwrap();
        assert!(s.deliveries(r.uuid).await.unwrap().is_empty());
        assert!(s.claim_deliveries(10, LEASE).await.unwrap().is_empty());
    }
}

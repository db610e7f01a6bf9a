//! Webhook deliveries on PostgreSQL, mirroring `store/webhooks.rs`: queued inside the
//! transaction that ends a request, claimed with `FOR UPDATE SKIP LOCKED` under a lease so the
//! workers of several API processes (on any host) never send one attempt twice.

use super::Pg;
use crate::model::RequestId;
use crate::store::webhooks::{parse_targets, parse_uuid, word, DELIVERY_COLUMNS};
use crate::store::StoreError;
use crate::timefmt;
use crate::webhooks::{Attempt, Delivery, DeliveryState, Due, Event};
use std::time::Duration;
use tokio_postgres::{GenericClient, Row};

/// Queues one `event` delivery per target the request was submitted with, inside the
/// caller's transaction (see the SQLite twin).
pub(super) async fn enqueue_in(
    tx: &impl GenericClient,
    uuid: &str,
    event: Event,
    now: &str,
) -> Result<(), StoreError> {
    let json: Option<String> = tx
        .query_opt(
            "SELECT webhook_urls FROM requests WHERE uuid = $1",
            &[&uuid],
        )
        .await?
        .and_then(|r| r.get(0));
    for url in parse_targets(json)? {
        tx.execute(
            "INSERT INTO webhook_deliveries (delivery_id, request_uuid, event, url, state,
                                             attempts, next_attempt_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5, $5)",
            &[
                &uuid::Uuid::new_v4().to_string(),
                &uuid,
                &event.as_str(),
                &url,
                &now,
            ],
        )
        .await?;
    }
    Ok(())
}

fn delivery_from_row(r: &Row) -> Result<Delivery, StoreError> {
    let state: DeliveryState = word(r.try_get::<_, &str>(3)?)?;
    Ok(Delivery {
        id: parse_uuid(r.try_get(0)?)?,
        event: word(r.try_get::<_, &str>(1)?)?,
        url: r.try_get(2)?,
        state,
        attempts: r.try_get(4)?,
        last_status: r.try_get(5)?,
        last_error: r.try_get(6)?,
        created_at: r.try_get(7)?,
        next_attempt_at: (state == DeliveryState::Pending)
            .then(|| r.try_get(8))
            .transpose()?,
        delivered_at: r.try_get(9)?,
    })
}

impl Pg {
    pub(crate) async fn deliveries(&self, id: RequestId) -> Result<Vec<Delivery>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE request_uuid = $1 ORDER BY id"
        );
        let uuid = id.to_string();
        retry!(self, "deliveries", |c| {
            c.query(&sql, &[&uuid])
                .await?
                .iter()
                .map(delivery_from_row)
                .collect()
        })
    }

    /// A lost COMMIT is simply run again: what it claimed is leased, and is sent once the
    /// lease has run out.
    pub(crate) async fn claim_deliveries(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<Due>, StoreError> {
        let limit = i64::from(limit);
        let rows = write_tx!(
            self,
            "claim_deliveries",
            |tx| async {
                let now = timefmt::now();
                let until = timefmt::format(time::OffsetDateTime::now_utc() + lease);
                Ok(tx
                    .query(
                        "UPDATE webhook_deliveries
                         SET attempts = attempts + 1, leased_until = $1, updated_at = $2
                         WHERE id IN (SELECT id FROM webhook_deliveries
                                      WHERE state = 'pending' AND next_attempt_at <= $2
                                        AND (leased_until IS NULL OR leased_until < $2)
                                      ORDER BY next_attempt_at LIMIT $3
                                      FOR UPDATE SKIP LOCKED)
                         RETURNING id, delivery_id, request_uuid, event, url, attempts,
                                   created_at",
                        &[&until, &now, &limit],
                    )
                    .await?)
            }
            .await,
            quiet_if | _v | true
        )?;
        rows.iter()
            .map(|r| {
                Ok(Due {
                    row: r.try_get(0)?,
                    id: parse_uuid(r.try_get(1)?)?,
                    request: crate::store::control::parse_id(r.try_get(2)?)?,
                    event: word(r.try_get::<_, &str>(3)?)?,
                    url: r.try_get(4)?,
                    attempts: r.try_get(5)?,
                    created_at: r.try_get(6)?,
                })
            })
            .collect()
    }

    /// Idempotent: recording the same outcome twice leaves the same row.
    pub(crate) async fn record_attempt(&self, row: i64, a: Attempt) -> Result<(), StoreError> {
        retry!(self, "record_attempt", |c| {
            c.execute(
                "UPDATE webhook_deliveries
                 SET state = $1, last_status = $2, last_error = $3,
                     next_attempt_at = COALESCE($4, next_attempt_at), leased_until = NULL,
                     updated_at = $5,
                     delivered_at = CASE WHEN $1 = 'delivered' THEN $5 ELSE delivered_at END
                 WHERE id = $6",
                &[
                    &a.state.as_str(),
                    &a.status,
                    &a.error,
                    &a.next_attempt_at,
                    &a.at,
                    &row,
                ],
            )
            .await?;
            Ok(())
        })
    }

    pub(crate) async fn next_delivery_due(&self) -> Result<Option<String>, StoreError> {
        retry!(self, "next_delivery_due", |c| {
            Ok(c.query_one(
                "SELECT MIN(GREATEST(next_attempt_at, COALESCE(leased_until, '')))
                 FROM webhook_deliveries WHERE state = 'pending'",
                &[],
            )
            .await?
            .get(0))
        })
    }
}

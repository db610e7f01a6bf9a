//! The live console's storage on PostgreSQL (see `store/console.rs`): the raw console stream
//! by offset, queued keystrokes, keep-on-failure state.

use super::control::lock_visible;
use super::requests::get_in;
use super::Pg;
use crate::model::{AgentId, RequestId};
use crate::store::console::{in_typed_order, refuse_release, slice_rows, stored_offset};
use crate::store::control::written;
use crate::store::{ConsoleSlice, Kept, Keystrokes, ReleaseOutcome, StoreError};
use crate::timefmt;
use tokio_postgres::types::Type;

/// Appends raw console bytes inside a log batch's transaction (the request's row is locked by
/// the caller, so offsets cannot race).
pub(super) async fn append_in(
    tx: &tokio_postgres::Transaction<'_>,
    uuid: &str,
    bytes: &[u8],
) -> Result<(), StoreError> {
    if bytes.is_empty() {
        return Ok(());
    }
    // One statement, sent with its types: no prepare round trip on the sink's hot path.
    tx.query_typed(
        "INSERT INTO console_log (request_uuid, \"offset\", bytes)
         SELECT $1, COALESCE(MAX(\"offset\" + octet_length(bytes)), 0)::bigint, $2
         FROM console_log WHERE request_uuid = $1",
        &[(&uuid, Type::TEXT), (&bytes, Type::BYTEA)],
    )
    .await?;
    Ok(())
}

impl Pg {
    pub(crate) async fn console_since(
        &self,
        id: RequestId,
        from: u64,
        max: usize,
    ) -> Result<ConsoleSlice, StoreError> {
        let uuid = id.to_string();
        let from = stored_offset(from);
        retry!(self, "console_since", |c| {
            let end: i64 = c
                .query_one(
                    "SELECT COALESCE(MAX(\"offset\" + octet_length(bytes)), 0)::bigint
                     FROM console_log WHERE request_uuid = $1",
                    &[&uuid],
                )
                .await?
                .get(0);
            // The row holding `from` starts at the largest offset not after it.
            let first: i64 = c
                .query_one(
                    "SELECT MAX(\"offset\") FROM console_log
                     WHERE request_uuid = $1 AND \"offset\" <= $2",
                    &[&uuid, &from],
                )
                .await?
                .get::<_, Option<i64>>(0)
                .unwrap_or(0);
            let rows = c
                .query(
                    "SELECT \"offset\", bytes FROM console_log
                     WHERE request_uuid = $1 AND \"offset\" >= $2 ORDER BY \"offset\"",
                    &[&uuid, &first],
                )
                .await?;
            slice_rows(
                from,
                end,
                max,
                rows.iter()
                    .map(|row| Ok((row.try_get(0)?, row.try_get(1)?))),
            )
        })
    }

    /// Not idempotent: keystrokes typed twice after a lost COMMIT would be typed twice, so a
    /// lost COMMIT is reported (the operator types again) rather than retried.
    pub(crate) async fn push_input(
        &self,
        id: RequestId,
        who: String,
        bytes: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let (uuid, now) = (id.to_string(), timefmt::now());
        write_tx!(
            self,
            "push_input",
            |tx| async {
                let n = tx
                    .execute(
                        "INSERT INTO console_input (request_uuid, who, bytes, created_at)
                         SELECT uuid, $2, $3, $4 FROM requests
                         WHERE uuid = $1 AND status = 'running' AND NOT deleting
                           AND (desired_status IS NULL OR desired_status <> 'cancelled')",
                        &[&uuid, &who, &bytes, &now],
                    )
                    .await?;
                Ok(n == 1)
            }
            .await,
            recheck | c | {
                // Ours if a batch with our exact time, author and bytes is queued (or was
                // already taken: then it is gone and we cannot tell; say it was sent).
                let n = c
                    .execute(
                        "SELECT 1 FROM console_input WHERE request_uuid = $1 AND who = $2
                           AND bytes = $3 AND created_at = $4",
                        &[&uuid, &who, &bytes, &now],
                    )
                    .await?;
                Ok((n > 0).then_some(true))
            }
        )
    }

    /// Takes (deletes and returns) the queued keystrokes. A lost COMMIT is not retried blindly:
    /// the re-run finds what is still queued, so nothing is typed twice (at worst a batch whose
    /// taking committed is lost with the connection).
    pub(crate) async fn take_input(&self, id: RequestId) -> Result<Vec<Keystrokes>, StoreError> {
        let uuid = id.to_string();
        write_tx!(
            self,
            "take_input",
            |tx| {
                async {
                let rows = tx
                    .query(
                        "DELETE FROM console_input WHERE request_uuid = $1 RETURNING id, who, bytes",
                        &[&uuid],
                    )
                    .await?;
                let taken = rows
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                    .collect::<Result<Vec<_>, StoreError>>()?;
                Ok(in_typed_order(taken))
            }
            .await
            },
            // Nobody waits for keystrokes to be taken (as on SQLite, no wake-up).
            quiet_if | _v | true
        )
    }

    pub(crate) async fn mark_kept(
        &self,
        id: RequestId,
        agent: &AgentId,
        until: String,
    ) -> Result<bool, StoreError> {
        let (agent, uuid) = (agent.0.clone(), id.to_string());
        // Idempotent: the same `until` set again.
        write_tx!(self, "mark_kept", |tx| async {
            let n = tx
                .execute(
                    "UPDATE requests SET kept_until = $1, updated_at = $2
                     WHERE uuid = $3 AND agent_id = $4 AND status IN ('running','hold')",
                    &[&until, &timefmt::now(), &uuid, &agent],
                )
                .await?;
            Ok(n == 1)
        }
        .await)
    }

    pub(crate) async fn kept(&self, id: RequestId) -> Result<Option<Kept>, StoreError> {
        let uuid = id.to_string();
        retry!(self, "kept", |c| {
            Ok(c.query_opt(
                "SELECT kept_until, kept_released FROM requests WHERE uuid = $1",
                &[&uuid],
            )
            .await?
            .map(|r| Kept {
                until: r.get(0),
                released: r.get::<_, Option<String>>(1).is_some(),
            }))
        })
    }

    /// Idempotent (`COALESCE` keeps the first release), so a retry answers as the first did.
    pub(crate) async fn release_kept(&self, id: RequestId) -> Result<ReleaseOutcome, StoreError> {
        let uuid = id.to_string();
        write_tx!(self, "release_kept", |tx| async {
            let Some(req) = lock_visible(&tx, &uuid).await? else {
                return Ok(ReleaseOutcome::NotFound);
            };
            if let Some(refused) = refuse_release(&req) {
                return Ok(refused);
            }
            tx.execute(
                "UPDATE requests SET kept_released = COALESCE(kept_released, $1), updated_at = $1
                 WHERE uuid = $2",
                &[&timefmt::now(), &uuid],
            )
            .await?;
            Ok(ReleaseOutcome::Released(Box::new(written(
                get_in(&tx, id).await?,
            )?)))
        }
        .await)
    }
}

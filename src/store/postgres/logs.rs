//! The work log on PostgreSQL: `bytea` rows, `seq` continuing per request.

use super::Pg;
use crate::model::{LogEntry, LogType, RequestId};
use crate::store::{LogQuery, StoreError};

impl Pg {
    /// One transaction per batch, with the raw console bytes of the same stretch; the
    /// request's row is locked first so that concurrent appenders (the sink, lease recovery's
    /// system line) take turns on `seq` and offsets. A batch whose COMMIT was lost is found by
    /// its last row (same time, type and bytes as the request's last entry; or, for console
    /// bytes alone, the same bytes as the last console row) and not written twice.
    pub(crate) async fn append_logs_with_console(
        &self,
        id: RequestId,
        attempt: Option<u32>,
        chunks: Vec<(String, LogType, Vec<u8>)>,
        console: Vec<u8>,
    ) -> Result<(), StoreError> {
        if chunks.is_empty() && console.is_empty() {
            return Ok(());
        }
        let uuid = id.to_string();
        let last = chunks.last().cloned();
        write_tx!(
            self,
            "append_logs",
            |tx| async {
                let current: Option<i64> = tx
                    .query_opt(
                        "SELECT attempt FROM requests WHERE uuid = $1 FOR UPDATE",
                        &[&uuid],
                    )
                    .await?
                    .map(|r| r.get(0));
                let attempt: i64 = attempt.map(i64::from).or(current).unwrap_or(1);
                let mut next: i64 = tx
                    .query_one(
                        "SELECT COALESCE(MAX(seq), 0) + 1 FROM work_log WHERE request_uuid = $1",
                        &[&uuid],
                    )
                    .await?
                    .get(0);
                let ins = tx
                    .prepare(
                        "INSERT INTO work_log (request_uuid, seq, timestamp, log_type, output,
                                           attempt)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .await?;
                for (ts, ty, bytes) in &chunks {
                    tx.execute(&ins, &[&uuid, &next, ts, &ty.as_str(), bytes, &attempt])
                        .await?;
                    next += 1;
                }
                super::console::append_in(&tx, &uuid, &console).await?;
                Ok(())
            }
            .await,
            recheck | c | {
                let same = match &last {
                    Some((ts, ty, bytes)) => c
                        .query_opt(
                            "SELECT timestamp = $2 AND log_type = $3 AND output = $4
                             FROM work_log WHERE request_uuid = $1 ORDER BY seq DESC LIMIT 1",
                            &[&uuid, ts, &ty.as_str(), bytes],
                        )
                        .await?,
                    None => c
                        .query_opt(
                            "SELECT bytes = $2 FROM console_log WHERE request_uuid = $1
                             ORDER BY \"offset\" DESC LIMIT 1",
                            &[&uuid, &console],
                        )
                        .await?,
                };
                Ok(same
                    .and_then(|r| r.get::<_, Option<bool>>(0))
                    .unwrap_or(false)
                    .then_some(()))
            },
            payload "log"
        )
    }

    pub(crate) async fn logs(
        &self,
        id: RequestId,
        q: LogQuery,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let uuid = id.to_string();
        let ty = q.log_type.map(|t| t.as_str());
        let limit = q.limit.map(i64::from);
        let after = q.after.unwrap_or(0);
        let attempt = q.attempt.map(i64::from);
        retry!(self, "logs", |c| {
            let rows = c
                .query(
                    "SELECT seq, timestamp, log_type, output, attempt FROM work_log
                     WHERE request_uuid = $1 AND seq > $2 AND ($3::text IS NULL OR log_type = $3)
                       AND ($5::bigint IS NULL OR attempt = $5)
                     ORDER BY seq LIMIT $4",
                    &[&uuid, &after, &ty, &limit, &attempt],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let id: i64 = r.try_get(0)?;
                    let ty: String = r.try_get(2)?;
                    let attempt: i64 = r.try_get(4)?;
                    Ok(LogEntry {
                        id,
                        attempt: u32::try_from(attempt)
                            .map_err(|e| StoreError::Corrupt(format!("log {id}: {e}")))?,
                        timestamp: r.try_get(1)?,
                        log_type: ty
                            .parse()
                            .map_err(|e| StoreError::Corrupt(format!("log {id}: {e}")))?,
                        output: r.try_get(3)?,
                    })
                })
                .collect()
        })
    }
}

/// Appends a `system` line to `attempt`'s log inside the caller's transaction (lease recovery,
/// a re-queue); the caller holds the request's row lock, so `seq` cannot race the sink.
pub(super) async fn system_line_in(
    tx: &tokio_postgres::Transaction<'_>,
    uuid: &str,
    attempt: u32,
    now: &str,
    line: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO work_log (request_uuid, seq, timestamp, log_type, output, attempt)
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM work_log WHERE request_uuid = $1),
                 $2, 'system', $3, $4)",
        &[&uuid, &now, &line.as_bytes(), &i64::from(attempt)],
    )
    .await?;
    Ok(())
}

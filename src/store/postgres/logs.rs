//! The work log on PostgreSQL: `bytea` rows, `seq` continuing per request.

use super::Pg;
use crate::model::{AgentId, LogEntry, LogType, RequestId};
use crate::store::{LogQuery, StoreError};
use tokio_postgres::types::Type;

impl Pg {
    pub(crate) async fn append_logs_with_console(
        &self,
        id: RequestId,
        chunks: Vec<(String, LogType, Vec<u8>)>,
        console: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.append(id, None, chunks, console).await.map(|_| ())
    }

    pub(crate) async fn append_agent_logs(
        &self,
        id: RequestId,
        agent: &AgentId,
        chunks: Vec<(String, LogType, Vec<u8>)>,
        console: Vec<u8>,
    ) -> Result<bool, StoreError> {
        self.append(id, Some(agent.0.clone()), chunks, console)
            .await
    }

    /// One transaction per batch, with the raw console bytes of the same stretch; the
    /// request's row is locked first so that concurrent appenders (the sink, lease recovery's
    /// system line) take turns on `seq` and offsets, and an agent's append (`owner`) is
    /// fenced by the same lock: written only while the row is still that agent's and active,
    /// else nothing (false). A batch whose COMMIT was lost is found by its last row (same
    /// time, type and bytes as the request's last entry; or, for console bytes alone, the
    /// same bytes as the last console row) and not written twice.
    async fn append(
        &self,
        id: RequestId,
        owner: Option<String>,
        chunks: Vec<(String, LogType, Vec<u8>)>,
        console: Vec<u8>,
    ) -> Result<bool, StoreError> {
        if chunks.is_empty() && console.is_empty() {
            return Ok(true);
        }
        let uuid = id.to_string();
        let last = chunks.last().cloned();
        write_tx!(
            self,
            "append_logs",
            |tx| async {
                let owns = tx
                    .query_typed(
                        "SELECT $2::text IS NULL
                                OR (agent_id = $2 AND status IN ('acknowledged','running','hold'))
                         FROM requests WHERE uuid = $1 FOR UPDATE",
                        &[(&uuid, Type::TEXT), (&owner, Type::TEXT)],
                    )
                    .await?
                    .first()
                    .map(|r| r.get::<_, Option<bool>>(0).unwrap_or(false))
                    .unwrap_or(owner.is_none());
                if !owns {
                    return Ok(false);
                }
                // One statement, sent with its types (no prepare round trip): the rows
                // continue the request's `seq` in order.
                let (mut ts, mut tys, mut outs) = (Vec::new(), Vec::new(), Vec::new());
                for (t, ty, bytes) in &chunks {
                    ts.push(t.as_str());
                    tys.push(ty.as_str());
                    outs.push(bytes.as_slice());
                }
                tx.query_typed(
                    "INSERT INTO work_log (request_uuid, seq, timestamp, log_type, output)
                     SELECT $1, (SELECT COALESCE(MAX(seq), 0) FROM work_log
                                 WHERE request_uuid = $1) + t.n, t.ts, t.ty, t.out
                     FROM unnest($2::text[], $3::text[], $4::bytea[])
                          WITH ORDINALITY AS t(ts, ty, out, n)",
                    &[
                        (&uuid, Type::TEXT),
                        (&ts, Type::TEXT_ARRAY),
                        (&tys, Type::TEXT_ARRAY),
                        (&outs, Type::BYTEA_ARRAY),
                    ],
                )
                .await?;
                super::console::append_in(&tx, &uuid, &console).await?;
                Ok(true)
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
                // Found: that batch committed, so the agent owned the request then.
                Ok(same
                    .and_then(|r| r.get::<_, Option<bool>>(0))
                    .unwrap_or(false)
                    .then_some(true))
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
        retry!(self, "logs", |c| {
            let rows = c
                .query_typed(
                    "SELECT seq, timestamp, log_type, output FROM work_log
                     WHERE request_uuid = $1 AND seq > $2 AND ($3::text IS NULL OR log_type = $3)
                     ORDER BY seq LIMIT $4",
                    &[
                        (&uuid, Type::TEXT),
                        (&after, Type::INT8),
                        (&ty, Type::TEXT),
                        (&limit, Type::INT8),
                    ],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let id: i64 = r.try_get(0)?;
                    let ty: String = r.try_get(2)?;
                    Ok(LogEntry {
                        id,
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

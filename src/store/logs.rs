//! The work log: one table for every request's console bytes and supervisor lines.

use super::{Store, StoreError};
use crate::model::{AgentId, LogEntry, LogType, RequestId};
use rusqlite::{params, TransactionBehavior};

/// The request is still agent `?2`'s: its `agent_id`, and not recovered (lease recovery ends a
/// running request `failed` but keeps its `agent_id`; a re-queued one loses it).
const OWNED: &str = "agent_id = ?2 AND status IN ('acknowledged','running','hold')";

/// Filters for reading a request's log.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub log_type: Option<LogType>,
    /// Only entries with `id > after` (incremental polling).
    pub after: Option<i64>,
    pub limit: Option<u32>,
}

impl Store {
    /// Appends chunks in one transaction; `seq` continues from the request's last entry.
    pub async fn append_logs(
        &self,
        id: RequestId,
        chunks: Vec<(String, LogType, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        self.append_logs_with_console(id, chunks, Vec::new()).await
    }

    /// [`Store::append_logs`], and raw console bytes appended to the console stream in the
    /// same transaction. Unfenced: for writers that are no agent (the API, lease recovery).
    pub async fn append_logs_with_console(
        &self,
        id: RequestId,
        chunks: Vec<(String, LogType, Vec<u8>)>,
        console: Vec<u8>,
    ) -> Result<(), StoreError> {
        on_pg!(self.append_logs_with_console(id, chunks, console));
        self.append_in_tx(id, None, chunks, console)
            .await
            .map(|_| ())
    }

    /// An agent's append, fenced by ownership: stored only while `agent` still owns the
    /// request (its `agent_id`, the request not recovered: still active), checked in the
    /// same transaction. False: the claim is gone and nothing was stored.
    pub async fn append_agent_logs(
        &self,
        id: RequestId,
        agent: &AgentId,
        chunks: Vec<(String, LogType, Vec<u8>)>,
        console: Vec<u8>,
    ) -> Result<bool, StoreError> {
        on_pg!(self.append_agent_logs(id, agent, chunks, console));
        self.append_in_tx(id, Some(agent.0.clone()), chunks, console)
            .await
    }

    /// Both appends: with `owner`, only while that agent owns the request.
    async fn append_in_tx(
        &self,
        id: RequestId,
        owner: Option<String>,
        chunks: Vec<(String, LogType, Vec<u8>)>,
        console: Vec<u8>,
    ) -> Result<bool, StoreError> {
        if chunks.is_empty() && console.is_empty() {
            return Ok(true);
        }
        self.call_write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let uuid = id.to_string();
            if let Some(agent) = &owner {
                let owns: bool = tx
                    .prepare_cached(&format!(
                        "SELECT EXISTS (SELECT 1 FROM requests WHERE uuid = ?1 AND {OWNED})"
                    ))?
                    .query_row(params![uuid, agent], |r| r.get(0))?;
                if !owns {
                    return Ok(false);
                }
            }
            let mut next: i64 = tx.query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM work_log WHERE request_uuid = ?1",
                [&uuid],
                |r| r.get(0),
            )?;
            {
                let mut ins = tx.prepare_cached(
                    "INSERT INTO work_log (request_uuid, seq, timestamp, log_type, output)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (ts, ty, bytes) in &chunks {
                    ins.execute(params![uuid, next, ts, ty.as_str(), bytes])?;
                    next += 1;
                }
            }
            super::console::append_in(&tx, &uuid, &console)?;
            tx.commit()?;
            Ok(true)
        })
        .await
        .inspect(|_| self.bump())
    }

    /// A request's log entries in order.
    pub async fn logs(&self, id: RequestId, q: LogQuery) -> Result<Vec<LogEntry>, StoreError> {
        on_pg!(self.logs(id, q));
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, timestamp, log_type, output FROM work_log
                 WHERE request_uuid = ?1 AND seq > ?2 AND (?3 IS NULL OR log_type = ?3)
                 ORDER BY seq LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![
                    id.to_string(),
                    q.after.unwrap_or(0),
                    q.log_type.map(|t| t.as_str()),
                    q.limit.map(i64::from).unwrap_or(-1)
                ],
                |r| {
                    let ty: String = r.get(2)?;
                    Ok((r.get(0)?, r.get(1)?, ty, r.get(3)?))
                },
            )?;
            rows.map(|row| {
                let (id, timestamp, ty, output): (i64, String, String, Vec<u8>) = row?;
                Ok(LogEntry {
                    id,
                    timestamp,
                    log_type: ty
                        .parse()
                        .map_err(|e| StoreError::Corrupt(format!("log {id}: {e}")))?,
                    output,
                })
            })
            .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{pending_request, temp_store};

    #[tokio::test]
    async fn append_and_filter() {
        let (s, _d) = temp_store().await;
        let r = pending_request(&s).await;
        s.append_logs(
            r.uuid,
            vec![
                ("t1".into(), LogType::Boot, b"boot\r\n".to_vec()),
                ("t2".into(), LogType::Stdout, vec![0, 159, 146, 150, 255]),
            ],
        )
        .await
        .unwrap();
        s.append_logs(r.uuid, vec![("t3".into(), LogType::Stdout, b"x".to_vec())])
            .await
            .unwrap();
        let all = s.logs(r.uuid, LogQuery::default()).await.unwrap();
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(
            all[1].output,
            vec![0, 159, 146, 150, 255],
            "bytes kept exactly"
        );
        let out = s
            .logs(
                r.uuid,
                LogQuery {
                    log_type: Some(LogType::Stdout),
                    after: Some(2),
                    limit: Some(5),
                },
            )
            .await
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, 3);
    }

    fn line(text: &str) -> Vec<(String, LogType, Vec<u8>)> {
        vec![(
            crate::timefmt::now(),
            LogType::System,
            text.as_bytes().to_vec(),
        )]
    }

    async fn outputs(s: &Store, id: RequestId) -> Vec<String> {
        s.logs(id, LogQuery::default())
            .await
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.output).unwrap())
            .collect()
    }

    /// Fencing: agent A's lease expires, the request is recovered and claimed by B; A's late
    /// append is refused and stores nothing (log rows or console bytes), B's is stored. Once
    /// recovered as failed (A's VM ran), A still writes nothing, while unfenced writers (the
    /// API's system lines) still may.
    #[tokio::test]
    async fn an_agent_that_lost_its_claim_appends_nothing() {
        use std::time::Duration;
        let (s, _d) = temp_store().await;
        let a = AgentId("h1:1:0".into());
        let b = AgentId("h2:1:0".into());
        let short = Duration::from_millis(1);
        let r = pending_request(&s).await;
        s.claim(&a, short).await.unwrap().unwrap();
        assert!(s
            .append_agent_logs(r.uuid, &a, line("a1"), b"c1".to_vec())
            .await
            .unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.reap_expired().await.unwrap();
        s.claim(&b, Duration::from_secs(30)).await.unwrap().unwrap();
        assert!(!s
            .append_agent_logs(r.uuid, &a, line("a2"), b"c2".to_vec())
            .await
            .unwrap());
        assert!(!s
            .append_agent_logs(r.uuid, &a, Vec::new(), b"c3".to_vec())
            .await
            .unwrap());
        assert!(s
            .append_agent_logs(r.uuid, &b, line("b1"), b"d1".to_vec())
            .await
            .unwrap());
        let got = outputs(&s, r.uuid).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!((got[0].as_str(), got[2].as_str()), ("a1", "b1"), "{got:?}");
        assert!(got[1].contains("lost (lease expired)"), "{got:?}");
        let console = s.console_since(r.uuid, 0, 1 << 20).await.unwrap();
        assert_eq!(console.bytes, b"c1d1");

        // Recovered while running: `failed`, its agent_id kept, and still fenced.
        let r = pending_request(&s).await;
        s.claim(&a, short).await.unwrap().unwrap();
        assert!(s.mark_running(r.uuid, &a).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.reap_expired().await.unwrap();
        assert!(!s
            .append_agent_logs(r.uuid, &a, line("late"), Vec::new())
            .await
            .unwrap());
        s.append_logs(r.uuid, line("api")).await.unwrap();
        let got = outputs(&s, r.uuid).await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].contains("lost (lease expired)") && got[1] == "api");
    }
}

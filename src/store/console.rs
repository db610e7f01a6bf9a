//! The live console's storage: the raw serial-console byte stream of each request (every byte
//! the guest printed on ttyS0, in order, addressed by its offset in that stream), keystrokes
//! waiting for the agent that owns the VM, and the keep-on-failure state.
//!
//! The raw stream is stored beside the log types rather than computed from them: `boot`,
//! `stdout` and `shutdown` are the protocol layer's reading of the console (and `stdout` may come
//! from a channel port instead), so only a stream of its own has exact, stable offsets.

use super::control::{visible_in, written};
use super::requests::get_in;
use super::{Store, StoreError};
use crate::model::{AgentId, Request, RequestId, Status};
use crate::timefmt;
use rusqlite::{params, OptionalExtension, TransactionBehavior};

/// Bytes of the console stream from an offset on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleSlice {
    /// Offset of `bytes[0]` in the stream.
    pub start: u64,
    pub bytes: Vec<u8>,
    /// Length of the whole stream stored so far.
    pub end: u64,
}

/// Keystrokes waiting for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keystrokes {
    pub who: String,
    pub bytes: Vec<u8>,
}

/// A kept VM's state, as its agent reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub until: Option<String>,
    /// An operator asked to end the keep (`release`).
    pub released: bool,
}

/// What `PUT /status` with `release` did.
#[derive(Debug)]
pub enum ReleaseOutcome {
    /// Recorded; the owning agent shuts the VM down.
    Released(Box<Request>),
    /// The request is not a kept run.
    NotKept(Status),
    NotFound,
}

// --- Engine-neutral decisions ------------------------------------------------------------------

/// A requested console offset as stored (offsets past `i64::MAX` are past any end).
pub(super) fn stored_offset(from: u64) -> i64 {
    i64::try_from(from).unwrap_or(i64::MAX)
}

/// The slice from `from` of a stream `end` bytes long, out of its rows `(offset, bytes)` in
/// offset order from the one holding `from`: the first row is cut at `from`, whole rows follow
/// until about `max` bytes. An offset past the end gives no bytes, starting at the end.
pub(super) fn slice_rows<E>(
    from: i64,
    end: i64,
    max: usize,
    rows: impl IntoIterator<Item = Result<(i64, Vec<u8>), E>>,
) -> Result<ConsoleSlice, E> {
    let start = from.min(end);
    let mut bytes = Vec::new();
    for row in rows {
        let (offset, chunk) = row?;
        let skip = (start - offset).clamp(0, chunk.len() as i64) as usize;
        bytes.extend_from_slice(&chunk[skip..]);
        if bytes.len() >= max {
            break;
        }
    }
    Ok(ConsoleSlice {
        start: start as u64,
        bytes,
        end: end as u64,
    })
}

/// Queued keystroke batches `(id, who, bytes)` in the order they were typed.
pub(super) fn in_typed_order(mut taken: Vec<(i64, String, Vec<u8>)>) -> Vec<Keystrokes> {
    taken.sort_by_key(|t| t.0);
    taken
        .into_iter()
        .map(|(_, who, bytes)| Keystrokes { who, bytes })
        .collect()
}

/// Why `release` does not apply to `req`, if it does not: only a kept, unfinished run can be
/// released.
pub(super) fn refuse_release(req: &Request) -> Option<ReleaseOutcome> {
    (req.status.is_terminal() || req.kept_until.is_none())
        .then_some(ReleaseOutcome::NotKept(req.status))
}

/// Appends raw console bytes inside a log batch's transaction, so the console stream and the
/// log entries are committed together (and both before the request turns terminal).
pub(super) fn append_in(
    tx: &rusqlite::Transaction<'_>,
    uuid: &str,
    bytes: &[u8],
) -> Result<(), StoreError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let end: i64 = tx.query_row(
        "SELECT COALESCE(MAX(offset + length(bytes)), 0) FROM console_log WHERE request_uuid = ?1",
        [uuid],
        |r| r.get(0),
    )?;
    tx.prepare_cached("INSERT INTO console_log (request_uuid, offset, bytes) VALUES (?1, ?2, ?3)")?
        .execute(params![uuid, end, bytes])?;
    Ok(())
}

impl Store {
    /// Console bytes from `from` on, at most about `max` (whole rows, the first one cut at
    /// `from`). An offset past the end gives no bytes.
    pub async fn console_since(
        &self,
        id: RequestId,
        from: u64,
        max: usize,
    ) -> Result<ConsoleSlice, StoreError> {
        on_pg!(self.console_since(id, from, max));
        self.call(move |c| {
            let uuid = id.to_string();
            let from = stored_offset(from);
            let end: i64 = c.query_row(
                "SELECT COALESCE(MAX(offset + length(bytes)), 0) FROM console_log
                 WHERE request_uuid = ?1",
                [&uuid],
                |r| r.get(0),
            )?;
            // The row holding `from` starts at the largest offset not after it.
            let first: i64 = c
                .query_row(
                    "SELECT MAX(offset) FROM console_log WHERE request_uuid = ?1 AND offset <= ?2",
                    params![uuid, from],
                    |r| r.get::<_, Option<i64>>(0),
                )
                .optional()?
                .flatten()
                .unwrap_or(0);
            let mut stmt = c.prepare_cached(
                "SELECT offset, bytes FROM console_log WHERE request_uuid = ?1 AND offset >= ?2
                 ORDER BY offset",
            )?;
            let rows = stmt.query_map(params![uuid, first], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(slice_rows(from, end, max, rows)?)
        })
        .await
    }

    /// Queues keystrokes for the owning agent, only while the request is `running` (not held,
    /// not being deleted). False when it is not.
    pub async fn push_input(
        &self,
        id: RequestId,
        who: String,
        bytes: Vec<u8>,
    ) -> Result<bool, StoreError> {
        on_pg!(self.push_input(id, who, bytes));
        self.call_write(move |c| {
            let n = c.execute(
                "INSERT INTO console_input (request_uuid, who, bytes, created_at)
                 SELECT uuid, ?2, ?3, ?4 FROM requests
                 WHERE uuid = ?1 AND status = 'running' AND deleting = 0
                   AND (desired_status IS NULL OR desired_status <> 'cancelled')",
                params![id.to_string(), who, bytes, timefmt::now()],
            )?;
            Ok(n == 1)
        })
        .await
        .inspect(|_| self.bump())
    }

    /// Takes every queued keystroke batch of a request, oldest first. A read first, so an
    /// agent polling an idle console never takes the write lock.
    pub async fn take_input(&self, id: RequestId) -> Result<Vec<Keystrokes>, StoreError> {
        on_pg!(self.take_input(id));
        let any: bool = self.call_point_read(move |c| {
            Ok(c.query_row(
                "SELECT EXISTS (SELECT 1 FROM console_input WHERE request_uuid = ?1)",
                [id.to_string()],
                |r| r.get(0),
            )?)
        })?;
        if !any {
            return Ok(Vec::new());
        }
        self.call_write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let uuid = id.to_string();
            let taken: Vec<(i64, String, Vec<u8>)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT id, who, bytes FROM console_input WHERE request_uuid = ?1 ORDER BY id",
                )?;
                let rows = stmt.query_map([&uuid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            if let Some((last, _, _)) = taken.last() {
                tx.execute(
                    "DELETE FROM console_input WHERE request_uuid = ?1 AND id <= ?2",
                    params![uuid, last],
                )?;
            }
            tx.commit()?;
            Ok(in_typed_order(taken))
        })
        .await
    }

    /// The owning agent keeps a failed run's VM until `until` (RFC 3339).
    pub async fn mark_kept(
        &self,
        id: RequestId,
        agent: &AgentId,
        until: String,
    ) -> Result<bool, StoreError> {
        on_pg!(self.mark_kept(id, agent, until));
        let agent = agent.0.clone();
        self.call_write(move |c| {
            let n = c.execute(
                "UPDATE requests SET kept_until = ?1, updated_at = ?2
                 WHERE uuid = ?3 AND agent_id = ?4 AND status IN ('running','hold')",
                params![until, timefmt::now(), id.to_string(), agent],
            )?;
            Ok(n == 1)
        })
        .await
        .inspect(|_| self.bump())
    }

    /// What the agent of a kept run watches: its end and whether it was released.
    pub async fn kept(&self, id: RequestId) -> Result<Option<Kept>, StoreError> {
        on_pg!(self.kept(id));
        self.call_point_read(move |c| {
            Ok(c.query_row(
                "SELECT kept_until, kept_released FROM requests WHERE uuid = ?1",
                [id.to_string()],
                |r| {
                    Ok(Kept {
                        until: r.get(0)?,
                        released: r.get::<_, Option<String>>(1)?.is_some(),
                    })
                },
            )
            .optional()?)
        })
    }

    /// An operator ends a kept run (`PUT /status` with `release`): recorded for its agent.
    /// Releasing twice is answered as the first time.
    pub async fn release_kept(&self, id: RequestId) -> Result<ReleaseOutcome, StoreError> {
        on_pg!(self.release_kept(id));
        self.call_write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(req) = visible_in(&tx, id)? else {
                return Ok(ReleaseOutcome::NotFound);
            };
            if let Some(refused) = refuse_release(&req) {
                return Ok(refused);
            }
            tx.execute(
                "UPDATE requests SET kept_released = COALESCE(kept_released, ?1), updated_at = ?1
                 WHERE uuid = ?2",
                params![timefmt::now(), id.to_string()],
            )?;
            let req = written(get_in(&tx, id)?)?;
            tx.commit()?;
            Ok(ReleaseOutcome::Released(Box::new(req)))
        })
        .await
        .inspect(|_| self.bump())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LogType;
    use crate::store::test_support::{pending_request, temp_store};
    use std::time::Duration;

    #[tokio::test]
    async fn the_console_stream_is_addressed_by_offset() {
        let (s, _d) = temp_store().await;
        let r = pending_request(&s).await;
        assert_eq!(
            s.console_since(r.uuid, 0, 1 << 20).await.unwrap(),
            ConsoleSlice::default()
        );
        for chunk in [&b"hello "[..], b"console", b" world"] {
            s.append_logs_with_console(
                r.uuid,
                None,
                vec![("t".into(), LogType::Boot, chunk.to_vec())],
                chunk.to_vec(),
            )
            .await
            .unwrap();
        }
        let all = s.console_since(r.uuid, 0, 1 << 20).await.unwrap();
        assert_eq!(
            (all.start, &all.bytes[..], all.end),
            (0, &b"hello console world"[..], 19)
        );
        let mid = s.console_since(r.uuid, 8, 1 << 20).await.unwrap();
        assert_eq!((mid.start, &mid.bytes[..]), (8, &b"nsole world"[..]));
        let past = s.console_since(r.uuid, 99, 1 << 20).await.unwrap();
        assert_eq!((past.start, past.bytes.len(), past.end), (19, 0, 19));
        // Whole rows up to the limit: a reader pages through the stream.
        let page = s.console_since(r.uuid, 0, 3).await.unwrap();
        assert_eq!(page.bytes, b"hello ");
    }

    #[tokio::test]
    async fn input_is_queued_only_while_running_and_taken_once_in_order() {
        let (s, _d) = temp_store().await;
        let r = pending_request(&s).await;
        assert!(!s
            .push_input(r.uuid, "a".into(), b"x".to_vec())
            .await
            .unwrap());
        let agent = AgentId("a".into());
        s.claim(&agent, Duration::from_secs(30)).await.unwrap();
        s.mark_running(r.uuid, &agent).await.unwrap();
        assert!(s
            .push_input(r.uuid, "a".into(), b"ls".to_vec())
            .await
            .unwrap());
        assert!(s
            .push_input(r.uuid, "b".into(), b"\r".to_vec())
            .await
            .unwrap());
        let got = s.take_input(r.uuid).await.unwrap();
        assert_eq!(
            got,
            vec![
                Keystrokes {
                    who: "a".into(),
                    bytes: b"ls".to_vec()
                },
                Keystrokes {
                    who: "b".into(),
                    bytes: b"\r".to_vec()
                },
            ]
        );
        assert!(s.take_input(r.uuid).await.unwrap().is_empty());
        s.control(r.uuid, Status::Hold).await.unwrap();
        s.apply_desired(r.uuid, &agent, Status::Hold).await.unwrap();
        assert!(
            !s.push_input(r.uuid, "a".into(), b"x".to_vec())
                .await
                .unwrap(),
            "held"
        );
    }

    #[tokio::test]
    async fn only_a_kept_run_can_be_released() {
        let (s, _d) = temp_store().await;
        let r = pending_request(&s).await;
        assert!(matches!(
            s.release_kept(r.uuid).await.unwrap(),
            ReleaseOutcome::NotKept(Status::Pending)
        ));
        let agent = AgentId("a".into());
        s.claim(&agent, Duration::from_secs(30)).await.unwrap();
        s.mark_running(r.uuid, &agent).await.unwrap();
        assert!(matches!(
            s.release_kept(r.uuid).await.unwrap(),
            ReleaseOutcome::NotKept(Status::Running)
        ));
        assert!(s
            .mark_kept(r.uuid, &agent, "2030-01-01T00:00:00.000000Z".into())
            .await
            .unwrap());
        assert_eq!(
            s.kept(r.uuid).await.unwrap(),
            Some(Kept {
                until: Some("2030-01-01T00:00:00.000000Z".into()),
                released: false
            })
        );
        match s.release_kept(r.uuid).await.unwrap() {
            ReleaseOutcome::Released(req) => {
                assert_eq!(
                    req.kept_until.as_deref(),
                    Some("2030-01-01T00:00:00.000000Z")
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(s.kept(r.uuid).await.unwrap().unwrap().released);
        assert!(matches!(
            s.release_kept(r.uuid).await.unwrap(),
            ReleaseOutcome::Released(_)
        ));
    }
}

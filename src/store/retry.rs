//! Retries of infrastructure failures: whether a failed attempt is re-queued (an engine-neutral
//! decision, taken by the agent's final write and by lease recovery alike), and the SQLite
//! write that re-queues it. Which failures count as infrastructure is the agent's call
//! (`agent/retry.rs`); this module only knows that one happened.

use super::StoreError;
use crate::model::{AttemptRecord, Status};
use rusqlite::{params, OptionalExtension};

/// The columns [`AttemptRow`] is read from, in its order.
pub(super) const ATTEMPT_COLUMNS: &str =
    "status, desired_status, attempt, retries, attempts, agent_id, host_id, started_at, kept_until";

/// What the retry decision needs of a request's row, as stored.
#[derive(Debug, Clone, Default)]
pub(super) struct AttemptRow {
    pub status: String,
    pub desired: Option<String>,
    pub attempt: u32,
    pub retries: u32,
    /// The earlier attempts (JSON array), `None` before the first re-queue.
    pub attempts: Option<String>,
    pub agent: Option<String>,
    pub host: Option<String>,
    pub started_at: Option<String>,
    /// A failed run's VM was being kept (`keep_on_failure`): its failure was the commands'.
    pub kept: bool,
}

/// A re-queue, as both engines write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Requeue {
    /// `pending`, or `hold` when an operator's hold was pending or in force.
    pub status: Status,
    /// The failed attempt (its log gets [`Requeue::line`]).
    pub failed: u32,
    /// The attempt it is re-queued as.
    pub attempt: u32,
    /// The earlier attempts with the failed one appended (JSON).
    pub attempts: String,
    /// The `system` log line that says what happened (newline included).
    pub line: String,
}

/// Whether a request whose attempt failed for an infrastructure reason (`error`) is re-queued:
/// only with retries left, never over an operator's pending cancel, never for a run whose VM
/// was kept after its own failure. A pending or applied hold wins over `pending`: the request
/// waits held, without a VM.
pub(super) fn requeue(
    row: &AttemptRow,
    error: &str,
    now: &str,
) -> Result<Option<Requeue>, StoreError> {
    if row.attempt > row.retries || row.kept || row.desired.as_deref() == Some("cancelled") {
        return Ok(None);
    }
    let held = match (row.status.as_str(), row.desired.as_deref()) {
        (_, Some("hold")) => true,
        ("hold", desired) => desired != Some("running"),
        _ => false,
    };
    let mut attempts: Vec<AttemptRecord> = match &row.attempts {
        Some(j) => serde_json::from_str(j)
            .map_err(|e| StoreError::Corrupt(format!("attempts of a request: {e}")))?,
        None => Vec::new(),
    };
    attempts.push(AttemptRecord {
        attempt: row.attempt,
        error: error.to_string(),
        agent_id: row.agent.clone(),
        host: row.host.clone(),
        started_at: row.started_at.clone(),
        finished_at: now.to_string(),
    });
    let next = row.attempt + 1;
    let total = row.retries + 1;
    let line = format!(
        "attempt {} failed ({error}); re-queued as attempt {next} of {total}{}\n",
        row.attempt,
        if held {
            ", held (an operator's hold)"
        } else {
            ""
        }
    );
    Ok(Some(Requeue {
        status: if held { Status::Hold } else { Status::Pending },
        failed: row.attempt,
        attempt: next,
        attempts: serde_json::to_string(&attempts).expect("attempts serialise"),
        line,
    }))
}

/// Every column a run sets, cleared for the next attempt: it starts as if never claimed.
pub(super) const CLEARED: &str = "agent_id = NULL, host_id = NULL, lease_expires_at = NULL, \
     started_at = NULL, finished_at = NULL, exit_code = NULL, error = NULL, \
     desired_status = NULL, shutdown_step = NULL, boot_ms = NULL, run_ms = NULL, \
     shutdown_ms = NULL, boot_mode = NULL, restore_ms = NULL, channel = NULL, \
     kept_until = NULL, kept_ms = NULL, kept_released = NULL";

/// The row's retry state, read where `cond` (SQL over `uuid = ?1` and more) holds.
pub(super) fn attempt_row(
    c: &rusqlite::Connection,
    cond: &str,
    args: impl rusqlite::Params,
) -> Result<Option<AttemptRow>, StoreError> {
    Ok(c.query_row(
        &format!("SELECT {ATTEMPT_COLUMNS} FROM requests WHERE {cond}"),
        args,
        |r| {
            Ok(AttemptRow {
                status: r.get(0)?,
                desired: r.get(1)?,
                attempt: r.get(2)?,
                retries: r.get(3)?,
                attempts: r.get(4)?,
                agent: r.get(5)?,
                host: r.get(6)?,
                started_at: r.get(7)?,
                kept: r.get::<_, Option<String>>(8)?.is_some(),
            })
        },
    )
    .optional()?)
}

/// Writes a re-queue: the row back to `pending` (or `hold`) as the next attempt, its
/// keystrokes dropped, and the line in the failed attempt's log.
pub(super) fn requeue_in(
    c: &rusqlite::Connection,
    uuid: &str,
    q: &Requeue,
    now: &str,
) -> Result<(), StoreError> {
    c.execute(
        &format!(
            "UPDATE requests SET status = ?1, attempt = ?2, attempts = ?3, updated_at = ?4,
                    {CLEARED}
             WHERE uuid = ?5"
        ),
        params![q.status.as_str(), q.attempt, q.attempts, now, uuid],
    )?;
    c.execute("DELETE FROM console_input WHERE request_uuid = ?1", [uuid])?;
    super::logs::system_line_in(c, uuid, q.failed, now, &q.line)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &str, desired: Option<&str>, attempt: u32, retries: u32) -> AttemptRow {
        AttemptRow {
            status: status.into(),
            desired: desired.map(Into::into),
            attempt,
            retries,
            agent: Some("h:1:0".into()),
            host: Some("h".into()),
            started_at: Some("t0".into()),
            ..Default::default()
        }
    }

    #[test]
    fn requeued_only_with_retries_left() {
        let q = requeue(&row("running", None, 1, 2), "QEMU exited", "t1")
            .unwrap()
            .unwrap();
        assert_eq!((q.status, q.failed, q.attempt), (Status::Pending, 1, 2));
        assert_eq!(
            q.line,
            "attempt 1 failed (QEMU exited); re-queued as attempt 2 of 3\n"
        );
        let recs: Vec<AttemptRecord> = serde_json::from_str(&q.attempts).unwrap();
        assert_eq!(
            recs,
            [AttemptRecord {
                attempt: 1,
                error: "QEMU exited".into(),
                agent_id: Some("h:1:0".into()),
                host: Some("h".into()),
                started_at: Some("t0".into()),
                finished_at: "t1".into(),
            }]
        );
        // The second failure is appended to the first.
        let second = AttemptRow {
            attempts: Some(q.attempts),
            ..row("running", None, 2, 2)
        };
        let q2 = requeue(&second, "boot timeout", "t2").unwrap().unwrap();
        let recs: Vec<AttemptRecord> = serde_json::from_str(&q2.attempts).unwrap();
        assert_eq!(recs.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(q2.attempt, 3);
        // None left.
        assert!(requeue(&row("running", None, 3, 2), "x", "t")
            .unwrap()
            .is_none());
        assert!(requeue(&row("running", None, 1, 0), "x", "t")
            .unwrap()
            .is_none());
    }

    #[test]
    fn an_operators_cancel_or_hold_wins_over_a_retry() {
        assert!(requeue(&row("running", Some("cancelled"), 1, 1), "x", "t")
            .unwrap()
            .is_none());
        for (status, desired) in [("running", Some("hold")), ("hold", None)] {
            let q = requeue(&row(status, desired, 1, 1), "x", "t")
                .unwrap()
                .unwrap();
            assert_eq!(q.status, Status::Hold, "{status} {desired:?}");
        }
        let q = requeue(&row("hold", Some("running"), 1, 1), "x", "t")
            .unwrap()
            .unwrap();
        assert_eq!(q.status, Status::Pending, "a pending resume");
        let kept = AttemptRow {
            kept: true,
            ..row("running", None, 1, 1)
        };
        assert!(requeue(&kept, "x", "t").unwrap().is_none());
    }

    mod store {
        use crate::model::{AgentId, LogType, NewRequest, Request, Status};
        use crate::store::test_support::temp_store;
        use crate::store::{Finish, LogQuery, Store};
        use std::time::Duration;

        async fn with_retries(s: &Store, retries: u32) -> Request {
            s.create(NewRequest {
                vm_name: "t".into(),
                commands: "x".into(),
                timeout: 1,
                retries,
                ..Default::default()
            })
            .await
            .unwrap()
        }

        fn infra(error: &str) -> Finish {
            Finish {
                status: Status::Failed,
                error: Some(error.into()),
                retryable: true,
                ..Default::default()
            }
        }

        async fn run_by(s: &Store, agent: &AgentId, lease: Duration) -> Request {
            let r = s.claim(agent, lease).await.unwrap().expect("claimable");
            assert!(s.mark_running(r.uuid, agent).await.unwrap());
            r
        }

        async fn system_text(s: &Store, r: &Request, attempt: Option<u32>) -> String {
            let q = LogQuery {
                log_type: Some(LogType::System),
                attempt,
                ..Default::default()
            };
            let rows = s.logs(r.uuid, q).await.unwrap();
            rows.iter()
                .map(|e| String::from_utf8_lossy(&e.output).into_owned())
                .collect()
        }

        #[tokio::test]
        async fn an_infrastructure_failure_is_requeued_as_the_next_attempt_until_none_are_left() {
            let (s, _d) = temp_store().await;
            let r = with_retries(&s, 1).await;
            assert_eq!((r.retries, r.attempt), (1, 1));
            let first = AgentId("h1:1:0".into());
            let lease = Duration::from_secs(30);
            let claimed = run_by(&s, &first, lease).await;
            assert_eq!(claimed.attempt, 1);
            s.append_logs_with_console(
                r.uuid,
                Some(1),
                vec![("t".into(), LogType::Boot, b"first boot".to_vec())],
                b"first boot".to_vec(),
            )
            .await
            .unwrap();
            assert!(s.finish(r.uuid, &first, infra("QEMU died")).await.unwrap());
            let got = s.get(r.uuid).await.unwrap().unwrap();
            assert_eq!((got.status, got.attempt), (Status::Pending, 2));
            assert_eq!(
                (
                    got.agent_id,
                    got.host,
                    got.started_at,
                    got.error,
                    got.finished_at
                ),
                (None, None, None, None, None),
                "the next attempt starts as if never claimed"
            );
            assert_eq!(got.attempts.len(), 1);
            let rec = &got.attempts[0];
            assert_eq!((rec.attempt, rec.error.as_str()), (1, "QEMU died"));
            assert_eq!(
                (rec.agent_id.as_deref(), rec.host.as_deref()),
                (Some("h1:1:0"), Some("h1"))
            );
            assert!(rec.started_at.is_some());
            assert!(system_text(&s, &r, Some(1))
                .await
                .contains("attempt 1 failed (QEMU died); re-queued as attempt 2 of 2"));
            // The failed agent is fenced out: the request is no longer its own.
            assert!(!s.finish(r.uuid, &first, infra("late")).await.unwrap());
            assert!(!s.heartbeat(r.uuid, &first, lease).await.unwrap());
            // Attempt 2, elsewhere: its logs are its own and their ids keep increasing.
            let second = AgentId("h2:1:0".into());
            let claimed = run_by(&s, &second, lease).await;
            assert_eq!((claimed.attempt, claimed.host.as_deref()), (2, Some("h2")));
            s.append_logs_with_console(
                r.uuid,
                Some(2),
                vec![("t".into(), LogType::Boot, b"second boot".to_vec())],
                Vec::new(),
            )
            .await
            .unwrap();
            let all = s.logs(r.uuid, LogQuery::default()).await.unwrap();
            assert!(all.windows(2).all(|w| w[0].id < w[1].id));
            let boot = |attempt| LogQuery {
                log_type: Some(LogType::Boot),
                attempt: Some(attempt),
                ..Default::default()
            };
            let one = s.logs(r.uuid, boot(1)).await.unwrap();
            let two = s.logs(r.uuid, boot(2)).await.unwrap();
            assert_eq!((one.len(), two.len()), (1, 1));
            assert_eq!(
                (one[0].output.as_slice(), one[0].attempt),
                (&b"first boot"[..], 1)
            );
            assert_eq!(
                (two[0].output.as_slice(), two[0].attempt),
                (&b"second boot"[..], 2)
            );
            assert!(one[0].id < two[0].id);
            // A sink without an attempt writes the current one.
            s.append_logs(r.uuid, vec![("t".into(), LogType::System, b"x\n".to_vec())])
                .await
                .unwrap();
            let last = s.logs(r.uuid, LogQuery::default()).await.unwrap();
            assert_eq!(last.last().unwrap().attempt, 2);
            // None left: the failure is final, the earlier attempt still on record.
            assert!(s
                .finish(r.uuid, &second, infra("QEMU died again"))
                .await
                .unwrap());
            let got = s.get(r.uuid).await.unwrap().unwrap();
            assert_eq!(
                (got.status, got.attempt, got.error.as_deref()),
                (Status::Failed, 2, Some("QEMU died again"))
            );
            assert_eq!(got.attempts.len(), 1);
        }

        #[tokio::test]
        async fn the_requests_own_failures_and_an_operators_cancel_are_never_retried() {
            let (s, _d) = temp_store().await;
            let agent = AgentId("h:1:0".into());
            let lease = Duration::from_secs(30);
            // Not retryable (the commands' timeout): final at once.
            let r = with_retries(&s, 2).await;
            run_by(&s, &agent, lease).await;
            let own = Finish {
                retryable: false,
                ..infra("timed out after 5 s")
            };
            assert!(s.finish(r.uuid, &agent, own).await.unwrap());
            let got = s.get(r.uuid).await.unwrap().unwrap();
            assert_eq!((got.status, got.attempt), (Status::Failed, 1));
            // A pending cancel wins over a retry.
            let r = with_retries(&s, 2).await;
            run_by(&s, &agent, lease).await;
            s.control(r.uuid, Status::Cancelled).await.unwrap();
            assert!(s.finish(r.uuid, &agent, infra("QEMU died")).await.unwrap());
            let got = s.get(r.uuid).await.unwrap().unwrap();
            assert_eq!((got.status, got.attempt), (Status::Failed, 1));
            // A pending hold: re-queued held, to wait for a resume without a VM.
            let r = with_retries(&s, 2).await;
            run_by(&s, &agent, lease).await;
            s.control(r.uuid, Status::Hold).await.unwrap();
            assert!(s.finish(r.uuid, &agent, infra("QEMU died")).await.unwrap());
            let got = s.get(r.uuid).await.unwrap().unwrap();
            assert_eq!(
                (got.status, got.attempt, got.desired_status, got.agent_id),
                (Status::Hold, 2, None, None)
            );
            assert!(s.claim(&agent, lease).await.unwrap().is_none(), "held");
            s.control(r.uuid, Status::Pending).await.unwrap();
            assert_eq!(s.claim(&agent, lease).await.unwrap().unwrap().attempt, 2);
        }

        #[tokio::test]
        async fn lease_recovery_requeues_a_lost_run_with_retries_left() {
            let (s, _d) = temp_store().await;
            let dead = AgentId("h1:1:0".into());
            let short = Duration::from_millis(1);
            let r = with_retries(&s, 1).await;
            run_by(&s, &dead, short).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(s.reap_expired().await.unwrap(), [(r.uuid, Status::Pending)]);
            let got = s.get(r.uuid).await.unwrap().unwrap();
            assert_eq!(
                (got.status, got.attempt, got.agent_id),
                (Status::Pending, 2, None)
            );
            assert_eq!(got.attempts[0].error, "agent lost");
            let text = system_text(&s, &r, Some(1)).await;
            assert!(
                text.contains(
                    "agent h1:1:0 lost (lease expired); attempt 1 failed (agent lost); \
                               re-queued as attempt 2 of 2"
                ),
                "{text}"
            );
            // The lost agent's late finish changes nothing.
            let done = Finish {
                status: Status::Done,
                exit_code: Some(0),
                ..Default::default()
            };
            assert!(!s.finish(r.uuid, &dead, done).await.unwrap());
            // Lost again with none left: failed, agent lost.
            run_by(&s, &dead, short).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(s.reap_expired().await.unwrap(), [(r.uuid, Status::Failed)]);
            let got = s.get(r.uuid).await.unwrap().unwrap();
            assert_eq!(
                (got.status, got.attempt, got.error.as_deref()),
                (Status::Failed, 2, Some("agent lost"))
            );
            assert!(system_text(&s, &r, Some(2))
                .await
                .contains("request failed"));
        }
    }
}

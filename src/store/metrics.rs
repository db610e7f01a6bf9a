//! Aggregates for `GET /metrics`, computed from the database so that any process (the API alone
//! included) reports the whole system.

use super::{Store, StoreError};
use crate::model::{ShutdownStep, Status};

/// Upper bounds (seconds) of the duration histograms.
pub const BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// A cumulative histogram: `(le, count)` per bucket, plus sum and count.
#[derive(Debug, Default, Clone)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

#[derive(Debug, Default, Clone)]
pub struct MetricsSnapshot {
    pub by_status: Vec<(Status, u64)>,
    /// Requests owned by an agent right now (a VM exists or is being prepared).
    pub vms_active: u64,
    pub boot: Histogram,
    pub run: Histogram,
    pub shutdown: Histogram,
    pub shutdown_steps: Vec<(ShutdownStep, u64)>,
    pub log_bytes: u64,
}

// --- Engine-neutral aggregation ----------------------------------------------------------------
// Both engines run one query per figure; what the figures are, and how rows become them, is
// decided here once. Only the SQL expressions differ (SQLite sums booleans, PostgreSQL filters).

/// `SELECT` of a histogram over `column` (milliseconds): one count per bucket of [`BUCKETS`]
/// (`count_le(column, ms)`), then the sum (`sum(column)`) and the count of non-null values.
pub(super) fn histogram_sql(
    column: &str,
    count_le: fn(&str, i64) -> String,
    sum: fn(&str) -> String,
) -> String {
    let mut cols: Vec<String> = BUCKETS
        .iter()
        .map(|le| count_le(column, (le * 1000.0) as i64))
        .collect();
    cols.push(sum(column));
    cols.push(format!("COUNT({column})"));
    format!("SELECT {} FROM requests", cols.join(", "))
}

/// The histogram from the row [`histogram_sql`] selects (`get(i)`: its column `i`).
pub(super) fn histogram_from<E>(get: impl Fn(usize) -> Result<i64, E>) -> Result<Histogram, E> {
    let n = BUCKETS.len();
    let mut buckets = Vec::with_capacity(n);
    for (i, le) in BUCKETS.iter().enumerate() {
        buckets.push((*le, get(i)? as u64));
    }
    Ok(Histogram {
        buckets,
        sum_seconds: get(n)? as f64 / 1000.0,
        count: get(n + 1)? as u64,
    })
}

/// The offset of the nearest-rank 95th percentile among `count` sorted values (none of none).
pub(super) fn p95_rank(count: i64) -> Option<i64> {
    (count > 0).then(|| ((count as f64) * 0.95).ceil() as i64 - 1)
}

/// One `(name, count)` row of a `GROUP BY`, as read.
pub(super) type CountRow = Result<(String, i64), StoreError>;

/// Every status with its count, from `(status, count)` rows (statuses without rows: 0).
pub(super) fn status_counts(
    rows: impl IntoIterator<Item = CountRow>,
) -> Result<Vec<(Status, u64)>, StoreError> {
    let mut by_status: Vec<(Status, u64)> = Status::ALL.iter().map(|s| (*s, 0)).collect();
    for row in rows {
        let (st, n) = row?;
        let st: Status = st
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
        if let Some(slot) = by_status.iter_mut().find(|(s, _)| *s == st) {
            slot.1 = n as u64;
        }
    }
    Ok(by_status)
}

/// Shutdown steps with their counts, from `(step, count)` rows.
pub(super) fn step_counts(
    rows: impl IntoIterator<Item = CountRow>,
) -> Result<Vec<(ShutdownStep, u64)>, StoreError> {
    rows.into_iter()
        .map(|row| {
            let (st, n) = row?;
            let step: ShutdownStep = st
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
            Ok((step, n as u64))
        })
        .collect()
}

/// `cli stats` from the metrics snapshot, the finished requests (`ok` of them `done` with exit
/// code 0) and the duration summaries.
pub(super) fn stats_of(
    m: &MetricsSnapshot,
    finished: i64,
    ok: i64,
    boot: Summary,
    run: Summary,
) -> Stats {
    Stats {
        by_status: m
            .by_status
            .iter()
            .map(|(s, n)| (s.as_str().to_string(), *n))
            .collect(),
        vms_running: m.vms_active,
        finished: finished as u64,
        success_rate: (finished > 0).then(|| ok as f64 / finished as f64),
        boot,
        run,
        log_bytes: m.log_bytes,
    }
}

fn histogram(c: &rusqlite::Connection, column: &str) -> Result<Histogram, StoreError> {
    let sql = histogram_sql(
        column,
        |col, ms| format!("COALESCE(SUM({col} <= {ms}), 0)"),
        |col| format!("COALESCE(SUM({col}), 0)"),
    );
    Ok(c.query_row(&sql, [], |r| histogram_from(|i| r.get::<_, i64>(i)))?)
}

/// Mean and 95th percentile of a duration column, in milliseconds.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, utoipa::ToSchema)]
pub struct Summary {
    pub count: u64,
    pub mean_ms: Option<f64>,
    pub p95_ms: Option<i64>,
}

/// What `sqlite-sim cli stats` shows.
#[derive(Debug, Default, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Stats {
    pub by_status: std::collections::BTreeMap<String, u64>,
    pub vms_running: u64,
    pub finished: u64,
    /// Finished requests that ended `done` with exit code 0, as a fraction of finished ones.
    pub success_rate: Option<f64>,
    pub boot: Summary,
    pub run: Summary,
    pub log_bytes: u64,
}

fn summary(c: &rusqlite::Connection, column: &str) -> Result<Summary, StoreError> {
    let (count, mean): (i64, Option<f64>) = c.query_row(
        &format!("SELECT COUNT({column}), AVG({column}) FROM requests"),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let p95 = match p95_rank(count) {
        None => None,
        Some(rank) => Some(c.query_row(
            &format!(
                "SELECT {column} FROM requests WHERE {column} IS NOT NULL
                 ORDER BY {column} LIMIT 1 OFFSET ?1"
            ),
            [rank],
            |r| r.get(0),
        )?),
    };
    Ok(Summary {
        count: count as u64,
        mean_ms: mean,
        p95_ms: p95,
    })
}

impl Store {
    /// Summary statistics over every request.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        on_pg!(self.stats());
        let m = self.metrics().await?;
        self.call(move |c| {
            let (finished, ok): (i64, i64) = c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(status = 'done' AND exit_code = 0), 0)
                 FROM requests WHERE status IN ('done','failed','cancelled')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok(stats_of(
                &m,
                finished,
                ok,
                summary(c, "boot_ms")?,
                summary(c, "run_ms")?,
            ))
        })
        .await
    }

    pub async fn metrics(&self) -> Result<MetricsSnapshot, StoreError> {
        on_pg!(self.metrics());
        self.call(|c| {
            let pairs = |sql: &str| -> Result<Vec<CountRow>, StoreError> {
                let mut stmt = c.prepare(sql)?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let rows: Vec<_> = rows.map(|r| r.map_err(StoreError::from)).collect();
                Ok(rows)
            };
            let by_status = status_counts(pairs(
                "SELECT status, COUNT(*) FROM requests GROUP BY status",
            )?)?;
            let vms_active: i64 = c.query_row(
                "SELECT COUNT(*) FROM requests WHERE agent_id IS NOT NULL
                   AND status IN ('acknowledged','running','hold')",
                [],
                |r| r.get(0),
            )?;
            let steps = step_counts(pairs(
                "SELECT shutdown_step, COUNT(*) FROM requests WHERE shutdown_step IS NOT NULL
                 GROUP BY shutdown_step ORDER BY shutdown_step",
            )?)?;
            let log_bytes: i64 = c.query_row(
                "SELECT COALESCE(SUM(length(output)), 0) FROM work_log",
                [],
                |r| r.get(0),
            )?;
            Ok(MetricsSnapshot {
                by_status,
                vms_active: vms_active as u64,
                boot: histogram(c, "boot_ms")?,
                run: histogram(c, "run_ms")?,
                shutdown: histogram(c, "shutdown_ms")?,
                shutdown_steps: steps,
                log_bytes: log_bytes as u64,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AgentId, LogType};
    use crate::store::test_support::{pending_request, temp_store};
    use crate::store::Finish;
    use std::time::Duration;

    #[tokio::test]
    async fn snapshot_counts_and_histograms() {
        let (s, _d) = temp_store().await;
        let agent = AgentId("a".into());
        for _ in 0..3 {
            pending_request(&s).await;
        }
        let r = s
            .claim(&agent, Duration::from_secs(9))
            .await
            .unwrap()
            .unwrap();
        s.append_logs(r.uuid, vec![("t".into(), LogType::Stdout, vec![0; 1000])])
            .await
            .unwrap();
        s.finish(
            r.uuid,
            &agent,
            Finish {
                status: Status::Done,
                exit_code: Some(0),
                shutdown_step: Some(ShutdownStep::Powerdown),
                boot_ms: Some(2_200),
                run_ms: Some(300),
                shutdown_ms: Some(60),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        s.claim(&agent, Duration::from_secs(9))
            .await
            .unwrap()
            .unwrap();
        let m = s.metrics().await.unwrap();
        let count = |st| m.by_status.iter().find(|(s, _)| *s == st).unwrap().1;
        assert_eq!(
            (
                count(Status::Pending),
                count(Status::Acknowledged),
                count(Status::Done)
            ),
            (1, 1, 1)
        );
        assert_eq!(m.vms_active, 1);
        assert_eq!(m.boot.count, 1);
        assert!((m.boot.sum_seconds - 2.2).abs() < 1e-9);
        let le = |h: &Histogram, x: f64| h.buckets.iter().find(|(le, _)| *le == x).unwrap().1;
        assert_eq!((le(&m.boot, 1.0), le(&m.boot, 2.5)), (0, 1));
        assert_eq!(le(&m.shutdown, 0.1), 1);
        assert_eq!(m.shutdown_steps, vec![(ShutdownStep::Powerdown, 1)]);
        assert_eq!(m.log_bytes, 1000);
        let st = s.stats().await.unwrap();
        assert_eq!((st.finished, st.success_rate), (1, Some(1.0)));
        assert_eq!(st.boot.p95_ms, Some(2200));
        assert_eq!(st.by_status["pending"], 1);
    }

    #[test]
    fn p95_rank_is_the_nearest_rank() {
        assert_eq!(p95_rank(0), None);
        assert_eq!(p95_rank(1), Some(0));
        assert_eq!(p95_rank(20), Some(18));
        assert_eq!(p95_rank(21), Some(19));
    }

    #[tokio::test]
    async fn p95_is_nearest_rank() {
        let (s, _d) = temp_store().await;
        // Rows with only a boot time, written below the boundary (no public method makes them).
        if let Some(pg) = &s.pg {
            let c = pg.client().await.unwrap();
            for i in 1..=20i64 {
                c.execute(
                    "INSERT INTO requests (uuid, vm_name, commands, timeout, created_at, updated_at, boot_ms)
                     VALUES ($1, 't', 'x', 1, 't', 't', $2)",
                    &[&format!("00000000-0000-0000-0000-{i:012}"), &(i * 100)],
                )
                .await
                .unwrap();
            }
        } else {
            s.call(|c| {
                for i in 1..=20 {
                    c.execute(
                        "INSERT INTO requests (uuid, vm_name, commands, timeout, created_at, updated_at, boot_ms)
                         VALUES (?1, 't', 'x', 1, 't', 't', ?2)",
                        rusqlite::params![format!("00000000-0000-0000-0000-{i:012}"), i * 100],
                    )?;
                }
                Ok(())
            })
            .await
            .unwrap();
        }
        let st = s.stats().await.unwrap();
        assert_eq!(st.boot.count, 20);
        assert_eq!(st.boot.p95_ms, Some(1900));
        assert_eq!(st.boot.mean_ms, Some(1050.0));
        assert_eq!(st.success_rate, None);
    }
}

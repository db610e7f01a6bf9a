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

fn histogram(c: &rusqlite::Connection, column: &str) -> Result<Histogram, StoreError> {
    let mut cols: Vec<String> = BUCKETS
        .iter()
        .map(|le| format!("COALESCE(SUM({column} <= {}), 0)", (le * 1000.0) as i64))
        .collect();
    cols.push(format!("COALESCE(SUM({column}), 0)"));
    cols.push(format!("COUNT({column})"));
    let sql = format!("SELECT {} FROM requests", cols.join(", "));
    c.query_row(&sql, [], |r| {
        let n = BUCKETS.len();
        let mut buckets = Vec::with_capacity(n);
        for (i, le) in BUCKETS.iter().enumerate() {
            buckets.push((*le, r.get::<_, i64>(i)? as u64));
        }
        Ok(Histogram {
            buckets,
            sum_seconds: r.get::<_, i64>(n)? as f64 / 1000.0,
            count: r.get::<_, i64>(n + 1)? as u64,
        })
    })
    .map_err(Into::into)
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
    let p95 = if count == 0 {
        None
    } else {
        // Nearest-rank percentile.
        let rank = ((count as f64) * 0.95).ceil() as i64 - 1;
        Some(c.query_row(
            &format!(
                "SELECT {column} FROM requests WHERE {column} IS NOT NULL
                 ORDER BY {column} LIMIT 1 OFFSET ?1"
            ),
            [rank],
            |r| r.get(0),
        )?)
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
            Ok(Stats {
                by_status: m
                    .by_status
                    .iter()
                    .map(|(s, n)| (s.as_str().to_string(), *n))
                    .collect(),
                vms_running: m.vms_active,
                finished: finished as u64,
                success_rate: (finished > 0).then(|| ok as f64 / finished as f64),
                boot: summary(c, "boot_ms")?,
                run: summary(c, "run_ms")?,
                log_bytes: m.log_bytes,
            })
        })
        .await
    }

    pub async fn metrics(&self) -> Result<MetricsSnapshot, StoreError> {
        on_pg!(self.metrics());
        self.call(|c| {
            let mut by_status: Vec<(Status, u64)> = Status::ALL.iter().map(|s| (*s, 0)).collect();
            let mut stmt = c.prepare("SELECT status, COUNT(*) FROM requests GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (st, n) = row?;
                let st: Status = st
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
                if let Some(slot) = by_status.iter_mut().find(|(s, _)| *s == st) {
                    slot.1 = n as u64;
                }
            }
            let vms_active: i64 = c.query_row(
                "SELECT COUNT(*) FROM requests WHERE agent_id IS NOT NULL
                   AND status IN ('acknowledged','running','hold')",
                [],
                |r| r.get(0),
            )?;
            let mut steps = Vec::new();
            let mut stmt = c.prepare(
                "SELECT shutdown_step, COUNT(*) FROM requests WHERE shutdown_step IS NOT NULL
                 GROUP BY shutdown_step ORDER BY shutdown_step",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (st, n) = row?;
                let step: ShutdownStep = st
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
                steps.push((step, n as u64));
            }
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
    use crate::model::{AgentId, LogType, NewRequest};
    use crate::store::test_support::temp_store;
    use crate::store::Finish;
    use std::time::Duration;

    #[tokio::test]
    async fn snapshot_counts_and_histograms() {
        let (s, _d) = temp_store().await;
        let agent = AgentId("a".into());
        for _ in 0..3 {
            s.create(NewRequest {
                vm_name: "t".into(),
                commands: "x".into(),
                timeout: 9,
                boot: None,
                uploads: Vec::new(),
                artifacts: Vec::new(),
                requires: Vec::new(),
                keep_on_failure: None,
                submitted_by: None,
            })
            .await
            .unwrap();
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

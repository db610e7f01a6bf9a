//! Aggregates for `GET /metrics` and `cli stats` on PostgreSQL, the same figures as
//! `store/metrics.rs` (PostgreSQL's sums and averages are numeric, hence the casts).

use super::Pg;
use crate::model::{ShutdownStep, Status};
use crate::store::{Histogram, MetricsSnapshot, Stats, StoreError, Summary, BUCKETS};

async fn histogram(c: &tokio_postgres::Client, column: &str) -> Result<Histogram, StoreError> {
    let mut cols: Vec<String> = BUCKETS
        .iter()
        .map(|le| {
            format!(
                "COUNT(*) FILTER (WHERE {column} <= {})",
                (le * 1000.0) as i64
            )
        })
        .collect();
    cols.push(format!("COALESCE(SUM({column}), 0)::bigint"));
    cols.push(format!("COUNT({column})"));
    let r = c
        .query_one(&format!("SELECT {} FROM requests", cols.join(", ")), &[])
        .await?;
    let n = BUCKETS.len();
    let mut buckets = Vec::with_capacity(n);
    for (i, le) in BUCKETS.iter().enumerate() {
        buckets.push((*le, r.try_get::<_, i64>(i)? as u64));
    }
    Ok(Histogram {
        buckets,
        sum_seconds: r.try_get::<_, i64>(n)? as f64 / 1000.0,
        count: r.try_get::<_, i64>(n + 1)? as u64,
    })
}

async fn summary(c: &tokio_postgres::Client, column: &str) -> Result<Summary, StoreError> {
    let r = c
        .query_one(
            &format!("SELECT COUNT({column}), AVG({column})::float8 FROM requests"),
            &[],
        )
        .await?;
    let (count, mean): (i64, Option<f64>) = (r.try_get(0)?, r.try_get(1)?);
    let p95 = if count == 0 {
        None
    } else {
        // Nearest-rank percentile.
        let rank = ((count as f64) * 0.95).ceil() as i64 - 1;
        Some(
            c.query_one(
                &format!(
                    "SELECT {column} FROM requests WHERE {column} IS NOT NULL
                     ORDER BY {column} LIMIT 1 OFFSET $1"
                ),
                &[&rank],
            )
            .await?
            .try_get(0)?,
        )
    };
    Ok(Summary {
        count: count as u64,
        mean_ms: mean,
        p95_ms: p95,
    })
}

impl Pg {
    pub(crate) async fn stats(&self) -> Result<Stats, StoreError> {
        let m = self.metrics().await?;
        retry!(self, "stats", |c| {
            let r = c
                .query_one(
                    "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 'done' AND exit_code = 0)
                     FROM requests WHERE status IN ('done','failed','cancelled')",
                    &[],
                )
                .await?;
            let (finished, ok): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
            Ok(Stats {
                by_status: m
                    .by_status
                    .iter()
                    .map(|(s, n)| (s.as_str().to_string(), *n))
                    .collect(),
                vms_running: m.vms_active,
                finished: finished as u64,
                success_rate: (finished > 0).then(|| ok as f64 / finished as f64),
                boot: summary(c, "boot_ms").await?,
                run: summary(c, "run_ms").await?,
                log_bytes: m.log_bytes,
            })
        })
    }

    pub(crate) async fn metrics(&self) -> Result<MetricsSnapshot, StoreError> {
        retry!(self, "metrics", |c| {
            let mut by_status: Vec<(Status, u64)> = Status::ALL.iter().map(|s| (*s, 0)).collect();
            for r in c
                .query("SELECT status, COUNT(*) FROM requests GROUP BY status", &[])
                .await?
            {
                let st: Status = r
                    .try_get::<_, String>(0)?
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
                if let Some(slot) = by_status.iter_mut().find(|(s, _)| *s == st) {
                    slot.1 = r.try_get::<_, i64>(1)? as u64;
                }
            }
            let vms_active: i64 = c
                .query_one(
                    "SELECT COUNT(*) FROM requests WHERE agent_id IS NOT NULL
                       AND status IN ('acknowledged','running','hold')",
                    &[],
                )
                .await?
                .try_get(0)?;
            let mut steps = Vec::new();
            for r in c
                .query(
                    "SELECT shutdown_step, COUNT(*) FROM requests WHERE shutdown_step IS NOT NULL
                     GROUP BY shutdown_step ORDER BY shutdown_step",
                    &[],
                )
                .await?
            {
                let step: ShutdownStep = r
                    .try_get::<_, String>(0)?
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
                steps.push((step, r.try_get::<_, i64>(1)? as u64));
            }
            let log_bytes: i64 = c
                .query_one(
                    "SELECT COALESCE(SUM(octet_length(output)), 0)::bigint FROM work_log",
                    &[],
                )
                .await?
                .try_get(0)?;
            Ok(MetricsSnapshot {
                by_status,
                vms_active: vms_active as u64,
                boot: histogram(c, "boot_ms").await?,
                run: histogram(c, "run_ms").await?,
                shutdown: histogram(c, "shutdown_ms").await?,
                shutdown_steps: steps,
                log_bytes: log_bytes as u64,
            })
        })
    }
}

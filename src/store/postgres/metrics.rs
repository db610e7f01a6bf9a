//! Aggregates for `GET /metrics` and `cli stats` on PostgreSQL, the same figures as
//! `store/metrics.rs` (PostgreSQL's sums and averages are numeric, hence the casts).

use super::Pg;
use crate::store::metrics::{
    histogram_from, histogram_sql, p95_rank, stats_of, status_counts, step_counts, CountRow,
};
use crate::store::{Histogram, MetricsSnapshot, Stats, StoreError, Summary};

async fn histogram(c: &tokio_postgres::Client, column: &str) -> Result<Histogram, StoreError> {
    let sql = histogram_sql(
        column,
        |col, ms| format!("COUNT(*) FILTER (WHERE {col} <= {ms})"),
        |col| format!("COALESCE(SUM({col}), 0)::bigint"),
    );
    let r = c.query_one(&sql, &[]).await?;
    Ok(histogram_from(|i| r.try_get::<_, i64>(i))?)
}

async fn summary(c: &tokio_postgres::Client, column: &str) -> Result<Summary, StoreError> {
    let r = c
        .query_one(
            &format!("SELECT COUNT({column}), AVG({column})::float8 FROM requests"),
            &[],
        )
        .await?;
    let (count, mean): (i64, Option<f64>) = (r.try_get(0)?, r.try_get(1)?);
    let p95 = match p95_rank(count) {
        None => None,
        Some(rank) => Some(
            c.query_one(
                &format!(
                    "SELECT {column} FROM requests WHERE {column} IS NOT NULL
                     ORDER BY {column} LIMIT 1 OFFSET $1"
                ),
                &[&rank],
            )
            .await?
            .try_get(0)?,
        ),
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
            Ok(stats_of(
                &m,
                finished,
                ok,
                summary(c, "boot_ms").await?,
                summary(c, "run_ms").await?,
            ))
        })
    }

    pub(crate) async fn metrics(&self) -> Result<MetricsSnapshot, StoreError> {
        retry!(self, "metrics", |c| {
            let pairs = |rows: Vec<tokio_postgres::Row>| {
                rows.into_iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect::<Vec<CountRow>>()
            };
            let by_status = status_counts(pairs(
                c.query("SELECT status, COUNT(*) FROM requests GROUP BY status", &[])
                    .await?,
            ))?;
            let vms_active: i64 = c
                .query_one(
                    "SELECT COUNT(*) FROM requests WHERE agent_id IS NOT NULL
                       AND status IN ('acknowledged','running','hold')",
                    &[],
                )
                .await?
                .try_get(0)?;
            let steps = step_counts(pairs(
                c.query(
                    "SELECT shutdown_step, COUNT(*) FROM requests WHERE shutdown_step IS NOT NULL
                     GROUP BY shutdown_step ORDER BY shutdown_step",
                    &[],
                )
                .await?,
            ))?;
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

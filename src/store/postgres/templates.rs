//! Warm-start template rows and orders on PostgreSQL (see `store/templates.rs`).

use super::Pg;
use crate::store::{RestoreStats, StoreError, TemplateOrder, TemplateOrders, TemplateRecord};
use crate::timefmt;
use tokio_postgres::Row;

const COLUMNS: &str = "host_id, vm_name, state, template_key, built_from, built_at, build_ms, \
     size_bytes, error, failures, build_order, delete_order, updated_at";

/// As many restore times as the SQLite engine looks at.
const RESTORE_WINDOW: i64 = 200;

fn from_row(r: &Row) -> Result<TemplateRecord, StoreError> {
    let host_id: String = r.try_get(0)?;
    let vm_name: String = r.try_get(1)?;
    let state: String = r.try_get(2)?;
    let state = state
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("template {host_id}/{vm_name}: {e}")))?;
    Ok(TemplateRecord {
        host_id,
        vm_name,
        state,
        key: r.try_get(3)?,
        built_from: r.try_get(4)?,
        built_at: r.try_get(5)?,
        build_ms: r.try_get(6)?,
        size_bytes: r.try_get(7)?,
        error: r.try_get(8)?,
        failures: r.try_get(9)?,
        build_order: r.try_get(10)?,
        delete_order: r.try_get(11)?,
        updated_at: r.try_get(12)?,
    })
}

fn orders_of(r: &Row) -> Result<TemplateOrders, StoreError> {
    Ok(TemplateOrders {
        build: r.try_get(0)?,
        delete: r.try_get(1)?,
    })
}

impl Pg {
    pub(crate) async fn templates(
        &self,
        vm: Option<String>,
    ) -> Result<Vec<TemplateRecord>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM templates WHERE ($1::text IS NULL OR vm_name = $1)
             ORDER BY vm_name, host_id"
        );
        retry!(self, "templates", |c| {
            c.query(&sql, &[&vm]).await?.iter().map(from_row).collect()
        })
    }

    /// An upsert: idempotent.
    pub(crate) async fn put_template(&self, rec: TemplateRecord) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO templates ({COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (host_id, vm_name) DO UPDATE SET
                 state = EXCLUDED.state, template_key = EXCLUDED.template_key,
                 built_from = EXCLUDED.built_from, built_at = EXCLUDED.built_at,
                 build_ms = EXCLUDED.build_ms, size_bytes = EXCLUDED.size_bytes,
                 error = EXCLUDED.error, failures = EXCLUDED.failures,
                 build_order = EXCLUDED.build_order, delete_order = EXCLUDED.delete_order,
                 updated_at = EXCLUDED.updated_at"
        );
        write_tx!(self, "put_template", |tx| async {
            tx.execute(
                &sql,
                &[
                    &rec.host_id,
                    &rec.vm_name,
                    &rec.state.as_str(),
                    &rec.key,
                    &rec.built_from,
                    &rec.built_at,
                    &rec.build_ms,
                    &rec.size_bytes,
                    &rec.error,
                    &rec.failures,
                    &rec.build_order,
                    &rec.delete_order,
                    &timefmt::now(),
                ],
            )
            .await?;
            Ok(())
        }
        .await)
    }

    pub(crate) async fn template_orders(&self, vm: String) -> Result<TemplateOrders, StoreError> {
        retry!(self, "template_orders", |c| {
            match c
                .query_opt(
                    "SELECT build_order, delete_order FROM template_orders WHERE vm_name = $1",
                    &[&vm],
                )
                .await?
            {
                Some(r) => orders_of(&r),
                None => Ok(TemplateOrders::default()),
            }
        })
    }

    /// Not idempotent, and not worth a re-check: an order counted twice after a lost COMMIT is
    /// still the latest order of its kind, which is all hosts act on.
    pub(crate) async fn order_template(
        &self,
        vm: String,
        order: TemplateOrder,
    ) -> Result<TemplateOrders, StoreError> {
        write_tx!(self, "order_template", |tx| async {
            // Lock the VM's row (creating it) so that concurrent orders draw distinct numbers.
            tx.execute(
                "INSERT INTO template_orders (vm_name, updated_at) VALUES ($1, $2)
                 ON CONFLICT (vm_name) DO NOTHING",
                &[&vm, &timefmt::now()],
            )
            .await?;
            let cur = orders_of(
                &tx.query_one(
                    "SELECT build_order, delete_order FROM template_orders WHERE vm_name = $1
                     FOR UPDATE",
                    &[&vm],
                )
                .await?,
            )?;
            // Orders share one sequence, so whichever is larger came last.
            let next = cur.build.max(cur.delete) + 1;
            let (b, d) = match order {
                TemplateOrder::Build => (next, cur.delete),
                TemplateOrder::Delete => (cur.build, next),
            };
            tx.execute(
                "UPDATE template_orders SET build_order = $2, delete_order = $3, updated_at = $4
                 WHERE vm_name = $1",
                &[&vm, &b, &d, &timefmt::now()],
            )
            .await?;
            Ok(TemplateOrders {
                build: b,
                delete: d,
            })
        }
        .await)
    }

    pub(crate) async fn restore_stats(&self, vm: String) -> Result<RestoreStats, StoreError> {
        retry!(self, "restore_stats", |c| {
            let mut ms: Vec<i64> = c
                .query(
                    "SELECT restore_ms FROM requests
                     WHERE vm_name = $1 AND restore_ms IS NOT NULL AND finished_at IS NOT NULL
                     ORDER BY finished_at DESC LIMIT $2",
                    &[&vm, &RESTORE_WINDOW],
                )
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            ms.sort_unstable();
            let at = |q: f64| -> Option<i64> {
                (!ms.is_empty()).then(|| ms[((ms.len() - 1) as f64 * q).round() as usize])
            };
            Ok(RestoreStats {
                count: ms.len() as u64,
                p50_ms: at(0.5),
                p99_ms: at(0.99),
            })
        })
    }
}

//! Warm-start templates as the store knows them: one row per (host, VM) written by that host's
//! agents, and the build/delete orders the API gives every host.
//!
//! The files of a template live on its host; the rows let an API on any process (or host) show
//! where each template stands, and carry orders to the agents: an order is a counter the API
//! bumps, and a host has carried it out once its row's counter has caught up.

use super::{Store, StoreError};
use crate::model::TemplateState;
use crate::timefmt;
use rusqlite::{params, OptionalExtension, TransactionBehavior};

/// One host's template of one VM.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TemplateRecord {
    pub host_id: String,
    pub vm_name: String,
    pub state: TemplateState,
    /// Identity of what the template was (or is being) built from.
    pub key: Option<String>,
    /// JSON: the inputs behind `key` (image, kernel, config, QEMU, accelerator).
    pub built_from: Option<String>,
    pub built_at: Option<String>,
    pub build_ms: Option<i64>,
    pub size_bytes: Option<i64>,
    pub error: Option<String>,
    /// Failed builds or restores since the last good build of this key.
    pub failures: i64,
    /// The last build and delete orders this host carried out.
    pub build_order: i64,
    pub delete_order: i64,
    pub updated_at: String,
}

/// What the API has ordered for a VM's templates: numbers from one sequence per VM, so the
/// larger of the two is the latest order (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TemplateOrders {
    pub build: i64,
    pub delete: i64,
}

/// An order from the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateOrder {
    Build,
    Delete,
}

/// Restore times of a VM's warm and pooled runs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RestoreStats {
    pub count: u64,
    pub p50_ms: Option<i64>,
    pub p99_ms: Option<i64>,
}

const COLUMNS: &str = "host_id, vm_name, state, template_key, built_from, built_at, build_ms, \
     size_bytes, error, failures, build_order, delete_order, updated_at";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TemplateRecord, StoreError>> {
    let state: String = r.get(2)?;
    let rec = TemplateRecord {
        host_id: r.get(0)?,
        vm_name: r.get(1)?,
        state: TemplateState::None,
        key: r.get(3)?,
        built_from: r.get(4)?,
        built_at: r.get(5)?,
        build_ms: r.get(6)?,
        size_bytes: r.get(7)?,
        error: r.get(8)?,
        failures: r.get(9)?,
        build_order: r.get(10)?,
        delete_order: r.get(11)?,
        updated_at: r.get(12)?,
    };
    Ok(match state.parse() {
        Ok(state) => Ok(TemplateRecord { state, ..rec }),
        Err(e) => Err(StoreError::Corrupt(format!(
            "template {}/{}: {e}",
            rec.host_id, rec.vm_name
        ))),
    })
}

/// How many of a VM's latest warm runs its restore times are taken from.
const RESTORE_WINDOW: u32 = 200;

impl Store {
    /// Every host's template rows, of one VM or of all, ordered by VM then host.
    pub async fn templates(&self, vm: Option<String>) -> Result<Vec<TemplateRecord>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM templates WHERE (?1 IS NULL OR vm_name = ?1)
                 ORDER BY vm_name, host_id"
            ))?;
            let rows = stmt
                .query_map([vm], from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().collect()
        })
        .await
    }

    /// A host records where its template stands (insert or replace).
    pub async fn put_template(&self, rec: TemplateRecord) -> Result<(), StoreError> {
        self.call_write(move |c| {
            c.execute(
                &format!(
                    "INSERT OR REPLACE INTO templates ({COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                params![
                    rec.host_id,
                    rec.vm_name,
                    rec.state.as_str(),
                    rec.key,
                    rec.built_from,
                    rec.built_at,
                    rec.build_ms,
                    rec.size_bytes,
                    rec.error,
                    rec.failures,
                    rec.build_order,
                    rec.delete_order,
                    timefmt::now(),
                ],
            )?;
            Ok(())
        })
        .await
        .inspect(|_| self.bump())
    }

    /// What the API has ordered for `vm`'s templates.
    pub async fn template_orders(&self, vm: String) -> Result<TemplateOrders, StoreError> {
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT build_order, delete_order FROM template_orders WHERE vm_name = ?1",
                [vm],
                |r| {
                    Ok(TemplateOrders {
                        build: r.get(0)?,
                        delete: r.get(1)?,
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
        })
        .await
    }

    /// Orders every host to build (or delete) `vm`'s template; the new counters.
    pub async fn order_template(
        &self,
        vm: String,
        order: TemplateOrder,
    ) -> Result<TemplateOrders, StoreError> {
        self.call_write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Orders share one sequence, so whichever is larger came last.
            let next: i64 = tx.query_row(
                "SELECT COALESCE(MAX(MAX(build_order, delete_order)), 0) + 1
                 FROM template_orders WHERE vm_name = ?1",
                [&vm],
                |r| r.get(0),
            )?;
            let (b, d) = match order {
                TemplateOrder::Build => (Some(next), None),
                TemplateOrder::Delete => (None, Some(next)),
            };
            tx.execute(
                "INSERT INTO template_orders (vm_name, build_order, delete_order, updated_at)
                 VALUES (?1, COALESCE(?2, 0), COALESCE(?3, 0), ?4)
                 ON CONFLICT (vm_name) DO UPDATE SET
                     build_order = COALESCE(?2, build_order),
                     delete_order = COALESCE(?3, delete_order), updated_at = ?4",
                params![vm, b, d, timefmt::now()],
            )?;
            let orders = tx.query_row(
                "SELECT build_order, delete_order FROM template_orders WHERE vm_name = ?1",
                [&vm],
                |r| {
                    Ok(TemplateOrders {
                        build: r.get(0)?,
                        delete: r.get(1)?,
                    })
                },
            )?;
            tx.commit()?;
            Ok(orders)
        })
        .await
        .inspect(|_| self.bump())
    }

    /// p50 and p99 restore time over `vm`'s latest warm and pooled runs.
    pub async fn restore_stats(&self, vm: String) -> Result<RestoreStats, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT restore_ms FROM requests
                 WHERE vm_name = ?1 AND restore_ms IS NOT NULL AND finished_at IS NOT NULL
                 ORDER BY finished_at DESC LIMIT ?2",
            )?;
            let mut ms: Vec<i64> = stmt
                .query_map(params![vm, RESTORE_WINDOW], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
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
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    #[tokio::test]
    async fn rows_per_host_and_orders_as_counters() {
        let (s, _d) = temp_store().await;
        assert!(s.templates(None).await.unwrap().is_empty());
        let rec = TemplateRecord {
            host_id: "h1".into(),
            vm_name: "tiny".into(),
            state: TemplateState::Ready,
            key: Some("k".into()),
            size_bytes: Some(42),
            ..Default::default()
        };
        s.put_template(rec.clone()).await.unwrap();
        s.put_template(TemplateRecord {
            host_id: "h2".into(),
            state: TemplateState::Building,
            ..rec.clone()
        })
        .await
        .unwrap();
        let all = s.templates(Some("tiny".into())).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[0].host_id.as_str(), all[0].state),
            ("h1", TemplateState::Ready)
        );
        assert_eq!(all[0].size_bytes, Some(42));
        assert!(s.templates(Some("other".into())).await.unwrap().is_empty());
        // Replacing a row keeps one per host.
        s.put_template(TemplateRecord {
            state: TemplateState::Failed,
            error: Some("boom".into()),
            ..rec
        })
        .await
        .unwrap();
        let all = s.templates(None).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].error.as_deref(), Some("boom"));

        assert_eq!(
            s.template_orders("tiny".into()).await.unwrap(),
            TemplateOrders::default()
        );
        s.order_template("tiny".into(), TemplateOrder::Build)
            .await
            .unwrap();
        let o = s
            .order_template("tiny".into(), TemplateOrder::Delete)
            .await
            .unwrap();
        assert_eq!(
            o,
            TemplateOrders {
                build: 1,
                delete: 2
            },
            "one sequence: the delete came last"
        );
        let o = s
            .order_template("tiny".into(), TemplateOrder::Build)
            .await
            .unwrap();
        assert_eq!((o.build, o.delete), (3, 2));
    }

    #[tokio::test]
    async fn restore_stats_cover_warm_runs_only() {
        let (s, _d) = temp_store().await;
        assert_eq!(s.restore_stats("t".into()).await.unwrap().count, 0);
        let agent = crate::model::AgentId("a".into());
        for ms in [10, 20, 30, 400] {
            let r = crate::store::test_support::pending_request(&s).await;
            s.claim(&agent, std::time::Duration::from_secs(9))
                .await
                .unwrap();
            let fin = crate::store::Finish {
                status: crate::model::Status::Done,
                restore_ms: Some(ms),
                boot_mode: Some(crate::model::BootMode::Warm),
                ..Default::default()
            };
            s.finish(r.uuid, &agent, fin).await.unwrap();
        }
        let st = s.restore_stats("t".into()).await.unwrap();
        assert_eq!((st.count, st.p50_ms, st.p99_ms), (4, Some(30), Some(400)));
    }
}

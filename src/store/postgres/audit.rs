//! The audit log on PostgreSQL: the same rows as `store/audit.rs`.

use super::Pg;
use crate::store::audit::{AuditArg, Placeholders, AUDIT_COLUMNS};
use crate::store::{AuditEntry, AuditQuery, NewAudit, Outcome, StoreError};
use crate::timefmt;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

fn from_row(r: &Row) -> Result<AuditEntry, StoreError> {
    let outcome: String = r.try_get(8)?;
    let status: i64 = r.try_get(9)?;
    Ok(AuditEntry {
        id: r.try_get(0)?,
        at: r.try_get(1)?,
        principal: r.try_get(2)?,
        role: r.try_get(3)?,
        address: r.try_get(4)?,
        action: r.try_get(5)?,
        request: r.try_get(6)?,
        target: r.try_get(7)?,
        outcome: Outcome::parse(&outcome)?,
        status: u16::try_from(status).unwrap_or(0),
        detail: r.try_get(10)?,
    })
}

impl Pg {
    /// Not retried after a lost COMMIT: an audit row written twice is better than none, and
    /// the rows carry no identity to re-check by.
    pub(crate) async fn insert_audit(&self, a: NewAudit) -> Result<(), StoreError> {
        let role = a.role.map(|r| r.as_str());
        let request = a.request.map(|r| r.to_string());
        let status = i64::from(a.status);
        write_tx!(
            self,
            "insert_audit",
            |tx| async {
                tx.execute(
                    "INSERT INTO audit_log (at, principal, role, address, action, request_uuid,
                                        target, outcome, status, detail)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    &[
                        &timefmt::now(),
                        &a.principal,
                        &role,
                        &a.address,
                        &a.action,
                        &request,
                        &a.target,
                        &a.outcome.as_str(),
                        &status,
                        &a.detail,
                    ],
                )
                .await?;
                Ok(())
            }
            .await,
            // Nothing to wake: no agent or follower waits for audit rows.
            quiet_if | _v | true
        )
    }

    pub(crate) async fn audit(&self, q: AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let (tail, args) = q.where_limit(Placeholders::Numbered);
        let args: Vec<Box<dyn ToSql + Sync + Send>> = args
            .into_iter()
            .map(|a| -> Box<dyn ToSql + Sync + Send> {
                match a {
                    AuditArg::Text(s) => Box::new(s),
                    AuditArg::Int(i) => Box::new(i),
                }
            })
            .collect();
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log {tail}");
        retry!(self, "audit", |c| {
            let params: Vec<&(dyn ToSql + Sync)> =
                args.iter().map(|a| &**a as &(dyn ToSql + Sync)).collect();
            c.query(&sql, &params).await?.iter().map(from_row).collect()
        })
    }
}

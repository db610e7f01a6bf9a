//! The audit log on PostgreSQL: the same rows as `store/audit.rs`.

use super::Pg;
use crate::store::audit::AUDIT_COLUMNS;
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
        let mut wh: Vec<String> = Vec::new();
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut push = |col: &str, v: Box<dyn ToSql + Sync + Send>, args: &mut Vec<_>| {
            args.push(v);
            wh.push(format!("{col} ${}", args.len()));
        };
        if let Some(p) = q.principal {
            push("principal =", Box::new(p), &mut args);
        }
        if let Some(a) = q.action {
            push("action =", Box::new(a), &mut args);
        }
        if let Some(r) = q.request {
            push("request_uuid =", Box::new(r.to_string()), &mut args);
        }
        if let Some(s) = q.since {
            push("at >=", Box::new(s), &mut args);
        }
        if let Some(b) = q.before {
            push("id <", Box::new(b), &mut args);
        }
        let wh = if wh.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", wh.join(" AND "))
        };
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log {wh} ORDER BY id DESC LIMIT {}",
            q.limit
        );
        retry!(self, "audit", |c| {
            let params: Vec<&(dyn ToSql + Sync)> =
                args.iter().map(|a| &**a as &(dyn ToSql + Sync)).collect();
            c.query(&sql, &params).await?.iter().map(from_row).collect()
        })
    }
}

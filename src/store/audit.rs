//! The audit log: one row per control action (hold, resume, cancel, release, delete, prune,
//! template build/delete, token create/revoke), allowed or refused, with who, when, from where
//! and the answer's status. Request actions are also written to that request's `system` log.

use super::{Store, StoreError};
use crate::model::{LogType, RequestId};
use crate::timefmt;
use rusqlite::{params, Row};
use serde::Serialize;

pub(super) const AUDIT_COLUMNS: &str =
    "id, at, principal, role, address, action, request_uuid, target, outcome, status, detail";

/// Whether the access layer let the action through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Authorised (the operation may still have failed: see `status`).
    Allowed,
    /// Refused before it ran: no valid token (401) or a role that may not (403).
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Refused => "refused",
        }
    }

    pub(super) fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "allowed" => Ok(Outcome::Allowed),
            "refused" => Ok(Outcome::Refused),
            other => Err(StoreError::Corrupt(format!("audit outcome {other:?}"))),
        }
    }
}

/// An action to record.
#[derive(Debug, Clone)]
pub struct NewAudit {
    /// Null when no valid token was given.
    pub principal: Option<String>,
    pub role: Option<crate::auth::Role>,
    /// The peer address (`ip:port`) the call came from.
    pub address: Option<String>,
    pub action: String,
    pub request: Option<RequestId>,
    /// What else it was about: a VM name (templates), a token name.
    pub target: Option<String>,
    pub outcome: Outcome,
    /// The HTTP status answered.
    pub status: u16,
    pub detail: Option<String>,
}

/// One audit log entry.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Increasing; `before` pages by it.
    pub id: i64,
    pub at: String,
    /// The principal (token name, `admin` for `SQLITE_SIM_API_TOKEN`, `anonymous` with auth
    /// off); null when no valid token was given.
    pub principal: Option<String>,
    #[schema(value_type = Option<crate::auth::Role>)]
    pub role: Option<String>,
    pub address: Option<String>,
    /// `hold`, `resume`, `cancel`, `release`, `set_status`, `delete`, `prune`,
    /// `template_build`, `template_delete`, `token_create`, `token_revoke`.
    pub action: String,
    /// The request acted on (absent for actions on no request). Not named `request_uuid`:
    /// link inference (Schemathesis) would feed an absent one to `/requests/{uuid}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    pub target: Option<String>,
    pub outcome: Outcome,
    pub status: u16,
    pub detail: Option<String>,
}

/// Filters for reading the audit log, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub principal: Option<String>,
    pub action: Option<String>,
    pub request: Option<RequestId>,
    /// Entries at or after this fixed-width timestamp.
    pub since: Option<String>,
    /// Entries with `id < before` (the cursor of the next page).
    pub before: Option<i64>,
    pub limit: u32,
}

/// A filter's value, bound by each engine its own way.
pub(super) enum AuditArg {
    Text(String),
    Int(i64),
}

/// How an engine writes placeholders: SQLite's `?`, PostgreSQL's numbered `$n`.
#[derive(Debug, Clone, Copy)]
pub(super) enum Placeholders {
    Question,
    Numbered,
}

impl AuditQuery {
    /// The engine-neutral part of an audit read: its `WHERE … ORDER BY id DESC LIMIT n` (in
    /// the engine's placeholder style) and the values to bind, in order. The `SELECT` in
    /// front stays each engine's.
    pub(super) fn where_limit(self, ph: Placeholders) -> (String, Vec<AuditArg>) {
        let conds = [
            ("principal =", self.principal.map(AuditArg::Text)),
            ("action =", self.action.map(AuditArg::Text)),
            (
                "request_uuid =",
                self.request.map(|r| AuditArg::Text(r.to_string())),
            ),
            ("at >=", self.since.map(AuditArg::Text)),
            ("id <", self.before.map(AuditArg::Int)),
        ];
        let mut wh = Vec::new();
        let mut args = Vec::new();
        for (cond, arg) in conds {
            let Some(arg) = arg else { continue };
            args.push(arg);
            wh.push(match ph {
                Placeholders::Question => format!("{cond} ?"),
                Placeholders::Numbered => format!("{cond} ${}", args.len()),
            });
        }
        let wh = if wh.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", wh.join(" AND "))
        };
        (format!("{wh} ORDER BY id DESC LIMIT {}", self.limit), args)
    }
}

pub(super) fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<Result<AuditEntry, StoreError>> {
    let outcome: String = r.get(8)?;
    let status: i64 = r.get(9)?;
    let outcome = match Outcome::parse(&outcome) {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(AuditEntry {
        id: r.get(0)?,
        at: r.get(1)?,
        principal: r.get(2)?,
        role: r.get(3)?,
        address: r.get(4)?,
        action: r.get(5)?,
        request: r.get(6)?,
        target: r.get(7)?,
        outcome,
        status: u16::try_from(status).unwrap_or(0),
        detail: r.get(10)?,
    }))
}

/// The line a request's `system` log gets for an action on it.
pub(super) fn system_line(a: &NewAudit) -> String {
    let who = a.principal.as_deref().unwrap_or("(no valid token)");
    let role = a.role.map(|r| format!(" ({r})")).unwrap_or_default();
    let from = a
        .address
        .as_deref()
        .map(|x| format!(" from {x}"))
        .unwrap_or_default();
    format!(
        "audit: {} by {who}{role}{from}: {} ({})\n",
        a.action,
        a.outcome.as_str(),
        a.status
    )
}

impl Store {
    /// Records an action; one on a request that still exists also goes to its `system` log.
    pub async fn record_audit(&self, a: NewAudit) -> Result<(), StoreError> {
        self.insert_audit(a.clone()).await?;
        if let Some(id) = a.request {
            let line = system_line(&a);
            let appended = self
                .append_logs(
                    id,
                    vec![(timefmt::now(), LogType::System, line.into_bytes())],
                )
                .await;
            // A deleted request has no log to write to; the audit row is the record.
            if let Err(e) = appended {
                if self.exists(id).await? {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn insert_audit(&self, a: NewAudit) -> Result<(), StoreError> {
        on_pg!(self.insert_audit(a));
        self.call_write(move |c| {
            c.execute(
                "INSERT INTO audit_log (at, principal, role, address, action, request_uuid,
                                        target, outcome, status, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    timefmt::now(),
                    a.principal,
                    a.role.map(|r| r.as_str()),
                    a.address,
                    a.action,
                    a.request.map(|r| r.to_string()),
                    a.target,
                    a.outcome.as_str(),
                    a.status,
                    a.detail
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Entries matching `q`, newest first, at most `q.limit`.
    pub async fn audit(&self, q: AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        on_pg!(self.audit(q));
        self.call(move |c| {
            let (tail, args) = q.where_limit(Placeholders::Question);
            let args = args.into_iter().map(|a| match a {
                AuditArg::Text(s) => rusqlite::types::Value::Text(s),
                AuditArg::Int(i) => rusqlite::types::Value::Integer(i),
            });
            let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log {tail}");
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), audit_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{pending_request, temp_store};
    use crate::store::LogQuery;

    fn entry(action: &str, request: Option<RequestId>, outcome: Outcome) -> NewAudit {
        NewAudit {
            principal: Some("ci".into()),
            role: Some(crate::auth::Role::Submitter),
            address: Some("127.0.0.1:4000".into()),
            action: action.into(),
            request,
            target: None,
            outcome,
            status: if outcome == Outcome::Allowed {
                200
            } else {
                403
            },
            detail: None,
        }
    }

    #[tokio::test]
    async fn records_filters_pages_and_logs() {
        let (s, _g) = temp_store().await;
        let r = pending_request(&s).await;
        s.record_audit(entry("hold", Some(r.uuid), Outcome::Allowed))
            .await
            .unwrap();
        s.record_audit(entry("cancel", Some(r.uuid), Outcome::Refused))
            .await
            .unwrap();
        s.record_audit(entry("prune", None, Outcome::Allowed))
            .await
            .unwrap();
        // A request that is gone: the audit row alone.
        s.record_audit(entry("delete", Some(RequestId::new()), Outcome::Allowed))
            .await
            .unwrap();
        let q = |f: fn(&mut AuditQuery)| {
            let mut q = AuditQuery {
                limit: 100,
                ..Default::default()
            };
            f(&mut q);
            q
        };
        let all = s.audit(q(|_| {})).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["delete", "prune", "cancel", "hold"]
        );
        let on_r = s
            .audit(AuditQuery {
                request: Some(r.uuid),
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(on_r.len(), 1);
        assert_eq!(on_r[0].outcome, Outcome::Refused);
        let next = s
            .audit(AuditQuery {
                request: Some(r.uuid),
                before: Some(on_r[0].id),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].action, "hold");
        assert_eq!(
            s.audit(q(|q| q.action = Some("prune".into())))
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            s.audit(q(|q| q.principal = Some("x".into())))
                .await
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            s.audit(q(|q| q.since = Some("9999".into())))
                .await
                .unwrap()
                .len(),
            0
        );
        let logs = s
            .logs(
                r.uuid,
                LogQuery {
                    log_type: Some(LogType::System),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let text: String = logs
            .iter()
            .map(|l| String::from_utf8_lossy(&l.output).into_owned())
            .collect();
        assert!(
            text.contains("audit: hold by ci (submitter) from 127.0.0.1:4000: allowed (200)"),
            "{text}"
        );
        assert!(text.contains("audit: cancel by ci"), "{text}");
    }
}

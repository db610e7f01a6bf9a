//! `GET /audit`: the audit log of control actions, newest first, filtered and paged by a
//! cursor; operators and admins only (see [`super::access`]).

use super::error::ApiError;
use super::AppState;
use crate::store::{AuditEntry, AuditQuery};
use axum::extract::{RawQuery, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// `GET /audit` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for the next (older) page; null when this page is the last.
    pub next_before: Option<i64>,
}

fn parse(raw: Option<&str>) -> Result<AuditQuery, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::Validation(format!("query: {e}")))?;
    let mut q = AuditQuery {
        limit: 100,
        ..Default::default()
    };
    let digits = |k: &str, v: &str| -> Result<i64, ApiError> {
        Some(v)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(|| ApiError::Validation(format!("{k} must be a whole number")))
    };
    for (k, v) in pairs {
        match k.as_str() {
            "principal" => q.principal = Some(v),
            "action" => q.action = Some(v),
            "request" => {
                q.request = Some(
                    super::requests::parse_id(&v)
                        .map_err(|_| ApiError::Validation("request must be a UUID".into()))?,
                )
            }
            "since" => {
                let t = crate::timefmt::parse(&v).ok_or_else(|| {
                    ApiError::Validation("since must be an RFC 3339 time".into())
                })?;
                q.since = Some(crate::timefmt::format(t));
            }
            "before" => q.before = Some(digits("before", &v)?),
            "limit" => {
                let n = digits("limit", &v)?;
                if !(1..=1000).contains(&n) {
                    return Err(ApiError::Validation("limit must be from 1 to 1000".into()));
                }
                q.limit = n as u32;
            }
            other => {
                return Err(ApiError::Validation(format!(
                    "unknown query parameter {other:?}; use principal, action, request, since, before, limit"
                )))
            }
        }
    }
    Ok(q)
}

/// The audit log, newest first: every control action (hold, resume, cancel, release, delete,
/// prune, template build and delete, token create and revoke), allowed or refused, with who,
/// when, from which address and the status answered. Unknown query parameters are refused.
#[utoipa::path(get, path = "/audit", tag = "system",
    params(
        ("principal" = Option<String>, Query, description = "Only this principal's actions."),
        ("action" = Option<String>, Query, description = "Only this action (`hold`, `cancel`, `token_create`, …)."),
        ("request" = Option<String>, Query, format = Uuid, description = "Only actions on this request."),
        ("since" = Option<String>, Query, format = DateTime, description = "Only entries at or after this time (RFC 3339)."),
        ("before" = Option<i64>, Query, minimum = 0, description = "Only entries with an id below this: the previous page's `next_before`."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size; default 100."),
    ),
    responses((status = 200, body = AuditPage, description = "one page, newest first")))]
pub async fn list_audit(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<AuditPage>, ApiError> {
    let q = parse(raw.as_deref())?;
    let limit = q.limit as usize;
    let entries = state.store.audit(q).await?;
    let next_before = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditPage {
        entries,
        next_before,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query() {
        let q = parse(Some(
            "principal=ci&action=hold&limit=5&before=10&since=2026-01-01T00:00:00Z",
        ))
        .unwrap();
        assert_eq!(q.principal.as_deref(), Some("ci"));
        assert_eq!((q.limit, q.before), (5, Some(10)));
        assert_eq!(q.since.as_deref(), Some("2026-01-01T00:00:00.000000Z"));
        for bad in [
            "limit=0",
            "limit=1001",
            "before=-1",
            "request=x",
            "since=yesterday",
            "x=1",
        ] {
            assert!(parse(Some(bad)).is_err(), "{bad}");
        }
    }
}

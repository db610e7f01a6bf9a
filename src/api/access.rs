//! The access layer in front of every route but `/health` and the dashboard's files: who the
//! caller is (401 without a valid token once authentication is on), whether their role may
//! do the operation (403), and the audit record of every control action, allowed or refused.
//! What each operation needs is [`rule`], the one table both this layer and the OpenAPI
//! document read.
//!
//! Authentication is on when `SQLITE_SIM_API_TOKEN` is set or the store holds any token
//! (revoked ones count, so revoking the last token never opens the API). While it is off every
//! caller is [`Principal::anonymous`] and may do everything, as before tokens existed.

use super::error::ApiError;
use super::AppState;
use crate::auth::{self, Permission, Principal, Role};
use crate::model::RequestId;
use crate::store::{NewAudit, Outcome};
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Remembers, once seen, that the store holds tokens (they are never deleted, so it stays
/// true and later calls skip the query). Until then the store is asked at most every
/// [`RECHECK`]: with auth off every call would otherwise pay a store read.
#[derive(Debug)]
pub struct Gate {
    tokens_seen: AtomicBool,
    born: std::time::Instant,
    /// When the store was last asked, in ms since `born` (0: never).
    checked_ms: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            tokens_seen: AtomicBool::new(false),
            born: std::time::Instant::now(),
            checked_ms: AtomicU64::new(0),
        }
    }
}

/// How soon a token made with the CLI turns authentication on in a running server.
pub const RECHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// What an audited operation is, before its body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audited {
    /// `PUT /requests/{uuid}/status`: hold, resume, cancel or release, by the body.
    Status,
    Named(&'static str),
}

/// What one operation needs, and whether it is audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub permission: Permission,
    pub audited: Option<Audited>,
}

const fn rule_of(permission: Permission, audited: Option<Audited>) -> Rule {
    Rule {
        permission,
        audited,
    }
}

/// The operations that are not plain reads, by method and route path (as the router and the
/// OpenAPI document spell it). Anything not listed is a read (`GET`, and methods no route
/// takes, which are answered 405).
pub const RULES: &[(&str, &str, Rule)] = &[
    ("POST", "/requests", rule_of(Permission::Submit, None)),
    (
        "PUT",
        "/requests/{uuid}/status",
        rule_of(Permission::ControlRequest, Some(Audited::Status)),
    ),
    (
        "DELETE",
        "/requests/{uuid}",
        rule_of(Permission::ControlRequest, Some(Audited::Named("delete"))),
    ),
    (
        "POST",
        "/prune",
        rule_of(Permission::Operate, Some(Audited::Named("prune"))),
    ),
    (
        "POST",
        "/vms/{name}/template",
        rule_of(Permission::Operate, Some(Audited::Named("template_build"))),
    ),
    (
        "DELETE",
        "/vms/{name}/template",
        rule_of(Permission::Operate, Some(Audited::Named("template_delete"))),
    ),
    ("GET", "/audit", rule_of(Permission::Operate, None)),
    ("GET", "/tokens", rule_of(Permission::Administer, None)),
    (
        "POST",
        "/tokens",
        rule_of(Permission::Administer, Some(Audited::Named("token_create"))),
    ),
    (
        "DELETE",
        "/tokens/{name}",
        rule_of(Permission::Administer, Some(Audited::Named("token_revoke"))),
    ),
];

/// What `method path` needs (method in any case).
pub fn rule(method: &str, path: &str) -> Rule {
    RULES
        .iter()
        .find(|(m, p, _)| m.eq_ignore_ascii_case(method) && *p == path)
        .map(|(_, _, r)| *r)
        .unwrap_or(rule_of(Permission::Read, None))
}

/// Whether authentication is on.
pub async fn enabled(state: &AppState) -> Result<bool, ApiError> {
    let gate = &state.gate;
    if state.settings.api_token.is_some() || gate.tokens_seen.load(Ordering::Relaxed) {
        return Ok(true);
    }
    // Never 0, so the first call always asks.
    let now = gate.born.elapsed().as_millis() as u64 + 1;
    let last = gate.checked_ms.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < RECHECK.as_millis() as u64 {
        return Ok(false);
    }
    let seen = state.store.tokens_configured().await?;
    gate.checked_ms.store(now, Ordering::Relaxed);
    if seen {
        state.gate.tokens_seen.store(true, Ordering::Relaxed);
    }
    Ok(seen)
}

/// The bearer token of a call: `Authorization: Bearer …`, or on a WebSocket upgrade the
/// subprotocol entry `bearer.<token>` (the only way a browser can send one).
fn presented(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| protocol_token(headers))
}

fn protocol_token(headers: &HeaderMap) -> Option<&str> {
    let upgrade = headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return None;
    }
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| {
            p.trim()
                .strip_prefix(super::console::BEARER_PROTOCOL_PREFIX)
        })
}

/// Who presents these headers: `Unauthorized` for no token, an unknown one, an expired or a
/// revoked one, all alike.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    if !enabled(state).await? {
        return Ok(Principal::anonymous());
    }
    let given = presented(headers).unwrap_or("");
    if given.is_empty() {
        return Err(ApiError::Unauthorized);
    }
    if let Some(env) = &state.settings.api_token {
        if auth::constant_time_eq(given.as_bytes(), env.as_bytes()) {
            return Ok(Principal {
                name: auth::ENV_PRINCIPAL.into(),
                role: Role::Admin,
                authenticated: true,
            });
        }
    }
    // Looked up by digest: the index compares digests, never the token, and a digest reveals
    // nothing of a token one does not already have.
    let digest = auth::digest(given);
    let found = state.store.token_by_digest(digest.clone()).await?;
    match found {
        Some(t) if t.is_valid_at(&crate::timefmt::now()) => Ok(Principal {
            name: t.name,
            role: t.role,
            authenticated: true,
        }),
        _ => Err(ApiError::Unauthorized),
    }
}

/// The peer address, and what a proxy in front says it forwarded for.
fn address(req: &Request) -> Option<String> {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.to_string());
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(100).collect::<String>());
    match (peer, forwarded) {
        (Some(p), Some(f)) => Some(format!("{p} (forwarded for {f})")),
        (p, _) => p,
    }
}

/// The request a route is about: `/requests/{uuid}…`.
fn request_of(path: &str) -> Option<RequestId> {
    let rest = path.strip_prefix("/requests/")?;
    let id = rest.split('/').next()?;
    super::requests::parse_id(id).ok()
}

/// The second path segment (`/vms/{name}/…`, `/tokens/{name}`).
fn name_of(path: &str) -> Option<String> {
    path.split('/').nth(2).map(|s| s.chars().take(80).collect())
}

/// The action a `PUT /status` body asks for.
fn status_action(body: &[u8]) -> &'static str {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match v["status"].as_str() {
        Some("hold") => "hold",
        Some("pending" | "running") => "resume",
        Some("cancelled") => "cancel",
        Some("release") => "release",
        _ => "set_status",
    }
}

/// The middleware: authenticate, authorise, run, audit.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let uri_path = req.uri().path().to_string();
    let rule = {
        let matched = req.extensions().get::<MatchedPath>();
        rule(
            req.method().as_str(),
            matched.map_or(uri_path.as_str(), MatchedPath::as_str),
        )
    };
    let mut audit = rule.audited.map(|kind| NewAudit {
        principal: None,
        role: None,
        address: address(&req),
        action: match kind {
            Audited::Named(a) => a.to_string(),
            Audited::Status => "set_status".into(),
        },
        request: request_of(&uri_path),
        target: if uri_path.starts_with("/vms/") || uri_path.starts_with("/tokens/") {
            name_of(&uri_path)
        } else {
            None
        },
        outcome: Outcome::Refused,
        status: 0,
        detail: None,
    });
    // Audited bodies are small JSON (at most BODY_LIMIT): read once, for the record, and
    // handed on unchanged.
    let req = if audit.is_some() && req.method() != Method::DELETE {
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, super::BODY_LIMIT).await {
            Ok(b) => b,
            Err(_) => return ApiError::PayloadTooLarge.into_response(),
        };
        if let Some(a) = audit.as_mut() {
            if rule.audited == Some(Audited::Status) {
                a.action = status_action(&bytes).into();
            }
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            match a.action.as_str() {
                "token_create" => {
                    a.target = v["name"].as_str().map(|s| s.chars().take(80).collect());
                    a.detail = v["role"].as_str().map(|r| format!("role {r}"));
                }
                "prune" => {
                    a.detail = Some(String::from_utf8_lossy(&bytes).chars().take(200).collect())
                }
                _ => {}
            }
        }
        Request::from_parts(parts, Body::from(bytes))
    } else {
        req
    };
    let principal = match authenticate(&state, req.headers()).await {
        Ok(p) => p,
        Err(e) => return finish(&state, audit, e.into_response(), Outcome::Refused).await,
    };
    if let Some(a) = audit.as_mut() {
        a.principal = Some(principal.name.clone());
        a.role = principal.authenticated.then_some(principal.role);
    }
    let owner = match (rule.permission, request_of(&uri_path)) {
        (Permission::ControlRequest, Some(id)) if principal.role == Role::Submitter => {
            match state.store.get(id).await {
                // A request that does not exist: the handler's 404, not a 403.
                Ok(None) => None,
                Ok(Some(r)) => Some(r.submitted_by),
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
        _ => None,
    };
    let allowed = match &owner {
        // A submitter asking about a request that does not exist learns only that.
        None if rule.permission == Permission::ControlRequest
            && principal.role == Role::Submitter
            && request_of(&uri_path).is_some() =>
        {
            true
        }
        _ => principal.may(rule.permission, owner.as_ref().and_then(|o| o.as_deref())),
    };
    if !allowed {
        let why = if rule.permission == Permission::ControlRequest {
            format!(
                "token {:?} ({}) may control and delete only the requests it submitted; this \
                 one needs {}",
                principal.name,
                principal.role,
                rule.permission.describe()
            )
        } else {
            format!(
                "token {:?} has role {}; this needs {}",
                principal.name,
                principal.role,
                rule.permission.describe()
            )
        };
        let resp = ApiError::Forbidden(why).into_response();
        return finish(&state, audit, resp, Outcome::Refused).await;
    }
    let mut req = req;
    req.extensions_mut().insert(principal);
    let resp = next.run(req).await;
    finish(&state, audit, resp, Outcome::Allowed).await
}

/// Records the audit entry (if the operation is audited) and answers.
async fn finish(
    state: &AppState,
    audit: Option<NewAudit>,
    resp: Response,
    outcome: Outcome,
) -> Response {
    if let Some(mut a) = audit {
        a.outcome = outcome;
        a.status = resp.status().as_u16();
        let action = a.action.clone();
        if let Err(e) = state.store.record_audit(a).await {
            // The action happened (or was refused); a lost record is logged, not hidden.
            tracing::error!(action, error = %e, "could not record the audit entry");
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_what_each_operation_needs() {
        assert_eq!(rule("get", "/requests").permission, Permission::Read);
        assert_eq!(rule("post", "/requests").permission, Permission::Submit);
        assert_eq!(
            rule("PUT", "/requests/{uuid}/status").audited,
            Some(Audited::Status)
        );
        assert_eq!(rule("GET", "/audit").permission, Permission::Operate);
        assert_eq!(
            rule("DELETE", "/tokens/{name}").permission,
            Permission::Administer
        );
        assert_eq!(status_action(br#"{"status":"hold"}"#), "hold");
        assert_eq!(status_action(br#"{"status":"running"}"#), "resume");
        assert_eq!(status_action(br#"{"status":"cancelled"}"#), "cancel");
        assert_eq!(status_action(b"nonsense"), "set_status");
        assert_eq!(
            request_of("/requests/123e4567-e89b-12d3-a456-426614174000/status")
                .map(|r| r.to_string())
                .as_deref(),
            Some("123e4567-e89b-12d3-a456-426614174000")
        );
        assert_eq!(request_of("/requests"), None);
    }
}

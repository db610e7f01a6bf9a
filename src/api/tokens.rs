//! `/tokens`: create (the token shown once), list (never the secrets) and revoke API tokens;
//! admins only (see [`super::access`]). The same as `sqlite-sim token …` on the store.

use super::error::{ApiError, ForbiddenResponse, NameTakenResponse};
use super::input::{self, Object};
use super::AppState;
use crate::auth::{Principal, Role, Secret, TokenName};
use crate::store::{NewToken, TokenCreated, TokenInfo};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest expiry a token may be given: ten years.
pub const MAX_EXPIRY_SECONDS: i128 = 10 * 366 * 86_400;

/// `POST /tokens` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "name": "ci-main", "role": "submitter", "expires_in_seconds": 7_776_000 })))]
pub struct CreateTokenBody {
    /// The principal's name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or
    /// digit; not `admin` (`SQLITE_SIM_API_TOKEN`'s principal).
    #[schema(
        pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub name: String,
    pub role: Role,
    /// Seconds until the token stops working (at most ten years); absent or null: never.
    #[serde(default, deserialize_with = "input::optional_whole_number")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 316224000)]
    pub expires_in_seconds: Option<i128>,
}

/// A token as listed: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    #[serde(flatten)]
    pub token: TokenInfo,
    /// `active`, `expired` or `revoked`.
    #[schema(value_type = String, pattern = "^(active|expired|revoked)$")]
    pub state: &'static str,
}

impl TokenView {
    pub fn of(token: TokenInfo) -> TokenView {
        let state = token.state_at(&crate::timefmt::now());
        TokenView { token, state }
    }
}

/// `POST /tokens` answer: the only time the token is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// The bearer token. It is stored only as a digest: keep it now, it cannot be shown again.
    pub token: String,
}

/// `GET /tokens` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// A token's expiry from now, as a stored timestamp.
pub fn expiry(seconds: u64) -> String {
    let secs = i64::try_from(seconds).unwrap_or(i64::MAX);
    let t = time::OffsetDateTime::now_utc()
        .checked_add(time::Duration::seconds(secs))
        .unwrap_or_else(|| {
            time::Date::from_calendar_date(9999, time::Month::December, 31)
                .expect("in range")
                .midnight()
                .assume_utc()
        });
    crate::timefmt::format(t)
}

/// Create a token for a named principal with one role. The answer carries the token, once.
/// While authentication is off this is refused (`403`): a first token would turn it on, which
/// is the store owner's decision (`sqlite-sim token create`), not any anonymous caller's.
#[utoipa::path(post, path = "/tokens", tag = "tokens", request_body = CreateTokenBody,
    responses((status = 201, body = CreatedToken, description = "created; `token` is shown this once",
        headers(("Location" = String, description = "`/tokens/{name}`"))),
        NameTakenResponse, ForbiddenResponse))]
pub async fn create_token(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Result<Json<Object<CreateTokenBody>>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    if !who.authenticated {
        return Err(ApiError::Forbidden(
            "authentication is off: make the first token on the store with `sqlite-sim token \
             create` (creating one turns authentication on, which the API leaves to whoever \
             runs the service)"
                .into(),
        ));
    }
    let body: CreateTokenBody = input::body(body)?;
    let name = TokenName::new(&body.name).map_err(|e| ApiError::Validation(e.to_string()))?;
    let expires_at = body
        .expires_in_seconds
        .map(|s| {
            u64::try_from(s)
                .ok()
                .filter(|s| *s >= 1 && i128::from(*s) <= MAX_EXPIRY_SECONDS)
                .map(expiry)
                .ok_or_else(|| {
                    ApiError::Validation(format!(
                        "expires_in_seconds must be from 1 to {MAX_EXPIRY_SECONDS}, got {s}"
                    ))
                })
        })
        .transpose()?;
    let secret = Secret::generate().map_err(|e| ApiError::Internal(e.to_string()))?;
    let created = state
        .store
        .create_token(NewToken {
            name: name.clone(),
            role: body.role,
            digest: crate::auth::digest(secret.expose()),
            expires_at,
            created_by: Some(who.name.clone()),
        })
        .await?;
    let info = match created {
        TokenCreated::Created(info) => info,
        TokenCreated::NameTaken => return Err(ApiError::NameTaken(name.to_string())),
    };
    tracing::info!(name = %info.name, role = %info.role, by = %who.name, "token created");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/tokens/{}", info.name))],
        Json(CreatedToken {
            info,
            token: secret.expose().to_string(),
        }),
    ))
}

/// Every token, active ones first: names, roles, expiry and revocation, never a secret.
#[utoipa::path(get, path = "/tokens", tag = "tokens",
    responses((status = 200, body = TokenList, description = "every token, revoked ones included")))]
pub async fn list_tokens(State(state): State<AppState>) -> Result<Json<TokenList>, ApiError> {
    let tokens = state.store.tokens().await?;
    Ok(Json(TokenList {
        tokens: tokens.into_iter().map(TokenView::of).collect(),
    }))
}

/// Revoke a name's active token; it stops working at once.
#[utoipa::path(delete, path = "/tokens/{name}", tag = "tokens",
    params(("name" = String, Path, pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description = "token name")),
    responses((status = 200, body = TokenView, description = "revoked")))]
pub async fn revoke_token(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    if !crate::config::vm::is_valid_vm_name(&name) {
        let shown: String = name.chars().take(80).collect();
        return Err(ApiError::Validation(format!(
            "{shown:?} is not a token name: use 1-64 letters, digits, '.', '_' or '-'"
        )));
    }
    match state
        .store
        .revoke_token(name.clone(), Some(who.name.clone()))
        .await?
    {
        Some(info) => {
            tracing::info!(name = %info.name, by = %who.name, "token revoked");
            Ok(Json(TokenView::of(info)))
        }
        None => Err(ApiError::NoSuchToken(name)),
    }
}

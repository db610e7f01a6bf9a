//! API tokens: named principals with one role each, stored only as the SHA-256 digest of the
//! token (see [`crate::auth`]). A name has at most one active (unrevoked) token; revoked rows
//! stay, so that the store remembers authentication was ever configured (auth never turns
//! itself off by revoking the last token) and the audit log's names keep a meaning.

use super::{Store, StoreError};
use crate::auth::Role;
use crate::timefmt;
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

pub(super) const TOKEN_COLUMNS: &str =
    "name, role, created_at, created_by, expires_at, revoked_at, revoked_by";

/// A stored token, without its secret (the digest is never shown either).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// The principal's name, as requests' `submitted_by` and the audit log show it.
    pub name: String,
    pub role: Role,
    pub created_at: String,
    /// The principal that created it (`cli` when made with `sqlite-sim token create`).
    pub created_by: Option<String>,
    /// Null: never expires.
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub revoked_by: Option<String>,
}

impl TokenInfo {
    /// Neither revoked nor past its expiry at `now` (a fixed-width timestamp).
    pub fn is_valid_at(&self, now: &str) -> bool {
        self.revoked_at.is_none() && self.expires_at.as_deref().is_none_or(|e| e > now)
    }

    /// `active`, `expired` or `revoked`.
    pub fn state_at(&self, now: &str) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.is_valid_at(now) {
            "active"
        } else {
            "expired"
        }
    }
}

/// A token to store.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub name: crate::auth::TokenName,
    pub role: Role,
    /// [`crate::auth::digest`] of the secret.
    pub digest: String,
    pub expires_at: Option<String>,
    pub created_by: Option<String>,
}

/// What creating a token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCreated {
    Created(TokenInfo),
    /// The name already has an active token (revoke it first).
    NameTaken,
}

pub(super) fn token_from_row(r: &Row<'_>) -> rusqlite::Result<Result<TokenInfo, StoreError>> {
    let role: String = r.get(1)?;
    let info = |role: Role| -> rusqlite::Result<TokenInfo> {
        Ok(TokenInfo {
            name: r.get(0)?,
            role,
            created_at: r.get(2)?,
            created_by: r.get(3)?,
            expires_at: r.get(4)?,
            revoked_at: r.get(5)?,
            revoked_by: r.get(6)?,
        })
    };
    match role.parse::<Role>() {
        Ok(role) => info(role).map(Ok),
        Err(e) => Ok(Err(StoreError::Corrupt(format!("token role: {e}")))),
    }
}

impl Store {
    /// Stores a token; refused while its name has another active one.
    pub async fn create_token(&self, new: NewToken) -> Result<TokenCreated, StoreError> {
        on_pg!(self.create_token(new));
        let r = self
            .call_write(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.execute(
                    "INSERT INTO tokens (name, role, digest, created_at, created_by, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        new.name.as_str(),
                        new.role.as_str(),
                        new.digest,
                        timefmt::now(),
                        new.created_by,
                        new.expires_at
                    ],
                )?;
                let info = tx.query_row(
                    &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE digest = ?1"),
                    [&new.digest],
                    token_from_row,
                )??;
                tx.commit()?;
                Ok(info)
            })
            .await;
        match r {
            Ok(info) => Ok(TokenCreated::Created(info)),
            Err(e) if e.is_unique_violation() => Ok(TokenCreated::NameTaken),
            Err(e) => Err(e),
        }
    }

    /// Every token, active first, then by name and newest first.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        on_pg!(self.tokens());
        self.call(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens
                 ORDER BY revoked_at IS NOT NULL, name, id DESC"
            ))?;
            let rows = stmt
                .query_map([], token_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().collect()
        })
        .await
    }

    /// Revokes `name`'s active token at once; `None` when it has none.
    pub async fn revoke_token(
        &self,
        name: String,
        by: Option<String>,
    ) -> Result<Option<TokenInfo>, StoreError> {
        on_pg!(self.revoke_token(name, by));
        self.call_write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id: Option<i64> = tx
                .query_row(
                    "SELECT id FROM tokens WHERE name = ?1 AND revoked_at IS NULL",
                    [&name],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(id) = id else { return Ok(None) };
            tx.execute(
                "UPDATE tokens SET revoked_at = ?2, revoked_by = ?3 WHERE id = ?1",
                params![id, timefmt::now(), by],
            )?;
            let info = tx.query_row(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"),
                [id],
                token_from_row,
            )??;
            tx.commit()?;
            Ok(Some(info))
        })
        .await
    }

    /// The token with this digest, whatever its state (the caller checks validity).
    pub async fn token_by_digest(&self, digest: String) -> Result<Option<TokenInfo>, StoreError> {
        on_pg!(self.token_by_digest(digest));
        self.call_point_read(move |c| {
            c.query_row(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE digest = ?1"),
                [&digest],
                token_from_row,
            )
            .optional()?
            .transpose()
        })
    }

    /// Whether any token was ever stored (revoked ones included): then authentication is on.
    pub async fn tokens_configured(&self) -> Result<bool, StoreError> {
        on_pg!(self.tokens_configured());
        self.call_point_read(|c| {
            Ok(c.query_row("SELECT EXISTS (SELECT 1 FROM tokens)", [], |r| r.get(0))?)
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::auth::{digest, Role, TokenName};
    use crate::store::test_support::temp_store;
    use crate::store::{NewToken, TokenCreated};

    fn new(name: &str, secret: &str) -> NewToken {
        NewToken {
            name: TokenName::new(name).unwrap(),
            role: Role::Submitter,
            digest: digest(secret),
            expires_at: None,
            created_by: Some("cli".into()),
        }
    }

    #[tokio::test]
    async fn create_find_revoke_recreate() {
        let (s, _g) = temp_store().await;
        assert!(!s.tokens_configured().await.unwrap());
        let TokenCreated::Created(t) = s.create_token(new("ci", "one")).await.unwrap() else {
            panic!("not created")
        };
        assert_eq!((t.name.as_str(), t.role), ("ci", Role::Submitter));
        assert!(s.tokens_configured().await.unwrap());
        assert_eq!(
            s.create_token(new("ci", "two")).await.unwrap(),
            TokenCreated::NameTaken
        );
        let found = s.token_by_digest(digest("one")).await.unwrap().unwrap();
        assert!(found.is_valid_at(&crate::timefmt::now()));
        assert!(s.token_by_digest(digest("nope")).await.unwrap().is_none());
        let revoked = s
            .revoke_token("ci".into(), Some("admin".into()))
            .await
            .unwrap();
        assert!(revoked.unwrap().revoked_at.is_some());
        assert!(s.revoke_token("ci".into(), None).await.unwrap().is_none());
        let found = s.token_by_digest(digest("one")).await.unwrap().unwrap();
        assert_eq!(found.state_at(&crate::timefmt::now()), "revoked");
        // The name is free again; the revoked row stays, so auth stays on.
        assert!(matches!(
            s.create_token(new("ci", "two")).await.unwrap(),
            TokenCreated::Created(_)
        ));
        assert_eq!(s.tokens().await.unwrap().len(), 2);
        assert!(s.tokens_configured().await.unwrap());
    }
}

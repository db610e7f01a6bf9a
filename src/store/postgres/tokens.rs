//! API tokens on PostgreSQL: the same rows and rules as `store/tokens.rs`.

use super::Pg;
use crate::auth::Role;
use crate::store::tokens::TOKEN_COLUMNS;
use crate::store::{NewToken, StoreError, TokenCreated, TokenInfo};
use crate::timefmt;
use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row};

fn from_row(r: &Row) -> Result<TokenInfo, StoreError> {
    let role: String = r.try_get(1)?;
    Ok(TokenInfo {
        name: r.try_get(0)?,
        role: role
            .parse::<Role>()
            .map_err(|e| StoreError::Corrupt(format!("token role: {e}")))?,
        created_at: r.try_get(2)?,
        created_by: r.try_get(3)?,
        expires_at: r.try_get(4)?,
        revoked_at: r.try_get(5)?,
        revoked_by: r.try_get(6)?,
    })
}

async fn by_digest(c: &impl GenericClient, digest: &str) -> Result<Option<TokenInfo>, StoreError> {
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE digest = $1");
    // Every authenticated API call asks: `query_typed`, no prepare round trip.
    c.query_typed_opt(&sql, &[(&digest, Type::TEXT)])
        .await?
        .map(|r| from_row(&r))
        .transpose()
}

impl Pg {
    pub(crate) async fn create_token(&self, new: NewToken) -> Result<TokenCreated, StoreError> {
        let r = write_tx!(
            self,
            "create_token",
            |tx| async {
                tx.execute(
                    "INSERT INTO tokens (name, role, digest, created_at, created_by, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &new.name.as_str(),
                        &new.role.as_str(),
                        &new.digest,
                        &timefmt::now(),
                        &new.created_by,
                        &new.expires_at,
                    ],
                )
                .await?;
                by_digest(&tx, &new.digest)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt("insert vanished".into()))
            }
            .await,
            recheck | c | by_digest(c, &new.digest).await
        );
        match r {
            Ok(info) => Ok(TokenCreated::Created(info)),
            Err(e) if e.is_unique_violation() => Ok(TokenCreated::NameTaken),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY revoked_at IS NOT NULL, name, id DESC"
        );
        retry!(self, "tokens", |c| {
            c.query(&sql, &[]).await?.iter().map(from_row).collect()
        })
    }

    pub(crate) async fn revoke_token(
        &self,
        name: String,
        by: Option<String>,
    ) -> Result<Option<TokenInfo>, StoreError> {
        let sql = format!(
            "UPDATE tokens SET revoked_at = $2, revoked_by = $3
             WHERE name = $1 AND revoked_at IS NULL RETURNING {TOKEN_COLUMNS}"
        );
        // Idempotent in effect: a retry after a lost COMMIT finds nothing active and answers
        // as a second revoke would.
        write_tx!(self, "revoke_token", |tx| async {
            tx.query_opt(&sql, &[&name, &timefmt::now(), &by])
                .await?
                .map(|r| from_row(&r))
                .transpose()
        }
        .await)
    }

    pub(crate) async fn token_by_digest(
        &self,
        digest: String,
    ) -> Result<Option<TokenInfo>, StoreError> {
        retry!(self, "token_by_digest", |c| by_digest(c, &digest).await)
    }

    pub(crate) async fn tokens_configured(&self) -> Result<bool, StoreError> {
        retry!(self, "tokens_configured", |c| {
            Ok(c.query_one("SELECT EXISTS (SELECT 1 FROM tokens)", &[])
                .await?
                .get(0))
        })
    }
}

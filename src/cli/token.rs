//! `sqlite-sim token create|list|revoke`: tokens managed on the store directly (no API needed,
//! so the first admin token can be made before any server runs), and the auth summary that
//! `config` and `status` print.

use crate::auth::{self, Role, Secret, TokenName};
use crate::config::Settings;
use crate::store::{NewToken, Store, TokenCreated};
use clap::Subcommand;
use std::process::ExitCode;
use thiserror::Error;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints it once on stdout (details on stderr), stores only its digest.
    Create {
        /// The principal's name (what `submitted_by` and the audit log show).
        #[arg(long)]
        name: String,
        /// viewer, submitter, operator or admin.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Stop working after this long: 90d, 12h, 30m, 2w, 45s. Default: never.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List tokens (never their secrets).
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a name's active token; it stops working at once.
    Revoke { name: String },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse().map_err(|e: auth::AuthError| e.to_string())
}

#[derive(Debug, Error)]
pub enum TokenCliError {
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0:?} already has an active token: revoke it first (sqlite-sim token revoke {0})")]
    NameTaken(String),
    #[error("no active token named {0:?}")]
    NoSuchToken(String),
}

/// Runs a token command against the store the settings name.
pub async fn run(settings: &Settings, command: TokenCommand) -> anyhow::Result<ExitCode> {
    let store = Store::open_settings(settings).await?;
    match command {
        TokenCommand::Create {
            name,
            role,
            expires,
        } => {
            let name = TokenName::new(&name).map_err(TokenCliError::from)?;
            let expires_at = expires
                .as_deref()
                .map(auth::parse_duration)
                .transpose()
                .map_err(TokenCliError::from)?
                .map(crate::api::tokens_expiry);
            let secret = Secret::generate().map_err(TokenCliError::from)?;
            let created = store
                .create_token(NewToken {
                    name: name.clone(),
                    role,
                    digest: auth::digest(secret.expose()),
                    expires_at,
                    created_by: Some("cli".into()),
                })
                .await
                .map_err(TokenCliError::from)?;
            match created {
                TokenCreated::Created(info) => {
                    println!("{}", secret.expose());
                    eprintln!(
                        "token {} ({}) created, expires {}; shown once: it is stored only as a digest",
                        info.name,
                        info.role,
                        info.expires_at.as_deref().unwrap_or("never")
                    );
                    if settings.api_token.is_none() && store.tokens().await?.len() == 1 {
                        eprintln!(
                            "authentication is now on: every API call needs a token (the first token turned it on)"
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                TokenCreated::NameTaken => Err(TokenCliError::NameTaken(name.to_string()).into()),
            }
        }
        TokenCommand::List { json } => {
            let now = crate::timefmt::now();
            let tokens = store.tokens().await?;
            if json {
                let rows: Vec<serde_json::Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut v = serde_json::to_value(t).expect("serialisable");
                        v["state"] = t.state_at(&now).into();
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<24} {:<10} {:<8} {:<28} {:<28} CREATED BY",
                    "NAME", "ROLE", "STATE", "CREATED", "EXPIRES"
                );
                for t in &tokens {
                    println!(
                        "{:<24} {:<10} {:<8} {:<28} {:<28} {}",
                        t.name,
                        t.role,
                        t.state_at(&now),
                        t.created_at,
                        t.expires_at.as_deref().unwrap_or("never"),
                        t.created_by.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke { name } => {
            match store.revoke_token(name.clone(), Some("cli".into())).await? {
                Some(t) => {
                    println!("revoked {} ({})", t.name, t.role);
                    Ok(ExitCode::SUCCESS)
                }
                None => Err(TokenCliError::NoSuchToken(name).into()),
            }
        }
    }
}

/// One line for `config` and `status`: whether authentication is on, and with what.
pub async fn summary(settings: &Settings, store: Option<&Store>) -> String {
    let env = settings.api_token.is_some();
    let tokens = match store {
        Some(s) => match s.tokens().await {
            Ok(t) => Some(t),
            Err(e) => return format!("auth: unknown (could not read tokens: {e})"),
        },
        None => None,
    };
    let now = crate::timefmt::now();
    let stored = tokens.as_ref().is_some_and(|t| !t.is_empty());
    if !env && !stored {
        return "auth: off (SQLITE_SIM_API_TOKEN unset, no tokens stored): every caller may do \
                everything; `sqlite-sim token create` turns it on"
            .into();
    }
    let mut parts = Vec::new();
    if env {
        parts.push("SQLITE_SIM_API_TOKEN set (principal admin, role admin)".to_string());
    }
    if let Some(tokens) = &tokens {
        let active: Vec<_> = tokens.iter().filter(|t| t.is_valid_at(&now)).collect();
        let by_role: Vec<String> = Role::ALL
            .iter()
            .filter_map(|r| {
                let n = active.iter().filter(|t| t.role == *r).count();
                (n > 0).then(|| format!("{n} {r}"))
            })
            .collect();
        parts.push(format!(
            "{} active token(s){} of {} stored",
            active.len(),
            if by_role.is_empty() {
                String::new()
            } else {
                format!(" ({})", by_role.join(", "))
            },
            tokens.len()
        ));
    } else {
        parts.push("stored tokens not read".into());
    }
    format!("auth: on: {}", parts.join("; "))
}

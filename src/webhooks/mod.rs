//! Webhooks: when a request reaches a final state, its JSON is POSTed to its `callback_url`
//! and to `SQLITE_SIM_WEBHOOK_URL`, signed ([`sign`]), only to hosts the allow list names
//! ([`allow`]), with retries for a bounded time ([`deliver`]).
//!
//! A delivery is a store row written in the same transaction as the state change that causes
//! it (the agent's finish, an immediate cancel, lease recovery), so none is lost if a process
//! dies right after; the API processes' workers claim due rows, send them and record each
//! attempt's outcome, which `GET /requests/{uuid}` shows.

pub mod allow;
pub mod deliver;
pub mod sign;

pub use allow::AllowList;

use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;
use time::OffsetDateTime;
use utoipa::ToSchema;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("callback_url {0}")]
    BadUrl(String),
    #[error(
        "callback_url host {host} is not allowed: list it in SQLITE_SIM_WEBHOOK_ALLOW \
         (host names, IP addresses, host:port or CIDR blocks)"
    )]
    NotAllowed { host: String },
}

/// The `SQLITE_SIM_WEBHOOK_*` settings.
#[derive(Debug, Clone, Default)]
pub struct WebhookSettings {
    /// `SQLITE_SIM_WEBHOOK_URL`: sent every request's events, besides its own `callback_url`.
    pub url: Option<String>,
    /// `SQLITE_SIM_WEBHOOK_SECRET`: the HMAC key. Required once any host is allowed, so every
    /// delivery is signed and a receiver can always tell it from a forgery.
    pub secret: Option<String>,
    pub allow: AllowList,
    /// `SQLITE_SIM_WEBHOOK_TIMEOUT`: one attempt, connecting included.
    pub timeout: Duration,
    /// `SQLITE_SIM_WEBHOOK_RETRY_FOR`: how long after its event a delivery is retried.
    pub retry_for: Duration,
}

impl WebhookSettings {
    /// Webhooks are on once a host is allowed.
    pub fn enabled(&self) -> bool {
        !self.allow.is_empty()
    }

    /// Checks the combination at start-up: the global URL must be allowed, and a secret set.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(url) = &self.url {
            self.allow
                .check(url)
                .map_err(|e| ("SQLITE_SIM_WEBHOOK_URL", e.to_string()))?;
        }
        if self.enabled() && self.secret.is_none() {
            return Err((
                "SQLITE_SIM_WEBHOOK_SECRET",
                "must be set when SQLITE_SIM_WEBHOOK_ALLOW allows any host: every delivery is \
                 signed with it"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Where a request submitted with `callback_url` sends its events: that URL (checked
    /// against the allow list) and the global one. The list is stored with the request, so
    /// the agent that finishes it needs none of these settings.
    pub fn targets(&self, callback_url: Option<&str>) -> Result<Vec<String>, WebhookError> {
        let mut out = Vec::new();
        if let Some(url) = callback_url {
            self.allow.check(url)?;
            out.push(url.to_string());
        }
        if let Some(url) = &self.url {
            if !out.contains(url) {
                out.push(url.clone());
            }
        }
        Ok(out)
    }
}

/// What happened to a request that its webhooks tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// It reached `done`, `failed` or `cancelled`.
    Finished,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Finished => "finished",
        }
    }
}

impl std::str::FromStr for Event {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "finished" => Ok(Event::Finished),
            _ => Err(format!("unknown webhook event {s:?}")),
        }
    }
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not sent yet, or to be retried at `next_attempt_at`.
    Pending,
    /// A 2xx answer.
    Delivered,
    /// Not sendable at all (its host is no longer allowed); never retried.
    Failed,
    /// `SQLITE_SIM_WEBHOOK_RETRY_FOR` ran out without a 2xx answer.
    GaveUp,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::GaveUp => "gave_up",
        }
    }
}

impl std::str::FromStr for DeliveryState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(DeliveryState::Pending),
            "delivered" => Ok(DeliveryState::Delivered),
            "failed" => Ok(DeliveryState::Failed),
            "gave_up" => Ok(DeliveryState::GaveUp),
            _ => Err(format!("unknown delivery state {s:?}")),
        }
    }
}

/// One webhook delivery as `GET /requests/{uuid}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    /// Sent as `X-Sqlite-Sim-Delivery`, the same on every attempt: receivers deduplicate by it.
    pub id: uuid::Uuid,
    pub event: Event,
    pub url: String,
    pub state: DeliveryState,
    /// Attempts made so far (one being made counts).
    pub attempts: i64,
    /// The HTTP status of the last answer, if there was one.
    pub last_status: Option<i64>,
    /// Why the last attempt failed (connection error, timeout, non-2xx status).
    pub last_error: Option<String>,
    pub created_at: String,
    /// When the next attempt is due, while `pending`.
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
}

/// A delivery claimed for an attempt.
#[derive(Debug, Clone)]
pub struct Due {
    /// The row's id in the store.
    pub row: i64,
    pub id: uuid::Uuid,
    pub request: crate::model::RequestId,
    pub event: Event,
    pub url: String,
    /// Counting this one.
    pub attempts: i64,
    pub created_at: String,
}

/// One attempt's result, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub state: DeliveryState,
    pub status: Option<i64>,
    pub error: Option<String>,
    pub next_attempt_at: Option<String>,
    /// When it was made (`delivered_at` when delivered).
    pub at: String,
}

/// Back-off before the second attempt; it doubles after each failure, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// What a failed attempt leads to: another at `now` plus the back-off (at the deadline at the
/// latest), or giving up once `retry_for` after the event has passed. Engine-neutral.
pub fn after_failure(
    attempts: i64,
    created_at: OffsetDateTime,
    now: OffsetDateTime,
    retry_for: Duration,
) -> Option<OffsetDateTime> {
    let deadline = created_at + retry_for;
    if now >= deadline {
        return None;
    }
    let doublings = attempts.saturating_sub(1).clamp(0, 20) as u32;
    let backoff = FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF);
    Some((now + backoff).min(deadline))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_and_stops_at_the_deadline() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let hour = Duration::from_secs(3600);
        let s = |n| Duration::from_secs(n);
        assert_eq!(after_failure(1, t0, t0, hour), Some(t0 + s(1)));
        assert_eq!(after_failure(2, t0, t0 + s(1), hour), Some(t0 + s(3)));
        assert_eq!(after_failure(3, t0, t0 + s(3), hour), Some(t0 + s(7)));
        assert_eq!(after_failure(40, t0, t0 + s(10), hour), Some(t0 + s(610)));
        assert_eq!(after_failure(12, t0, t0 + s(3500), hour), Some(t0 + hour));
        assert_eq!(after_failure(13, t0, t0 + hour, hour), None);
    }

    #[test]
    fn targets_and_start_up_checks() {
        let mut w = WebhookSettings {
            allow: AllowList::parse("127.0.0.1").unwrap(),
            url: Some("http://127.0.0.1:9/all".into()),
            ..Default::default()
        };
        assert_eq!(w.validate().unwrap_err().0, "SQLITE_SIM_WEBHOOK_SECRET");
        w.secret = Some("s".into());
        assert!(w.validate().is_ok());
        assert_eq!(
            w.targets(Some("http://127.0.0.1:8/one")).unwrap(),
            ["http://127.0.0.1:8/one", "http://127.0.0.1:9/all"]
        );
        assert_eq!(w.targets(None).unwrap(), ["http://127.0.0.1:9/all"]);
        assert!(matches!(
            w.targets(Some("http://10.0.0.1/")),
            Err(WebhookError::NotAllowed { .. })
        ));
        w.url = Some("http://10.0.0.1/".into());
        assert_eq!(w.validate().unwrap_err().0, "SQLITE_SIM_WEBHOOK_URL");
        // Nothing allowed: webhooks are off, and no secret is needed.
        assert!(WebhookSettings::default().validate().is_ok());
    }
}

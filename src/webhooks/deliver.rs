//! The delivery worker of an API process: claims due deliveries, POSTs each request's JSON
//! (as `GET /requests/{uuid}` shows it), signed, and records every attempt. Woken by the
//! store's change signal (a new delivery is a commit) and by the next retry's due time.

use super::sign::{signature, DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER};
use super::{after_failure, Attempt, DeliveryState, Due, WebhookSettings};
use crate::store::Store;
use crate::timefmt;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;

/// Deliveries claimed (and sent concurrently) at a time.
const BATCH: u32 = 16;
/// Longest sleep between checks when nothing is due (another process may queue work and this
/// process's change signal covers it; this is only a safety net).
const IDLE_CHECK: Duration = Duration::from_secs(30);
/// Wake-ups closer together than this are merged: every commit bumps the change signal.
const SETTLE: Duration = Duration::from_millis(50);

/// Why the last error said what it said: the error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The HTTP client: no redirects followed (a redirect is a failed attempt), no proxy from the
/// environment, every attempt bounded by the timeout.
pub fn client(settings: &WebhookSettings) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        // A fresh connection per attempt: a pooled one may be half-closed by the receiver
        // (or outlive the receiver process it was opened to) by the next attempt.
        .pool_max_idle_per_host(0)
        .user_agent(concat!("sqlite-sim/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("an HTTP client without TLS builds")
}

/// Runs until `stop` turns true.
pub async fn run(store: Store, settings: Arc<WebhookSettings>, mut stop: watch::Receiver<bool>) {
    let client = client(&settings);
    // A claim outlives an attempt, so only a worker that died mid-attempt loses its claim.
    let lease = settings.timeout + Duration::from_secs(5);
    let mut changes = store.subscribe();
    tracing::info!(allow = %settings.allow.as_str(), "webhook deliveries on");
    while !*stop.borrow() {
        // What happens from here on is what the next wake-up is for.
        let _ = changes.borrow_and_update();
        // A read first: most wake-ups are other writes (logs, heartbeats), and only a due
        // delivery is worth a write transaction.
        let wait = match store.next_delivery_due().await {
            Ok(Some(t)) => match timefmt::parse(&t) {
                Some(t) => (t - OffsetDateTime::now_utc())
                    .try_into()
                    .unwrap_or(Duration::ZERO)
                    .min(IDLE_CHECK),
                None => IDLE_CHECK,
            },
            Ok(None) => IDLE_CHECK,
            Err(e) => {
                tracing::warn!(error = %e, "reading when webhooks are due");
                Duration::from_secs(1)
            }
        };
        if wait.is_zero() {
            match store.claim_deliveries(BATCH, lease).await {
                Ok(due) if !due.is_empty() => {
                    let mut set = tokio::task::JoinSet::new();
                    for d in due {
                        let (store, client, settings) =
                            (store.clone(), client.clone(), settings.clone());
                        set.spawn(async move { attempt(&store, &client, &settings, d).await });
                    }
                    while set.join_next().await.is_some() {}
                }
                // Taken by another worker between the read and the claim.
                Ok(_) => tokio::time::sleep(SETTLE).await,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming webhook deliveries");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = changes.changed() => tokio::time::sleep(SETTLE).await,
            _ = stop.changed() => {}
        }
    }
}

/// One attempt of one delivery, recorded whatever its outcome.
async fn attempt(store: &Store, client: &reqwest::Client, settings: &WebhookSettings, d: Due) {
    let outcome = send(store, client, settings, &d).await;
    let now = OffsetDateTime::now_utc();
    let at = timefmt::format(now);
    let record = match outcome {
        Ok(status) => Attempt {
            state: DeliveryState::Delivered,
            status: Some(status),
            error: None,
            next_attempt_at: None,
            at,
        },
        Err(Failure::Permanent(error)) => Attempt {
            state: DeliveryState::Failed,
            status: None,
            error: Some(error),
            next_attempt_at: None,
            at,
        },
        Err(Failure::Retry { status, error }) => {
            let created = timefmt::parse(&d.created_at).unwrap_or(now);
            match after_failure(d.attempts, created, now, settings.retry_for) {
                Some(next) => Attempt {
                    state: DeliveryState::Pending,
                    status,
                    error: Some(error),
                    next_attempt_at: Some(timefmt::format(next)),
                    at,
                },
                None => Attempt {
                    state: DeliveryState::GaveUp,
                    status,
                    error: Some(error),
                    next_attempt_at: None,
                    at,
                },
            }
        }
    };
    tracing::info!(delivery = %d.id, request = %d.request, url = %d.url, attempt = d.attempts,
        state = record.state.as_str(), status = ?record.status, error = ?record.error,
        "webhook attempt");
    if let Err(e) = store.record_attempt(d.row, record).await {
        // Its lease runs out and it is attempted again: at least once, never lost.
        tracing::warn!(delivery = %d.id, error = %e, "recording a webhook attempt");
    }
}

enum Failure {
    /// Retried with back-off until `SQLITE_SIM_WEBHOOK_RETRY_FOR` has passed.
    Retry { status: Option<i64>, error: String },
    /// Never retried.
    Permanent(String),
}

async fn send(
    store: &Store,
    client: &reqwest::Client,
    settings: &WebhookSettings,
    d: &Due,
) -> Result<i64, Failure> {
    // Checked again: the allow list may have shrunk since the request was submitted.
    if let Err(e) = settings.allow.check(&d.url) {
        return Err(Failure::Permanent(e.to_string()));
    }
    let req = match store.get(d.request).await {
        Ok(Some(r)) => r,
        // Deleted meanwhile: its deliveries went with it, and this record changes nothing.
        Ok(None) => return Err(Failure::Permanent("the request was deleted".into())),
        Err(e) => {
            return Err(Failure::Retry {
                status: None,
                error: format!("reading the request: {e}"),
            })
        }
    };
    let body = serde_json::to_vec(&req).expect("a request serialises");
    let mut post = client
        .post(&d.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(DELIVERY_HEADER, d.id.to_string())
        .header(EVENT_HEADER, d.event.as_str());
    if let Some(secret) = &settings.secret {
        post = post.header(SIGNATURE_HEADER, signature(secret.as_bytes(), &body));
    }
    match post.body(body).send().await {
        Ok(resp) if resp.status().is_success() => Ok(i64::from(resp.status().as_u16())),
        Ok(resp) => {
            let status = resp.status();
            let error = if status.is_redirection() {
                format!("HTTP {status} (redirects are not followed)")
            } else {
                format!("HTTP {status}")
            };
            Err(Failure::Retry {
                status: Some(i64::from(status.as_u16())),
                error,
            })
        }
        Err(e) => Err(Failure::Retry {
            status: None,
            error: chain(&e),
        }),
    }
}

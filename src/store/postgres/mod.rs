//! The PostgreSQL engine behind [`crate::store::Store`]: the same public methods as the SQLite
//! engine, with the same rows (timestamps as the same fixed-width RFC 3339 text, so the API's
//! JSON is byte-identical), selected by `SQLITE_SIM_DATABASE_URL`.
//!
//! One file per concern mirrors the SQLite ones (`requests`, `control`, `logs`, `files`,
//! `templates`, `metrics`, `hosts`, `console`); `tests` holds what only this engine promises;
//! this module holds what they share:
//! - a `deadpool-postgres` pool of `tokio-postgres` clients (no TLS),
//! - versioned migrations (`schema_version` table, [`schema`]),
//! - the retry helpers: every operation is retried on connection loss (a PostgreSQL restart, a
//!   dropped connection) while it is safe: a transaction that failed before its `COMMIT` was
//!   sent was rolled back and is simply run again; one whose `COMMIT` was lost is *ambiguous*
//!   and is either idempotent (run again) or re-checked by the caller's `recheck` query,
//! - change notification: write transactions run `NOTIFY sqlite_sim_changes`, and one
//!   dedicated connection `LISTEN`s and turns each notification into a bump of the store's
//!   change counter, so agents and SSE followers in other processes and hosts wake at once.

/// Runs `$body` (an expression of type `Result<R, StoreError>` using the pooled client `$c`)
/// until it succeeds, retrying on connection loss: for reads and idempotent writes.
macro_rules! retry {
    // `$c` is the pooled connection itself, whose statement cache (`prepare_cached`) keeps
    // a hot statement parsed and planned across calls.
    ($pg:expr, $what:literal, pooled, |$c:ident| $body:expr) => {{
        let mut attempt = $crate::store::postgres::Attempt::new($what);
        loop {
            let r: Result<_, $crate::store::StoreError> = async {
                let $c: deadpool_postgres::Object = $pg.client().await?;
                $body
            }
            .await;
            match r {
                Ok(v) => break Ok(v),
                Err(e) => {
                    if let Err(e) = attempt.again(e).await {
                        break Err(e);
                    }
                }
            }
        }
    }};
    // `$c` is the client behind the pooled connection.
    ($pg:expr, $what:literal, |$c:ident| $body:expr) => {
        retry!($pg, $what, pooled, |pooled| {
            let mut pooled = pooled;
            #[allow(unused_variables)]
            let $c: &mut tokio_postgres::Client = &mut pooled;
            $body
        })
    };
}

/// Runs `$body` in a transaction that ends with `NOTIFY` and `COMMIT`, retrying on connection
/// loss. A failure before `COMMIT` was sent rolled everything back, so the body runs again; a
/// lost `COMMIT` may or may not have committed, so `$recheck` (an expression of type
/// `Result<Option<R>, StoreError>` using the client `$c2`) is asked first: `Some` is the
/// committed outcome, `None` runs the body again. `quiet_if |v| …` skips the `NOTIFY` when the
/// body changed nothing (a claim that found no work must not wake every other agent, whose
/// claims would wake it again); `payload "log"` marks a log append, which wakes log followers
/// but gives agents nothing to claim.
macro_rules! write_tx {
    ($pg:expr, $what:literal, |$tx:ident| $body:expr) => {
        $crate::store::postgres::write_tx!(@full $pg, $what, $tx, $body, _c, Ok(None), _v, false, "work")
    };
    ($pg:expr, $what:literal, |$tx:ident| $body:expr, recheck |$c2:ident| $recheck:expr) => {
        $crate::store::postgres::write_tx!(@full $pg, $what, $tx, $body, $c2, $recheck, _v, false, "work")
    };
    ($pg:expr, $what:literal, |$tx:ident| $body:expr, quiet_if |$qv:ident| $quiet:expr) => {
        $crate::store::postgres::write_tx!(@full $pg, $what, $tx, $body, _c, Ok(None), $qv, $quiet, "work")
    };
    ($pg:expr, $what:literal, |$tx:ident| $body:expr, recheck |$c2:ident| $recheck:expr,
     quiet_if |$qv:ident| $quiet:expr) => {
        $crate::store::postgres::write_tx!(@full $pg, $what, $tx, $body, $c2, $recheck, $qv, $quiet, "work")
    };
    ($pg:expr, $what:literal, |$tx:ident| $body:expr, recheck |$c2:ident| $recheck:expr,
     payload $payload:literal) => {
        $crate::store::postgres::write_tx!(@full $pg, $what, $tx, $body, $c2, $recheck, _v, false, $payload)
    };
    (@full $pg:expr, $what:literal, $tx:ident, $body:expr, $c2:ident, $recheck:expr, $qv:ident,
     $quiet:expr, $payload:literal) => {{
        let mut attempt = $crate::store::postgres::Attempt::new($what);
        let mut ambiguous = false;
        loop {
            let r: Result<_, $crate::store::StoreError> = async {
                let mut client = $pg.client().await?;
                #[allow(unused_variables)]
                let c: &mut tokio_postgres::Client = &mut client;
                if ambiguous {
                    #[allow(unused_variables)]
                    let $c2: &tokio_postgres::Client = &*c;
                    let found: Result<Option<_>, $crate::store::StoreError> = $recheck;
                    let found = found?;
                    if let Some(v) = found {
                        return Ok((v, true));
                    }
                    ambiguous = false;
                }
                let $tx = c.transaction().await?;
                let v: Result<_, $crate::store::StoreError> = $body;
                let v = v?;
                #[allow(unused_variables)]
                let changed = {
                    let $qv = &v;
                    !$quiet
                };
                if changed {
                    $tx.batch_execute(concat!("NOTIFY sqlite_sim_changes, '", $payload, "'"))
                        .await?;
                }
                ambiguous = true;
                $tx.commit().await?;
                ambiguous = false;
                Ok((v, changed))
            }
            .await;
            match r {
                Ok((v, changed)) => {
                    if changed {
                        $pg.bump();
                    }
                    break Ok(v);
                }
                Err(e) => {
                    if let Err(e) = attempt.again(e).await {
                        break Err(e);
                    }
                }
            }
        }
    }};
}
pub(super) use write_tx;

mod audit;
mod batch;
mod console;
mod control;
mod files;
mod hosts;
mod logs;
mod metrics;
mod queue;
mod requests;
mod retry;
mod schema;
mod templates;
mod tokens;
mod webhooks;

use super::StoreError;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

/// The notification channel every write transaction signals.
pub(super) const CHANNEL: &str = "sqlite_sim_changes";
/// Connections in the pool (PostgreSQL runs statements in parallel, unlike SQLite's writers).
const POOL_SIZE: usize = 16;
/// How long an operation keeps retrying through an outage before it reports it (the sink
/// retries on top of this).
const RETRY_FOR: Duration = Duration::from_secs(30);
/// Bound on each connection attempt, so a vanished server fails an attempt instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server keeps one of our sessions that sits idle inside a transaction before
/// ending it. Every transaction here sends its statements back to back, so a session idle
/// that long belongs to a client that is gone without a FIN (a host that lost power or its
/// link mid-transaction): without this the server holds its row locks until TCP gives up
/// (hours), and lease recovery, which skips locked rows, could never recover its request.
const IDLE_IN_TRANSACTION: &str = "10s";

/// Errors of the PostgreSQL engine.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("postgres: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("postgres connection pool: {0}")]
    Pool(String),
    #[error("bad database URL: {0}")]
    Url(String),
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            // Connecting failed: classified like any server error (refused: retry; a wrong
            // password: no).
            deadpool_postgres::PoolError::Backend(e) => StoreError::Postgres(PgError::Db(e)),
            other => StoreError::Postgres(PgError::Pool(other.to_string())),
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(PgError::Db(e))
    }
}

impl PgError {
    /// The SQLSTATE of a server-side error.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            PgError::Db(e) => e.code(),
            _ => None,
        }
    }

    /// The server could not be reached or went away: worth retrying, and a 503 for the API.
    pub fn is_unavailable(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            PgError::Pool(_) => true,
            PgError::Url(_) => false,
            PgError::Db(e) => {
                if e.is_closed() {
                    return true;
                }
                match e.code() {
                    // Class 08 (connection exception), 57P01-03 (shutdown, crash, starting up).
                    Some(c) => {
                        c.code().starts_with("08")
                            || [
                                SqlState::ADMIN_SHUTDOWN,
                                SqlState::CRASH_SHUTDOWN,
                                SqlState::CANNOT_CONNECT_NOW,
                            ]
                            .contains(c)
                    }
                    // No SQLSTATE: an I/O error on the socket is the connection; anything else
                    // (a value that does not convert) is a bug that retrying cannot cure.
                    None => {
                        std::error::Error::source(e)
                            .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
                            // A connect timeout has no source; only its words say so.
                            || e.to_string().starts_with("timeout")
                    }
                }
            }
        }
    }
}

/// The engine: a pool and the change counter it shares with its `Store`.
pub(super) struct Pg {
    pool: Pool,
    /// Group commit of new requests without uploads.
    inserts: batch::Batcher,
    /// The host registry as reads last saw it, to say why pending requests wait.
    hosts: crate::store::hosts::HostsCache,
    /// The latest snapshot of the queue, for positions deep in it.
    positions: crate::store::queue::Positions,
    checker: hosts::Checker,
    changes: watch::Sender<u64>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Parses a `postgres://` URL (libpq's forms, `?host=/socket/dir` included).
pub(super) fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Postgres(PgError::Url(e.to_string())))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    cfg.application_name("sqlite-sim");
    // Ours first, so that the URL's own `options` (later wins) may override it.
    let ours = format!("-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION}");
    let options = match cfg.get_options() {
        Some(o) if !o.is_empty() => format!("{ours} {o}"),
        _ => ours,
    };
    cfg.options(&options);
    Ok(cfg)
}

impl Pg {
    /// Connects, brings the schema up to date and starts the listener.
    pub(super) async fn open(
        cfg: tokio_postgres::Config,
        changes: watch::Sender<u64>,
    ) -> Result<Pg, StoreError> {
        let mgr = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                // A client closed by a server restart is noticed (`is_closed`) and replaced.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Postgres(PgError::Pool(e.to_string())))?;
        {
            let mut c = pool.get().await?;
            schema::migrate(&mut c).await?;
        }
        let checker = hosts::Checker::start(cfg.clone());
        let listener = tokio::spawn(listen(cfg, changes.clone()));
        Ok(Pg {
            inserts: batch::Batcher::start(pool.clone(), changes.clone()),
            hosts: Default::default(),
            positions: Default::default(),
            pool,
            checker,
            changes,
            listener,
        })
    }

    pub(super) fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// A trivial query: the server is reachable.
    pub(super) async fn health(&self) -> Result<(), StoreError> {
        retry!(self, "health", |c| {
            c.query_one("SELECT 1", &[]).await?;
            Ok(())
        })
    }
}

/// Retry state of one operation.
pub(super) struct Attempt {
    what: &'static str,
    tries: u32,
    delay: Duration,
    until: tokio::time::Instant,
}

impl Attempt {
    pub(super) fn new(what: &'static str) -> Self {
        Attempt {
            what,
            tries: 0,
            delay: Duration::from_millis(25),
            until: tokio::time::Instant::now() + RETRY_FOR,
        }
    }

    /// After a failure: `Ok` (having waited) to try again, or the error to report.
    pub(super) async fn again(&mut self, e: StoreError) -> Result<(), StoreError> {
        let retryable = matches!(&e, StoreError::Postgres(p) if p.is_unavailable());
        if !retryable || tokio::time::Instant::now() + self.delay > self.until {
            return Err(e);
        }
        self.tries += 1;
        tracing::warn!(operation = self.what, attempt = self.tries, error = %e,
            "postgres unavailable; retrying");
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(2));
        Ok(())
    }
}

/// Holds a `LISTEN` connection for as long as the store lives, reconnecting after an outage;
/// every notification (and every reconnection, which may have missed some) bumps `changes`.
async fn listen(cfg: tokio_postgres::Config, changes: watch::Sender<u64>) {
    let bump = || changes.send_modify(|v| *v = v.wrapping_add(1));
    let mut delay = Duration::from_millis(50);
    loop {
        match cfg.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                // The connection must be polled for LISTEN to complete, so it runs beside.
                let pump = tokio::spawn(async move {
                    let mut msgs = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(m) = msgs.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(_)) => {
                                if tx.send(()).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}"))
                    .await
                    .is_ok()
                {
                    delay = Duration::from_millis(50);
                    bump();
                    while rx.recv().await.is_some() {
                        // Coalesce a burst into one wake-up.
                        while rx.try_recv().is_ok() {}
                        bump();
                    }
                }
                pump.abort();
                tracing::warn!("postgres change listener lost its connection; reconnecting");
            }
            Err(e) => {
                tracing::debug!(error = %e, "postgres change listener could not connect");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Test databases: each test gets its own, created from the cluster named by
/// `SQLITE_SIM_TEST_DATABASE_URL` and dropped after it.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn admin_url() -> Option<String> {
        std::env::var("SQLITE_SIM_TEST_DATABASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
    }

    /// A fresh, empty database; its config.
    pub async fn create_db(admin: &str) -> (tokio_postgres::Config, String) {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let cfg = parse_url(admin).unwrap();
        let (client, conn) = cfg.connect(NoTls).await.unwrap();
        let h = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        drop(client);
        let _ = h.await;
        let mut db = cfg.clone();
        db.dbname(&name);
        (db, name)
    }

    /// Drops a test database (its connections are ended first), from any context.
    pub fn drop_db(admin: &str, name: &str) {
        let (admin, name) = (admin.to_string(), name.to_string());
        // A thread with its own runtime: Drop cannot await, and the test's runtime may be
        // single-threaded.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let cfg = parse_url(&admin).unwrap();
                if let Ok((client, conn)) = cfg.connect(NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            })
        })
        .join();
    }
}

#[cfg(test)]
mod tests;

//! Storage behind one narrow boundary: requests, their state changes, their logs and files,
//! templates' metadata. [`Store`]'s public methods *are* the boundary (the API, the agents and the
//! CLI use nothing else), and two engines implement it:
//!
//! - **SQLite** (the default, one host): the SQL in this module's files (`requests.rs`,
//!   `control.rs`, `logs.rs`, `files.rs`, `templates.rs`, `metrics.rs`), described below;
//! - **PostgreSQL** (`SQLITE_SIM_DATABASE_URL`, many hosts): all of its SQL under [`postgres`],
//!   one file per concern mirroring these. Each public method starts with a one-line dispatch
//!   (`if let Some(pg) = &self.pg { return pg.method(..).await; }`) and otherwise runs the
//!   SQLite code, so both engines keep the same signatures, outcomes and errors.
//!
//! On SQLite, rusqlite is synchronous. Point reads (a primary-key lookup) run on the calling
//! thread; other operations run on tokio's blocking pool with a connection taken from a small
//! pool of open connections; small hot writes (a new request, an agent's state changes) go to
//! the group-commit writer ([`writer`]), one thread that commits whatever is queued in one
//! transaction. The database runs in WAL mode with a busy timeout, so the API and any number
//! of agent processes can share one file. Every write starts with `BEGIN IMMEDIATE`, which
//! makes claims atomic across processes.

/// First line of every public [`Store`] method: hands the call to the PostgreSQL engine when
/// the store is PostgreSQL (one line, so edits to the SQLite bodies below merge cleanly).
macro_rules! on_pg {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        if let Some(pg) = &$self.pg {
            return pg.$method($($arg),*).await;
        }
    };
}

pub(crate) mod audit;
mod checkpoint;
mod console;
mod control;
mod files;
mod hosts;
mod logs;
mod metrics;
pub mod postgres;
mod queue;
mod requests;
mod retry;
mod schema;
pub mod sink;
mod templates;
pub(crate) mod tokens;
pub(super) mod webhooks;
mod writer;

pub use audit::{AuditEntry, AuditQuery, NewAudit, Outcome};
pub use console::{ConsoleSlice, Kept, Keystrokes, ReleaseOutcome};
pub use control::{ControlOutcome, DeleteOutcome};
pub use files::CHUNK;
pub use hosts::{place, Capabilities, Host, HostReport, Placement};
pub use logs::LogQuery;
pub use metrics::{Histogram, MetricsSnapshot, Stats, Summary, BUCKETS};
pub use requests::{Finish, RequestQuery};
pub use templates::{RestoreStats, TemplateOrder, TemplateOrders, TemplateRecord};
pub use tokens::{NewToken, TokenCreated, TokenInfo};
pub use writer::WriterError;

use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database file {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("creating {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database holds an invalid value: {0}")]
    Corrupt(String),
    #[error("database schema version {found} is newer than this binary supports ({supported})")]
    TooNew { found: i64, supported: i64 },
    #[error("database task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Postgres(#[from] postgres::PgError),
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error("still unreachable after {attempts} attempts in {waited:?} (SQLITE_SIM_DATABASE_WAIT): {source}")]
    Unreachable {
        waited: Duration,
        attempts: u32,
        source: Box<StoreError>,
    },
}

impl StoreError {
    /// The disk (or the database's size limit) is full.
    pub fn is_full(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Postgres(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL)
            }
            _ => false,
        }
    }

    /// The database cannot be reached right now (PostgreSQL down or restarting), or is busy.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            StoreError::Postgres(e) => e.is_unavailable(),
            _ => false,
        }
    }

    /// A uniqueness constraint refused the write.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::ConstraintViolation
                    && f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            }
            StoreError::Postgres(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
            }
            _ => false,
        }
    }
}

/// How long a writer waits for another process's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept open.
const POOL_SIZE: usize = 8;
/// Disk space set aside for recording final states when the disk fills up.
const RESERVE_BYTES: usize = 1024 * 1024;

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// The PostgreSQL engine, when the store is PostgreSQL: every public method hands over to
    /// it on its first line. `None`: SQLite (`inner`'s connections).
    pg: Option<Arc<postgres::Pg>>,
}

struct Inner {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// Bumped after every write this process makes, so followers and agents in this process
    /// react at once; other processes' writes bump it too once [`Store::watch_commits`] runs.
    changes: tokio::sync::watch::Sender<u64>,
    /// Serialises this process's write transactions (the group-commit writer's batches too).
    write_turn: Arc<Mutex<()>>,
    /// The group-commit writer (SQLite with `SQLITE_SIM_GROUP_COMMIT` on); `None`: each write
    /// is a transaction of its own on the blocking pool.
    writer: Option<writer::Writer>,
    /// The host registry as reads last saw it, to say why pending requests wait.
    hosts: hosts::HostsCache,
    /// The latest snapshot of the queue, for positions deep in it.
    positions: queue::Positions,
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to date, with group
    /// commit.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_sqlite(path.as_ref(), true).await
    }

    /// [`Store::open`]; `group_commit` false commits each write in a transaction of its own
    /// (`SQLITE_SIM_GROUP_COMMIT=false`, the baseline of figure 6).
    async fn open_sqlite(path: &Path, group_commit: bool) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let write_turn = Arc::new(Mutex::new(()));
        let writer = if group_commit {
            Some(writer::Writer::start(
                Self::connect(&path)?,
                write_turn.clone(),
            )?)
        } else {
            None
        };
        let store = Store {
            inner: Arc::new(Inner {
                path,
                idle: Mutex::new(Vec::new()),
                changes: tokio::sync::watch::channel(0).0,
                write_turn,
                writer,
                hosts: Default::default(),
                positions: Default::default(),
            }),
            pg: None,
        };
        store.call_write(schema::migrate).await?;
        store.make_reserve();
        checkpoint::start(
            Self::connect(&store.inner.path)?,
            Arc::downgrade(&store.inner),
        )?;
        Ok(store)
    }

    /// Opens the store the settings name: PostgreSQL at `database_url` if given, otherwise
    /// SQLite at `db_path`.
    pub async fn open_configured(
        db_path: &Path,
        database_url: Option<&str>,
    ) -> Result<Self, StoreError> {
        match database_url {
            Some(url) => Self::open_postgres(postgres::parse_url(url)?).await,
            None => Self::open(db_path).await,
        }
    }

    /// The store `settings` name (`SQLITE_SIM_DATABASE_URL`, else `SQLITE_SIM_DB_PATH`).
    pub async fn open_settings(settings: &crate::config::Settings) -> Result<Self, StoreError> {
        match &settings.database_url {
            Some(_) => {
                Self::open_configured(&settings.db_path, settings.database_url.as_deref()).await
            }
            None => Self::open_sqlite(&settings.db_path, settings.group_commit).await,
        }
    }

    /// [`Store::open_settings`] for the services (`api`, `agents`, `all`): a PostgreSQL server
    /// that cannot be reached yet (refused, timed out, starting up, shutting down) is asked
    /// again with back-off for up to `settings.database_wait` (zero: once), each failure
    /// logged with its reason. What retrying cannot cure (wrong credentials, no such
    /// database, a bad URL) fails at once; so does SQLite, which has no server to wait for.
    pub async fn open_settings_waiting(
        settings: &crate::config::Settings,
    ) -> Result<Self, StoreError> {
        let until = std::time::Instant::now() + settings.database_wait;
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1u32;
        loop {
            match Self::open_settings(settings).await {
                Err(e)
                    if settings.database_url.is_some()
                        && e.is_unavailable()
                        && std::time::Instant::now() + delay <= until =>
                {
                    // The URL stays out of it (its password): the reason names no URL.
                    tracing::warn!(attempt, error = %e, retry_in = ?delay,
                        "PostgreSQL cannot be reached yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e) if settings.database_url.is_some() && e.is_unavailable() => {
                    return Err(StoreError::Unreachable {
                        waited: settings.database_wait,
                        attempts: attempt,
                        source: Box::new(e),
                    })
                }
                other => return other,
            }
        }
    }

    /// Connects to PostgreSQL and brings its schema up to date.
    pub async fn open_postgres(cfg: tokio_postgres::Config) -> Result<Self, StoreError> {
        let changes = tokio::sync::watch::channel(0).0;
        let pg = postgres::Pg::open(cfg, changes.clone()).await?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: PathBuf::new(),
                idle: Mutex::new(Vec::new()),
                changes,
                write_turn: Arc::new(Mutex::new(())),
                writer: None,
                hosts: Default::default(),
                positions: Default::default(),
            }),
            pg: Some(Arc::new(pg)),
        })
    }

    /// Which engine this store runs on (`"sqlite"` or `"postgres"`).
    pub fn engine(&self) -> &'static str {
        if self.pg.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }

    /// Space set aside next to the database, released when the disk fills up so that final
    /// states can still be recorded (`<db>.reserve`).
    fn reserve_path(&self) -> PathBuf {
        let mut p = self.inner.path.clone().into_os_string();
        p.push(".reserve");
        PathBuf::from(p)
    }

    fn make_reserve(&self) {
        if self.pg.is_some() {
            return;
        }
        let path = self.reserve_path();
        if path.exists() {
            return;
        }
        let made = std::fs::File::create(&path).and_then(|f| {
            use std::io::Write;
            let mut f = std::io::BufWriter::new(f);
            // Written, not sparse: the blocks must really be allocated.
            f.write_all(&vec![0u8; RESERVE_BYTES])?;
            f.into_inner()?.sync_all()
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(path = %path.display(), error = %e, "could not set disk space aside");
        }
    }

    /// Frees the reserved space; true if there was any. Used when a write failed because the
    /// disk is full.
    pub fn release_reserve(&self) -> bool {
        if self.pg.is_some() {
            return false; // PostgreSQL's disk is the server's to manage.
        }
        let released = std::fs::remove_file(self.reserve_path()).is_ok();
        if released {
            tracing::warn!("disk full: released the reserved space to record final states");
        }
        released
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Changes whenever this process writes to the database; on PostgreSQL also whenever any
    /// process on any host commits a write (`LISTEN/NOTIFY`).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    pub(crate) fn bump(&self) {
        self.inner.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Makes commits of other processes (and hosts, for an engine that has them) wake this
    /// process's subscribers: a thread reads `PRAGMA data_version` on a connection of its own
    /// every `every`; the value changes whenever another connection has committed. That costs
    /// microseconds per check, where a claim is a write transaction, so agents and log
    /// streams of a separate process react within `every` instead of their poll interval.
    /// The thread ends with the last handle on the store.
    pub fn watch_commits(&self, every: Duration) -> Result<(), StoreError> {
        // PostgreSQL: its LISTEN connection already turns every commit into a wake-up.
        if self.pg.is_some() {
            return Ok(());
        }
        let conn = Self::connect(&self.inner.path)?;
        let weak = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("store-commits".into())
            .spawn(move || {
                let version = |c: &Connection| -> rusqlite::Result<i64> {
                    c.query_row("PRAGMA data_version", [], |r| r.get(0))
                };
                let mut seen = version(&conn).ok();
                loop {
                    std::thread::sleep(every);
                    let Some(inner) = weak.upgrade() else { return };
                    match version(&conn) {
                        Ok(v) if Some(v) != seen => {
                            seen = Some(v);
                            inner.changes.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "PRAGMA data_version failed"),
                    }
                }
            });
        spawned.map_err(|e| StoreError::Task(format!("starting the commit watcher: {e}")))?;
        Ok(())
    }

    fn connect(path: &Path) -> Result<Connection, StoreError> {
        let open = || -> rusqlite::Result<Connection> {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            // WAL + NORMAL survives any process crash; only an OS crash may lose the last commits.
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            // The checkpoint thread copies the WAL back; a commit does only past the backstop.
            conn.pragma_update(None, "wal_autocheckpoint", checkpoint::BACKSTOP_PAGES)?;
            Ok(conn)
        };
        open().map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Runs a read with a pooled connection on the blocking thread pool.
    pub(crate) async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        self.run(f, false).await
    }

    /// Runs a write. Writers of this process take turns here instead of meeting on SQLite's
    /// lock, whose busy handler sleeps in milliseconds and would cap write throughput;
    /// other processes' writers are still arbitrated by SQLite.
    pub(crate) async fn call_write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        self.run(f, true).await
    }

    /// Runs a small write in the group-commit writer's next transaction, together with the
    /// other writes queued by then (see [`writer`]); without the writer, as [`Store::call_write`]
    /// in a transaction of its own. `f` must leave the transaction open: the writer wraps it
    /// in a savepoint, and its error rolls back only what `f` did.
    pub(crate) async fn call_batched<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        match &self.inner.writer {
            Some(w) => w.submit(f).await,
            None => {
                self.call_write(move |c| {
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let r = f(&tx)?;
                    tx.commit()?;
                    Ok(r)
                })
                .await
            }
        }
    }

    /// [`Store::call_batched`] for an `f` that runs exactly one statement: the writer gives it
    /// no savepoint (a failed statement leaves nothing by itself).
    pub(crate) async fn call_batched_statement<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        match &self.inner.writer {
            Some(w) => w.submit_statement(f).await,
            None => self.call_batched(f).await,
        }
    }

    /// Runs a point read (a primary-key lookup, microseconds from the page cache) on the
    /// calling thread. Handing such a read to the blocking pool costs more in thread
    /// hand-offs than the read itself, and WAL readers never wait for writers.
    pub(crate) fn call_point_read<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let pooled = self.inner.idle.lock().expect("pool lock poisoned").pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => Self::connect(&self.inner.path)?,
        };
        let result = f(&mut conn);
        let mut idle = self.inner.idle.lock().expect("pool lock poisoned");
        if idle.len() < POOL_SIZE {
            idle.push(conn);
        }
        result
    }

    async fn run<R, F>(&self, f: F, write: bool) -> Result<R, StoreError>
    where
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = write.then(|| inner.write_turn.lock().unwrap_or_else(|p| p.into_inner()));
            let pooled = inner.idle.lock().expect("pool lock poisoned").pop();
            let mut conn = match pooled {
                Some(c) => c,
                None => Self::connect(&inner.path)?,
            };
            let result = f(&mut conn);
            let mut idle = inner.idle.lock().expect("pool lock poisoned");
            if idle.len() < POOL_SIZE {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// The database is reachable: one read of its header on this thread. Cheap enough for a
    /// load balancer's liveness probe (`GET /health`) at any size of database, unlike
    /// [`Store::check`].
    pub async fn health(&self) -> Result<(), StoreError> {
        on_pg!(self.health());
        self.call_point_read(|c| {
            c.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))?;
            Ok(())
        })
    }

    /// The database is reachable and sound: `PRAGMA quick_check` on SQLite, which reads every
    /// page (for `sqlite-sim status`, not for probes).
    pub async fn check(&self) -> Result<(), StoreError> {
        on_pg!(self.health());
        self.call(|c| {
            let r: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
            if r == "ok" {
                Ok(())
            } else {
                Err(StoreError::Corrupt(r))
            }
        })
        .await
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::Store;

    /// What keeps a test's store alive: its temp dir (SQLite), or its own PostgreSQL database,
    /// dropped with the guard.
    pub struct TempStore {
        dir: tempfile::TempDir,
        pg: Option<(String, tokio_postgres::Config, String)>,
    }

    impl TempStore {
        /// Another handle on the same store, with its own connections (as another process).
        pub async fn reopen(&self) -> Store {
            match &self.pg {
                Some((_, cfg, _)) => Store::open_postgres(cfg.clone()).await.unwrap(),
                None => Store::open(self.dir.path().join("t.db")).await.unwrap(),
            }
        }

        /// A plain connection to the test's own PostgreSQL database (`None` on SQLite), to
        /// look at what the engine wrote.
        pub async fn pg_client(&self) -> Option<tokio_postgres::Client> {
            let (_, cfg, _) = self.pg.as_ref()?;
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            Some(client)
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            if let Some((admin, _, name)) = &self.pg {
                super::postgres::test_support::drop_db(admin, name);
            }
        }
    }

    /// A fresh store: SQLite in a temp dir, or, when `SQLITE_SIM_TEST_DATABASE_URL` names a
    /// PostgreSQL cluster, a database of its own there.
    pub async fn temp_store() -> (Store, TempStore) {
        let dir = tempfile::tempdir().unwrap();
        if let Some(admin) = super::postgres::test_support::admin_url() {
            let (cfg, name) = super::postgres::test_support::create_db(&admin).await;
            let store = Store::open_postgres(cfg.clone()).await.unwrap();
            return (
                store,
                TempStore {
                    dir,
                    pg: Some((admin, cfg, name)),
                },
            );
        }
        let store = Store::open(dir.path().join("t.db")).await.unwrap();
        (store, TempStore { dir, pg: None })
    }

    /// A pending request with throwaway values.
    pub async fn pending_request(store: &Store) -> crate::model::Request {
        store
            .create(crate::model::NewRequest {
                vm_name: "t".into(),
                commands: "x".into(),
                timeout: 1,
                ..Default::default()
            })
            .await
            .unwrap()
    }
}

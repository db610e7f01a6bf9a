//! Test harness: the real `sqlite-sim` binary on a free port with a fresh database, run dir and
//! (optionally) extra VM configs; a host-wide cap on concurrently booting guests; helpers to
//! wait for a request to finish and to look for leftover QEMU processes.
//!
//! HTTP goes through [`http::Client`] (JSON calls returning `(status, body)`, whole replies,
//! the API's shortcuts, authorization); a [`Server`] derefs to its client, so tests write
//! `s.submit(..)`, `s.get_json(..)` or `s.url` directly.
#![allow(dead_code)]

pub mod http;
pub mod receiver;
pub mod sse;
pub mod ws;

pub use http::{Client, Method};
use serde_json::Value;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether the demo image exists (scripts/setup.sh builds it). Tests that need it fail loudly
/// when it is missing rather than passing vacuously.
pub fn require_image() {
    let img = repo().join("vm_images/tiny.qcow2");
    assert!(
        img.exists(),
        "{} missing: run scripts/setup.sh (scripts/test.sh does)",
        img.display()
    );
}

/// A slot among `SQLITE_SIM_TEST_VMS` (default 2) shared by every test process on this host.
pub struct VmSlot(#[allow(dead_code)] nix::fcntl::Flock<File>);

pub fn vm_slot() -> VmSlot {
    let n: usize = std::env::var("SQLITE_SIM_TEST_VMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
        .max(1);
    let dir = std::env::temp_dir().join("sqlite-sim-test-slots");
    std::fs::create_dir_all(&dir).unwrap();
    loop {
        for i in 0..n {
            let f = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("slot-{i}")))
                .unwrap();
            if let Ok(lock) =
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            {
                return VmSlot(lock);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The start of a test that boots guests: the image must exist, and one of the host's VM slots
/// is held while the returned guard lives.
pub fn guest_slot() -> VmSlot {
    require_image();
    vm_slot()
}

/// Which services the process runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    All,
    Api,
    Agents,
}

/// One server under test: its temp dir (database, run dir, configs, logs), its main process,
/// and a [`Client`] for its API (which it derefs to).
pub struct Server {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub run_dir: PathBuf,
    pub config_dir: PathBuf,
    child: Option<Proc>,
    http: Client,
    env: Vec<(String, String)>,
    /// (admin URL, database) when the server runs on a PostgreSQL database of its own.
    pg_db: Option<(String, String)>,
}

impl std::ops::Deref for Server {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.http
    }
}

pub struct Options {
    pub mode: Mode,
    /// Keep the shipped configs' `WARM` keys (templates are built at start).
    pub warm: bool,
    /// Extra VM configs: (name, text) written next to a copy of the shipped configs.
    pub configs: Vec<(String, String)>,
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::All,
            warm: false,
            configs: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// `(name, value)` pairs as [`Options::env`] holds them.
pub fn env_pairs(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Options {
    /// The defaults, with `env` set for the server's processes.
    pub fn with_env(env: &[(&str, &str)]) -> Options {
        Options {
            env: env_pairs(env),
            ..Default::default()
        }
    }

    /// The defaults, with the main process running `mode`.
    pub fn with_mode(mode: Mode) -> Options {
        Options {
            mode,
            ..Default::default()
        }
    }
}

impl Server {
    /// Split processes on one store: the server runs the API only, and an `agents` process
    /// runs beside it (stopped when the returned [`Proc`] is dropped).
    pub async fn start_split() -> (Server, Proc) {
        let s = Server::start(Options::with_mode(Mode::Api)).await;
        let agents = s.spawn_process(Mode::Agents);
        (s, agents)
    }

    pub async fn start(opts: Options) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("sqs")
            .tempdir_in("/tmp")
            .unwrap();
        let config_dir = dir.path().join("vm_configs");
        std::fs::create_dir_all(&config_dir).unwrap();
        for e in std::fs::read_dir(repo().join("vm_configs")).unwrap() {
            let e = e.unwrap();
            let text = std::fs::read_to_string(e.path()).unwrap();
            // The shipped configs are warm; tests boot them cold unless they ask (a warm
            // server builds templates at start, which most tests do not want to wait for).
            let text = if opts.warm {
                text
            } else {
                text.lines()
                    .filter(|l| !l.trim_start().starts_with("WARM"))
                    .map(|l| format!("{l}\n"))
                    .collect()
            };
            std::fs::write(config_dir.join(e.file_name()), text).unwrap();
        }
        for (name, text) in &opts.configs {
            std::fs::write(config_dir.join(format!("{name}.conf")), text).unwrap();
        }
        let db = dir.path().join("sim.db");
        let run_dir = dir.path().join("run");
        let mut env: Vec<(String, String)> = vec![
            ("SQLITE_SIM_DB_PATH".into(), db.display().to_string()),
            // The kernel picks a free port; the harness reads it from the server's log, so two
            // tests can never race for one.
            ("SQLITE_SIM_API_PORT".into(), "0".into()),
            ("SQLITE_SIM_RUN_DIR".into(), run_dir.display().to_string()),
            (
                "SQLITE_SIM_VM_CONFIG_DIR".into(),
                config_dir.display().to_string(),
            ),
            (
                "SQLITE_SIM_VM_IMAGES_DIR".into(),
                repo().join("vm_images").display().to_string(),
            ),
            ("SQLITE_SIM_ACCEL".into(), "tcg".into()),
            ("SQLITE_SIM_AGENT_COUNT".into(), "1".into()),
            ("SQLITE_SIM_AGENT_POLL_INTERVAL".into(), "0.2".into()),
            ("SQLITE_SIM_LOG_LEVEL".into(), "DEBUG".into()),
            // Fault tests assert a failure's own outcome: no re-queue unless a test asks for
            // one (`retries` in the submission, or this variable in `Options::env`).
            ("SQLITE_SIM_DEFAULT_RETRIES".into(), "0".into()),
        ];
        // With a test cluster named, the server runs on PostgreSQL: a database of its own,
        // dropped with the server.
        let pg_db = match std::env::var("SQLITE_SIM_TEST_DATABASE_URL") {
            Ok(admin) if !admin.is_empty() => {
                let name = format!("e_{}", uuid::Uuid::new_v4().simple());
                pg_exec(&admin, &format!("CREATE DATABASE {name}"));
                env.push(("SQLITE_SIM_DATABASE_URL".into(), with_dbname(&admin, &name)));
                Some((admin, name))
            }
            _ => None,
        };
        env.extend(opts.env.iter().cloned());
        let mut s = Server {
            dir,
            db,
            run_dir,
            config_dir,
            child: None,
            http: Client::new(String::new()),
            env,
            pg_db,
        };
        s.spawn(opts.mode);
        if opts.mode != Mode::Agents {
            s.wait_ready().await;
        }
        s
    }

    /// Runs `sqlite-sim ARGS` to completion with this server's environment (e.g. `status`).
    pub fn run_command(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_sqlite-sim"))
            .args(args)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `sqlite-sim token create` on this server's store (authentication turns on within
    /// `access::RECHECK`); the token it printed.
    pub fn make_token(&self, name: &str, role: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--name", name, "--role", role];
        args.extend_from_slice(extra);
        let out = self.run_command(&args);
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(token.starts_with("sqs_"), "{token}");
        token
    }

    /// A client presenting `token` as its bearer token.
    pub fn bearer(&self, token: &str) -> Client {
        self.with_authorization(&format!("Bearer {token}"))
    }

    /// Starts (another) process of the binary with this server's environment.
    pub fn spawn_process(&self, mode: Mode) -> Proc {
        self.spawn_process_with(mode, &[])
    }

    /// Like [`Server::spawn_process`], with `extra` overriding the environment (another host
    /// id, run directory or labels, for a second host on the same database).
    pub fn spawn_process_with(&self, mode: Mode, extra: &[(&str, String)]) -> Proc {
        static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let sub = match mode {
            Mode::All => "all",
            Mode::Api => "api",
            Mode::Agents => "agents",
        };
        let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = File::create(self.dir.path().join(format!("{sub}-{n}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sqlite-sim"));
        cmd.arg(sub)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        die_with_parent(&mut cmd);
        Proc(cmd.spawn().unwrap())
    }

    /// The binary with `args` and `SQLITE_SIM_API_URL` pointing at this server (the CLI's
    /// commands and `submit`).
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sqlite-sim"));
        cmd.args(args).env("SQLITE_SIM_API_URL", &self.url);
        cmd
    }

    /// A client for this server's API, for tasks that outlive a borrow of it.
    pub fn api(&self) -> Client {
        self.http.clone()
    }

    fn spawn(&mut self, mode: Mode) {
        self.child = Some(self.spawn_process(mode));
    }

    async fn wait_ready(&mut self) {
        let start = Instant::now();
        while self.http.url.is_empty() {
            let log = self.logs();
            if let Some(addr) = log
                .lines()
                .find(|l| l.contains("API listening"))
                .and_then(|l| l.split("addr=").nth(1))
            {
                let addr: String = addr
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                self.http.url = format!("http://{addr}");
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "server did not start; log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(r) = self.try_call(Method::GET, "/health", None).await {
                if (200..300).contains(&r.status) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not become ready; log:\n{}", self.logs());
    }

    /// Everything the server processes wrote to stderr.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    /// Polls the request's JSON until `pred` holds; panics with its and the server's logs
    /// after `limit`.
    pub async fn wait_for(
        &self,
        uuid: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_until(uuid, limit, "condition not reached", pred)
            .await
    }

    /// Polls until the request is terminal; panics with the logs after `limit`.
    pub async fn wait_terminal(&self, uuid: &str, limit: Duration) -> Value {
        self.wait_terminal_as(&self.http, uuid, limit).await
    }

    /// [`Server::wait_terminal`], reading through `client` (one with a token, once
    /// authentication is on).
    pub async fn wait_terminal_as(&self, client: &Client, uuid: &str, limit: Duration) -> Value {
        self.wait_until_as(client, uuid, limit, "not finished", |r| {
            matches!(r["status"].as_str(), Some("done" | "failed" | "cancelled"))
        })
        .await
    }

    async fn wait_until(
        &self,
        uuid: &str,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_until_as(&self.http, uuid, limit, what, pred)
            .await
    }

    async fn wait_until_as(
        &self,
        client: &Client,
        uuid: &str,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let r = client.get(uuid).await;
            if pred(&r) {
                return r;
            }
            if start.elapsed() > limit {
                panic!(
                    "request {uuid} {what} after {limit:?}: {r}\nlogs: {}\nserver: {}",
                    client.fetch(&format!("/requests/{uuid}/logs")).await.text(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// QEMU processes started for this server (their argv names its run dir).
    pub fn qemu_processes(&self) -> Vec<i32> {
        qemu_processes_under(&self.run_dir)
    }

    /// Asserts that every QEMU of this server is gone within 10 s.
    pub async fn no_qemu_left(&self) {
        assert!(
            eventually(Duration::from_secs(10), || self.qemu_processes().is_empty()).await,
            "QEMU left behind: {:?}",
            self.qemu_processes()
        );
    }

    /// Kills the main process (SIGKILL) and starts it again on the same port, as a crashed and
    /// restarted service would be.
    pub async fn restart_hard(&mut self, mode: Mode) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let port = self.url.rsplit(':').next().unwrap().to_string();
        for (k, v) in self.env.iter_mut() {
            if k == "SQLITE_SIM_API_PORT" {
                *v = port.clone();
            }
        }
        self.spawn(mode);
        self.wait_ready().await;
    }

    /// PID of the main server process.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                eprintln!("server process had exited: {status}");
            }
        }
        if std::thread::panicking() {
            // The failing test's server log, for the CI output.
            eprintln!(
                "---- server log ----\n{}\n---- end of server log ----",
                self.logs()
            );
        }
        self.stop();
        if let Some((admin, name)) = self.pg_db.take() {
            pg_exec(
                &admin,
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            );
        }
    }
}

impl Server {
    /// A `SELECT COUNT(*) …` (or any single integer) straight from the store, on whichever
    /// engine the server runs.
    pub fn query_i64(&self, sql: &str) -> i64 {
        match &self.pg_db {
            Some((admin, name)) => {
                let sql = sql.to_string();
                with_pg(&with_dbname(admin, name), move |c| async move {
                    c.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0)
                })
            }
            None => rusqlite::Connection::open(&self.db)
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap(),
        }
    }
}

/// `url` (a `postgres://` URL) naming database `name` instead.
pub fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let path_at = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let mut out = format!("{}/{name}", &base[..path_at]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Runs one statement on the cluster at `url`, from any context.
pub fn pg_exec(url: &str, sql: &str) {
    let sql = sql.to_string();
    with_pg(url, move |c| async move {
        c.batch_execute(&sql).await.expect(&sql)
    })
}

/// `f` with a connection to the PostgreSQL server at `url`, from any context: a thread of its
/// own with its own runtime (Drop cannot await, and a test's runtime may be current-thread).
fn with_pg<T, F, Fut>(url: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let url = url.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connecting to the test cluster");
            tokio::spawn(conn);
            f(client).await
        })
    })
    .join()
    .unwrap()
}

/// A server process that is stopped (SIGTERM, then SIGKILL) when dropped, so a failing test
/// never leaves one behind.
pub struct Proc(pub Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// PIDs of live processes whose command line mentions `dir`.
pub fn qemu_processes_under(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            // Zombies have an empty cmdline, so this is a live process.
            pids.push(pid);
        }
    }
    pids
}

/// Waits up to `limit` for `f` to hold.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(p).unwrap();
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Sends `sig` to a child process and reaps it.
pub fn signal_and_wait(child: &mut Child, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
    let _ = child.wait();
}

/// A test process that is killed (a timeout, Ctrl-C) must not leave its servers, and their
/// VMs, running: they get SIGTERM when it dies and shut down as on a stop.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes an
    // async-signal-safe syscall (prctl); it allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
}

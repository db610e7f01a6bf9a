//! Hosts simulated with network namespaces, for `tests/netns.rs`: a bridge in a namespace of
//! its own, one namespace per host (PostgreSQL, the API, each agents host) joined to it by a
//! veth pair, and one veth from the test's (root) namespace, so the test reaches the API and
//! PostgreSQL over real TCP as any client would. Every name carries the test's pid and a
//! counter; [`Cluster`]'s `Drop` stops PostgreSQL, SIGKILLs whatever still runs in its
//! namespaces (QEMU included) and deletes them, on a panic too.
//!
//! Also a PostgreSQL wire-protocol [`Proxy`] that commits a transaction and then cuts the
//! connection before the client hears the answer (a lost `COMMIT`), or freezes every
//! connection at a `COMMIT`, leaving the server a session idle inside its transaction.

use crate::common::{self, Client, Proc};
use serde_json::Value;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_sqlite-sim");
/// PostgreSQL's port inside its namespace (namespaces have ports of their own, so this never
/// meets the shared test cluster on 55432).
pub const PG_PORT: u16 = 55440;
const API_PORT: u16 = 8000;

/// Runs `ip ARGS`; panics with its stderr if it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS`, its failure ignored (teardown of what may already be gone).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Why network namespaces cannot be used here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not running as root".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no `ip` (iproute2): {e}")),
    }
}

/// PIDs of the processes in namespace `ns`.
fn pids_in(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs everything in `ns` until nothing is left (a whole host crashing).
pub fn kill_all_in(ns: &str) {
    let start = Instant::now();
    loop {
        let pids = pids_in(ns);
        if pids.is_empty() {
            return;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "processes in {ns} survive SIGKILL: {:?}",
            pids_in(ns)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One simulated host: its id and namespace.
#[derive(Clone)]
pub struct Host {
    pub id: String,
    pub ns: String,
    pub labels: String,
    /// Its `SQLITE_SIM_DATABASE_URL` (PostgreSQL's address, or a proxy's).
    pub db_url: String,
}

pub struct Cluster {
    pub tag: String,
    pub dir: tempfile::TempDir,
    /// `10.77.N`: this cluster's /24.
    net: String,
    root_if: String,
    /// Every namespace made, the bridge's first.
    namespaces: Vec<String>,
    pg_ns: String,
    pg_dir: PathBuf,
    /// PostgreSQL as the test (root namespace) reaches it.
    pub pg_url: String,
    /// The address of the test's veth, where a [`Proxy`] can listen for the hosts.
    pub root_addr: String,
    pub hosts: Vec<Host>,
    procs: Vec<(String, Proc)>,
    api_ns: String,
    pub api: Client,
    config_dir: PathBuf,
    lease: String,
    api_db_url: String,
}

static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
static PG_TEMPLATE: OnceLock<PathBuf> = OnceLock::new();

/// A data directory `initdb` made once for this test process (`postgres.sh init`, trusting
/// clients on the listening subnets), which each cluster copies; removed when the process
/// exits.
fn pg_template() -> &'static Path {
    PG_TEMPLATE.get_or_init(|| {
        let dir = PathBuf::from(format!("/tmp/sqn-pgtpl-{}", std::process::id()));
        let out = Command::new(common::repo().join("scripts/postgres.sh"))
            .arg("init")
            .env("SQLITE_SIM_TEST_PG_DIR", &dir)
            .env("SQLITE_SIM_TEST_PG_LISTEN", "template")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "postgres.sh init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        remove_template_at_exit();
        dir
    })
}

#[allow(unsafe_code)]
fn remove_template_at_exit() {
    extern "C" fn remove() {
        if let Some(d) = PG_TEMPLATE.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    // SAFETY: registers a plain function, once; it runs at exit, after the tests, and only
    // removes a directory.
    unsafe {
        libc::atexit(remove);
    }
}

/// A /24 in 10.77.0.0/16 that no address of the root namespace is in.
fn free_net() -> String {
    let taken = ip(&["-o", "-4", "addr", "show"]);
    let seed = std::process::id() as usize + CLUSTERS.load(Ordering::Relaxed) * 7;
    for i in 0..250 {
        let n = format!("10.77.{}", (seed + i * 13) % 250 + 2);
        if !taken.contains(&format!("{n}.")) {
            return n;
        }
    }
    panic!("no free /24 in 10.77.0.0/16");
}

impl Cluster {
    /// The network, PostgreSQL in its namespace and the API in another; agents hosts are
    /// added with [`Cluster::add_host`]. `lease` is `SQLITE_SIM_AGENT_LEASE` for every
    /// process.
    pub async fn start(lease: &str) -> Cluster {
        Cluster::start_with(lease, false).await
    }

    /// [`Cluster::start`], keeping the shipped configs' `WARM` keys when `warm` (the agents
    /// build a template at start and restore clones from it).
    pub async fn start_with(lease: &str, warm: bool) -> Cluster {
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("sqn{}x{n}", std::process::id());
        assert!(tag.len() < 15, "interface name {tag}r too long");
        let dir = tempfile::Builder::new()
            .prefix("sqn")
            .tempdir_in("/tmp")
            .unwrap();
        let net = free_net();
        let mut c = Cluster {
            root_if: format!("{tag}r"),
            pg_ns: format!("{tag}-pg"),
            api_ns: format!("{tag}-api"),
            pg_dir: dir.path().join("pg"),
            pg_url: format!("postgres://postgres@{net}.1:{PG_PORT}/postgres"),
            root_addr: format!("{net}.254"),
            config_dir: dir.path().join("vm_configs"),
            api: Client::new(format!("http://{net}.2:{API_PORT}")),
            api_db_url: String::new(),
            lease: lease.to_string(),
            tag,
            dir,
            net,
            namespaces: Vec::new(),
            hosts: Vec::new(),
            procs: Vec::new(),
        };
        c.api_db_url = c.pg_url.clone();
        // The bridge: every host's veth and the test's meet there.
        let br = format!("{}-br", c.tag);
        ip(&["netns", "add", &br]);
        c.namespaces.push(br.clone());
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        ip(&[
            "link", "add", &c.root_if, "type", "veth", "peer", "name", "p-root", "netns", &br,
        ]);
        ip(&["-n", &br, "link", "set", "p-root", "master", "br0", "up"]);
        let root_cidr = format!("{}/24", c.root_addr);
        ip(&["addr", "add", &root_cidr, "dev", &c.root_if]);
        ip(&["link", "set", &c.root_if, "up"]);
        let (pg_ns, api_ns) = (c.pg_ns.clone(), c.api_ns.clone());
        c.add_ns(&pg_ns, "pg", 1);
        c.add_ns(&api_ns, "api", 2);

        // VM configs as tests/common's servers have them: the shipped ones, cold unless asked.
        std::fs::create_dir_all(&c.config_dir).unwrap();
        for e in std::fs::read_dir(common::repo().join("vm_configs")).unwrap() {
            let e = e.unwrap();
            let text: String = std::fs::read_to_string(e.path())
                .unwrap()
                .lines()
                .filter(|l| warm || !l.trim_start().starts_with("WARM"))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(c.config_dir.join(e.file_name()), text).unwrap();
        }
        c.start_pg();
        c
    }

    /// A namespace `ns` on the bridge as `{net}.{host}`, its veth `eth0`.
    fn add_ns(&mut self, ns: &str, short: &str, host: u8) -> String {
        let br = self.namespaces[0].clone();
        ip(&["netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        let port = format!("p-{short}");
        ip(&[
            "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"]);
        let addr = format!("{}.{host}", self.net);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        addr
    }

    fn pg_script(&self, what: &str) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.pg_ns])
            .arg(common::repo().join("scripts/postgres.sh"))
            .arg(what)
            .env("SQLITE_SIM_TEST_PG_PORT", PG_PORT.to_string())
            .env("SQLITE_SIM_TEST_PG_DIR", &self.pg_dir)
            .env("SQLITE_SIM_TEST_PG_LISTEN", format!("{}.1", self.net))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn start_pg(&self) {
        // A copy of this process's initdb'd template: initdb is most of a cluster's start.
        std::fs::create_dir_all(&self.pg_dir).unwrap();
        let copied = Command::new("cp")
            .arg("-a")
            .arg(pg_template().join("data"))
            .arg(self.pg_dir.join("data"))
            .status()
            .unwrap();
        assert!(copied.success(), "copying the PostgreSQL template");
        let out = self.pg_script("start");
        assert!(
            out.status.success(),
            "postgres.sh start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.pg_dir.join("log")).unwrap_or_default()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), self.pg_url);
    }

    /// PostgreSQL's `address:port`.
    pub fn pg_addr(&self) -> String {
        format!("{}.1:{PG_PORT}", self.net)
    }

    /// `pg_ctl restart` (fast: every session is ended) of the cluster in its namespace.
    pub fn restart_pg(&self) {
        let out = self.pg_script("restart");
        assert!(
            out.status.success(),
            "postgres.sh restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Where the API process reaches PostgreSQL (call before [`Cluster::start_api`]).
    pub fn api_via(&mut self, url: String) {
        self.api_db_url = url;
    }

    fn base_env(&self, db_url: &str) -> Vec<(String, String)> {
        let d = self.dir.path();
        [
            ("SQLITE_SIM_DATABASE_URL", db_url.to_string()),
            (
                "SQLITE_SIM_DB_PATH",
                d.join("unused.db").display().to_string(),
            ),
            (
                "SQLITE_SIM_VM_CONFIG_DIR",
                self.config_dir.display().to_string(),
            ),
            (
                "SQLITE_SIM_VM_IMAGES_DIR",
                common::repo().join("vm_images").display().to_string(),
            ),
            ("SQLITE_SIM_ACCEL", "tcg".into()),
            ("SQLITE_SIM_AGENT_LEASE", self.lease.clone()),
            ("SQLITE_SIM_AGENT_POLL_INTERVAL", "1".into()),
            ("SQLITE_SIM_LOG_LEVEL", "DEBUG".into()),
            // What these cases check is recovery's own outcome (`failed` / `agent lost`), as
            // the harness's other servers do; `tests/retries.rs` covers re-queues.
            ("SQLITE_SIM_DEFAULT_RETRIES", "0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Starts `sqlite-sim SUB` in namespace `ns`, its stderr in `NAME.log`. `ip netns exec`
    /// execs the binary in place, so the child is the server itself: its own process group,
    /// SIGTERM when the test dies.
    fn spawn(&mut self, ns: &str, name: &str, sub: &str, env: Vec<(String, String)>) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, BIN, sub])
            .current_dir(self.dir.path())
            .envs(env)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        common::die_with_parent(&mut cmd);
        let child = cmd.spawn().unwrap();
        self.procs.push((name.to_string(), Proc(child)));
    }

    pub async fn start_api(&mut self) {
        let mut env = self.base_env(&self.api_db_url.clone());
        env.push(("SQLITE_SIM_API_HOST".into(), "0.0.0.0".into()));
        env.push(("SQLITE_SIM_API_PORT".into(), API_PORT.to_string()));
        let ns = self.api_ns.clone();
        self.spawn(&ns, "api", "api", env);
        let start = Instant::now();
        loop {
            if let Ok(r) = self
                .api
                .try_call(common::Method::GET, "/health", None)
                .await
            {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the API did not answer from its namespace\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The usual opening of a case: PostgreSQL, the API, and agents hosts `hosts` (id,
    /// labels), each started and live.
    pub async fn with_hosts(lease: &str, warm: bool, hosts: &[(&str, &str)]) -> Cluster {
        let mut c = Cluster::start_with(lease, warm).await;
        c.start_api().await;
        c.add_hosts(hosts);
        c.start_every_host().await;
        c
    }

    /// [`Cluster::add_host`] for each (id, labels).
    pub fn add_hosts(&mut self, hosts: &[(&str, &str)]) {
        for (id, labels) in hosts {
            self.add_host(id, labels);
        }
    }

    /// Starts every added host's agents and waits until all are live.
    pub async fn start_every_host(&mut self) {
        let mut ids: Vec<String> = self.hosts.iter().map(|h| h.id.clone()).collect();
        ids.sort();
        for id in &ids {
            self.start_agents(id);
        }
        let ids: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
        self.wait_live(&ids).await;
    }

    /// A new host namespace for agents host `id` with `labels` (not started yet).
    pub fn add_host(&mut self, id: &str, labels: &str) -> Host {
        let i = self.hosts.len();
        let ns = format!("{}-h{i}", self.tag);
        self.add_ns(&ns, &format!("h{i}"), 11 + i as u8);
        let h = Host {
            id: id.to_string(),
            ns,
            labels: labels.to_string(),
            db_url: self.pg_url.clone(),
        };
        self.hosts.push(h.clone());
        h
    }

    pub fn host(&self, id: &str) -> &Host {
        self.hosts.iter().find(|h| h.id == id).expect("known host")
    }

    /// Points host `id`'s agents at `url` (a proxy) from their next start.
    pub fn host_via(&mut self, id: &str, url: String) {
        let h = self.hosts.iter_mut().find(|h| h.id == id).unwrap();
        h.db_url = url;
    }

    /// The run directory of host `id`.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("run-{id}"))
    }

    /// Starts (again) an agents process on host `id`: one agent, one VM slot.
    pub fn start_agents(&mut self, id: &str) {
        let h = self.host(id).clone();
        let mut env = self.base_env(&h.db_url);
        env.extend(
            [
                ("SQLITE_SIM_HOST_ID", h.id.clone()),
                ("SQLITE_SIM_RUN_DIR", self.run_dir(id).display().to_string()),
                ("SQLITE_SIM_AGENT_LABELS", h.labels.clone()),
                ("SQLITE_SIM_AGENT_COUNT", "1".into()),
                ("SQLITE_SIM_MAX_CONCURRENT_VMS", "1".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
        );
        self.spawn(&h.ns, &format!("agents-{id}"), "agents", env);
    }

    /// The whole host `id` crashes: every process in its namespace (QEMU too) SIGKILLed.
    pub fn crash_host(&mut self, id: &str) {
        let ns = self.host(id).ns.clone();
        kill_all_in(&ns);
        let name = format!("agents-{id}");
        for (n, p) in &mut self.procs {
            if *n == name {
                let _ = p.wait();
            }
        }
        self.procs.retain(|(n, _)| *n != name);
    }

    /// Takes host `id`'s link down or up (`ip link set eth0 down|up` in its namespace).
    pub fn set_link(&self, id: &str, up: bool) {
        let ns = &self.host(id).ns;
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ]);
    }

    /// Live QEMU processes of host `id` (their argv names its run directory).
    pub fn qemu_of(&self, id: &str) -> Vec<i32> {
        common::qemu_processes_under(&self.run_dir(id))
    }

    /// The stderr of process `name` (`api`, `agents-ID`).
    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Every process's stderr.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                out.push_str(&format!("==== {} ====\n", e.path().display()));
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    /// Waits until `GET /hosts` shows exactly these hosts live.
    pub async fn wait_live(&self, ids: &[&str]) -> Vec<Value> {
        self.api
            .wait_live(ids, Duration::from_secs(60), || self.logs())
            .await
    }

    /// Polls until request `id` is terminal.
    pub async fn wait_terminal(&self, id: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let r = self.api.get(id).await;
            if matches!(r["status"].as_str(), Some("done" | "failed" | "cancelled")) {
                return r;
            }
            assert!(
                start.elapsed() < limit,
                "request {id} not finished after {limit:?}: {r}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Tears everything down and checks that nothing is left: no QEMU of this test, no
    /// namespace, no interface, no process in them.
    pub fn close(self) {
        let dir = self.dir.path().to_path_buf();
        let (tag, root_if) = (self.tag.clone(), self.root_if.clone());
        drop(self);
        assert!(
            common::qemu_processes_under(&dir).is_empty(),
            "QEMU left behind"
        );
        let left = ip(&["netns", "list"]);
        assert!(!left.contains(&tag), "namespaces left: {left}");
        let start = Instant::now();
        // Deleting the bridge's namespace takes its veth pairs, the test's end too, with it
        // (the kernel finishes that asynchronously).
        while Path::new(&format!("/sys/class/net/{root_if}")).exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "interface {root_if} left"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!dir.exists(), "{} left", dir.display());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- cluster {} logs ----\n{}\n---- postgres ----\n{}\n---- end ----",
                self.tag,
                self.logs(),
                std::fs::read_to_string(self.pg_dir.join("log")).unwrap_or_default()
            );
        }
        // The servers first (QEMU dies with its agents, and is in their namespace anyway),
        // then PostgreSQL cleanly, then whatever is left, then the namespaces.
        for ns in self.namespaces.iter().filter(|n| **n != self.pg_ns) {
            kill_all_in(ns);
        }
        self.procs.clear();
        if self.pg_dir.join("data/PG_VERSION").exists() {
            let _ = self.pg_script("stop");
        }
        kill_all_in(&self.pg_ns);
        for ns in self.namespaces.iter().rev() {
            ip_quiet(&["netns", "del", ns]);
        }
        ip_quiet(&["link", "del", &self.root_if]);
    }
}

/// Which transaction a [`Proxy`] loses the `COMMIT` answer of, told by the SQL the client sent
/// since its `BEGIN` (or, for a statement sent outside one, by that statement: its implicit
/// commit's answer is lost at its Sync).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lost {
    /// `POST /requests`' insert (the API's connection).
    Create,
    /// A claim that took a request (it sends `NOTIFY`; an empty claim does not).
    Claim,
    MarkRunning,
    /// A batch of log lines.
    Logs,
    Finish,
}

impl Lost {
    fn matches(self, tx: &str) -> bool {
        match self {
            Lost::Create => tx.contains("INSERT INTO requests"),
            Lost::Claim => tx.contains("SET status = 'acknowledged'") && tx.contains("NOTIFY"),
            Lost::MarkRunning => tx.contains("SET status = 'running'"),
            Lost::Logs => tx.contains("INSERT INTO work_log"),
            Lost::Finish => tx.contains("exit_code = $2"),
        }
    }
}

#[derive(Default)]
struct ProxyState {
    armed: Vec<Lost>,
    lost: Vec<Lost>,
    /// Kinds whose `COMMIT` freezes every connection instead (see [`Proxy::freeze_at`]).
    freeze_at: Vec<Lost>,
    frozen: bool,
    /// A `COMMIT` held while frozen.
    held: Option<Lost>,
}

/// A TCP proxy in front of PostgreSQL that follows the wire protocol from client to server.
/// When an armed kind of transaction sends `COMMIT`, the proxy forwards it, waits for the
/// server's answer (so the transaction did commit), swallows that answer and closes both
/// connections: the client never learns that its `COMMIT` succeeded.
pub struct Proxy {
    pub url: String,
    state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Listens on `addr` (port chosen by the kernel), forwarding to `upstream` (`host:port`).
    pub async fn start(addr: &str, upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind((addr, 0)).await.unwrap();
        let url = format!(
            "postgres://postgres@{addr}:{}/postgres?sslmode=disable",
            listener.local_addr().unwrap().port()
        );
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (st, upstream) = (st.clone(), upstream.clone());
                tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(&upstream).await {
                        relay(client, server, st).await;
                    }
                });
            }
        });
        Proxy { url, state, task }
    }

    /// Loses the answer to the next `COMMIT` of each of `kinds` (once each).
    pub fn arm(&self, kinds: &[Lost]) {
        self.state.lock().unwrap().armed.extend_from_slice(kinds);
    }

    /// At the next `COMMIT` of `kind`, the proxy holds it and stops passing bytes on every
    /// connection, in both directions, without closing any: the host behind it is cut off
    /// with that transaction open (its row locks held by the server) until [`Proxy::thaw`].
    pub fn freeze_at(&self, kind: Lost) {
        self.state.lock().unwrap().freeze_at.push(kind);
    }

    /// The kind whose `COMMIT` froze the proxy, once it has.
    pub fn held(&self) -> Option<Lost> {
        self.state.lock().unwrap().held
    }

    /// Passes bytes again, the held `COMMIT` first (as TCP would after a cut heals).
    pub fn thaw(&self) {
        self.state.lock().unwrap().frozen = false;
    }

    /// The kinds whose `COMMIT` was committed and its answer lost, in order.
    pub fn lost(&self) -> Vec<Lost> {
        self.state.lock().unwrap().lost.clone()
    }
}

/// Waits while the proxy is frozen.
async fn while_frozen(state: &Mutex<ProxyState>) {
    while state.lock().unwrap().frozen {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The string of a NUL-terminated field.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    state: Arc<Mutex<ProxyState>>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let swallow = AtomicBool::new(false);
    let mut dropped: Option<Lost> = None;
    // Client to server, message by message: the startup message has no type byte; then
    // `Q` (simple query: BEGIN, NOTIFY, COMMIT) and `P` (parse: every other statement).
    let c2s = async {
        let (mut buf, mut startup, mut tx) = (Vec::<u8>::new(), true, String::new());
        let (mut in_tx, mut autocommit) = (false, None::<Lost>);
        let mut chunk = [0u8; 16384];
        loop {
            let n = cr.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            loop {
                let head = if startup { 4 } else { 5 };
                if buf.len() < head {
                    break;
                }
                let at = head - 4;
                let len = u32::from_be_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let total = at + len;
                if buf.len() < total {
                    break;
                }
                let msg: Vec<u8> = buf.drain(..total).collect();
                if startup {
                    startup = false;
                } else {
                    let body = &msg[5..];
                    match msg[0] {
                        b'Q' => {
                            let q = cstr(body);
                            if q == "BEGIN" || q == "ROLLBACK" {
                                in_tx = q == "BEGIN";
                                tx.clear();
                            } else if q == "COMMIT" {
                                in_tx = false;
                                {
                                    let mut s = state.lock().unwrap();
                                    if let Some(i) = s.freeze_at.iter().position(|k| k.matches(&tx))
                                    {
                                        let k = s.freeze_at.remove(i);
                                        s.frozen = true;
                                        s.held = Some(k);
                                    }
                                }
                                let hit = {
                                    let mut s = state.lock().unwrap();
                                    let i = s.armed.iter().position(|k| k.matches(&tx));
                                    i.map(|i| s.armed.remove(i))
                                };
                                if let Some(k) = hit {
                                    dropped = Some(k);
                                    swallow.store(true, Ordering::SeqCst);
                                    let _ = sw.write_all(&msg).await;
                                    // The answer is the server-to-client side's business.
                                    std::future::pending::<()>().await;
                                }
                                tx.clear();
                            } else {
                                tx.push_str(&q);
                                tx.push('\n');
                            }
                        }
                        b'P' => {
                            let mut fields = body.splitn(2, |&c| c == 0);
                            fields.next();
                            let sql = cstr(fields.next().unwrap_or_default());
                            // A statement outside `BEGIN` commits on its own at the next Sync
                            // (a new request is one such statement): its answer is lost there.
                            if !in_tx && autocommit.is_none() {
                                let mut s = state.lock().unwrap();
                                if let Some(i) = s.armed.iter().position(|k| k.matches(&sql)) {
                                    autocommit = Some(s.armed.remove(i));
                                }
                            }
                            tx.push_str(&sql);
                            tx.push('\n');
                        }
                        b'S' => {
                            if let Some(k) = autocommit.take() {
                                dropped = Some(k);
                                swallow.store(true, Ordering::SeqCst);
                                let _ = sw.write_all(&msg).await;
                                std::future::pending::<()>().await;
                            }
                        }
                        _ => {}
                    }
                }
                while_frozen(&state).await;
                if sw.write_all(&msg).await.is_err() {
                    return;
                }
            }
        }
    };
    // Server to client, as it comes; once a COMMIT is to be lost, everything the server says
    // is its answer to it: its arrival proves the commit, and it is not passed on.
    let s2c = async {
        let mut chunk = [0u8; 16384];
        loop {
            let n = sr.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return false;
            }
            if swallow.load(Ordering::SeqCst) {
                return true;
            }
            while_frozen(&state).await;
            if cw.write_all(&chunk[..n]).await.is_err() {
                return false;
            }
        }
    };
    let committed = tokio::select! {
        _ = c2s => false,
        c = s2c => c,
    };
    if committed {
        let k = dropped.expect("a COMMIT was held");
        state.lock().unwrap().lost.push(k);
    }
    // Both connections close as the halves drop.
}

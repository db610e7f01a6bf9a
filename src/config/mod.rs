//! Settings: the `SQLITE_SIM_*` environment variables (plus an optional `.env`), and the
//! per-VM `vm_configs/NAME.conf` files (see [`vm`]).
//!
//! Every value is validated when the process starts; an invalid one is an error naming the variable.

pub mod kv;
pub mod vm;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{var}: {message}")]
    Invalid { var: &'static str, message: String },
    #[error("{path}: {source}")]
    EnvFile { path: PathBuf, source: kv::KvError },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where a probe shows it really runs a guest on this host, TCG otherwise
    /// ([`crate::qemu::accel`]).
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Some(Accel::Auto),
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The effective settings of this process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub db_path: PathBuf,
    /// PostgreSQL instead of SQLite at `db_path` (`postgres://…`); `None`: SQLite.
    pub database_url: Option<String>,
    pub api_host: IpAddr,
    pub api_port: u16,
    pub api_workers: usize,
    pub agent_count: usize,
    pub agent_poll_interval: Duration,
    pub vm_images_dir: PathBuf,
    pub vm_config_dir: PathBuf,
    pub max_concurrent_vms: usize,
    pub default_timeout: u32,
    pub max_timeout: u32,
    /// Largest `keep_on_failure` a submission may ask for, in seconds.
    pub max_keep: u32,
    /// `retries` of a submission that gives none: re-queues after infrastructure failures.
    pub default_retries: u32,
    /// Highest `priority` a submitter token may ask for (operators and admins, and every
    /// caller while authentication is off, may use the whole range).
    pub max_submitter_priority: i32,
    pub enable_cors: bool,
    pub allowed_origins: Vec<String>,
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    pub accel: Accel,
    pub run_dir: PathBuf,
    pub qemu_binary: PathBuf,
    /// The KVM device `auto` probes (`/dev/kvm`).
    pub kvm_device: PathBuf,
    /// This host's name among the hosts sharing the store (default: the hostname).
    pub host_id: String,
    /// Most bytes of files one submission may carry into its guest.
    pub max_upload: u64,
    /// Most bytes of artifacts stored for one request.
    pub max_artifacts: u64,
    /// Keep a failed run's directory (overlay, sockets, QEMU stderr) for inspection.
    pub keep_failed_runs: bool,
    /// How long a cancelled VM gets to power off through ACPI before `quit`.
    pub cancel_grace: Duration,
    /// When set, every endpoint but `/health` requires `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// How long a claim stays valid without a heartbeat (heartbeats come every third of it).
    /// An agent that dies loses its requests after this long.
    pub agent_lease: Duration,
    /// The dashboard's built bundle, served at `/ui/` (see [`crate::ui`]).
    pub ui_dir: PathBuf,
    /// Labels this host's agents advertise besides the automatic `accel:*` and `vm:*`.
    pub agent_labels: Vec<crate::model::Label>,
    /// How often a process checks whether another one committed (`PRAGMA data_version`), to
    /// wake its agents and log streams at once.
    pub change_check_interval: Duration,
    /// SQLite: commit concurrent small writes together, in one transaction of the store's
    /// writer thread (`SQLITE_SIM_GROUP_COMMIT`, default on; off is figure 6's baseline).
    pub group_commit: bool,
    /// How long `api`, `agents` and `all` keep retrying to reach PostgreSQL at start-up
    /// (`SQLITE_SIM_DATABASE_WAIT`, default 60 s; zero fails at once).
    pub database_wait: Duration,
    /// `SQLITE_SIM_WEBHOOK_*`: where and how request events are POSTed (see [`crate::webhooks`]).
    pub webhooks: crate::webhooks::WebhookSettings,
}

/// Longest run-dir path that still leaves room for `/<uuid>/console.sock` within the
/// 107-byte limit of a unix socket path.
const MAX_RUN_DIR_LEN: usize = 60;

impl Settings {
    /// Reads the process environment, falling back to `./.env` for unset variables.
    pub fn load() -> Result<Self, ConfigError> {
        let dotenv = load_env_file(Path::new(".env"))?;
        Self::from_lookup(|k| std::env::var(k).ok().or_else(|| dotenv.get(k).cloned()))
    }

    /// Builds settings from any lookup function (the environment in production, a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let v = Vars { get: &get };
        let default_timeout = v.num("SQLITE_SIM_DEFAULT_TIMEOUT", 300u32, 1, u32::MAX)?;
        let max_timeout = v.num("SQLITE_SIM_MAX_TIMEOUT", 3600u32, 1, u32::MAX)?;
        if default_timeout > max_timeout {
            return Err(ConfigError::Invalid {
                var: "SQLITE_SIM_DEFAULT_TIMEOUT",
                message: format!(
                    "{default_timeout} exceeds SQLITE_SIM_MAX_TIMEOUT ({max_timeout})"
                ),
            });
        }
        let run_dir = v.path("SQLITE_SIM_RUN_DIR", default_run_dir());
        if run_dir.as_os_str().len() > MAX_RUN_DIR_LEN {
            return Err(ConfigError::Invalid {
                var: "SQLITE_SIM_RUN_DIR",
                message: format!(
                    "{} is longer than {MAX_RUN_DIR_LEN} bytes; unix socket paths inside it would \
                     exceed the kernel's 107-byte limit",
                    run_dir.display()
                ),
            });
        }
        let log_level = v.string("SQLITE_SIM_LOG_LEVEL", "INFO");
        if !["TRACE", "DEBUG", "INFO", "WARN", "WARNING", "ERROR"]
            .contains(&log_level.to_ascii_uppercase().as_str())
        {
            return Err(ConfigError::Invalid {
                var: "SQLITE_SIM_LOG_LEVEL",
                message: format!("{log_level:?} is not one of TRACE, DEBUG, INFO, WARN, ERROR"),
            });
        }
        let database_url = v.raw("SQLITE_SIM_DATABASE_URL");
        if let Some(url) = &database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::Invalid {
                    var: "SQLITE_SIM_DATABASE_URL",
                    message: format!(
                        "{:?} does not start with postgres:// or postgresql://",
                        redact_url(url)
                    ),
                });
            }
        }
        let webhooks = crate::webhooks::WebhookSettings {
            url: v.raw("SQLITE_SIM_WEBHOOK_URL"),
            secret: v.raw("SQLITE_SIM_WEBHOOK_SECRET"),
            allow: crate::webhooks::AllowList::parse(&v.string("SQLITE_SIM_WEBHOOK_ALLOW", ""))
                .map_err(|message| ConfigError::Invalid {
                    var: "SQLITE_SIM_WEBHOOK_ALLOW",
                    message,
                })?,
            timeout: v.seconds("SQLITE_SIM_WEBHOOK_TIMEOUT", 10.0)?,
            retry_for: Duration::from_secs(v.num(
                "SQLITE_SIM_WEBHOOK_RETRY_FOR",
                3600u64,
                1,
                7 * 24 * 3600,
            )?),
        };
        webhooks
            .validate()
            .map_err(|(var, message)| ConfigError::Invalid { var, message })?;
        Ok(Settings {
            webhooks,
            db_path: v.path("SQLITE_SIM_DB_PATH", "./simulation.db".into()),
            database_url,
            api_host: v.parse("SQLITE_SIM_API_HOST", "127.0.0.1", "an IP address")?,
            api_port: v.num("SQLITE_SIM_API_PORT", 8000u16, 0, u16::MAX)?,
            api_workers: v.num("SQLITE_SIM_API_WORKERS", 1usize, 1, 256)?,
            agent_count: v.num("SQLITE_SIM_AGENT_COUNT", 2usize, 1, 256)?,
            agent_poll_interval: v.seconds("SQLITE_SIM_AGENT_POLL_INTERVAL", 5.0)?,
            vm_images_dir: v.path("SQLITE_SIM_VM_IMAGES_DIR", "./vm_images".into()),
            vm_config_dir: v.path("SQLITE_SIM_VM_CONFIG_DIR", "./vm_configs".into()),
            max_concurrent_vms: v.num("SQLITE_SIM_MAX_CONCURRENT_VMS", 10usize, 1, 1024)?,
            default_timeout,
            max_timeout,
            max_keep: v.num("SQLITE_SIM_MAX_KEEP", 3600u32, 1, u32::MAX)?,
            default_retries: v.num(
                "SQLITE_SIM_DEFAULT_RETRIES",
                1u32,
                0,
                crate::model::MAX_RETRIES,
            )?,
            max_submitter_priority: v.num(
                "SQLITE_SIM_MAX_SUBMITTER_PRIORITY",
                0i32,
                crate::model::MIN_PRIORITY,
                crate::model::MAX_PRIORITY,
            )?,
            enable_cors: v.boolean("SQLITE_SIM_ENABLE_CORS", false)?,
            allowed_origins: v
                .string("SQLITE_SIM_ALLOWED_ORIGINS", "*")
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            log_level,
            log_file: (get)("SQLITE_SIM_LOG_FILE")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            accel: {
                let s = v.string("SQLITE_SIM_ACCEL", "auto");
                Accel::parse(&s).ok_or_else(|| ConfigError::Invalid {
                    var: "SQLITE_SIM_ACCEL",
                    message: format!("{s:?} is not one of auto, kvm, tcg"),
                })?
            },
            run_dir,
            qemu_binary: v.path("SQLITE_SIM_QEMU_BINARY", "qemu-system-x86_64".into()),
            kvm_device: v.path("SQLITE_SIM_KVM_DEVICE", "/dev/kvm".into()),
            max_upload: v.size("SQLITE_SIM_MAX_UPLOAD", 256 << 20)?,
            max_artifacts: v.size("SQLITE_SIM_MAX_ARTIFACTS", 256 << 20)?,
            host_id: {
                let id = v.string("SQLITE_SIM_HOST_ID", &default_host_id());
                if !crate::config::vm::is_valid_vm_name(&id) {
                    return Err(ConfigError::Invalid {
                        var: "SQLITE_SIM_HOST_ID",
                        message: format!(
                            "{id:?} is not 1-64 letters, digits, '.', '_' or '-', starting with a \
                             letter or digit"
                        ),
                    });
                }
                id
            },
            keep_failed_runs: v.boolean("SQLITE_SIM_KEEP_FAILED_RUNS", false)?,
            cancel_grace: v.seconds("SQLITE_SIM_CANCEL_GRACE", 3.0)?,
            api_token: v.raw("SQLITE_SIM_API_TOKEN"),
            agent_lease: v.seconds("SQLITE_SIM_AGENT_LEASE", 30.0)?,
            ui_dir: match (get)("SQLITE_SIM_UI_DIR").filter(|s| !s.is_empty()) {
                Some(d) => PathBuf::from(d),
                None => crate::ui::default_dir(),
            },
            agent_labels: parse_labels(&v.string("SQLITE_SIM_AGENT_LABELS", ""))?,
            change_check_interval: v.seconds("SQLITE_SIM_CHANGE_CHECK_INTERVAL", 0.015)?,
            group_commit: v.boolean("SQLITE_SIM_GROUP_COMMIT", true)?,
            database_wait: v.seconds_from("SQLITE_SIM_DATABASE_WAIT", 60.0, 0.0)?,
        })
    }

    /// Where the store is, for messages: the SQLite file, or the PostgreSQL URL (redacted).
    pub fn store_location(&self) -> String {
        match &self.database_url {
            Some(url) => redact_url(url),
            None => self.db_path.display().to_string(),
        }
    }

    /// `(name, value)` pairs for `sqlite-sim config`.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let p = |p: &Path| p.display().to_string();
        vec![
            ("SQLITE_SIM_DB_PATH", p(&self.db_path)),
            (
                "SQLITE_SIM_DATABASE_URL",
                self.database_url
                    .as_deref()
                    .map(redact_url)
                    .unwrap_or_default(),
            ),
            ("SQLITE_SIM_API_HOST", self.api_host.to_string()),
            ("SQLITE_SIM_API_PORT", self.api_port.to_string()),
            ("SQLITE_SIM_API_WORKERS", self.api_workers.to_string()),
            ("SQLITE_SIM_AGENT_COUNT", self.agent_count.to_string()),
            (
                "SQLITE_SIM_AGENT_POLL_INTERVAL",
                format!("{}", self.agent_poll_interval.as_secs_f64()),
            ),
            ("SQLITE_SIM_VM_IMAGES_DIR", p(&self.vm_images_dir)),
            ("SQLITE_SIM_VM_CONFIG_DIR", p(&self.vm_config_dir)),
            (
                "SQLITE_SIM_MAX_CONCURRENT_VMS",
                self.max_concurrent_vms.to_string(),
            ),
            (
                "SQLITE_SIM_DEFAULT_TIMEOUT",
                self.default_timeout.to_string(),
            ),
            ("SQLITE_SIM_MAX_TIMEOUT", self.max_timeout.to_string()),
            ("SQLITE_SIM_MAX_KEEP", self.max_keep.to_string()),
            (
                "SQLITE_SIM_DEFAULT_RETRIES",
                self.default_retries.to_string(),
            ),
            (
                "SQLITE_SIM_MAX_SUBMITTER_PRIORITY",
                self.max_submitter_priority.to_string(),
            ),
            ("SQLITE_SIM_ENABLE_CORS", self.enable_cors.to_string()),
            ("SQLITE_SIM_ALLOWED_ORIGINS", self.allowed_origins.join(",")),
            ("SQLITE_SIM_LOG_LEVEL", self.log_level.clone()),
            (
                "SQLITE_SIM_LOG_FILE",
                self.log_file.as_deref().map(p).unwrap_or_default(),
            ),
            ("SQLITE_SIM_ACCEL", self.accel.as_str().to_string()),
            ("SQLITE_SIM_RUN_DIR", p(&self.run_dir)),
            ("SQLITE_SIM_QEMU_BINARY", p(&self.qemu_binary)),
            ("SQLITE_SIM_KVM_DEVICE", p(&self.kvm_device)),
            ("SQLITE_SIM_HOST_ID", self.host_id.clone()),
            ("SQLITE_SIM_MAX_UPLOAD", self.max_upload.to_string()),
            ("SQLITE_SIM_MAX_ARTIFACTS", self.max_artifacts.to_string()),
            (
                "SQLITE_SIM_KEEP_FAILED_RUNS",
                self.keep_failed_runs.to_string(),
            ),
            (
                "SQLITE_SIM_CANCEL_GRACE",
                format!("{}", self.cancel_grace.as_secs_f64()),
            ),
            (
                "SQLITE_SIM_AGENT_LEASE",
                format!("{}", self.agent_lease.as_secs_f64()),
            ),
            ("SQLITE_SIM_UI_DIR", p(&self.ui_dir)),
            (
                "SQLITE_SIM_AGENT_LABELS",
                self.agent_labels
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "SQLITE_SIM_CHANGE_CHECK_INTERVAL",
                format!("{}", self.change_check_interval.as_secs_f64()),
            ),
            ("SQLITE_SIM_GROUP_COMMIT", self.group_commit.to_string()),
            (
                "SQLITE_SIM_DATABASE_WAIT",
                format!("{}", self.database_wait.as_secs_f64()),
            ),
            (
                "SQLITE_SIM_WEBHOOK_URL",
                self.webhooks.url.clone().unwrap_or_default(),
            ),
            (
                "SQLITE_SIM_WEBHOOK_SECRET",
                match &self.webhooks.secret {
                    Some(_) => "<set, redacted>".into(),
                    None => String::new(),
                },
            ),
            (
                "SQLITE_SIM_WEBHOOK_ALLOW",
                self.webhooks.allow.as_str().to_string(),
            ),
            (
                "SQLITE_SIM_WEBHOOK_TIMEOUT",
                format!("{}", self.webhooks.timeout.as_secs_f64()),
            ),
            (
                "SQLITE_SIM_WEBHOOK_RETRY_FOR",
                self.webhooks.retry_for.as_secs().to_string(),
            ),
            (
                "SQLITE_SIM_API_TOKEN",
                match &self.api_token {
                    Some(_) => "<set, redacted>".into(),
                    None => String::new(),
                },
            ),
        ]
    }
}

/// A database URL with its password (if any) replaced, for display.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // userinfo ends at the last '@' before the path; a password follows its first ':'.
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let url = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>{}", &rest[at..]),
        None => url.to_string(),
    };
    // libpq also takes `?password=…` among the parameters.
    match url.find("password=") {
        Some(i) => {
            let end = url[i..].find('&').map_or(url.len(), |e| i + e);
            format!("{}password=<redacted>{}", &url[..i], &url[end..])
        }
        None => url,
    }
}

/// `kvm,big`: comma-separated labels, each like a VM name (no `:`, which the automatic
/// `accel:` and `vm:` labels use), sorted and without duplicates.
fn parse_labels(s: &str) -> Result<Vec<crate::model::Label>, ConfigError> {
    let mut out = Vec::new();
    for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        if !crate::config::vm::is_valid_vm_name(word) {
            return Err(ConfigError::Invalid {
                var: "SQLITE_SIM_AGENT_LABELS",
                message: format!(
                    "{word:?} is not 1-64 letters, digits, '.', '_' or '-', starting with a \
                     letter or digit"
                ),
            });
        }
        out.push(word.parse().expect("a VM-name-like word is a label"));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The hostname, cut to what a host id may hold (`host` if it has none usable).
fn default_host_id() -> String {
    let name = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if crate::config::vm::is_valid_vm_name(&id) {
        id
    } else {
        "host".into()
    }
}

fn default_run_dir() -> PathBuf {
    let uid = nix::unistd::getuid();
    PathBuf::from(format!("/tmp/sqlite-sim-{uid}"))
}

/// Reads `.env` if it exists; a missing file is not an error, a malformed one is.
pub fn load_env_file(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => kv::parse(&text)
            .map(|pairs| pairs.into_iter().collect())
            .map_err(|source| ConfigError::EnvFile {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(source) => Err(ConfigError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Typed access to the variables, each error naming its variable.
struct Vars<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
}

impl Vars<'_> {
    fn raw(&self, var: &str) -> Option<String> {
        (self.get)(var)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.raw(var).unwrap_or_else(|| default.to_string())
    }

    fn path(&self, var: &str, default: PathBuf) -> PathBuf {
        self.raw(var).map(PathBuf::from).unwrap_or(default)
    }

    fn parse<T: std::str::FromStr>(
        &self,
        var: &'static str,
        default: &str,
        what: &str,
    ) -> Result<T, ConfigError> {
        let s = self.string(var, default);
        s.parse().map_err(|_| ConfigError::Invalid {
            var,
            message: format!("{s:?} is not {what}"),
        })
    }

    fn num<T>(&self, var: &'static str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let Some(s) = self.raw(var) else {
            return Ok(default);
        };
        match s.parse::<T>() {
            Ok(n) if n >= min && n <= max => Ok(n),
            _ => Err(ConfigError::Invalid {
                var,
                message: format!("{s:?} is not a whole number from {min} to {max}"),
            }),
        }
    }

    fn seconds(&self, var: &'static str, default: f64) -> Result<Duration, ConfigError> {
        self.seconds_from(var, default, 0.01)
    }

    /// [`Self::seconds`] from `min` (zero allowed where zero means "not at all").
    fn seconds_from(
        &self,
        var: &'static str,
        default: f64,
        min: f64,
    ) -> Result<Duration, ConfigError> {
        let Some(s) = self.raw(var) else {
            return Ok(Duration::from_secs_f64(default));
        };
        match s.parse::<f64>() {
            Ok(n) if n.is_finite() && (min..=3600.0).contains(&n) => Ok(Duration::from_secs_f64(n)),
            _ => Err(ConfigError::Invalid {
                var,
                message: format!("{s:?} is not a number of seconds from {min} to 3600"),
            }),
        }
    }

    /// Bytes: a whole number with an optional K, M or G (powers of 1024), e.g. `256M`.
    fn size(&self, var: &'static str, default: u64) -> Result<u64, ConfigError> {
        let Some(s) = self.raw(var) else {
            return Ok(default);
        };
        let (digits, mult) = match s.trim_end_matches(['B', 'b', 'i']).char_indices().last() {
            Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
            Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
            Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
            _ => (s.as_str(), 1),
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .filter(|n| *n > 0)
            .ok_or_else(|| ConfigError::Invalid {
                var,
                message: format!("{s:?} is not a size in bytes like 256M or 1G"),
            })
    }

    fn boolean(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        let Some(s) = self.raw(var) else {
            return Ok(default);
        };
        match s.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::Invalid {
                var,
                message: format!("{s:?} is not true or false"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_seed_except_the_bind_address() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.db_path, PathBuf::from("./simulation.db"));
        assert_eq!(s.api_host.to_string(), "127.0.0.1");
        assert_eq!(s.api_port, 8000);
        assert_eq!(s.agent_count, 2);
        assert_eq!(s.agent_poll_interval, Duration::from_secs(5));
        assert_eq!(s.max_concurrent_vms, 10);
        assert_eq!((s.default_timeout, s.max_timeout), (300, 3600));
        assert_eq!(s.default_retries, 1);
        assert!(!s.enable_cors);
        assert_eq!(s.allowed_origins, vec!["*"]);
        assert_eq!(s.accel, Accel::Auto);
        assert_eq!((s.max_upload, s.max_artifacts), (256 << 20, 256 << 20));
    }

    #[test]
    fn webhook_settings_are_checked_together() {
        let s = settings(&[]).unwrap();
        assert!(!s.webhooks.enabled());
        assert_eq!(s.webhooks.timeout, Duration::from_secs(10));
        assert_eq!(s.webhooks.retry_for, Duration::from_secs(3600));
        let err = |pairs: &[(&str, &str)]| match settings(pairs) {
            Err(ConfigError::Invalid { var, .. }) => var,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            err(&[("SQLITE_SIM_WEBHOOK_ALLOW", "10.0.0.0/99")]),
            "SQLITE_SIM_WEBHOOK_ALLOW"
        );
        assert_eq!(
            err(&[("SQLITE_SIM_WEBHOOK_ALLOW", "127.0.0.1")]),
            "SQLITE_SIM_WEBHOOK_SECRET"
        );
        assert_eq!(
            err(&[
                ("SQLITE_SIM_WEBHOOK_ALLOW", "127.0.0.1"),
                ("SQLITE_SIM_WEBHOOK_SECRET", "s"),
                ("SQLITE_SIM_WEBHOOK_URL", "http://10.0.0.1/hook"),
            ]),
            "SQLITE_SIM_WEBHOOK_URL"
        );
        assert_eq!(
            err(&[("SQLITE_SIM_WEBHOOK_RETRY_FOR", "0")]),
            "SQLITE_SIM_WEBHOOK_RETRY_FOR"
        );
        let s = settings(&[
            (
                "SQLITE_SIM_WEBHOOK_ALLOW",
                "127.0.0.1, hooks.example.com:80",
            ),
            ("SQLITE_SIM_WEBHOOK_SECRET", "s"),
            ("SQLITE_SIM_WEBHOOK_URL", "http://hooks.example.com/all"),
            ("SQLITE_SIM_WEBHOOK_RETRY_FOR", "60"),
        ])
        .unwrap();
        assert!(s.webhooks.enabled());
        let shown = s.describe();
        assert!(shown
            .iter()
            .any(|(k, v)| *k == "SQLITE_SIM_WEBHOOK_SECRET" && v == "<set, redacted>"));
    }

    #[test]
    fn database_url_is_checked_and_shown_without_its_password() {
        assert_eq!(settings(&[]).unwrap().database_url, None);
        let s = settings(&[(
            "SQLITE_SIM_DATABASE_URL",
            "postgres://sim:s3cret@db:5432/sim?host=/run/pg",
        )])
        .unwrap();
        let shown = s
            .describe()
            .into_iter()
            .find(|(k, _)| *k == "SQLITE_SIM_DATABASE_URL")
            .unwrap()
            .1;
        assert_eq!(shown, "postgres://sim:<redacted>@db:5432/sim?host=/run/pg");
        assert_eq!(
            redact_url("postgresql://u@/d?host=/s&password=x&port=1"),
            "postgresql://u@/d?host=/s&password=<redacted>&port=1"
        );
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
        let e = settings(&[("SQLITE_SIM_DATABASE_URL", "mysql://u:pw@h/d")]).unwrap_err();
        assert!(e.to_string().contains("SQLITE_SIM_DATABASE_URL"), "{e}");
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("1024", 1024),
            ("64K", 65536),
            ("256M", 256 << 20),
            ("2GiB", 2 << 30),
        ] {
            let s = settings(&[("SQLITE_SIM_MAX_UPLOAD", text)]).unwrap();
            assert_eq!(s.max_upload, bytes, "{text}");
        }
        for bad in ["0", "x", "-1M", "1T", "1.5G"] {
            assert!(
                settings(&[("SQLITE_SIM_MAX_ARTIFACTS", bad)]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn values_are_read() {
        let s = settings(&[
            ("SQLITE_SIM_API_PORT", "8080"),
            ("SQLITE_SIM_AGENT_POLL_INTERVAL", "0.25"),
            ("SQLITE_SIM_ENABLE_CORS", "true"),
            ("SQLITE_SIM_ALLOWED_ORIGINS", "http://a, http://b"),
            ("SQLITE_SIM_ACCEL", "TCG"),
            ("SQLITE_SIM_API_HOST", "0.0.0.0"),
        ])
        .unwrap();
        assert_eq!(s.api_port, 8080);
        assert_eq!(s.agent_poll_interval, Duration::from_millis(250));
        assert!(s.enable_cors);
        assert_eq!(s.allowed_origins, vec!["http://a", "http://b"]);
        assert_eq!(s.accel, Accel::Tcg);
        assert_eq!(s.api_host.to_string(), "0.0.0.0");
    }

    #[test]
    fn invalid_values_name_their_variable() {
        for (var, value) in [
            ("SQLITE_SIM_API_PORT", "eighty"),
            ("SQLITE_SIM_API_PORT", "70000"),
            ("SQLITE_SIM_AGENT_COUNT", "0"),
            ("SQLITE_SIM_AGENT_POLL_INTERVAL", "-1"),
            ("SQLITE_SIM_MAX_CONCURRENT_VMS", "many"),
            ("SQLITE_SIM_ENABLE_CORS", "maybe"),
            ("SQLITE_SIM_ACCEL", "hvf"),
            ("SQLITE_SIM_API_HOST", "localhost:80"),
            ("SQLITE_SIM_LOG_LEVEL", "LOUD"),
            ("SQLITE_SIM_DEFAULT_TIMEOUT", "5000"),
            ("SQLITE_SIM_DEFAULT_RETRIES", "11"),
            ("SQLITE_SIM_DEFAULT_RETRIES", "-1"),
            (
                "SQLITE_SIM_RUN_DIR",
                "/a/very/long/run/directory/path/that/would/overflow/sun_path/limits",
            ),
        ] {
            let err = settings(&[(var, value)]).unwrap_err().to_string();
            assert!(err.starts_with(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn env_file_missing_is_fine_malformed_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_env_file(&dir.path().join(".env")).unwrap().is_empty());
        let p = dir.path().join(".env");
        std::fs::write(&p, "SQLITE_SIM_API_PORT=\"9000\"\n").unwrap();
        assert_eq!(load_env_file(&p).unwrap()["SQLITE_SIM_API_PORT"], "9000");
        std::fs::write(&p, "SQLITE_SIM_API_PORT=\"9000\n").unwrap();
        assert!(load_env_file(&p).is_err());
    }
}

//! Per-VM settings from `vm_configs/NAME.conf`, and the catalogue of VMs this host can run.

use super::{kv, Accel};
use crate::qemu::console::protocol::Runner;
use regex::Regex;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum VmConfigError {
    #[error("invalid VM name {0:?}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    InvalidName(String),
    #[error("unknown VM {name:?}; available: {}", if available.is_empty() { "none".to_string() } else { available.join(", ") })]
    Unknown {
        name: String,
        available: Vec<String>,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How the guest's serial console reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleTransport {
    /// A unix-socket chardev (the default).
    Socket,
    /// A pty chardev opened with tokio-serial.
    Pty,
}

/// How the commands' output and files travel (`CHANNEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelPolicy {
    /// The virtio-serial channel where the guest has the driver, else the console.
    Auto,
    /// The channel, or the run fails.
    Virtio,
    /// The serial console only (no channel devices).
    Console,
}

impl ChannelPolicy {
    /// Whether QEMU gets the channel's devices.
    pub fn has_devices(self) -> bool {
        self != ChannelPolicy::Console
    }
}

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// One VM's effective settings.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    /// Memory size as QEMU's `-m` takes it, e.g. `256M`.
    pub memory: String,
    pub cpus: u32,
    /// Extra QEMU arguments, split like a shell would, passed as argv (never through a shell).
    pub additional_args: Vec<String>,
    /// Base disk image; `None` for a VM that boots only a kernel and initrd.
    pub image: Option<PathBuf>,
    pub format: DiskFormat,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// Overrides `SQLITE_SIM_ACCEL` for this VM.
    pub accel: Option<Accel>,
    /// The shell prompt that says the guest is ready, matched at the end of the console output.
    pub prompt: Regex,
    pub login_user: Option<String>,
    pub login_password: Option<String>,
    pub boot_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub console: ConsoleTransport,
    /// Guest device of the second serial port used for stderr (e.g. `/dev/ttyS1`); `None` merges
    /// stderr into stdout.
    pub stderr_device: Option<String>,
    /// The interpreter for the commands, e.g. `/bin/bash`; `None` uses the console's login
    /// shell. A script's own `#!` line still wins.
    pub shell: Option<String>,
    /// Warm start: requests restore clones of a template (a saved, booted guest) instead of
    /// booting.
    pub warm: bool,
    /// Clones kept restored and paused, ready to run (needs `warm`).
    pub warm_pool: u32,
    /// Commands run once in the template's guest before it is saved.
    pub prepare: Option<String>,
    /// While the template is (re)built, warm requests wait for it instead of booting cold.
    pub warm_wait: bool,
    pub channel: ChannelPolicy,
    /// Labels a host must advertise to run this VM (`REQUIRES="kvm big"`), sorted.
    pub requires: Vec<crate::model::Label>,
}

/// Most clones `WARM_POOL` may keep.
pub const MAX_WARM_POOL: u32 = 16;

/// Every key a VM config may set.
pub const KEYS: &[&str] = &[
    "MEMORY",
    "CPU",
    "ADDITIONAL_ARGS",
    "IMAGE",
    "FORMAT",
    "KERNEL",
    "INITRD",
    "APPEND",
    "ACCEL",
    "PROMPT",
    "LOGIN_USER",
    "LOGIN_PASSWORD",
    "BOOT_TIMEOUT",
    "SHUTDOWN_TIMEOUT",
    "CONSOLE",
    "STDERR_DEVICE",
    "SHELL",
    "WARM",
    "WARM_POOL",
    "WARM_WAIT",
    "PREPARE",
    "CHANNEL",
    "REQUIRES",
];

/// Default prompt: a root or user shell prompt (`# ` or `$ `) at the end of the output.
pub const DEFAULT_PROMPT: &str = r"[#$] $";

/// `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`, checked without a regex.
pub fn is_valid_vm_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

impl VmConfig {
    /// Guest RAM in bytes, read as QEMU reads `-m`: a bare number is MiB.
    pub fn memory_bytes(&self) -> u64 {
        memory_size_bytes(&self.memory).unwrap_or(0)
    }

    /// Parses a config's text. `images_dir` resolves the default and relative `IMAGE` paths;
    /// `config_dir` resolves relative `KERNEL`/`INITRD` paths.
    pub fn parse(
        name: &str,
        text: &str,
        path: &Path,
        images_dir: &Path,
        config_dir: &Path,
    ) -> Result<Self, VmConfigError> {
        let invalid = |message: String| VmConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let pairs = kv::parse(text).map_err(|e| invalid(e.to_string()))?;
        for (k, _) in &pairs {
            if !KEYS.contains(&k.as_str()) {
                return Err(invalid(format!(
                    "unknown key {k}; known keys: {}",
                    KEYS.join(", ")
                )));
            }
        }
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let memory = get("MEMORY").unwrap_or_else(|| "512M".into());
        if !is_memory_size(&memory) {
            return Err(invalid(format!(
                "MEMORY {memory:?} is not a size like 512M or 2G"
            )));
        }
        let cpus = match get("CPU") {
            None => 1,
            Some(s) => match s.parse::<u32>() {
                Ok(n @ 1..=64) => n,
                _ => return Err(invalid(format!("CPU {s:?} is not a number from 1 to 64"))),
            },
        };
        let additional_args = match get("ADDITIONAL_ARGS") {
            None => Vec::new(),
            Some(s) => shell_words::split(&s)
                .map_err(|e| invalid(format!("ADDITIONAL_ARGS cannot be split: {e}")))?,
        };
        // Extra devices, monitors and chardevs are the operator's choice, but the agent's own
        // console and stderr chardevs must stay the agent's.
        if let Some(a) = additional_args.iter().find(|a| a.contains("id=sqsim-")) {
            return Err(invalid(format!(
                "ADDITIONAL_ARGS uses the reserved id prefix sqsim- ({a:?}); choose another id"
            )));
        }
        let resolve = |dir: &Path, p: String| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                dir.join(p)
            }
        };
        let kernel = get("KERNEL").map(|p| resolve(config_dir, p));
        let image = match get("IMAGE") {
            Some(p) => Some(resolve(images_dir, p)),
            None => {
                let default = images_dir.join(format!("{name}.qcow2"));
                // A kernel-only VM needs no disk; otherwise the default image is expected.
                if kernel.is_some() && !default.exists() {
                    None
                } else {
                    Some(default)
                }
            }
        };
        let format = match get("FORMAT").as_deref() {
            Some("qcow2") => DiskFormat::Qcow2,
            Some("raw") => DiskFormat::Raw,
            Some(other) => return Err(invalid(format!("FORMAT {other:?} is not qcow2 or raw"))),
            None => match image.as_ref().and_then(|p| p.extension()) {
                Some(ext) if ext == "img" || ext == "raw" => DiskFormat::Raw,
                _ => DiskFormat::Qcow2,
            },
        };
        let accel = match get("ACCEL") {
            None => None,
            Some(s) => Some(
                Accel::parse(&s)
                    .ok_or_else(|| invalid(format!("ACCEL {s:?} is not auto, kvm or tcg")))?,
            ),
        };
        let prompt_src = get("PROMPT").unwrap_or_else(|| DEFAULT_PROMPT.into());
        let prompt = Regex::new(&format!("(?:{prompt_src})$"))
            .map_err(|e| invalid(format!("PROMPT is not a valid regex: {e}")))?;
        let seconds = |key: &str, default: u64| -> Result<Duration, VmConfigError> {
            match get(key) {
                None => Ok(Duration::from_secs(default)),
                Some(s) => match s.parse::<u64>() {
                    Ok(n @ 1..=3600) => Ok(Duration::from_secs(n)),
                    _ => Err(invalid(format!(
                        "{key} {s:?} is not a number of seconds from 1 to 3600"
                    ))),
                },
            }
        };
        let console = match get("CONSOLE").as_deref() {
            None | Some("socket") => ConsoleTransport::Socket,
            Some("pty") => ConsoleTransport::Pty,
            Some(other) => return Err(invalid(format!("CONSOLE {other:?} is not socket or pty"))),
        };
        let stderr_device = get("STDERR_DEVICE");
        if let Some(dev) = &stderr_device {
            if !dev.starts_with("/dev/") || dev.contains(|c: char| c.is_whitespace() || c == '\'') {
                return Err(invalid(format!(
                    "STDERR_DEVICE {dev:?} is not a guest device path like /dev/ttyS1"
                )));
            }
        }
        let shell = match get("SHELL") {
            None => None,
            Some(s) => {
                let words = shell_words::split(&s)
                    .map_err(|e| invalid(format!("SHELL cannot be split: {e}")))?;
                let ok = words.first().is_some_and(|w| w.starts_with('/'))
                    && words.iter().all(|w| Runner::is_safe_word(w));
                if !ok {
                    return Err(invalid(format!(
                        "SHELL {s:?} is not an absolute interpreter path (with optional \
                         arguments) of letters, digits and / . _ + -, e.g. /bin/bash"
                    )));
                }
                Some(words.join(" "))
            }
        };
        let flag = |key: &str| -> Result<bool, VmConfigError> {
            match get(key).as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("off" | "no" | "false" | "0") => Ok(false),
                Some("on" | "yes" | "true" | "1") => Ok(true),
                Some(other) => Err(invalid(format!("{key} {other:?} is not on or off"))),
            }
        };
        let warm = flag("WARM")?;
        let warm_wait = flag("WARM_WAIT")?;
        let warm_pool = match get("WARM_POOL") {
            None => 0,
            Some(s) => match s.parse::<u32>() {
                Ok(n) if n <= MAX_WARM_POOL => n,
                _ => {
                    return Err(invalid(format!(
                        "WARM_POOL {s:?} is not a number from 0 to {MAX_WARM_POOL}"
                    )))
                }
            },
        };
        let prepare = get("PREPARE");
        let channel = match get("CHANNEL").as_deref() {
            None | Some("auto") => ChannelPolicy::Auto,
            Some("virtio") => ChannelPolicy::Virtio,
            Some("console") => ChannelPolicy::Console,
            Some(other) => {
                return Err(invalid(format!(
                    "CHANNEL {other:?} is not auto, virtio or console"
                )))
            }
        };
        let mut requires = Vec::new();
        for word in get("REQUIRES")
            .unwrap_or_default()
            .split([',', ' ', '\t'])
            .filter(|w| !w.is_empty())
        {
            requires.push(
                word.parse::<crate::model::Label>()
                    .map_err(|e| invalid(format!("REQUIRES: {e}")))?,
            );
        }
        requires.sort();
        requires.dedup();
        if !warm {
            for (key, set) in [
                ("WARM_POOL", warm_pool > 0),
                ("WARM_WAIT", warm_wait),
                ("PREPARE", prepare.is_some()),
            ] {
                if set {
                    return Err(invalid(format!("{key} needs WARM=\"on\"")));
                }
            }
        }
        Ok(VmConfig {
            name: name.to_string(),
            memory,
            cpus,
            additional_args,
            image,
            format,
            kernel,
            initrd: get("INITRD").map(|p| resolve(config_dir, p)),
            append: get("APPEND"),
            accel,
            prompt,
            login_user: get("LOGIN_USER"),
            login_password: get("LOGIN_PASSWORD"),
            boot_timeout: seconds("BOOT_TIMEOUT", 120)?,
            shutdown_timeout: seconds("SHUTDOWN_TIMEOUT", 30)?,
            console,
            stderr_device,
            shell,
            warm,
            warm_pool,
            prepare,
            warm_wait,
            channel,
            requires,
        })
    }
}

fn is_memory_size(s: &str) -> bool {
    memory_size_bytes(s).is_some_and(|n| n > 0)
}

/// `512M`, `2G`, `1024K`, or a bare number of MiB (QEMU's `-m`); `None` if it is not a size.
fn memory_size_bytes(s: &str) -> Option<u64> {
    let digits = s.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    if digits.is_empty()
        || digits.len() + 1 < s.len()
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let shift = match s[digits.len()..].to_ascii_uppercase().as_str() {
        "K" => 10,
        "" | "M" => 20,
        "G" => 30,
        _ => 40,
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Finds VMs by name in the images and configs directories.
#[derive(Debug, Clone)]
pub struct VmCatalog {
    pub images_dir: PathBuf,
    pub config_dir: PathBuf,
    /// Parsed configs by name, with the text they were parsed from and the file's stamp: a
    /// config is looked at on every load (edits apply at once), re-read only when its stamp
    /// changed or cannot be trusted yet, and parsed (its PROMPT regex compiled) only when its
    /// text changed. A submission loads its VM's config, so this is on the API's hot path.
    parsed: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Parsed>>>,
}

#[derive(Debug)]
struct Parsed {
    /// Shared with callers of `load_with_text`: a hit hands out the text without copying it.
    text: std::sync::Arc<str>,
    vm: VmConfig,
    /// The file as it was when `text` was read, if that read can vouch for later ones.
    stamp: Option<Stamp>,
}

/// What tells a changed file from the same one without reading it: size, identity and
/// times (mtime and ctime, so a rewrite that restores the old mtime still shows).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// A stamp this recent may not tell two writes apart: file times advance in clock ticks, so
/// a same-sized edit within the tick of the previous one keeps its stamp (git's "racily
/// clean" files). Such a file is re-read on every load until it is older than this.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            len: m.len(),
            dev: m.dev(),
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// The stamp of `m`, if it was last changed long enough ago to be trusted.
    fn settled(m: &std::fs::Metadata) -> Option<Stamp> {
        let stamp = Stamp::of(m);
        let (secs, nanos) = stamp.mtime.max(stamp.ctime);
        let changed =
            std::time::Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        (now.checked_sub(changed)? >= RACY).then_some(stamp)
    }
}

impl VmCatalog {
    pub fn new(images_dir: impl Into<PathBuf>, config_dir: impl Into<PathBuf>) -> Self {
        Self {
            images_dir: images_dir.into(),
            config_dir: config_dir.into(),
            parsed: Default::default(),
        }
    }

    /// Names of every VM with a config file or a `.qcow2` image, sorted.
    pub fn available(&self) -> Vec<String> {
        let mut names = BTreeSet::new();
        for (dir, ext) in [(&self.config_dir, "conf"), (&self.images_dir, "qcow2")] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == ext) {
                    if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                        if is_valid_vm_name(stem) {
                            names.insert(stem.to_string());
                        }
                    }
                }
            }
        }
        names.into_iter().collect()
    }

    /// Loads one VM's config: its `.conf` when present, defaults when only an image exists.
    pub fn load(&self, name: &str) -> Result<VmConfig, VmConfigError> {
        self.load_with_text(name).map(|(vm, _)| vm)
    }

    /// The VM's config and the text it was parsed from (empty for an image without a config).
    pub fn load_with_text(
        &self,
        name: &str,
    ) -> Result<(VmConfig, std::sync::Arc<str>), VmConfigError> {
        if !is_valid_vm_name(name) {
            return Err(VmConfigError::InvalidName(name.chars().take(80).collect()));
        }
        let conf = self.config_dir.join(format!("{name}.conf"));
        // One stat instead of open + read + close when the file is known unchanged.
        let meta = std::fs::metadata(&conf).ok();
        if let Some(m) = &meta {
            let parsed = self.parsed.lock().expect("catalog cache lock");
            if let Some(p) = parsed.get(name) {
                if p.stamp.is_some() && p.stamp == Some(Stamp::of(m)) {
                    return Ok((p.vm.clone(), p.text.clone()));
                }
            }
        }
        let text = match std::fs::read_to_string(&conf) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.images_dir.join(format!("{name}.qcow2")).exists() {
                    String::new()
                } else {
                    return Err(VmConfigError::Unknown {
                        name: name.to_string(),
                        available: self.available(),
                    });
                }
            }
            Err(source) => return Err(VmConfigError::Io { path: conf, source }),
        };
        // Taken before the read, so that a write racing it leaves a stamp that differs later.
        let stamp = meta.as_ref().and_then(Stamp::settled);
        let mut parsed = self.parsed.lock().expect("catalog cache lock");
        if let Some(p) = parsed.get_mut(name) {
            if *p.text == *text {
                p.stamp = stamp;
                return Ok((p.vm.clone(), p.text.clone()));
            }
        }
        let vm = VmConfig::parse(name, &text, &conf, &self.images_dir, &self.config_dir)?;
        let text: std::sync::Arc<str> = text.into();
        parsed.insert(
            name.to_string(),
            Parsed {
                text: text.clone(),
                vm: vm.clone(),
                stamp,
            },
        );
        Ok((vm, text))
    }

    /// Loads a VM and checks that the files it needs exist (used by `config` and `status`).
    pub fn check(&self, name: &str) -> Result<VmConfig, VmConfigError> {
        let vm = self.load(name)?;
        let files = vm
            .image
            .iter()
            .chain(vm.kernel.iter())
            .chain(vm.initrd.iter());
        for f in files {
            if !f.is_file() {
                return Err(VmConfigError::Invalid {
                    path: self.config_dir.join(format!("{name}.conf")),
                    message: format!("{} does not exist", f.display()),
                });
            }
        }
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, VmConfigError> {
        VmConfig::parse(
            "t",
            text,
            Path::new("vm_configs/t.conf"),
            Path::new("/imgs"),
            Path::new("/confs"),
        )
    }

    #[test]
    fn vm_names() {
        for ok in ["tiny", "ubuntu-server", "a", "v1.2_x", &"a".repeat(64)] {
            assert!(is_valid_vm_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "/abs",
            "a/b",
            ".hidden",
            "-x",
            "a\0b",
            "a b",
            &"a".repeat(65),
            "é",
        ] {
            assert!(!is_valid_vm_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn seed_example_and_defaults() {
        let vm = parse(
            "MEMORY=\"2G\"\nCPU=\"2\"\nADDITIONAL_ARGS=\"-netdev user,id=net0 -device e1000,netdev=net0\"\n",
        )
        .unwrap();
        assert_eq!(vm.memory, "2G");
        assert_eq!(vm.memory_bytes(), 2 << 30);
        assert_eq!(vm.cpus, 2);
        assert_eq!(
            vm.additional_args,
            ["-netdev", "user,id=net0", "-device", "e1000,netdev=net0"]
        );
        assert_eq!(vm.image, Some(PathBuf::from("/imgs/t.qcow2")));
        assert_eq!(vm.format, DiskFormat::Qcow2);
        assert_eq!(vm.console, ConsoleTransport::Socket);
        assert_eq!(vm.boot_timeout, Duration::from_secs(120));
        assert!(vm.prompt.is_match("root@host:~# "));
        assert!(vm.prompt.is_match("$ "));
        assert!(!vm.prompt.is_match("# not at the end"));
    }

    #[test]
    fn additional_args_split_like_a_shell_without_running_one() {
        let vm =
            parse("ADDITIONAL_ARGS=\"-append 'console=ttyS0 quiet' -smbios type=1,serial=\\$x\"")
                .unwrap();
        assert_eq!(
            vm.additional_args,
            [
                "-append",
                "console=ttyS0 quiet",
                "-smbios",
                "type=1,serial=$x"
            ]
        );
    }

    #[test]
    fn full_config() {
        let vm = parse(
            "IMAGE=\"other.img\"\nKERNEL=\"k/vmlinuz\"\nINITRD=\"/abs/initrd\"\nAPPEND=\"console=ttyS0\"\n\
             ACCEL=\"tcg\"\nPROMPT=\"root@tiny:[^#]*# \"\nLOGIN_USER=\"root\"\nLOGIN_PASSWORD=\"pw\"\n\
             BOOT_TIMEOUT=\"60\"\nSHUTDOWN_TIMEOUT=\"5\"\nCONSOLE=\"pty\"\nSTDERR_DEVICE=\"/dev/ttyS1\"\n",
        )
        .unwrap();
        assert_eq!(vm.image, Some(PathBuf::from("/imgs/other.img")));
        assert_eq!(vm.format, DiskFormat::Raw);
        assert_eq!(vm.kernel, Some(PathBuf::from("/confs/k/vmlinuz")));
        assert_eq!(vm.initrd, Some(PathBuf::from("/abs/initrd")));
        assert_eq!(vm.accel, Some(Accel::Tcg));
        assert!(vm.prompt.is_match("boot...\r\nroot@tiny:~# "));
        assert_eq!(vm.login_user.as_deref(), Some("root"));
        assert_eq!(vm.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(vm.console, ConsoleTransport::Pty);
        assert_eq!(vm.stderr_device.as_deref(), Some("/dev/ttyS1"));
        assert_eq!(vm.shell, None);
        assert!(!vm.warm);
        let w =
            parse("WARM=\"on\"\nWARM_POOL=\"2\"\nWARM_WAIT=\"yes\"\nPREPARE=\"mkdir /x\"").unwrap();
        assert!(w.warm && w.warm_wait);
        assert_eq!((w.warm_pool, w.prepare.as_deref()), (2, Some("mkdir /x")));
        assert_eq!(
            parse("SHELL=\"/bin/busybox  sh\"")
                .unwrap()
                .shell
                .as_deref(),
            Some("/bin/busybox sh")
        );
        let r = parse("REQUIRES=\"kvm, big accel:kvm kvm\"").unwrap();
        let names: Vec<&str> = r.requires.iter().map(|l| l.as_str()).collect();
        assert_eq!(names, ["accel:kvm", "big", "kvm"]);
    }

    #[test]
    fn invalid_values_are_named() {
        for (text, needle) in [
            ("MEMORY=\"lots\"", "MEMORY"),
            ("MEMORY=\"0M\"", "MEMORY"),
            ("CPU=\"0\"", "CPU"),
            ("CPU=\"two\"", "CPU"),
            ("FORMAT=\"vmdk\"", "FORMAT"),
            ("ACCEL=\"hvf\"", "ACCEL"),
            ("PROMPT=\"(\"", "PROMPT"),
            ("BOOT_TIMEOUT=\"0\"", "BOOT_TIMEOUT"),
            ("CONSOLE=\"vnc\"", "CONSOLE"),
            ("REQUIRES=\"kvm -big\"", "REQUIRES"),
            ("STDERR_DEVICE=\"ttyS1\"", "STDERR_DEVICE"),
            ("SHELL=\"bash\"", "SHELL"),
            ("WARM=\"maybe\"", "WARM"),
            ("CHANNEL=\"9p\"", "CHANNEL"),
            ("WARM=\"on\"\nWARM_POOL=\"17\"", "WARM_POOL"),
            ("WARM_POOL=\"2\"", "WARM_POOL needs WARM"),
            ("PREPARE=\"echo\"", "PREPARE needs WARM"),
            ("SHELL=\"/bin/sh; rm -rf /\"", "SHELL"),
            ("SHELL=\"/bin/bash '-c x'\"", "SHELL"),
            ("ADDITIONAL_ARGS=\"-x 'unclosed\"", "ADDITIONAL_ARGS"),
            ("MEMROY=\"1G\"", "unknown key MEMROY"),
            (
                "ADDITIONAL_ARGS=\"-chardev socket,id=sqsim-console,path=/x\"",
                "reserved id prefix sqsim-",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.starts_with("vm_configs/t.conf"), "{err}");
        }
    }

    #[test]
    fn catalog_finds_configs_and_images() {
        let dir = tempfile::tempdir().unwrap();
        let (imgs, confs) = (dir.path().join("i"), dir.path().join("c"));
        std::fs::create_dir_all(&imgs).unwrap();
        std::fs::create_dir_all(&confs).unwrap();
        std::fs::write(imgs.join("bare.qcow2"), b"").unwrap();
        std::fs::write(confs.join("conf-only.conf"), "KERNEL=\"/k\"\n").unwrap();
        std::fs::write(imgs.join("bad name.qcow2"), b"").unwrap();
        let cat = VmCatalog::new(&imgs, &confs);
        assert_eq!(cat.available(), ["bare", "conf-only"]);
        assert_eq!(cat.load("bare").unwrap().memory, "512M");
        assert_eq!(cat.load("conf-only").unwrap().image, None);
        let err = cat.load("nope").unwrap_err().to_string();
        assert!(err.contains("available: bare, conf-only"), "{err}");
        assert!(matches!(
            cat.load("../etc/passwd"),
            Err(VmConfigError::InvalidName(_))
        ));
        assert!(cat.check("conf-only").is_err(), "kernel /k does not exist");
        // Edits apply at once (the cache is keyed by the file's text).
        std::fs::write(
            confs.join("conf-only.conf"),
            "KERNEL=\"/k\"\nMEMORY=\"1G\"\n",
        )
        .unwrap();
        assert_eq!(cat.load("conf-only").unwrap().memory, "1G");
        std::fs::write(confs.join("conf-only.conf"), "MEMORY=\"lots\"\n").unwrap();
        assert!(
            cat.load("conf-only").is_err(),
            "a broken edit is reported, not masked by the cache"
        );
    }

    /// A config's stamp spares re-reading it only once it is older than [`RACY`]: edits of
    /// the same size within one clock tick (a fresh file) or that restore the old mtime (an
    /// older one; its ctime still moves) are all seen by the next load.
    #[test]
    fn cached_configs_see_every_edit() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("v.conf");
        let cat = VmCatalog::new(dir.path(), dir.path());
        let memory = |cat: &VmCatalog| cat.load("v").unwrap().memory;
        // Fresh: each same-sized rewrite is seen at once, however close together.
        for m in ["1G", "2G", "3G"] {
            std::fs::write(&conf, format!("KERNEL=\"/k\"\nMEMORY=\"{m}\"\n")).unwrap();
            assert_eq!(memory(&cat), m);
        }
        // Settled (its mtime an hour ago): cached by stamp...
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let f = std::fs::File::options().write(true).open(&conf).unwrap();
        f.set_modified(old).unwrap();
        assert_eq!(memory(&cat), "3G");
        assert_eq!(memory(&cat), "3G");
        // ...and an edit that puts the same size and mtime back is still seen (ctime).
        std::fs::write(&conf, "KERNEL=\"/k\"\nMEMORY=\"4G\"\n").unwrap();
        f.set_modified(old).unwrap();
        assert_eq!(memory(&cat), "4G");
        // And one that replaces the file (a new inode) too.
        let tmp = dir.path().join("v.conf.new");
        std::fs::write(&tmp, "KERNEL=\"/k\"\nMEMORY=\"5G\"\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::fs::rename(&tmp, &conf).unwrap();
        assert_eq!(memory(&cat), "5G");
        std::fs::remove_file(&conf).unwrap();
        assert!(
            cat.load("v").is_err(),
            "a removed config is not served from the cache"
        );
    }

    #[test]
    fn memory_sizes_read_as_qemu_reads_them() {
        assert_eq!(memory_size_bytes("512"), Some(512 << 20));
        assert_eq!(memory_size_bytes("1024k"), Some(1 << 20));
        assert_eq!(memory_size_bytes("128M"), Some(128 << 20));
        assert_eq!(memory_size_bytes("1T"), Some(1 << 40));
        for bad in ["", "M", "12MB", "-1G", "1.5G", "99999999999999T"] {
            assert_eq!(memory_size_bytes(bad), None, "{bad}");
        }
    }
}

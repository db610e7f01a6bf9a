//! QEMU's command line, built by small pure functions, and the spawned process.
//!
//! QEMU starts paused (`-S`) with no default devices, a QMP socket and socket (or pty) chardevs
//! for the serial ports, in its own process group with a parent-death signal, never through a
//! shell. The agent connects to everything before it lets the vCPUs run.

use crate::config::vm::{ConsoleTransport, VmConfig};
use crate::config::Accel;
use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("creating run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU exited during start-up ({status}): {stderr}")]
    EarlyExit { status: String, stderr: String },
    #[error("QEMU did not open its QMP socket within {0:?}")]
    SocketTimeout(Duration),
}

/// Chardev ids the agent relies on; `ADDITIONAL_ARGS` must not reuse them.
pub const CONSOLE_CHARDEV: &str = "sqsim-console";
pub const STDERR_CHARDEV: &str = "sqsim-stderr";

/// The guest channel's virtio-serial ports: (chardev id, port name the guest sees under
/// `/dev/virtio-ports/`). Output and the exit status's companions travel here byte-exact.
pub const CHANNEL_PORTS: [(&str, &str); 4] = [
    ("sqsim-out", PORT_STDOUT),
    ("sqsim-err", PORT_STDERR),
    ("sqsim-in", PORT_IN),
    ("sqsim-art", PORT_ARTIFACTS),
];
/// The commands' standard output (guest → host).
pub const PORT_STDOUT: &str = "org.sqlite-sim.stdout";
/// The commands' standard error (guest → host).
pub const PORT_STDERR: &str = "org.sqlite-sim.stderr";
/// Files carried into the guest (host → guest).
pub const PORT_IN: &str = "org.sqlite-sim.in";
/// Artifacts collected from the guest, as a tar stream (guest → host).
pub const PORT_ARTIFACTS: &str = "org.sqlite-sim.artifacts";

/// The files of one run, all inside a private (0700) directory.
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub dir: PathBuf,
    pub qmp: PathBuf,
    pub console: PathBuf,
    pub stderr_port: PathBuf,
    pub overlay: PathBuf,
    pub pidfile: PathBuf,
    pub qemu_log: PathBuf,
    /// Sockets of the channel's ports, in [`CHANNEL_PORTS`] order.
    pub channel: [PathBuf; 4],
}

impl RunPaths {
    /// Paths for run `name` under `root` (nothing is created).
    pub fn new(root: &Path, name: &str) -> Self {
        let dir = root.join(name);
        RunPaths {
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.sock"),
            stderr_port: dir.join("stderr.sock"),
            overlay: dir.join("disk.qcow2"),
            pidfile: dir.join("qemu.pid"),
            qemu_log: dir.join("qemu.stderr"),
            channel: ["out.sock", "err.sock", "in.sock", "art.sock"].map(|f| dir.join(f)),
            dir,
        }
    }

    /// Creates the run directory, private to this user; the root is created 0700 too.
    pub fn create(&self) -> Result<(), LaunchError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LaunchError::RunDir { path, source }
        };
        if let Some(root) = self.dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(err(root))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.dir)
            .map_err(err(&self.dir))?;
        // DirBuilder's mode is filtered by the umask; make sure.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(err(&self.dir))?;
        Ok(())
    }

    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove run directory");
            }
        }
    }
}

/// Everything that decides QEMU's argv.
#[derive(Debug, Clone)]
pub struct LaunchSpec<'a> {
    pub vm: &'a VmConfig,
    /// Resolved: never `Auto`.
    pub accel: Accel,
    pub paths: &'a RunPaths,
    /// The disk QEMU writes to (the per-run overlay), if the VM has a disk.
    pub disk: Option<&'a Path>,
    /// A name for `-name`, shown in `ps` and QMP.
    pub name: String,
    /// Where guest RAM lives.
    pub memory: Memory<'a>,
    /// Wait for an incoming migration (`migrate-incoming`) instead of booting: a clone.
    pub incoming: bool,
    /// Give the guest the channel's virtio-serial ports.
    pub channel: bool,
}

/// Guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory<'a> {
    /// QEMU's own anonymous memory (a cold boot).
    Anonymous,
    /// A file shared with QEMU, so that it holds the RAM when the template is saved.
    Template(&'a Path),
    /// A template's RAM file mapped privately: the clone's writes are its own, copy-on-write,
    /// and the file is never written.
    Clone(&'a Path),
}

/// Id of the RAM backend object of templates and clones.
pub const RAM_OBJECT: &str = "sqsim-ram";

/// How the serial ports are wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wiring {
    /// Paused, QMP + console chardevs for the agent.
    Agent,
    /// Running at once with the console on QEMU's own stdio (`scripts/qemu_runner.sh`).
    Interactive,
}

/// The full argv (without the binary).
pub fn qemu_args(spec: &LaunchSpec<'_>, wiring: Wiring) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: Vec<OsString>| a.extend(items);
    push(base_args(&spec.name, wiring));
    push(accel_args(spec.accel));
    push(machine_size_args(spec.vm));
    push(memory_args(spec.vm.memory_bytes(), spec.memory));
    push(disk_args(spec.disk));
    push(kernel_args(spec.vm));
    push(qmp_args(&spec.paths.qmp));
    push(serial_args(spec.vm.console, spec.paths, wiring));
    if spec.channel && wiring == Wiring::Agent {
        push(channel_args(spec.paths));
    }
    push(vec!["-pidfile".into(), spec.paths.pidfile.clone().into()]);
    push(spec.vm.additional_args.iter().map(OsString::from).collect());
    if spec.incoming {
        push(os(&["-incoming", "defer"]));
    }
    a
}

/// Templates and clones keep guest RAM in a file (saved with `x-ignore-shared`, so the state
/// file holds only devices) and have a VM generation id device, which tells a guest kernel that
/// has the driver that it was cloned (it then reseeds its RNG).
pub fn memory_args(size: u64, memory: Memory<'_>) -> Vec<OsString> {
    let (path, share) = match memory {
        Memory::Anonymous => return Vec::new(),
        Memory::Template(p) => (p, "on"),
        Memory::Clone(p) => (p, "off"),
    };
    let mut obj = OsString::from(format!(
        "memory-backend-file,id={RAM_OBJECT},size={size},share={share},mem-path="
    ));
    obj.push(escape_option_value(path));
    vec![
        "-object".into(),
        obj,
        "-machine".into(),
        format!("memory-backend={RAM_OBJECT}").into(),
        "-device".into(),
        "vmgenid,guid=auto".into(),
    ]
}

fn os(items: &[&str]) -> Vec<OsString> {
    items.iter().map(OsString::from).collect()
}

/// Nothing QEMU would add on its own; guests that reboot end instead of looping; a panic device.
pub fn base_args(name: &str, wiring: Wiring) -> Vec<OsString> {
    let mut a = os(&[
        "-name",
        name,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]);
    a.extend(os(&["-no-reboot", "-device", "pvpanic"]));
    if wiring == Wiring::Agent {
        // Paused until the agent has QMP and the console: no boot byte is lost.
        a.push("-S".into());
    }
    a
}

pub fn accel_args(accel: Accel) -> Vec<OsString> {
    match accel {
        Accel::Kvm => os(&["-accel", "kvm", "-cpu", "host"]),
        // `Auto` is resolved before launch; treat a stray one as the safe choice.
        Accel::Tcg | Accel::Auto => os(&["-accel", "tcg"]),
    }
}

pub fn machine_size_args(vm: &VmConfig) -> Vec<OsString> {
    vec![
        "-m".into(),
        vm.memory.clone().into(),
        "-smp".into(),
        vm.cpus.to_string().into(),
    ]
}

pub fn disk_args(disk: Option<&Path>) -> Vec<OsString> {
    match disk {
        None => Vec::new(),
        Some(p) => {
            // The overlay is thrown away after the run: no need to flush to disk.
            let mut spec = OsString::from("file=");
            spec.push(escape_option_value(p));
            spec.push(",if=virtio,format=qcow2,cache=unsafe");
            vec!["-drive".into(), spec]
        }
    }
}

pub fn kernel_args(vm: &VmConfig) -> Vec<OsString> {
    let mut a = Vec::new();
    if let Some(k) = &vm.kernel {
        a.extend(["-kernel".into(), k.clone().into_os_string()]);
    }
    if let Some(i) = &vm.initrd {
        a.extend(["-initrd".into(), i.clone().into_os_string()]);
    }
    if let Some(ap) = &vm.append {
        a.extend(["-append".into(), ap.into()]);
    }
    a
}

pub fn qmp_args(path: &Path) -> Vec<OsString> {
    let mut s = OsString::from("unix:");
    s.push(escape_option_value(path));
    s.push(",server=on,wait=off");
    vec!["-qmp".into(), s]
}

/// Two serial ports: ttyS0 is the console, ttyS1 carries stderr when the VM config uses it.
pub fn serial_args(console: ConsoleTransport, paths: &RunPaths, wiring: Wiring) -> Vec<OsString> {
    let socket = |id: &str, path: &Path| {
        let mut s = OsString::from(format!("socket,id={id},path="));
        s.push(escape_option_value(path));
        s.push(",server=on,wait=off");
        s
    };
    let mut a: Vec<OsString> = Vec::new();
    match (wiring, console) {
        (Wiring::Interactive, _) => {
            // Multiplexed with a monitor, so Ctrl-A X quits and Ctrl-A C reaches the monitor.
            a.extend(os(&[
                "-chardev",
                &format!("stdio,id={CONSOLE_CHARDEV},mux=on,signal=off"),
                "-mon",
                &format!("chardev={CONSOLE_CHARDEV},mode=readline"),
            ]));
        }
        (Wiring::Agent, ConsoleTransport::Socket) => {
            a.extend(["-chardev".into(), socket(CONSOLE_CHARDEV, &paths.console)]);
        }
        (Wiring::Agent, ConsoleTransport::Pty) => {
            a.extend(os(&["-chardev", &format!("pty,id={CONSOLE_CHARDEV}")]));
        }
    }
    a.extend(os(&["-serial", &format!("chardev:{CONSOLE_CHARDEV}")]));
    match wiring {
        Wiring::Agent => a.extend([
            "-chardev".into(),
            socket(STDERR_CHARDEV, &paths.stderr_port),
        ]),
        Wiring::Interactive => a.extend(os(&["-chardev", &format!("null,id={STDERR_CHARDEV}")])),
    }
    a.extend(os(&["-serial", &format!("chardev:{STDERR_CHARDEV}")]));
    a
}

/// A virtio-serial controller with the channel's named ports, each on its own socket chardev.
pub fn channel_args(paths: &RunPaths) -> Vec<OsString> {
    let mut a = os(&["-device", "virtio-serial-pci,id=sqsim-vser"]);
    for ((id, name), path) in CHANNEL_PORTS.iter().zip(&paths.channel) {
        let mut chardev = OsString::from(format!("socket,id={id},path="));
        chardev.push(escape_option_value(path));
        chardev.push(",server=on,wait=off");
        a.extend(["-chardev".into(), chardev]);
        a.extend(os(&[
            "-device",
            &format!("virtserialport,bus=sqsim-vser.0,chardev={id},name={name}"),
        ]));
    }
    a
}

/// QEMU option values separate keys with `,`; a literal comma is written `,,`.
fn escape_option_value(p: &Path) -> OsString {
    OsString::from(p.to_string_lossy().replace(',', ",,"))
}

/// A running QEMU in its own process group.
pub struct QemuProcess {
    child: tokio::process::Child,
    pid: i32,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl QemuProcess {
    /// Starts QEMU. Must be called from an async task (a long-lived runtime thread): the
    /// parent-death signal fires when the *thread* that forked exits.
    pub fn spawn(binary: &Path, args: &[OsString], log: &Path) -> Result<Self, LaunchError> {
        let spawn_err = |source| LaunchError::Spawn {
            binary: binary.to_path_buf(),
            source,
        };
        let stderr = std::fs::File::create(log).map_err(spawn_err)?;
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        set_parent_death_signal(&mut cmd);
        let child = cmd.spawn().map_err(spawn_err)?;
        let pid = child.id().map(|p| p as i32).unwrap_or(-1);
        Ok(QemuProcess {
            child,
            pid,
            log: log.to_path_buf(),
            status: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The exit status if QEMU has exited (non-blocking).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for QEMU to exit (cancel-safe).
    pub async fn wait(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let s = match self.child.wait().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "waiting for QEMU failed");
                std::os::unix::process::ExitStatusExt::from_raw(-1)
            }
        };
        self.status = Some(s);
        s
    }

    /// Waits at most `limit`; `None` if QEMU is still running.
    pub async fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(limit, self.wait()).await.ok()
    }

    /// Sends `sig` to QEMU's whole process group.
    pub fn signal_group(&self, sig: nix::sys::signal::Signal) {
        if self.pid > 0 && self.status.is_none() {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid), sig);
        }
    }

    /// The last `max` bytes QEMU wrote to stderr, as text.
    pub fn stderr_tail(&self, max: usize) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let start = bytes.len().saturating_sub(max);
        String::from_utf8_lossy(&bytes[start..]).trim().to_string()
    }

    /// Waits until QEMU has created `socket`, failing fast if QEMU exits first.
    pub async fn wait_for_socket(
        &mut self,
        socket: &Path,
        limit: Duration,
    ) -> Result<(), LaunchError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.try_status() {
                return Err(LaunchError::EarlyExit {
                    status: describe_status(status),
                    stderr: self.stderr_tail(2048),
                });
            }
            if socket.exists() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LaunchError::SocketTimeout(limit));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        // Last line of defence: never leave QEMU (or anything it forked) behind.
        if self.try_status().is_none() {
            self.signal_group(nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// `exit status 1` / `killed by SIGKILL`.
pub fn describe_status(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(sig) => format!("killed by {sig}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "unknown status".into(),
    }
}

#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // syscalls (umask, prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            // QEMU's sockets and the overlay it writes are private to this user (0600/0700).
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            // The parent may have died between fork and prctl: then nobody would kill us.
            if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
                return Err(std::io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::vm::VmConfig;

    fn vm(text: &str) -> VmConfig {
        VmConfig::parse(
            "t",
            text,
            Path::new("t.conf"),
            Path::new("/i"),
            Path::new("/c"),
        )
        .unwrap()
    }

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    fn has_pair(v: &[String], a: &str, b: &str) -> bool {
        v.windows(2).any(|w| w[0] == a && w[1] == b)
    }

    #[test]
    fn base_is_paused_and_bare_for_the_agent_only() {
        let agent = strs(&base_args("n", Wiring::Agent));
        for flag in ["-nodefaults", "-no-user-config", "-S", "-no-reboot"] {
            assert!(agent.contains(&flag.to_string()), "{flag}");
        }
        assert!(has_pair(&agent, "-display", "none"));
        assert!(has_pair(&agent, "-name", "n"));
        let interactive = strs(&base_args("n", Wiring::Interactive));
        assert!(!interactive.contains(&"-S".to_string()));
    }

    #[test]
    fn accelerators() {
        assert_eq!(strs(&accel_args(Accel::Tcg)), ["-accel", "tcg"]);
        assert_eq!(
            strs(&accel_args(Accel::Kvm)),
            ["-accel", "kvm", "-cpu", "host"]
        );
    }

    #[test]
    fn memory_and_cpus() {
        let v = vm("MEMORY=\"256M\"\nCPU=\"2\"");
        assert_eq!(strs(&machine_size_args(&v)), ["-m", "256M", "-smp", "2"]);
    }

    #[test]
    fn disk_is_the_overlay_with_commas_escaped() {
        assert!(disk_args(None).is_empty());
        let a = strs(&disk_args(Some(Path::new("/run/a,b/disk.qcow2"))));
        assert_eq!(
            a,
            [
                "-drive",
                "file=/run/a,,b/disk.qcow2,if=virtio,format=qcow2,cache=unsafe"
            ]
        );
    }

    #[test]
    fn direct_kernel_boot() {
        let v = vm("KERNEL=\"/k\"\nINITRD=\"/i.gz\"\nAPPEND=\"console=ttyS0 quiet\"");
        assert_eq!(
            strs(&kernel_args(&v)),
            [
                "-kernel",
                "/k",
                "-initrd",
                "/i.gz",
                "-append",
                "console=ttyS0 quiet"
            ]
        );
        assert!(kernel_args(&vm("")).is_empty());
    }

    #[test]
    fn sockets() {
        let p = RunPaths::new(Path::new("/r"), "x");
        assert_eq!(
            strs(&qmp_args(&p.qmp)),
            ["-qmp", "unix:/r/x/qmp.sock,server=on,wait=off"]
        );
        let s = strs(&serial_args(ConsoleTransport::Socket, &p, Wiring::Agent));
        assert_eq!(
            s,
            [
                "-chardev",
                "socket,id=sqsim-console,path=/r/x/console.sock,server=on,wait=off",
                "-serial",
                "chardev:sqsim-console",
                "-chardev",
                "socket,id=sqsim-stderr,path=/r/x/stderr.sock,server=on,wait=off",
                "-serial",
                "chardev:sqsim-stderr",
            ]
        );
        let pty = strs(&serial_args(ConsoleTransport::Pty, &p, Wiring::Agent));
        assert!(has_pair(&pty, "-chardev", "pty,id=sqsim-console"));
        let inter = strs(&serial_args(
            ConsoleTransport::Socket,
            &p,
            Wiring::Interactive,
        ));
        assert!(has_pair(
            &inter,
            "-chardev",
            "stdio,id=sqsim-console,mux=on,signal=off"
        ));
        assert!(has_pair(
            &inter,
            "-mon",
            "chardev=sqsim-console,mode=readline"
        ));
    }

    #[test]
    fn full_argv_keeps_additional_args_last_and_unsplit() {
        let v = vm("ADDITIONAL_ARGS=\"-device 'virtio-rng-pci,id=a b'\"");
        let p = RunPaths::new(Path::new("/r"), "x");
        let spec = LaunchSpec {
            vm: &v,
            accel: Accel::Tcg,
            paths: &p,
            disk: Some(&p.overlay),
            name: "sqsim-x".into(),
            memory: Memory::Anonymous,
            incoming: false,
            channel: true,
        };
        let a = strs(&qemu_args(&spec, Wiring::Agent));
        assert!(has_pair(&a, "-device", "virtio-serial-pci,id=sqsim-vser"));
        assert!(has_pair(
            &a,
            "-device",
            "virtserialport,bus=sqsim-vser.0,chardev=sqsim-out,name=org.sqlite-sim.stdout"
        ));
        assert!(has_pair(
            &a,
            "-chardev",
            "socket,id=sqsim-art,path=/r/x/art.sock,server=on,wait=off"
        ));
        assert_eq!(&a[a.len() - 2..], ["-device", "virtio-rng-pci,id=a b"]);
        assert!(has_pair(&a, "-pidfile", "/r/x/qemu.pid"));
        assert!(a.iter().any(|s| s.starts_with("file=/r/x/disk.qcow2")));
    }

    #[test]
    fn templates_share_their_ram_file_and_clones_map_it_privately() {
        assert!(memory_args(128 << 20, Memory::Anonymous).is_empty());
        let t = strs(&memory_args(
            128 << 20,
            Memory::Template(Path::new("/t/a,b/ram")),
        ));
        assert_eq!(
            t,
            [
                "-object",
                "memory-backend-file,id=sqsim-ram,size=134217728,share=on,mem-path=/t/a,,b/ram",
                "-machine",
                "memory-backend=sqsim-ram",
                "-device",
                "vmgenid,guid=auto"
            ]
        );
        let c = strs(&memory_args(128 << 20, Memory::Clone(Path::new("/t/ram"))));
        assert!(c[1].contains("share=off"), "{c:?}");
        // Everything but the RAM file's sharing is the same, so the device state fits.
        assert_eq!(t.len(), c.len());
    }

    #[test]
    fn run_dir_is_private() {
        let root = tempfile::tempdir().unwrap();
        let p = RunPaths::new(&root.path().join("runs"), "abc");
        p.create().unwrap();
        let mode = std::fs::metadata(&p.dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(p.create().is_err(), "a run dir is never reused");
        p.remove();
        assert!(!p.dir.exists());
    }
}

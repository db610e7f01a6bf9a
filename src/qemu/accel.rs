//! What `ACCEL=auto` means on this host, decided by a cheap probe instead of a user's request.
//!
//! KVM fails in three ways on the hosts this runs on: no usable `/dev/kvm`; QEMU aborting at
//! start (`-cpu host` on a nested AMD host: `failed to set MSR 0x10a`); and a guest that never
//! gets past the switch out of real mode (nested hosts where `/dev/kvm` opens and SeaBIOS runs,
//! but Linux never prints). The probe boots a 206-byte firmware (`kvm-probe.S`) under
//! `-accel kvm -cpu host`, exactly as runs use KVM: it prints one letter in real mode, one in
//! 32-bit protected mode and one in 64-bit long mode with paging, then exits QEMU through
//! `isa-debug-exit`. Only a probe that reaches the end makes `auto` choose KVM.
//!
//! The verdict is kept in memory for the process and in `RUN_DIR/accel.json` for every agents
//! process of the host, keyed by the host (name, CPU, kernel, KVM device) and the QEMU binary
//! (path, size, mtime, version): a change of either makes the next process probe again. A
//! request that still meets a KVM failure is retried under TCG, and the verdict is corrected.

use super::launch::{accel_args, describe_status, QemuProcess};
use crate::config::Accel;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The probe firmware's code, as assembled from `kvm-probe.S` (checked by a test).
const PROBE_CODE: [u8; 206] = [
    0xfa, 0xba, 0xf8, 0x03, 0xb0, 0x52, 0xee, 0x2e, 0x66, 0x0f, 0x01, 0x16, 0xc8, 0x00, 0x0f, 0x20,
    0xc0, 0x66, 0x83, 0xc8, 0x01, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x20, 0x00, 0x0f, 0x00, 0x08, 0x00,
    0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x50,
    0xee, 0xbf, 0x00, 0x10, 0x00, 0x00, 0x31, 0xc0, 0xb9, 0x00, 0x0c, 0x00, 0x00, 0xf3, 0xab, 0xc7,
    0x05, 0x00, 0x10, 0x00, 0x00, 0x03, 0x20, 0x00, 0x00, 0xc7, 0x05, 0x00, 0x20, 0x00, 0x00, 0x03,
    0x30, 0x00, 0x00, 0xc7, 0x05, 0x00, 0x30, 0x00, 0x00, 0x83, 0x00, 0x00, 0x00, 0xb8, 0x00, 0x10,
    0x00, 0x00, 0x0f, 0x22, 0xd8, 0x0f, 0x20, 0xe0, 0x83, 0xc8, 0x20, 0x0f, 0x22, 0xe0, 0xb9, 0x80,
    0x00, 0x00, 0xc0, 0x0f, 0x32, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30, 0x0f, 0x20, 0xc0, 0x0d,
    0x00, 0x00, 0x00, 0x80, 0x0f, 0x22, 0xc0, 0xea, 0x8e, 0x00, 0x0f, 0x00, 0x18, 0x00, 0x66, 0xba,
    0xf8, 0x03, 0xb0, 0x4c, 0xee, 0xb0, 0x0a, 0xee, 0x66, 0xba, 0xf4, 0x00, 0xb0, 0x10, 0xee, 0xf4,
    0xeb, 0xfd, 0x8d, 0xb4, 0x00, 0x00, 0x66, 0x90, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xaf, 0x00, 0x1f, 0x00, 0xa8, 0x00, 0x0f, 0x00,
];
/// `jmp far F000:0000` at the reset vector (the last 16 bytes of the image).
const RESET_VECTOR: [u8; 5] = [0xea, 0x00, 0x00, 0x00, 0xf0];
/// What the probe prints: one letter per CPU mode it reached.
const PROBE_OUTPUT: &[u8] = b"RPL\n";
/// `isa-debug-exit` turns the firmware's `out 0xf4, 0x10` into QEMU exit status (0x10 << 1) | 1.
const PROBE_EXIT: i32 = 33;
/// A working KVM finishes the probe in about 0.2 s; a hung one never does.
const PROBE_LIMIT: Duration = Duration::from_secs(5);
/// Bumped when the probe or the file format changes, so old verdicts are not trusted.
const FORMAT: u32 = 1;
/// The remembered verdict, in the (host-local) run directory.
pub const VERDICT_FILE: &str = "accel.json";

/// The 64 KiB `-bios` image: the probe code at its start, the reset vector at its end.
pub fn probe_firmware() -> Vec<u8> {
    let mut img = vec![0xffu8; 64 * 1024];
    img[..PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    img[0xfff0..0xfff0 + RESET_VECTOR.len()].copy_from_slice(&RESET_VECTOR);
    img
}

/// Whether KVM runs guests on this host, and why it was judged so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmVerdict {
    pub usable: bool,
    /// e.g. `QEMU exited (killed by SIGABRT): error: failed to set MSR 0x10a to 0x69 …`.
    pub reason: String,
    /// When it was decided (RFC 3339).
    pub decided_at: String,
    /// `probe`, or the request whose run found KVM broken.
    pub source: String,
}

impl KvmVerdict {
    fn new(usable: bool, reason: impl Into<String>, source: impl Into<String>) -> Self {
        KvmVerdict {
            usable,
            reason: reason.into(),
            decided_at: crate::timefmt::now(),
            source: source.into(),
        }
    }

    /// `kvm: unusable: …` / `kvm: usable: …`, the words `status` and the run log use.
    pub fn describe(&self) -> String {
        let state = if self.usable { "usable" } else { "unusable" };
        format!("kvm: {state}: {}", self.reason)
    }
}

/// The accelerator one run uses, with the reason in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Never `Auto`.
    pub accel: Accel,
    /// What was asked for.
    pub policy: Accel,
    /// Where `policy` came from (`the VM config`, `SQLITE_SIM_ACCEL`).
    pub from: &'static str,
    /// The verdict `auto` was resolved with.
    pub verdict: Option<KvmVerdict>,
}

impl Choice {
    /// `tcg (auto, SQLITE_SIM_ACCEL; kvm: unusable: …)`.
    pub fn describe(&self) -> String {
        match &self.verdict {
            Some(v) => format!(
                "{} (auto, {}; {})",
                self.accel.as_str(),
                self.from,
                v.describe()
            ),
            None => format!("{} (pinned by {})", self.accel.as_str(), self.from),
        }
    }
}

/// Which QEMU binary this is: a change of any field means another QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuIdentity {
    /// The binary as run, resolved through `PATH` and symlinks.
    pub path: String,
    pub size: u64,
    pub mtime: i64,
    /// The first line of `--version`.
    pub version: String,
}

impl QemuIdentity {
    /// Looks at `binary` (a path, or a name found on `PATH`) and asks it its version.
    pub async fn of(binary: &Path) -> QemuIdentity {
        let path = find_binary(binary);
        let meta = std::fs::metadata(&path).ok();
        let version = match tokio::process::Command::new(&path)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .output()
            .await
        {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            Err(e) => format!("not runnable: {e}"),
        };
        QemuIdentity {
            path: path.display().to_string(),
            size: meta.as_ref().map_or(0, |m| m.size()),
            mtime: meta.as_ref().map_or(0, |m| m.mtime()),
            version,
        }
    }
}

/// What a verdict is valid for: this host and this QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HostKey {
    format: u32,
    hostname: String,
    cpu: String,
    kernel: String,
    kvm_device: String,
    /// The device's `st_rdev`, or the error opening it.
    kvm_device_state: String,
    qemu: QemuIdentity,
}

#[derive(Debug, Serialize, Deserialize)]
struct Remembered {
    key: HostKey,
    verdict: KvmVerdict,
}

/// Resolves `auto` for one process; cheap to share behind an `Arc`.
pub struct AccelResolver {
    qemu_binary: PathBuf,
    run_dir: PathBuf,
    kvm_device: PathBuf,
    current: tokio::sync::Mutex<Option<(HostKey, KvmVerdict)>>,
}

impl AccelResolver {
    pub fn new(qemu_binary: &Path, run_dir: &Path, kvm_device: &Path) -> Self {
        AccelResolver {
            qemu_binary: qemu_binary.to_path_buf(),
            run_dir: run_dir.to_path_buf(),
            kvm_device: kvm_device.to_path_buf(),
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The accelerator for a VM: its own `ACCEL` if set, else the process setting.
    pub async fn choose(&self, vm: Option<Accel>, setting: Accel) -> Choice {
        let (policy, from) = match vm {
            Some(a) => (a, "the VM config"),
            None => (setting, "SQLITE_SIM_ACCEL"),
        };
        match policy {
            Accel::Auto => {
                let v = self.kvm().await;
                Choice {
                    accel: if v.usable { Accel::Kvm } else { Accel::Tcg },
                    policy,
                    from,
                    verdict: Some(v),
                }
            }
            pinned => Choice {
                accel: pinned,
                policy,
                from,
                verdict: None,
            },
        }
    }

    /// This host's verdict: remembered by this process, else by another one with the same
    /// host and QEMU, else probed now.
    pub async fn kvm(&self) -> KvmVerdict {
        let mut current = self.current.lock().await;
        if let Some((_, v)) = current.as_ref() {
            return v.clone();
        }
        let key = self.host_key().await;
        let file = self.run_dir.join(VERDICT_FILE);
        let remembered = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Remembered>(&b).ok())
            .filter(|r| r.key == key);
        let verdict = match remembered {
            Some(r) => r.verdict,
            None => {
                let v = self.probe().await;
                tracing::info!(verdict = %v.describe(), "KVM probed");
                self.remember(&key, &v);
                v
            }
        };
        *current = Some((key, verdict.clone()));
        verdict
    }

    /// A run found KVM broken after all: every later `auto` run on this host uses TCG.
    pub async fn record_unusable(&self, reason: String, source: String) {
        let mut current = self.current.lock().await;
        let key = match current.take() {
            Some((k, _)) => k,
            None => self.host_key().await,
        };
        let v = KvmVerdict::new(false, reason, source);
        tracing::warn!(verdict = %v.describe(), "KVM marked unusable by a run");
        self.remember(&key, &v);
        *current = Some((key, v));
    }

    fn remember(&self, key: &HostKey, verdict: &KvmVerdict) {
        let body = Remembered {
            key: key.clone(),
            verdict: verdict.clone(),
        };
        let write = || -> std::io::Result<()> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.run_dir)?;
            // Written aside and renamed, so a reader never sees half a verdict.
            let tmp = self
                .run_dir
                .join(format!("{VERDICT_FILE}.{}", std::process::id()));
            std::fs::write(&tmp, serde_json::to_vec_pretty(&body)?)?;
            std::fs::rename(&tmp, self.run_dir.join(VERDICT_FILE))
        };
        if let Err(e) = write() {
            tracing::warn!(error = %e, "could not remember the KVM verdict");
        }
    }

    async fn host_key(&self) -> HostKey {
        HostKey {
            format: FORMAT,
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            cpu: cpu_model(),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            kvm_device: self.kvm_device.display().to_string(),
            kvm_device_state: match std::fs::metadata(&self.kvm_device) {
                Ok(m) => format!("rdev {}", m.rdev()),
                Err(e) => e.to_string(),
            },
            qemu: QemuIdentity::of(&self.qemu_binary).await,
        }
    }

    /// Runs the probe: the device first (no QEMU needed to see it is missing), then QEMU.
    async fn probe(&self) -> KvmVerdict {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.kvm_device)
        {
            return KvmVerdict::new(
                false,
                format!("{}: {e}", self.kvm_device.display()),
                "probe",
            );
        }
        let dir = self
            .run_dir
            .join(format!("accel-probe-{}", std::process::id()));
        let verdict = match self.probe_in(&dir).await {
            Ok(v) => v,
            Err(e) => KvmVerdict::new(false, format!("the probe could not run: {e}"), "probe"),
        };
        let _ = std::fs::remove_dir_all(&dir);
        verdict
    }

    async fn probe_in(&self, dir: &Path) -> std::io::Result<KvmVerdict> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let (fw, serial, log) = (
            dir.join("probe.bin"),
            dir.join("serial.out"),
            dir.join("qemu.stderr"),
        );
        std::fs::write(&fw, probe_firmware())?;
        let args = probe_args(&fw, &serial);
        let start = Instant::now();
        let mut qemu = QemuProcess::spawn(&self.qemu_binary, &args, &log)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let status = qemu.wait_timeout(PROBE_LIMIT).await;
        let printed = std::fs::read(&serial).unwrap_or_default();
        Ok(judge(
            status.map(|s| (s, qemu.stderr_tail(600))),
            &printed,
            start.elapsed(),
        ))
        // Dropping `qemu` kills a probe that is still hanging.
    }
}

/// QEMU's argv for the probe: KVM as runs use it, the firmware, COM1 into a file, the exit device.
fn probe_args(fw: &Path, serial: &Path) -> Vec<OsString> {
    let mut a = accel_args(Accel::Kvm);
    for s in [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-m",
        "16",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ] {
        a.push(s.into());
    }
    a.push("-bios".into());
    a.push(fw.as_os_str().to_owned());
    let mut ser = OsString::from("file:");
    ser.push(serial);
    a.push("-serial".into());
    a.push(ser);
    a
}

/// The verdict from how the probe ended: `exited` is QEMU's status and stderr if it exited
/// within the limit.
fn judge(
    exited: Option<(std::process::ExitStatus, String)>,
    printed: &[u8],
    took: Duration,
) -> KvmVerdict {
    let reached = match printed {
        [] => "printed nothing",
        [b'R'] => "stopped after real mode (switching to protected mode)",
        [b'R', b'P'] => "stopped in protected mode (switching to long mode)",
        _ => "",
    };
    match exited {
        Some((status, _)) if status.code() == Some(PROBE_EXIT) && printed == PROBE_OUTPUT => {
            KvmVerdict::new(
                true,
                format!(
                    "the probe guest ran in real, protected and long mode in {:.2} s",
                    took.as_secs_f64()
                ),
                "probe",
            )
        }
        Some((status, stderr)) => {
            let words: Vec<&str> = stderr.lines().map(str::trim).collect();
            let words = words.join(" ");
            let words = words.trim_start_matches("qemu-system-x86_64: ");
            KvmVerdict::new(
                false,
                format!("QEMU exited ({}): {words}", describe_status(status)),
                "probe",
            )
        }
        None => KvmVerdict::new(
            false,
            format!(
                "the probe guest {} within {} s (KVM hangs)",
                if reached.is_empty() {
                    "did not finish"
                } else {
                    reached
                },
                PROBE_LIMIT.as_secs()
            ),
            "probe",
        ),
    }
}

/// `qemu-system-x86_64` as the process would run it: a path as given, a bare name from `PATH`.
fn find_binary(binary: &Path) -> PathBuf {
    if binary.components().count() > 1 {
        return std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_path_buf());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .unwrap_or_else(|| binary.to_path_buf())
}

/// The host CPU's model name (a KVM template only fits the CPU it was made on).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn firmware_matches_its_source() {
        let img = probe_firmware();
        assert_eq!(img.len(), 65536);
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/qemu/kvm-probe.S");
        let (obj, bin) = (dir.path().join("p.o"), dir.path().join("p.bin"));
        let assembled = std::process::Command::new("gcc")
            .args(["-c", "-x", "assembler-with-cpp"])
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new("ld")
                .args(["-e", "0", "-Ttext=0", "--oformat", "binary", "-o"])
                .arg(&bin)
                .arg(&obj)
                .status()
                .is_ok_and(|s| s.success());
        if !assembled {
            eprintln!("gcc/ld unavailable: the embedded bytes are not re-checked");
            return;
        }
        assert_eq!(
            std::fs::read(&bin).unwrap(),
            img,
            "kvm-probe.S changed: update PROBE_CODE"
        );
    }

    fn exit(code: i32) -> std::process::ExitStatus {
        std::process::ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn verdicts_say_how_kvm_failed() {
        let ok = judge(
            Some((exit(33), String::new())),
            b"RPL\n",
            Duration::from_millis(210),
        );
        assert!(ok.usable, "{ok:?}");
        assert!(
            ok.describe()
                .starts_with("kvm: usable: the probe guest ran"),
            "{ok:?}"
        );
        let abort = judge(
            Some((
                std::process::ExitStatus::from_raw(6),
                "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n\
                 qemu-system-x86_64: kvm.c:3183: kvm_buf_set_msrs: Assertion failed."
                    .into(),
            )),
            b"",
            Duration::from_millis(60),
        );
        assert!(!abort.usable);
        assert_eq!(
            abort.describe(),
            "kvm: unusable: QEMU exited (killed by SIGABRT): error: failed to set MSR 0x10a to \
             0x69 qemu-system-x86_64: kvm.c:3183: kvm_buf_set_msrs: Assertion failed."
        );
        let hang = judge(None, b"R", PROBE_LIMIT);
        assert!(!hang.usable);
        assert!(hang.reason.contains("stopped after real mode"), "{hang:?}");
        // Exiting without the whole output is not success either.
        assert!(!judge(Some((exit(33), String::new())), b"RP", Duration::ZERO).usable);
    }

    #[test]
    fn choices_name_their_source() {
        let v = KvmVerdict::new(false, "x", "probe");
        let c = Choice {
            accel: Accel::Tcg,
            policy: Accel::Auto,
            from: "SQLITE_SIM_ACCEL",
            verdict: Some(v),
        };
        assert_eq!(
            c.describe(),
            "tcg (auto, SQLITE_SIM_ACCEL; kvm: unusable: x)"
        );
        let pinned = Choice {
            accel: Accel::Kvm,
            policy: Accel::Kvm,
            from: "the VM config",
            verdict: None,
        };
        assert_eq!(pinned.describe(), "kvm (pinned by the VM config)");
    }

    #[tokio::test]
    async fn a_missing_device_needs_no_qemu_and_is_remembered_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let r = AccelResolver::new(
            Path::new("/nonexistent/qemu"),
            dir.path(),
            &dir.path().join("no-kvm"),
        );
        let v = r.kvm().await;
        assert!(!v.usable);
        assert!(v.reason.contains("no-kvm: No such file"), "{v:?}");
        let saved: Remembered =
            serde_json::from_slice(&std::fs::read(dir.path().join(VERDICT_FILE)).unwrap()).unwrap();
        assert_eq!(saved.verdict, v);
        // Another process with the same host and QEMU trusts it; a changed key does not.
        let same = AccelResolver::new(
            Path::new("/nonexistent/qemu"),
            dir.path(),
            &dir.path().join("no-kvm"),
        );
        assert_eq!(same.kvm().await, v);
        let mut changed = saved;
        changed.key.qemu.version = "QEMU emulator version 99".into();
        changed.verdict.reason = "stale".into();
        std::fs::write(
            dir.path().join(VERDICT_FILE),
            serde_json::to_vec(&changed).unwrap(),
        )
        .unwrap();
        let fresh = AccelResolver::new(
            Path::new("/nonexistent/qemu"),
            dir.path(),
            &dir.path().join("no-kvm"),
        );
        assert_ne!(
            fresh.kvm().await.reason,
            "stale",
            "a changed QEMU is probed again"
        );
    }
}

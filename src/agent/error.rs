//! Why a run failed. The message becomes the request's `error`, so every variant says what
//! happened in words an operator can act on.

use crate::qemu::console::ConsoleError;
use crate::qemu::image::ImageError;
use crate::qemu::launch::LaunchError;
use crate::qemu::machine::MachineError;
use crate::qemu::qmp::QmpError;
use thiserror::Error;

/// Why a run failed; the message becomes the request's `error`.
#[derive(Debug, Error)]
pub enum RunError {
    #[error("VM configuration: {0}")]
    Config(#[from] crate::config::vm::VmConfigError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(
        "guest did not reach a shell prompt within {secs} s; last console output: {last_seen:?}"
    )]
    BootTimeout { secs: u64, last_seen: String },
    #[error("timed out after {0} s")]
    Timeout(u32),
    #[error("the template's PREPARE commands did not finish within {0} s")]
    PrepareTimeout(u64),
    #[error("the template's PREPARE commands exited with status {0}")]
    PrepareFailed(i32),
    /// A clone could not be restored (missing or mismatched state, QEMU refusing it, a guest
    /// that does not answer); the run falls back to a cold boot.
    #[error("restoring the template failed: {0}")]
    Restore(String),
    #[error("guest asks for a login but the VM config has no LOGIN_USER")]
    NoLogin,
    #[error("QEMU exited unexpectedly ({status}); stderr: {stderr}")]
    QemuExited { status: String, stderr: String },
    #[error("guest panicked: {0}")]
    GuestPanicked(String),
    #[error("guest shut down before the commands finished ({0})")]
    GuestShutdown(String),
    #[error("console closed before the commands finished; last console output: {0:?}")]
    ConsoleClosed(String),
    #[error("agent stopping")]
    AgentStopping,
    #[error("agent lost its claim (heartbeats failed for a whole lease)")]
    LeaseLost,
    #[error("the guest's shell exited while the commands ran (a new shell prompt appeared)")]
    ShellGone,
    #[error("no console output under KVM")]
    KvmSilent,
    #[error("cancelled")]
    Cancelled,
    #[error("uploading files: {0}")]
    Upload(String),
    #[error("moving files into or out of the guest did not finish within {0} s")]
    FilesTimeout(u64),
    #[error("the commands did not stop within {0} s of a Ctrl-C")]
    InterruptTimeout(u64),
    #[error(
        "CHANNEL=\"virtio\" but the guest has no /dev/virtio-ports/org.sqlite-sim.* ports \
         (is its virtio_console driver loaded?)"
    )]
    NoChannel,
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
}

//! A launched QEMU with its QMP session, and the shutdown ladder that always ends it:
//! ACPI `system_powerdown` → QMP `quit` → SIGTERM → SIGKILL, each step bounded.

use super::launch::{describe_status, LaunchError, QemuProcess, RunPaths};
use super::qmp::{Qmp, QmpError, QmpEvent, QmpEvents};
use crate::model::ShutdownStep;
use nix::sys::signal::Signal;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MachineError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("{source} (QEMU stderr: {stderr})")]
    Qmp { source: QmpError, stderr: String },
}

/// How long QEMU may take to open its QMP socket.
const STARTUP_LIMIT: Duration = Duration::from_secs(15);
/// Bounds of the ladder's later steps.
const QUIT_WAIT: Duration = Duration::from_secs(5);
const SIGTERM_WAIT: Duration = Duration::from_secs(3);
const SIGKILL_WAIT: Duration = Duration::from_secs(5);

pub struct Machine {
    pub process: QemuProcess,
    pub qmp: Qmp,
    pub events: QmpEvents,
    /// Set once the QMP event stream has ended.
    pub qmp_closed: bool,
}

/// What the shutdown ladder did.
#[derive(Debug)]
pub struct ShutdownReport {
    pub step: ShutdownStep,
    pub elapsed: Duration,
    /// QEMU's exit, e.g. `exit status 0`.
    pub status: String,
    /// QMP events seen while shutting down.
    pub events: Vec<QmpEvent>,
}

impl Machine {
    /// Spawns QEMU and negotiates QMP; QEMU is killed if anything fails.
    pub async fn start(
        binary: &Path,
        args: &[OsString],
        paths: &RunPaths,
    ) -> Result<Machine, MachineError> {
        let mut process = QemuProcess::spawn(binary, args, &paths.qemu_log)?;
        process.wait_for_socket(&paths.qmp, STARTUP_LIMIT).await?;
        // The socket file appears at bind(), a moment before listen(): retry refused connects.
        let mut attempt = 0;
        let (qmp, events) = loop {
            match Qmp::connect(&paths.qmp).await {
                Ok(ok) => break ok,
                Err(QmpError::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionRefused && attempt < 200 =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(source) => {
                    let stderr = process.stderr_tail(2048);
                    return Err(MachineError::Qmp { source, stderr });
                }
            }
        };
        Ok(Machine {
            process,
            qmp,
            events,
            qmp_closed: false,
        })
    }

    /// Runs the ladder until QEMU is gone. `grace` bounds the wait for the ACPI power-off;
    /// zero skips it.
    pub async fn shutdown(&mut self, grace: Duration) -> ShutdownReport {
        let start = Instant::now();
        let mut seen = Vec::new();
        let step = self.ladder(grace, &mut seen).await;
        let status = self.process.wait().await;
        ShutdownReport {
            step,
            elapsed: start.elapsed(),
            status: describe_status(status),
            events: seen,
        }
    }

    async fn ladder(&mut self, grace: Duration, seen: &mut Vec<QmpEvent>) -> ShutdownStep {
        if self.process.try_status().is_some() {
            self.collect_events(seen);
            return ShutdownStep::Exited;
        }
        // A zero grace (a paused or hung guest, which could not react) goes straight to `quit`.
        if !grace.is_zero()
            && self
                .qmp
                .execute(&qapi::qmp::system_powerdown {})
                .await
                .is_ok()
            && self.wait_exit(grace, seen).await
        {
            return ShutdownStep::Powerdown;
        }
        if self.process.try_status().is_some() {
            return ShutdownStep::Powerdown;
        }
        // `quit` is answered before QEMU exits; a dead QMP just moves on to signals.
        let _ = self.qmp.execute(&qapi::qmp::quit {}).await;
        if self.wait_exit(QUIT_WAIT, seen).await {
            return ShutdownStep::Quit;
        }
        self.process.signal_group(Signal::SIGTERM);
        if self.wait_exit(SIGTERM_WAIT, seen).await {
            return ShutdownStep::Sigterm;
        }
        self.process.signal_group(Signal::SIGKILL);
        let _ = self.process.wait_timeout(SIGKILL_WAIT).await;
        ShutdownStep::Sigkill
    }

    /// Waits up to `limit` for QEMU to exit, collecting events; true if it exited.
    async fn wait_exit(&mut self, limit: Duration, seen: &mut Vec<QmpEvent>) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            tokio::select! {
                _ = self.process.wait() => {
                    self.collect_events(seen);
                    return true;
                }
                ev = self.events.recv(), if !self.qmp_closed => match ev {
                    Some(ev) => seen.push(ev),
                    None => self.qmp_closed = true,
                },
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    fn collect_events(&mut self, seen: &mut Vec<QmpEvent>) {
        while let Ok(ev) = self.events.try_recv() {
            seen.push(ev);
        }
    }
}

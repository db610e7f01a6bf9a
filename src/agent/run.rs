//! One request's run: prepare, boot, drive the console, shut down, record the outcome.

use super::session::KVM_SILENCE;
use super::session::{log_event, Drive};
use super::AgentContext;
use crate::config::vm::{ConsoleTransport, VmConfig};
use crate::config::Accel;
use crate::model::{AgentId, LogType, Request, ShutdownStep, Status};
use crate::qemu::console::protocol::{ConsoleParser, Session, StderrParser};
use crate::qemu::console::{self, Console, ConsoleError};
use crate::qemu::image::{self, ImageError};
use crate::qemu::launch::{self, LaunchError, LaunchSpec, RunPaths, Wiring};
use crate::qemu::machine::{Machine, MachineError};
use crate::qemu::qmp::QmpError;
use crate::store::sink::LogSink;
use crate::store::Finish;
use std::time::Duration;
use thiserror::Error;
use tracing::Instrument;

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
    #[error("guest asks for a login but the VM config has no LOGIN_USER")]
    NoLogin,
    #[error("guest could not decode the script (is base64 installed in the guest?)")]
    NoDecode,
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
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Runs one claimed request to a terminal state. Never panics the agent; always ends QEMU.
pub(super) async fn execute(ctx: &AgentContext, agent: &AgentId, req: Request) {
    let span = tracing::info_span!("run", request = %req.uuid, vm = %req.vm_name);
    async move {
        let (sink, sink_task) = LogSink::start(ctx.store.clone(), req.uuid);
        sink.write(LogType::Command, req.commands.clone().into_bytes())
            .await;
        sink.system(format!("claimed by agent {agent}")).await;
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let heartbeat = spawn_heartbeat(ctx, agent, &req, lost_tx);
        let outcome = drive(ctx, agent, &req, &sink, lost).await;
        heartbeat.abort();
        let mut fin = Finish {
            shutdown_step: outcome.step,
            boot_ms: outcome.boot_ms,
            run_ms: outcome.run_ms,
            shutdown_ms: outcome.shutdown_ms,
            ..Default::default()
        };
        match &outcome.result {
            Ok(code) => {
                sink.system(format!("commands exited with status {code}")).await;
                fin.status = Status::Done;
                fin.exit_code = Some(*code);
            }
            Err(RunError::Cancelled) => {
                sink.system("cancelled by an operator").await;
                fin.status = Status::Cancelled;
            }
            Err(e) => {
                sink.system(format!("failed: {e}")).await;
                fin.status = Status::Failed;
                fin.error = Some(e.to_string());
            }
        }
        // Every log byte is committed before the request turns terminal.
        drop(sink);
        let stats = sink_task.close().await;
        if stats.lost_bytes > 0 {
            // Never a silent gap: the outcome says the record is incomplete.
            let why = stats.last_error.as_deref().unwrap_or("unknown error");
            let mut error = format!(
                "{} bytes of log output could not be stored ({why})",
                stats.lost_bytes
            );
            if let Some(code) = fin.exit_code {
                error.push_str(&format!("; the commands exited with status {code}"));
            }
            if let Some(e) = &fin.error {
                error.push_str(&format!("; {e}"));
            }
            tracing::error!(lost = stats.lost_bytes, "{error}");
            if fin.status == Status::Done {
                fin.status = Status::Failed;
            }
            fin.error = Some(error);
        }
        tracing::info!(status = %fin.status, exit_code = ?fin.exit_code, log_bytes = stats.bytes, "run finished");
        record_outcome(ctx, agent, &req, fin).await;
    }
    .instrument(span)
    .await
}

/// Records the final state, retrying for a while: a locked or full database may recover.
async fn record_outcome(ctx: &AgentContext, agent: &AgentId, req: &Request, fin: Finish) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=20 {
        match ctx.store.finish(req.uuid, agent, fin.clone()).await {
            Ok(_) => return,
            Err(e) if e.is_full() && ctx.store.release_reserve() => {
                tracing::error!(error = %e, "disk full; retrying with the reserved space");
            }
            Err(e) => {
                tracing::error!(error = %e, attempt, "could not record the outcome; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::error!("gave up recording the outcome; lease recovery will mark it agent lost");
}

/// Renews the lease every third of it. If the claim is gone (another agent recovered the
/// request after heartbeats failed for a whole lease), `lost` turns true and the run stops.
fn spawn_heartbeat(
    ctx: &AgentContext,
    agent: &AgentId,
    req: &Request,
    lost: tokio::sync::watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    let (store, agent, id) = (ctx.store.clone(), agent.clone(), req.uuid);
    let lease = ctx.settings.agent_lease;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(lease / 3).await;
            match store.heartbeat(id, &agent, lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!("lease lost: another agent recovered this request");
                    let _ = lost.send(true);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    })
}

struct Outcome {
    result: Result<i32, RunError>,
    step: Option<ShutdownStep>,
    boot_ms: Option<i64>,
    run_ms: Option<i64>,
    shutdown_ms: Option<i64>,
    /// Console bytes the guest printed.
    console_bytes: u64,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            result: Err(RunError::AgentStopping),
            step: None,
            boot_ms: None,
            run_ms: None,
            shutdown_ms: None,
            console_bytes: 0,
        }
    }
}

async fn drive(
    ctx: &AgentContext,
    agent: &AgentId,
    req: &Request,
    sink: &LogSink,
    lost: tokio::sync::watch::Receiver<bool>,
) -> Outcome {
    let vm = match ctx.catalog.load(&req.vm_name) {
        Ok(vm) => vm,
        Err(e) => {
            return Outcome {
                result: Err(e.into()),
                ..Default::default()
            }
        }
    };
    let choice = ctx.accel.choose(vm.accel, ctx.settings.accel).await;
    sink.system(format!("accelerator: {}", choice.describe()))
        .await;
    // Under `auto`, KVM that breaks anyway (the probe cannot foresee every guest) is retried
    // under TCG in the same request, never failed for it.
    let kvm_watch = choice.policy == Accel::Auto && choice.accel == Accel::Kvm;
    let out = attempt(
        ctx,
        agent,
        req,
        &vm,
        choice.accel,
        kvm_watch,
        sink,
        lost.clone(),
    )
    .await;
    let Some(why) = kvm_watch.then(|| kvm_failure(&out)).flatten() else {
        return out;
    };
    sink.system(format!("KVM failed ({why}): retrying under TCG"))
        .await;
    // The failed attempt's directory may have been kept for inspection; the retry needs its own.
    RunPaths::new(&ctx.settings.run_dir, &req.uuid.to_string()).remove();
    let retry = attempt(ctx, agent, req, &vm, Accel::Tcg, false, sink, lost).await;
    if retry.console_bytes > 0 {
        // TCG got further on the same guest: the fault was KVM's, so stop choosing it.
        ctx.accel
            .record_unusable(why, format!("request {}", req.uuid))
            .await;
        sink.system("KVM is marked unusable on this host for ACCEL=auto")
            .await;
    }
    retry
}

/// Why a run under `auto`'s KVM failed in a way TCG may not: silence, or QEMU ending before the
/// guest printed anything. `None` for every other outcome.
fn kvm_failure(out: &Outcome) -> Option<String> {
    match &out.result {
        Err(RunError::KvmSilent) => Some(format!(
            "no console output within {} s",
            KVM_SILENCE.as_secs()
        )),
        Err(e @ (RunError::Launch(_) | RunError::Machine(_) | RunError::QemuExited { .. }))
            if out.console_bytes == 0 =>
        {
            Some(e.to_string())
        }
        _ => None,
    }
}

/// One boot of the VM: run directory, QEMU, console, commands, shutdown ladder.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    ctx: &AgentContext,
    agent: &AgentId,
    req: &Request,
    vm: &VmConfig,
    accel: Accel,
    kvm_watch: bool,
    sink: &LogSink,
    lost: tokio::sync::watch::Receiver<bool>,
) -> Outcome {
    let mut out = Outcome::default();
    let paths = RunPaths::new(&ctx.settings.run_dir, &req.uuid.to_string());
    if let Err(e) = paths.create() {
        out.result = Err(e.into());
        return out;
    }
    let mut machine = match boot_machine(ctx, vm, req, &paths, accel, sink).await {
        Ok(m) => m,
        Err(e) => {
            finish_dir(ctx, &paths, false);
            out.result = Err(e);
            return out;
        }
    };
    let token = Session::random_token();
    let (result, held, console) = match attach_console(vm, &paths, &machine, &token, sink).await {
        Err(e) => (Err(e), false, None),
        Ok(mut console) => {
            let mut d = Drive::new(ctx, agent, req, vm, &mut machine, &mut console, sink, lost);
            d.kvm_watch = kvm_watch;
            let result = d.run(&token).await;
            let held = d.is_held();
            (out.boot_ms, out.run_ms) = d.timings();
            if result.is_err() {
                console.interrupt();
            }
            (result, held, Some(console))
        }
    };
    let report = shut_down(&mut machine, grace(ctx, vm, &result, held), sink).await;
    (out.step, out.shutdown_ms) = (Some(report.0), Some(report.1));
    if let Some(console) = console {
        out.console_bytes = console.received();
        // QEMU is gone: the pumps reach end of stream and every byte reaches the sink.
        console.drain(Duration::from_secs(2)).await;
    }
    let keep = result.is_err() && !matches!(result, Err(RunError::KvmSilent));
    finish_dir(ctx, &paths, !keep);
    out.result = result;
    out
}

/// How long the ladder waits for an ACPI power-off: the VM's `SHUTDOWN_TIMEOUT` normally, the
/// short cancel grace when an operator or a stopping agent ends the run, none for a paused VM
/// (its vCPUs could not react).
fn grace(
    ctx: &AgentContext,
    vm: &VmConfig,
    result: &Result<i32, RunError>,
    held: bool,
) -> Duration {
    match result {
        // A paused or hung guest cannot react to ACPI.
        _ if held => Duration::ZERO,
        Err(RunError::KvmSilent) => Duration::ZERO,
        Err(RunError::Cancelled | RunError::AgentStopping | RunError::LeaseLost) => {
            ctx.settings.cancel_grace
        }
        _ => vm.shutdown_timeout,
    }
}

fn finish_dir(ctx: &AgentContext, paths: &RunPaths, ok: bool) {
    if ok || !ctx.settings.keep_failed_runs {
        paths.remove();
    } else {
        tracing::info!(dir = %paths.dir.display(), "keeping the failed run's directory");
    }
}

/// Overlay, argv, spawn, QMP handshake. QEMU is paused (`-S`).
async fn boot_machine(
    ctx: &AgentContext,
    vm: &VmConfig,
    req: &Request,
    paths: &RunPaths,
    accel: Accel,
    sink: &LogSink,
) -> Result<Machine, RunError> {
    let s = &ctx.settings;
    if let Some(base) = &vm.image {
        image::create_overlay(
            &image::qemu_img_for(&s.qemu_binary),
            base,
            vm.format,
            &paths.overlay,
        )
        .await?;
    }
    let spec = LaunchSpec {
        vm,
        accel,
        paths,
        disk: vm.image.as_ref().map(|_| paths.overlay.as_path()),
        name: format!("sqlite-sim-{}", req.uuid.short()),
    };
    let args = launch::qemu_args(&spec, Wiring::Agent);
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    sink.system(format!(
        "starting {} ({}) {}",
        s.qemu_binary.display(),
        accel.as_str(),
        shown.join(" ")
    ))
    .await;
    let machine = Machine::start(&s.qemu_binary, &args, paths).await?;
    sink.system(format!(
        "QEMU {} running as pid {}, QMP connected",
        machine.qmp.version(),
        machine.process.pid()
    ))
    .await;
    Ok(machine)
}

/// Connects the console (and the stderr port when configured) before the vCPUs run.
async fn attach_console(
    vm: &VmConfig,
    paths: &RunPaths,
    machine: &Machine,
    token: &str,
    sink: &LogSink,
) -> Result<Console, RunError> {
    let (r, w) = match vm.console {
        ConsoleTransport::Socket => console::connect_socket(&paths.console).await?,
        ConsoleTransport::Pty => {
            let devs = machine.qmp.execute(&qapi::qmp::query_chardev {}).await?;
            let pty = devs
                .iter()
                .find(|d| d.label == launch::CONSOLE_CHARDEV)
                .and_then(|d| d.filename.strip_prefix("pty:"))
                .ok_or_else(|| {
                    RunError::Qmp(QmpError::Handshake("QEMU reported no console pty".into()))
                })?;
            sink.system(format!("console on pty {pty}")).await;
            console::open_pty(std::path::Path::new(pty))?
        }
    };
    // The stderr port is always drained (a chardev nobody reads stalls the guest); it is only
    // parsed as stderr when the VM config says the guest uses it.
    let (er, ew) = console::connect_socket(&paths.stderr_port).await?;
    Ok(Console::start(
        r,
        w,
        ConsoleParser::new(token, vm.prompt.clone()),
        Some((er, ew, StderrParser::new(token))),
        sink.clone(),
    ))
}

/// Runs the shutdown ladder and logs what happened; returns the step and its duration (ms).
async fn shut_down(machine: &mut Machine, grace: Duration, sink: &LogSink) -> (ShutdownStep, i64) {
    let report = machine.shutdown(grace).await;
    for ev in &report.events {
        log_event(sink, ev).await;
    }
    let how = match report.step {
        ShutdownStep::Powerdown => "guest powered off (ACPI)",
        ShutdownStep::Quit => "QMP quit",
        ShutdownStep::Sigterm => "SIGTERM",
        ShutdownStep::Sigkill => "SIGKILL",
        ShutdownStep::Exited => "QEMU had already exited",
    };
    sink.system(format!(
        "VM ended by {how} after {:.2} s ({})",
        report.elapsed.as_secs_f64(),
        report.status
    ))
    .await;
    (report.step, report.elapsed.as_millis() as i64)
}

//! One request's run: prepare, boot, drive the console, shut down, record the outcome.

use super::{AgentContext, LEASE};
use crate::config::vm::{ConsoleTransport, VmConfig};
use crate::model::{AgentId, LogType, Request, ShutdownStep, Status};
use crate::qemu::console::protocol::{
    ConsoleEvent, ConsoleParser, Session, StderrParser, ACK_NODECODE, ACK_READY,
};
use crate::qemu::console::{self, Console, ConsoleError};
use crate::qemu::image::{self, ImageError};
use crate::qemu::launch::{self, describe_status, LaunchError, LaunchSpec, RunPaths, Wiring};
use crate::qemu::machine::{Machine, MachineError};
use crate::qemu::qmp::{QmpError, QmpEvent};
use crate::store::sink::LogSink;
use crate::store::Finish;
use std::time::Duration;
use thiserror::Error;
use tokio::time::Instant;
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
}

/// Runs one claimed request to a terminal state. Never panics the agent; always ends QEMU.
pub(super) async fn execute(ctx: &AgentContext, agent: &AgentId, req: Request) {
    let span = tracing::info_span!("run", request = %req.uuid, vm = %req.vm_name);
    async move {
        let (sink, sink_task) = LogSink::start(ctx.store.clone(), req.uuid);
        sink.write(LogType::Command, req.commands.clone().into_bytes())
            .await;
        sink.system(format!("claimed by agent {agent}")).await;
        let heartbeat = spawn_heartbeat(ctx, agent, &req);
        let outcome = drive(ctx, agent, &req, &sink).await;
        heartbeat.abort();
        let fin = match &outcome.result {
            Ok(code) => {
                sink.system(format!("commands exited with status {code}")).await;
                Finish {
                    status: Status::Done,
                    exit_code: Some(*code),
                    error: None,
                    shutdown_step: outcome.step,
                }
            }
            Err(e) => {
                sink.system(format!("failed: {e}")).await;
                Finish {
                    status: Status::Failed,
                    exit_code: None,
                    error: Some(e.to_string()),
                    shutdown_step: outcome.step,
                }
            }
        };
        // Every log byte is committed before the request turns terminal.
        drop(sink);
        let stats = sink_task.close().await;
        tracing::info!(status = %fin.status, exit_code = ?fin.exit_code, log_bytes = stats.bytes, "run finished");
        if let Err(e) = ctx.store.finish(req.uuid, agent, fin).await {
            tracing::error!(error = %e, "could not record the outcome");
        }
    }
    .instrument(span)
    .await
}

fn spawn_heartbeat(
    ctx: &AgentContext,
    agent: &AgentId,
    req: &Request,
) -> tokio::task::JoinHandle<()> {
    let (store, agent, id) = (ctx.store.clone(), agent.clone(), req.uuid);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(LEASE / 3).await;
            if let Err(e) = store.heartbeat(id, &agent, LEASE).await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    })
}

struct Outcome {
    result: Result<i32, RunError>,
    step: Option<ShutdownStep>,
}

async fn drive(ctx: &AgentContext, agent: &AgentId, req: &Request, sink: &LogSink) -> Outcome {
    let fail = |e: RunError| Outcome {
        result: Err(e),
        step: None,
    };
    let vm = match ctx.catalog.load(&req.vm_name) {
        Ok(vm) => vm,
        Err(e) => return fail(e.into()),
    };
    let paths = RunPaths::new(&ctx.settings.run_dir, &req.uuid.to_string());
    if let Err(e) = paths.create() {
        return fail(e.into());
    }
    let mut machine = match boot_machine(ctx, &vm, req, &paths, sink).await {
        Ok(m) => m,
        Err(e) => {
            finish_dir(ctx, &paths, false);
            return fail(e);
        }
    };
    let token = Session::random_token();
    let (result, step) = match attach_console(&vm, &paths, &machine, &token, sink).await {
        Err(e) => (Err(e), shut_down(&mut machine, &vm, sink).await),
        Ok(mut console) => {
            let result = session(
                ctx,
                agent,
                req,
                &vm,
                &mut machine,
                &mut console,
                &token,
                sink,
            )
            .await;
            if result.is_err() {
                console.interrupt();
            }
            let step = shut_down(&mut machine, &vm, sink).await;
            // QEMU is gone: the pumps reach end of stream and every byte reaches the sink.
            console.drain(Duration::from_secs(2)).await;
            (result, step)
        }
    };
    finish_dir(ctx, &paths, result.is_ok());
    Outcome {
        result,
        step: Some(step),
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
    let accel = vm.accel.unwrap_or(s.accel).resolve();
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

/// Starts the vCPUs and drives the guest from boot to the exit code.
#[allow(clippy::too_many_arguments)]
async fn session(
    ctx: &AgentContext,
    agent: &AgentId,
    req: &Request,
    vm: &VmConfig,
    machine: &mut Machine,
    console: &mut Console,
    token: &str,
    sink: &LogSink,
) -> Result<i32, RunError> {
    machine.qmp.execute(&qapi::qmp::cont {}).await?;
    let started = Instant::now();
    if !ctx
        .store
        .mark_running(req.uuid, agent)
        .await
        .unwrap_or(false)
    {
        tracing::warn!("request was not acknowledged by this agent any more");
    }
    sink.system("vCPUs started").await;
    let run_deadline = started + Duration::from_secs(u64::from(req.timeout));
    // Whichever ends first bounds the boot, and names the error.
    let (boot_deadline, boot_kind) = if started + vm.boot_timeout < run_deadline {
        (
            started + vm.boot_timeout,
            Deadline::Boot(vm.boot_timeout.as_secs()),
        )
    } else {
        (run_deadline, Deadline::Run(req.timeout))
    };
    let mut w = Waiter {
        machine,
        console,
        sink,
        stopping: ctx.stopping.clone(),
        stderr_done: false,
    };

    // Boot: wait for the prompt, logging in when asked.
    loop {
        let ev = w
            .wait_nudging(
                |e| {
                    matches!(
                        e,
                        ConsoleEvent::Prompt | ConsoleEvent::Login | ConsoleEvent::Password
                    )
                },
                boot_deadline,
                boot_kind,
                true,
            )
            .await?;
        match ev {
            ConsoleEvent::Prompt => break,
            ConsoleEvent::Login => {
                let user = vm.login_user.as_deref().ok_or(RunError::NoLogin)?;
                w.console.send(&format!("{user}\n")).await?;
            }
            _ => {
                let pw = vm.login_password.as_deref().unwrap_or("");
                w.console.send(&format!("{pw}\n")).await?;
            }
        }
    }
    sink.system(format!(
        "shell prompt after {:.2} s",
        started.elapsed().as_secs_f64()
    ))
    .await;

    let s = Session::new(token, vm.stderr_device.clone());
    let run = Deadline::Run(req.timeout);
    w.console.send(&s.setup_line()).await?;
    w.wait_ack(ACK_READY, run_deadline, run).await?;
    for (line, word) in s.upload_lines(req.commands.as_bytes()) {
        w.console.send(&line).await?;
        w.wait_ack(&word, run_deadline, run).await?;
    }
    w.console.send(&s.run_line()).await?;
    sink.system("commands started").await;
    let code = match w
        .wait(|e| matches!(e, ConsoleEvent::Exit(_)), run_deadline, run)
        .await?
    {
        ConsoleEvent::Exit(c) => c,
        _ => unreachable!("filtered by the predicate"),
    };
    if vm.stderr_device.is_some() && !w.stderr_done {
        // Stderr travels on its own port: wait (briefly) until it has all arrived.
        let soon = Instant::now() + Duration::from_secs(2);
        if w.wait(|e| *e == ConsoleEvent::StderrEnd, soon, run)
            .await
            .is_err()
        {
            sink.system("stderr end marker not seen within 2 s").await;
        }
    }
    Ok(code)
}

/// Console silence during boot after which the agent sends a newline.
const NUDGE_AFTER: Duration = Duration::from_secs(5);

#[derive(Clone, Copy)]
enum Deadline {
    /// The boot timeout (seconds) expires first.
    Boot(u64),
    Run(u32),
}

/// Waits for console events while watching QEMU, QMP events, the clock and the agent's stop.
struct Waiter<'a> {
    machine: &'a mut Machine,
    console: &'a mut Console,
    sink: &'a LogSink,
    stopping: tokio::sync::watch::Receiver<bool>,
    /// The stderr port's end marker has been seen (it may come before the exit marker).
    stderr_done: bool,
}

impl Waiter<'_> {
    async fn wait_ack(
        &mut self,
        word: &str,
        deadline: Instant,
        d: Deadline,
    ) -> Result<(), RunError> {
        let ev = self
            .wait(
                |e| matches!(e, ConsoleEvent::Ack(w) if w == word || w == ACK_NODECODE),
                deadline,
                d,
            )
            .await?;
        match ev {
            ConsoleEvent::Ack(w) if w == ACK_NODECODE => Err(RunError::NoDecode),
            _ => Ok(()),
        }
    }

    async fn wait(
        &mut self,
        want: impl Fn(&ConsoleEvent) -> bool,
        deadline: Instant,
        d: Deadline,
    ) -> Result<ConsoleEvent, RunError> {
        self.wait_nudging(want, deadline, d, false).await
    }

    /// With `nudge`, a console silent for [`NUDGE_AFTER`] gets a newline, which makes a shell
    /// or getty print its prompt again (a prompt followed by late kernel output is not at the
    /// end of the output any more).
    async fn wait_nudging(
        &mut self,
        want: impl Fn(&ConsoleEvent) -> bool,
        deadline: Instant,
        d: Deadline,
        nudge: bool,
    ) -> Result<ConsoleEvent, RunError> {
        let mut tick = tokio::time::interval_at(Instant::now() + NUDGE_AFTER, NUDGE_AFTER);
        let mut seen = self.console.received();
        loop {
            let m = &mut *self.machine;
            tokio::select! {
                _ = tick.tick(), if nudge => {
                    let now = self.console.received();
                    if now == seen && now > 0 {
                        self.sink.system("console silent; sending a newline").await;
                        self.console.send("\n").await?;
                    }
                    seen = now;
                }
                ev = self.console.next_event() => match ev {
                    Some(ConsoleEvent::Ack(w)) if w == ACK_NODECODE => return Err(RunError::NoDecode),
                    Some(e) if want(&e) => {
                        self.stderr_done |= e == ConsoleEvent::StderrEnd;
                        return Ok(e);
                    }
                    Some(ConsoleEvent::StderrEnd) => self.stderr_done = true,
                    Some(_) => {}
                    None => return Err(self.ended_error()),
                },
                ev = m.events.recv(), if !m.qmp_closed => match ev {
                    Some(ev) => {
                        log_event(self.sink, &ev).await;
                        if let Some(err) = fatal_event(&ev) {
                            return Err(err);
                        }
                    }
                    None => m.qmp_closed = true,
                },
                status = m.process.wait() => {
                    return Err(RunError::QemuExited {
                        status: describe_status(status),
                        stderr: m.process.stderr_tail(2048),
                    });
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(match d {
                        Deadline::Boot(secs) => RunError::BootTimeout {
                            secs,
                            last_seen: self.console.last_seen(),
                        },
                        Deadline::Run(timeout) => RunError::Timeout(timeout),
                    });
                }
                _ = self.stopping.changed() => return Err(RunError::AgentStopping),
            }
        }
    }

    /// The console ended: say why, preferring QEMU's own exit.
    fn ended_error(&mut self) -> RunError {
        match self.machine.process.try_status() {
            Some(status) => RunError::QemuExited {
                status: describe_status(status),
                stderr: self.machine.process.stderr_tail(2048),
            },
            None => RunError::ConsoleClosed(self.console.last_seen()),
        }
    }
}

/// QMP events that end a run at once.
fn fatal_event(ev: &QmpEvent) -> Option<RunError> {
    match ev.name.as_str() {
        "GUEST_PANICKED" => Some(RunError::GuestPanicked(ev.data.to_string())),
        "SHUTDOWN" => {
            let (_, reason) = ev.shutdown_reason().unwrap_or_default();
            Some(RunError::GuestShutdown(reason))
        }
        _ => None,
    }
}

async fn log_event(sink: &LogSink, ev: &QmpEvent) {
    let data = if ev.data.is_null() {
        String::new()
    } else {
        format!(" {}", ev.data)
    };
    let known = if ev.typed.is_some() {
        ""
    } else {
        " (unknown event, raw)"
    };
    sink.system(format!("QMP event {}{data}{known}", ev.name))
        .await;
}

/// Runs the shutdown ladder and logs what happened.
async fn shut_down(machine: &mut Machine, vm: &VmConfig, sink: &LogSink) -> ShutdownStep {
    let report = machine.shutdown(vm.shutdown_timeout).await;
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
    report.step
}

//! Driving a booted guest from `cont` to the exit code, while applying operator control (hold,
//! resume, cancel) and watching QEMU, QMP events, the clock and the agent's own stop.

use super::run::RunError;
use super::AgentContext;
use crate::config::vm::VmConfig;
use crate::model::{AgentId, Request, Status};
use crate::qemu::console::protocol::{
    ConsoleEvent, Runner, Session, ACK_NODECODE, ACK_READY, REPORT_SHELL,
};
use crate::qemu::console::Console;
use crate::qemu::launch::describe_status;
use crate::qemu::machine::Machine;
use crate::qemu::qmp::QmpEvent;
use crate::store::sink::LogSink;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

/// Console silence during boot after which the agent sends a newline, which makes a shell or
/// getty print its prompt again (a prompt followed by late kernel output is no longer at the
/// end of the output).
const NUDGE_AFTER: Duration = Duration::from_secs(5);

/// Under `ACCEL=auto` with KVM, a console still silent after this long means KVM does not
/// work on this host (nested virtualisation can hang silently): the run is retried under TCG.
pub(super) const KVM_SILENCE: Duration = Duration::from_secs(15);
/// After the output ends in a prompt during the commands, how long it must stay silent before
/// the agent probes with a newline.
const PROMPT_QUIET: Duration = Duration::from_secs(2);
/// How soon a second prompt must follow the probe to confirm the shell has gone.
const PROBE_WINDOW: Duration = Duration::from_secs(3);

/// Which limit a wait is bounded by, to name it when it expires.
#[derive(Clone, Copy)]
enum Limit {
    /// The VM's boot timeout (seconds) expires before the request's.
    Boot(u64),
    /// The request's timeout (seconds).
    Run(u32),
}

/// One run's live state.
pub(super) struct Drive<'a> {
    ctx: &'a AgentContext,
    agent: &'a AgentId,
    req: &'a Request,
    vm: &'a VmConfig,
    machine: &'a mut Machine,
    console: &'a mut Console,
    sink: &'a LogSink,
    stopping: watch::Receiver<bool>,
    lost: watch::Receiver<bool>,
    changes: watch::Receiver<u64>,
    /// The stderr port's end marker has been seen (it may come before the exit marker).
    stderr_done: bool,
    held_since: Option<Instant>,
    held_total: Duration,
    started: Option<Instant>,
    prompt_at: Option<Instant>,
    exit_at: Option<Instant>,
    held_at_prompt: Duration,
    /// Watch for a silent console under KVM (`ACCEL=auto` chose KVM).
    pub(super) kvm_watch: bool,
    /// A prompt-like end of output seen during the commands: (when, console bytes then).
    prompt_suspect: Option<(Instant, u64)>,
    /// When the agent sent its probing newline.
    probe_sent: Option<Instant>,
}

impl<'a> Drive<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        ctx: &'a AgentContext,
        agent: &'a AgentId,
        req: &'a Request,
        vm: &'a VmConfig,
        machine: &'a mut Machine,
        console: &'a mut Console,
        sink: &'a LogSink,
        lost: watch::Receiver<bool>,
    ) -> Self {
        Drive {
            lost,
            stopping: ctx.stopping.clone(),
            changes: ctx.store.subscribe(),
            ctx,
            agent,
            req,
            vm,
            machine,
            console,
            sink,
            stderr_done: false,
            held_since: None,
            held_total: Duration::ZERO,
            started: None,
            prompt_at: None,
            exit_at: None,
            held_at_prompt: Duration::ZERO,
            kvm_watch: false,
            prompt_suspect: None,
            probe_sent: None,
        }
    }

    /// The VM is paused by an operator right now.
    pub(super) fn is_held(&self) -> bool {
        self.held_since.is_some()
    }

    /// (boot, run) durations in milliseconds, where reached; time held is excluded.
    pub(super) fn timings(&self) -> (Option<i64>, Option<i64>) {
        let ms = |d: Duration| d.as_millis() as i64;
        let boot = match (self.started, self.prompt_at) {
            (Some(s), Some(p)) => Some(ms((p - s).saturating_sub(self.held_at_prompt))),
            _ => None,
        };
        let run = match (self.prompt_at, self.exit_at) {
            (Some(p), Some(e)) => Some(ms(
                (e - p).saturating_sub(self.held_total - self.held_at_prompt)
            )),
            _ => None,
        };
        (boot, run)
    }

    /// Starts the vCPUs and drives the guest from boot to the commands' exit code.
    pub(super) async fn run(&mut self, token: &str) -> Result<i32, RunError> {
        self.machine.qmp.execute(&qapi::qmp::cont {}).await?;
        let started = Instant::now();
        self.started = Some(started);
        if !self
            .ctx
            .store
            .mark_running(self.req.uuid, self.agent)
            .await?
        {
            tracing::warn!("request no longer acknowledged by this agent");
        }
        self.sink.system("vCPUs started").await;
        // A hold or cancel may have arrived while QEMU was being prepared.
        self.check_control().await?;

        let vm = self.vm;
        let run_deadline = started + Duration::from_secs(u64::from(self.req.timeout));
        let run = Limit::Run(self.req.timeout);
        let (boot_deadline, boot) = if started + vm.boot_timeout < run_deadline {
            (
                started + vm.boot_timeout,
                Limit::Boot(vm.boot_timeout.as_secs()),
            )
        } else {
            (run_deadline, run)
        };
        loop {
            let ev = self
                .wait(
                    |e| {
                        matches!(
                            e,
                            ConsoleEvent::Prompt | ConsoleEvent::Login | ConsoleEvent::Password
                        )
                    },
                    boot_deadline,
                    boot,
                    true,
                )
                .await?;
            match ev {
                ConsoleEvent::Prompt => break,
                ConsoleEvent::Login => {
                    let user = vm.login_user.as_deref().ok_or(RunError::NoLogin)?;
                    self.console.send(&format!("{user}\n")).await?;
                }
                _ => {
                    let pw = vm.login_password.as_deref().unwrap_or("");
                    self.console.send(&format!("{pw}\n")).await?;
                }
            }
        }
        self.prompt_at = Some(Instant::now());
        self.held_at_prompt = self.held_total;
        let boot_secs = self.timings().0.unwrap_or(0) as f64 / 1000.0;
        self.sink
            .system(format!("shell prompt after {boot_secs:.2} s"))
            .await;

        let mut s = Session::new(token, vm.stderr_device.clone());
        self.console.send(&s.setup_line()).await?;
        let reported = match self
            .wait(
                |e| matches!(e, ConsoleEvent::Report { key, .. } if key == REPORT_SHELL),
                run_deadline,
                run,
                false,
            )
            .await?
        {
            ConsoleEvent::Report { value, .. } => value,
            _ => unreachable!("filtered by the predicate"),
        };
        self.wait_ack(ACK_READY, run_deadline, run).await?;
        let (runner, why) = choose_runner(&self.req.commands, vm.shell.as_deref(), &reported);
        self.sink
            .system(format!(
                "commands run by {} ({why})",
                match &runner {
                    Runner::Executable => "their own #! line".to_string(),
                    Runner::Shell(cmd) => cmd.clone(),
                }
            ))
            .await;
        s.set_runner(runner);
        for (line, word) in s.upload_lines(self.req.commands.as_bytes()) {
            self.console.send(&line).await?;
            self.wait_ack(&word, run_deadline, run).await?;
        }
        self.console.send(&s.run_line()).await?;
        self.sink.system("commands started").await;
        let code = match self
            .wait(
                |e| matches!(e, ConsoleEvent::Exit(_)),
                run_deadline,
                run,
                false,
            )
            .await?
        {
            ConsoleEvent::Exit(c) => c,
            _ => unreachable!("filtered by the predicate"),
        };
        self.exit_at = Some(Instant::now());
        if vm.stderr_device.is_some() && !self.stderr_done {
            // Stderr travels on its own port: wait (briefly) until it has all arrived.
            let soon = Instant::now() + Duration::from_secs(2);
            let end = self
                .wait(|e| *e == ConsoleEvent::StderrEnd, soon, run, false)
                .await;
            if end.is_err() {
                self.sink
                    .system("stderr end marker not seen within 2 s")
                    .await;
            }
        }
        Ok(code)
    }

    async fn wait_ack(
        &mut self,
        word: &str,
        deadline: Instant,
        limit: Limit,
    ) -> Result<(), RunError> {
        self.wait(
            |e| matches!(e, ConsoleEvent::Ack(w) if w == word),
            deadline,
            limit,
            false,
        )
        .await
        .map(|_| ())
    }

    /// Waits for a console event matching `want`. The deadline is pushed back by the time the
    /// VM is held and does not run out while it is held. With `nudge`, a silent console gets a
    /// newline every [`NUDGE_AFTER`].
    async fn wait(
        &mut self,
        want: impl Fn(&ConsoleEvent) -> bool,
        deadline: Instant,
        limit: Limit,
        nudge: bool,
    ) -> Result<ConsoleEvent, RunError> {
        let mut nudge_tick = tokio::time::interval_at(Instant::now() + NUDGE_AFTER, NUDGE_AFTER);
        let mut poll = tokio::time::interval(self.ctx.settings.agent_poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seen = self.console.received();
        let mut probe_tick = tokio::time::interval(Duration::from_millis(500));
        let silence_deadline = self.started.unwrap_or_else(Instant::now) + KVM_SILENCE;
        loop {
            let held = self.held_since.is_some();
            let effective = deadline + self.held_total;
            let kvm_silent = self.kvm_watch && !held && self.console.received() == 0;
            let probing = self.prompt_suspect.is_some();
            let m = &mut *self.machine;
            tokio::select! {
                ev = self.console.next_event() => match ev {
                    Some(ConsoleEvent::Ack(w)) if w == ACK_NODECODE => return Err(RunError::NoDecode),
                    Some(ConsoleEvent::KernelPanic(line)) => return Err(RunError::GuestPanicked(line)),
                    Some(ConsoleEvent::PromptDuringCommand) => {
                        if self.probe_sent.is_some_and(|t| t.elapsed() < PROBE_WINDOW) {
                            return Err(RunError::ShellGone);
                        }
                        self.prompt_suspect = Some((Instant::now(), self.console.received()));
                    }
                    Some(e) => {
                        self.stderr_done |= e == ConsoleEvent::StderrEnd;
                        if want(&e) {
                            return Ok(e);
                        }
                    }
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
                _ = tokio::time::sleep_until(effective), if !held => {
                    return Err(match limit {
                        Limit::Boot(secs) => RunError::BootTimeout {
                            secs,
                            last_seen: self.console.last_seen(),
                        },
                        Limit::Run(timeout) => RunError::Timeout(timeout),
                    });
                }
                _ = tokio::time::sleep_until(silence_deadline), if kvm_silent => {
                    return Err(RunError::KvmSilent);
                }
                _ = probe_tick.tick(), if probing && !held => {
                    // The prompt stayed the last thing printed: probe whether a shell is there.
                    if let Some((at, bytes)) = self.prompt_suspect {
                        if self.console.received() != bytes {
                            self.prompt_suspect = None;
                        } else if at.elapsed() >= PROMPT_QUIET {
                            self.prompt_suspect = None;
                            self.probe_sent = Some(Instant::now());
                            self.console.send("\n").await?;
                        }
                    }
                }
                _ = nudge_tick.tick(), if nudge && !held => {
                    let now = self.console.received();
                    if now == seen && now > 0 {
                        self.sink.system("console silent; sending a newline").await;
                        self.console.send("\n").await?;
                    }
                    seen = now;
                }
                // Operator control: at once when this process wrote it, else by polling.
                _ = self.changes.changed() => self.check_control().await?,
                _ = poll.tick() => self.check_control().await?,
                _ = self.stopping.changed() => return Err(RunError::AgentStopping),
                _ = self.lost.changed() => return Err(RunError::LeaseLost),
            }
        }
    }

    /// Applies the request's desired state, if any, through QMP.
    async fn check_control(&mut self) -> Result<(), RunError> {
        let store = &self.ctx.store;
        let (id, agent) = (self.req.uuid, self.agent);
        let desired = match store.desired(id).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading the desired state failed");
                return Ok(());
            }
        };
        match desired {
            None => {}
            Some(Status::Cancelled) => return Err(RunError::Cancelled),
            Some(Status::Hold) if self.held_since.is_none() => {
                self.machine.qmp.execute(&qapi::qmp::stop {}).await?;
                self.held_since = Some(Instant::now());
                store.apply_desired(id, agent, Status::Hold).await?;
                self.sink.system("held: vCPUs stopped (QMP stop)").await;
            }
            Some(Status::Running) if self.held_since.is_some() => {
                self.machine.qmp.execute(&qapi::qmp::cont {}).await?;
                let held = self
                    .held_since
                    .take()
                    .map(|t| t.elapsed())
                    .unwrap_or_default();
                self.held_total += held;
                store.apply_desired(id, agent, Status::Running).await?;
                self.sink
                    .system(format!(
                        "resumed: vCPUs running again (QMP cont) after {:.2} s held",
                        held.as_secs_f64()
                    ))
                    .await;
            }
            // Already in the desired state (a withdrawn hold, a repeated resume): clear it.
            Some(st @ (Status::Hold | Status::Running)) => {
                store.apply_desired(id, agent, st).await?;
            }
            Some(other) => {
                tracing::warn!(desired = %other, "ignoring a desired state agents do not apply")
            }
        }
        Ok(())
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

/// Who runs the commands: their own `#!` line, else the VM's `SHELL`, else the shell that owns
/// the console session (as the guest reported it), else `sh`; with the reason in words.
fn choose_runner(script: &str, configured: Option<&str>, reported: &str) -> (Runner, String) {
    if let Some(line) = script.strip_prefix("#!") {
        let line = line.lines().next().unwrap_or_default().trim();
        return (Runner::Executable, format!("#!{line}"));
    }
    if let Some(cmd) = configured {
        return (
            Runner::Shell(cmd.to_string()),
            "SHELL in the VM config".into(),
        );
    }
    match Runner::for_login_shell(reported) {
        Some(r) => (r, "the console's login shell".into()),
        None => (
            Runner::Shell("sh".into()),
            format!("no usable login shell reported ({reported:?})"),
        ),
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

/// A QMP event as a `system` log line, with QEMU's own timestamp.
pub(super) async fn log_event(sink: &LogSink, ev: &QmpEvent) {
    let data = if ev.data.is_null() {
        String::new()
    } else {
        format!(" {}", ev.data)
    };
    let at = ev
        .timestamp
        .map(|(s, us)| format!(" at {s}.{us:06}"))
        .unwrap_or_default();
    let known = if ev.typed.is_some() {
        ""
    } else {
        " (unknown event, raw)"
    };
    sink.system(format!("QMP event {}{data}{at}{known}", ev.name))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_precedence() {
        let sh = |c: &str| Runner::Shell(c.into());
        assert_eq!(
            choose_runner("#!/bin/sh\necho", Some("/bin/bash"), "/usr/bin/bash").0,
            Runner::Executable
        );
        assert_eq!(
            choose_runner("echo", Some("/bin/bash"), "/bin/busybox").0,
            sh("/bin/bash")
        );
        assert_eq!(
            choose_runner("echo", None, "/usr/bin/bash"),
            (sh("/usr/bin/bash"), "the console's login shell".into())
        );
        assert_eq!(
            choose_runner("echo", None, "/bin/busybox").0,
            sh("/bin/busybox sh")
        );
        for odd in [
            "",
            "bash",
            "/usr/bin/ba sh",
            "/x;y",
            "/usr/bin/bash (deleted)",
        ] {
            assert_eq!(choose_runner("echo", None, odd).0, sh("sh"), "{odd:?}");
        }
    }
}

//! A launched QEMU with its console attached: what every phase of a run waits on. Waiting means
//! watching, all at once, the console's events, QMP events, QEMU's exit, the deadline, operator
//! control (hold, resume, cancel, applied through QMP), the agent's own stop and its lease.

use super::error::RunError;
use crate::model::{AgentId, LogType, RequestId, Status};
use crate::qemu::console::protocol::ConsoleEvent;
use crate::qemu::console::Console;
use crate::qemu::launch::describe_status;
use crate::qemu::machine::{Machine, ShutdownReport};
use crate::qemu::qmp::QmpEvent;
use crate::store::sink::LogSink;
use crate::store::Store;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

/// Console silence after which the agent sends a newline while booting, which makes a shell or
/// getty print its prompt again (a prompt followed by late kernel output is no longer at the
/// end of the output).
const NUDGE_AFTER: Duration = Duration::from_secs(5);
/// Under `ACCEL=auto` with KVM, a console still silent this long after `cont` means KVM does
/// not run this guest: the run is retried under TCG.
pub(super) const KVM_SILENCE: Duration = Duration::from_secs(15);
/// After the output ends in a prompt during the commands, how long it must stay silent before
/// the agent probes with a newline.
const PROMPT_QUIET: Duration = Duration::from_secs(2);
/// How soon a second prompt must follow the probe to confirm the shell has gone.
const PROBE_WINDOW: Duration = Duration::from_secs(3);
/// How often keystrokes queued by an API in another process are looked for (in-process ones
/// wake the VM at once through the store's change notification).
pub(super) const INPUT_POLL: Duration = Duration::from_millis(100);

/// Which limit a wait is bounded by, to name it when it expires.
#[derive(Debug, Clone, Copy)]
pub(super) enum Limit {
    /// The VM's boot timeout (seconds) expires before the request's.
    Boot(u64),
    /// The request's timeout (seconds).
    Run(u32),
    /// A template's `PREPARE` commands (seconds).
    Prepare(u64),
    /// A restored clone's set-up (seconds).
    Restore(u64),
    /// Files moving into or out of the guest (seconds).
    Files(u64),
    /// The commands' end after a Ctrl-C (seconds).
    Interrupt(u64),
}

/// A wait's end, pushed back by the time the VM is held.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    pub at: Instant,
    pub limit: Limit,
}

/// The request a VM runs, so operator control reaches it.
pub(super) struct Control {
    pub store: Store,
    pub id: RequestId,
    pub agent: AgentId,
    changes: watch::Receiver<u64>,
}

impl Control {
    pub fn new(store: &Store, id: RequestId, agent: &AgentId) -> Self {
        Control {
            changes: store.subscribe(),
            store: store.clone(),
            id,
            agent: agent.clone(),
        }
    }
}

/// A QEMU whose console is attached. Built paused; phases (see [`super::guest`]) start it.
pub(super) struct Vm {
    pub machine: Machine,
    pub console: Console,
    pub sink: LogSink,
    pub(super) control: Option<Control>,
    poll: Duration,
    pub(super) stopping: watch::Receiver<bool>,
    pub(super) lost: Option<watch::Receiver<bool>>,
    /// When the console must have printed something under KVM (`ACCEL=auto` chose KVM).
    kvm_silence: Option<Instant>,
    held: Hold,
}

/// Operator holds: whether the vCPUs are paused now, and for how long they were before.
#[derive(Debug, Default, Clone, Copy)]
struct Hold {
    since: Option<Instant>,
    total: Duration,
}

impl Vm {
    pub fn new(
        machine: Machine,
        console: Console,
        sink: LogSink,
        stopping: watch::Receiver<bool>,
        poll: Duration,
    ) -> Self {
        Vm {
            machine,
            console,
            sink,
            control: None,
            poll,
            stopping,
            lost: None,
            kvm_silence: None,
            held: Hold::default(),
        }
    }

    /// Operator control of this request, and the lease watch that stops the run if lost.
    pub fn controlled_by(mut self, control: Control, lost: watch::Receiver<bool>) -> Self {
        self.control = Some(control);
        self.lost = Some(lost);
        self
    }

    /// From `cont` on, a silent console for [`KVM_SILENCE`] ends the run as [`RunError::KvmSilent`].
    pub fn watch_kvm_silence(&mut self, from: Instant) {
        self.kvm_silence = Some(from + KVM_SILENCE);
    }

    /// The VM is paused by an operator right now.
    pub fn is_held(&self) -> bool {
        self.held.since.is_some()
    }

    /// Time held so far, a current hold excluded.
    pub fn held_total(&self) -> Duration {
        self.held.total
    }

    /// A deadline `after` from `from`, for [`Vm::wait`].
    pub fn deadline(from: Instant, after: Duration, limit: Limit) -> Deadline {
        Deadline {
            at: from + after,
            limit,
        }
    }

    /// Waits for a console event matching `want`. The deadline is pushed back by the time the
    /// VM is held and does not run out while it is held. With `nudge`, a silent console gets a
    /// newline every [`NUDGE_AFTER`].
    pub async fn wait(
        &mut self,
        want: impl Fn(&ConsoleEvent) -> bool,
        deadline: Deadline,
        nudge: bool,
    ) -> Result<ConsoleEvent, RunError> {
        let mut nudge_tick = tokio::time::interval_at(Instant::now() + NUDGE_AFTER, NUDGE_AFTER);
        let mut poll = tokio::time::interval(self.poll);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seen = self.console.received();
        let mut probe_tick = tokio::time::interval(Duration::from_millis(500));
        let mut input_tick = tokio::time::interval(INPUT_POLL);
        input_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut shell = ShellWatch::default();
        loop {
            let held = self.held.since.is_some();
            // Deadlines count from `cont`: every hold since then pushes them back.
            let effective = deadline.at + self.held.total;
            let kvm_silent = !held && self.console.received() == 0;
            let silence = self.kvm_silence;
            let probing = shell.suspect.is_some();
            let m = &mut self.machine;
            tokio::select! {
                ev = self.console.next_event() => match ev {
                    Some(ConsoleEvent::KernelPanic(line)) => return Err(RunError::GuestPanicked(line)),
                    Some(ConsoleEvent::PromptDuringCommand) => {
                        if shell.probe_sent.is_some_and(|t| t.elapsed() < PROBE_WINDOW) {
                            return Err(RunError::ShellGone);
                        }
                        shell.suspect = Some((Instant::now(), self.console.received()));
                    }
                    Some(e) if want(&e) => return Ok(e),
                    Some(_) => {}
                    None => return Err(self.ended_error().await),
                },
                ev = m.events.recv(), if !m.qmp_closed => match ev {
                    Some(ev) => {
                        log_event(&self.sink, &ev).await;
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
                    return Err(match deadline.limit {
                        Limit::Boot(secs) => RunError::BootTimeout {
                            secs,
                            last_seen: self.console.last_seen(),
                        },
                        Limit::Run(timeout) => RunError::Timeout(timeout),
                        Limit::Prepare(secs) => RunError::PrepareTimeout(secs),
                        Limit::Restore(secs) => RunError::Restore(format!(
                            "the restored guest did not answer within {secs} s"
                        )),
                        Limit::Files(secs) => RunError::FilesTimeout(secs),
                        Limit::Interrupt(secs) => RunError::InterruptTimeout(secs),
                    });
                }
                _ = sleep_until_opt(silence), if kvm_silent && silence.is_some() => {
                    return Err(RunError::KvmSilent);
                }
                _ = probe_tick.tick(), if probing && !held => {
                    // The prompt stayed the last thing printed: probe whether a shell is there.
                    if let Some((at, bytes)) = shell.suspect {
                        if self.console.received() != bytes {
                            shell.suspect = None;
                        } else if at.elapsed() >= PROMPT_QUIET {
                            shell.suspect = None;
                            shell.probe_sent = Some(Instant::now());
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
                _ = changed(&mut self.control) => {
                    self.check_control().await?;
                    self.type_input().await?;
                }
                _ = poll.tick(), if self.control.is_some() => self.check_control().await?,
                _ = input_tick.tick(), if self.control.is_some() => self.type_input().await?,
                _ = self.stopping.changed() => return Err(RunError::AgentStopping),
                _ = lost(&mut self.lost) => return Err(RunError::LeaseLost),
            }
        }
    }

    /// Types what viewers of `/requests/{uuid}/console` sent (queued in the store by the API,
    /// whichever process it runs in), each batch logged as `input` with who typed it.
    pub async fn type_input(&mut self) -> Result<(), RunError> {
        let Some(ctl) = &self.control else {
            return Ok(());
        };
        let batches = match ctl.store.take_input(ctl.id).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "reading console input failed");
                return Ok(());
            }
        };
        for k in batches {
            let line = format!("{}: {}\n", k.who, k.bytes.escape_ascii());
            self.sink.write(LogType::Input, line.into_bytes()).await;
            self.console.send_bytes(&k.bytes).await?;
        }
        Ok(())
    }

    /// Applies the request's desired state, if any, through QMP.
    pub async fn check_control(&mut self) -> Result<(), RunError> {
        let Some(ctl) = &self.control else {
            return Ok(());
        };
        let (store, id, agent) = (ctl.store.clone(), ctl.id, ctl.agent.clone());
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
            Some(Status::Hold) if self.held.since.is_none() => {
                self.machine.qmp.execute(&qapi::qmp::stop {}).await?;
                self.held.since = Some(Instant::now());
                store.apply_desired(id, &agent, Status::Hold).await?;
                self.sink.system("held: vCPUs stopped (QMP stop)").await;
            }
            Some(Status::Running) if self.held.since.is_some() => {
                self.machine.qmp.execute(&qapi::qmp::cont {}).await?;
                let held = self
                    .held
                    .since
                    .take()
                    .map(|t| t.elapsed())
                    .unwrap_or_default();
                self.held.total += held;
                store.apply_desired(id, &agent, Status::Running).await?;
                self.sink
                    .system(format!(
                        "resumed: vCPUs running again (QMP cont) after {:.2} s held",
                        held.as_secs_f64()
                    ))
                    .await;
            }
            // Already in the desired state (a withdrawn hold, a repeated resume): clear it.
            Some(st @ (Status::Hold | Status::Running)) => {
                store.apply_desired(id, &agent, st).await?;
            }
            Some(other) => {
                tracing::warn!(desired = %other, "ignoring a desired state agents do not apply")
            }
        }
        Ok(())
    }

    /// The console ended: say why, preferring QEMU's own exit.
    async fn ended_error(&mut self) -> RunError {
        // The console closes as QEMU exits: give its exit status a moment to be reaped.
        let status = self
            .machine
            .process
            .wait_timeout(Duration::from_millis(500))
            .await;
        match status {
            Some(status) => RunError::QemuExited {
                status: describe_status(status),
                stderr: self.machine.process.stderr_tail(2048),
            },
            None => RunError::ConsoleClosed(self.console.last_seen()),
        }
    }

    /// Runs the shutdown ladder, logs what happened, and drains the console so every byte QEMU
    /// delivered reaches the sink. `grace` bounds the wait for an ACPI power-off.
    pub async fn shut_down(self, grace: Duration) -> ShutdownReport {
        let Vm {
            mut machine,
            console,
            sink,
            ..
        } = self;
        let report = machine.shutdown(grace).await;
        for ev in &report.events {
            log_event(&sink, ev).await;
        }
        sink.system(format!(
            "VM ended by {} after {:.2} s ({})",
            report.step.describe(),
            report.elapsed.as_secs_f64(),
            report.status
        ))
        .await;
        // QEMU is gone: the pumps reach end of stream and every byte reaches the sink.
        console.drain(Duration::from_secs(2)).await;
        report
    }
}

/// A prompt-like end of output seen during the commands, and the probe that checks it.
#[derive(Default)]
struct ShellWatch {
    /// When, and how many console bytes there were then.
    suspect: Option<(Instant, u64)>,
    probe_sent: Option<Instant>,
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn changed(control: &mut Option<Control>) {
    match control {
        Some(c) => {
            if c.changes.changed().await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

pub(super) async fn lost(lost: &mut Option<watch::Receiver<bool>>) {
    match lost {
        Some(l) => {
            if l.wait_for(|lost| *lost).await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

/// QMP events that end a run at once.
pub(super) fn fatal_event(ev: &QmpEvent) -> Option<RunError> {
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

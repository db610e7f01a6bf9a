//! The phases of a guest, as types: a [`Vm`] is started ([`Started`]), brought to a shell
//! prompt with the session set up ([`Ready`]) either by booting ([`Started::boot`]) or by
//! resuming a restored clone ([`Started::resume`]), and then runs commands ([`Exited`]).
//! Everything after [`Ready`] is the same however the guest got there.

use super::error::RunError;
use super::vm::{Deadline, Limit, Vm};
use crate::config::vm::ChannelPolicy;
use crate::config::vm::VmConfig;
use crate::model::Channel;
use crate::qemu::console::protocol::{
    ConsoleEvent, Runner, Session, ACK_READY, REPORT_CHANNEL, REPORT_RNG, REPORT_SHELL, SEED_BYTES,
};
use std::time::Duration;
use tokio::time::Instant;

/// A restored clone must answer its set-up within this long, or the restore failed.
const RESUME_LIMIT: Duration = Duration::from_secs(10);
/// `PREPARE` commands of a template may run this long.
pub(super) const PREPARE_LIMIT: Duration = Duration::from_secs(600);

/// The vCPUs run, since `at`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Started {
    pub at: Instant,
}

/// A shell prompt with the session set up: commands can run.
#[derive(Debug)]
pub(super) struct Ready {
    pub at: Instant,
    /// From `cont` to here, time held excluded.
    pub boot: Duration,
    held_at: Duration,
    pub(super) session: Session,
    /// The console shell's binary, as the guest reported it.
    pub login_shell: String,
    /// How the commands' output and files travel.
    pub channel: Channel,
}

/// What a guest is known to be, from its set-up (or its template's).
#[derive(Debug, Clone)]
pub(super) struct Known {
    pub login_shell: String,
    pub channel: Channel,
}

/// The commands finished.
#[derive(Debug, Clone, Copy)]
pub(super) struct Exited {
    pub code: i32,
    /// From [`Ready`] to the exit marker, time held excluded.
    pub run: Duration,
}

/// The deadlines of a run, counted from `cont`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// For the prompt (and a clone's set-up).
    pub boot: Deadline,
    /// For the commands.
    pub run: Deadline,
}

impl Limits {
    /// A request's: its timeout, and the VM's boot timeout when that expires first.
    pub fn for_request(started: Started, timeout: u32, boot_timeout: Duration) -> Limits {
        let run = Vm::deadline(
            started.at,
            Duration::from_secs(u64::from(timeout)),
            Limit::Run(timeout),
        );
        let boot = if boot_timeout < Duration::from_secs(u64::from(timeout)) {
            Vm::deadline(
                started.at,
                boot_timeout,
                Limit::Boot(boot_timeout.as_secs()),
            )
        } else {
            run
        };
        Limits { boot, run }
    }

    /// A template build's: the boot timeout, then [`PREPARE_LIMIT`] for `PREPARE`.
    pub fn for_template(started: Started, boot_timeout: Duration) -> Limits {
        Limits {
            boot: Vm::deadline(
                started.at,
                boot_timeout,
                Limit::Boot(boot_timeout.as_secs()),
            ),
            run: Vm::deadline(
                started.at,
                boot_timeout + PREPARE_LIMIT,
                Limit::Prepare(PREPARE_LIMIT.as_secs()),
            ),
        }
    }
}

impl Vm {
    /// Starts the vCPUs.
    pub async fn start(&mut self) -> Result<Started, RunError> {
        self.machine.qmp.execute(&qapi::qmp::cont {}).await?;
        self.sink.system("vCPUs started").await;
        Ok(Started { at: Instant::now() })
    }
}

impl Started {
    /// Boots to the shell prompt (answering login prompts from the config), then types the
    /// session set-up.
    pub async fn boot(
        self,
        vm: &mut Vm,
        cfg: &VmConfig,
        token: &str,
        limits: &Limits,
    ) -> Result<Ready, RunError> {
        // A hold or cancel may have arrived while QEMU was being prepared.
        vm.check_control().await?;
        loop {
            let ev = vm
                .wait(
                    |e| {
                        matches!(
                            e,
                            ConsoleEvent::Prompt | ConsoleEvent::Login | ConsoleEvent::Password
                        )
                    },
                    limits.boot,
                    true,
                )
                .await?;
            match ev {
                ConsoleEvent::Prompt => break,
                ConsoleEvent::Login => {
                    let user = cfg.login_user.as_deref().ok_or(RunError::NoLogin)?;
                    vm.console.send(&format!("{user}\n")).await?;
                }
                _ => {
                    let pw = cfg.login_password.as_deref().unwrap_or("");
                    vm.console.send(&format!("{pw}\n")).await?;
                }
            }
        }
        let at_prompt = self.elapsed(vm);
        vm.sink
            .system(format!(
                "shell prompt after {:.2} s",
                at_prompt.as_secs_f64()
            ))
            .await;
        let session = Session::new(token, cfg.stderr_device.clone());
        vm.console.send(&session.setup_line()).await?;
        let login_shell = report(vm, REPORT_SHELL, limits.run).await?;
        let channel = match report(vm, REPORT_CHANNEL, limits.run).await?.as_str() {
            "virtio" if cfg.channel.has_devices() => Channel::Virtio,
            _ => Channel::Console,
        };
        wait_ack(vm, ACK_READY, limits.run).await?;
        if cfg.channel == ChannelPolicy::Virtio && channel != Channel::Virtio {
            return Err(RunError::NoChannel);
        }
        vm.sink
            .system(match channel {
                Channel::Virtio => "guest channel: virtio-serial ports".to_string(),
                Channel::Console => format!(
                    "guest channel: the serial console{}",
                    if cfg.channel.has_devices() {
                        " (the guest has no /dev/virtio-ports: is virtio_console loaded?)"
                    } else {
                        " (CHANNEL=\"console\")"
                    }
                ),
            })
            .await;
        Ok(self.ready(
            vm,
            session,
            Known {
                login_shell,
                channel,
            },
        ))
    }

    /// Brings a restored clone to readiness: the template's shell is already set up, so only
    /// the clone's own set-up is typed (its RNG seed, the clock). `known` is what the
    /// template's guest reported.
    pub async fn resume(
        self,
        vm: &mut Vm,
        cfg: &VmConfig,
        token: &str,
        known: Known,
    ) -> Result<Ready, RunError> {
        let session = Session::new(token, cfg.stderr_device.clone());
        let seed: [u8; SEED_BYTES] = rand::random();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        vm.console.send(&session.resume_line(&seed, now)).await?;
        let limit = Vm::deadline(
            self.at,
            RESUME_LIMIT,
            Limit::Restore(RESUME_LIMIT.as_secs()),
        );
        let rng = report(vm, REPORT_RNG, limit).await?;
        wait_ack(vm, ACK_READY, limit).await?;
        vm.sink
            .system(match rng.as_str() {
                "reseeded" => format!(
                    "guest RNG reseeded from {SEED_BYTES} host bytes (sqsim-reseed); clock set"
                ),
                _ => format!(
                    "{SEED_BYTES} host bytes mixed into /dev/urandom (the guest has no \
                     sqsim-reseed; its kernel reseeds from vmgenid, if it has the driver, or \
                     within a minute); clock set"
                ),
            })
            .await;
        Ok(self.ready(vm, session, known))
    }

    fn elapsed(&self, vm: &Vm) -> Duration {
        self.at.elapsed().saturating_sub(vm.held_total())
    }

    fn ready(self, vm: &Vm, mut session: Session, known: Known) -> Ready {
        session.set_channel(known.channel == Channel::Virtio);
        if known.channel == Channel::Virtio {
            vm.console.output_on_channel();
        }
        Ready {
            at: Instant::now(),
            boot: self.elapsed(vm),
            held_at: vm.held_total(),
            session,
            login_shell: known.login_shell,
            channel: known.channel,
        }
    }

    pub fn known(ready: &Ready) -> Known {
        Known {
            login_shell: ready.login_shell.clone(),
            channel: ready.channel,
        }
    }
}

impl Ready {
    /// Uploads and runs `script`, and waits for its exit marker (and the end of its stderr).
    pub async fn run(
        &mut self,
        vm: &mut Vm,
        cfg: &VmConfig,
        script: &str,
        deadline: Deadline,
    ) -> Result<Exited, RunError> {
        let (runner, why) = choose_runner(script, cfg.shell.as_deref(), &self.login_shell);
        vm.sink
            .system(format!(
                "commands run by {} ({why})",
                match &runner {
                    Runner::Executable => "their own #! line".to_string(),
                    Runner::Shell(cmd) => cmd.clone(),
                }
            ))
            .await;
        self.session.set_runner(runner);
        for (line, word) in self.session.upload_lines(script.as_bytes()) {
            vm.console.send(&line).await?;
            wait_ack(vm, &word, deadline).await?;
        }
        vm.console.send(&self.session.run_line()).await?;
        vm.sink.system("commands started").await;
        let code = match vm
            .wait(|e| matches!(e, ConsoleEvent::Exit(_)), deadline, false)
            .await?
        {
            ConsoleEvent::Exit(c) => c,
            _ => unreachable!("filtered by the predicate"),
        };
        let run = self
            .at
            .elapsed()
            .saturating_sub(vm.held_total() - self.held_at);
        if cfg.stderr_device.is_some() && !vm.console.stderr_done() {
            // Stderr travels on its own port: wait (briefly) until it has all arrived.
            let soon = Vm::deadline(Instant::now(), Duration::from_secs(2), deadline.limit);
            if vm
                .wait(|e| *e == ConsoleEvent::StderrEnd, soon, false)
                .await
                .is_err()
            {
                vm.sink
                    .system("stderr end marker not seen within 2 s")
                    .await;
            }
        }
        Ok(Exited { code, run })
    }
}

pub(super) async fn wait_ack(vm: &mut Vm, word: &str, deadline: Deadline) -> Result<(), RunError> {
    vm.wait(
        |e| matches!(e, ConsoleEvent::Ack(w) if w == word),
        deadline,
        false,
    )
    .await
    .map(|_| ())
}

/// Waits for the guest's `KEY=value` report; its value.
pub(super) async fn report(vm: &mut Vm, key: &str, deadline: Deadline) -> Result<String, RunError> {
    match vm
        .wait(
            |e| matches!(e, ConsoleEvent::Report { key: k, .. } if k == key),
            deadline,
            false,
        )
        .await?
    {
        ConsoleEvent::Report { value, .. } => Ok(value),
        _ => unreachable!("filtered by the predicate"),
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

    #[test]
    fn a_short_timeout_bounds_the_boot_too() {
        let started = Started { at: Instant::now() };
        let l = Limits::for_request(started, 30, Duration::from_secs(60));
        assert!(matches!(l.boot.limit, Limit::Run(30)));
        let l = Limits::for_request(started, 300, Duration::from_secs(60));
        assert!(matches!(l.boot.limit, Limit::Boot(60)));
        assert!(matches!(l.run.limit, Limit::Run(300)));
    }
}

//! Keep on failure: a request that asked for `keep_on_failure` and failed after its guest
//! booted (non-zero exit, timeout, a fault while the guest still runs) keeps its VM up for
//! debugging instead of shutting it down. The request stays `running` with `kept_until` set and
//! the console stays open for attaching and typing; the timeout clock no longer runs. The keep
//! ends on release, cancel (or DELETE), expiry, the agent's stop or a lost lease, and the run
//! then goes down the usual shutdown ladder with its original outcome.

use super::error::RunError;
use super::vm::{changed, fatal_event, log_event, lost, Vm, INPUT_POLL};
use super::AgentContext;
use crate::model::Request;
use std::time::Duration;
use thiserror::Error;
use tokio::time::{Instant, MissedTickBehavior};

/// Why a keep could not be set up (the run then shuts down as it would have).
#[derive(Debug, Error)]
pub(super) enum KeepError {
    #[error("recording kept_until: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the request is no longer this agent's")]
    NotOwned,
    #[error("giving the shell back: {0}")]
    Console(#[from] crate::qemu::console::ConsoleError),
}

/// Why a keep ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeepEnd {
    Released,
    Expired,
    /// By `PUT /status cancelled` or `DELETE`.
    Cancelled,
    AgentStopping,
    LeaseLost,
    /// QEMU or the guest ended on its own (power-off, crash).
    VmEnded(String),
}

impl KeepEnd {
    fn describe(&self) -> String {
        match self {
            KeepEnd::Released => "released by an operator".into(),
            KeepEnd::Expired => "keep_on_failure expired".into(),
            KeepEnd::Cancelled => "cancelled by an operator".into(),
            KeepEnd::AgentStopping => "the agent is stopping".into(),
            KeepEnd::LeaseLost => "the agent lost its claim".into(),
            KeepEnd::VmEnded(why) => format!("the VM ended on its own ({why})"),
        }
    }

    /// Whether the ladder gets only the short cancel grace (an operator or the agent is in a
    /// hurry), rather than the VM's `SHUTDOWN_TIMEOUT`.
    pub fn hurried(&self) -> bool {
        matches!(
            self,
            KeepEnd::Cancelled | KeepEnd::AgentStopping | KeepEnd::LeaseLost
        )
    }
}

/// A finished keep: how long the VM was kept and why it ended.
#[derive(Debug, Clone)]
pub(super) struct Kept {
    pub kept: Duration,
    pub end: KeepEnd,
}

/// Why this outcome is worth keeping the VM for, or `None`: only failures after the guest
/// booted whose VM still runs, and never an end an operator or the agent asked for.
pub(super) fn reason(result: &Result<i32, RunError>, booted: bool) -> Option<String> {
    if !booted {
        return None;
    }
    match result {
        Ok(0) => None,
        Ok(code) => Some(format!("the commands exited with status {code}")),
        Err(
            RunError::Cancelled
            | RunError::AgentStopping
            | RunError::LeaseLost
            | RunError::QemuExited { .. }
            | RunError::ConsoleClosed(_)
            | RunError::GuestShutdown(_)
            | RunError::GuestPanicked(_)
            | RunError::KvmSilent
            | RunError::Store(_),
        ) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Keeps the VM if the request asked for it and its outcome is a keepable failure; `None` when
/// it is not kept. The console keeps being drained and typed into throughout.
pub(super) async fn keep_if_asked(
    ctx: &AgentContext,
    req: &Request,
    vm: &mut Vm,
    result: &Result<i32, RunError>,
    booted: bool,
) -> Option<Kept> {
    let secs = req.keep_on_failure?;
    let why = reason(result, booted)?;
    let since = Instant::now();
    match begin(ctx, req, vm, secs, &why, result.is_err()).await {
        Ok(()) => {}
        Err(e) => {
            vm.sink
                .system(format!("not kept after the failure ({why}): {e}"))
                .await;
            return None;
        }
    }
    let end = vm.stay(since + Duration::from_secs(u64::from(secs))).await;
    let kept = since.elapsed();
    vm.sink
        .system(format!(
            "keep ended after {:.1} s: {}; shutting the VM down (the outcome stays that of the failure)",
            kept.as_secs_f64(),
            end.describe()
        ))
        .await;
    Some(Kept { kept, end })
}

async fn begin(
    ctx: &AgentContext,
    req: &Request,
    vm: &mut Vm,
    secs: u32,
    why: &str,
    interrupt: bool,
) -> Result<(), KeepError> {
    let until =
        crate::timefmt::format(time::OffsetDateTime::now_utc() + Duration::from_secs(secs.into()));
    let agent = vm
        .control
        .as_ref()
        .map(|c| c.agent.clone())
        .ok_or(KeepError::NotOwned)?;
    if !ctx.store.mark_kept(req.uuid, &agent, until.clone()).await? {
        return Err(KeepError::NotOwned);
    }
    // Commands still running (a timeout, a fault) get a Ctrl-C, so the shell is back; the pause
    // lets the shell handle it first (a Ctrl-C flushes what the tty holds). Then a terminal a
    // person can use: echo and output processing on again (the session turned them off), and
    // a visible prompt.
    vm.console.interrupt();
    if interrupt {
        vm.console.send("\u{3}").await?;
        tokio::time::sleep(INTERRUPT_SETTLE).await;
    }
    vm.console.send(KEPT_SHELL_SETUP).await?;
    vm.sink
        .system(format!(
            "kept for up to {secs} s (until {until}) after the failure: {why}. Attach with \
             `sqlite-sim cli attach {}`; it ends on release (PUT /status {{\"status\":\"release\"}}), \
             cancel, DELETE, expiry or the agent's stop",
            req.uuid
        ))
        .await;
    Ok(())
}

/// How long a shell gets to handle a Ctrl-C before the kept shell's set-up is typed.
const INTERRUPT_SETTLE: Duration = Duration::from_millis(500);

/// Typed into a kept VM's shell: a usable terminal for a person (the session set-up turned
/// echo and output processing off and emptied the prompt).
pub(super) const KEPT_SHELL_SETUP: &str = "stty sane 2>/dev/null; PS1='(kept) # '\n";

impl Vm {
    /// Keeps the VM up until `deadline` or until something ends the keep; applies holds and
    /// resumes, types console input, logs QMP events.
    async fn stay(&mut self, deadline: Instant) -> KeepEnd {
        let mut input_tick = tokio::time::interval(INPUT_POLL);
        input_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (store, id) = match &self.control {
            Some(c) => (c.store.clone(), c.id),
            None => return KeepEnd::Expired,
        };
        loop {
            let m = &mut self.machine;
            let check = tokio::select! {
                ev = self.console.next_event() => match ev {
                    Some(_) => false,
                    None => return KeepEnd::VmEnded("the console closed".into()),
                },
                ev = m.events.recv(), if !m.qmp_closed => match ev {
                    Some(ev) => {
                        log_event(&self.sink, &ev).await;
                        if let Some(e) = fatal_event(&ev) {
                            return KeepEnd::VmEnded(e.to_string());
                        }
                        false
                    }
                    None => {
                        m.qmp_closed = true;
                        false
                    }
                },
                status = m.process.wait() => {
                    return KeepEnd::VmEnded(crate::qemu::launch::describe_status(status));
                }
                _ = tokio::time::sleep_until(deadline) => return KeepEnd::Expired,
                _ = changed(&mut self.control) => true,
                _ = input_tick.tick() => true,
                _ = self.stopping.changed() => return KeepEnd::AgentStopping,
                _ = lost(&mut self.lost) => return KeepEnd::LeaseLost,
            };
            if !check {
                continue;
            }
            match self.check_control().await {
                Ok(()) => {}
                Err(RunError::Cancelled) => return KeepEnd::Cancelled,
                Err(e) => return KeepEnd::VmEnded(e.to_string()),
            }
            if let Err(e) = self.type_input().await {
                return KeepEnd::VmEnded(e.to_string());
            }
            match store.kept(id).await {
                Ok(Some(k)) if k.released => return KeepEnd::Released,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading the keep state failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_after_boot_whose_vm_still_runs_are_kept() {
        assert_eq!(reason(&Ok(0), true), None);
        assert!(reason(&Ok(1), true).unwrap().contains("status 1"));
        assert_eq!(reason(&Ok(1), false), None, "never booted");
        assert!(reason(&Err(RunError::Timeout(5)), true)
            .unwrap()
            .contains("timed out"));
        assert!(reason(&Err(RunError::ShellGone), true).is_some());
        for ended in [
            RunError::Cancelled,
            RunError::AgentStopping,
            RunError::LeaseLost,
            RunError::GuestShutdown("x".into()),
            RunError::ConsoleClosed("x".into()),
        ] {
            assert_eq!(reason(&Err(ended), true), None);
        }
    }

    #[test]
    fn operators_and_stopping_agents_hurry_the_ladder() {
        assert!(KeepEnd::Cancelled.hurried());
        assert!(KeepEnd::AgentStopping.hurried());
        assert!(!KeepEnd::Released.hurried());
        assert!(!KeepEnd::Expired.hurried());
    }
}

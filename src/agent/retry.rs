//! Which failures of a run are the infrastructure's (re-queued while the request has retries
//! left, see `store/retry.rs`) and which are the request's own (final). One exhaustive
//! `match`, so a new [`RunError`] variant must be decided here.
//!
//! Retried: QEMU or its sockets failing (launch, image, QMP, machine, console), QEMU exiting
//! unexpectedly, a boot timeout, KVM silence, a clone that did not restore, the agent stopping
//! or losing its claim, and database trouble during the run. Never retried: the commands' own
//! outcome (their exit status is `done`; their timeout; their shell exiting; the guest they ran
//! in shutting down or panicking), cancellation, and what would fail again the same way: a bad
//! VM config (`NoLogin`, `NoChannel`), a template's `PREPARE` commands, the submission's files.
//!
//! The guest's panic is not retried: it may be the commands' doing (a crashing module, a
//! sysrq), and a kernel that panics while booting a fixed image would panic again.

use super::error::RunError;
use super::AgentContext;
use crate::model::Request;
use crate::qemu::launch::RunPaths;

/// Which attempt a claimed run is, for its first log line: empty for a request without
/// retries, ` (attempt N of M)` otherwise.
pub(super) fn which(req: &Request) -> String {
    if req.retries == 0 {
        return String::new();
    }
    format!(" (attempt {} of {})", req.attempt, req.retries + 1)
}

/// Before a later attempt: whatever an earlier one left in the request's run directory goes,
/// so this attempt starts in a fresh one. A QEMU that survived there (its agent lost on this
/// host) is killed; a directory kept for inspection (`SQLITE_SIM_KEEP_FAILED_RUNS`) is moved
/// aside as `<uuid>.attempt-N`, anything else is removed.
pub(super) fn clear_previous(ctx: &AgentContext, req: &Request) {
    if req.attempt < 2 {
        return;
    }
    let paths = RunPaths::new(&ctx.settings.run_dir, &req.uuid.to_string());
    if !paths.dir.exists() {
        return;
    }
    super::recovery::kill_leftover_qemu(&paths.dir);
    if ctx.settings.keep_failed_runs {
        let aside = ctx
            .settings
            .run_dir
            .join(format!("{}.attempt-{}", req.uuid, req.attempt - 1));
        match std::fs::rename(&paths.dir, &aside) {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(dir = %paths.dir.display(), error = %e, "could not set the failed attempt's directory aside; removing it")
            }
        }
    }
    paths.remove();
}

/// Whether `e` is an infrastructure failure, worth another attempt on a fresh VM.
pub(super) fn retryable(e: &RunError) -> bool {
    match e {
        RunError::Image(_)
        | RunError::Launch(_)
        | RunError::Machine(_)
        | RunError::Qmp(_)
        | RunError::Console(_)
        | RunError::BootTimeout { .. }
        | RunError::Restore(_)
        | RunError::QemuExited { .. }
        | RunError::ConsoleClosed(_)
        | RunError::AgentStopping
        | RunError::LeaseLost
        | RunError::KvmSilent
        | RunError::Store(_) => true,
        RunError::Config(_)
        | RunError::Timeout(_)
        | RunError::PrepareTimeout(_)
        | RunError::PrepareFailed(_)
        | RunError::NoLogin
        | RunError::GuestPanicked(_)
        | RunError::GuestShutdown(_)
        | RunError::ShellGone
        | RunError::Cancelled
        | RunError::Upload(_)
        | RunError::FilesTimeout(_)
        | RunError::InterruptTimeout(_)
        | RunError::NoChannel => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infrastructure_failures_are_retried_the_requests_own_are_not() {
        let qemu = RunError::QemuExited {
            status: "signal 9".into(),
            stderr: String::new(),
        };
        let boot = RunError::BootTimeout {
            secs: 60,
            last_seen: String::new(),
        };
        for e in [
            qemu,
            boot,
            RunError::ConsoleClosed("x".into()),
            RunError::AgentStopping,
        ] {
            assert!(retryable(&e), "{e}");
        }
        for e in [
            RunError::Timeout(5),
            RunError::Cancelled,
            RunError::ShellGone,
            RunError::GuestPanicked("x".into()),
            RunError::GuestShutdown("x".into()),
            RunError::NoLogin,
            RunError::PrepareFailed(1),
        ] {
            assert!(!retryable(&e), "{e}");
        }
    }
}

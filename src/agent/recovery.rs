//! Recovery after crashes: requests whose agent stopped heart-beating, and leftovers (run
//! directories, QEMU processes) of runs whose agent died.

use super::AgentContext;
use crate::model::{RequestId, Status};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::Path;
use std::time::Duration;

/// Fails or re-queues requests with expired leases; logs what it did.
pub async fn reap(ctx: &AgentContext) {
    match ctx.store.reap_expired().await {
        Ok(reaped) => {
            for (id, status) in reaped {
                tracing::warn!(request = %id, now = %status, "recovered a request whose agent was lost");
            }
            // Re-queued work may be claimable now.
            ctx.wake.notify_waiters();
        }
        Err(e) => tracing::warn!(error = %e, "lease recovery failed"),
    }
    // A submission whose API process died mid-upload leaves staged files no request owns.
    let before = crate::timefmt::format(time::OffsetDateTime::now_utc() - STALE_UPLOAD);
    match ctx.store.drop_stale_uploads(before).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(files = n, "dropped uploads no submission finished"),
        Err(e) => tracing::warn!(error = %e, "dropping stale uploads failed"),
    }
}

/// Age after which a staged upload no request took is abandoned (an upload in progress takes
/// far less: even SQLITE_SIM_MAX_UPLOAD at a slow link's pace).
const STALE_UPLOAD: Duration = Duration::from_secs(3600);

/// Runs [`reap`] and [`clean_leftovers`] every half lease until the process stops (a lost
/// agent's leftovers become removable only once its lease has expired).
pub async fn reaper(ctx: std::sync::Arc<AgentContext>) {
    let mut stopping = ctx.stopping.clone();
    let every = (ctx.settings.agent_lease / 2).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {
                reap(&ctx).await;
                clean_leftovers(&ctx).await;
            }
            _ = stopping.changed() => return,
        }
    }
}

/// Removes run directories (and kills their QEMU, if any survived) of requests that are gone
/// or settled. A request still pending or claimed is left alone even if its agent was lost:
/// it may be claimed again at any moment, here or elsewhere, and the attempt that claims it
/// here clears the old directory itself ([`super::retry::clear_previous`]); removing it from
/// here could delete the new attempt's files under its feet.
pub async fn clean_leftovers(ctx: &AgentContext) {
    super::template::clean_leftovers(&ctx.settings.run_dir);
    super::pool::clean_leftovers(&ctx.settings.run_dir);
    crate::qemu::image::clean_leftovers(&ctx.settings.run_dir);
    let Ok(entries) = std::fs::read_dir(&ctx.settings.run_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<RequestId>().ok())
        else {
            continue; // slots/, console-* runs: not ours to judge
        };
        let status = match ctx.store.get(id).await {
            Ok(r) => r.map(|r| r.status),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a leftover run; kept");
                continue;
            }
        };
        // A settled request never runs again, so nothing can be recreating its directory.
        if status.is_some_and(|s| !s.is_terminal()) {
            continue;
        }
        if ctx.settings.keep_failed_runs && status == Some(Status::Failed) {
            continue; // kept on purpose for inspection
        }
        tracing::warn!(request = %id, "cleaning up a run whose agent was lost");
        kill_leftover_qemu(&path);
        tracing::info!(dir = %path.display(), "removing a leftover run directory");
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(dir = %path.display(), error = %e, "could not remove a leftover run");
        }
    }
}

/// Kills the QEMU of a run directory whose agent is gone, if one survived.
pub fn kill_leftover_qemu(dir: &Path) {
    if let Some(pid) = leftover_qemu(dir) {
        tracing::warn!(dir = %dir.display(), pid, "killing QEMU left over from a lost agent");
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The pid in `dir/qemu.pid`, if that process is alive and is a QEMU of this run (its command
/// line names the run directory), so a recycled pid is never killed.
fn leftover_qemu(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("qemu") && cmdline.contains(&*dir.to_string_lossy())).then_some(pid)
}

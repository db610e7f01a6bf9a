//! Saving a paused VM's device state to a file and loading it into a fresh QEMU, through QMP
//! migration to and from `exec:` URIs (QEMU 7.2 has no `file:` URIs).
//!
//! Guest RAM is not in the state file: templates and clones keep it in a `memory-backend-file`
//! and both sides set `x-ignore-shared`, so the file holds only the devices (about 0.4 MB for
//! the tiny guest) and a restore loads in milliseconds. `events` is set too: QEMU sends the
//! `MIGRATION` events this waits on only when asked to.

use super::machine::Machine;
use super::qmp::QmpError;
use qapi::qmp::{MigrationCapability, MigrationCapabilityStatus};
use std::path::Path;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    #[error("migration {0}")]
    Failed(String),
    #[error("QEMU exited while migrating; stderr: {0}")]
    Exited(String),
    #[error("migration did not complete within {0:?}")]
    Timeout(Duration),
    #[error("state file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

/// Saves a stopped VM's device state into `state`. The VM stays paused.
pub async fn save(
    machine: &mut Machine,
    state: &Path,
    limit: Duration,
) -> Result<Duration, SnapshotError> {
    let start = Instant::now();
    set_capabilities(machine).await?;
    machine
        .qmp
        .execute(&qapi::qmp::migrate {
            uri: Some(format!("exec:cat > {}", shell_quote(state))),
            channels: None,
            detach: None,
            resume: None,
        })
        .await?;
    wait_completed(machine, limit).await?;
    // QEMU reports `completed` when it is done writing; `cat` may still be flushing.
    let size = std::fs::metadata(state).map(|m| m.len()).unwrap_or(0);
    if size == 0 {
        return Err(SnapshotError::Failed(format!(
            "wrote an empty state file {}",
            state.display()
        )));
    }
    Ok(start.elapsed())
}

/// Loads `state` into a QEMU started with `-incoming defer` and the template's arguments. The
/// VM stays paused until `cont`.
pub async fn load(
    machine: &mut Machine,
    state: &Path,
    limit: Duration,
) -> Result<Duration, SnapshotError> {
    let start = Instant::now();
    // A missing file would only show as a migration failure without a reason.
    std::fs::File::open(state).map_err(|source| SnapshotError::File {
        path: state.display().to_string(),
        source,
    })?;
    set_capabilities(machine).await?;
    machine
        .qmp
        .execute(&qapi::qmp::migrate_incoming {
            uri: Some(format!("exec:cat {}", shell_quote(state))),
            channels: None,
            exit_on_error: None,
        })
        .await?;
    wait_completed(machine, limit).await?;
    Ok(start.elapsed())
}

async fn set_capabilities(machine: &Machine) -> Result<(), QmpError> {
    let on = |capability| MigrationCapabilityStatus {
        capability,
        state: true,
    };
    machine
        .qmp
        .execute(&qapi::qmp::migrate_set_capabilities {
            capabilities: vec![
                on(MigrationCapability::x_ignore_shared),
                on(MigrationCapability::events),
            ],
        })
        .await?;
    Ok(())
}

/// Waits for the `MIGRATION` event that ends the migration, watching QEMU's exit too.
async fn wait_completed(machine: &mut Machine, limit: Duration) -> Result<(), SnapshotError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        tokio::select! {
            ev = machine.events.recv(), if !machine.qmp_closed => match ev {
                Some(ev) if ev.name == "MIGRATION" => match ev.data["status"].as_str() {
                    Some("completed") => return Ok(()),
                    Some(s @ ("failed" | "cancelled")) => {
                        let why = machine.process.stderr_tail(600);
                        return Err(SnapshotError::Failed(if why.is_empty() {
                            s.to_string()
                        } else {
                            format!("{s}: {why}")
                        }));
                    }
                    _ => {}
                },
                Some(_) => {}
                None => machine.qmp_closed = true,
            },
            _ = machine.process.wait() => {
                return Err(SnapshotError::Exited(machine.process.stderr_tail(600)));
            }
            _ = tokio::time::sleep_until(deadline) => return Err(SnapshotError::Timeout(limit)),
        }
    }
}

/// `'path'` for QEMU's `exec:` (run by `/bin/sh -c`).
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_paths_are_quoted_for_the_shell() {
        assert_eq!(shell_quote(Path::new("/r/t/state")), "'/r/t/state'");
        assert_eq!(shell_quote(Path::new("/r/it's")), r"'/r/it'\''s'");
    }
}

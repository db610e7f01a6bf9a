//! The pool: for a VM with `WARM_POOL="N"`, N clones of its template kept restored and paused,
//! so a run pays only for attaching its console and `cont`.
//!
//! The pool belongs to one agents process: its clones die with it (they are QEMU processes
//! with the parent-death signal), and their run directories (`RUN_DIR/pool-<pid>-<n>`) are
//! cleaned up by whichever process starts next. A paused clone uses no CPU and shares its
//! template's RAM pages, so it holds no VM slot; the run that takes it does. When the
//! template changes, its clones are dropped.

use super::boot;
use super::template::Template;
use super::AgentContext;
use crate::qemu::console::protocol::Runner;
use crate::qemu::launch::RunPaths;
use crate::qemu::machine::Machine;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A clone restored ahead of time: paused, state loaded, QMP connected, no console yet.
pub struct Pooled {
    pub machine: Machine,
    pub paths: RunPaths,
    pub template: Arc<Template>,
    /// How long its restore took.
    pub restored: Duration,
}

impl Pooled {
    /// Kills the clone and removes its directory.
    fn discard(self) {
        let Pooled { machine, paths, .. } = self;
        // Dropping the machine kills its process group.
        drop(machine);
        paths.remove();
    }
}

#[derive(Default)]
pub struct Pool {
    clones: Mutex<HashMap<String, Vec<Pooled>>>,
    seq: AtomicU64,
    /// Wakes the keeper (a clone was taken, or a template became ready).
    pub wake: tokio::sync::Notify,
}

impl Pool {
    /// A clone of `vm`'s template `key`, if one is ready; the keeper then restores another.
    pub fn take(&self, vm: &str, key: &str) -> Option<Pooled> {
        self.prune(vm, key);
        let taken = self
            .clones
            .lock()
            .expect("pool lock")
            .get_mut(vm)
            .and_then(Vec::pop);
        if taken.is_some() {
            self.wake.notify_one();
        }
        taken
    }

    /// Drops `vm`'s clones of any template but `key`.
    fn prune(&self, vm: &str, key: &str) {
        let stale: Vec<Pooled> = {
            let mut clones = self.clones.lock().expect("pool lock");
            let Some(list) = clones.get_mut(vm) else {
                return;
            };
            let (fresh, stale) = list.drain(..).partition(|p| p.template.meta.key == key);
            *list = fresh;
            stale
        };
        stale.into_iter().for_each(Pooled::discard);
    }

    /// Drops every clone of `vm` (its template was rebuilt, deleted or failed).
    pub fn drain(&self, vm: &str) {
        let gone = self.clones.lock().expect("pool lock").remove(vm);
        gone.into_iter().flatten().for_each(Pooled::discard);
    }

    /// Clones of `vm` ready now.
    pub fn len(&self, vm: &str) -> usize {
        self.clones
            .lock()
            .expect("pool lock")
            .get(vm)
            .map_or(0, Vec::len)
    }

    fn put(&self, vm: &str, p: Pooled) {
        self.clones
            .lock()
            .expect("pool lock")
            .entry(vm.to_string())
            .or_default()
            .push(p);
    }

    fn drain_all(&self) {
        let all: Vec<_> = self.clones.lock().expect("pool lock").drain().collect();
        all.into_iter()
            .flat_map(|(_, v)| v)
            .for_each(Pooled::discard);
    }
}

/// Keeps every `WARM_POOL` VM's pool full of clones of its current template, until the agents
/// stop; then kills them.
pub async fn keeper(ctx: Arc<AgentContext>) {
    let mut stopping = ctx.stopping.clone();
    loop {
        let mut filled = false;
        for name in ctx.catalog.available() {
            if *stopping.borrow() {
                break;
            }
            filled |= fill(&ctx, &name).await;
        }
        if *stopping.borrow() {
            break;
        }
        if filled {
            continue; // one clone at a time per VM, round-robin, until all are full
        }
        tokio::select! {
            _ = ctx.pool.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopping.changed() => {}
        }
    }
    ctx.pool.drain_all();
}

/// Restores one clone for `name` if its pool is short; true if it did.
async fn fill(ctx: &AgentContext, name: &str) -> bool {
    let Ok((cfg, text)) = ctx.catalog.load_with_text(name) else {
        return false;
    };
    if !cfg.warm || cfg.warm_pool == 0 {
        ctx.pool.drain(name);
        return false;
    }
    let accel = ctx.accel.choose(cfg.accel, ctx.settings.accel).await.accel;
    let qemu = ctx.templates.qemu(&ctx.settings.qemu_binary).await;
    let ident = super::template::identity(&cfg, &text, accel, &qemu);
    let Some(template) = ctx.templates.find(name, &ident.key) else {
        ctx.pool.drain(name);
        return false;
    };
    // Drop clones of older keys before counting.
    ctx.pool.prune(name, &ident.key);
    if ctx.pool.len(name) >= cfg.warm_pool as usize {
        return false;
    }
    let n = ctx.pool.seq.fetch_add(1, Ordering::Relaxed);
    let paths = RunPaths::new(
        &ctx.settings.run_dir,
        &format!("pool-{}-{n}", std::process::id()),
    );
    if let Err(e) = paths.create() {
        tracing::warn!(error = %e, "cannot create a pool clone's directory");
        return false;
    }
    let restored = async {
        let (mut machine, took) =
            boot::restore(ctx, &cfg, &template, &paths, format!("sqlite-sim-pool-{n}")).await?;
        warm_up(&mut machine, &paths, &template).await?;
        Ok::<_, boot::RestoreError>((machine, took))
    };
    match restored.await {
        Ok((machine, restored)) => {
            tracing::debug!(
                vm = name,
                ms = restored.as_millis() as u64,
                "pool clone ready"
            );
            ctx.pool.put(
                name,
                Pooled {
                    machine,
                    paths,
                    template,
                    restored,
                },
            );
            true
        }
        Err(e) => {
            paths.remove();
            super::template::restore_failed(ctx, &template, &e.0).await;
            false
        }
    }
}

/// How long a pooled clone's warm-up may take.
const WARM_UP_LIMIT: Duration = Duration::from_secs(20);

/// Runs the programs a run's set-up and commands start with in the paused clone, then pauses it
/// again. A fresh QEMU has translated none of the guest's code, so under TCG the first run of
/// each program costs about a tenth of a second; done here, ahead of time, the run that takes the
/// clone does not pay it. The clone's clock and RNG are set when it is taken, as for any clone.
async fn warm_up(
    machine: &mut Machine,
    paths: &RunPaths,
    template: &Template,
) -> Result<(), boot::RestoreError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let err =
        |what: &str, e: &dyn std::fmt::Display| boot::RestoreError(format!("warm-up: {what}: {e}"));
    let mut console = tokio::net::UnixStream::connect(&paths.console)
        .await
        .map_err(|e| err("console", &e))?;
    let token = crate::qemu::console::protocol::Session::random_token();
    machine
        .qmp
        .execute(&qapi::qmp::cont {})
        .await
        .map_err(|e| err("cont", &e))?;
    // The shell the commands will most likely run in (a `#!` line or SHELL may pick another).
    let shell = match Runner::for_login_shell(&template.meta.login_shell) {
        Some(Runner::Shell(cmd)) => cmd,
        _ => "sh".into(),
    };
    // The typed text never holds the marker itself: printf assembles it.
    let line = format!(
        "date >/dev/null 2>&1; printf '' | sqsim-reseed 2>/dev/null; base64 </dev/null >/dev/null; \
         {shell} </dev/null; printf 'SQSIM_%s_WARM\n' {token}\n"
    );
    console
        .write_all(line.as_bytes())
        .await
        .map_err(|e| err("typing", &e))?;
    let marker = format!("SQSIM_{token}_WARM").into_bytes();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while memchr::memmem::find(&seen, &marker).is_none() {
            let n = console.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::other("console closed"));
            }
            seen.extend_from_slice(&buf[..n]);
            // Only the tail can still hold a marker split across reads.
            if seen.len() > 8192 {
                seen.drain(..seen.len() - 4096);
            }
        }
        Ok(())
    };
    tokio::time::timeout(WARM_UP_LIMIT, read)
        .await
        .map_err(|_| err("no answer", &format!("{WARM_UP_LIMIT:?}")))?
        .map_err(|e| err("console", &e))?;
    machine
        .qmp
        .execute(&qapi::qmp::stop {})
        .await
        .map_err(|e| err("stop", &e))?;
    Ok(())
}

/// Removes pool directories whose process is gone (killing any QEMU left in them).
pub fn clean_leftovers(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pool-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() as i32 || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        super::recovery::kill_leftover_qemu(&e.path());
        let _ = std::fs::remove_dir_all(e.path());
    }
}

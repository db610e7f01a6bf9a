//! Agents: claim loops that take pending requests from the store and run each in a throwaway VM.
//!
//! In `all` mode the API wakes the agents directly. As a separate process they wake on any
//! commit to the store (`Store::watch_commits`, a cheap `PRAGMA data_version` check), look
//! whether a request they could claim is pending (a read), and only then claim (a write);
//! `SQLITE_SIM_AGENT_POLL_INTERVAL` stays as a slow safety net. A host-wide slot is taken
//! before claiming, so no request is claimed that could not start at once. Claims carry this
//! host's labels ([`host`]), so a request runs only where its required labels are.

mod boot;
mod error;
mod guest;
mod host;
mod keep;
mod pool;
mod recovery;
mod retry;
mod run;
pub mod slots;
mod template;
mod transfer;
mod vm;

use crate::config::vm::VmCatalog;
use crate::config::Settings;
use crate::model::AgentId;
use crate::qemu::accel::AccelResolver;
use crate::store::Store;
use slots::HostSlots;
use std::sync::Arc;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

/// What every agent of a process shares.
pub struct AgentContext {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub catalog: VmCatalog,
    /// Woken by the API when a request is created (in-process mode).
    pub wake: Arc<Notify>,
    pub slots: HostSlots,
    /// What `ACCEL=auto` means on this host (probed once per process).
    pub accel: AccelResolver,
    /// This host's warm-start templates.
    pub templates: template::Templates,
    /// Clones restored ahead of time.
    pub pool: pool::Pool,
    /// Becomes true when the process is stopping: no new claims; running VMs are shut down.
    pub stopping: watch::Receiver<bool>,
    /// This host in the registry, and the labels its agents claim with.
    pub host: host::Presence,
}

impl AgentContext {
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        wake: Arc<Notify>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        AgentContext {
            catalog: VmCatalog::new(&settings.vm_images_dir, &settings.vm_config_dir),
            slots: HostSlots::new(
                settings.run_dir.join("slots"),
                settings.max_concurrent_vms,
                settings.agent_poll_interval,
            ),
            accel: AccelResolver::new(
                &settings.qemu_binary,
                &settings.run_dir,
                &settings.kvm_device,
            ),
            templates: template::Templates::new(&settings.run_dir),
            pool: pool::Pool::default(),
            host: host::Presence::new(&settings.host_id),
            settings,
            store,
            wake,
            stopping,
        }
    }
}

/// Runs `SQLITE_SIM_AGENT_COUNT` agents until `stopping` turns true and their runs have ended.
pub async fn run_agents(ctx: Arc<AgentContext>) {
    // Leftovers of a previous life first: lost requests, stale run directories, stray QEMU.
    recovery::reap(&ctx).await;
    recovery::clean_leftovers(&ctx).await;
    if ctx.settings.accel == crate::config::Accel::Auto {
        // Decide what `auto` means before the first claim, so no request pays for finding out.
        let verdict = ctx.accel.kvm().await;
        tracing::info!("SQLITE_SIM_ACCEL=auto: {}", verdict.describe());
    }
    let host = &ctx.settings.host_id;
    let pid = std::process::id();
    let ids: Vec<AgentId> = (0..ctx.settings.agent_count)
        .map(|i| AgentId(format!("{host}:{pid}:{i}")))
        .collect();
    // Registered (with its labels) before the first claim.
    host::report(&ctx, &ids).await;
    let reporter = tokio::spawn(host::reporter(ctx.clone(), ids.clone()));
    let reaper = tokio::spawn(recovery::reaper(ctx.clone()));
    let templates = tokio::spawn(template::manager(ctx.clone()));
    let pool = tokio::spawn(pool::keeper(ctx.clone()));
    let mut tasks = Vec::new();
    for id in ids {
        let span = tracing::info_span!("agent", agent = %id);
        tasks.push(tokio::spawn(agent_loop(ctx.clone(), id).instrument(span)));
    }
    for t in tasks {
        let _ = t.await;
    }
    reaper.abort();
    let _ = reporter.await;
    host::stopped(&ctx).await;
    // Both end on `stopping`: a build in progress is shut down, pooled clones are killed.
    let _ = templates.await;
    let _ = pool.await;
}

async fn agent_loop(ctx: Arc<AgentContext>, id: AgentId) {
    tracing::info!("agent started");
    let mut stopping = ctx.stopping.clone();
    loop {
        if *stopping.borrow() {
            break;
        }
        // Registered before the claim, so a wake-up between claim and wait is not missed.
        let notified = ctx.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let mut changes = ctx.store.subscribe();
        let slot = tokio::select! {
            s = ctx.slots.acquire() => s,
            _ = stopping.changed() => break,
        };
        let slot = match slot {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot take a VM slot");
                tokio::time::sleep(ctx.settings.agent_poll_interval).await;
                continue;
            }
        };
        let caps = ctx.host.capabilities();
        match ctx
            .store
            .claim_as(&id, &caps, ctx.settings.agent_lease)
            .await
        {
            Ok(Some(req)) => {
                run::execute(&ctx, &id, req).await;
                drop(slot);
            }
            Ok(None) => {
                drop(slot);
                let poll = tokio::time::sleep(ctx.settings.agent_poll_interval);
                tokio::pin!(poll);
                loop {
                    tokio::select! {
                        _ = &mut notified => break,
                        _ = &mut poll => break,
                        _ = stopping.changed() => break,
                        r = changes.changed() => {
                            if r.is_err() {
                                // No store left to wake us: the poll alone.
                                (&mut poll).await;
                                break;
                            }
                            // Most commits are log lines: claim only if there is work for us.
                            if !matches!(ctx.store.claimable_exists(&caps), Ok(false)) {
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                drop(slot);
                tracing::error!(error = %e, "claim failed");
                tokio::time::sleep(ctx.settings.agent_poll_interval).await;
            }
        }
    }
    tracing::info!("agent stopped");
}

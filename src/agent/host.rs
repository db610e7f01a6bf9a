//! This host in the store's registry: what it can run (labels) and that it is alive. The
//! labels are `SQLITE_SIM_AGENT_LABELS` plus automatic ones: `accel:kvm` or `accel:tcg`
//! (what the accelerator probe found, or what `SQLITE_SIM_ACCEL` pins) and `vm:NAME` for each
//! VM whose config loads here. They are reported with the leases' cadence, so a host that
//! stops reporting is no longer live after one lease, like its claims.

use super::AgentContext;
use crate::config::Accel;
use crate::model::{AgentId, Label};
use crate::store::{Capabilities, HostReport};
use std::sync::RwLock;

/// What this process claims with, refreshed at every report.
pub struct Presence {
    /// `host:pid`: this agents process's row in the registry.
    pub process: String,
    caps: RwLock<Capabilities>,
}

impl Presence {
    pub fn new(host_id: &str) -> Self {
        Presence {
            process: format!("{host_id}:{}", std::process::id()),
            caps: RwLock::new(Capabilities {
                host_id: host_id.to_string(),
                labels: Vec::new(),
            }),
        }
    }

    pub fn capabilities(&self) -> Capabilities {
        self.caps.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Configured plus automatic labels, and the VMs this host can run.
async fn survey(ctx: &AgentContext) -> (Vec<Label>, Vec<String>) {
    let mut labels = ctx.settings.agent_labels.clone();
    let accel = match ctx.settings.accel {
        Accel::Auto if ctx.accel.kvm().await.usable => "accel:kvm",
        Accel::Auto | Accel::Tcg => "accel:tcg",
        Accel::Kvm => "accel:kvm",
    };
    labels.push(accel.parse().expect("a valid label"));
    let vms: Vec<String> = ctx
        .catalog
        .available()
        .into_iter()
        .filter(|name| ctx.catalog.check(name).is_ok())
        .collect();
    labels.extend(vms.iter().filter_map(|v| format!("vm:{v}").parse().ok()));
    labels.sort();
    labels.dedup();
    (labels, vms)
}

/// Surveys the host and reports it; the new labels are what the agents claim with next.
pub(super) async fn report(ctx: &AgentContext, agents: &[AgentId]) {
    let (labels, vms) = survey(ctx).await;
    {
        let mut caps = ctx.host.caps.write().unwrap_or_else(|p| p.into_inner());
        caps.labels = labels.clone();
    }
    let r = HostReport {
        process: ctx.host.process.clone(),
        host_id: ctx.settings.host_id.clone(),
        labels,
        vms,
        agents: agents.to_vec(),
        max_vms: ctx.settings.max_concurrent_vms,
        lease: ctx.settings.agent_lease,
    };
    if let Err(e) = ctx.store.report_host(r).await {
        tracing::warn!(error = %e, "could not report this host");
    }
}

/// Reports every third of a lease until the process stops, then says it stopped, so the
/// host shows as down at once rather than after its lease.
pub(super) async fn reporter(ctx: std::sync::Arc<AgentContext>, agents: Vec<AgentId>) {
    let mut stopping = ctx.stopping.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ctx.settings.agent_lease / 3) => {}
            _ = stopping.wait_for(|s| *s) => break,
        }
        report(&ctx, &agents).await;
    }
}

/// Marks this process stopped in the registry.
pub(super) async fn stopped(ctx: &AgentContext) {
    if let Err(e) = ctx.store.host_stopped(ctx.host.process.clone()).await {
        tracing::warn!(error = %e, "could not record that this host stopped");
    }
}

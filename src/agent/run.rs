//! One request's run: claim to final state. It chooses how the guest starts (a cold boot, a
//! restored clone, a pooled clone; see [`super::boot`]), takes the guest through its phases
//! ([`super::guest`]), always shuts it down, and records the outcome. A clone that fails to
//! restore falls back to a cold boot in the same request; so does KVM that fails under `auto`.

use super::boot::{self, Launch, Launched};
use super::error::RunError;
use super::guest::{wait_ack, Exited, Known, Limits, Ready};
use super::keep;
use super::template;
use super::transfer;
use super::vm::Limit;
use super::vm::{Control, Vm, KVM_SILENCE};
use super::AgentContext;
use crate::config::vm::VmConfig;
use crate::config::Accel;
use crate::model::{
    AgentId, BootChoice, BootMode, Channel, LogType, Request, ShutdownStep, Status,
};
use crate::qemu::console::protocol::Session;
use crate::qemu::console::protocol::ACK_ALIVE;
use crate::qemu::launch::RunPaths;
use crate::store::sink::LogSink;
use crate::store::Finish;
use std::time::Duration;
use tracing::Instrument;

/// Runs one claimed request to a terminal state. Never panics the agent; always ends QEMU.
pub(super) async fn execute(ctx: &AgentContext, agent: &AgentId, req: Request) {
    let span = tracing::info_span!("run", request = %req.uuid, vm = %req.vm_name);
    async move {
        // The claim is lost when the heartbeat finds it gone or the (fenced) sink's append
        // is refused; either stops the run.
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let (sink, sink_task) =
            LogSink::start_fenced(ctx.store.clone(), req.uuid, agent.clone(), lost_tx.clone());
        sink.write(LogType::Command, req.commands.clone().into_bytes())
            .await;
        sink.system(format!("claimed by agent {agent}")).await;
        let heartbeat = spawn_heartbeat(ctx, agent, &req, lost_tx);
        let outcome = drive(ctx, agent, &req, &sink, lost).await;
        heartbeat.abort();
        let mut fin = Finish {
            shutdown_step: outcome.step,
            boot_ms: outcome.boot_ms,
            run_ms: outcome.run_ms,
            shutdown_ms: outcome.shutdown_ms,
            boot_mode: outcome.boot_mode,
            restore_ms: outcome.restore_ms,
            channel: outcome.channel,
            kept_ms: outcome.kept_ms,
            ..Default::default()
        };
        match &outcome.result {
            Ok(code) => {
                sink.system(format!("commands exited with status {code}")).await;
                fin.status = Status::Done;
                fin.exit_code = Some(*code);
            }
            Err(RunError::Cancelled) => {
                sink.system("cancelled by an operator").await;
                fin.status = Status::Cancelled;
            }
            Err(e) => {
                sink.system(format!("failed: {e}")).await;
                fin.status = Status::Failed;
                fin.error = Some(e.to_string());
            }
        }
        // Every log byte is committed before the request turns terminal.
        drop(sink);
        let stats = sink_task.close().await;
        if stats.lease_lost {
            // The request is another's now (or recovered): its record is not ours to amend.
            tracing::error!(
                refused = stats.refused_bytes,
                "lease lost: the rest of this run's log was not stored"
            );
        } else if stats.lost_bytes > 0 {
            // Never a silent gap: the outcome says the record is incomplete.
            let why = stats.last_error.as_deref().unwrap_or("unknown error");
            let mut error = format!(
                "{} bytes of log output could not be stored ({why})",
                stats.lost_bytes
            );
            if let Some(code) = fin.exit_code {
                error.push_str(&format!("; the commands exited with status {code}"));
            }
            if let Some(e) = &fin.error {
                error.push_str(&format!("; {e}"));
            }
            tracing::error!(lost = stats.lost_bytes, "{error}");
            if fin.status == Status::Done {
                fin.status = Status::Failed;
            }
            fin.error = Some(error);
        }
        tracing::info!(status = %fin.status, exit_code = ?fin.exit_code, log_bytes = stats.bytes, "run finished");
        record_outcome(ctx, agent, &req, fin).await;
    }
    .instrument(span)
    .await
}

/// Records the final state, retrying for a while: a locked or full database may recover.
async fn record_outcome(ctx: &AgentContext, agent: &AgentId, req: &Request, fin: Finish) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=20 {
        match ctx.store.finish(req.uuid, agent, fin.clone()).await {
            Ok(_) => return,
            Err(e) if e.is_full() && ctx.store.release_reserve() => {
                tracing::error!(error = %e, "disk full; retrying with the reserved space");
            }
            Err(e) => {
                tracing::error!(error = %e, attempt, "could not record the outcome; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::error!("gave up recording the outcome; lease recovery will mark it agent lost");
}

/// Renews the lease every third of it. If the claim is gone (another agent recovered the
/// request after heartbeats failed for a whole lease), `lost` turns true and the run stops.
fn spawn_heartbeat(
    ctx: &AgentContext,
    agent: &AgentId,
    req: &Request,
    lost: tokio::sync::watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    let (store, agent, id) = (ctx.store.clone(), agent.clone(), req.uuid);
    let lease = ctx.settings.agent_lease;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(lease / 3).await;
            match store.heartbeat(id, &agent, lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!("lease lost: another agent recovered this request");
                    let _ = lost.send(true);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    })
}

/// How far a run got, and what its phases took.
struct Outcome {
    result: Result<i32, RunError>,
    step: Option<ShutdownStep>,
    boot_ms: Option<i64>,
    run_ms: Option<i64>,
    shutdown_ms: Option<i64>,
    /// Console bytes the guest printed.
    console_bytes: u64,
    /// How the guest started, once it reached its prompt.
    boot_mode: Option<BootMode>,
    restore_ms: Option<i64>,
    /// The guest never reached its prompt from a clone: the template is at fault.
    restore_failed: bool,
    /// How the commands' output travelled.
    channel: Option<Channel>,
    /// How long the VM was kept after the failure (`keep_on_failure`).
    kept_ms: Option<i64>,
}

impl Outcome {
    fn failed(e: RunError) -> Self {
        Outcome {
            result: Err(e),
            step: None,
            boot_ms: None,
            run_ms: None,
            shutdown_ms: None,
            console_bytes: 0,
            boot_mode: None,
            restore_ms: None,
            restore_failed: false,
            channel: None,
            kept_ms: None,
        }
    }
}

async fn drive(
    ctx: &AgentContext,
    agent: &AgentId,
    req: &Request,
    sink: &LogSink,
    lost: tokio::sync::watch::Receiver<bool>,
) -> Outcome {
    let (cfg, text) = match ctx.catalog.load_with_text(&req.vm_name) {
        Ok(v) => v,
        Err(e) => return Outcome::failed(e.into()),
    };
    let choice = ctx.accel.choose(cfg.accel, ctx.settings.accel).await;
    sink.system(format!("accelerator: {}", choice.describe()))
        .await;
    if let Some(clone) = plan(ctx, req, &cfg, &text, choice.accel, sink).await {
        let template = clone.template().cloned().expect("a clone has a template");
        let out = attempt(ctx, agent, req, &cfg, clone, sink, lost.clone()).await;
        if !out.restore_failed {
            return out;
        }
        let why = match &out.result {
            Err(e) => e.to_string(),
            Ok(_) => "unknown".into(),
        };
        sink.system(format!(
            "the clone did not come up ({why}): falling back to a cold boot; template {} is \
             marked failed and rebuilt",
            template.meta.key
        ))
        .await;
        template::restore_failed(ctx, &template, &why).await;
        RunPaths::new(&ctx.settings.run_dir, &req.uuid.to_string()).remove();
    }
    // Under `auto`, KVM that breaks anyway (the probe cannot foresee every guest) is retried
    // under TCG in the same request, never failed for it.
    let kvm_watch = choice.policy == Accel::Auto && choice.accel == Accel::Kvm;
    let cold = Launch::Cold {
        accel: choice.accel,
        kvm_watch,
    };
    let out = attempt(ctx, agent, req, &cfg, cold, sink, lost.clone()).await;
    let Some(why) = kvm_watch.then(|| kvm_failure(&out)).flatten() else {
        return out;
    };
    sink.system(format!("KVM failed ({why}): retrying under TCG"))
        .await;
    // The failed attempt's directory may have been kept for inspection; the retry needs its own.
    RunPaths::new(&ctx.settings.run_dir, &req.uuid.to_string()).remove();
    let tcg = Launch::Cold {
        accel: Accel::Tcg,
        kvm_watch: false,
    };
    let retry = attempt(ctx, agent, req, &cfg, tcg, sink, lost).await;
    if retry.console_bytes > 0 {
        // TCG got further on the same guest: the fault was KVM's, so stop choosing it.
        ctx.accel
            .record_unusable(why, format!("request {}", req.uuid))
            .await;
        sink.system("KVM is marked unusable on this host for ACCEL=auto")
            .await;
    }
    retry
}

/// Whether this run restores a clone: a pooled one, or one of the VM's ready template; `None`
/// boots cold. The `system` log says why.
async fn plan(
    ctx: &AgentContext,
    req: &Request,
    cfg: &VmConfig,
    text: &str,
    accel: Accel,
    sink: &LogSink,
) -> Option<Launch> {
    let warm = match req.boot {
        Some(BootChoice::Cold) => {
            sink.system("cold boot (the request asked for it)").await;
            return None;
        }
        Some(BootChoice::Warm) => true,
        None => cfg.warm,
    };
    if !warm {
        return None;
    }
    if !cfg.warm {
        sink.system("cold boot: the VM config does not say WARM=\"on\"")
            .await;
        return None;
    }
    let qemu = ctx.templates.qemu(&ctx.settings.qemu_binary).await;
    let ident = template::identity(cfg, text, accel, &qemu);
    if let Some(p) = ctx.pool.take(&cfg.name, &ident.key) {
        return Some(Launch::Pool(Box::new(p)));
    }
    if let Some(t) = ctx.templates.find(&cfg.name, &ident.key) {
        return Some(Launch::Warm(t));
    }
    // No usable template: make sure one is on its way, and wait for it if the VM says so.
    ctx.templates.wake.notify_one();
    if cfg.warm_wait {
        sink.system(format!(
            "waiting for template {} of {} to be built (WARM_WAIT)",
            ident.key, cfg.name
        ))
        .await;
        if let Some(t) = template::wait_built(ctx, &cfg.name, &ident.key).await {
            return Some(Launch::Warm(t));
        }
    }
    let why = if ctx.templates.has_stale(&cfg.name, &ident.key) {
        "its template is stale (the VM, its files or QEMU changed) and is being rebuilt".into()
    } else {
        template::why_not_ready(ctx, &cfg.name).await
    };
    sink.system(format!("cold boot: {why}")).await;
    None
}

/// Why a run under `auto`'s KVM failed in a way TCG may not: silence, or QEMU ending before the
/// guest printed anything. `None` for every other outcome.
fn kvm_failure(out: &Outcome) -> Option<String> {
    match &out.result {
        Err(RunError::KvmSilent) => Some(format!(
            "no console output within {} s",
            KVM_SILENCE.as_secs()
        )),
        Err(e @ (RunError::Launch(_) | RunError::Machine(_) | RunError::QemuExited { .. }))
            if out.console_bytes == 0 =>
        {
            Some(e.to_string())
        }
        _ => None,
    }
}

/// One start of the VM, however it starts: QEMU, console, phases, shutdown ladder.
async fn attempt(
    ctx: &AgentContext,
    agent: &AgentId,
    req: &Request,
    cfg: &VmConfig,
    launch: Launch,
    sink: &LogSink,
    lost: tokio::sync::watch::Receiver<bool>,
) -> Outcome {
    let mode = launch.mode();
    let known = launch.template().map(|t| Known {
        login_shell: t.meta.login_shell.clone(),
        channel: t.meta.channel,
    });
    let kvm_watch = matches!(
        launch,
        Launch::Cold {
            kvm_watch: true,
            ..
        }
    );
    let paths = RunPaths::new(&ctx.settings.run_dir, &req.uuid.to_string());
    let name = format!("sqlite-sim-{}", req.uuid.short());
    let Launched {
        machine,
        paths,
        since,
    } = match boot::launch(ctx, cfg, launch, paths, name, sink).await {
        Ok(l) => l,
        Err(e) => {
            let restore_failed = matches!(e, RunError::Restore(_));
            finish_dir(
                ctx,
                &RunPaths::new(&ctx.settings.run_dir, &req.uuid.to_string()),
                false,
            );
            return Outcome {
                restore_failed,
                ..Outcome::failed(e)
            };
        }
    };
    let token = Session::random_token();
    let console = match boot::attach(cfg, &paths, &machine, &token, sink).await {
        Ok(c) => c,
        Err(e) => {
            // Without a console nothing could be seen: end QEMU and report.
            let mut machine = machine;
            let report = machine.shutdown(Duration::ZERO).await;
            finish_dir(ctx, &paths, false);
            return Outcome {
                step: Some(report.step),
                ..Outcome::failed(e)
            };
        }
    };
    let mut vm = Vm::new(
        machine,
        console,
        sink.clone(),
        ctx.stopping.clone(),
        ctx.settings.agent_poll_interval,
    )
    .controlled_by(Control::new(&ctx.store, req.uuid, agent), lost);
    let mut out = Outcome::failed(RunError::AgentStopping);
    let mut reached_ready = false;
    let result = async {
        let started = vm.start().await?;
        if kvm_watch {
            vm.watch_kvm_silence(started.at);
        }
        if !ctx.store.mark_running(req.uuid, agent).await? {
            tracing::debug!("request already running (a second attempt) or no longer ours");
        }
        let limits = Limits::for_request(started, req.timeout, cfg.boot_timeout);
        let mut ready = match &known {
            None => started.boot(&mut vm, cfg, &token, &limits).await?,
            Some(known) => {
                let ready = started.resume(&mut vm, cfg, &token, known.clone()).await?;
                out.restore_ms = Some(since.elapsed().as_millis() as i64);
                ready
            }
        };
        reached_ready = true;
        out.boot_mode = Some(mode);
        out.channel = Some(ready.channel);
        out.boot_ms = Some(ready.boot.as_millis() as i64);
        let uploads = ctx.store.uploads(req.uuid).await?;
        transfer::place(&mut ready, &mut vm, &ctx.store, &uploads).await?;
        let exited = ready.run(&mut vm, cfg, &req.commands, limits.run).await;
        if !req.artifacts.is_empty() {
            collect_artifacts(ctx, req, &mut ready, &mut vm, &exited).await?;
        }
        let exited = exited?;
        out.run_ms = Some(exited.run.as_millis() as i64);
        Ok(exited.code)
    }
    .await;
    if result.is_err() {
        vm.console.interrupt();
    }
    // A clone that never got to its prompt is the template's fault (unless an operator or the
    // agent ended it).
    out.restore_failed = known.is_some()
        && !reached_ready
        && !matches!(
            result,
            Err(RunError::Cancelled | RunError::AgentStopping | RunError::LeaseLost)
        );
    // A failure the request asked to keep its VM for: up until released, cancelled, expired.
    let kept = if out.restore_failed {
        None
    } else {
        keep::keep_if_asked(ctx, req, &mut vm, &result, reached_ready).await
    };
    let grace = match &kept {
        _ if vm.is_held() => Duration::ZERO,
        Some(k) if k.end.hurried() => ctx.settings.cancel_grace,
        Some(_) => cfg.shutdown_timeout,
        None => grace(ctx, cfg, &result, vm.is_held()),
    };
    out.kept_ms = kept.map(|k| k.kept.as_millis() as i64);
    out.console_bytes = vm.console.received();
    let report = vm.shut_down(grace).await;
    (out.step, out.shutdown_ms) = (Some(report.step), Some(report.elapsed.as_millis() as i64));
    let keep =
        result.is_err() && !matches!(result, Err(RunError::KvmSilent)) && !out.restore_failed;
    finish_dir(ctx, &paths, !keep);
    out.result = result;
    out
}

/// How long the shell gets to answer after a Ctrl-C, so artifacts can be collected.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);

/// Collects the request's artifacts after its commands: when they exited, whatever their
/// status, and when they timed out if a Ctrl-C gives the shell back. Anything else means the
/// guest no longer answers. Only an operator's cancel or the agent's own stop during the
/// collection changes the run's outcome.
async fn collect_artifacts(
    ctx: &AgentContext,
    req: &Request,
    ready: &mut Ready,
    vm: &mut Vm,
    exited: &Result<Exited, RunError>,
) -> Result<(), RunError> {
    let answering = match exited {
        Ok(_) => Ok(()),
        Err(RunError::Timeout(_)) => {
            vm.sink
                .system("timed out: interrupting the commands (Ctrl-C) to collect artifacts")
                .await;
            // Whatever the console shows from now on is not the commands' output. Shells
            // differ in what a Ctrl-C does (it ends the job, or only gives the shell back):
            // either way a shell that answers a probe can collect.
            vm.console.interrupt();
            vm.console.send("\u{3}").await?;
            vm.console.send(&ready.session.probe_line()).await?;
            let soon = Vm::deadline(
                tokio::time::Instant::now(),
                INTERRUPT_GRACE,
                Limit::Interrupt(INTERRUPT_GRACE.as_secs()),
            );
            wait_ack(vm, ACK_ALIVE, soon)
                .await
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    if let Err(why) = answering {
        vm.sink
            .system(format!("artifacts not collected: {why}"))
            .await;
        return Ok(());
    }
    let limit = ctx.settings.max_artifacts;
    match transfer::collect(ready, vm, &ctx.store, req.uuid, &req.artifacts, limit).await {
        Ok(_) => Ok(()),
        Err(e @ (RunError::Cancelled | RunError::AgentStopping | RunError::LeaseLost)) => Err(e),
        Err(e) => {
            vm.sink
                .system(format!("artifact collection ended early: {e}"))
                .await;
            Ok(())
        }
    }
}

/// How long the ladder waits for an ACPI power-off: the VM's `SHUTDOWN_TIMEOUT` normally, the
/// short cancel grace when an operator or a stopping agent ends the run, none for a paused VM
/// (its vCPUs could not react).
fn grace(
    ctx: &AgentContext,
    vm: &VmConfig,
    result: &Result<i32, RunError>,
    held: bool,
) -> Duration {
    match result {
        // A paused or hung guest cannot react to ACPI.
        _ if held => Duration::ZERO,
        Err(RunError::KvmSilent) => Duration::ZERO,
        Err(RunError::Cancelled | RunError::AgentStopping | RunError::LeaseLost) => {
            ctx.settings.cancel_grace
        }
        _ => vm.shutdown_timeout,
    }
}

fn finish_dir(ctx: &AgentContext, paths: &RunPaths, ok: bool) {
    if ok || !ctx.settings.keep_failed_runs {
        paths.remove();
    } else {
        tracing::info!(dir = %paths.dir.display(), "keeping the failed run's directory");
    }
}

//! The service commands (`all`, `api`, `agents`) and the local checks (`config`, `status`,
//! `console`): everything that works on this host's settings rather than through the API.

use crate::agent::{self, AgentContext};
use crate::api::{self, AppState};
use crate::config::vm::VmCatalog;
use crate::config::Settings;
use crate::qemu::accel::AccelResolver;
use crate::qemu::{image, launch};
use crate::store::Store;
use anyhow::Context;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::sync::{watch, Notify};

pub(super) async fn serve(
    settings: Settings,
    with_api: bool,
    with_agents: bool,
) -> anyhow::Result<ExitCode> {
    crate::telemetry::init(&settings)?;
    let settings = Arc::new(settings);
    let store = Store::open_settings_waiting(&settings)
        .await
        .with_context(|| format!("opening {}", settings.store_location()))?;
    // Other processes' commits (an API's submissions and control, agents' logs and states)
    // wake this one's agents, control checks and log streams within the interval.
    store
        .watch_commits(settings.change_check_interval)
        .context("watching the database for commits")?;
    let wake = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let agents = with_agents.then(|| {
        let ctx = Arc::new(AgentContext::new(
            settings.clone(),
            store.clone(),
            wake.clone(),
            stop_rx.clone(),
        ));
        tokio::spawn(agent::run_agents(ctx))
    });
    let mut stopped = stop_rx.clone();
    let api = with_api.then(|| {
        let state = AppState::new(settings.clone(), store.clone(), wake.clone());
        tokio::spawn(api::serve(state, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }))
    });
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("stopping: shutting running VMs down"),
        r = async { match api { Some(h) => h.await, None => std::future::pending().await } } => {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = stop_tx.send(true);
                    return Err(anyhow::Error::new(e).context(format!(
                        "API on {}:{}", settings.api_host, settings.api_port
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let _ = stop_tx.send(true);
    if let Some(a) = agents {
        let _ = a.await;
    }
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// What `auto` resolves to on this host, and why, as `config` and `status` print it.
async fn accel_line(settings: &Settings, resolver: &AccelResolver) -> String {
    let choice = resolver.choose(None, settings.accel).await;
    format!("accelerator: {}", choice.describe())
}

pub(super) async fn print_config(settings: &Settings) -> anyhow::Result<ExitCode> {
    for (k, v) in settings.describe() {
        println!("{k}={v}");
    }
    let resolver = AccelResolver::new(
        &settings.qemu_binary,
        &settings.run_dir,
        &settings.kvm_device,
    );
    println!("\n{}", accel_line(settings, &resolver).await);
    // The store is only read, and only when it exists (`config` creates nothing).
    let store = if settings.database_url.is_some() || settings.db_path.exists() {
        Store::open_settings(settings).await.ok()
    } else {
        None
    };
    println!("{}", super::token::summary(settings, store.as_ref()).await);
    let catalog = VmCatalog::new(&settings.vm_images_dir, &settings.vm_config_dir);
    let names = catalog.available();
    println!();
    if names.is_empty() {
        println!(
            "VMs: none in {} or {}",
            settings.vm_config_dir.display(),
            settings.vm_images_dir.display()
        );
    }
    let mut ok = true;
    for name in names {
        match catalog.check(&name) {
            Ok(vm) => println!(
                "VM {name}: ok (memory {}, cpus {}, image {}, accelerator {})",
                vm.memory,
                vm.cpus,
                vm.image
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into()),
                resolver.choose(vm.accel, settings.accel).await.describe()
            ),
            Err(e) => {
                ok = false;
                println!("VM {name}: INVALID: {e}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(super) async fn status(settings: &Settings) -> anyhow::Result<ExitCode> {
    let mut healthy = true;
    let store = match Store::open_settings(settings).await {
        Ok(store) => match store.check().await {
            Ok(()) => {
                println!("database: ok ({})", settings.store_location());
                Some(store)
            }
            Err(e) => {
                healthy = false;
                println!("database: ERROR {e}");
                None
            }
        },
        Err(e) => {
            healthy = false;
            println!("database: ERROR {e}");
            None
        }
    };
    match tokio::process::Command::new(&settings.qemu_binary)
        .arg("--version")
        .output()
        .await
    {
        Ok(out) if out.status.success() => println!(
            "qemu: {} ({})",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("?"),
            settings.qemu_binary.display()
        ),
        Ok(out) => {
            healthy = false;
            println!(
                "qemu: ERROR {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Err(e) => {
            healthy = false;
            println!(
                "qemu: ERROR {} not runnable: {e}",
                settings.qemu_binary.display()
            );
        }
    }
    println!("{}", super::token::summary(settings, store.as_ref()).await);
    // The templates are read as `GET /vms` shows them, from the same views.
    let state = store
        .map(|store| AppState::new(Arc::new(settings.clone()), store, Arc::new(Notify::new())));
    let resolver = match &state {
        Some(state) => state.accel.clone(),
        None => Arc::new(AccelResolver::new(
            &settings.qemu_binary,
            &settings.run_dir,
            &settings.kvm_device,
        )),
    };
    println!("{}", accel_line(settings, &resolver).await);
    let catalog = VmCatalog::new(&settings.vm_images_dir, &settings.vm_config_dir);
    let names = catalog.available();
    println!(
        "vms: {}",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    );
    if let Some(state) = &state {
        match api::vms::all(state).await {
            Ok(vms) => {
                for line in template_lines(&vms) {
                    println!("{line}");
                }
            }
            Err(e) => {
                healthy = false;
                println!("templates: ERROR {e}");
            }
        }
    }
    // A failed template is not ill health: its VM's requests boot cold.
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `template NAME: …` for every WARM VM, and for any other VM that still has a template.
fn template_lines(vms: &[api::vms::Vm]) -> Vec<String> {
    let mut lines = Vec::new();
    for vm in vms {
        let warm = vm.config.as_ref().map(|c| c.warm);
        let leftover = vm
            .template
            .hosts
            .iter()
            .any(|h| h.state != crate::model::TemplateState::None);
        let note = match warm {
            Some(true) => "",
            _ if !leftover => continue,
            Some(false) => " (WARM is off: no request uses it)",
            None => " (the config does not load)",
        };
        lines.push(format!(
            "template {}: {}{note}",
            vm.name,
            super::render::template_line(&vm.template)
        ));
    }
    lines
}

pub(super) async fn console(
    settings: &Settings,
    name: &str,
    timeout: u64,
) -> anyhow::Result<ExitCode> {
    let catalog = VmCatalog::new(&settings.vm_images_dir, &settings.vm_config_dir);
    let vm = catalog.load(name)?;
    let run_name = format!("console-{}", std::process::id());
    let paths = launch::RunPaths::new(&settings.run_dir, &run_name);
    paths.create()?;
    let result = async {
        if let Some(base) = &vm.image {
            image::create_overlay(
                &image::qemu_img_for(&settings.qemu_binary),
                base,
                vm.format,
                &paths.overlay,
            )
            .await?;
        }
        let choice = AccelResolver::new(
            &settings.qemu_binary,
            &settings.run_dir,
            &settings.kvm_device,
        )
        .choose(vm.accel, settings.accel)
        .await;
        eprintln!("sqlite-sim: accelerator {}", choice.describe());
        let spec = launch::LaunchSpec {
            vm: &vm,
            accel: choice.accel,
            paths: &paths,
            disk: vm.image.as_ref().map(|_| paths.overlay.as_path()),
            name: format!("sqlite-sim-{run_name}"),
            memory: launch::Memory::Anonymous,
            incoming: false,
            channel: false,
        };
        let args = launch::qemu_args(&spec, launch::Wiring::Interactive);
        eprintln!(
            "sqlite-sim: {} {}",
            settings.qemu_binary.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        eprintln!(
            "sqlite-sim: QMP at {}; killed after {timeout} s",
            paths.qmp.display()
        );
        let mut child = tokio::process::Command::new(&settings.qemu_binary)
            .args(&args)
            .kill_on_drop(true)
            .spawn()
            .context("starting QEMU")?;
        let status =
            match tokio::time::timeout(std::time::Duration::from_secs(timeout), child.wait()).await
            {
                Ok(s) => s?,
                Err(_) => {
                    eprintln!("sqlite-sim: timeout; killing QEMU");
                    child.kill().await?;
                    child.wait().await?
                }
            };
        anyhow::Ok(if status.success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
    .await;
    paths.remove();
    result
}

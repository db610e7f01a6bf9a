//! How a run's guest comes to be, as one seam with three strategies: booted from its disk
//! image (cold), restored from its VM's template now (warm), or taken from the pool of clones
//! restored ahead of time. Each hands over a paused QEMU; [`attach`] connects its console
//! before the vCPUs run, and [`super::guest`] takes it from there, the same for all three.

use super::error::RunError;
use super::pool::Pooled;
use super::template::Template;
use super::AgentContext;
use crate::config::vm::{ConsoleTransport, DiskFormat, VmConfig};
use crate::config::Accel;
use crate::model::BootMode;
use crate::qemu::console::protocol::{ConsoleParser, StreamParser};
use crate::qemu::console::{self, Console};
use crate::qemu::image;
use crate::qemu::launch::{self, LaunchSpec, Memory, RunPaths, Wiring};
use crate::qemu::machine::Machine;
use crate::qemu::qmp::QmpError;
use crate::qemu::snapshot;
use crate::store::sink::LogSink;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A restore whose state does not load within this long has failed.
const LOAD_LIMIT: Duration = Duration::from_secs(30);

/// What a run boots from.
pub(super) enum Launch {
    /// The disk image, under `accel`; `kvm_watch` under `auto`'s KVM.
    Cold { accel: Accel, kvm_watch: bool },
    /// A clone restored from this template now.
    Warm(Arc<Template>),
    /// A clone restored ahead of time.
    Pool(Box<Pooled>),
}

impl Launch {
    pub fn mode(&self) -> BootMode {
        match self {
            Launch::Cold { .. } => BootMode::Cold,
            Launch::Warm(_) => BootMode::Warm,
            Launch::Pool(_) => BootMode::Pool,
        }
    }

    /// The template a clone comes from.
    pub fn template(&self) -> Option<&Arc<Template>> {
        match self {
            Launch::Cold { .. } => None,
            Launch::Warm(t) => Some(t),
            Launch::Pool(p) => Some(&p.template),
        }
    }
}

/// A QEMU as a strategy hands it over: paused, QMP connected, console not yet attached.
pub(super) struct Launched {
    pub machine: Machine,
    pub paths: RunPaths,
    /// When the restore began (QEMU's start, or the pool take).
    pub since: Instant,
}

/// Runs `launch` for a run in `paths`.
pub(super) async fn launch(
    ctx: &AgentContext,
    cfg: &VmConfig,
    launch: Launch,
    paths: RunPaths,
    name: String,
    sink: &LogSink,
) -> Result<Launched, RunError> {
    let since = Instant::now();
    match launch {
        Launch::Cold { accel, .. } => {
            paths.create()?;
            let machine = cold(ctx, cfg, accel, &paths, name, sink).await?;
            Ok(Launched {
                machine,
                paths,
                since,
            })
        }
        Launch::Warm(template) => {
            paths.create()?;
            let (machine, took) = restore(ctx, cfg, &template, &paths, name)
                .await
                .map_err(|e| RunError::Restore(e.to_string()))?;
            sink.system(format!(
                "restored from template {} ({}) in {:.0} ms",
                template.meta.key,
                template.dir.display(),
                took.as_secs_f64() * 1000.0
            ))
            .await;
            Ok(Launched {
                machine,
                paths,
                since,
            })
        }
        Launch::Pool(p) => {
            let p = *p;
            sink.system(format!(
                "took a clone of template {} from the pool ({}; restored in {:.0} ms)",
                p.template.meta.key,
                p.paths.dir.display(),
                p.restored.as_secs_f64() * 1000.0
            ))
            .await;
            Ok(Launched {
                machine: p.machine,
                paths: p.paths,
                since,
            })
        }
    }
}

/// Overlay on the base image, argv, spawn, QMP handshake. QEMU is paused (`-S`).
async fn cold(
    ctx: &AgentContext,
    cfg: &VmConfig,
    accel: Accel,
    paths: &RunPaths,
    name: String,
    sink: &LogSink,
) -> Result<Machine, RunError> {
    let s = &ctx.settings;
    if let Some(base) = &cfg.image {
        image::overlay_from_prototype(
            &image::qemu_img_for(&s.qemu_binary),
            &s.run_dir.join(image::PROTOTYPES),
            base,
            cfg.format,
            &paths.overlay,
        )
        .await?;
    }
    let spec = LaunchSpec {
        vm: cfg,
        accel,
        paths,
        disk: cfg.image.as_ref().map(|_| paths.overlay.as_path()),
        name,
        memory: Memory::Anonymous,
        incoming: false,
        channel: cfg.channel.has_devices(),
    };
    start(ctx, &spec, sink).await
}

/// Spawns QEMU for `spec` and logs its command line and pid.
pub(super) async fn start(
    ctx: &AgentContext,
    spec: &LaunchSpec<'_>,
    sink: &LogSink,
) -> Result<Machine, RunError> {
    let binary = &ctx.settings.qemu_binary;
    let args = launch::qemu_args(spec, Wiring::Agent);
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    sink.system(format!(
        "starting {} ({}) {}",
        binary.display(),
        spec.accel.as_str(),
        shown.join(" ")
    ))
    .await;
    let machine = Machine::start(binary, &args, spec.paths).await?;
    sink.system(format!(
        "QEMU {} running as pid {}, QMP connected",
        machine.qmp.version(),
        machine.process.pid()
    ))
    .await;
    Ok(machine)
}

/// A clone of `template` in `paths` (created already): its own overlay on the template's
/// frozen disk, the template's RAM file mapped privately, the device state loaded. Paused.
/// Returns it with how long the restore took. Used for warm runs and to fill the pool.
pub(super) async fn restore(
    ctx: &AgentContext,
    cfg: &VmConfig,
    template: &Template,
    paths: &RunPaths,
    name: String,
) -> Result<(Machine, Duration), RestoreError> {
    let start = Instant::now();
    let s = &ctx.settings;
    let disk = template.disk();
    if let Some(disk) = &disk {
        image::overlay_from_prototype(
            &image::qemu_img_for(&s.qemu_binary),
            &s.run_dir.join(image::PROTOTYPES),
            disk,
            DiskFormat::Qcow2,
            &paths.overlay,
        )
        .await
        .map_err(|e| RestoreError(e.to_string()))?;
    }
    let ram = template.ram();
    let spec = LaunchSpec {
        vm: cfg,
        accel: template.meta.accel,
        paths,
        disk: disk.as_ref().map(|_| paths.overlay.as_path()),
        name,
        memory: Memory::Clone(&ram),
        incoming: true,
        channel: cfg.channel.has_devices(),
    };
    let args = launch::qemu_args(&spec, Wiring::Agent);
    let mut machine = Machine::start(&s.qemu_binary, &args, paths)
        .await
        .map_err(|e| RestoreError(e.to_string()))?;
    snapshot::load(&mut machine, &template.state(), LOAD_LIMIT)
        .await
        .map_err(|e| RestoreError(e.to_string()))?;
    Ok((machine, start.elapsed()))
}

/// Why a clone could not be restored.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct RestoreError(pub String);

/// Connects the console (and the stderr port) of a paused QEMU, before its vCPUs run.
pub(super) async fn attach(
    cfg: &VmConfig,
    paths: &RunPaths,
    machine: &Machine,
    token: &str,
    sink: &LogSink,
) -> Result<Console, RunError> {
    let (r, w) = match cfg.console {
        ConsoleTransport::Socket => console::connect_socket(&paths.console).await?,
        ConsoleTransport::Pty => {
            let devs = machine.qmp.execute(&qapi::qmp::query_chardev {}).await?;
            let pty = devs
                .iter()
                .find(|d| d.label == launch::CONSOLE_CHARDEV)
                .and_then(|d| d.filename.strip_prefix("pty:"))
                .ok_or_else(|| {
                    RunError::Qmp(QmpError::Handshake("QEMU reported no console pty".into()))
                })?;
            sink.system(format!("console on pty {pty}")).await;
            console::open_pty(std::path::Path::new(pty))?
        }
    };
    // The stderr port is always drained (a chardev nobody reads stalls the guest); it is only
    // parsed as stderr when the VM config says the guest uses it.
    let (er, ew) = console::connect_socket(&paths.stderr_port).await?;
    let mut streams = vec![(er, ew, StreamParser::stderr(token))];
    let mut files = None;
    if cfg.channel.has_devices() {
        let [out, err, into, art] = &paths.channel;
        let (r, w) = console::connect_socket(out).await?;
        streams.push((r, w, StreamParser::stdout(token)));
        let (r, w) = console::connect_socket(err).await?;
        streams.push((r, w, StreamParser::stderr(token)));
        files = Some(console::FilePorts {
            input: console::connect_socket(into).await?,
            artifacts: console::connect_socket(art).await?,
        });
    }
    Ok(Console::start(
        r,
        w,
        ConsoleParser::new(token, cfg.prompt.clone()),
        streams,
        files,
        sink.clone(),
    ))
}

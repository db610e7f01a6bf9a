//! Warm-start templates: a VM booted once, logged in, set up, `PREPARE`d, paused and saved, so
//! that later runs restore clones of it instead of booting.
//!
//! A template is three files and a description, in `RUN_DIR/templates/<vm>-<key>/`:
//! `disk.qcow2` (the template's overlay on the base image, frozen: clones get overlays on it),
//! `ram` (guest RAM, a `memory-backend-file` the template shared with QEMU; clones map it
//! privately, copy-on-write), `state` (device state, saved with `x-ignore-shared`) and
//! `meta.json`. The key is a hash of everything the template was made from (the VM config's
//! text, the image, kernel and initrd files, the QEMU binary and version, the accelerator, the
//! format below), so a change to any of them makes the template stale: runs boot cold, and a
//! new one is built in the background.
//!
//! Builds run in a host-wide VM slot, one at a time per VM across every agents process on the
//! host (an `flock`), in a private run directory; the finished files are renamed into place in
//! one step, so a crash never leaves a half-written template a clone could pick up. Their rows
//! in the store say where each host's template stands, and carry the API's build and delete
//! orders.

use super::boot;
use super::error::RunError;
use super::guest::{Known, Limits, Started};
use super::vm::Vm;
use super::AgentContext;
use crate::config::vm::VmConfig;
use crate::config::Accel;
use crate::model::{Channel, TemplateState};
use crate::qemu::accel::{cpu_model, QemuIdentity};
use crate::qemu::console::protocol::Session;
use crate::qemu::image;
use crate::qemu::launch::{LaunchSpec, Memory, RunPaths};
use crate::qemu::snapshot;
use crate::store::sink::LogSink;
use crate::store::TemplateRecord;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Bumped when what a template holds or how it is made changes: older ones are stale.
pub const FORMAT: u32 = 2;
/// The console must be silent this long before the template is saved.
const QUIET: Duration = Duration::from_millis(300);
/// Longest wait for that silence.
const QUIET_LIMIT: Duration = Duration::from_secs(10);
const SAVE_LIMIT: Duration = Duration::from_secs(60);
/// Builds and restores of one key may fail this often before the manager stops rebuilding it
/// (until its inputs change or the API orders a build).
const MAX_FAILURES: i64 = 2;

#[derive(Debug, Error)]
pub enum TemplateError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("saving the template: {0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("reserving {bytes} bytes of guest RAM in {path}: {source}")]
    Ram {
        path: PathBuf,
        bytes: u64,
        source: std::io::Error,
    },
    #[error("template files in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `meta.json` says of a template.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub format: u32,
    pub vm: String,
    pub key: String,
    pub built_at: String,
    pub build_ms: i64,
    /// The console shell's binary, as the template's guest reported it (clones run commands
    /// with it, as a cold boot would).
    pub login_shell: String,
    /// Whether the template's guest has the channel's ports.
    pub channel: Channel,
    pub accel: Accel,
    /// Whether the VM has a disk (`disk.qcow2`).
    pub disk: bool,
    /// What the key was computed from.
    pub inputs: serde_json::Value,
    pub size_bytes: u64,
}

/// A ready template on this host.
#[derive(Debug)]
pub struct Template {
    pub dir: PathBuf,
    pub meta: TemplateMeta,
}

impl Template {
    pub fn disk(&self) -> Option<PathBuf> {
        self.meta.disk.then(|| self.dir.join("disk.qcow2"))
    }
    pub fn ram(&self) -> PathBuf {
        self.dir.join("ram")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The template in `dir`, if it is complete.
    fn open(dir: &Path) -> Option<Template> {
        let meta: TemplateMeta =
            serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
        let t = Template {
            dir: dir.to_path_buf(),
            meta,
        };
        let complete = t.meta.format == FORMAT
            && t.ram().is_file()
            && t.state().is_file()
            && t.disk().is_none_or(|d| d.is_file());
        complete.then_some(t)
    }
}

/// What a VM's template must be made from now: its key and the inputs behind it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub key: String,
    pub inputs: serde_json::Value,
    pub accel: Accel,
}

/// A file as the key sees it: replaced or modified, it is another file.
fn file_identity(path: &Path) -> serde_json::Value {
    match std::fs::metadata(path) {
        Ok(m) => serde_json::json!({
            "path": path.display().to_string(),
            "size": m.size(),
            "mtime_ns": m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            "inode": m.ino(),
        }),
        Err(e) => serde_json::json!({ "path": path.display().to_string(), "error": e.to_string() }),
    }
}

/// The identity of `cfg`'s template under `accel` with this QEMU.
pub fn identity(cfg: &VmConfig, text: &str, accel: Accel, qemu: &QemuIdentity) -> Identity {
    let opt = |p: &Option<PathBuf>| p.as_deref().map(file_identity);
    let inputs = serde_json::json!({
        "format": FORMAT,
        "vm": cfg.name,
        "config_sha256": format!("{:x}", Sha256::digest(text.as_bytes())),
        "image": opt(&cfg.image),
        "kernel": opt(&cfg.kernel),
        "initrd": opt(&cfg.initrd),
        "qemu": qemu,
        "accel": accel,
        // A KVM guest's CPU is the host's.
        "cpu": (accel == Accel::Kvm).then(cpu_model),
    });
    let digest = Sha256::digest(serde_json::to_vec(&inputs).expect("json"));
    Identity {
        key: format!("{digest:x}")[..16].to_string(),
        inputs,
        accel,
    }
}

/// This process's view of the host's templates.
pub struct Templates {
    root: PathBuf,
    /// Wakes the manager (a run found a template missing or stale, or failed to restore one).
    pub wake: tokio::sync::Notify,
    /// The QEMU binary's identity, looked up again only when its size or mtime changes.
    qemu: Mutex<Option<QemuIdentity>>,
}

impl Templates {
    pub fn new(run_dir: &Path) -> Self {
        Templates {
            root: run_dir.join("templates"),
            wake: tokio::sync::Notify::new(),
            qemu: Mutex::new(None),
        }
    }

    pub async fn qemu(&self, binary: &Path) -> QemuIdentity {
        let cached = self.qemu.lock().expect("qemu identity lock").clone();
        if let Some(q) = cached {
            let same = std::fs::metadata(&q.path)
                .is_ok_and(|m| m.size() == q.size && m.mtime() == q.mtime);
            if same {
                return q;
            }
        }
        let q = QemuIdentity::of(binary).await;
        *self.qemu.lock().expect("qemu identity lock") = Some(q.clone());
        q
    }

    fn dir(&self, vm: &str, key: &str) -> PathBuf {
        self.root.join(format!("{vm}-{key}"))
    }

    /// The ready template of `vm` with this key, if there is one on this host (whichever
    /// process built it).
    pub fn find(&self, vm: &str, key: &str) -> Option<Arc<Template>> {
        Template::open(&self.dir(vm, key)).map(Arc::new)
    }

    /// Directories of `vm`'s templates, any key (stale ones included).
    fn dirs_of(&self, vm: &str) -> Vec<PathBuf> {
        let prefix = format!("{vm}-");
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| {
                e.file_name().to_str().is_some_and(|n| {
                    n.strip_prefix(&prefix)
                        .is_some_and(|k| k.len() == 16 && k.bytes().all(|b| b.is_ascii_hexdigit()))
                })
            })
            .map(|e| e.path())
            .collect()
    }

    /// Removes `vm`'s templates except the one with key `keep`; returns how many it removed.
    /// Clones running from a removed one keep their open files.
    fn remove_except(&self, vm: &str, keep: Option<&str>) -> usize {
        let keep = keep.map(|k| self.dir(vm, k));
        let mut n = 0;
        for d in self.dirs_of(vm) {
            if Some(&d) != keep.as_ref() {
                match std::fs::remove_dir_all(&d) {
                    Ok(()) => n += 1,
                    Err(e) => {
                        tracing::warn!(dir = %d.display(), error = %e, "could not remove a template")
                    }
                }
            }
        }
        n
    }

    /// Whether `vm` has a template other than `key` (a stale one) on this host.
    pub fn has_stale(&self, vm: &str, key: &str) -> bool {
        let current = self.dir(vm, key);
        self.dirs_of(vm).iter().any(|d| *d != current)
    }

    /// Takes the host-wide build lock of `vm`, or `None` if another build holds it.
    fn lock(&self, vm: &str) -> Result<Option<Flock<std::fs::File>>, TemplateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io(&self.root))?;
        let path = self.root.join(format!("{vm}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock).ok())
    }
}

/// This host's row of `vm`, or a fresh one.
async fn row(ctx: &AgentContext, vm: &str) -> TemplateRecord {
    let host = &ctx.settings.host_id;
    match ctx.store.templates(Some(vm.to_string())).await {
        Ok(rows) => rows.into_iter().find(|r| r.host_id == *host),
        Err(e) => {
            tracing::warn!(error = %e, "reading template rows failed");
            None
        }
    }
    .unwrap_or_else(|| TemplateRecord {
        host_id: host.clone(),
        vm_name: vm.to_string(),
        ..Default::default()
    })
}

async fn put(ctx: &AgentContext, rec: TemplateRecord) {
    if let Err(e) = ctx.store.put_template(rec).await {
        tracing::warn!(error = %e, "recording a template's state failed");
    }
}

/// A clone of `template` failed to restore: no later run may use it. It is removed and marked
/// failed; the manager rebuilds it (once, see [`MAX_FAILURES`]).
pub async fn restore_failed(ctx: &AgentContext, template: &Template, why: &str) {
    let vm = &template.meta.vm;
    if let Err(e) = std::fs::remove_dir_all(&template.dir) {
        tracing::warn!(error = %e, "could not remove a template that failed to restore");
    }
    ctx.pool.drain(vm);
    let mut rec = row(ctx, vm).await;
    if rec.key.as_deref() != Some(&template.meta.key) {
        rec.failures = 0;
    }
    rec.key = Some(template.meta.key.clone());
    rec.state = TemplateState::Failed;
    rec.error = Some(format!("a clone failed to restore: {why}"));
    rec.failures += 1;
    put(ctx, rec).await;
    ctx.templates.wake.notify_one();
}

/// How long a `WARM_WAIT` run waits for a template build at most.
const WAIT_LIMIT: Duration = Duration::from_secs(15 * 60);

/// For `WARM_WAIT`: waits until `vm`'s template `key` is ready (`None` if its build failed, or
/// the agents stop, first).
pub async fn wait_built(ctx: &AgentContext, vm: &str, key: &str) -> Option<Arc<Template>> {
    let deadline = Instant::now() + WAIT_LIMIT;
    while Instant::now() < deadline && !*ctx.stopping.borrow() {
        if let Some(t) = ctx.templates.find(vm, key) {
            return Some(t);
        }
        let rec = row(ctx, vm).await;
        if rec.state == TemplateState::Failed && rec.key.as_deref() == Some(key) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Why `vm` has no ready template on this host, in words for a run's `system` log.
pub async fn why_not_ready(ctx: &AgentContext, vm: &str) -> String {
    let orders = ctx
        .store
        .template_orders(vm.to_string())
        .await
        .unwrap_or_default();
    if orders.delete > orders.build {
        return format!(
            "its template was deleted on order (POST /vms/{vm}/template builds it again)"
        );
    }
    let rec = row(ctx, vm).await;
    match rec.state {
        TemplateState::Building => "its template is being built".into(),
        TemplateState::Failed => format!(
            "its template failed ({} time{}): {}",
            rec.failures,
            if rec.failures == 1 { "" } else { "s" },
            rec.error.as_deref().unwrap_or("unknown error")
        ),
        TemplateState::None | TemplateState::Ready => {
            "it has no template on this host yet; one is being built".into()
        }
    }
}

/// Keeps this host's templates as the VM configs and the API's orders say, until the agents
/// stop: builds missing and stale ones of `WARM` VMs, deletes on order.
pub async fn manager(ctx: Arc<AgentContext>) {
    let mut stopping = ctx.stopping.clone();
    loop {
        // Registered before the pass, so a wake-up during it is not missed.
        let woken = ctx.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        for name in ctx.catalog.available() {
            if *stopping.borrow() {
                return;
            }
            reconcile(&ctx, &name).await;
        }
        tokio::select! {
            _ = ctx.templates.wake.notified() => {}
            // The API's orders (and submissions) in this process.
            _ = &mut woken => {}
            _ = tokio::time::sleep(ctx.settings.agent_poll_interval.max(Duration::from_secs(1))) => {}
            _ = stopping.changed() => return,
        }
    }
}

async fn reconcile(ctx: &AgentContext, name: &str) {
    let Ok((cfg, text)) = ctx.catalog.load_with_text(name) else {
        return; // a broken config is reported by GET /vms and `config`, not here
    };
    let orders = ctx
        .store
        .template_orders(name.to_string())
        .await
        .unwrap_or_default();
    let mut rec = row(ctx, name).await;
    if orders.delete > rec.delete_order {
        let lock = match ctx.templates.lock(name) {
            Ok(Some(l)) => l,
            _ => return, // a build holds it: delete once it is done
        };
        ctx.pool.drain(name);
        let removed = ctx.templates.remove_except(name, None);
        tracing::info!(vm = name, removed, "template deleted on order");
        rec.state = TemplateState::None;
        rec.delete_order = orders.delete;
        rec.error = None;
        rec.failures = 0;
        rec.size_bytes = None;
        put(ctx, rec.clone()).await;
        drop(lock);
    }
    // Built on order unless a later order deleted it.
    let forced = orders.build > rec.build_order && orders.build > orders.delete;
    if orders.build > rec.build_order && !forced {
        rec.build_order = orders.build; // overtaken by the delete carried out above
        put(ctx, rec.clone()).await;
    }
    // Deleted on order stays deleted (requests boot cold) until a build is ordered.
    if !forced && (!cfg.warm || orders.delete > orders.build) {
        return;
    }
    let accel = ctx.accel.choose(cfg.accel, ctx.settings.accel).await.accel;
    let qemu = ctx.templates.qemu(&ctx.settings.qemu_binary).await;
    let ident = identity(&cfg, &text, accel, &qemu);
    if rec.key.as_deref() != Some(&ident.key) {
        rec.failures = 0;
    }
    if let Some(t) = ctx.templates.find(name, &ident.key) {
        if !forced {
            // Ready (maybe built by another process): say so, and drop stale ones.
            ctx.templates.remove_except(name, Some(&ident.key));
            if rec.state != TemplateState::Ready || rec.key.as_deref() != Some(&ident.key) {
                record_ready(ctx, &mut rec, &t).await;
            }
            return;
        }
    }
    if !forced && rec.state == TemplateState::Failed && rec.failures >= MAX_FAILURES {
        return; // gave up on this key; GET /vms and `status` show why
    }
    let lock = match ctx.templates.lock(name) {
        Ok(Some(l)) => l,
        Ok(None) => return, // another process builds it
        Err(e) => {
            tracing::warn!(vm = name, error = %e, "cannot take the template lock");
            return;
        }
    };
    // A build runs a VM: it takes a host slot like any run.
    let slot = tokio::select! {
        s = ctx.slots.acquire() => s,
        _ = wait_stopping(ctx) => return,
    };
    let Ok(slot) = slot else { return };
    rec.state = TemplateState::Building;
    rec.key = Some(ident.key.clone());
    rec.built_from = Some(ident.inputs.to_string());
    rec.error = None;
    if forced {
        rec.build_order = orders.build;
        rec.failures = 0;
    }
    put(ctx, rec.clone()).await;
    tracing::info!(vm = name, key = %ident.key, "building a template");
    let result = build(ctx, &cfg, &ident).await;
    drop(slot);
    match result {
        Ok(t) => {
            ctx.pool.drain(name);
            ctx.templates.remove_except(name, Some(&ident.key));
            tracing::info!(vm = name, key = %ident.key, ms = t.meta.build_ms, "template ready");
            record_ready(ctx, &mut rec, &t).await;
        }
        Err(e) => {
            tracing::warn!(vm = name, error = %e, "template build failed");
            rec.state = TemplateState::Failed;
            rec.error = Some(e.to_string());
            rec.failures += 1;
            put(ctx, rec).await;
        }
    }
    drop(lock);
}

async fn wait_stopping(ctx: &AgentContext) {
    let mut s = ctx.stopping.clone();
    let _ = s.wait_for(|s| *s).await;
}

async fn record_ready(ctx: &AgentContext, rec: &mut TemplateRecord, t: &Template) {
    rec.state = TemplateState::Ready;
    rec.key = Some(t.meta.key.clone());
    rec.built_from = Some(t.meta.inputs.to_string());
    rec.built_at = Some(t.meta.built_at.clone());
    rec.build_ms = Some(t.meta.build_ms);
    rec.size_bytes = Some(t.meta.size_bytes as i64);
    rec.error = None;
    put(ctx, rec.clone()).await;
    ctx.pool.wake.notify_one();
}

/// Boots `cfg` (cold), sets it up, runs `PREPARE`, pauses and saves it, and puts the files in
/// place. Everything of a failed build is removed.
async fn build(
    ctx: &AgentContext,
    cfg: &VmConfig,
    ident: &Identity,
) -> Result<Template, TemplateError> {
    let start = Instant::now();
    let run = RunPaths::new(
        &ctx.settings.run_dir,
        &format!("tpl-{}-{}", ident.key, std::process::id()),
    );
    run.remove();
    run.create().map_err(RunError::from)?;
    let result = build_in(ctx, cfg, ident, &run, start).await;
    if result.is_err() && ctx.settings.keep_failed_runs {
        tracing::info!(dir = %run.dir.display(), "keeping the failed template build");
    } else {
        run.remove();
    }
    result
}

async fn build_in(
    ctx: &AgentContext,
    cfg: &VmConfig,
    ident: &Identity,
    run: &RunPaths,
    start: Instant,
) -> Result<Template, TemplateError> {
    let s = &ctx.settings;
    if let Some(base) = &cfg.image {
        image::overlay_from_prototype(
            &image::qemu_img_for(&s.qemu_binary),
            &s.run_dir.join(image::PROTOTYPES),
            base,
            cfg.format,
            &run.overlay,
        )
        .await
        .map_err(RunError::from)?;
    }
    let ram = run.dir.join("ram");
    let state = run.dir.join("state");
    reserve_ram(&ram, cfg.memory_bytes()).await?;
    let (sink, sink_task) = LogSink::to_file(&run.dir.join("build.log")).map_err(io(&run.dir))?;
    let spec = LaunchSpec {
        vm: cfg,
        accel: ident.accel,
        paths: run,
        disk: cfg.image.as_ref().map(|_| run.overlay.as_path()),
        name: format!("sqlite-sim-template-{}", cfg.name),
        memory: Memory::Template(&ram),
        incoming: false,
        channel: cfg.channel.has_devices(),
    };
    let machine = boot::start(ctx, &spec, &sink).await?;
    let token = Session::random_token();
    let console = boot::attach(cfg, run, &machine, &token, &sink).await?;
    let mut vm = Vm::new(
        machine,
        console,
        sink.clone(),
        ctx.stopping.clone(),
        s.agent_poll_interval,
    );
    let saved = async {
        let started = vm.start().await?;
        let limits = Limits::for_template(started, cfg.boot_timeout);
        let mut ready = started.boot(&mut vm, cfg, &token, &limits).await?;
        if let Some(prepare) = &cfg.prepare {
            let exited = ready.run(&mut vm, cfg, prepare, limits.run).await?;
            if exited.code != 0 {
                return Err(RunError::PrepareFailed(exited.code).into());
            }
        }
        quiet(&mut vm).await;
        vm.machine
            .qmp
            .execute(&qapi::qmp::stop {})
            .await
            .map_err(RunError::from)?;
        snapshot::save(&mut vm.machine, &state, SAVE_LIMIT).await?;
        Ok::<_, TemplateError>(Started::known(&ready))
    }
    .await;
    // Saved or not, this QEMU is done: `quit` (a paused guest cannot react to ACPI).
    let report = vm.shut_down(Duration::ZERO).await;
    drop(sink);
    sink_task.close().await;
    let known = saved?;
    tracing::debug!(step = report.step.as_str(), "template QEMU ended");
    place(ctx, cfg, ident, run, &ram, &state, known, start)
}

/// Gives the shared RAM file all its blocks before QEMU maps it: on a file system that fills
/// up, a sparse file would kill QEMU with SIGBUS at the first page it could not place, where
/// this fails the build with the reason.
async fn reserve_ram(path: &Path, bytes: u64) -> Result<(), TemplateError> {
    let owned = path.to_path_buf();
    let reserved = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::create(&owned)?;
        let len = i64::try_from(bytes).map_err(|_| nix::Error::EFBIG)?;
        nix::fcntl::posix_fallocate(&file, 0, len).map_err(std::io::Error::from)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    reserved.map_err(|source| TemplateError::Ram {
        path: path.to_path_buf(),
        bytes,
        source,
    })
}

/// Waits (bounded) until the console has been silent for [`QUIET`].
async fn quiet(vm: &mut Vm) {
    let deadline = Instant::now() + QUIET_LIMIT;
    let mut seen = vm.console.received();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = vm.console.received();
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() >= QUIET {
            return;
        }
    }
}

/// Moves a finished build's files into the template directory in one rename.
#[allow(clippy::too_many_arguments)]
fn place(
    ctx: &AgentContext,
    cfg: &VmConfig,
    ident: &Identity,
    run: &RunPaths,
    ram: &Path,
    state: &Path,
    known: Known,
    start: Instant,
) -> Result<Template, TemplateError> {
    let templates = &ctx.templates;
    let staging = templates
        .root
        .join(format!(".new-{}-{}", ident.key, std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&staging)
        .map_err(io(&staging))?;
    let mut files = vec![(ram, "ram"), (state, "state")];
    if cfg.image.is_some() {
        files.push((run.overlay.as_path(), "disk.qcow2"));
    }
    let mut size = 0;
    for (from, name) in files {
        let to = staging.join(name);
        std::fs::rename(from, &to).map_err(io(&to))?;
        let f = std::fs::File::open(&to).map_err(io(&to))?;
        // Durable before it is announced, and read-only from now on: clones only read it.
        f.sync_all().map_err(io(&to))?;
        let m = f.metadata().map_err(io(&to))?;
        size += m.blocks() * 512;
        let mut perms = m.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o400);
        std::fs::set_permissions(&to, perms).map_err(io(&to))?;
    }
    let meta = TemplateMeta {
        format: FORMAT,
        vm: cfg.name.clone(),
        key: ident.key.clone(),
        built_at: crate::timefmt::now(),
        build_ms: start.elapsed().as_millis() as i64,
        login_shell: known.login_shell,
        channel: known.channel,
        accel: ident.accel,
        disk: cfg.image.is_some(),
        inputs: ident.inputs.clone(),
        size_bytes: size,
    };
    let meta_path = staging.join("meta.json");
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).expect("json"))
        .map_err(io(&meta_path))?;
    let dir = templates.dir(&cfg.name, &ident.key);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir).map_err(io(&dir))?;
    Ok(Template { dir, meta })
}

/// Removes what crashed builds left: staging directories and build run directories whose
/// process is gone.
pub fn clean_leftovers(run_dir: &Path) {
    let dead = |pid: &str| {
        pid.parse::<i32>()
            .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists())
    };
    let root = run_dir.join("templates");
    for (dir, prefix) in [(root.as_path(), ".new-"), (run_dir, "tpl-")] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(prefix) else {
                continue;
            };
            if rest.rsplit('-').next().is_some_and(dead) {
                tracing::info!(dir = %e.path().display(), "removing what a crashed template build left");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_ram_file_gets_its_blocks_before_qemu_maps_it() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("ram");
        reserve_ram(&ram, 8 << 20).await.unwrap();
        let meta = std::fs::metadata(&ram).unwrap();
        assert_eq!(meta.len(), 8 << 20);
        // Not a sparse file: every block is placed, so no page fault can meet a full disk.
        assert!(meta.blocks() * 512 >= 8 << 20, "{} blocks", meta.blocks());
        let missing = dir.path().join("gone/ram");
        let err = reserve_ram(&missing, 1 << 20)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1048576 bytes of guest RAM") && err.contains("gone/ram"),
            "{err}"
        );
    }

    fn cfg(dir: &Path, text: &str) -> VmConfig {
        VmConfig::parse("t", text, &dir.join("t.conf"), dir, dir).unwrap()
    }

    fn qemu() -> QemuIdentity {
        QemuIdentity {
            path: "/usr/bin/qemu-system-x86_64".into(),
            size: 1,
            mtime: 2,
            version: "QEMU emulator version 7.2.22".into(),
        }
    }

    #[test]
    fn the_key_changes_with_everything_a_template_is_made_from() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("t.qcow2"), b"disk").unwrap();
        let text = "WARM=\"on\"\n";
        let c = cfg(d.path(), text);
        let base = identity(&c, text, Accel::Tcg, &qemu()).key;
        assert_eq!(base.len(), 16);
        assert_eq!(identity(&c, text, Accel::Tcg, &qemu()).key, base, "stable");
        let other = "WARM=\"on\"\nMEMORY=\"256M\"\n";
        assert_ne!(
            identity(&cfg(d.path(), other), other, Accel::Tcg, &qemu()).key,
            base
        );
        assert_ne!(identity(&c, text, Accel::Kvm, &qemu()).key, base);
        let mut q = qemu();
        q.version = "QEMU emulator version 8.2.0".into();
        assert_ne!(identity(&c, text, Accel::Tcg, &q).key, base);
        // A rewritten image is another image.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(d.path().join("t.qcow2"), b"disk2").unwrap();
        assert_ne!(identity(&c, text, Accel::Tcg, &qemu()).key, base);
    }

    #[test]
    fn only_complete_templates_are_found() {
        let run = tempfile::tempdir().unwrap();
        let t = Templates::new(run.path());
        let dir = t.dir("tiny", "0123456789abcdef");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(t.find("tiny", "0123456789abcdef").is_none(), "empty");
        let meta = TemplateMeta {
            format: FORMAT,
            vm: "tiny".into(),
            key: "0123456789abcdef".into(),
            built_at: "x".into(),
            build_ms: 1,
            login_shell: "/bin/busybox".into(),
            channel: Channel::Virtio,
            accel: Accel::Tcg,
            disk: true,
            inputs: serde_json::Value::Null,
            size_bytes: 3,
        };
        std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        std::fs::write(dir.join("ram"), b"r").unwrap();
        std::fs::write(dir.join("state"), b"s").unwrap();
        assert!(t.find("tiny", "0123456789abcdef").is_none(), "no disk yet");
        std::fs::write(dir.join("disk.qcow2"), b"d").unwrap();
        let found = t.find("tiny", "0123456789abcdef").unwrap();
        assert_eq!(found.meta.login_shell, "/bin/busybox");
        assert!(!t.has_stale("tiny", "0123456789abcdef"));
        assert!(t.has_stale("tiny", "fedcba9876543210"));
        assert_eq!(t.remove_except("tiny", Some("fedcba9876543210")), 1);
        assert!(t.find("tiny", "0123456789abcdef").is_none());
    }

    #[test]
    fn crashed_builds_are_cleaned_live_ones_kept() {
        let run = tempfile::tempdir().unwrap();
        let dead = run.path().join("tpl-0123456789abcdef-999999999");
        let live = run
            .path()
            .join(format!("tpl-0123456789abcdef-{}", std::process::id()));
        let staging = run.path().join("templates/.new-0123456789abcdef-999999999");
        for d in [&dead, &live, &staging] {
            std::fs::create_dir_all(d).unwrap();
        }
        clean_leftovers(run.path());
        assert!(!dead.exists() && !staging.exists());
        assert!(live.exists());
    }
}

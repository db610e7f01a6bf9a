//! `/vms`: every VM the agents can run, with its effective config, the accelerator it gets on
//! this host and where its warm-start template stands on every host; and the orders that make
//! every host build or delete a VM's template.
//!
//! Orders are counters in the store ([`crate::store::TemplateOrders`]): the API bumps one and
//! answers `202` at once; each host's agents carry it out and record it in their template row.
//! So the view shows both what was ordered and how far each host has got.

use super::error::{ApiError, InvalidVmConfigResponse, NotWarmResponse};
use super::AppState;
use crate::config::vm::{is_valid_vm_name, ConsoleTransport, DiskFormat, VmConfig, VmConfigError};
use crate::config::Accel;
use crate::model::TemplateState;
use crate::store::{TemplateOrder, TemplateOrders, TemplateRecord};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// The rule [`is_valid_vm_name`] applies, as the document states it.
pub const VM_NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";

/// A `{name}` path parameter: a VM name.
pub struct VmName;

impl utoipa::PartialSchema for VmName {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(VM_NAME_PATTERN))
            .min_length(Some(1))
            .max_length(Some(64))
            .into()
    }
}

impl ToSchema for VmName {}

/// `GET /vms`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    /// Every VM with a config or an image, by name.
    pub vms: Vec<Vm>,
}

/// One VM as the agents would run it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub name: String,
    /// Its config loads, so requests may name it.
    pub valid: bool,
    /// Why the config does not load (a bad key or value); `null` when it does.
    pub error: Option<String>,
    /// The effective settings; `null` when the config does not load.
    pub config: Option<EffectiveConfig>,
    /// The accelerator a run of it gets on the API's host, and why, e.g.
    /// `tcg (pinned by the VM config)`; `null` when the config does not load.
    pub accelerator: Option<String>,
    pub template: TemplateView,
}

/// A VM's settings after defaults, as the agents use them. The login password is never shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EffectiveConfig {
    /// QEMU `-m`.
    pub memory: String,
    pub cpus: u32,
    /// The base disk; `null` for a VM that boots only a kernel.
    pub image: Option<String>,
    pub format: ImageFormat,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    /// What is asked for: the VM's `ACCEL`, else `SQLITE_SIM_ACCEL`.
    pub accel: AccelPolicy,
    /// The `PROMPT` regex, as written.
    pub prompt: String,
    pub login_user: Option<String>,
    /// Seconds.
    pub boot_timeout: u64,
    /// Seconds.
    pub shutdown_timeout: u64,
    pub console: ConsoleKind,
    pub stderr_device: Option<String>,
    /// The commands' interpreter; `null`: the console's login shell.
    pub shell: Option<String>,
    pub additional_args: Vec<String>,
    /// `WARM`: requests restore clones of a template.
    pub warm: bool,
    /// `WARM_POOL`: clones kept restored and paused.
    pub warm_pool: u32,
    /// `WARM_WAIT`: warm requests wait for a template being built instead of booting cold.
    pub warm_wait: bool,
    /// `PREPARE`: commands run once in the template's guest before it is saved.
    pub prepare: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AccelPolicy {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleKind {
    Socket,
    Pty,
}

/// A VM's warm-start template on every host that has reported one.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateView {
    /// Across hosts: `ready` if any host has it ready, else `building` if any builds it, else
    /// `failed` if any failed, else `none`.
    pub state: TemplateState,
    /// One row per host, written by that host's agents.
    pub hosts: Vec<TemplateHost>,
    /// Warm and pooled runs the restore times are taken from (the latest 200).
    pub restores: u64,
    pub restore_p50_ms: Option<i64>,
    pub restore_p99_ms: Option<i64>,
    pub orders: OrdersView,
}

/// What the API has been asked to do with the template, as counters.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrdersView {
    /// Builds ordered so far; a host has carried out build `n` when its `build_order` is `n`.
    pub build: i64,
    /// Deletions ordered so far, likewise.
    pub delete: i64,
    /// An order that some host has not carried out yet (with no host reporting, any order).
    pub outstanding: bool,
}

/// One host's template of the VM.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateHost {
    pub host_id: String,
    pub state: TemplateState,
    /// Identity of what it was (or is being) built from.
    pub key: Option<String>,
    pub built_at: Option<String>,
    /// The inputs behind `key` (image, kernel, config, QEMU, accelerator).
    #[schema(value_type = Option<Object>)]
    pub built_from: Option<serde_json::Map<String, serde_json::Value>>,
    pub build_ms: Option<i64>,
    pub size_bytes: Option<i64>,
    /// The last build or restore failure.
    pub error: Option<String>,
    /// Failed builds or restores since the last good build.
    pub failures: i64,
    /// The last build and delete orders this host carried out.
    pub build_order: i64,
    pub delete_order: i64,
    pub updated_at: String,
}

impl EffectiveConfig {
    fn of(vm: &VmConfig, setting: Accel) -> Self {
        let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
        EffectiveConfig {
            memory: vm.memory.clone(),
            cpus: vm.cpus,
            image: path(&vm.image),
            format: match vm.format {
                DiskFormat::Qcow2 => ImageFormat::Qcow2,
                DiskFormat::Raw => ImageFormat::Raw,
            },
            kernel: path(&vm.kernel),
            initrd: path(&vm.initrd),
            append: vm.append.clone(),
            accel: match vm.accel.unwrap_or(setting) {
                Accel::Auto => AccelPolicy::Auto,
                Accel::Kvm => AccelPolicy::Kvm,
                Accel::Tcg => AccelPolicy::Tcg,
            },
            prompt: prompt_source(vm.prompt.as_str()).to_string(),
            login_user: vm.login_user.clone(),
            boot_timeout: vm.boot_timeout.as_secs(),
            shutdown_timeout: vm.shutdown_timeout.as_secs(),
            console: match vm.console {
                ConsoleTransport::Socket => ConsoleKind::Socket,
                ConsoleTransport::Pty => ConsoleKind::Pty,
            },
            stderr_device: vm.stderr_device.clone(),
            shell: vm.shell.clone(),
            additional_args: vm.additional_args.clone(),
            warm: vm.warm,
            warm_pool: vm.warm_pool,
            warm_wait: vm.warm_wait,
            prepare: vm.prepare.clone(),
        }
    }
}

/// The `PROMPT` as written: the config parser compiles it as `(?:PROMPT)$`.
fn prompt_source(compiled: &str) -> &str {
    compiled
        .strip_prefix("(?:")
        .and_then(|s| s.strip_suffix(")$"))
        .unwrap_or(compiled)
}

impl TemplateView {
    fn of(
        rows: Vec<TemplateRecord>,
        orders: TemplateOrders,
        restores: crate::store::RestoreStats,
    ) -> Self {
        let state = [
            TemplateState::Ready,
            TemplateState::Building,
            TemplateState::Failed,
        ]
        .into_iter()
        .find(|s| rows.iter().any(|r| r.state == *s))
        .unwrap_or(TemplateState::None);
        let ordered = orders.build > 0 || orders.delete > 0;
        let behind = rows.is_empty()
            || rows
                .iter()
                .any(|r| r.build_order < orders.build || r.delete_order < orders.delete);
        TemplateView {
            state,
            hosts: rows.into_iter().map(TemplateHost::of).collect(),
            restores: restores.count,
            restore_p50_ms: restores.p50_ms,
            restore_p99_ms: restores.p99_ms,
            orders: OrdersView {
                build: orders.build,
                delete: orders.delete,
                outstanding: ordered && behind,
            },
        }
    }
}

impl TemplateHost {
    fn of(r: TemplateRecord) -> Self {
        let built_from = r.built_from.as_deref().and_then(|text| {
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(m)) => Some(m),
                // Agents write an object; anything else is shown as absent, and logged.
                _ => {
                    tracing::warn!(host = %r.host_id, vm = %r.vm_name,
                        "template built_from is not a JSON object");
                    None
                }
            }
        });
        TemplateHost {
            host_id: r.host_id,
            state: r.state,
            key: r.key,
            built_at: r.built_at,
            built_from,
            build_ms: r.build_ms,
            size_bytes: r.size_bytes,
            error: r.error,
            failures: r.failures,
            build_order: r.build_order,
            delete_order: r.delete_order,
            updated_at: r.updated_at,
        }
    }
}

/// The `{name}` of the path, checked as the document's pattern says.
fn path_name(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    // The extractor fails only on percent-encoded bytes that are not UTF-8.
    let name = path
        .map_err(|_| ApiError::InvalidName("a name that is not UTF-8".into()))?
        .0;
    if !is_valid_vm_name(&name) {
        let shown: String = name.chars().take(80).collect();
        return Err(ApiError::InvalidName(format!("{shown:?}")));
    }
    Ok(name)
}

/// The VM's config, or why it does not load; `404` for a VM that does not exist.
fn lookup(state: &AppState, name: &str) -> Result<Result<VmConfig, VmConfigError>, ApiError> {
    match state.catalog.load(name) {
        Err(VmConfigError::Unknown { name, available }) => {
            Err(ApiError::UnknownVm { name, available })
        }
        loaded => Ok(loaded),
    }
}

async fn view(
    state: &AppState,
    name: &str,
    loaded: Result<VmConfig, VmConfigError>,
    rows: Vec<TemplateRecord>,
) -> Result<Vm, ApiError> {
    let orders = state.store.template_orders(name.to_string()).await?;
    let restores = state.store.restore_stats(name.to_string()).await?;
    let (error, config, accelerator) = match loaded {
        Ok(vm) => {
            let choice = state.accel.choose(vm.accel, state.settings.accel).await;
            (
                None,
                Some(EffectiveConfig::of(&vm, state.settings.accel)),
                Some(choice.describe()),
            )
        }
        Err(e) => (Some(e.to_string()), None, None),
    };
    Ok(Vm {
        name: name.to_string(),
        valid: error.is_none(),
        error,
        config,
        accelerator,
        template: TemplateView::of(rows, orders, restores),
    })
}

/// Every VM: its config (or why it does not load), its accelerator and its template.
#[utoipa::path(get, path = "/vms", tag = "vms",
    responses((status = 200, body = VmList, description = "every VM with a config or an image, by name")))]
pub async fn list_vms(State(state): State<AppState>) -> Result<Json<VmList>, ApiError> {
    Ok(Json(VmList {
        vms: all(&state).await?,
    }))
}

/// Every VM with a config or an image, by name, as `GET /vms` shows them (`status` prints
/// their templates from this too).
pub async fn all(state: &AppState) -> Result<Vec<Vm>, ApiError> {
    let mut rows: BTreeMap<String, Vec<TemplateRecord>> = BTreeMap::new();
    for r in state.store.templates(None).await? {
        rows.entry(r.vm_name.clone()).or_default().push(r);
    }
    let mut vms = Vec::new();
    for name in state.catalog.available() {
        let loaded = match lookup(state, &name) {
            Ok(loaded) => loaded,
            // Removed since it was listed.
            Err(_) => continue,
        };
        let mine = rows.remove(&name).unwrap_or_default();
        vms.push(view(state, &name, loaded, mine).await?);
    }
    Ok(vms)
}

/// One VM; a template being built shows here as it progresses.
#[utoipa::path(get, path = "/vms/{name}", tag = "vms",
    params(("name" = inline(VmName), Path, description = "VM name")),
    responses((status = 200, body = Vm, description = "the VM")))]
pub async fn show_vm(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Vm>, ApiError> {
    let name = path_name(path)?;
    let loaded = lookup(&state, &name)?;
    let rows = state.store.templates(Some(name.clone())).await?;
    Ok(Json(view(&state, &name, loaded, rows).await?))
}

/// Order every host to build (or rebuild) the VM's template. Its agents carry the order out;
/// `GET /vms/{name}` shows the progress.
#[utoipa::path(post, path = "/vms/{name}/template", tag = "vms",
    params(("name" = inline(VmName), Path, description = "VM name")),
    responses(
        (status = 202, body = Vm, description = "ordered: the VM with the new order counters"),
        NotWarmResponse,
        InvalidVmConfigResponse,
    ))]
pub async fn build_template(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let name = path_name(path)?;
    let vm = lookup(&state, &name)?
        .map_err(|e| ApiError::Validation(format!("VM {name} is misconfigured: {e}")))?;
    if !vm.warm {
        return Err(ApiError::NotWarm(name));
    }
    let orders = state
        .store
        .order_template(name.clone(), TemplateOrder::Build)
        .await?;
    tracing::info!(vm = %name, order = orders.build, "template build ordered");
    // In-process agents act at once; others notice the order within their poll interval.
    state.wake.notify_waiters();
    let rows = state.store.templates(Some(name.clone())).await?;
    let v = view(&state, &name, Ok(vm), rows).await?;
    Ok((StatusCode::ACCEPTED, Json(v)))
}

/// Order every host to delete the VM's template.
#[utoipa::path(delete, path = "/vms/{name}/template", tag = "vms",
    params(("name" = inline(VmName), Path, description = "VM name")),
    responses((status = 202, body = Vm, description = "ordered: the VM with the new order counters")))]
pub async fn delete_template(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let name = path_name(path)?;
    let loaded = lookup(&state, &name)?;
    let rows = state.store.templates(Some(name.clone())).await?;
    if rows.iter().all(|r| r.state == TemplateState::None) {
        return Err(ApiError::NoTemplate(name));
    }
    let orders = state
        .store
        .order_template(name.clone(), TemplateOrder::Delete)
        .await?;
    tracing::info!(vm = %name, order = orders.delete, "template deletion ordered");
    state.wake.notify_waiters();
    // The order changes no row: the agents do, when they carry it out.
    let v = view(&state, &name, loaded, rows).await?;
    Ok((StatusCode::ACCEPTED, Json(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_pattern_is_the_rule_the_server_applies() {
        let re = regex::Regex::new(VM_NAME_PATTERN).unwrap();
        let long = "a".repeat(64);
        let too_long = "a".repeat(65);
        for name in [
            "tiny", "a", "A-1._x", "9", &long, &too_long, "", "-a", ".a", "..", "a/b", "a b", "é",
            "tiny\n", "a\u{0}b",
        ] {
            assert_eq!(re.is_match(name), is_valid_vm_name(name), "{name:?}");
        }
        use utoipa::PartialSchema;
        let body = serde_json::to_value(super::super::requests::CreateBody::schema()).unwrap();
        assert_eq!(body["properties"]["vm_name"]["pattern"], VM_NAME_PATTERN);
    }

    #[test]
    fn prompts_are_shown_as_written() {
        for src in [
            crate::config::vm::DEFAULT_PROMPT,
            "root@tiny:[^#]*# ",
            "(a|b)$",
        ] {
            let compiled = regex::Regex::new(&format!("(?:{src})$")).unwrap();
            assert_eq!(prompt_source(compiled.as_str()), src);
        }
    }

    fn row(host: &str, state: TemplateState, build: i64, delete: i64) -> TemplateRecord {
        TemplateRecord {
            host_id: host.into(),
            vm_name: "w".into(),
            state,
            build_order: build,
            delete_order: delete,
            ..Default::default()
        }
    }

    #[test]
    fn the_summary_prefers_ready_then_building_then_failed() {
        use TemplateState::*;
        let none = TemplateOrders::default();
        let stats = crate::store::RestoreStats::default();
        for (states, want) in [
            (vec![], None),
            (vec![None, None], None),
            (vec![Failed, None], Failed),
            (vec![Failed, Building], Building),
            (vec![Failed, Building, Ready], Ready),
            (vec![Ready, Failed], Ready),
        ] {
            let rows = states.iter().map(|s| row("h", *s, 0, 0)).collect();
            assert_eq!(
                TemplateView::of(rows, none, stats).state,
                want,
                "{states:?}"
            );
        }
    }

    #[test]
    fn an_order_is_outstanding_until_every_reporting_host_caught_up() {
        let stats = crate::store::RestoreStats::default();
        let orders = |build, delete| TemplateOrders { build, delete };
        let outstanding =
            |rows: Vec<TemplateRecord>, o| TemplateView::of(rows, o, stats).orders.outstanding;
        assert!(!outstanding(vec![], orders(0, 0)), "nothing ordered");
        assert!(outstanding(vec![], orders(1, 0)), "no host has reported");
        let ready = TemplateState::Ready;
        assert!(!outstanding(vec![row("a", ready, 1, 0)], orders(1, 0)));
        assert!(outstanding(
            vec![row("a", ready, 1, 0), row("b", ready, 0, 0)],
            orders(1, 0)
        ));
        assert!(outstanding(vec![row("a", ready, 1, 0)], orders(1, 1)));
    }

    #[test]
    fn built_from_is_parsed_and_anything_but_an_object_is_absent() {
        let with = |text: Option<&str>| {
            TemplateHost::of(TemplateRecord {
                built_from: text.map(str::to_string),
                ..Default::default()
            })
            .built_from
        };
        let m = with(Some(r#"{"image": "tiny.qcow2", "qemu": "7.2"}"#)).unwrap();
        assert_eq!(m["image"], "tiny.qcow2");
        assert_eq!(with(None), None);
        assert_eq!(with(Some("[1]")), None);
        assert_eq!(with(Some("not json")), None);
    }
}

//! The REST API (axum). Handlers live per resource (`requests` with its multipart `upload`s,
//! `artifacts`, `logs`, `metrics`, `vms`, `tokens`, `audit`); who may call what, and the
//! audit record of control actions, is the [`access`] layer's;
//! errors map to HTTP in exactly one place ([`error`]); the OpenAPI document ([`openapi`]) is
//! generated from the handlers' annotations, completed for this server's settings, and served
//! with Swagger UI, offline.

pub mod access;
mod artifacts;
mod audit;
mod console;
pub mod error;
mod files;
mod hosts;
mod input;
mod logs;
mod metrics;
pub mod openapi;
mod priority;
mod requests;
mod tokens;
pub use tokens::expiry as tokens_expiry;
pub mod upload;
pub mod vms;

use crate::config::vm::VmCatalog;
use crate::config::Settings;
use crate::qemu::accel::AccelResolver;
use crate::store::Store;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::get;
use axum::{Json, Router};
use error::ApiError;
use std::sync::Arc;
use tokio::sync::Notify;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;
use utoipa_swagger_ui::{Config, SwaggerUi};

/// Largest accepted JSON body (and `request` part of a multipart submission).
pub const BODY_LIMIT: usize = 128 * 1024;
/// Paths served without the bearer token.
pub const PUBLIC_PATHS: &[&str] = &[HEALTH];
const HEALTH: &str = "/health";

/// Shared by every handler, behind one `Arc`: axum clones the state for the access layer and
/// again for the handler of every call, and a clone is then one atomic increment rather than
/// one per field (and two path copies for the catalog).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] shares (its fields, through `Deref`).
pub struct Shared {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub catalog: VmCatalog,
    /// Wakes in-process agents when work arrives.
    pub wake: Arc<Notify>,
    /// What `ACCEL=auto` means on this host, for `GET /vms` (probed at most once per process,
    /// and shared with the agents through the run directory).
    pub accel: Arc<AccelResolver>,
    /// Viewers of live consoles in this process, and their typists.
    pub consoles: Arc<console::Hub>,
    /// Whether authentication is on, once known to be (see [`access`]).
    pub gate: Arc<access::Gate>,
}

impl AppState {
    pub fn new(settings: Arc<Settings>, store: Store, wake: Arc<Notify>) -> Self {
        AppState(Arc::new(Shared {
            catalog: VmCatalog::new(&settings.vm_images_dir, &settings.vm_config_dir),
            accel: Arc::new(AccelResolver::new(
                &settings.qemu_binary,
                &settings.run_dir,
                &settings.kvm_device,
            )),
            consoles: Arc::default(),
            gate: Arc::default(),
            settings,
            store,
            wake,
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub fn router(state: AppState) -> Router {
    let cors = state
        .settings
        .enable_cors
        .then(|| cors_layer(&state.settings));
    // Multipart submissions carry files up to SQLITE_SIM_MAX_UPLOAD; the handler still holds
    // JSON bodies to BODY_LIMIT.
    let submissions = DefaultBodyLimit::max(upload::body_limit(state.settings.max_upload));
    let mut app = Router::new()
        .route(
            "/requests",
            get(requests::list).post(requests::create).layer(submissions),
        )
        .route(
            "/requests/{uuid}",
            get(requests::show).delete(requests::delete),
        )
        .route("/requests/{uuid}/status", axum::routing::put(requests::set_status))
        .route("/requests/{uuid}/artifacts", get(artifacts::list))
        .route("/requests/{uuid}/artifacts.tar", get(artifacts::tar))
        .route("/requests/{uuid}/artifacts/{*path}", get(artifacts::one))
        .route("/requests/{uuid}/logs", get(logs::logs))
        .route("/requests/{uuid}/logs/raw", get(logs::raw))
        .route("/requests/{uuid}/logs/stream", get(logs::stream_logs))
        .route("/hosts", get(hosts::list_hosts))
        .route("/requests/{uuid}/console", get(console::console))
        .route("/metrics", get(metrics::metrics))
        .route("/stats", get(metrics::stats))
        .route("/prune", axum::routing::post(requests::prune))
        .route("/vms", get(vms::list_vms))
        .route("/vms/{name}", get(vms::show_vm))
        .route(
            "/vms/{name}/template",
            axum::routing::post(vms::build_template).delete(vms::delete_template),
        )
        // Built per request from the settings and the VMs present, so it describes this server.
        .route("/openapi.json", get(openapi::serve))
        .merge(SwaggerUi::new("/docs").config(Config::new(["/openapi.json"])))
        .route("/tokens", get(tokens::list_tokens).post(tokens::create_token))
        .route("/tokens/{name}", axum::routing::delete(tokens::revoke_token))
        .route("/audit", get(audit::list_audit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), access::layer))
        // Liveness stays open to load balancers.
        .route(HEALTH, get(health))
        // The dashboard's files are public: the page loads first, then asks for the token.
        .merge(crate::ui::router(state.settings.ui_dir.clone()))
        .fallback(|| async { ApiError::NoRoute })
        // axum keeps the `Allow` header on this answer.
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TraceLayer::new_for_http().make_span_with(
            |req: &axum::http::Request<axum::body::Body>| {
                tracing::info_span!("http", method = %req.method(), path = %req.uri().path())
            },
        ))
        .with_state(state);
    if let Some(cors) = cors {
        app = app.layer(cors);
    }
    app
}

fn cors_layer(settings: &Settings) -> CorsLayer {
    let origins = &settings.allowed_origins;
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods(tower_http::cors::Any)
        .allow_headers(tower_http::cors::Any)
}

/// Liveness and a database check; never requires auth.
#[utoipa::path(get, path = "/health", tag = "system",
    responses((status = 200, body = Health, description = "alive, database reachable")))]
async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    state.store.health().await?;
    Ok(Json(Health {
        status: "ok",
        database: "ok",
    }))
}

/// `GET /health` answer; any failure is an error answer instead.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
    #[schema(value_type = String, example = "ok")]
    database: &'static str,
}

/// Binds and serves until `shutdown` completes.
pub async fn serve(
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = std::net::SocketAddr::new(state.settings.api_host, state.settings.api_port);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    // Peer addresses name console typists in the `input` log.
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

//! The REST API (axum). Handlers live per resource; errors map to HTTP in [`error`].

pub mod error;
mod requests;

use crate::config::vm::VmCatalog;
use crate::config::Settings;
use crate::store::Store;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::{Json, Router};
use error::ApiError;
use std::sync::Arc;
use tokio::sync::Notify;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 128 * 1024;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub catalog: VmCatalog,
    /// Wakes in-process agents when work arrives.
    pub wake: Arc<Notify>,
}

impl AppState {
    pub fn new(settings: Arc<Settings>, store: Store, wake: Arc<Notify>) -> Self {
        AppState {
            catalog: VmCatalog::new(&settings.vm_images_dir, &settings.vm_config_dir),
            settings,
            store,
            wake,
        }
    }
}

pub fn router(state: AppState) -> Router {
    let cors = state
        .settings
        .enable_cors
        .then(|| cors_layer(&state.settings));
    let mut app = Router::new()
        .route(
            "/requests",
            axum::routing::post(requests::create),
        )
        .route("/requests/{uuid}", get(requests::show))
        .route("/requests/{uuid}/logs", get(requests::logs))
        .route("/health", get(health))
        .fallback(|| async { ApiError::NoRoute })
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

async fn health(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.store.health().await?;
    Ok(Json(
        serde_json::json!({ "status": "ok", "database": "ok" }),
    ))
}

/// Binds and serves until `shutdown` completes.
pub async fn serve(
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = std::net::SocketAddr::new(state.settings.api_host, state.settings.api_port);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

//! `GET /metrics` in the Prometheus text format, from the database (so the numbers cover every
//! process sharing it).

use super::error::ApiError;
use super::AppState;
use crate::store::Histogram;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::fmt::Write;

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, content_type = "text/plain", description = "Prometheus text format")))]
pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let m = state.store.metrics().await?;
    let mut out = String::new();
    let w = &mut out;
    header_lines(w, "sqlite_sim_requests", "gauge", "Requests by status.");
    for (status, n) in &m.by_status {
        let _ = writeln!(w, "sqlite_sim_requests{{status=\"{status}\"}} {n}");
    }
    header_lines(
        w,
        "sqlite_sim_vms_running",
        "gauge",
        "Requests that own a VM right now.",
    );
    let _ = writeln!(w, "sqlite_sim_vms_running {}", m.vms_active);
    histogram(
        w,
        "sqlite_sim_boot_seconds",
        "From starting the vCPUs to the shell prompt.",
        &m.boot,
    );
    histogram(
        w,
        "sqlite_sim_run_seconds",
        "From the prompt to the commands' exit (time held excluded).",
        &m.run,
    );
    histogram(
        w,
        "sqlite_sim_shutdown_seconds",
        "Duration of the shutdown ladder.",
        &m.shutdown,
    );
    header_lines(
        w,
        "sqlite_sim_shutdown_steps_total",
        "counter",
        "Which ladder step ended each VM.",
    );
    for (step, n) in &m.shutdown_steps {
        let _ = writeln!(
            w,
            "sqlite_sim_shutdown_steps_total{{step=\"{}\"}} {n}",
            step.as_str()
        );
    }
    header_lines(
        w,
        "sqlite_sim_log_bytes_total",
        "counter",
        "Log bytes stored.",
    );
    let _ = writeln!(w, "sqlite_sim_log_bytes_total {}", m.log_bytes);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

fn header_lines(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(w: &mut String, name: &str, help: &str, h: &Histogram) {
    header_lines(w, name, "histogram", help);
    for (le, n) in &h.buckets {
        let _ = writeln!(w, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(w, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(w, "{name}_sum {}", h.sum_seconds);
    let _ = writeln!(w, "{name}_count {}", h.count);
}

/// Summary statistics: counts by status, VMs running, success rate, boot and run times, log volume.
#[utoipa::path(get, path = "/stats", tag = "system",
    responses((status = 200, body = crate::store::Stats, description = "the summary")))]
pub async fn stats(
    State(state): State<AppState>,
) -> Result<axum::Json<crate::store::Stats>, ApiError> {
    Ok(axum::Json(state.store.stats().await?))
}

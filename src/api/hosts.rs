//! `/hosts`: the agents hosts sharing this store, as they report themselves.

use super::error::ApiError;
use super::AppState;
use crate::store::Host;
use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// `GET /hosts` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct HostList {
    pub hosts: Vec<Host>,
}

/// Every host an agents process has reported from, by id, live or not: its labels, the VMs
/// it can run, its agents, its slots in use and when it last reported. A host is live while
/// its latest report is younger than its `SQLITE_SIM_AGENT_LEASE` and it has not stopped.
#[utoipa::path(get, path = "/hosts", tag = "system",
    responses((status = 200, body = HostList, description = "every registered host, by id")))]
pub async fn list_hosts(State(state): State<AppState>) -> Result<Json<HostList>, ApiError> {
    Ok(Json(HostList {
        hosts: state.store.hosts().await?,
    }))
}

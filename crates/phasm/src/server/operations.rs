//! What runs the work: workers, queues and schedules.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::openapi::ErrorBody;
use super::{error, ServerState};

/// The workers alive now (what they take, when they last said so), and those gone.
#[utoipa::path(
    get,
    path = "/api/workers",
    tag = "operations",
    responses(
        (status = 200, description = "`{\"workers\": [alive], \"gone\": [stopped answering in the last day]}`", body = serde_json::Value),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn workers(State(state): State<Arc<ServerState>>) -> Response {
    let now = state.clock.now();
    match (
        state.store.workers(now).await,
        state.store.workers_gone(now).await,
    ) {
        (Ok(workers), Ok(gone)) => {
            let json = |list: &[crate::store::WorkerView]| -> Vec<serde_json::Value> {
                list.iter().map(crate::control::worker_json).collect()
            };
            Json(json!({ "workers": json(&workers), "gone": json(&gone) })).into_response()
        }
        (Err(e), _) | (_, Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Pending work per queue (due, scheduled, running, oldest due) with its limits.
#[utoipa::path(
    get,
    path = "/api/queues",
    tag = "operations",
    responses(
        (status = 200, description = "`{\"queues\": [...], \"parked\": N}`: due, scheduled, running, oldest due, steps per second over the last minute, and limits per queue", body = serde_json::Value),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn queues(State(state): State<Arc<ServerState>>) -> Response {
    let now = state.clock.now();
    match crate::control::queue_report(&*state.store, Some(&state.config), now).await {
        Ok((queues, stats)) => {
            Json(json!({ "queues": queues, "parked": stats.parked })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The schedules: each one's next tick and the last it fired.
#[utoipa::path(
    get,
    path = "/api/schedules",
    tag = "operations",
    responses(
        (status = 200, description = "`{\"schedules\": [...]}`: each with its next and last tick", body = serde_json::Value),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn schedules(State(state): State<Arc<ServerState>>) -> Response {
    let now = state.clock.now();
    match crate::control::schedule_statuses(&*state.store, &state.config, now).await {
        Ok(all) => {
            let all: Vec<serde_json::Value> =
                all.iter().map(crate::control::schedule_json).collect();
            Json(json!({ "schedules": all })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

//! Liveness (`GET /healthz`) and metrics (`GET /metrics`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::openapi::ErrorBody;
use super::{error, ServerState};

/// Whether the server and its database answer (no token asked).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "The server and its database answer: `{\"status\": \"ok\"}`", body = serde_json::Value),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn healthz(State(state): State<Arc<ServerState>>) -> Response {
    match state.store.next_due().await {
        Ok(_) => Json(json!({ "status": "ok" })).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store is unavailable: {e}"),
        ),
    }
}

/// Install the process-wide Prometheus recorder (once) and return its handle.
///
/// # Errors
/// When another metrics recorder is already installed.
pub fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle, String> {
    static HANDLE: std::sync::Mutex<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::Mutex::new(None);
    let mut installed = HANDLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(h) = installed.as_ref() {
        return Ok(h.clone());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| e.to_string())?;
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Prometheus metrics: step counters and durations, and pending work per queue sampled now.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text: step counters and durations, and pending work per queue", content_type = "text/plain", body = String),
        (status = 404, description = "Metrics are not enabled in this server", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn prometheus(State(state): State<Arc<ServerState>>) -> Response {
    let Some(handle) = &state.metrics else {
        return error(
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this server",
        );
    };
    match state.store.stats(state.clock.now()).await {
        Ok(stats) => {
            for q in &stats.queues {
                let queue = q.queue.clone();
                metrics::gauge!("phasm_queue_due", "queue" => queue.clone()).set(q.due as f64);
                metrics::gauge!("phasm_queue_scheduled", "queue" => queue.clone())
                    .set(q.scheduled as f64);
                metrics::gauge!("phasm_queue_running", "queue" => queue.clone())
                    .set(q.running as f64);
                metrics::gauge!("phasm_queue_oldest_due_age_seconds", "queue" => queue)
                    .set(q.oldest_due_age_seconds);
            }
            metrics::gauge!("phasm_parked_branches").set(stats.parked as f64);
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

//! One step of an instance's history in full, and running an instance again from a step:
//! `GET /api/instances/{name}/history/{id}` and `POST /api/instances/{name}/reset`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{check_name, error, ServerState};
use crate::control::ResetError;

/// `GET /api/instances/{name}/history/{id}`: the step, the context it was given, what it
/// passed on, and its task's log lines.
pub(super) async fn step(
    State(state): State<Arc<ServerState>>,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    if let Some(bad) = check_name(&name) {
        return bad;
    }
    let Ok(id) = id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{id}` is not a step id: use an `id` from the instance's history"),
        );
    };
    match state.store.step(&name, id).await {
        Ok(Some(detail)) => Json(crate::control::step_json(&detail)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no step {id} in the history of an instance named `{name}`"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The body of `POST /api/instances/{name}/reset`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    /// The step to run again: an `id` from the instance's history.
    step: i64,
}

/// `POST /api/instances/{name}/reset` with `{"step": ID}`: run the instance again from that
/// step of its history (see [`crate::control::reset`]).
pub(super) async fn reset(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(bad) = check_name(&name) {
        return bad;
    }
    let body: ResetBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be `{{\"step\": ID}}`, an id from the instance's history: {e}"
                ),
            )
        }
    };
    match crate::control::reset(
        &*state.store,
        &state.config,
        &*state.clock,
        &name,
        body.step,
    )
    .await
    {
        Ok(note) => {
            Json(json!({ "instance": name, "status": "running", "note": note })).into_response()
        }
        Err(e) => error(reset_status(&e), e.to_string()),
    }
}

/// The HTTP status of a refused reset.
pub(crate) fn reset_status(e: &ResetError) -> StatusCode {
    match e {
        ResetError::NotFound(_) | ResetError::NoStep { .. } => StatusCode::NOT_FOUND,
        ResetError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        ResetError::OnBranch { .. }
        | ResetError::NoInput { .. }
        | ResetError::NotInMachine { .. } => StatusCode::CONFLICT,
    }
}

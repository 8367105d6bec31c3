//! One step of an instance's history in full, and running an instance again from a step:
//! `GET /api/instances/{name}/history/{id}` and `POST /api/instances/{name}/reset`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::openapi::ErrorBody;
use super::{check_name, error, ServerState};
use crate::control::ResetError;

/// One step in full: the context it was given, what it passed on, its task's log lines.
#[utoipa::path(
    get,
    path = "/api/instances/{name}/history/{id}",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name"), ("id" = i64, Path, description = "A step's `id`, from the instance's history")),
    responses(
        (status = 200, description = "The step: its transition, the context it was given, what it passed on (`passed_on.to`: `step`, `pending` or `nothing`), its task's log lines", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name, or no such step of it", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ResetBody {
    /// The step to run again: an `id` from the instance's history.
    step: i64,
}

/// Run an instance again from a step of its history (`{"step": ID}`).
///
/// Its pending work is dropped and the step runs again with the context it was given (see
/// `control::reset`). Only a step whose line ran alone (the main line, or a join's, with
/// every branch forked before it ended or joined by then), and not a join.
#[utoipa::path(
    post,
    path = "/api/instances/{name}/reset",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    request_body = ResetBody,
    responses(
        (status = 200, description = "Running again from the step: `{\"instance\": NAME, \"status\": \"running\", \"note\": ...}`", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name, or no such step of it", body = ErrorBody),
        (status = 409, description = "That step cannot run again: on a forked branch, run while other branches were in flight, a join, or its machine changed", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn reset(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(bad) = check_name(&name) {
        return bad;
    }
    let body: ResetBody =
        match super::json_body(&body, "`{\"step\": ID}`, an id from the instance's history") {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
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
        ResetError::Unreadable(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ResetError::OnBranch { .. }
        | ResetError::Alongside { .. }
        | ResetError::NoInput { .. }
        | ResetError::NotInMachine { .. } => StatusCode::CONFLICT,
    }
}

//! Machines: the list, a drawing, and starting instances one by one or in a batch.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::openapi::{BatchBody, ErrorBody, StartBody};
use super::{batch, error, json_body, ServerState};
use crate::control::{start_instances, BatchStartError, StartError, StartOutcome, MAX_BATCH_START};

/// The machines this server runs: their states and initial state.
#[utoipa::path(
    get,
    path = "/api/machines",
    tag = "machines",
    responses(
        (status = 200, description = "The machines, with their states and initial state", body = serde_json::Value),
    )
)]
pub(super) async fn machines(State(state): State<Arc<ServerState>>) -> Response {
    let machines: Vec<Value> = state
        .config
        .machines
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "states": m.states.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                "initial": m.initial_state().map(|s| s.name.clone())})
        })
        .collect();
    Json(json!({ "machines": machines })).into_response()
}

/// A machine drawn as SVG.
#[utoipa::path(
    get,
    path = "/api/machines/{machine}/graph.svg",
    tag = "machines",
    params(("machine" = String, Path, description = "The machine's name")),
    responses(
        (status = 200, description = "The machine drawn as SVG", content_type = "image/svg+xml", body = String),
        (status = 404, description = "No machine of that name", body = ErrorBody),
    )
)]
pub(super) async fn graph(
    State(state): State<Arc<ServerState>>,
    Path(machine): Path<String>,
) -> Response {
    match state.config.machine(&machine) {
        Some(m) => (
            [(header::CONTENT_TYPE, "image/svg+xml")],
            crate::graph::to_svg(m),
        )
            .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no machine named `{machine}`"),
        ),
    }
}

/// What a start's body is, for its error messages.
pub(super) const START_SHAPE: &str =
    "a JSON object {\"context\": {...}, \"name\": \"...\", \"version\": N}, each optional";

/// Start an instance of a machine (idempotent by name).
///
/// The context's values are checked and converted against the machine's `context_types`; a
/// name already used by an instance of this machine changes nothing (200, `created: false`).
#[utoipa::path(
    post,
    path = "/api/machines/{machine}/instances",
    tag = "machines",
    params(("machine" = String, Path, description = "The machine's name")),
    request_body = Option<StartBody>,
    responses(
        (status = 201, description = "Started: `{\"instance\": NAME, \"created\": true}`", body = serde_json::Value),
        (status = 200, description = "An instance of that name existed: nothing changed (`created: false`, its `status`)", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body, or a version that is not stored (the message says which)", body = ErrorBody),
        (status = 404, description = "No machine of that name", body = ErrorBody),
        (status = 409, description = "The name is taken by an instance of another machine", body = ErrorBody),
        (status = 500, description = "The version asked for is stored, but this phasm cannot read it", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn start(
    State(state): State<Arc<ServerState>>,
    Path(machine): Path<String>,
    body: Bytes,
) -> Response {
    let body: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else {
        match json_body(&body, START_SHAPE) {
            Ok(body) => body,
            Err(message) => return error(StatusCode::BAD_REQUEST, message),
        }
    };
    let name = body.name;
    let request = crate::control::StartRequest {
        machine: &machine,
        version: body.version.map(std::num::NonZeroU32::get),
        context: body.context.unwrap_or_default(),
        name: name.as_deref(),
    };
    let outcome = crate::control::start_on(
        &*state.store,
        &state.config,
        &*state.clock,
        request,
        &state.limits,
    )
    .await;
    match outcome {
        Ok(StartOutcome::Started(name)) => (
            StatusCode::CREATED,
            Json(json!({ "instance": name, "created": true })),
        )
            .into_response(),
        Ok(StartOutcome::AlreadyExists { name, status, .. }) => {
            Json(json!({ "instance": name, "created": false, "status": status })).into_response()
        }
        Err(e) => error(start_error_status(&e), e.to_string()),
    }
}

/// The status of a start refused for `e`.
pub(super) fn start_error_status(e: &StartError) -> StatusCode {
    match e {
        StartError::UnknownMachine { .. } => StatusCode::NOT_FOUND,
        StartError::InvalidName(_)
        | StartError::InvalidKey(_)
        | StartError::ReservedName { .. }
        | StartError::ContextTooLarge { .. }
        | StartError::BadValue(_)
        | StartError::UnknownVersion { .. } => StatusCode::BAD_REQUEST,
        StartError::NameTaken { .. } => StatusCode::CONFLICT,
        StartError::Unreadable(_) => StatusCode::INTERNAL_SERVER_ERROR,
        StartError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Start one instance per context, all in one transaction: all or none.
///
/// At most 10,000 contexts (`MAX_BATCH_START`); a bad one is named (`contexts[i]`) and nothing starts.
#[utoipa::path(
    post,
    path = "/api/machines/{machine}/instances/batch",
    tag = "machines",
    params(("machine" = String, Path, description = "The machine's name")),
    request_body = BatchBody,
    responses(
        (status = 201, description = "Every context started (or existed): `{\"instances\": [NAME, ...], \"created\": N}`", body = serde_json::Value),
        (status = 400, description = "A bad body, or `contexts[i]` is bad (the message names it); nothing was started", body = ErrorBody),
        (status = 404, description = "No machine of that name", body = ErrorBody),
        (status = 413, description = "Over 10,000 contexts, or the body is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn start_batch(
    State(state): State<Arc<ServerState>>,
    Path(machine): Path<String>,
    body: Bytes,
) -> Response {
    let request = match batch::read(&body, state.limits.max_context_bytes) {
        Ok(r) => r,
        Err(batch::BodyError::TooMany) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("more than {MAX_BATCH_START} contexts in one request; send at most {MAX_BATCH_START} per request"),
            )
        }
        Err(batch::BodyError::Bad(message)) => return error(StatusCode::BAD_REQUEST, message)};
    let batch = crate::control::Batch {
        machine: &machine,
        items: request.items,
        key: request.key.as_deref(),
        version: request.version,
    };
    let outcome = start_instances(
        &*state.store,
        &state.config,
        &*state.clock,
        batch,
        &state.limits,
    )
    .await;
    match outcome {
        Ok(outcomes) => {
            let created = outcomes
                .iter()
                .filter(|o| matches!(o, StartOutcome::Started(_)))
                .count();
            let names: Vec<&str> = outcomes.iter().map(StartOutcome::name).collect();
            (
                StatusCode::CREATED,
                Json(json!({ "instances": names, "created": created })),
            )
                .into_response()
        }
        Err(BatchStartError::Context { index, error: e }) => error(
            StatusCode::BAD_REQUEST,
            format!("contexts[{index}]: {e}; nothing was started"),
        ),
        Err(BatchStartError::Start(e)) => error(start_error_status(&e), e.to_string()),
        Err(e @ BatchStartError::Partial { .. }) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

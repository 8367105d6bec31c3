//! Events from outside over HTTP: `POST /api/instances/{name}/events` and `POST
//! /api/waits/{token}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::openapi::{ErrorBody, EventBody};
use super::{check_name, error, ServerState};
use crate::control::{send, SendError, SendOutcome, SendRequest, SendTo};
use crate::engine::Context;

/// Send an event to an instance's waiting branches.
///
/// 202 when waiting branches took the event or it was kept for the next wait, 200 when its
/// `id` was accepted before (nothing done again), 409 when the instance cannot take it (ended,
/// or no waiting state of its machine accepts the event), 404 for an unknown instance.
#[utoipa::path(
    post,
    path = "/api/instances/{name}/events",
    tag = "events",
    params(("name" = String, Path, description = "The instance's name")),
    request_body = super::openapi::EventBody,
    responses(
        (status = 202, description = "Taken by waiting branches, or kept for the next wait", body = serde_json::Value),
        (status = 200, description = "This `id` was accepted before: nothing done again", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name (or no wait for that token)", body = ErrorBody),
        (status = 409, description = "The instance cannot take it: it ended, or no waiting state of its machine accepts the event", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn to_instance(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(bad) = check_name(&name) {
        return bad;
    }
    deliver(&state, SendTo::Instance(name), &body).await
}

/// A wait token whose signature does not check is refused before its body is read.
pub(super) async fn signed_wait_token(
    State(state): State<Arc<ServerState>>,
    Path(token): Path<String>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match state.store.wait_key().await {
        Ok(key) if crate::token::open(&key, &token).is_none() => error(
            StatusCode::NOT_FOUND,
            "no wait for that token (it is not one phasm made for this database)",
        ),
        // A store that cannot answer is reported by the handler.
        _ => next.run(request).await,
    }
}

/// Send an event to the one wait a wait token addresses (no bearer token asked).
///
/// The token comes from an entry action's `wait_token`; it is the credential, so a system
/// outside can call back with the token alone (as with Step Functions' task tokens). Answers as
/// the instance's events endpoint; 409 once that wait is over.
#[utoipa::path(
    post,
    path = "/api/waits/{token}",
    tag = "events",
    params(("token" = String, Path, description = "A wait token, from an entry action's `wait_token`")),
    request_body = super::openapi::EventBody,
    security(()),
    responses(
        (status = 202, description = "Taken by waiting branches, or kept for the next wait", body = serde_json::Value),
        (status = 200, description = "This `id` was accepted before: nothing done again", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name (or no wait for that token)", body = ErrorBody),
        (status = 409, description = "The instance cannot take it: it ended, or no waiting state of its machine accepts the event", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn to_wait(
    State(state): State<Arc<ServerState>>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    deliver(&state, SendTo::Token(token), &body).await
}

async fn deliver(state: &ServerState, to: SendTo, body: &[u8]) -> Response {
    let (event, data, id) = match parse(body) {
        Ok(parts) => parts,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let request = SendRequest {
        to,
        event: event.clone(),
        data,
        id: id.clone(),
    };
    let sent = send(
        &*state.store,
        Some(&state.config),
        &*state.clock,
        request,
        &state.limits,
    )
    .await;
    match sent {
        Ok(SendOutcome::Delivered { instance, branches }) => (
            StatusCode::ACCEPTED,
            Json(json!({
                "instance": instance, "event": event, "id": id,
                "delivered": branches, "buffered": false,
            })),
        )
            .into_response(),
        Ok(SendOutcome::Buffered { instance }) => (
            StatusCode::ACCEPTED,
            Json(json!({
                "instance": instance, "event": event, "id": id,
                "delivered": 0, "buffered": true,
            })),
        )
            .into_response(),
        Ok(SendOutcome::Duplicate { instance }) => Json(json!({
            "instance": instance, "event": event, "id": id, "duplicate": true,
        }))
        .into_response(),
        Err(e @ (SendError::NotFound(_) | SendError::BadToken)) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(SendError::Store(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) if e.is_conflict() => error(StatusCode::CONFLICT, e.to_string()),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// The body's event, data and id.
fn parse(body: &[u8]) -> Result<(String, Context, Option<String>), String> {
    let body: EventBody = super::json_body(
        body,
        "a JSON object {\"event\": NAME, \"data\": {...} (optional), \"id\": \"...\" (optional)}",
    )?;
    Ok((body.event, body.data.unwrap_or_default(), body.id))
}

//! Instances: the list, one instance, its history and logs in pages, and cancel and retry.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::openapi::ErrorBody;
use super::{check_name, error, ServerState};
use crate::control::instance_json;
use crate::store::Control;

/// Query of a history or log page.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct PageQuery {
    /// The `next_cursor` of the previous page (none: the first page).
    cursor: Option<String>,
    /// At most this many rows (default 100, at most 1000).
    limit: Option<usize>,
    /// History pages only: the steps of this branch (`""`: the main line).
    branch: Option<String>,
}

/// The page a query asks for (at most 1000 rows, 100 by default), or why the cursor is bad.
pub(super) fn page_request(query: &PageQuery) -> Result<crate::store::PageRequest, String> {
    let after = match query.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => match c.parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => {
                return Err(format!(
                    "unknown cursor `{c}`: use the `next_cursor` of the previous page"
                ))
            }
        },
    };
    Ok(crate::store::PageRequest {
        after,
        limit: query.limit.unwrap_or(100).clamp(1, 1000),
    })
}

/// A page of an instance's steps, oldest first (of one branch with `branch`).
#[utoipa::path(
    get,
    path = "/api/instances/{name}/history",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name"), PageQuery),
    responses(
        (status = 200, description = "`{\"history\": [steps, oldest first], \"next_cursor\": C}`; each step has an `id` for its full view", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn history_page(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Query(query): Query<PageQuery>,
) -> Response {
    let page = match check_page(&name, &query) {
        Ok(p) => p,
        Err(bad) => return *bad,
    };
    page_response(
        &name,
        "history",
        state
            .store
            .history_page(&name, page, query.branch.as_deref())
            .await,
        crate::control::history_json,
    )
}

/// A page of an instance's log lines, oldest first.
///
/// Each message is cut at 16 Ki characters, with a note saying so.
#[utoipa::path(
    get,
    path = "/api/instances/{name}/logs",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name"), PageQuery),
    responses(
        (status = 200, description = "`{\"logs\": [lines, oldest first], \"next_cursor\": C}`", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn logs_page(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Query(query): Query<PageQuery>,
) -> Response {
    let page = match check_page(&name, &query) {
        Ok(p) => p,
        Err(bad) => return *bad,
    };
    page_response(
        &name,
        "logs",
        state.store.logs_page(&name, page).await,
        |l| {
            json!({
                "at": crate::clock::rfc3339(l.at),
                "level": l.level,
                "message": l.message,
                "task": l.task})
        },
    )
}

/// The instance name and the page a paging request names, or its 400.
pub(super) fn check_page(
    name: &str,
    query: &PageQuery,
) -> Result<crate::store::PageRequest, Box<Response>> {
    if let Some(bad) = check_name(name) {
        return Err(Box::new(bad));
    }
    page_request(query).map_err(|why| Box::new(error(StatusCode::BAD_REQUEST, why)))
}

/// `{KEY: [rows], "next_cursor": C}`, a 404 for an unknown instance, a 503 for a store error.
pub(super) fn page_response<T>(
    name: &str,
    key: &str,
    result: crate::store::StoreResult<Option<crate::store::Page<T>>>,
    row: impl Fn(&T) -> Value,
) -> Response {
    match result {
        Ok(Some(page)) => {
            let rows: Vec<Value> = page.items.iter().map(row).collect();
            Json(json!({ key: rows, "next_cursor": page.next.map(|n| n.to_string()) }))
                .into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no instance named `{name}`")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Instances, filtered and paged: newest first, or most recently ended first.
#[utoipa::path(
    get,
    path = "/api/instances",
    tag = "instances",
    params(crate::control::ListParams),
    responses(
        (status = 200, description = "A page of instances, newest first (or most recently ended first), and `next_cursor`", body = serde_json::Value),
        (status = 400, description = "A bad filter, order, limit or cursor (the message says which)", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<Arc<ServerState>>,
    Query(query): Query<crate::control::ListParams>,
) -> Response {
    let filter = match query.to_filter(&state.config, state.clock.now()) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let limit = filter.limit;
    let cursor = filter.before.clone();
    match state.store.list(&filter).await {
        Ok(rows) => {
            // An empty page after a cursor: is it the end, or a cursor that names nothing?
            if let (true, Some(c)) = (rows.is_empty(), cursor.as_deref()) {
                if matches!(state.store.instance(c).await, Ok(None)) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("unknown cursor `{c}`: use the `next_cursor` of the previous page"),
                    );
                }
            }
            let rows: Vec<Value> = rows
                .iter()
                .map(|r| crate::control::summary_json_in(Some(&state.config), r))
                .collect();
            // A full page may have a next one: it starts after this page's last instance.
            let next = (rows.len() == limit)
                .then(|| {
                    rows.last()
                        .and_then(|r| r["instance"].as_str().map(str::to_string))
                })
                .flatten();
            Json(json!({ "instances": rows, "next_cursor": next })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// One instance: status, contexts, branches, latest steps, pending steps, waits, children.
#[utoipa::path(
    get,
    path = "/api/instances/{name}",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    responses(
        (status = 200, description = "The instance: status, contexts, branches, latest history, pending steps, waits, children", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn instance(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
) -> Response {
    if let Some(bad) = check_name(&name) {
        return bad;
    }
    match state.store.instance(&name).await {
        Ok(Some(view)) => {
            // Without the list of workers, no step is said to be unserved.
            let workers = state
                .store
                .workers(state.clock.now())
                .await
                .unwrap_or_default();
            Json(instance_json(&view, &workers)).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no instance named `{name}`")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

pub(super) async fn control(
    name: &str,
    result: Result<Control, crate::store::StoreError>,
    done: &str,
) -> Response {
    match result {
        Ok(Control::Done) => Json(json!({ "instance": name, "status": done })).into_response(),
        Ok(Control::NotFound) => {
            error(StatusCode::NOT_FOUND, format!("no instance named `{name}`"))
        }
        Ok(Control::NotAllowed(status)) => {
            error(StatusCode::CONFLICT, format!("`{name}` is {status}"))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The optional body of `POST /api/instances/{name}/cancel`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CancelBody {
    reason: Option<String>,
}

/// Cancel a running or failed instance, with an optional reason (`{"reason": "..."}`).
#[utoipa::path(
    post,
    path = "/api/instances/{name}/cancel",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    request_body = Option<CancelBody>,
    responses(
        (status = 200, description = "Cancelled: `{\"instance\": NAME, \"status\": \"cancelled\"}`", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 409, description = "The instance has ended", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn cancel(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(bad) = check_name(&name) {
        return bad;
    }
    let body: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        match super::json_body(&body, "`{\"reason\": \"...\"}` or empty") {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        }
    };
    let reason = match crate::control::cancel_reason(body.reason.as_deref()) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    control(
        &name,
        state
            .store
            .cancel_because(state.clock.now(), &name, reason.as_deref())
            .await,
        "cancelled",
    )
    .await
}

/// Resume a failed instance: its failed and held steps run again from attempt 0.
#[utoipa::path(
    post,
    path = "/api/instances/{name}/retry",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    responses(
        (status = 200, description = "Running again from its failed step: `{\"instance\": NAME, \"status\": \"running\"}`", body = serde_json::Value),
        (status = 400, description = "A bad name, parameter or body (the message says which)", body = ErrorBody),
        (status = 404, description = "No instance of that name", body = ErrorBody),
        (status = 409, description = "The instance has not failed", body = ErrorBody),
        (status = 503, description = "The database cannot be reached or failed", body = ErrorBody),
    )
)]
pub(super) async fn retry(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
) -> Response {
    if let Some(bad) = check_name(&name) {
        return bad;
    }
    control(
        &name,
        state.store.retry(state.clock.now(), &name).await,
        "running",
    )
    .await
}

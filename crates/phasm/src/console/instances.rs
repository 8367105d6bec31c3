//! `GET /instances`: the instance list, newest first, filtered by machine and status.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use super::layout::{instance_link, page, problem, seg, status, time};
use crate::server::ServerState;
use crate::store::{InstanceStatus, ListFilter};

#[derive(Deserialize)]
pub(crate) struct ListQuery {
    machine: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
}

const STATUSES: [&str; 5] = ["running", "completed", "failed", "halted", "cancelled"];

/// `GET /instances`.
pub(crate) async fn instances(
    State(state): State<Arc<ServerState>>,
    Query(q): Query<ListQuery>,
) -> Response {
    let machine = q.machine.filter(|m| !m.is_empty());
    let wanted = q
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .and_then(InstanceStatus::parse);
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let filter = ListFilter {
        machine: machine.clone(),
        status: wanted,
        limit,
        before: None,
    };
    let rows = match state.store.list(&filter).await {
        Ok(rows) => rows,
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, "Instances", &e.to_string()),
    };
    let body = html! {
        h1 { "Instances" }
        form method="get" {
            label { "Machine " select name="machine" {
                option value="" { "any" }
                @for m in &state.config.machines {
                    option selected[machine.as_deref() == Some(m.name.as_str())] { (m.name) }
                }
            } }
            " "
            label { "Status " select name="status" {
                option value="" { "any" }
                @for s in STATUSES {
                    option selected[wanted.map(InstanceStatus::as_str) == Some(s)] { (s) }
                }
            } }
            " "
            button { "Filter" }
        }
        table {
            tr { th { "instance" } th { "machine" } th { "status" } th { "created" } th { "error" } }
            @for r in &rows {
                tr {
                    td { (instance_link(&r.instance)) }
                    td { (r.machine) }
                    td { (status(r.status)) }
                    td { (time(r.created_at)) }
                    td class="err" { (r.error.as_deref().unwrap_or("")) }
                }
            }
        }
        @if rows.len() == limit {
            p { a href={ "/instances?machine=" (seg(machine.as_deref().unwrap_or(""))) "&status=" (wanted.map_or("", InstanceStatus::as_str)) "&limit=" (limit * 2) } { "Show more" } }
        }
    };
    page("Instances", body).into_response()
}

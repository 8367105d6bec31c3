//! `GET /instances`: the instance list — search by name prefix, filters (machine, status,
//! the state a branch is in, stuck for longer than, created and ended time ranges), order,
//! cursor paging, an optional auto-refresh, and bulk retry or cancel of a selection or of
//! everything the filters match (`POST /instances/bulk`, after a confirmation that says how
//! many). The filters live in the URL, so a filtered list can be bookmarked and shared.

use std::sync::Arc;

use axum::extract::{Form, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup};

use super::layout::{human_duration, instance_link, page, problem, seg, status, time};
use crate::control::{self, ListParams};
use crate::server::state::ServerState;
use crate::store::{Control, InstanceSummary, ListFilter};

const STATUSES: [&str; 5] = ["running", "completed", "failed", "halted", "cancelled"];

/// Most instances one bulk action touches.
pub const MAX_BULK: usize = 10_000;

/// `GET /instances`; with `X-Partial: 1`, only the rows (the auto-refresh).
pub(crate) async fn instances(
    State(state): State<Arc<ServerState>>,
    Query(params): Query<ListParams>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let now = state.clock.now();
    let filter = match params.to_filter(&state.config, now) {
        Ok(f) => f,
        Err(e) => {
            let body = html! { h1 { "Instances" } (filters(&state, &params)) p class="err" id="filter-error" { (e) } };
            return (StatusCode::BAD_REQUEST, page("Instances", body)).into_response();
        }
    };
    let rows = match state.store.list(&filter).await {
        Ok(rows) => rows,
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, "Instances", &e.to_string()),
    };
    if headers.get("x-partial").is_some() {
        return Html(table_rows(&state, &rows, now).into_string()).into_response();
    }
    let query = raw.unwrap_or_default();
    let without_cursor: String = query
        .split('&')
        .filter(|kv| !kv.starts_with("cursor=") && !kv.is_empty())
        .collect::<Vec<_>>()
        .join("&");
    let next = (rows.len() == filter.limit)
        .then(|| rows.last().map(|r| r.instance.clone()))
        .flatten();
    let refresh = query.split('&').any(|kv| kv == "refresh=1");
    let body = html! {
        h1 { "Instances" }
        (filters(&state, &params))
        form method="post" action="/instances/bulk" id="bulk" {
            (hidden_filters(&params))
            p {
                button name="action" value="retry-selected" { "Retry selected" } " "
                button name="action" value="cancel-selected" { "Cancel selected" } " · "
                button name="action" value="retry-all" { "Retry all that match" } " "
                button name="action" value="cancel-all" { "Cancel all that match" }
                " "
                input name="reason" placeholder="reason for a cancel (optional)" size="28" aria-label="why they are cancelled";
            }
            table id="instances" {
                thead { tr {
                    th { span class="muted" { "select" } }
                    th { "instance" } th { "machine" } th { "status" } th { "state" } th { "steps" }
                    th { "created" } th { "duration" } th { "parent" } th { "error" }
                } }
                tbody id="rows" { (table_rows(&state, &rows, now)) }
            }
        }
        @if rows.is_empty() { p id="none" { "No instance matches." } }
        p {
            @if let Some(n) = &next {
                a id="next" href={ "/instances?" (without_cursor) (if without_cursor.is_empty() { "" } else { "&" }) "cursor=" (seg(n)) } { "Next page" }
                " · "
            }
            @if refresh {
                a href={ "/instances?" (query.replace("&refresh=1", "").replace("refresh=1&", "").replace("refresh=1", "")) } { "Stop refreshing" }
            } @else {
                a href={ "/instances?" (query) (if query.is_empty() { "" } else { "&" }) "refresh=1" } { "Refresh every 5 s" }
            }
        }
        @if refresh {
            // Only the rows are replaced, and only while nothing is selected: the scroll
            // position, the filters (in the URL) and a selection stay.
            (super::layout::refresh("rows", 5000, "href", Some("#rows input:checked")))
        }
    };
    page("Instances", body).into_response()
}

/// The filter form (GET: the filters go to the URL).
fn filters(state: &ServerState, p: &ListParams) -> Markup {
    let val = |v: &Option<String>| v.clone().unwrap_or_default();
    let machine = p.machine.as_deref().unwrap_or("");
    let states: Vec<&str> = state
        .config
        .machines
        .iter()
        .filter(|m| machine.is_empty() || m.name == machine)
        .flat_map(|m| m.states.iter().map(|s| s.name.as_str()))
        .collect();
    html! {
        form method="get" action="/instances" id="filters" {
            label { "Name starts with " input name="prefix" value=(val(&p.prefix)) size="16"; } " "
            label { "Machine " select name="machine" {
                option value="" { "any" }
                @for m in &state.config.machines {
                    option selected[machine == m.name] { (m.name) }
                }
            } } " "
            label { "Status " select name="status" {
                option value="" { "any" }
                @for s in STATUSES {
                    option selected[p.status.as_deref() == Some(s)] { (s) }
                }
            } } " "
            label { "In state " input name="state" list="states" value=(val(&p.state)) size="12"; }
            datalist id="states" { @for s in &states { option value=(s) {} } }
            " "
            label { "stuck for over " input name="stuck" value=(val(&p.stuck)) size="5" placeholder="1h"; }
            br;
            label { "Created from " input name="created_after" value=(val(&p.created_after)) placeholder="2026-11-30T00:00" size="16"; }
            label { " to " input name="created_before" value=(val(&p.created_before)) size="16"; } " "
            label { "Ended from " input name="ended_after" value=(val(&p.ended_after)) size="16"; }
            label { " to " input name="ended_before" value=(val(&p.ended_before)) size="16"; } " "
            label { "Order " select name="order" {
                @let chosen = p.order.as_deref().unwrap_or("created");
                option value="created" selected[chosen == "created"] { "newest first" }
                option value="oldest" selected[chosen == "oldest"] { "oldest first" }
                option value="ended" selected[chosen == "ended"] { "ended last first" }
                option value="duration" selected[chosen == "duration"] { "longest first (of the 10,000 ended last)" }
            } } " "
            button { "Filter" } " "
            a href="/instances" { "Clear" }
        }
    }
}

/// The filters again, hidden in the bulk form (so "all that match" means this list).
fn hidden_filters(p: &ListParams) -> Markup {
    html! {
        @for (name, value) in p.given_filters() {
            input type="hidden" name=(name) value=(value);
        }
    }
}

fn table_rows(state: &ServerState, rows: &[InstanceSummary], now: i64) -> Markup {
    html! {
        @for r in rows {
            @let machine = state.config.machine(&r.machine);
            @let in_state = r.pending.as_ref().map(|p| control::pending_state(machine, p));
            @let took = r.ended_at.unwrap_or(now) - r.created_at;
            tr {
                td { input type="checkbox" name="name" value=(r.instance) aria-label={ "select " (r.instance) }; }
                td { (instance_link(&r.instance)) }
                td { a href={ "/machines/" (seg(&r.machine)) } { (r.machine) } }
                td { (status(r.status)) }
                td { (in_state.unwrap_or_default()) }
                td { (r.steps) }
                td { (time(r.created_at)) }
                td { (human_duration(took)) @if r.ended_at.is_none() { " so far" } }
                td { @if let Some(p) = &r.parent { (instance_link(p)) } }
                td class="err" { (r.error.as_deref().unwrap_or("")) }
            }
        }
    }
}

/// `POST /instances/bulk`: retry or cancel the selected instances, or every instance the
/// filters match (at most [`MAX_BULK`]), after a confirmation page that says how many.
pub(crate) async fn bulk(
    State(state): State<Arc<ServerState>>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let get = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let action = get("action").unwrap_or_default();
    let (retry, all) = match action.as_str() {
        "retry-selected" => (true, false),
        "cancel-selected" => (false, false),
        "retry-all" => (true, true),
        "cancel-all" => (false, true),
        other => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Bulk action",
                &format!("unknown action `{other}`"),
            )
        }
    };
    let verb = if retry { "Retry" } else { "Cancel" };
    let params = ListParams::from_filters(get);
    let names: Vec<String> = if all {
        let filter = match params.to_filter(&state.config, state.clock.now()) {
            Ok(f) => f,
            Err(e) => return problem(StatusCode::BAD_REQUEST, "Bulk action", &e),
        };
        match matching(&state, filter).await {
            Ok(n) => n,
            Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, "Bulk action", &e),
        }
    } else {
        fields
            .iter()
            .filter(|(k, _)| k == "name")
            .map(|(_, v)| v.clone())
            .collect()
    };
    if names.is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            "Nothing to do",
            if all {
                "No instance matches the filters."
            } else {
                "Select instances first (the boxes in the first column)."
            },
        );
    }
    if get("confirm").as_deref() != Some("yes") {
        let body = html! {
            h1 { (verb) " " (names.len()) " instances?" }
            @if all && names.len() == MAX_BULK { p class="err" { "Only the first " (MAX_BULK) " that match are included; run it again for the rest." } }
            form method="post" action="/instances/bulk" id="confirm" {
                @for (k, v) in &fields {
                    @if k != "confirm" { input type="hidden" name=(k) value=(v); }
                }
                input type="hidden" name="confirm" value="yes";
                button id="confirm-button" { (verb) " " (names.len()) " instances" } " "
                a href="/instances" { "Back" }
            }
            ul { @for n in names.iter().take(20) { li { (n) } } @if names.len() > 20 { li { "… and " (names.len() - 20) " more" } } }
        };
        return page("Confirm", body).into_response();
    }
    let reason = match control::cancel_reason(get("reason").as_deref()) {
        Ok(r) => r,
        Err(e) => return problem(StatusCode::BAD_REQUEST, "Bulk action", &e),
    };
    let now = state.clock.now();
    let (mut done, mut refused, mut failed) = (0usize, Vec::new(), Vec::new());
    for name in &names {
        let result = if retry {
            state.store.retry(now, name).await
        } else {
            state
                .store
                .cancel_because(now, name, reason.as_deref())
                .await
        };
        match result {
            Ok(Control::Done) => done += 1,
            Ok(Control::NotAllowed(s)) => refused.push(format!("{name} ({})", s.as_str())),
            Ok(Control::NotFound) => refused.push(format!("{name} (not found)")),
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    let past = if retry { "retried" } else { "cancelled" };
    let body = html! {
        h1 id="bulk-result" { (done) " of " (names.len()) " instances " (past) }
        @if !refused.is_empty() {
            p { (refused.len()) " could not be " (past) " in their status: " (refused.join(", ")) }
        }
        @if !failed.is_empty() {
            p class="err" { (failed.len()) " failed: " (failed.join("; ")) }
        }
        p { a href="/instances" { "Back to the instances" } }
    };
    let code = if failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, page("Done", body)).into_response()
}

/// The names of every instance `filter` matches, at most [`MAX_BULK`], a page at a time.
async fn matching(state: &ServerState, mut filter: ListFilter) -> Result<Vec<String>, String> {
    filter.limit = control::MAX_PAGE;
    filter.before = None;
    let mut names = Vec::new();
    loop {
        let page = state.store.list(&filter).await.map_err(|e| e.to_string())?;
        let full = page.len() == filter.limit;
        filter.before = page.last().map(|r| r.instance.clone());
        names.extend(page.into_iter().map(|r| r.instance));
        if !full || names.len() >= MAX_BULK {
            names.truncate(MAX_BULK);
            return Ok(names);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InstanceStatus;

    #[test]
    fn the_status_filter_offers_every_status() {
        assert!(STATUSES.iter().all(|s| InstanceStatus::parse(s).is_some()));
        assert_eq!(human_duration(1_500_000), "1.5 s");
        assert_eq!(human_duration(3_725_000_000), "1 h 2 min");
    }
}

//! An instance's history: the pages of every step (`/instances/{name}/history`, of one
//! branch with `?branch=`), one step in full (`/instances/{name}/steps/{id}`: the context it
//! was given and what it passed on, its attempts and their log lines), and running the
//! instance again from a step (`POST /instances/{name}/reset`, behind a confirmation).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{instance_link, log_lines, millis, page, problem, seg, time};
use crate::server::state::ServerState;
use crate::store::{HistoryRow, PassedOn};

/// Steps a history page shows at once.
const PAGE_ROWS: usize = 100;

/// A step's duration, for people.
fn took(h: &HistoryRow) -> String {
    millis(h.finished_at - h.started_at)
}

/// What a branch is called on the pages (the main line's name is empty).
fn branch_name(branch: &str) -> &str {
    if branch.is_empty() {
        "main"
    } else {
        branch
    }
}

/// Committed steps as a table: each links to the step in full, and its branch to the
/// history of that branch.
pub(super) fn history_table(instance: &str, id: Option<&str>, rows: &[HistoryRow]) -> Markup {
    let q = seg(instance);
    html! {
        table id=[id] {
            tr {
                th { "step" } th { "from" } th { "event" } th { "to" } th { "attempts" } th { "at" } th { "took" } th { "branch" }
            }
            @for h in rows {
                tr {
                    td { a href={ "/instances/" (q) "/steps/" (h.id) } { "#" (h.id) } }
                    td { (h.from.as_deref().unwrap_or("—")) }
                    td { (h.event) }
                    td { (h.to) }
                    td class=[(h.attempt > 0).then_some("warn")] { (h.attempt + 1) }
                    td { (time(h.finished_at)) }
                    td { (took(h)) }
                    td { a href={ "/instances/" (q) "/history?branch=" (seg(&h.branch)) } { (branch_name(&h.branch)) } }
                }
            }
        }
    }
}

/// Query of the history pages.
#[derive(Deserialize)]
pub(crate) struct HistoryQuery {
    cursor: Option<i64>,
    /// Only this branch's steps (`""`: the main line).
    branch: Option<String>,
}

/// `GET /instances/{name}/history`: every committed step, oldest first, a page of
/// [`PAGE_ROWS`] at a time, of one branch with `?branch=`.
pub(crate) async fn history(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Response {
    let after = query.cursor.unwrap_or(0).max(0);
    let branch = query.branch.as_deref();
    let request = crate::store::PageRequest {
        after,
        limit: PAGE_ROWS,
    };
    let steps = match state.store.history_page(&name, request, branch).await {
        Ok(Some(p)) => p,
        Ok(None) => return no_instance(&name),
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, "Error", &e.to_string()),
    };
    let q = seg(&name);
    let branch_query = branch.map_or(String::new(), |b| format!("&branch={}", seg(b)));
    let body = html! {
        h1 { "History of " (instance_link(&name)) }
        form method="get" action={ "/instances/" (q) "/history" } {
            label { "Branch " input name="branch" value=[branch] placeholder="all branches" size="24" aria-label="branch"; }
            " " button { "Show" }
            " " a href={ "/instances/" (q) "/history" } { "all branches" }
            " · " a href={ "/instances/" (q) "/history?branch=" } { "main line only" }
        }
        @if let Some(b) = branch { p { "Steps of branch " strong { (branch_name(b)) } "." } }
        (history_table(&name, Some("history"), &steps.items))
        @if steps.items.is_empty() { p class="muted" { "No steps." } }
        p {
            a href={ "/instances/" (q) "/history?" (branch_query.trim_start_matches('&')) } { "First page" }
            @if let Some(next) = steps.next { " · " a id="history-next" href={ "/instances/" (q) "/history?cursor=" (next) (branch_query) } { "Next " (PAGE_ROWS) } }
        }
    };
    page(&format!("History of {name}"), body).into_response()
}

fn no_instance(name: &str) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("No instance named `{name}`."),
    )
}

/// A context as indented JSON.
fn context_block(id: &str, context: &crate::engine::Context) -> Markup {
    html! { pre id=(id) { (serde_json::to_string_pretty(context).unwrap_or_default()) } }
}

/// `GET /instances/{name}/steps/{id}`: one step in full.
pub(crate) async fn step(
    State(state): State<Arc<ServerState>>,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    let Some(id) = step_id(&id) else {
        return not_a_step(&id);
    };
    let detail = match state.store.step(&name, id).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                "Not found",
                &format!("No step {id} in the history of an instance named `{name}`."),
            )
        }
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, "Error", &e.to_string()),
    };
    let h = &detail.row;
    let q = seg(&name);
    let body = html! {
        h1 { "Step #" (h.id) " of " (instance_link(&name)) }
        div class="cards" {
            div class="card" { span class="num" { (h.from.as_deref().unwrap_or("start")) " → " (h.to) } "on " code { (h.event) } }
            div class="card" { span class="num" { (h.attempt + 1) } "attempts" @if h.attempt > 0 { span class="warn" { " (" (h.attempt) " failed before)" } } }
            div class="card" { span class="num" { (took(h)) } "the committing attempt" }
            div class="card" { span class="num" { (branch_name(&h.branch)) } "branch" @if let Some(n) = h.step { ", step " (n) } }
        }
        p { "started " (time(h.started_at)) " · committed " (time(h.finished_at)) " · task " code { (h.task) }
            @if h.ends_branch { " · ended its branch" } }
        div class="cols" {
            section {
                h2 { "Context given" }
                @match &detail.given {
                    Some(c) => (context_block("given", c)),
                    None => p class="muted" { "Not kept: a fan-in's join is given the parked branches, and steps recorded before history kept contexts have none." },
                }
            }
            section {
                h2 { "Context passed on" }
                @match &detail.passed_on {
                    PassedOn::Step(next, context) => {
                        p { "to " a href={ "/instances/" (q) "/steps/" (next) } { "step #" (next) } ", the next on this branch:" }
                        @if let Some(c) = context { (context_block("passed-on", c)) }
                    }
                    PassedOn::Pending(c) => {
                        p { "to the branch's next step, pending:" }
                        (context_block("passed-on", c))
                    }
                    PassedOn::Nothing => p class="muted" { "Nothing followed on this branch: it ended, parked at a fan-in, or the instance stopped. The instance page shows its final context." },
                }
            }
        }
        h2 { "Log of this step's task" }
        @if detail.logs.is_empty() { p class="muted" { "No lines: its attempts logged nothing and none failed." } }
        @else {
            pre id="step-log" { (log_lines(&detail.logs)) }
        }
        h2 { "Run again from this step" }
        @if !crate::control::is_whole_line(&h.branch) {
            p class="muted" { "This step ran on a forked branch: a reset runs the instance again from a step of the line the whole instance runs on (the step that forked this branch, one before it, or one after the branches were joined)." }
        } @else if detail.given.is_none() {
            p class="muted" { "This step's input was not kept, so it cannot run again." }
        } @else {
            form method="post" action={ "/instances/" (q) "/reset" } id="reset" {
                input type="hidden" name="step" value=(h.id);
                p {
                    "The instance's pending work (every branch, and branches parked at fan-ins) is dropped, "
                    "and this step runs again with the context it was given. Instances it spawned and events kept for it stay. "
                    "Refused if other branches were in flight when this step ran (they would be lost)."
                }
                label { input type="checkbox" name="confirm" value="yes" required; " I understand: drop the pending work and run from here" }
                " " button id="reset-button" { "Run again from step #" (h.id) }
            }
        }
    };
    page(&format!("Step {id} of {name}"), body).into_response()
}

/// A step's id as a page or form gives it.
fn step_id(text: &str) -> Option<i64> {
    text.trim().parse().ok()
}

fn not_a_step(text: &str) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "Not a step",
        &format!("`{text}` is not a step's id: the history lists each step with its id."),
    )
}

/// The reset form's fields.
#[derive(Deserialize)]
pub(crate) struct ResetForm {
    #[serde(default)]
    step: String,
    #[serde(default)]
    confirm: String,
}

/// `POST /instances/{name}/reset` (the step page's form): run the instance again from that
/// step, then back to the instance page; a refusal is explained.
pub(crate) async fn reset(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    axum::extract::Form(form): axum::extract::Form<ResetForm>,
) -> Response {
    let Some(step) = step_id(&form.step) else {
        return not_a_step(&form.step);
    };
    if form.confirm != "yes" {
        return problem(
            StatusCode::BAD_REQUEST,
            "Not reset",
            "Tick the confirmation: a reset drops the instance's pending work.",
        );
    }
    match crate::control::reset(&*state.store, &state.config, &*state.clock, &name, step).await {
        Ok(_) => Redirect::to(&format!("/instances/{}", seg(&name))).into_response(),
        Err(e) => problem(
            crate::server::steps::reset_status(&e),
            "Not reset",
            &e.to_string(),
        ),
    }
}

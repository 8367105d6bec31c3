//! `GET /instances/{name}`: one instance — its graph with the states its branches are in,
//! branch counts, history, waits, pending steps and their errors, contexts, log, parent and
//! children, and buttons to cancel or retry. The live part refreshes itself every two
//! seconds while the instance runs (the only script of the console).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::history::history_table;
use super::layout::{
    human_duration, instance_link, legend, log_lines, page, problem, seg, status, time,
};
use crate::server::state::ServerState;
use crate::store::{Control, InstanceStatus, InstanceView, WorkerView};

/// Lines of log an instance page shows at once.
const PAGE_ROWS: usize = 100;

/// The part of an instance page that refreshes itself.
fn live_part(
    view: &InstanceView,
    workers: &[WorkerView],
    machine: Option<&crate::machine::Machine>,
    now: crate::clock::Micros,
) -> Markup {
    let b = &view.branches;
    // The latest transitions only (the store reads no more): a page stays small whatever the
    // instance did.
    let skipped = view.history_total.saturating_sub(view.history.len() as u64);
    let pending: Vec<_> = view.tasks.iter().filter(|t| !view.is_wait(t)).collect();
    let more_pending = view.tasks_total.saturating_sub(view.tasks.len() as u64);
    html! {
        div class="cards" {
            div class="card" { "status " strong id="status" { (status(view.status)) } }
            div class="card" {
                (b.live) " live · "
                @if b.waiting > 0 { (b.waiting) " waiting for events · " }
                (b.parked) " parked at fan-ins · " (b.ended) " ended · " (b.failed) " failed"
                @if b.held > 0 { " · " (b.held) " held (stopped by the failure; Retry resumes them)" }
            }
        }
        @if let Some(error) = &view.error { p class="err" { (error) } }
        @let svg = format!("/instances/{}/graph.svg?t={}", seg(&view.name), view.history_total + view.tasks_total);
        // A wide machine is scaled to the page; the link opens it at full size.
        p { a href=(svg) title="open the drawing at full size" { img class="graph" alt={ "graph of " (view.machine) " with where this instance's branches are" } src=(svg); } }
        @if let Some(m) = machine { (legend(m, true)) }
        h2 { "Timeline" }
        (super::timeline::timeline(view, now))
        h2 { "History" }
        @if skipped > 0 {
            p { (skipped) " earlier transitions are not shown: " a id="all-history" href={ "/instances/" (seg(&view.name)) "/history" } { "all of them" } ", a page at a time (or " a href={ "/api/instances/" (seg(&view.name)) "/history" } { "as JSON" } ")." }
        }
        (history_table(&view.name, None, &view.history))
        @if !view.waiting.is_empty() {
            h2 { "Waiting for events" }
            table {
                tr { th { "state" } th { "branch" } th { "accepts" } th { "since" } th { "timeout" } }
                @for w in &view.waiting {
                    tr {
                        td { (w.state) } td { (w.branch) } td { (w.events.join(", ")) } td { (time(w.since)) }
                        td { @match (w.deadline, &w.timeout_event) {
                            (Some(at), Some(event)) => { (event) " at " (time(at)) }
                            _ => { "none" }
                        } }
                    }
                }
            }
        }
        @if !view.buffered.is_empty() {
            h2 { "Events kept for a later wait" }
            table {
                tr { th { "event" } th { "id" } th { "data" } th { "at" } }
                @for e in &view.buffered {
                    tr { td { (e.event) } td { (e.id.as_deref().unwrap_or("")) } td { (e.bytes) " bytes" } td { (time(e.at)) } }
                }
            }
        }
        @if !pending.is_empty() {
            h2 { "Pending" }
            table {
                tr { th { "from" } th { "event" } th { "status" } th { "attempts" } th { "due" } th { "last error" } }
                @for t in pending {
                    @let why = [
                        t.last_error.clone(),
                        crate::control::unserved(&view.machine, t, workers).map(|w| format!("waiting: {w}")),
                    ].into_iter().flatten().collect::<Vec<_>>().join(" · ");
                    tr {
                        td { (t.from.as_deref().unwrap_or("start")) }
                        td { (t.event) }
                        @match &t.leased_by {
                            // A held task's due time is its lease's end.
                            Some(worker) => {
                                td { "running on " (worker) }
                                td { (t.attempts) }
                                td { "lease until " (time(t.due_at)) }
                            }
                            None => {
                                td { (t.status) }
                                td { (t.attempts) }
                                td { (time(t.due_at)) }
                            }
                        }
                        td class="err" { (why) }
                    }
                }
            }
            @if more_pending > 0 { p { "… and " (more_pending) " more pending steps." } }
        }
        div class="cols" {
            section {
                h2 { "Input context" }
                pre id="input" { (serde_json::to_string_pretty(&view.context).unwrap_or_default()) }
            }
            @if let Some(context) = &view.current_context {
                section {
                    h2 { "Context" }
                    pre id="context" { (serde_json::to_string_pretty(context).unwrap_or_default()) }
                }
            }
        }
    }
}

/// A form that sends an event to the instance's waiting branches.
fn send_form(view: &InstanceView) -> Markup {
    let mut events: Vec<&str> = view
        .waiting
        .iter()
        .flat_map(|w| w.events.iter().map(String::as_str))
        .collect();
    events.sort_unstable();
    events.dedup();
    html! {
        form method="post" action={ "/instances/" (seg(&view.name)) "/events" } id="send" {
            strong { "Send an event " }
            label { "event " select name="event" { @for e in &events { option { (e) } } } }
            " "
            label { "data " input name="data" value="{}" size="30"; }
            " "
            label { "id (optional) " input name="id" size="12"; }
            " "
            button { "Send" }
        }
    }
}

/// The send form's fields.
#[derive(Deserialize)]
pub(crate) struct SendForm {
    event: String,
    #[serde(default)]
    data: String,
    #[serde(default)]
    id: String,
}

/// `POST /instances/{name}/events` (the page's send form): deliver, then back to the page;
/// a refused event is explained.
pub(crate) async fn send_event(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    axum::extract::Form(form): axum::extract::Form<SendForm>,
) -> Response {
    let data = match form.data.trim() {
        "" => crate::engine::Context::new(),
        text => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Event not sent",
                    "The data must be a JSON object (its keys are merged into the context).",
                )
            }
        },
    };
    let request = crate::control::SendRequest {
        to: crate::control::SendTo::Instance(name.clone()),
        event: form.event,
        data,
        id: Some(form.id.trim().to_string()).filter(|i| !i.is_empty()),
    };
    match crate::control::send(
        &*state.store,
        Some(&state.config),
        &*state.clock,
        request,
        &state.limits,
    )
    .await
    {
        Ok(_) => Redirect::to(&format!("/instances/{}", seg(&name))).into_response(),
        Err(e @ crate::control::SendError::Store(_)) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Event not sent",
            &e.to_string(),
        ),
        Err(e @ crate::control::SendError::NotFound(_)) => {
            problem(StatusCode::NOT_FOUND, "Event not sent", &e.to_string())
        }
        Err(e) if e.is_conflict() => {
            problem(StatusCode::CONFLICT, "Event not sent", &e.to_string())
        }
        Err(e) => problem(StatusCode::BAD_REQUEST, "Event not sent", &e.to_string()),
    }
}

/// Query of an instance page: where its log page starts.
#[derive(Deserialize)]
pub(crate) struct InstanceQuery {
    log_cursor: Option<i64>,
}

/// `GET /instances/{name}`; with `X-Partial: 1`, only the part that refreshes itself.
pub(crate) async fn instance(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Query(query): Query<InstanceQuery>,
    headers: HeaderMap,
) -> Response {
    let view = match state.store.instance(&name).await {
        Ok(Some(view)) => view,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                "Not found",
                &format!("No instance named `{name}`."),
            )
        }
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, "Error", &e.to_string()),
    };
    // Without the list of workers, no step is said to be unserved.
    let now = state.clock.now();
    let workers = state.store.workers(now).await.unwrap_or_default();
    if headers.get("x-partial").is_some() {
        return Html(
            live_part(&view, &workers, state.config.machine(&view.machine), now).into_string(),
        )
        .into_response();
    }
    let log_page = state
        .store
        .logs_page(
            &name,
            crate::store::PageRequest {
                after: query.log_cursor.unwrap_or(0).max(0),
                limit: PAGE_ROWS,
            },
        )
        .await
        .ok()
        .flatten();
    let (logs, next_log) = log_page.map_or((Vec::new(), None), |p| (p.items, p.next));
    // The states its branches are in now (of its first pending steps), as the list shows.
    let machine = state.config.machine(&view.machine);
    let mut here: Vec<String> = view
        .tasks
        .iter()
        .map(|t| {
            let step = crate::store::PendingStep {
                from: t.from.clone(),
                event: t.event.clone(),
                waiting: view.is_wait(t),
                queued_at: t.due_at,
            };
            crate::control::pending_state(machine, &step)
        })
        .filter(|s| !s.is_empty())
        .collect();
    here.sort();
    here.dedup();
    let q = seg(&view.name);
    let body = html! {
        h1 { (view.name) }
        p id="header" {
            "machine " a href={ "/machines/" (seg(&view.machine)) } { (view.machine) }
            @if let Some(v) = view.version {
                " " a href={ "/machines/" (seg(&view.machine)) "/versions/" (v) } id="version" { "v" (v) }
            }
            " · created " (time(view.created_at))
            @match view.ended_at {
                Some(ended) => { " · ended " (time(ended)) " after " (human_duration(ended - view.created_at)) }
                None => { " · running for " (human_duration(now - view.created_at)) }
            }
            " · " (view.history_total) " steps"
            @if !here.is_empty() { " · now in " strong { (here.join(", ")) } }
            @if let Some(parent) = &view.parent { " · parent " (instance_link(parent)) }
        }
        p {
            @if matches!(view.status, InstanceStatus::Running | InstanceStatus::Failed) {
                form class="inline" method="post" action={ "/instances/" (q) "/cancel" } {
                    input name="reason" placeholder="reason (optional)" size="24" aria-label="why it is cancelled";
                    " "
                    button id="cancel" { "Cancel" }
                }
                " "
            }
            @if view.status == InstanceStatus::Failed {
                form class="inline" method="post" action={ "/instances/" (q) "/retry" } { button id="retry" { "Retry" } }
                " "
            }
            @if state.config.machine(&view.machine).is_some() {
                form class="inline" method="post" action={ "/machines/" (seg(&view.machine)) "/start" } {
                    input type="hidden" name="context" value=(serde_json::to_string(&view.context).unwrap_or_default());
                    button id="again" { "New instance with the same input" }
                }
                " "
            }
            a href={ "/api/instances/" (q) } download={ (view.name) ".json" } { "Download as JSON" }
        }
        @if !view.waiting.is_empty() {
            (send_form(&view))
        }
        div id="live" { (live_part(&view, &workers, state.config.machine(&view.machine), now)) }
        @if !view.children.is_empty() {
            h2 { "Children" }
            ul { @for c in &view.children { li { (instance_link(c)) } } }
        }
        h2 { "Log" }
        pre id="log" { (log_lines(&logs)) }
        @if let Some(next) = next_log {
            p { a id="log-next" href={ "/instances/" (q) "?log_cursor=" (next) } { "next " (PAGE_ROWS) " log lines" } }
        }
        @if view.status == InstanceStatus::Running {
            (super::layout::refresh("live", 2000, "path", None))
        }
    };
    page(&view.name, body).into_response()
}

/// `GET /instances/{name}/graph.svg`: the machine with the branches' states highlighted.
pub(crate) async fn instance_graph(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
) -> Response {
    let Ok(Some(view)) = state.store.instance(&name).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(machine) = state.config.machine(&view.machine) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let here = view.tasks.iter().filter_map(|t| t.from.as_deref());
    let initial: Vec<&str> = if view.tasks.iter().any(|t| t.from.is_none()) {
        machine
            .initial_state()
            .map(|s| vec![s.name.as_str()])
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let highlight: Vec<&str> = here.chain(initial).collect();
    // The path taken: every state entered is marked, and where branches ended.
    let mut notes: Vec<(&str, String)> = Vec::new();
    for h in &view.history {
        if !highlight.contains(&h.to.as_str()) && !notes.iter().any(|(s, _)| *s == h.to) {
            notes.push((h.to.as_str(), "✓ passed".to_string()));
        }
    }
    for end in &view.end_states {
        notes.retain(|(s, _)| s != end);
        notes.push((end.as_str(), "■ ended here".to_string()));
    }
    (
        [(header::CONTENT_TYPE, "image/svg+xml")],
        crate::graph::to_svg_annotated(machine, &highlight, &notes),
    )
        .into_response()
}

async fn act(state: &ServerState, name: &str, cancel: Option<Option<String>>) -> Response {
    let now = state.clock.now();
    let result = match cancel {
        Some(reason) => {
            state
                .store
                .cancel_because(now, name, reason.as_deref())
                .await
        }
        None => state.store.retry(now, name).await,
    };
    match result {
        Ok(Control::Done) => Redirect::to(&format!("/instances/{}", seg(name))).into_response(),
        Ok(Control::NotFound) => problem(StatusCode::NOT_FOUND, "Not found", "No such instance."),
        Ok(Control::NotAllowed(status)) => {
            let body = html! {
                h1 { "Not allowed" }
                p { "The instance is " (status.as_str()) "." }
                p { a href={ "/instances/" (seg(name)) } { "Back" } }
            };
            (StatusCode::CONFLICT, page("Not allowed", body)).into_response()
        }
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, "Error", &e.to_string()),
    }
}

/// The cancel form's field.
#[derive(Deserialize, Default)]
pub(crate) struct CancelForm {
    #[serde(default)]
    reason: String,
}

/// `POST /instances/{name}/cancel` (the page's button, with an optional reason).
pub(crate) async fn cancel(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    axum::extract::Form(form): axum::extract::Form<CancelForm>,
) -> Response {
    match crate::control::cancel_reason(Some(&form.reason)) {
        Ok(reason) => act(&state, &name, Some(reason)).await,
        Err(e) => problem(StatusCode::BAD_REQUEST, "Not cancelled", &e),
    }
}

/// `POST /instances/{name}/retry` (the page's button).
pub(crate) async fn retry(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
) -> Response {
    act(&state, &name, None).await
}

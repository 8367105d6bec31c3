//! What operators watch: the workers alive now (`GET /workers`) and the work waiting in each
//! queue (`GET /queues`), with the queues' limits.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};

use super::layout::{ago, page, problem, time};
use crate::server::state::ServerState;
use crate::store::{Targets, WorkerView};

/// `GET /workers`: the workers alive now, and those gone without saying so (killed, or cut
/// off from the database) in the last day.
pub(crate) async fn workers(State(state): State<Arc<ServerState>>) -> Response {
    let now = state.clock.now();
    let (workers, gone) = match (
        state.store.workers(now).await,
        state.store.workers_gone(now).await,
    ) {
        (Ok(w), Ok(g)) => (w, g),
        (Err(e), _) | (_, Err(e)) => {
            return problem(StatusCode::SERVICE_UNAVAILABLE, "Workers", &e.to_string())
        }
    };
    let body = html! {
        h1 { "Workers" }
        @if workers.is_empty() {
            p class="err" id="no-workers" { "No worker is running on this database: nothing moves until one starts (`phasm worker FILE`)." }
        } @else {
            p class="muted" { "A worker says it is alive every third of its lease; one that stops saying so is listed as gone once its lease would have run out." }
            (worker_table("workers", &workers, now))
        }
        @if !gone.is_empty() {
            h2 { "Gone without stopping" }
            p class="muted" { "These stopped saying they are alive without saying they stopped (killed, or cut off from the database). Their steps run again elsewhere once their leases expire." }
            (worker_table("gone", &gone, now))
        }
    };
    page("Workers", body).into_response()
}

fn worker_table(id: &str, workers: &[WorkerView], now: i64) -> Markup {
    html! {
        table id=(id) {
            tr {
                th { "worker" } th { "host" } th { "pid" } th { "version" } th { "running" }
                th { "machines" } th { "takes" } th { "queues" } th { "started" } th { "last seen" }
            }
            @for w in workers {
                tr {
                    td { code { (w.owner) } }
                    td { (w.about.host) }
                    td { (w.about.pid) }
                    td { (w.about.version) }
                    td { (w.about.running) " of " (w.about.concurrency) }
                    td {
                        (w.machines.join(", "))
                        @for reason in &w.about.cannot_run {
                            div class="err cannot-run" { "cannot run: " (reason) }
                        }
                    }
                    td { @match &w.targets {
                        Targets::Any => { "every target" }
                        Targets::Untargeted => { "untargeted steps" }
                        Targets::Only(t) => { "target " (t.join(", ")) }
                    } }
                    td { (w.queues.as_ref().map_or("every queue".to_string(), |q| q.join(", "))) }
                    td { (time(w.started_at)) }
                    td { (ago(w.seen_at, now)) }
                }
            }
        }
    }
}

/// `GET /queues`.
pub(crate) async fn queues(State(state): State<Arc<ServerState>>) -> Response {
    let now = state.clock.now();
    let (queues, stats) =
        match crate::control::queue_report(&*state.store, Some(&state.config), now).await {
            Ok(report) => report,
            Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, "Queues", &e.to_string()),
        };
    let body = html! {
        h1 { "Queues" }
        p class="muted" { "Steps of running instances in each queue: due now, scheduled for later (countdowns, retry backoffs, timeouts), and running (held by a worker); and the steps committed per second over the last minute (counted over at most the latest 5,000 steps)." }
        @if queues.is_empty() {
            p { "No step is pending in any queue." }
        } @else {
            table id="queues" {
                tr { th { "queue" } th { "due" } th { "scheduled" } th { "running" } th { "oldest due waited" } th { "steps/s (last minute)" } th { "max_concurrent" } th { "rate limit" } }
                @for q in &queues {
                    tr {
                        td { (q.queue) }
                        td { (q.due) }
                        td { (q.scheduled) }
                        td { (q.running) }
                        td { (format!("{:.1} s", q.oldest_due_age_seconds)) }
                        td { (q.steps_per_second.map_or("—".to_string(), |r| format!("{r:.1}"))) }
                        td { (q.max_concurrent.map_or("—".to_string(), |n| n.to_string())) }
                        td { (q.rate.as_deref().unwrap_or("—")) }
                    }
                }
            }
        }
        p { (stats.parked) " branches parked at fan-in states." }
    };
    page("Queues", body).into_response()
}

//! The machines: `GET /` lists them with their graphs and schedules; `GET /machines/{name}`
//! shows one at a glance (where its instances are, what ended lately, failures grouped by
//! error, schedules, action bindings, its YAML) with a form that starts an instance
//! (`POST /machines/{name}/start`).

use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{ago, instance_link, legend, millis, page, problem, seg, time};
use crate::control::{self, ScheduleStatus, StartError, StartOutcome};
use crate::machine::{ActionBinding, Config, Machine};
use crate::server::state::ServerState;
use crate::store::{InstanceStatus, MachineOverview};

const HOUR: i64 = 3600 * 1_000_000;

/// The schedules of a configuration with their last ticks; read failures are said on the
/// page, and the schedules still listed.
async fn schedules(state: &ServerState) -> (Vec<ScheduleStatus>, Option<String>) {
    let now = state.clock.now();
    match control::schedule_statuses(&*state.store, &state.config, now).await {
        Ok(s) => (s, None),
        Err(e) => (
            control::statuses(&state.config, &[], now),
            Some(format!("The schedules' last ticks cannot be read: {e}")),
        ),
    }
}

fn schedule_table(schedules: &[&ScheduleStatus]) -> Markup {
    html! {
        table class="schedules" {
            caption { "Schedules" }
            tr { th { "schedule" } th { "when" } th { "last tick" } th { "last instance" } th { "next tick" } }
            @for s in schedules {
                tr {
                    td { (s.name) }
                    td { (s.timing) ", overlap " (s.overlap) }
                    td { (s.last_tick.map_or("never".to_string(), time)) }
                    td {
                        @match &s.last_instance {
                            Some(i) => { (instance_link(i)) " " (s.last_status.map_or("scrubbed", InstanceStatus::as_str)) }
                            None => { "—" }
                        }
                    }
                    td {
                        (s.next_tick.map_or("never".to_string(), time))
                        @if s.overdue { " " span class="err" { "(a tick passed unfired: no worker ran)" } }
                    }
                }
            }
        }
    }
}

/// `GET /`: the machines and their graphs.
pub(crate) async fn machines(State(state): State<Arc<ServerState>>) -> Html<String> {
    let (schedules, problem) = schedules(&state).await;
    let body = html! {
        h1 { "Machines" }
        @if let Some(p) = &problem { p class="err" { (p) } }
        @for m in &state.config.machines {
            @let mine: Vec<&ScheduleStatus> = schedules.iter().filter(|s| s.machine == m.name).collect();
            section class="card" {
                h2 { a href={ "/machines/" (seg(&m.name)) } { (m.name) } }
                p { (m.states.len()) " states · " a href={ "/instances?machine=" (seg(&m.name)) } { "instances" } }
                @if !mine.is_empty() { (schedule_table(&mine)) }
                img class="graph" alt={ "graph of " (m.name) } src={ "/api/machines/" (seg(&m.name)) "/graph.svg" };
                (legend(m, false))
            }
        }
    };
    page("Machines", body)
}

/// `GET /machines/{name}`.
pub(crate) async fn machine(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Query(view): Query<GraphView>,
) -> Response {
    let Some(m) = state.config.machine(&name) else {
        return no_such_machine(&name);
    };
    machine_page(&state, m, None, view.actions.is_some()).await
}

/// The page that says a machine does not exist (404).
fn no_such_machine(name: &str) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("No machine named `{name}` in this configuration."),
    )
}

/// A machine's page, with the start form (holding what was sent and why it failed, when a
/// start failed).
async fn machine_page(
    state: &ServerState,
    m: &Machine,
    failed_start: Option<(&str, String)>,
    show_actions: bool,
) -> Response {
    let now = state.clock.now();
    let overview = match state
        .store
        .machine_overview(&m.name, now - HOUR, now - 24 * HOUR)
        .await
    {
        Ok(o) => o,
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, &m.name, &e.to_string()),
    };
    let (schedules, schedule_problem) = schedules(state).await;
    let mine: Vec<&ScheduleStatus> = schedules.iter().filter(|s| s.machine == m.name).collect();
    let q = seg(&m.name);
    let code = if failed_start.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let body = html! {
        h1 { (m.name) }
        p {
            (m.states.len()) " states · "
            a href={ "/instances?machine=" (q) } { "all instances" } " · "
            a href={ "/instances?machine=" (q) "&status=running" } { "running" } " · "
            a href={ "/instances?machine=" (q) "&status=failed" } { "failed" }
        }
        (counts(&overview))
        div class="cols" {
            section {
                h2 { "Where its instances are" }
                (states(m, &overview, now))
            }
            section {
                h2 { "Start an instance" }
                (start_form(m, failed_start))
            }
        }
        @let svg = format!("/machines/{q}/graph.svg{}", if show_actions { "?actions=1" } else { "" });
        // A wide machine is scaled to the page; the link opens it at full size.
        p { a href=(svg) title="open the drawing at full size" { img class="graph" id="graph" alt={ "graph of " (m.name) " with its instances' branches in each state" } src=(svg); } }
        p {
            @if show_actions {
                a href={ "/machines/" (q) } { "Hide the states' actions" }
            } @else {
                a href={ "/machines/" (q) "?actions=1" } id="show-actions" { "Show each state's actions in the drawing" }
            }
        }
        (legend(m, true))
        h2 { "Failures" }
        @if overview.failures.is_empty() {
            p class="muted" { "No failed instance." }
        } @else {
            table {
                tr { th { "error" } th { "instances" } th { "latest" } }
                @for f in &overview.failures {
                    tr {
                        td class="err" { (f.error) }
                        td { (f.instances) }
                        td { (instance_link(&f.latest)) " " span class="muted" { (ago(f.latest_at, now)) } }
                    }
                }
            }
        }
        @if let Some(p) = &schedule_problem { p class="err" { (p) } }
        @if !mine.is_empty() { (schedule_table(&mine)) }
        (super::versions::section(state, &m.name).await)
        h2 { "Actions" }
        (bindings(&state.config, m))
        h2 { "Definition" }
        pre id="yaml" { (machine_yaml(m)) }
    };
    (code, page(&m.name, body)).into_response()
}

/// How a machine's drawing is asked for: `?actions=1` shows each state's actions.
#[derive(Deserialize, Default)]
pub(crate) struct GraphView {
    actions: Option<String>,
}

/// `GET /machines/{name}/graph.svg`: the machine with, in each state, how many branches of
/// running and failed instances are there (those states highlighted).
pub(crate) async fn machine_graph(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Query(view): Query<GraphView>,
) -> Response {
    let Some(m) = state.config.machine(&name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let now = state.clock.now();
    let tallies = match state.store.machine_overview(&m.name, now, now).await {
        Ok(o) => control::where_instances_are(m, &o.states),
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, &m.name, &e.to_string()),
    };
    let mut notes: Vec<(&str, String)> = if view.actions.is_some() {
        crate::graph::action_notes(m)
    } else {
        Vec::new()
    };
    notes.extend(tallies.iter().map(|t| {
        let note = match (t.running, t.failed) {
            (r, 0) => format!("● {r} running"),
            (0, f) => format!("✖ {f} failed"),
            (r, f) => format!("● {r} running, ✖ {f} failed"),
        };
        (t.state.as_str(), note)
    }));
    let here: Vec<&str> = tallies.iter().map(|t| t.state.as_str()).collect();
    (
        [(axum::http::header::CONTENT_TYPE, "image/svg+xml")],
        crate::graph::to_svg_annotated(m, &here, &notes),
    )
        .into_response()
}

/// The figures at the top of a machine's page.
fn counts(o: &MachineOverview) -> Markup {
    let ended = |list: &[(InstanceStatus, u64)], s: InstanceStatus| {
        list.iter().find(|(st, _)| *st == s).map_or(0, |(_, n)| *n)
    };
    let card = |label: &str, n: u64, class: &str| {
        html! { div class="card" { span class={ "num " (class) } { (n) } (label) } }
    };
    html! {
        div class="cards" id="counts" {
            (card("running", o.running, "s-running"))
            (card("failed, held", o.failed, "s-failed"))
            (card("completed in the last hour", ended(&o.ended_last_hour, InstanceStatus::Completed), "s-completed"))
            (card("completed in the last day", ended(&o.ended_last_day, InstanceStatus::Completed), "s-completed"))
            (card("failed in the last day", ended(&o.ended_last_day, InstanceStatus::Failed), "s-failed"))
            (card("halted or cancelled in the last day", ended(&o.ended_last_day, InstanceStatus::Halted) + ended(&o.ended_last_day, InstanceStatus::Cancelled), "s-halted"))
        }
        table id="rates" {
            caption {
                "Failure rate and step times "
                span class="muted" { "(steps: those in the window of the 1,000 instances that ended last and the 1,000 newest running, at most 10,000; the time of the committing attempt)" }
            }
            tr { th { "window" } th { "instances ended" } th { "of them failed" } th { "steps" } th { "committed on a retry" } th { "p50 step" } th { "p99 step" } }
            @for (window, list, steps) in [("last hour", &o.ended_last_hour, &o.steps_last_hour), ("last day", &o.ended_last_day, &o.steps_last_day)] {
                @let total: u64 = list.iter().map(|(_, n)| n).sum();
                @let failed = ended(list, InstanceStatus::Failed);
                tr {
                    td { (window) }
                    td { (total) }
                    td class=[(failed > 0).then_some("err")] { (failed) " (" (percent(failed, total)) ")" }
                    td { (steps.steps) @if steps.sampled { " (a sample)" } }
                    td class=[(steps.retried > 0).then_some("warn")] { (steps.retried) " (" (percent(steps.retried, steps.steps)) ")" }
                    td { @if steps.steps > 0 { (millis(steps.p50)) } @else { "—" } }
                    td { @if steps.steps > 0 { (millis(steps.p99)) } @else { "—" } }
                }
            }
        }
    }
}

/// `part` of `whole` as a percentage (`—` of nothing).
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "—".into()
    } else {
        format!("{:.1} %", part as f64 * 100.0 / whole as f64)
    }
}

/// Branches of running and failed instances by the state they are in.
fn states(m: &Machine, o: &MachineOverview, now: i64) -> Markup {
    let tallies = control::where_instances_are(m, &o.states);
    html! {
        @if tallies.is_empty() {
            p class="muted" { "No running or failed instance." }
        } @else {
            table id="states" {
                tr { th { "state" } th { "running" } th { "failed" } th { "oldest since" } }
                @for t in &tallies {
                    tr {
                        td { (t.state) }
                        td { (t.running) }
                        td { @if t.failed > 0 { a href={ "/instances?machine=" (seg(&m.name)) "&status=failed" } { (t.failed) } } @else { "0" } }
                        td { (ago(t.oldest, now)) }
                    }
                }
            }
        }
    }
}

/// The start form: a JSON context and an optional name.
fn start_form(m: &Machine, failed: Option<(&str, String)>) -> Markup {
    let (context, error) = match &failed {
        Some((context, error)) => (*context, Some(error.as_str())),
        None => ("{}", None),
    };
    html! {
        form method="post" action={ "/machines/" (seg(&m.name)) "/start" } id="start" {
            @if let Some(e) = error { p class="err" id="start-error" { (e) } }
            @if !m.context_types.is_empty() {
                p class="muted" {
                    "Typed keys: "
                    (m.context_types.iter().map(|(k, t)| format!("{k} ({})", t.0)).collect::<Vec<_>>().join(", "))
                }
            }
            label { "Context (a JSON object)" br; textarea name="context" rows="6" cols="50" { (context) } }
            br;
            label { "Name (optional) " input name="name" pattern="[A-Za-z0-9._-]{1,200}"; }
            " "
            button { "Start" }
        }
    }
}

/// Each action the machine names and what runs it.
fn bindings(config: &Config, m: &Machine) -> Markup {
    html! {
        table id="bindings" {
            tr { th { "state" } th { "slot" } th { "action" } th { "runs as" } }
            @for r in m.action_refs() {
                @let bound = r.lookup_names().into_iter().find_map(|n| config.actions.get(&n));
                tr {
                    td { (r.state) }
                    td { (r.role.as_str()) @if let Some(e) = r.event { " on " (e) } }
                    td { code { (r.name) } }
                    td { (describe(bound, config)) }
                }
            }
        }
    }
}

fn describe(binding: Option<&ActionBinding>, config: &Config) -> String {
    match binding {
        Some(ActionBinding::Exec(e)) => format!("program: {}", e.argv.join(" ")),
        Some(ActionBinding::Http(h)) => format!("webhook: POST {}", h.url),
        Some(ActionBinding::Lines(l)) => {
            format!(
                "built in: lines of {}, {} a page",
                l.path.display(),
                l.batch
            )
        }
        Some(ActionBinding::List(l)) => {
            format!("built in: the list `{}`, {} a page", l.key, l.batch)
        }
        None if config.python.is_some() => "Python (the `python:` section)".to_string(),
        None => "a Rust handler registered by the program".to_string(),
    }
}

/// The machine as YAML (what phasm read, written back).
fn machine_yaml(m: &Machine) -> String {
    crate::config::to_yaml(&Config {
        machines: vec![m.clone()],
        ..Config::default()
    })
}

/// The start form's fields.
#[derive(Deserialize)]
pub(crate) struct StartForm {
    context: String,
    #[serde(default)]
    name: String,
}

/// `POST /machines/{name}/start`: start an instance and go to its page, or show the machine's
/// page again with the error under the form (400).
pub(crate) async fn start(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Form(form): Form<StartForm>,
) -> Response {
    let Some(m) = state.config.machine(&name) else {
        return no_such_machine(&name);
    };
    let context = match serde_json::from_str::<serde_json::Value>(form.context.trim()) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(other) => {
            let error = format!("The context must be a JSON object, not {other}.");
            return machine_page(&state, m, Some((&form.context, error)), false).await;
        }
        Err(e) => {
            let error = format!("The context is not JSON: {e}.");
            return machine_page(&state, m, Some((&form.context, error)), false).await;
        }
    };
    let wanted = Some(form.name.trim()).filter(|n| !n.is_empty());
    let started = control::start_instance(
        &*state.store,
        &state.config,
        &*state.clock,
        &m.name,
        context,
        wanted,
        &state.limits,
    )
    .await;
    match started {
        Ok(
            StartOutcome::Started(instance) | StartOutcome::AlreadyExists { name: instance, .. },
        ) => Redirect::to(&format!("/instances/{}", seg(&instance))).into_response(),
        Err(StartError::Store(e)) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, &m.name, &e.to_string())
        }
        Err(e) => machine_page(&state, m, Some((&form.context, e.to_string())), false).await,
    }
}

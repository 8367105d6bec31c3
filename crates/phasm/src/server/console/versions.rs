//! A machine's deployed versions in the console: the list on the machine's page (the live
//! instances on each, a link to its definition and to its diff with the version before),
//! `GET /machines/{name}/versions/{n}` (its definition, the file it came from and its
//! drawing), `GET /machines/{name}/diff?from=N&to=M`, and moving the instances of an older
//! version to the latest (`POST /machines/{name}/upgrade`): a dry run first, listing what
//! would move and why the others would not, then a confirmation that moves them.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{page, problem, seg, time};
use crate::config::{diff, load_definition, Loaded};
use crate::control::{UpgradeOptions, UpgradeWhich};
use crate::server::state::ServerState;
use crate::store::{StoredVersion, VersionCounts, VersionRecord};

/// The versions section of a machine's page (empty when the machine was never deployed).
pub(super) async fn section(state: &ServerState, machine: &str) -> Markup {
    let read = async {
        let versions = state.store.versions(Some(machine)).await?;
        let counts = state.store.version_counts(Some(machine)).await?;
        Ok::<_, crate::store::StoreError>((versions, counts))
    };
    let (versions, counts) = match read.await {
        Ok(v) => v,
        Err(e) => return html! { h2 { "Versions" } p class="err" { (e) } },
    };
    let Some(latest) = versions.last().map(|v| v.version) else {
        return html! {};
    };
    let q = seg(machine);
    html! {
        h2 { "Versions" }
        p class="muted" { "Each instance runs on the version it started on; new instances start on v" (latest) "." }
        table id="versions" {
            tr { th { "version" } th { "deployed" } th { "hash" } th { "file" } th { "running" } th { "waiting" } th { "failed" } th {} }
            @for v in versions.iter().rev() {
                @let c = live(&counts, v);
                tr {
                    td { a href={ "/machines/" (q) "/versions/" (v.version) } { "v" (v.version) } }
                    td { (time(v.deployed_at)) }
                    td { code { (&v.hash[..v.hash.len().min(12)]) } }
                    td { (v.path) }
                    td { (c.running) } td { (c.waiting) } td { (c.failed) }
                    td {
                        @if v.version > 1 {
                            a href={ "/machines/" (q) "/diff?from=" (v.version - 1) "&to=" (v.version) } { "changes from v" (v.version - 1) }
                        }
                        @if v.version < latest && c.running + c.failed > 0 {
                            form method="post" action={ "/machines/" (q) "/upgrade" } class="upgrade" {
                                input type="hidden" name="from" value=(v.version);
                                input name="map" placeholder="renames: old=new, …" size="24";
                                " "
                                button { "Upgrade " (c.running + c.failed) " to v" (latest) "…" }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn live(counts: &[VersionCounts], v: &VersionRecord) -> VersionCounts {
    counts
        .iter()
        .find(|c| c.machine == v.machine && c.version == v.version)
        .cloned()
        .unwrap_or_default()
}

/// Version `n` of `machine`, or the response that says why not.
async fn stored(
    state: &ServerState,
    machine: &str,
    n: u32,
) -> Result<StoredVersion, Box<Response>> {
    match state.store.version(machine, n).await {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(Box::new(problem(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("Machine `{machine}` has no version {n}."),
        ))),
        Err(e) => Err(Box::new(problem(
            StatusCode::SERVICE_UNAVAILABLE,
            machine,
            &e.to_string(),
        ))),
    }
}

fn loaded(machine: &str, v: &StoredVersion) -> Result<Loaded, Box<Response>> {
    load_definition(machine, v.record.version, &v.definition, &v.record.path).map_err(|e| {
        Box::new(problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            machine,
            &e.to_string(),
        ))
    })
}

/// `GET /machines/{name}/versions/{n}`: the version's definition, source and drawing.
pub(crate) async fn version(
    State(state): State<Arc<ServerState>>,
    Path((name, n)): Path<(String, u32)>,
) -> Response {
    let v = match stored(&state, &name, n).await {
        Ok(v) => v,
        Err(response) => return *response,
    };
    let q = seg(&name);
    let body = html! {
        h1 { (name) " v" (n) }
        p {
            "deployed " (time(v.record.deployed_at)) " from " code { (v.record.path) }
            " · hash " code { (v.record.hash) }
            " · " a href={ "/machines/" (q) } { "the machine" }
            @if n > 1 { " · " a href={ "/machines/" (q) "/diff?from=" (n - 1) "&to=" (n) } { "changes from v" (n - 1) } }
        }
        p { img class="graph" id="graph" alt={ "graph of " (name) " v" (n) } src={ "/machines/" (q) "/versions/" (n) "/graph.svg" }; }
        h2 { "Definition" }
        p class="muted" { "What its instances run on: the machine with the bindings, queue limits, python section and schedules it uses." }
        pre id="definition" { (v.definition) }
        h2 { "The file it was deployed from" }
        pre id="source" { (v.source) }
    };
    page(&format!("{name} v{n}"), body).into_response()
}

/// `GET /machines/{name}/versions/{n}/graph.svg`: the version's drawing.
pub(crate) async fn version_graph(
    State(state): State<Arc<ServerState>>,
    Path((name, n)): Path<(String, u32)>,
) -> Response {
    let v = match stored(&state, &name, n).await {
        Ok(v) => v,
        Err(response) => return *response,
    };
    let loaded = match loaded(&name, &v) {
        Ok(l) => l,
        Err(response) => return *response,
    };
    let Some(m) = loaded.config.machine(&name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    (
        [(axum::http::header::CONTENT_TYPE, "image/svg+xml")],
        crate::graph::to_svg(m),
    )
        .into_response()
}

/// Which two versions a diff compares.
#[derive(Deserialize)]
pub(crate) struct DiffQuery {
    from: u32,
    to: u32,
}

/// `GET /machines/{name}/diff?from=N&to=M`: what changed from one version to the other.
pub(crate) async fn diff_page(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Response {
    let mut configs = Vec::with_capacity(2);
    for n in [q.from, q.to] {
        let v = match stored(&state, &name, n).await {
            Ok(v) => v,
            Err(response) => return *response,
        };
        match loaded(&name, &v) {
            Ok(l) => configs.push(l.config),
            Err(response) => return *response,
        }
    }
    let changes = diff(&configs[0], &configs[1], &name);
    let title = format!("{name}: v{} → v{}", q.from, q.to);
    let body = html! {
        h1 { (title) }
        p { a href={ "/machines/" (seg(&name)) } { "the machine" } }
        @if changes.is_empty() {
            p id="no-changes" { "These versions do not differ." }
        } @else {
            table id="changes" {
                tr { th {} th { "what" } th { "how" } }
                @for c in &changes {
                    tr {
                        td { code { (c.kind.sign()) } }
                        td { (c.what) }
                        td { @for h in &c.how { code { (h) } br; } }
                    }
                }
            }
        }
    };
    page(&title, body).into_response()
}

/// The upgrade form's fields.
#[derive(Deserialize)]
pub(crate) struct UpgradeForm {
    from: u32,
    #[serde(default)]
    map: String,
    /// Present on the confirmation: move them (else a dry run).
    #[serde(default)]
    confirm: Option<String>,
}

/// `OLD=NEW` pairs, separated by commas or spaces.
fn renames(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for pair in text
        .split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some((old, new)) if !old.is_empty() && !new.is_empty() => {
                map.insert(old.to_string(), new.to_string());
            }
            _ => return Err(format!("`{pair}` is not OLD=NEW")),
        }
    }
    Ok(map)
}

/// `POST /machines/{name}/upgrade`: a dry run listing what would move to the latest version
/// (with a button that confirms), or, confirmed, the move and what became of each instance.
pub(crate) async fn upgrade(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Form(form): Form<UpgradeForm>,
) -> Response {
    let map = match renames(&form.map) {
        Ok(m) => m,
        Err(e) => return problem(StatusCode::BAD_REQUEST, "Not upgraded", &e),
    };
    let dry_run = form.confirm.is_none();
    let options = UpgradeOptions {
        to: None,
        map,
        dry_run,
    };
    let which = UpgradeWhich::Machine {
        machine: name.clone(),
        from: form.from,
    };
    let reports =
        match crate::control::upgrade(&*state.store, &*state.clock, &which, &options).await {
            Ok(r) => r,
            Err(e) => return problem(StatusCode::BAD_REQUEST, "Not upgraded", &e.to_string()),
        };
    let moving = reports.iter().filter(|r| r.moved()).count();
    let to = reports.iter().find_map(|r| r.to);
    let q = seg(&name);
    let body = html! {
        h1 { (name) ": v" (form.from) " → " @match to { Some(t) => { "v" (t) } None => { "the latest" } } }
        @if dry_run {
            p id="upgrade-summary" { (moving) " of " (reports.len()) " instances would move. Nothing has moved yet." }
        } @else {
            p id="upgrade-summary" { (moving) " of " (reports.len()) " instances moved." }
        }
        ul id="upgrade-report" {
            @for r in &reports { li { (r.describe(dry_run)) } }
        }
        @if dry_run && moving > 0 {
            form method="post" action={ "/machines/" (q) "/upgrade" } id="confirm-upgrade" {
                input type="hidden" name="from" value=(form.from);
                input type="hidden" name="map" value=(form.map);
                input type="hidden" name="confirm" value="1";
                button { "Move " (moving) " instances" }
            }
        }
        p { a href={ "/machines/" (q) } { "Back to the machine" } }
    };
    page(&format!("Upgrade {name}"), body).into_response()
}

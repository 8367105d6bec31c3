//! The web console: server-rendered pages (no JavaScript build step) for the machines, the
//! instances, and one instance — its graph with the states its branches are in highlighted,
//! branch counts, history, pending steps and their errors, log, context, parent and children,
//! and buttons to cancel or retry. An instance page refreshes its live part every two seconds
//! with a few lines of inline script. Every value that comes from users (names, contexts, log
//! lines, errors) is HTML-escaped.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use crate::clock::rfc3339;
use crate::server::ServerState;
use crate::store::{Control, InstanceStatus, InstanceView, ListFilter};

/// The cookie that carries the token for the console's pages.
pub use crate::server::auth::TOKEN_COOKIE;
use crate::server::auth::{cookie_value, token_given, token_matches};

/// Escape text for HTML (element content and quoted attribute values).
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escape a path segment (instance and machine names are restricted, but be safe).
fn seg(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1f2937}\
header{background:#111827;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.5rem;align-items:center}\
header a{color:#fff;text-decoration:none}main{padding:1rem 1.2rem}\
table{border-collapse:collapse;width:100%;font-size:.9rem}td,th{border-bottom:1px solid #e5e7eb;padding:.3rem .5rem;text-align:left;vertical-align:top}\
.s-running{color:#2563eb}.s-completed{color:#15803d}.s-failed{color:#b91c1c}.s-halted,.s-cancelled{color:#6b7280}\
pre{background:#f3f4f6;padding:.6rem;overflow:auto;max-height:24rem}.err{color:#b91c1c}\
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{border:1px solid #e5e7eb;border-radius:.4rem;padding:.6rem 1rem}\
form.inline{display:inline}button{padding:.3rem .8rem}img.graph{max-width:100%;border:1px solid #e5e7eb}";

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · phasm</title>\
         <meta name=\"viewport\" content=\"width=device-width\"><style>{STYLE}</style></head>\
         <body><header><strong>phasm</strong><a href=\"/\">Machines</a><a href=\"/instances\">Instances</a></header>\
         <main>{body}</main></body></html>",
        esc(title)
    ))
}

fn status_span(status: InstanceStatus) -> String {
    format!("<span class=\"s-{0}\">{0}</span>", status.as_str())
}

/// Pages need the token too: a bearer header, or the cookie set by the login form.
/// Let a page through, or send the browser to the login form.
pub(crate) async fn authorize_pages(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    match &state.token {
        Some(token) if !token_matches(token_given(&headers).as_deref(), token) => {
            Redirect::to("/login").into_response()
        }
        _ => next.run(request).await,
    }
}

/// `GET /login`.
pub(crate) async fn login_form() -> Html<String> {
    page(
        "Log in",
        "<h1>Log in</h1><form method=\"post\" action=\"/login\"><label>Token <input type=\"password\" name=\"token\" autofocus></label> <button>Log in</button></form>",
    )
}

#[derive(Deserialize)]
pub(crate) struct Login {
    token: String,
}

/// `POST /login`: a right token sets the cookie.
pub(crate) async fn login(
    State(state): State<Arc<ServerState>>,
    client: crate::server::Client,
    Form(form): Form<Login>,
) -> Response {
    let Some(token) = &state.token else {
        return Redirect::to("/").into_response();
    };
    if let Some(wait) = state.throttle.blocked(client.0) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, wait.as_secs().max(1).to_string())],
            page("Log in", &format!("<h1>Log in</h1><p class=\"err\">Too many wrong tokens from this address: try again in {} s.</p>", wait.as_secs().max(1))),
        )
            .into_response();
    }
    if token_matches(Some(&form.token), token) {
        state.throttle.succeeded(client.0);
        return (
            [(
                header::SET_COOKIE,
                format!(
                    "{TOKEN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
                    cookie_value(&form.token)
                ),
            )],
            Redirect::to("/"),
        )
            .into_response();
    }
    state.throttle.failed(client.0);
    (StatusCode::UNAUTHORIZED, page("Log in", "<h1>Log in</h1><p class=\"err\">Wrong token.</p><p><a href=\"/login\">Try again</a></p>")).into_response()
}

/// `GET /`: the machines and their graphs.
pub(crate) async fn machines(State(state): State<Arc<ServerState>>) -> Html<String> {
    let mut body = String::from("<h1>Machines</h1>");
    let now = state.clock.now();
    let schedules = match crate::control::schedule_statuses(&*state.store, &state.config, now).await
    {
        Ok(s) => s,
        Err(e) => {
            let _ = write!(
                body,
                "<p class=\"err\">The schedules' last ticks cannot be read: {}</p>",
                esc(&e.to_string())
            );
            crate::control::statuses(&state.config, &[], now)
        }
    };
    for m in &state.config.machines {
        let _ = write!(
            body,
            "<section class=\"card\"><h2>{name}</h2><p>{n} states · <a href=\"/instances?machine={q}\">instances</a></p>",
            name = esc(&m.name),
            n = m.states.len(),
            q = seg(&m.name),
        );
        let mine: Vec<_> = schedules.iter().filter(|s| s.machine == m.name).collect();
        if !mine.is_empty() {
            body.push_str("<table class=\"schedules\"><caption>Schedules</caption><tr><th>schedule</th><th>when</th><th>last tick</th><th>last instance</th><th>next tick</th></tr>");
            for s in mine {
                let last = s.last_tick.map_or("never".to_string(), rfc3339);
                let instance = match (&s.last_instance, s.last_status) {
                    (Some(i), status) => format!(
                        "<a href=\"/instances/{}\">{}</a> {}",
                        seg(i),
                        esc(i),
                        esc(status.map_or("scrubbed", |st| st.as_str()))
                    ),
                    (None, _) => "—".to_string(),
                };
                let next = s.next_tick.map_or("never".to_string(), rfc3339);
                let overdue = if s.overdue {
                    " <span class=\"err\">(a tick passed unfired: no worker ran)</span>"
                } else {
                    ""
                };
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}, overlap {}</td><td>{}</td><td>{instance}</td><td>{}{overdue}</td></tr>",
                    esc(&s.name),
                    esc(&s.timing),
                    s.overlap,
                    esc(&last),
                    esc(&next),
                );
            }
            body.push_str("</table>");
        }
        let _ = write!(
            body,
            "<img class=\"graph\" alt=\"graph of {name}\" src=\"/api/machines/{q}/graph.svg\"></section>",
            name = esc(&m.name),
            q = seg(&m.name),
        );
    }
    page("Machines", &body)
}

#[derive(Deserialize)]
pub(crate) struct ListQuery {
    machine: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
}

/// `GET /instances`: newest first, filtered by machine and status.
pub(crate) async fn instances(
    State(state): State<Arc<ServerState>>,
    Query(q): Query<ListQuery>,
) -> Response {
    let machine = q.machine.filter(|m| !m.is_empty());
    let status = q
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .and_then(InstanceStatus::parse);
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let rows = match state
        .store
        .list(&ListFilter {
            machine: machine.clone(),
            status,
            limit,
            before: None,
        })
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                page(
                    "Instances",
                    &format!("<p class=\"err\">{}</p>", esc(&e.to_string())),
                ),
            )
                .into_response()
        }
    };
    let mut body = String::from("<h1>Instances</h1><form method=\"get\">Machine <select name=\"machine\"><option value=\"\">any</option>");
    for m in &state.config.machines {
        let selected = if machine.as_deref() == Some(m.name.as_str()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{}</option>", esc(&m.name));
    }
    body.push_str("</select> Status <select name=\"status\"><option value=\"\">any</option>");
    for s in ["running", "completed", "failed", "halted", "cancelled"] {
        let selected = if status.map(InstanceStatus::as_str) == Some(s) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{s}</option>");
    }
    let _ = write!(
        body,
        "</select> <button>Filter</button></form><table><tr><th>instance</th><th>machine</th><th>status</th><th>created</th><th>error</th></tr>"
    );
    for r in &rows {
        let _ = write!(
            body,
            "<tr><td><a href=\"/instances/{q}\">{name}</a></td><td>{machine}</td><td>{status}</td><td>{created}</td><td class=\"err\">{error}</td></tr>",
            q = seg(&r.instance),
            name = esc(&r.instance),
            machine = esc(&r.machine),
            status = status_span(r.status),
            created = rfc3339(r.created_at),
            error = esc(r.error.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</table>");
    if rows.len() == limit {
        let _ = write!(
            body,
            "<p><a href=\"/instances?machine={}&status={}&limit={}\">Show more</a></p>",
            seg(machine.as_deref().unwrap_or("")),
            status.map_or("", InstanceStatus::as_str),
            limit * 2
        );
    }
    page("Instances", &body).into_response()
}

/// The part of an instance page that refreshes itself.
fn live_part(view: &InstanceView, workers: &[crate::store::WorkerView]) -> String {
    let b = &view.branches;
    let mut out =
        format!(
        "<div class=\"cards\"><div class=\"card\">status <strong id=\"status\">{}</strong></div>\
         <div class=\"card\">{} live · {}{} parked at fan-ins · {} ended · {} failed{}</div></div>",
        status_span(view.status),
        b.live,
        if b.waiting > 0 {
            format!("{} waiting for events · ", b.waiting)
        } else {
            String::new()
        },
        b.parked,
        b.ended,
        b.failed,
        if b.held > 0 {
            format!(" · {} held (stopped by the failure; Retry resumes them)", b.held)
        } else {
            String::new()
        }
    );
    if let Some(error) = &view.error {
        let _ = write!(out, "<p class=\"err\">{}</p>", esc(error));
    }
    let _ = write!(
        out,
        "<p><img class=\"graph\" alt=\"graph\" src=\"/instances/{}/graph.svg?t={}\"></p>",
        seg(&view.name),
        view.history_total + view.tasks_total
    );
    out.push_str("<h2>History</h2>");
    // The latest transitions only (the store reads no more): a page stays small whatever the
    // instance did.
    let skipped = view.history_total.saturating_sub(view.history.len() as u64);
    if skipped > 0 {
        let _ = write!(
            out,
            "<p>{skipped} earlier transitions are not shown: <a href=\"/api/instances/{}/history\">all of them</a> (JSON, in pages).</p>",
            seg(&view.name)
        );
    }
    out.push_str("<table><tr><th>#</th><th>from</th><th>event</th><th>to</th><th>attempt</th><th>at</th><th>took</th><th>branch</th></tr>");
    for (i, h) in view.history.iter().enumerate() {
        let i = skipped as usize + i;
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1} ms</td><td>{}</td></tr>",
            i + 1,
            esc(h.from.as_deref().unwrap_or("—")),
            esc(&h.event),
            esc(&h.to),
            h.attempt,
            rfc3339(h.finished_at),
            (h.finished_at - h.started_at) as f64 / 1000.0,
            esc(&h.branch)
        );
    }
    out.push_str("</table>");
    if !view.waiting.is_empty() {
        out.push_str("<h2>Waiting for events</h2><table><tr><th>state</th><th>branch</th><th>accepts</th><th>since</th><th>timeout</th></tr>");
        for w in &view.waiting {
            let timeout = match (w.deadline, &w.timeout_event) {
                (Some(at), Some(event)) => format!("{} at {}", esc(event), rfc3339(at)),
                _ => "none".to_string(),
            };
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{timeout}</td></tr>",
                esc(&w.state),
                esc(&w.branch),
                esc(&w.events.join(", ")),
                rfc3339(w.since),
            );
        }
        out.push_str("</table>");
    }
    if !view.buffered.is_empty() {
        out.push_str("<h2>Events kept for a later wait</h2><table><tr><th>event</th><th>id</th><th>at</th></tr>");
        for e in &view.buffered {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&e.event),
                esc(e.id.as_deref().unwrap_or("")),
                rfc3339(e.at),
            );
        }
        out.push_str("</table>");
    }
    let pending: Vec<_> = view.tasks.iter().filter(|t| !view.is_wait(t)).collect();
    if !pending.is_empty() {
        out.push_str("<h2>Pending</h2><table><tr><th>from</th><th>event</th><th>status</th><th>attempts</th><th>due</th><th>last error</th></tr>");
        for t in pending {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"err\">{}</td></tr>",
                esc(t.from.as_deref().unwrap_or("start")),
                esc(&t.event),
                t.status,
                t.attempts,
                rfc3339(t.due_at),
                esc(&[
                    t.last_error.clone(),
                    crate::control::unserved(&view.machine, t, workers).map(|w| format!("waiting: {w}")),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" · "))
            );
        }
        out.push_str("</table>");
        let more = view.tasks_total.saturating_sub(view.tasks.len() as u64);
        if more > 0 {
            let _ = write!(out, "<p>… and {more} more pending steps.</p>");
        }
    }
    if let Some(context) = &view.current_context {
        let pretty = serde_json::to_string_pretty(context).unwrap_or_default();
        let _ = write!(out, "<h2>Context</h2><pre>{}</pre>", esc(&pretty));
    }
    out
}

/// Lines of log an instance page shows at once.
const PAGE_ROWS: usize = 100;

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
            return (
                StatusCode::NOT_FOUND,
                page(
                    "Not found",
                    &format!("<p>No instance named <code>{}</code>.</p>", esc(&name)),
                ),
            )
                .into_response()
        }
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                page(
                    "Error",
                    &format!("<p class=\"err\">{}</p>", esc(&e.to_string())),
                ),
            )
                .into_response()
        }
    };
    // Without the list of workers, no step is said to be unserved.
    let workers = state
        .store
        .workers(state.clock.now())
        .await
        .unwrap_or_default();
    if headers.get("x-partial").is_some() {
        return Html(live_part(&view, &workers)).into_response();
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
    let q = seg(&view.name);
    let mut body = format!(
        "<h1>{}</h1><p>machine <a href=\"/instances?machine={}\">{}</a> · created {}",
        esc(&view.name),
        seg(&view.machine),
        esc(&view.machine),
        rfc3339(view.created_at)
    );
    if let Some(parent) = &view.parent {
        let _ = write!(
            body,
            " · parent <a href=\"/instances/{}\">{}</a>",
            seg(parent),
            esc(parent)
        );
    }
    body.push_str("</p><p>");
    if matches!(
        view.status,
        InstanceStatus::Running | InstanceStatus::Failed
    ) {
        let _ = write!(body, "<form class=\"inline\" method=\"post\" action=\"/instances/{q}/cancel\"><button id=\"cancel\">Cancel</button></form> ");
    }
    if view.status == InstanceStatus::Failed {
        let _ = write!(body, "<form class=\"inline\" method=\"post\" action=\"/instances/{q}/retry\"><button id=\"retry\">Retry</button></form>");
    }
    body.push_str("</p>");
    let _ = write!(
        body,
        "<div id=\"live\">{}</div>",
        live_part(&view, &workers)
    );
    if !view.children.is_empty() {
        body.push_str("<h2>Children</h2><ul>");
        for c in &view.children {
            let _ = write!(
                body,
                "<li><a href=\"/instances/{}\">{}</a></li>",
                seg(c),
                esc(c)
            );
        }
        body.push_str("</ul>");
    }
    body.push_str("<h2>Log</h2><pre id=\"log\">");
    let (logs, next_log) = log_page.map_or((Vec::new(), None), |p| (p.items, p.next));
    for l in &logs {
        let _ = writeln!(
            body,
            "{} {:<7} {}",
            rfc3339(l.at),
            esc(&l.level),
            esc(&l.message)
        );
    }
    body.push_str("</pre>");
    if let Some(next) = next_log {
        let _ = write!(
            body,
            "<p><a id=\"log-next\" href=\"/instances/{q}?log_cursor={next}\">next {PAGE_ROWS} log lines</a></p>"
        );
    }
    if view.status == InstanceStatus::Running {
        body.push_str(
            "<script>setInterval(async()=>{const r=await fetch(location.pathname,{headers:{'X-Partial':'1'}});\
             if(r.ok){document.getElementById('live').innerHTML=await r.text();}},2000);</script>",
        );
    }
    page(&view.name, &body).into_response()
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
    let here: Vec<&str> = view
        .tasks
        .iter()
        .filter_map(|t| t.from.as_deref())
        .collect();
    let initial: Vec<&str> = if view.tasks.iter().any(|t| t.from.is_none()) {
        machine
            .initial_state()
            .map(|s| vec![s.name.as_str()])
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let highlight: Vec<&str> = here.into_iter().chain(initial).collect();
    (
        [(header::CONTENT_TYPE, "image/svg+xml")],
        crate::graph::to_svg_highlighting(machine, &highlight),
    )
        .into_response()
}

async fn act(state: &ServerState, name: &str, cancel: bool) -> Response {
    let now = state.clock.now();
    let result = if cancel {
        state.store.cancel(now, name).await
    } else {
        state.store.retry(now, name).await
    };
    match result {
        Ok(Control::Done) => Redirect::to(&format!("/instances/{}", seg(name))).into_response(),
        Ok(Control::NotFound) => (
            StatusCode::NOT_FOUND,
            page("Not found", "<p>No such instance.</p>"),
        )
            .into_response(),
        Ok(Control::NotAllowed(status)) => (
            StatusCode::CONFLICT,
            page(
                "Not allowed",
                &format!(
                    "<p>The instance is {}.</p><p><a href=\"/instances/{}\">Back</a></p>",
                    status.as_str(),
                    seg(name)
                ),
            ),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            page(
                "Error",
                &format!("<p class=\"err\">{}</p>", esc(&e.to_string())),
            ),
        )
            .into_response(),
    }
}

/// `POST /instances/{name}/cancel` (the page's button).
pub(crate) async fn cancel(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
) -> Response {
    act(&state, &name, true).await
}

/// `POST /instances/{name}/retry` (the page's button).
pub(crate) async fn retry(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
) -> Response {
    act(&state, &name, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_users_write() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
    }
}

//! What every page shares: the frame (title, navigation, styles), and small pieces of markup.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::clock::{rfc3339, Micros};
use crate::store::InstanceStatus;

/// Colours hold in light and dark mode (`color-scheme`, and contrasts that read on both).
const STYLE: &str = ":root{color-scheme:light dark;--line:#8884;--soft:#8881}\
body{font-family:system-ui,sans-serif;margin:0}\
header{background:#111827;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.5rem;align-items:center}\
header a{color:#fff;text-decoration:none}header a:focus,header a:hover{text-decoration:underline}\
main{padding:1rem 1.2rem}\
table{border-collapse:collapse;width:100%;font-size:.9rem;margin:.4rem 0 1rem}\
td,th{border-bottom:1px solid var(--line);padding:.3rem .5rem;text-align:left;vertical-align:top}\
caption{text-align:left;font-weight:600;padding:.3rem 0}caption .muted{font-weight:400}\
.s-running{color:#3b82f6}.s-completed{color:#16a34a}.s-failed{color:#dc2626}.s-halted,.s-cancelled{color:#6b7280}\
pre,textarea{background:var(--soft);padding:.6rem;overflow:auto;max-height:24rem;font-family:ui-monospace,monospace}\
#log,#step-log{white-space:pre-wrap}\
a:focus-visible,button:focus-visible,input:focus-visible,select:focus-visible,textarea:focus-visible{outline:3px solid #f59e0b;outline-offset:2px}\
.err{color:#dc2626}.warn{color:#d97706}.muted{color:#6b7280}\
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{border:1px solid var(--line);border-radius:.4rem;padding:.6rem 1rem}\
.num{font-size:1.4rem;font-weight:600;display:block}\
form.inline{display:inline}button{padding:.3rem .8rem}\
img.graph{max-width:100%;border:1px solid var(--line);background:#fff}\
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(22rem,1fr));gap:1rem}\
.swatch{display:inline-block;width:1.4em;height:.9em;border:2px solid;border-radius:.3em;vertical-align:middle;margin-right:.3em}\
.legend{font-size:.85rem}";

/// The console's only script, served at [`SCRIPT_PATH`] (the Content-Security-Policy allows
/// scripts from the server itself alone, never inline): it refreshes the element a page
/// marked for refreshing (`data-refresh`: the element to replace, `data-every`, `data-from`, `data-hold`).
pub const SCRIPT: &str = "\
for(const m of document.querySelectorAll('[data-refresh]')){\
const d=m.dataset;\
setInterval(async()=>{\
if(d.hold&&document.querySelector(d.hold))return;\
const u=d.from==='path'?location.pathname:location.href;\
const r=await fetch(u,{headers:{'X-Partial':'1'}});\
const t=document.getElementById(d.refresh);\
if(r.ok&&t){t.innerHTML=await r.text();}\
},Number(d.every));}\n";

/// Where the console's script is served.
pub const SCRIPT_PATH: &str = "/assets/console.js";

/// Have the console's script replace element `id` every `every_ms` with the page's partial
/// answer (`X-Partial: 1`) for the page's path (`from` = `"path"`) or whole URL (`"href"`),
/// skipped while `hold` (a CSS selector) matches something.
pub(super) fn refresh(id: &str, every_ms: u32, from: &str, hold: Option<&str>) -> Markup {
    html! {
        span hidden data-refresh=(id) data-every=(every_ms) data-from=(from) data-hold=[hold] {}
        script src=(SCRIPT_PATH) {}
    }
}

/// `GET /assets/console.js`.
pub(crate) async fn script() -> impl axum::response::IntoResponse {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/javascript; charset=utf-8",
            ),
            (axum::http::header::CACHE_CONTROL, "max-age=3600"),
        ],
        SCRIPT,
    )
}

/// A whole page.
pub(super) fn page(title: &str, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { (title) " · phasm" }
                    meta name="viewport" content="width=device-width";
                    style { (PreEscaped(STYLE)) }
                }
                body {
                    header {
                        strong { "phasm" }
                        a href="/" { "Machines" }
                        a href="/instances" { "Instances" }
                        a href="/workers" { "Workers" }
                        a href="/queues" { "Queues" }
                    }
                    main { (body) }
                }
            }
        }
        .into_string(),
    )
}

/// A page saying what went wrong, with its status code.
pub(super) fn problem(status: StatusCode, title: &str, message: &str) -> Response {
    let body = html! {
        h1 { (title) }
        p class="err" { (message) }
    };
    (status, page(title, body)).into_response()
}

/// Every error answer of a page is a page: axum's extractors answer a bad query string, form
/// or path in plain text (or with no body); this turns those into the console's problem page,
/// keeping the status and the `Allow` and `Retry-After` headers.
pub(crate) async fn html_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::header;
    let response = next.run(request).await;
    let status = response.status();
    let is_html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if is_html || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let title = status.canonical_reason().unwrap_or("Error");
    let message = if text.is_empty() {
        title.to_string()
    } else {
        text
    };
    let mut answer = problem(status, title, &message);
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(value) = parts.headers.get(&name) {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}

/// The key to a machine's drawing, under it.
pub(super) fn legend(machine: &crate::machine::Machine, highlighted: bool) -> Markup {
    html! {
        p class="legend muted" {
            @for e in crate::graph::legend(machine, highlighted) {
                span class="swatch" style={ "background:" (e.fill) ";border-color:" (e.border) } {}
                (e.meaning) " · "
            }
            "● running · ✖ failed · ✓ passed · ■ ended here"
        }
    }
}

/// An instance status, coloured.
/// Log lines, one a line, each coloured by its level.
pub(super) fn log_lines(lines: &[crate::engine::LogLine]) -> Markup {
    html! {
        @for l in lines {
            span class=(level_class(&l.level)) { (time(l.at)) " " (format!("{:<7}", l.level)) " " (l.message) } "\n"
        }
    }
}

/// The class of a log line's level (known levels only: the level is the action's text).
fn level_class(level: &str) -> &'static str {
    match level {
        "error" => "err",
        "warning" | "warn" => "warn",
        "debug" => "muted",
        _ => "",
    }
}

pub(super) fn status(s: InstanceStatus) -> Markup {
    html! { span class={ "s-" (s.as_str()) } { (s.as_str()) } }
}

/// A link to an instance's page.
pub(super) fn instance_link(name: &str) -> Markup {
    html! { a href={ "/instances/" (seg(name)) } { (name) } }
}

/// A time as RFC 3339 text.
pub(super) fn time(at: Micros) -> String {
    rfc3339(at)
}

/// How long ago, for people (`3 min ago`).
pub(super) fn ago(at: Micros, now: Micros) -> String {
    let secs = (now - at).max(0) / 1_000_000;
    match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// A duration in microseconds, in milliseconds (`12.3 ms`): a step's time.
pub(super) fn millis(us: i64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// A duration in microseconds for people (`1.2 s`, `3 min 4 s`, `2 h 5 min`).
pub(super) fn human_duration(micros: i64) -> String {
    let ms = micros.max(0) / 1000;
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// Escape a path segment or query value (instance and machine names are restricted, but be
/// safe).
pub(super) fn seg(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_text_is_escaped_and_segments_encoded() {
        let name = "<script>alert('x')</script> & \"q\"";
        let markup = html! { td { (name) } a href={ "/i/" (name) } { "x" } }.into_string();
        assert!(
            markup.contains("&lt;script&gt;alert('x')&lt;/script&gt; &amp; &quot;q&quot;"),
            "{markup}"
        );
        assert!(!markup.contains("<script>"), "{markup}");
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
        assert_eq!(ago(0, 90 * 1_000_000), "1 min ago");
    }
}

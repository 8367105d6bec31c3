//! An instance's timeline, Gantt-style: a bar per step (its committing attempt), the wait
//! before it on its branch (queueing, a countdown, or the backoff of failed attempts), retried
//! steps marked, and the pending steps: due now, running, or counting down to their due time.
//! A step that arrives at a fan-in is one task with two history rows (it ran, then parked),
//! so they share one bar's times.

use maud::{html, Markup};

use super::layout::{millis, seg};
use crate::clock::Micros;
use crate::store::{InstanceView, TaskStatus};

/// Width of the labels on the left, of the time axis, and height of a lane, in pixels.
const LABEL: f64 = 230.0;
const AXIS: f64 = 760.0;
const LANE: f64 = 20.0;

/// One lane: a label, the wait before the bar, the bar, and how to draw it.
struct Lane {
    label: String,
    wait_from: Option<Micros>,
    from: Micros,
    to: Micros,
    class: &'static str,
    note: String,
    link: Option<String>,
}

/// The timeline of an instance (its latest steps, as the instance page shows them) at `now`.
pub(super) fn timeline(view: &InstanceView, now: Micros) -> Markup {
    let mut lanes = Vec::new();
    // The previous step's end on each branch: the wait before the next began there.
    let mut ended: Vec<(&str, Micros)> = Vec::new();
    for h in &view.history {
        // A branch's first step waited since the latest step finished before it started (the
        // fork), the first step of all since the instance was created.
        let before = ended
            .iter()
            .rev()
            .find(|(b, _)| *b == h.branch)
            .map(|(_, at)| *at)
            .or_else(|| {
                ended
                    .iter()
                    .map(|(_, at)| *at)
                    .filter(|at| *at <= h.started_at)
                    .max()
            })
            .or((h.from.is_none()).then_some(view.created_at));
        ended.push((h.branch.as_str(), h.finished_at));
        let took = millis(h.finished_at - h.started_at);
        lanes.push(Lane {
            label: if h.branch.is_empty() {
                format!("{} → {}", h.from.as_deref().unwrap_or("start"), h.to)
            } else {
                format!(
                    "{} → {} ({})",
                    h.from.as_deref().unwrap_or("start"),
                    h.to,
                    h.branch
                )
            },
            wait_from: before.filter(|at| *at < h.started_at),
            from: h.started_at,
            to: h.finished_at,
            class: if h.attempt > 0 { "retried" } else { "ran" },
            note: if h.attempt > 0 {
                format!(
                    "{took}, attempt {} ({} failed before)",
                    h.attempt + 1,
                    h.attempt
                )
            } else {
                took
            },
            link: Some(format!("/instances/{}/steps/{}", seg(&view.name), h.id)),
        });
    }
    let last = ended.iter().map(|(_, at)| *at).max();
    for t in &view.tasks {
        let label = format!("{} · {}", t.from.as_deref().unwrap_or("start"), t.event);
        let (from, to, class, note) = match (t.status, &t.leased_by) {
            (TaskStatus::Ready, Some(_)) => (now, now, "running", "running now".to_string()),
            (TaskStatus::Ready, None) if t.due_at > now => (
                now,
                t.due_at,
                "countdown",
                if t.attempts > 0 {
                    format!("retry {} after backoff", t.attempts + 1)
                } else {
                    "counting down".to_string()
                },
            ),
            (TaskStatus::Ready, None) => (now, now, "due", "due, waiting for a worker".into()),
            (TaskStatus::Failed, _) => (now, now, "failed", "failed".into()),
            (status, _) => (now, now, "due", format!("{status:?}").to_lowercase()),
        };
        lanes.push(Lane {
            label,
            wait_from: last.filter(|at| *at < from),
            from,
            to,
            class,
            note,
            link: None,
        });
    }
    if lanes.is_empty() {
        return html! { p class="muted" { "No steps yet." } };
    }
    let start = lanes
        .iter()
        .map(|l| l.wait_from.unwrap_or(l.from))
        .min()
        .unwrap_or(now);
    let end = lanes
        .iter()
        .map(|l| l.to)
        .chain(view.ended_at)
        .max()
        .unwrap_or(now)
        .max(start + 1);
    let x = |at: Micros| LABEL + AXIS * (at - start) as f64 / (end - start) as f64;
    let height = LANE * lanes.len() as f64 + 24.0;
    let width = LABEL + AXIS + 10.0;
    html! {
        svg class="timeline" id="timeline" xmlns="http://www.w3.org/2000/svg" role="img"
            width=(width) height=(height) viewBox={ "0 0 " (width) " " (height) } {
            title { "Timeline of " (view.name) }
            style { (TIMELINE_STYLE) }
            @for (i, l) in lanes.iter().enumerate() {
                @let y = LANE * i as f64;
                g class=(l.class) {
                    title { (l.label) ": " (l.note) }
                    @match &l.link {
                        Some(href) => a href=(href) { text x="4" y=(y + 14.0) { (l.label) } },
                        None => text x="4" y=(y + 14.0) { (l.label) },
                    }
                    @if let Some(w) = l.wait_from {
                        // Closed explicitly: in HTML, an SVG element is void only when it says so.
                        line class="wait" x1=(x(w)) x2=(x(l.from)) y1=(y + 10.0) y2=(y + 10.0) {}
                    }
                    rect class="bar" x=(x(l.from)) y=(y + 4.0) height="12"
                        width=((x(l.to) - x(l.from)).max(3.0)) rx="2" {}
                }
            }
            line class="axis" x1=(LABEL) x2=(LABEL + AXIS) y1=(height - 20.0) y2=(height - 20.0) {}
            text class="tick" x=(LABEL) y=(height - 6.0) { (super::layout::time(start)) }
            text class="tick" x=(LABEL + AXIS) y=(height - 6.0) text-anchor="end" { (super::layout::time(end)) }
        }
        p class="legend muted" {
            span class="swatch" style="background:#3b82f6;border-color:#3b82f6" {} "ran · "
            span class="swatch" style="background:#f59e0b;border-color:#f59e0b" {} "committed on a retry · "
            span class="swatch" style="background:transparent;border-color:#8b5cf6;border-style:dashed" {} "counting down (countdown or backoff) · "
            span class="swatch" style="background:#16a34a;border-color:#16a34a" {} "running now · "
            "— waiting before the step (queue, countdown, failed attempts' backoff). Bars link to the step."
        }
    }
}

/// The timeline's look: colours readable on light and dark pages.
const TIMELINE_STYLE: &str = "text{font:12px system-ui,sans-serif;fill:currentColor}\
.tick{fill:#6b7280}.axis{stroke:#6b7280}\
.wait{stroke:#9ca3af;stroke-width:1.5;stroke-dasharray:3 2}\
.ran .bar{fill:#3b82f6}.retried .bar{fill:#f59e0b}.running .bar{fill:#16a34a}\
.countdown .bar{fill:none;stroke:#8b5cf6;stroke-dasharray:4 2}\
.due .bar{fill:#9ca3af}.failed .bar{fill:#dc2626}\
a text{fill:#3b82f6;text-decoration:underline}";

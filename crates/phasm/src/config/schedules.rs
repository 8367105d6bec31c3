//! The `schedules:` list: instances started on a clock.
//!
//! Read here, entry by entry, with every problem at its position; the checks that need the
//! whole configuration (unique names, the machine exists) run in `load`'s last pass.

use std::time::Duration;

use super::read::{suggest, Cx, ObjSpans};
use super::yaml::{Node, NodeKind};
use crate::machine::{is_valid_name, MAX_NAME_LENGTH};
use crate::schedule::{parse_cron, Overlap, Schedule, Timing};

/// The keys of one schedule.
const KEYS: &[&str] = &[
    "name", "machine", "cron", "every", "timezone", "context", "overlap",
];

/// Read a `schedules:` list; each schedule comes with where its keys stand.
pub(super) fn read(cx: &mut Cx<'_>, node: &Node) -> Vec<(Schedule, ObjSpans)> {
    let NodeKind::Seq(items) = &node.kind else {
        if !node.is_null() {
            cx.error(
                node.span,
                format!(
                    "`schedules` must be a list of schedules, found {}",
                    node.describe()
                ),
                Some("each entry has a `name`, a `machine` and a `cron` or `every`".into()),
            );
        }
        return Vec::new();
    };
    items.iter().filter_map(|item| schedule(cx, item)).collect()
}

fn schedule(cx: &mut Cx<'_>, item: &Node) -> Option<(Schedule, ObjSpans)> {
    let f = cx.fields(item, "a schedule", KEYS)?;
    let spans = f.spans();
    let mut ok = true;
    let name = match f.get("name") {
        None => {
            cx.error(
                item.span,
                "a schedule needs a `name`",
                Some("its instances are named after it".into()),
            );
            None
        }
        Some(n) => match cx.string(n, "name") {
            Some(name) if is_valid_name(&name) => Some(name),
            Some(name) => {
                cx.error(
                    n.span,
                    format!("invalid schedule name `{name}`"),
                    Some(format!(
                        "use letters, digits and `-`, at most {MAX_NAME_LENGTH} characters"
                    )),
                );
                None
            }
            None => None,
        },
    };
    let machine = match f.get("machine") {
        None => {
            cx.error(item.span, "a schedule needs a `machine` to start", None);
            None
        }
        Some(n) => cx.string(n, "machine"),
    };
    let timing = match (f.get("cron"), f.get("every")) {
        (Some(_), Some(every)) => {
            cx.error(
                every.span,
                "a schedule has `cron` or `every`, not both",
                Some("remove one of them".into()),
            );
            None
        }
        (None, None) => {
            cx.error(
                item.span,
                "a schedule needs `cron` (e.g. `0 3 * * *`) or `every` (e.g. `10m`)",
                None,
            );
            None
        }
        (Some(n), None) => cron(cx, n),
        (None, Some(n)) => every(cx, n),
    };
    let timezone = match f.get("timezone") {
        None => Some(chrono_tz::Tz::UTC),
        Some(n) => {
            let zone = cx.string(n, "timezone")?;
            if let Ok(tz) = zone.parse::<chrono_tz::Tz>() {
                if matches!(timing, Some(Timing::Every(_))) {
                    cx.warning(
                        n.span,
                        "`timezone` has no effect with `every`",
                        Some("`every` ticks at multiples of its interval since midnight UTC; use `cron` for local times".into()),
                    );
                }
                Some(tz)
            } else {
                let names = chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name());
                let label = suggest(&zone, names).map_or_else(
                    || "use an IANA time-zone name such as `Europe/Paris` or `UTC`".to_string(),
                    |s| format!("did you mean `{s}`?"),
                );
                cx.error(n.span, format!("unknown time zone `{zone}`"), Some(label));
                None
            }
        }
    };
    let context = match f.get("context") {
        None => crate::context::Context::new(),
        Some(n) if n.is_null() => crate::context::Context::new(),
        Some(n) => {
            if let serde_json::Value::Object(map) = n.to_json() {
                map
            } else {
                cx.error(
                    n.span,
                    format!(
                        "`context` must be a mapping of keys to values, found {}",
                        n.describe()
                    ),
                    None,
                );
                ok = false;
                crate::context::Context::new()
            }
        }
    };
    let overlap = match f.get("overlap") {
        None => Some(Overlap::Skip),
        Some(n) => match cx.string(n, "overlap").as_deref() {
            Some("skip") => Some(Overlap::Skip),
            Some("allow") => Some(Overlap::Allow),
            Some(other) => {
                cx.error(
                    n.span,
                    format!("unknown `overlap` `{other}`"),
                    Some("use `skip` (not while the last instance runs) or `allow`".into()),
                );
                None
            }
            None => None,
        },
    };
    let schedule = Schedule {
        name: name?,
        machine: machine?,
        timing: timing?,
        timezone: timezone?,
        timezone_written: f.get("timezone").is_some(),
        context,
        overlap: overlap?,
    };
    ok.then_some((schedule, spans))
}

fn cron(cx: &mut Cx<'_>, node: &Node) -> Option<Timing> {
    let text = cx.string(node, "cron")?;
    match parse_cron(&text) {
        Ok(cron) => Some(Timing::Cron {
            expression: text,
            cron: Box::new(cron),
        }),
        Err(e) => {
            cx.error(
                node.span,
                format!("`{text}` is not a cron expression"),
                Some(e),
            );
            None
        }
    }
}

fn every(cx: &mut Cx<'_>, node: &Node) -> Option<Timing> {
    let every = cx.duration(node, "every")?;
    if every < Duration::from_secs(1) || every.subsec_nanos() != 0 {
        cx.error(
            node.span,
            "`every` must be a whole number of seconds, at least one",
            Some("e.g. `30s`, `10m`, `1h`".into()),
        );
        return None;
    }
    Some(Timing::Every(every))
}

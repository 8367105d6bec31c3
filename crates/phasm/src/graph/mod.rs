//! Drawings of one machine: Graphviz DOT, Mermaid, and SVG laid out in pure Rust.
//!
//! All three use one visual vocabulary, so a machine looks the same wherever it is drawn:
//! a start dot points at the initial state (which also has a thick green border), final
//! states lead to an end marker (or, in DOT, have a double border), continuation states are blue with a dashed "next page"
//! loop, fan-in states are amber and show their period, and every edge carries its event.

mod dot;
mod mermaid;
mod svg;

pub use dot::to_dot;
pub use mermaid::to_mermaid;
pub use svg::{to_svg, to_svg_annotated, to_svg_highlighting};

use crate::machine::{FanIn, Machine, State};

/// Border colour of the initial state.
const INITIAL_COLOR: &str = "#2e7d32";
/// Fill of continuation states.
const CONTINUATION_FILL: &str = "#dbeafe";
/// Fill of fan-in states.
const FAN_IN_FILL: &str = "#fef3c7";
/// Fill of waiting states (`wait:`).
const WAIT_FILL: &str = "#ede9fe";
/// Fill of the states an instance's branches are in now (the console's instance page).
const HIGHLIGHT_FILL: &str = "#fb923c";
/// Fill of every other state.
const PLAIN_FILL: &str = "#ffffff";
/// Label of a continuation state's loop edge.
const NEXT_PAGE: &str = "next page";

/// The actions of each state, as extra label lines for [`to_svg_annotated`]: `entry: NAME`,
/// `do: NAME`, `exit: NAME` (the console's "show actions" view).
pub fn action_notes(machine: &Machine) -> Vec<(&str, String)> {
    let mut notes = Vec::new();
    for s in &machine.states {
        for (label, name) in [("entry", &s.entry), ("do", &s.action), ("exit", &s.exit)] {
            if let Some(name) = name {
                notes.push((s.name.as_str(), format!("{label}: {name}")));
            }
        }
    }
    notes
}

/// One entry of a drawing's key: a state's look and what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegendEntry {
    /// The fill colour.
    pub fill: &'static str,
    /// The border colour.
    pub border: &'static str,
    /// What a state drawn so is.
    pub meaning: &'static str,
}

/// The key to a machine's drawing: the kinds of state it has (the initial one always),
/// and, with `highlighted`, the colour of the states an instance's branches are in.
pub fn legend(machine: &Machine, highlighted: bool) -> Vec<LegendEntry> {
    let plain = |fill, meaning| LegendEntry {
        fill,
        border: "#333333",
        meaning,
    };
    let mut key = vec![LegendEntry {
        fill: PLAIN_FILL,
        border: INITIAL_COLOR,
        meaning: "initial state (thick green border)",
    }];
    let has = |f: fn(&State) -> bool| machine.states.iter().any(f);
    if has(|s| s.continuation) {
        key.push(plain(
            CONTINUATION_FILL,
            "continuation: pages through data (dashed loop, ↻ next page)",
        ));
    }
    if has(|s| s.fan_in.is_some()) {
        key.push(plain(FAN_IN_FILL, "fan-in: joins branches"));
    }
    if has(|s| s.wait.is_some()) {
        key.push(plain(WAIT_FILL, "waits for events from outside"));
    }
    if highlighted {
        key.push(plain(HIGHLIGHT_FILL, "where branches are now"));
    }
    key
}

/// The second line of a state's label, naming what is special about it.
fn badge(state: &State) -> Option<String> {
    let mut parts = Vec::new();
    if state.continuation {
        parts.push("continuation".to_string());
    }
    match state.fan_in {
        Some(FanIn::All) => parts.push("fan-in: all".to_string()),
        Some(FanIn::Window(d)) => parts.push(format!("fan-in {}s", d.as_secs())),
        None => {}
    }
    if let Some(group) = &state.fan_in_group {
        parts.push(format!("by {group}"));
    }
    if let Some(wait) = &state.wait {
        parts.push(match wait.timeout {
            Some(d) => format!("waits, {} after {}", wait.timeout_event, short(d)),
            None => "waits".to_string(),
        });
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// A duration in its largest whole unit (`72h`, `90s`), for labels.
fn short(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if d.subsec_nanos() != 0 => format!("{}ms", d.as_millis()),
        0 => "0s".to_string(),
        _ if s % 86_400 == 0 => format!("{}d", s / 86_400),
        _ if s % 3_600 == 0 => format!("{}h", s / 3_600),
        _ if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// The fill of a state's box.
fn fill(state: &State) -> &'static str {
    if state.continuation {
        CONTINUATION_FILL
    } else if state.fan_in.is_some() {
        FAN_IN_FILL
    } else if state.wait.is_some() {
        WAIT_FILL
    } else {
        PLAIN_FILL
    }
}

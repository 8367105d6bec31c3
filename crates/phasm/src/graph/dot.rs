//! Graphviz DOT output.

use std::fmt::Write as _;

use super::{badge, fill, INITIAL_COLOR, NEXT_PAGE};
use crate::machine::Machine;

/// The machine as a Graphviz `digraph` (render with `dot -Tsvg`).
pub fn to_dot(machine: &Machine) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph {} {{", id(&machine.name));
    out.push_str("  rankdir=TB;\n");
    let _ = writeln!(out, "  label={}; labelloc=t;", id(&machine.name));
    out.push_str("  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];\n");
    out.push_str("  edge [fontname=\"Helvetica\", fontsize=11];\n");
    out.push_str("  \"__start\" [shape=point, width=0.15, label=\"\"];\n");
    for state in &machine.states {
        let mut label = state.name.clone();
        if let Some(b) = badge(state) {
            label.push('\n');
            label.push_str(&b);
        }
        let mut attrs = vec![
            format!("label={}", id(&label)),
            format!("fillcolor={}", id(fill(state))),
        ];
        if state.initial {
            attrs.push(format!("color={}, penwidth=2.5", id(INITIAL_COLOR)));
        }
        if state.is_final {
            attrs.push("peripheries=2".into());
        }
        let _ = writeln!(out, "  {} [{}];", id(&state.name), attrs.join(", "));
    }
    if let Some(initial) = machine.initial_state() {
        let _ = writeln!(out, "  \"__start\" -> {};", id(&initial.name));
    }
    for state in &machine.states {
        if state.continuation {
            let _ = writeln!(
                out,
                "  {0} -> {0} [label={1}, style=dashed];",
                id(&state.name),
                id(NEXT_PAGE)
            );
        }
        for t in &state.transitions {
            let _ = writeln!(
                out,
                "  {} -> {} [label={}];",
                id(&state.name),
                id(&t.to),
                id(&t.event)
            );
        }
    }
    out.push_str("}\n");
    out
}

/// A DOT quoted identifier (`\n` in a label becomes a line break).
fn id(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

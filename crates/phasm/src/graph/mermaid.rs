//! Mermaid `stateDiagram-v2` output (renders in GitHub, GitLab and most Markdown viewers).

use std::fmt::Write as _;

use super::{badge, INITIAL_COLOR, NEXT_PAGE};
use crate::machine::Machine;

/// The machine as a Mermaid state diagram. States get short ids (`s0`, `s1`, …) because
/// Mermaid ids cannot hold every character a state name may.
pub fn to_mermaid(machine: &Machine) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "---\ntitle: {}\n---", machine.name);
    out.push_str("stateDiagram-v2\n");
    let ids: Vec<String> = (0..machine.states.len()).map(|i| format!("s{i}")).collect();
    let id_of = |name: &str| {
        machine
            .states
            .iter()
            .position(|s| s.name == name)
            .map(|i| ids[i].clone())
    };
    for (state, sid) in machine.states.iter().zip(&ids) {
        let label = match badge(state) {
            Some(b) => format!("{} ({b})", state.name),
            None => state.name.clone(),
        };
        let _ = writeln!(
            out,
            "    state \"{}\" as {sid}",
            label.replace('"', "#quot;")
        );
    }
    if let Some(initial) = machine.initial_state().and_then(|s| id_of(&s.name)) {
        let _ = writeln!(out, "    [*] --> {initial}");
    }
    for (state, sid) in machine.states.iter().zip(&ids) {
        if state.continuation {
            let _ = writeln!(out, "    {sid} --> {sid} : {NEXT_PAGE}");
        }
        for t in &state.transitions {
            if let Some(to) = id_of(&t.to) {
                let _ = writeln!(out, "    {sid} --> {to} : {}", t.event);
            }
        }
        if state.is_final {
            let _ = writeln!(out, "    {sid} --> [*]");
        }
    }
    let _ = writeln!(
        out,
        "    classDef initial stroke:{INITIAL_COLOR},stroke-width:3px"
    );
    let _ = writeln!(
        out,
        "    classDef continuation fill:{}",
        super::CONTINUATION_FILL
    );
    let _ = writeln!(out, "    classDef fanin fill:{}", super::FAN_IN_FILL);
    if machine.states.iter().any(|s| s.wait.is_some()) {
        let _ = writeln!(out, "    classDef waiting fill:{}", super::WAIT_FILL);
    }
    for (state, sid) in machine.states.iter().zip(&ids) {
        if state.initial {
            let _ = writeln!(out, "    class {sid} initial");
        }
        if state.continuation {
            let _ = writeln!(out, "    class {sid} continuation");
        } else if state.fan_in.is_some() {
            let _ = writeln!(out, "    class {sid} fanin");
        } else if state.wait.is_some() {
            let _ = writeln!(out, "    class {sid} waiting");
        }
    }
    out
}

//! Rules that span several states and transitions of a machine: one initial state, known
//! targets, the fan-in and continuation restrictions, and reachability warnings.

use std::collections::{HashMap, HashSet, VecDeque};

use super::build::MachineSpans;
use super::read::{suggest, Cx};
use crate::machine::Machine;

/// Check one built machine; problems go to `cx`.
/// `errors_before` is the error count before the machine was built: reachability is only
/// checked when building and checking it found nothing wrong.
pub(crate) fn machine(cx: &mut Cx<'_>, m: &Machine, spans: &MachineSpans, errors_before: usize) {
    let name_span = spans.obj.value("name");
    let index = state_index(cx, m, spans);

    let initial: Vec<usize> = (0..m.states.len())
        .filter(|&i| m.states[i].initial)
        .collect();
    match initial.as_slice() {
        [] => cx.error(
            name_span,
            format!("{} has no initial state", label(m)),
            Some("mark the state where instances start with `initial: true`".into()),
        ),
        [_] => {}
        [first, rest @ ..] => {
            for &i in rest {
                cx.error(
                    spans.states[i].obj.value("initial"),
                    format!("{} has more than one initial state", label(m)),
                    Some(format!("`{}` is already initial", m.states[*first].name)),
                );
            }
        }
    }
    if !m.states.iter().any(|s| s.is_final) {
        cx.error(
            name_span,
            format!("{} has no final state", label(m)),
            Some("mark the states where instances may end with `final: true`".into()),
        );
    }

    for (i, s) in m.states.iter().enumerate() {
        let ss = &spans.states[i].obj;
        if s.wait.is_some() {
            check_wait(cx, s, ss);
        } else if s.action.is_none() && !s.is_final {
            cx.error(
                ss.value("name"),
                format!("state `{}` has no `action`", s.name),
                Some("add `action: NAME`, or mark the state `final: true`".into()),
            );
        } else if s.action.is_none() && s.continuation {
            cx.error(
                ss.key("continuation"),
                format!(
                    "continuation state `{}` has no `action` to page through its data",
                    s.name
                ),
                Some("add `action: NAME`".into()),
            );
        }
        if s.continuation && s.fan_in.is_some() {
            cx.error(
                ss.key("fan_in"),
                format!("state `{}` is both a continuation and a fan-in", s.name),
                Some("split it into a continuation state followed by a fan-in state".into()),
            );
        }
        if s.fan_in_group.is_some() && s.fan_in.is_none() {
            cx.error(
                ss.key("fan_in_group"),
                format!("state `{}` has `fan_in_group` but no `fan_in`", s.name),
                Some("add `fan_in: SECONDS` (or `all`), or remove `fan_in_group`".into()),
            );
        }
        if s.exit.is_some() && s.continuation {
            cx.error(
                ss.key("exit"),
                format!("continuation state `{}` cannot have an exit action", s.name),
                Some("each page leaves the state separately; move the work into a transition's target".into()),
            );
        }
        if s.exit.is_some() && s.fan_in.is_some() {
            cx.error(
                ss.key("exit"),
                format!("fan-in state `{}` cannot have an exit action", s.name),
                None,
            );
        }
        if s.continuation_countdown.is_some() && !s.continuation {
            cx.warning(
                ss.key("continuation_countdown"),
                format!(
                    "`continuation_countdown` has no effect: `{}` is not a continuation state",
                    s.name
                ),
                Some("add `continuation: true`, or remove this key".into()),
            );
        }

        let mut events: HashMap<&str, usize> = HashMap::new();
        for (j, t) in s.transitions.iter().enumerate() {
            let ts = &spans.states[i].transitions[j];
            if !t.event.is_empty() {
                if let Some(&first) = events.get(t.event.as_str()) {
                    cx.error(
                        ts.value("event"),
                        format!(
                            "state `{}` has two transitions on event `{}`",
                            s.name, t.event
                        ),
                        Some(format!(
                            "the first is on line {}",
                            spans.states[i].transitions[first].value("event").start.line
                        )),
                    );
                } else {
                    events.insert(&t.event, j);
                }
            }
            if t.to.is_empty() {
                continue;
            }
            let Some(&target_index) = index.get(t.to.as_str()) else {
                let label = match suggest(&t.to, m.states.iter().map(|s| s.name.as_str())) {
                    Some(near) => format!("did you mean `{near}`?"),
                    None => format!(
                        "states of {}: {}",
                        label(m),
                        m.states
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                cx.error(
                    ts.value("to"),
                    format!("transition to unknown state `{}`", t.to),
                    Some(label),
                );
                continue;
            };
            let target = &m.states[target_index];
            let roles: [(bool, &str); 4] = [
                (s.continuation, "from a continuation state"),
                (target.continuation, "to a continuation state"),
                (s.fan_in.is_some(), "from a fan-in state"),
                (target.fan_in.is_some(), "to a fan-in state"),
            ];
            if t.action.is_some() {
                for (applies, what) in roles {
                    if applies {
                        cx.error(
                            ts.key("action"),
                            format!("transition `{}--{}` cannot have an action: transition actions {what} are not supported", s.name, t.event),
                            Some("move the work into the target state's entry action".into()),
                        );
                    }
                }
            }
            if s.exit.is_some() && (target.continuation || target.fan_in.is_some()) {
                let kind = if target.continuation {
                    "continuation"
                } else {
                    "fan-in"
                };
                cx.error(
                    ss.key("exit"),
                    format!(
                        "state `{}` cannot have an exit action: its transition `{}` leads to {kind} state `{}`",
                        s.name, t.event, target.name
                    ),
                    None,
                );
            }
            if target.fan_in.is_some() && !t.effective.countdown.is_zero() {
                if t.countdown.is_some() {
                    cx.error(
                        ts.value("countdown"),
                        format!(
                            "transition `{}--{}` into fan-in state `{}` cannot have a countdown",
                            s.name, t.event, target.name
                        ),
                        Some("the fan-in's own `fan_in` period delays the join".into()),
                    );
                } else {
                    cx.error(
                        ts.value("to"),
                        format!("transition `{}--{}` into fan-in state `{}` inherits the machine's countdown", s.name, t.event, target.name),
                        Some(format!(
                            "a countdown cannot apply to a transition into a fan-in state: set `countdown: 0` here, or remove the machine's `countdown` (line {})",
                            spans.obj.value("countdown").start.line
                        )),
                    );
                }
            }
        }
    }
    // Reachability is only meaningful once the machine's own structure is sound.
    if cx.error_count() == errors_before {
        reachability(cx, m, spans, &index);
    }
}

/// A waiting state runs no main action, is not final, continuation or fan-in, has events to
/// wait for, and a transition for its timeout event.
fn check_wait(cx: &mut Cx<'_>, s: &crate::machine::State, ss: &super::read::ObjSpans) {
    let Some(wait) = &s.wait else {
        return;
    };
    let conflicts = [
        (s.action.is_some(), "action", "a main action"),
        (s.continuation, "continuation", "`continuation`"),
        (s.fan_in.is_some(), "fan_in", "`fan_in`"),
        (s.is_final, "final", "`final: true`"),
    ];
    for (applies, key, what) in conflicts {
        if applies {
            cx.error(
                ss.key(key),
                format!("waiting state `{}` cannot also have {what}", s.name),
                Some(
                    "a state either waits for an event from outside (`wait`) or runs an action; \
                     split it into two states"
                        .into(),
                ),
            );
        }
    }
    if s.transitions.is_empty() {
        cx.error(
            ss.key("wait"),
            format!(
                "waiting state `{}` has no transitions: no event could end its wait",
                s.name
            ),
            Some("add a transition for each event it waits for".into()),
        );
    } else if wait.timeout.is_some() && s.transition(&wait.timeout_event).is_none() {
        cx.error(
            ss.value("wait"),
            format!(
                "waiting state `{}` times out with event `{}`, which has no transition",
                s.name, wait.timeout_event
            ),
            Some(format!(
                "add a transition on `{}`, or name another event with `timeout_event`",
                wait.timeout_event
            )),
        );
    }
}

/// Map state names to their index, reporting duplicates.
fn state_index<'m>(
    cx: &mut Cx<'_>,
    m: &'m Machine,
    spans: &MachineSpans,
) -> HashMap<&'m str, usize> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, s) in m.states.iter().enumerate() {
        if s.name.is_empty() {
            continue;
        }
        if let Some(&first) = index.get(s.name.as_str()) {
            let first_line = spans.states[first].obj.value("name").start.line;
            cx.error(
                spans.states[i].obj.value("name"),
                format!("{} has two states named `{}`", label(m), s.name),
                Some(format!("the first is on line {first_line}")),
            );
        } else {
            index.insert(s.name.as_str(), i);
        }
    }
    index
}

/// Warn about states no instance can reach, and states from which no instance can end.
fn reachability(cx: &mut Cx<'_>, m: &Machine, spans: &MachineSpans, index: &HashMap<&str, usize>) {
    let Some(start) = m.states.iter().position(|s| s.initial) else {
        return;
    };
    let successors: Vec<Vec<usize>> = m
        .states
        .iter()
        .map(|s| {
            s.transitions
                .iter()
                .filter_map(|t| index.get(t.to.as_str()).copied())
                .collect()
        })
        .collect();
    let reachable = search(&[start], |i| successors[i].clone());
    let finals: Vec<usize> = (0..m.states.len())
        .filter(|&i| m.states[i].is_final)
        .collect();
    let mut predecessors = vec![Vec::new(); m.states.len()];
    for (from, succ) in successors.iter().enumerate() {
        for &to in succ {
            predecessors[to].push(from);
        }
    }
    let can_finish = search(&finals, |i| predecessors[i].clone());
    for (i, s) in m.states.iter().enumerate() {
        let span = spans.states[i].obj.value("name");
        if !reachable.contains(&i) {
            cx.warning(
                span,
                format!(
                    "state `{}` cannot be reached from the initial state `{}`",
                    s.name, m.states[start].name
                ),
                Some("no transition leads here".into()),
            );
        } else if !can_finish.contains(&i) {
            cx.warning(
                span,
                format!("no final state can be reached from state `{}`", s.name),
                Some("instances that get here can never complete".into()),
            );
        }
    }
}

fn search(starts: &[usize], next: impl Fn(usize) -> Vec<usize>) -> HashSet<usize> {
    let mut seen: HashSet<usize> = starts.iter().copied().collect();
    let mut queue: VecDeque<usize> = starts.iter().copied().collect();
    while let Some(i) = queue.pop_front() {
        for n in next(i) {
            if seen.insert(n) {
                queue.push_back(n);
            }
        }
    }
    seen
}

/// How messages name a machine: `machine `NAME``, or `this machine` when its name was invalid
/// (that error is reported on its own).
fn label(m: &Machine) -> String {
    if m.name.is_empty() {
        "this machine".to_string()
    } else {
        format!("machine `{}`", m.name)
    }
}

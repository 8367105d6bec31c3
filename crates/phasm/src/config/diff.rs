//! What changed from one version of a machine to another (`phasm diff`): its states,
//! transitions, action bindings, queue limits, `python:` section, schedules and machine-wide
//! settings, each added, removed or changed. Pure: it compares two loaded definitions.

use std::collections::BTreeMap;
use std::fmt::Debug;

use crate::machine::{Config, Machine, State, Transition};

/// How one part changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    /// Only in the newer version.
    Added,
    /// Only in the older version.
    Removed,
    /// In both, different.
    Changed,
}

impl ChangeKind {
    /// `+`, `-` or `~`.
    pub fn sign(self) -> char {
        match self {
            ChangeKind::Added => '+',
            ChangeKind::Removed => '-',
            ChangeKind::Changed => '~',
        }
    }

    /// `added`, `removed` or `changed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::Changed => "changed",
        }
    }
}

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Added, removed or changed.
    pub kind: ChangeKind,
    /// What: ``state `review` ``, ``transition `ship --done--> shipped` ``, ``action `Ship` ``,
    /// ``setting `retry` ``, ``queue `slow` ``, ``schedule `nightly` ``, `python`.
    pub what: String,
    /// For a change, how: `action: Some("Ship") → Some("ShipV2")`, one field after another.
    pub how: Vec<String>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.sign(), self.what)?;
        if !self.how.is_empty() {
            write!(f, ": {}", self.how.join("; "))?;
        }
        Ok(())
    }
}

/// The fields of `a` and `b` that differ, as `NAME: OLD → NEW`.
macro_rules! fields {
    ($a:expr, $b:expr; $($field:ident => $name:literal),* $(,)?) => {{
        let mut how = Vec::new();
        $(
            if $a.$field != $b.$field {
                how.push(format!("{}: {} → {}", $name, show(&$a.$field), show(&$b.$field)));
            }
        )*
        how
    }};
}

fn show<T: Debug>(v: &T) -> String {
    format!("{v:?}")
}

/// What changed from `old` to `new`, both the definitions (loaded) of machine `machine`;
/// empty when nothing did. In order: settings, states, transitions, actions, queues,
/// `python`, schedules.
pub fn diff(old: &Config, new: &Config, machine: &str) -> Vec<Change> {
    let mut changes = Vec::new();
    let (Some(a), Some(b)) = (old.machine(machine), new.machine(machine)) else {
        return changes;
    };
    let how = machine_settings(a, b);
    if !how.is_empty() {
        changes.push(Change {
            kind: ChangeKind::Changed,
            what: format!("machine `{machine}`"),
            how,
        });
    }
    keyed(
        &mut changes,
        by(&a.states, |s| s.name.clone()),
        by(&b.states, |s| s.name.clone()),
        |name| format!("state `{name}`"),
        state_fields,
    );
    keyed(
        &mut changes,
        transitions(a),
        transitions(b),
        |key| format!("transition `{key}`"),
        transition_fields,
    );
    keyed(
        &mut changes,
        old.actions.clone(),
        new.actions.clone(),
        |name| format!("action `{name}`"),
        |x, y| vec![format!("{} → {}", show(x), show(y))],
    );
    keyed(
        &mut changes,
        old.queues.clone(),
        new.queues.clone(),
        |name| format!("queue `{name}`"),
        |x, y| vec![format!("{} → {}", show(x), show(y))],
    );
    match (&old.python, &new.python) {
        (None, None) => {}
        (x, y) if x == y => {}
        (x, y) => changes.push(Change {
            kind: match (x, y) {
                (None, _) => ChangeKind::Added,
                (_, None) => ChangeKind::Removed,
                _ => ChangeKind::Changed,
            },
            what: "python".into(),
            how: match (x, y) {
                (Some(x), Some(y)) => vec![format!("{} → {}", show(x), show(y))],
                _ => Vec::new(),
            },
        }),
    }
    keyed(
        &mut changes,
        by(&old.schedules, |s| s.name.clone()),
        by(&new.schedules, |s| s.name.clone()),
        |name| format!("schedule `{name}`"),
        |x, y| vec![format!("{} → {}", show(x), show(y))],
    );
    changes
}

fn by<T: Clone>(items: &[T], key: impl Fn(&T) -> String) -> BTreeMap<String, T> {
    items.iter().map(|i| (key(i), i.clone())).collect()
}

/// Every transition of `m`, keyed `FROM --EVENT`: a changed target is a change of the
/// transition, not a removal and an addition.
fn transitions(m: &Machine) -> BTreeMap<String, Transition> {
    m.states
        .iter()
        .flat_map(|s| {
            s.transitions
                .iter()
                .map(move |t| (format!("{} --{}", s.name, t.event), t.clone()))
        })
        .collect()
}

/// Added and removed keys, and the keys in both whose values differ (`fields` says how).
fn keyed<T: PartialEq>(
    changes: &mut Vec<Change>,
    old: BTreeMap<String, T>,
    mut new: BTreeMap<String, T>,
    what: impl Fn(&str) -> String,
    fields: impl Fn(&T, &T) -> Vec<String>,
) {
    for (key, a) in old {
        match new.remove(&key) {
            None => changes.push(Change {
                kind: ChangeKind::Removed,
                what: what(&key),
                how: Vec::new(),
            }),
            Some(b) if a != b => changes.push(Change {
                kind: ChangeKind::Changed,
                what: what(&key),
                how: fields(&a, &b),
            }),
            Some(_) => {}
        }
    }
    for key in new.keys() {
        changes.push(Change {
            kind: ChangeKind::Added,
            what: what(key),
            how: Vec::new(),
        });
    }
}

fn machine_settings(a: &Machine, b: &Machine) -> Vec<String> {
    fields!(a, b;
        namespace => "namespace",
        queue => "queue",
        target => "target",
        countdown => "countdown",
        retry => "retry",
        context_types => "context_types",
        logging => "logging",
        use_run_once_semaphore => "use_run_once_semaphore",
    )
}

/// A state's own fields; its transitions are listed one by one.
fn state_fields(a: &State, b: &State) -> Vec<String> {
    fields!(a, b;
        namespace => "namespace",
        entry => "entry",
        action => "action",
        exit => "exit",
        initial => "initial",
        is_final => "final",
        continuation => "continuation",
        continuation_countdown => "continuation_countdown",
        fan_in => "fan_in",
        fan_in_group => "fan_in_group",
        wait => "wait",
    )
}

fn transition_fields(a: &Transition, b: &Transition) -> Vec<String> {
    fields!(a, b;
        to => "to",
        action => "action",
        namespace => "namespace",
        countdown => "countdown",
        queue => "queue",
        target => "target",
        retry => "retry",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, LoadOptions};

    const V1: &str = "actions:\n  Ship:\n    exec: [sh, ship.sh]\nstate_machines:\n- name: Order\n  states:\n  - name: approval\n    initial: true\n    wait: {timeout: 1h, timeout_event: expired}\n    transitions:\n    - event: approve\n      to: ship\n    - event: expired\n      to: ship\n  - name: ship\n    action: Ship\n    transitions:\n    - event: done\n      to: shipped\n  - name: shipped\n    final: true\n";

    fn config(text: &str) -> Config {
        load_str(text, "m.yaml", &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .config
    }

    #[test]
    fn renamed_states_changed_bindings_and_policies_are_listed() {
        let v2 = V1
            .replace("approval", "review")
            .replace("sh, ship.sh", "sh, ship2.sh")
            .replace(
                "    - event: done\n      to: shipped\n",
                "    - event: done\n      to: shipped\n      task_retry_limit: 3\n",
            );
        let lines: Vec<String> = diff(&config(V1), &config(&v2), "Order")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            lines.contains(&"- state `approval`".to_string()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"+ state `review`".to_string()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"- transition `approval --approve`".to_string()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"+ transition `review --expired`".to_string()),
            "{lines:#?}"
        );
        let retry = lines
            .iter()
            .find(|l| l.starts_with("~ transition `ship --done`: retry: "))
            .unwrap_or_else(|| panic!("{lines:#?}"));
        assert!(retry.contains("task_retry_limit: Some(3)"), "{retry}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("~ action `Ship`") && l.contains("ship2.sh")),
            "{lines:#?}"
        );
        assert!(diff(&config(V1), &config(V1), "Order").is_empty());
    }
}

//! Where a machine's instances are: the store's pending steps turned into the states their
//! branches are in (the console's machine page, `GET /api/machines/{m}/overview`).

use serde::Serialize;

use crate::clock::Micros;
use crate::machine::Machine;
use crate::store::StateCount;

/// Branches of running and failed instances in one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateTally {
    /// The state: the one a pending step enters (its action is what runs, or failed), or the
    /// one a branch waits in.
    pub state: String,
    /// Branches of running instances.
    pub running: u64,
    /// Branches of failed instances.
    pub failed: u64,
    /// When the oldest of their steps was queued.
    pub oldest: Micros,
}

/// The states the pending steps of `machine` are in, in the machine's order of states.
pub fn where_instances_are(machine: &Machine, counts: &[StateCount]) -> Vec<StateTally> {
    let mut tallies: Vec<StateTally> = Vec::new();
    for c in counts {
        let state = state_entered(machine, c.state.as_deref(), &c.event, c.waiting);
        match tallies.iter_mut().find(|t| t.state == state) {
            Some(t) => {
                t.running += c.running;
                t.failed += c.failed;
                t.oldest = t.oldest.min(c.oldest);
            }
            None => tallies.push(StateTally {
                state,
                running: c.running,
                failed: c.failed,
                oldest: c.oldest,
            }),
        }
    }
    let order = |name: &str| machine.states.iter().position(|s| s.name == name);
    tallies.sort_by_key(|t| (order(&t.state).unwrap_or(usize::MAX), t.state.clone()));
    tallies
}

/// The state a pending step's branch is in, given the state the step leaves (`None`: a
/// start step), its event and whether it is a wait: a wait's own state; otherwise the state
/// its transition enters (a start step enters the initial state).
pub(super) fn state_entered(
    machine: &Machine,
    from: Option<&str>,
    event: &str,
    waiting: bool,
) -> String {
    match from {
        Some(from) if waiting => from.to_string(),
        Some(from) => machine
            .state(from)
            .and_then(|s| s.transition(event))
            .map_or_else(|| from.to_string(), |t| t.to.clone()),
        None => machine
            .initial_state()
            .map_or_else(String::new, |s| s.name.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_counted_in_the_state_they_enter() {
        let config = crate::config::load_str(
            "state_machines:\n- name: M\n  states:\n  - name: a\n    initial: true\n    action: A\n    transitions:\n    - event: go\n      to: b\n  - name: b\n    wait: {}\n    transitions:\n    - event: ok\n      to: c\n  - name: c\n    final: true\n",
            "/tmp/fsm.yaml",
            &crate::config::LoadOptions::default(),
        )
        .expect("valid")
        .config;
        let m = &config.machines[0];
        let count = |state: Option<&str>, event: &str, waiting: bool, running: u64| StateCount {
            state: state.map(str::to_string),
            event: event.into(),
            waiting,
            running,
            failed: 1,
            oldest: running as i64,
        };
        let tallies = where_instances_are(
            m,
            &[
                count(Some("a"), "go", false, 5),
                count(Some("b"), "", true, 2),
                count(None, "pseudo-init", false, 3),
            ],
        );
        let got: Vec<(&str, u64, u64, i64)> = tallies
            .iter()
            .map(|t| (t.state.as_str(), t.running, t.failed, t.oldest))
            .collect();
        assert_eq!(got, [("a", 3, 1, 3), ("b", 7, 2, 2)]);
    }
}

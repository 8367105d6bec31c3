//! Moving an instance to a later version of its machine: whether every place its branches
//! are in exists in the target version (directly, or renamed by a map), and how its pending
//! tasks and parked branches are rewritten to it. Pure: a store reads the instance's
//! positions in the transaction that writes the answer.
//!
//! What must exist in the target:
//! - a pending dispatch's state and its transition (the event it dispatches);
//! - a waiting branch's state, still a waiting state (its deadline is kept; the events it
//!   accepts and its timeout event are the target's);
//! - a pending join's state and every state a branch is parked in, still fan-in states;
//! - a final exit's state.
//!
//! A start task (no state yet) enters the target's initial state, whatever it is.

use std::collections::BTreeMap;

use super::{countdown, task_name, Accept, TaskKind};
use crate::machine::Machine;

/// A pending task of the instance, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The task's id.
    pub task_id: i64,
    /// Its kind.
    pub kind: TaskKind,
    /// The state it leaves (or waits, joins or exits in); `None` for a start task.
    pub from_state: Option<String>,
    /// The event it dispatches.
    pub event: String,
    /// Its branch.
    pub branch: String,
    /// Its step number.
    pub step: u64,
}

/// How one pending task is rewritten.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    /// The task.
    pub task_id: i64,
    /// Its state in the target.
    pub from_state: Option<String>,
    /// Its event in the target (a wait's timeout event may differ).
    pub event: String,
    /// For a wait: the events the target state accepts (the stored `accepts` column).
    pub accepts: Option<Vec<Accept>>,
    /// For a wait whose target state has no timeout: [`super::NEVER`], so the old deadline
    /// does not dispatch an event the target has no transition for (else the deadline is
    /// kept).
    pub due_at: Option<crate::clock::Micros>,
}

/// What an upgrade writes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpgradePlan {
    /// The pending tasks, each rewritten (those that change and those that do not).
    pub tasks: Vec<Rewrite>,
    /// Parked branches' states renamed: `(old, new)`, only those that change.
    pub parked: Vec<(String, String)>,
}

/// Plan moving instance `instance`, whose pending tasks are `tasks` and whose parked branches
/// are in `parked_states`, to `target` (version `version` of its machine), renaming states
/// by `map` (`OLD → NEW`; a state not in the map keeps its name).
///
/// # Errors
/// Every reason it cannot move, each naming the state or transition and what to do.
pub fn plan_upgrade(
    instance: &str,
    target: &Machine,
    version: u32,
    map: &BTreeMap<String, String>,
    tasks: &[Position],
    parked_states: &[String],
    rng: &mut fastrand::Rng,
) -> Result<UpgradePlan, Vec<String>> {
    let mut problems = Vec::new();
    let mut plan = UpgradePlan::default();
    let renamed = |s: &str| map.get(s).cloned().unwrap_or_else(|| s.to_string());
    let missing = |s: &str| {
        if map.contains_key(s) {
            format!(
                "state `{s}` is mapped to `{}`, which is not in v{version}",
                renamed(s)
            )
        } else {
            format!("state `{s}` is not in v{version}: map it with `--map {s}=NEW`")
        }
    };
    for p in tasks {
        let Some(old) = &p.from_state else {
            plan.tasks.push(Rewrite {
                task_id: p.task_id,
                from_state: None,
                event: p.event.clone(),
                accepts: None,
                due_at: None,
            });
            continue;
        };
        let new = renamed(old);
        let Some(state) = target.state(&new) else {
            problems.push(missing(old));
            continue;
        };
        let mut rewrite = Rewrite {
            task_id: p.task_id,
            from_state: Some(new.clone()),
            event: p.event.clone(),
            accepts: None,
            due_at: None,
        };
        match p.kind {
            TaskKind::Dispatch => {
                if state.transition(&p.event).is_none() {
                    problems.push(format!(
                        "a pending step dispatches `{}` from state `{old}`, and state `{new}` of v{version} has no transition for it",
                        p.event
                    ));
                }
            }
            TaskKind::Wait => {
                let Some(wait) = &state.wait else {
                    problems.push(format!(
                        "a branch waits in state `{old}`, and state `{new}` of v{version} is not a waiting state"
                    ));
                    continue;
                };
                let timeout =
                    wait.timeout.is_some() && state.transition(&wait.timeout_event).is_some();
                if timeout {
                    rewrite.event = wait.timeout_event.clone();
                } else {
                    rewrite.event = String::new();
                    rewrite.due_at = Some(super::NEVER);
                }
                rewrite.accepts = Some(
                    state
                        .transitions
                        .iter()
                        .map(|t| Accept {
                            event: t.event.clone(),
                            name: task_name(instance, &p.branch, &new, &t.event, &t.to, p.step),
                            queue: t.effective.queue.clone(),
                            target: t.effective.target.clone(),
                            delay: countdown(&t.effective, rng),
                        })
                        .collect(),
                );
            }
            TaskKind::Join => {
                if !state.is_fan_in() {
                    problems.push(format!(
                        "branches are joined at state `{old}`, and state `{new}` of v{version} is not a fan-in state"
                    ));
                }
            }
            TaskKind::FinalExit => {
                if !state.is_final {
                    problems.push(format!(
                        "a branch ended in state `{old}`, and state `{new}` of v{version} is not final"
                    ));
                }
            }
        }
        plan.tasks.push(rewrite);
    }
    for old in parked_states {
        let new = renamed(old);
        match target.state(&new) {
            None => problems.push(missing(old)),
            Some(s) if !s.is_fan_in() => problems.push(format!(
                "branches are parked at state `{old}`, and state `{new}` of v{version} is not a fan-in state"
            )),
            Some(_) if new != *old => plan.parked.push((old.clone(), new)),
            Some(_) => {}
        }
    }
    problems.sort();
    problems.dedup();
    if problems.is_empty() {
        Ok(plan)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, LoadOptions};

    const V2: &str = "state_machines:\n- name: Order\n  states:\n  - name: start\n    initial: true\n    action: A\n    transitions:\n    - event: next\n      to: review\n  - name: review\n    wait: {timeout: 1h, timeout_event: late}\n    transitions:\n    - event: approved\n      to: done\n    - event: late\n      to: done\n  - name: done\n    final: true\n";

    fn target() -> Machine {
        load_str(V2, "m.yaml", &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .config
            .machines
            .remove(0)
    }

    fn wait_in(state: &str) -> Position {
        Position {
            task_id: 3,
            kind: TaskKind::Wait,
            from_state: Some(state.into()),
            event: "expired".into(),
            branch: String::new(),
            step: 2,
        }
    }

    fn plan(
        map: &[(&str, &str)],
        tasks: &[Position],
        parked: &[&str],
    ) -> Result<UpgradePlan, Vec<String>> {
        let map = map
            .iter()
            .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
            .collect();
        let parked: Vec<String> = parked.iter().map(|s| (*s).to_string()).collect();
        plan_upgrade(
            "o1",
            &target(),
            3,
            &map,
            tasks,
            &parked,
            &mut fastrand::Rng::with_seed(1),
        )
    }

    #[test]
    fn a_state_missing_from_the_target_is_refused_with_the_map_to_give() {
        let refused = plan(&[], &[wait_in("approval")], &[]).unwrap_err();
        assert_eq!(
            refused,
            ["state `approval` is not in v3: map it with `--map approval=NEW`"]
        );
        let refused = plan(&[("approval", "nope")], &[wait_in("approval")], &[]).unwrap_err();
        assert_eq!(
            refused,
            ["state `approval` is mapped to `nope`, which is not in v3"]
        );
    }

    #[test]
    fn a_mapped_wait_takes_the_target_states_events_and_keeps_its_task() {
        let planned = plan(&[("approval", "review")], &[wait_in("approval")], &[]).unwrap();
        let wait = &planned.tasks[0];
        assert_eq!(wait.task_id, 3);
        assert_eq!(wait.from_state.as_deref(), Some("review"));
        assert_eq!(wait.event, "late", "the target's timeout event");
        let accepts = wait.accepts.as_ref().unwrap();
        let events: Vec<&str> = accepts.iter().map(|a| a.event.as_str()).collect();
        assert_eq!(events, ["approved", "late"]);
        assert_eq!(accepts[0].name, "o1--review--approved--done--step-2");
    }

    #[test]
    fn a_wait_moved_to_a_state_without_a_timeout_never_times_out() {
        let no_timeout = V2.replace("wait: {timeout: 1h, timeout_event: late}", "wait: {}");
        let target = load_str(&no_timeout, "m.yaml", &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .config
            .machines
            .remove(0);
        let map = [("approval".to_string(), "review".to_string())].into();
        let planned = plan_upgrade(
            "o1",
            &target,
            3,
            &map,
            &[wait_in("approval")],
            &[],
            &mut fastrand::Rng::with_seed(1),
        )
        .unwrap();
        assert_eq!(planned.tasks[0].event, "");
        assert_eq!(planned.tasks[0].due_at, Some(crate::engine::NEVER));
        let kept = plan(&[("approval", "review")], &[wait_in("approval")], &[]).unwrap();
        assert_eq!(
            kept.tasks[0].due_at, None,
            "a timeout in the target keeps the deadline"
        );
    }

    #[test]
    fn a_pending_dispatch_needs_its_transition_and_parked_branches_a_fan_in() {
        let dispatch = Position {
            task_id: 4,
            kind: TaskKind::Dispatch,
            from_state: Some("start".into()),
            event: "go".into(),
            branch: String::new(),
            step: 1,
        };
        let refused = plan(&[], std::slice::from_ref(&dispatch), &["review"]).unwrap_err();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].contains("no transition for it"), "{refused:?}");
        assert!(refused[1].contains("is not a fan-in state"), "{refused:?}");
        let ok = Position {
            event: "next".into(),
            ..dispatch
        };
        let start = Position {
            task_id: 5,
            from_state: None,
            event: "start".into(),
            ..ok.clone()
        };
        let planned = plan(&[], &[ok, start], &[]).unwrap();
        assert_eq!(planned.tasks.len(), 2);
        assert!(planned.parked.is_empty());
    }
}

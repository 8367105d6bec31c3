//! The reference model: what the committed transitions of an instance may be, given its
//! machine. Every transition is checked, not only where the instance ended.
//!
//! A history row is the transition a task made, committed with its step: `None
//! -pseudo-init-> S` starts a line of work in the initial state (the instance's start, a
//! continuation's next page, a run again after a reset), `A -e-> B` is a step of `A` that
//! dispatched `e`, and `F -fan-in-> F` is a join of fan-in state `F` running. Per instance,
//! in commit order:
//! - each transition follows the machine: a start enters the initial state; any other
//!   leaves a state by an event it declares, into the state that event leads to; a join
//!   leaves and enters a fan-in state;
//! - each branch is one path: a transition leaves the state the branch's last one entered;
//!   a forked branch (`PARENT.fSTEP-K`) begins with the transition its parent made at that
//!   step; a join's branch (`jN`) begins with the join; a page's branch (`…pSTEP-K`) with a
//!   start; nothing follows the end of a branch; only a reset starts the main line again,
//!   and the run again is checked as a new one;
//! - no step commits twice: one transition per task, branch and pair of states;
//! - an instance that completed ended a branch in a final state.

use std::collections::{BTreeMap, BTreeSet};

use phasm::machine::Machine;
use phasm::store::{HistoryRow, InstanceStatus};

/// The event of a transition that starts a line of work in the initial state.
const START: &str = "pseudo-init";
/// The event of a join.
const JOIN: &str = "fan-in";

/// Check `rows` (an instance's history, in commit order) against `machine`, and `status`
/// against where its branches ended.
///
/// # Errors
/// What broke the model, and where.
pub fn check(machine: &Machine, status: InstanceStatus, rows: &[HistoryRow]) -> Result<(), String> {
    let mut once = BTreeSet::new();
    // Where each branch is: the last transition on it, and whether it ended.
    let mut branches: BTreeMap<&str, (Vec<&HistoryRow>, bool)> = BTreeMap::new();
    let mut ended_final = false;
    for (i, row) in rows.iter().enumerate() {
        let h = &row.entry;
        let here = || {
            format!(
                "transition {i} (row {}, {:?} -{}-> {}, branch `{}`, task {})",
                row.id, h.from, h.event, h.to, h.branch, h.task
            )
        };
        let Some(to) = machine.state(&h.to) else {
            return Err(format!("{}: no state {}", here(), h.to));
        };
        // The transition follows the machine.
        match &h.from {
            None => {
                if !to.initial || h.event != START {
                    return Err(format!("{}: a start must enter the initial state", here()));
                }
            }
            Some(from) if h.event == JOIN => {
                if *from != h.to || !to.is_fan_in() {
                    return Err(format!("{}: a join stays in a fan-in state", here()));
                }
            }
            Some(from) => {
                let Some(state) = machine.state(from) else {
                    return Err(format!("{}: no state {from}", here()));
                };
                match state.transition(&h.event) {
                    Some(t) if t.to == h.to => {}
                    Some(t) => {
                        return Err(format!(
                            "{}: {from} -{}-> leads to {}",
                            here(),
                            h.event,
                            t.to
                        ))
                    }
                    None => return Err(format!("{}: {from} has no event {}", here(), h.event)),
                }
            }
        }
        // A second start of a branch is a run again after a reset (its task says so): the
        // instance's branches and steps begin anew.
        if h.from.is_none() && branches.contains_key(h.branch.as_str()) {
            if !h.branch.is_empty() || !h.task.contains("--reset-") {
                return Err(format!("{}: started twice", here()));
            }
            branches.clear();
            once.clear();
        }
        // The branch is one path.
        match branches.get(h.branch.as_str()) {
            Some((_, true)) if h.from.is_some() => {
                return Err(format!("{}: after the branch ended", here()));
            }
            Some((path, _))
                if h.from.is_some() && h.from.as_deref() != path.last().map(|r| r.to.as_str()) =>
            {
                return Err(format!(
                    "{}: the branch was in {:?}, not {:?}",
                    here(),
                    path.last().map(|r| &r.to),
                    h.from
                ));
            }
            Some(_) => {}
            None => begins(&h.branch, row, &branches).map_err(|e| format!("{}: {e}", here()))?,
        }
        let path = branches.entry(&h.branch).or_default();
        path.0.push(row);
        path.1 = h.ends_branch;
        if h.ends_branch && to.is_final {
            ended_final = true;
        }
        if !once.insert((
            h.task.as_str(),
            h.branch.as_str(),
            h.from.as_deref(),
            h.to.as_str(),
        )) {
            return Err(format!("{}: committed twice", here()));
        }
    }
    if status == InstanceStatus::Completed && !ended_final {
        return Err("completed, but no branch ended in a final state".into());
    }
    Ok(())
}

/// Check the first transition `row` of branch `branch`.
fn begins(
    branch: &str,
    row: &HistoryRow,
    branches: &BTreeMap<&str, (Vec<&HistoryRow>, bool)>,
) -> Result<(), String> {
    let h = &row.entry;
    let (parent, own) = branch.rsplit_once('.').unwrap_or(("", branch));
    if branch.is_empty() || own.starts_with('p') {
        // The main line, or a continuation's page: a start.
        if h.from.is_some() {
            return Err("a line of work begins with a start".into());
        }
    } else if own.starts_with('j') {
        if h.event != JOIN {
            return Err("a join's branch begins with the join".into());
        }
    } else if let Some(step) = own.strip_prefix('f').and_then(|s| s.split_once('-')) {
        // A fork at step S: the parent's step S - 1 entered the state the branch leaves.
        let step: u64 = step.0.parse().map_err(|_| format!("branch {branch}"))?;
        if row.step != Some(step) {
            return Err(format!("forked at step {step}, recorded at {:?}", row.step));
        }
        let forked = branches.get(parent).is_some_and(|(path, _)| {
            path.iter()
                .any(|r| r.step == Some(step - 1) && Some(r.to.as_str()) == h.from.as_deref())
        });
        if !forked {
            return Err(format!(
                "branch `{parent}` made no step {} into {:?} to fork from",
                step - 1,
                h.from
            ));
        }
    } else {
        return Err(format!("no such kind of branch: {branch}"));
    }
    Ok(())
}

//! Running an instance again from a step of its history (Temporal's "reset"): the step is
//! queued again with the context it was given, and the instance's pending work is dropped.

use crate::clock::Clock;
use crate::engine::{self, task_name, NewTask, TaskKind, PSEUDO_FINAL, PSEUDO_INIT};
use crate::machine::{Config, Machine};
use crate::store::{Control, HistoryRow, Store, StoreError};

/// Why an instance was not reset.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// No instance has that name.
    #[error("no instance named `{0}`")]
    NotFound(String),
    /// The instance has no such step.
    #[error("instance `{instance}` has no step {step} in its history; its history pages list the steps with their ids")]
    NoStep {
        /// The instance.
        instance: String,
        /// The step's id asked for.
        step: i64,
    },
    /// The step ran on a branch forked from the main line.
    #[error("step {step} of `{instance}` ran on branch `{branch}`; a reset runs the instance again from a step of its main line: choose the step that forked the branch, or one before it")]
    OnBranch {
        /// The instance.
        instance: String,
        /// The step.
        step: i64,
        /// Its branch.
        branch: String,
    },
    /// Other branches were in flight alongside the step: running again from it would drop
    /// them (a fan-in would then join fewer branches than the run had).
    #[error("step {step} of `{instance}` ran while other branches were in flight ({branches}); running again from it would drop them: choose a step before they were forked, or after they were joined")]
    Alongside {
        /// The instance.
        instance: String,
        /// The step.
        step: i64,
        /// Some of the branches, named.
        branches: String,
    },
    /// The step's input was not kept: a join (its input is the parked branches), or a step
    /// recorded before history kept contexts.
    #[error("step {step} of `{instance}` cannot run again: {why}; choose another step")]
    NoInput {
        /// The instance.
        instance: String,
        /// The step.
        step: i64,
        /// Why its input is unknown.
        why: &'static str,
    },
    /// The machine, or the step's transition, is not in the configuration the server runs.
    #[error("step {step} of `{instance}` left `{from}` on `{event}`, which machine `{machine}` of this configuration has no transition for: {hint}")]
    NotInMachine {
        /// The instance.
        instance: String,
        /// The step.
        step: i64,
        /// Its machine.
        machine: String,
        /// The state it left.
        from: String,
        /// The event.
        event: String,
        /// What to do.
        hint: &'static str,
    },
    /// The version the instance runs on is stored, but this phasm cannot read it.
    #[error(transparent)]
    Unreadable(#[from] crate::config::UnreadableDefinition),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Run instance `name` again from its history's step `step` (an id from its history): in one
/// store transaction, its pending work is dropped and that step is queued again with the
/// context it was given (see [`crate::store::AdminStore::reset`]); the instance is running.
/// Only a step of the main line (not of a forked branch) can be chosen, and not a join. A
/// continuation step runs again from its first page (the page's token is not kept).
///
/// # Errors
/// [`ResetError`]: what was wrong with the choice, or the store's error.
pub async fn reset(
    store: &dyn Store,
    config: &Config,
    clock: &dyn Clock,
    name: &str,
    step: i64,
) -> Result<String, ResetError> {
    let Some(detail) = store.step(name, step).await? else {
        return match store.instance(name).await? {
            None => Err(ResetError::NotFound(name.to_string())),
            Some(_) => Err(ResetError::NoStep {
                instance: name.to_string(),
                step,
            }),
        };
    };
    let row = &detail.row;
    if !is_whole_line(&row.branch) {
        return Err(ResetError::OnBranch {
            instance: name.to_string(),
            step,
            branch: row.branch.clone(),
        });
    }
    let (Some(context), Some(number)) = (detail.given, row.step) else {
        return Err(ResetError::NoInput {
            instance: name.to_string(),
            step,
            why: "its input was not kept (a fan-in's join takes the parked branches, and steps recorded before history kept contexts have none)",
        });
    };
    let view = store
        .instance(name)
        .await?
        .ok_or_else(|| ResetError::NotFound(name.to_string()))?;
    let mut lines = Lines::default();
    crate::store::for_each_transition(store, name, |h| lines.add(h)).await?;
    let pending: Vec<&str> = view.tasks.iter().map(|t| t.branch.as_str()).collect();
    let alongside = lines.alongside(row, &pending);
    if !alongside.is_empty() {
        let mut named: Vec<&str> = alongside.iter().take(5).map(String::as_str).collect();
        if alongside.len() > 5 {
            named.push("…");
        }
        return Err(ResetError::Alongside {
            instance: name.to_string(),
            step,
            branches: named.join(", "),
        });
    }
    let not_in_machine = |hint| ResetError::NotInMachine {
        instance: name.to_string(),
        step,
        machine: view.machine.clone(),
        from: row.from.clone().unwrap_or_else(|| PSEUDO_INIT.into()),
        event: row.event.clone(),
        hint,
    };
    // The step is built again from the version the instance runs on, as stored; `config`
    // answers for an instance started before its machine was ever deployed.
    let pinned: Option<Config> =
        super::versions::version_config::<ResetError>(store, &view.machine, view.version).await?;
    let Some(machine) = pinned
        .as_ref()
        .or(Some(config))
        .and_then(|c| c.machine(&view.machine))
    else {
        return Err(not_in_machine(
            "the machine is not in the files this server was started with",
        ));
    };
    let now = clock.now();
    let mut task = again(machine, name, row.from.as_deref(), &row.event, number, now)
        .ok_or_else(|| not_in_machine("the machine changed since the step ran"))?;
    task.context = context;
    // A new name: an action that keys its side effects on the task's name runs again.
    task.name = format!("{}--reset-{now}", task.name);
    let note = format!(
        "reset by an operator: running again from step {step} ({} → {} on `{}`)",
        row.from.as_deref().unwrap_or("start"),
        row.to,
        row.event
    );
    match store.reset(now, name, &task, &note).await? {
        Control::Done => Ok(note),
        Control::NotFound | Control::NotAllowed(_) => Err(ResetError::NotFound(name.to_string())),
    }
}

/// The task that runs a step again: leave `from` on `event` as step `number` of the main
/// line (no context yet). `None` when the machine has no such transition.
fn again(
    machine: &Machine,
    instance: &str,
    from: Option<&str>,
    event: &str,
    number: u64,
    now: crate::clock::Micros,
) -> Option<NewTask> {
    let Some(from) = from else {
        return Some(engine::start_task(
            machine,
            instance,
            Default::default(),
            now,
        ));
    };
    let state = machine.state(from)?;
    let (to, kind, policy) = if event == PSEUDO_FINAL {
        // The exit of a final state: its queue is the one of a transition into it.
        let into = machine
            .transition_into(from)
            .map_or(&machine.start_policy, |t| &t.effective);
        (PSEUDO_FINAL, TaskKind::FinalExit, into)
    } else {
        let t = state.transition(event)?;
        (t.to.as_str(), TaskKind::Dispatch, &t.effective)
    };
    Some(NewTask {
        name: task_name(instance, "", from, event, to, number),
        from_state: Some(from.to_string()),
        event: event.to_string(),
        kind,
        context: Default::default(),
        step: number,
        branch: String::new(),
        queue: policy.queue.clone(),
        target: policy.target.clone(),
        due_at: now,
        token: None,
    })
}

/// A line the whole instance runs on: the main line (`""`), or the line a join continues
/// (`jN`); a reset can run again only from a step of one. A forked branch's name has a fork
/// part (`f3-1`, `j7.f2-1`).
pub fn is_whole_line(branch: &str) -> bool {
    branch.is_empty() || (!branch.contains('.') && branch.starts_with('j'))
}

/// The parent of a forked branch and the step that forked it (`j7.f2-1` → (`j7`, 2)).
fn forked_from(branch: &str) -> Option<(&str, u64)> {
    let (parent, part) = match branch.rsplit_once('.') {
        Some((parent, part)) => (parent, part),
        None => ("", branch),
    };
    let step = part.strip_prefix('f')?.split('-').next()?.parse().ok()?;
    Some((parent, step))
}

/// What history says of each branch, read once: enough to tell which branches were in flight
/// when a step ran.
#[derive(Debug, Default)]
struct Lines {
    /// Per branch: its rows as (id, state entered, ended its branch).
    rows: std::collections::BTreeMap<String, Vec<(i64, String, bool)>>,
    /// The joins: (id, fan-in state).
    joins: Vec<(i64, String)>,
    /// The first row of each run since a reset (the reset step's own row), in order: a
    /// run's branches reuse the names of the run before it, so a step is judged by the rows
    /// of its own run alone.
    runs: Vec<i64>,
}

/// Whether `task` is the name of a step a reset queued again (`…--step-N--reset-T`).
fn is_reset_task(task: &str) -> bool {
    task.rsplit_once("--reset-")
        .is_some_and(|(_, t)| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
}

impl Lines {
    fn add(&mut self, h: &HistoryRow) {
        if is_reset_task(&h.task) {
            self.runs.push(h.id);
        }
        self.rows
            .entry(h.branch.clone())
            .or_default()
            .push((h.id, h.to.clone(), h.ends_branch));
        if h.event == engine::FAN_IN_EVENT {
            self.joins.push((h.id, h.to.clone()));
        }
    }

    /// The branches in flight alongside step `s` (other than its own line): started before it
    /// and neither ended nor joined by then, or forked from its line before it; `pending`:
    /// the branches of the pending steps (a forked branch may not have run yet).
    fn alongside(&self, s: &HistoryRow, pending: &[&str]) -> Vec<String> {
        // A branch `f{k}-…` is forked by its parent's step k - 1 (it begins as step k): before
        // the step when k - 1 < its step, by the step itself when k - 1 = its step.
        let step = s.step.unwrap_or(0);
        let forked_before =
            |b: &str| forked_from(b).is_some_and(|(parent, k)| parent == s.branch && k <= step);
        // The run the step belongs to: from the reset that began it to the next reset.
        let first = self.runs.iter().rev().find(|id| **id <= s.id).copied();
        let next = self.runs.iter().find(|id| **id > s.id).copied();
        let in_run = |id: i64| first.is_none_or(|f| id >= f) && next.is_none_or(|n| id < n);
        let mut found = Vec::new();
        for (branch, rows) in &self.rows {
            if *branch == s.branch {
                continue;
            }
            let rows: Vec<_> = rows.iter().filter(|(id, _, _)| in_run(*id)).collect();
            if rows.is_empty() {
                continue;
            }
            let before: Vec<_> = rows.iter().filter(|(id, _, _)| *id < s.id).collect();
            let in_flight = match before.last() {
                // Ran before the step: in flight unless it ended or was joined by then.
                Some((last, state, ended)) => {
                    let settled = *ended
                        || self
                            .joins
                            .iter()
                            .any(|(id, at)| at == state && *id > *last && *id < s.id);
                    !settled || rows.len() > before.len()
                }
                // Ran only after: in flight if it was forked from the step's line before it.
                None => forked_before(branch),
            };
            if in_flight {
                found.push(branch.clone());
            }
        }
        // Pending work belongs to the latest run.
        let latest = next.is_none();
        for b in pending {
            let ran = self
                .rows
                .get(*b)
                .is_some_and(|rows| rows.iter().any(|(id, _, _)| in_run(*id)));
            if latest && *b != s.branch && !ran && forked_before(b) {
                found.push((*b).to_string());
            }
        }
        found.sort();
        found.dedup();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::HistoryEntry;

    fn row(id: i64, branch: &str, step: u64, to: &str, event: &str, ends: bool) -> HistoryRow {
        HistoryRow {
            id,
            step: Some(step),
            entry: HistoryEntry {
                from: None,
                event: event.into(),
                to: to.into(),
                attempt: 0,
                started_at: 0,
                finished_at: 0,
                task: String::new(),
                branch: branch.into(),
                ends_branch: ends,
            },
        }
    }

    /// The order demo: main forks two items at `split` (step 2), each branch and main pack
    /// and park at `ship`, the join continues on `j9` to `done`.
    fn forked() -> (Lines, Vec<HistoryRow>) {
        let rows = vec![
            row(1, "", 0, "received", "pseudo-init", false),
            row(2, "", 1, "payment", "ok", false),
            row(3, "", 2, "split", "paid", false),
            row(4, "f3-1", 3, "pack", "item", false),
            row(5, "f3-1", 3, "ship", "item", false),
            row(6, "", 3, "pack", "item", false),
            row(7, "", 3, "ship", "item", false),
            row(8, "f3-2", 3, "pack", "item", false),
            row(9, "f3-2", 3, "ship", "item", false),
            row(10, "j9", 4, "ship", "fan-in", false),
            row(11, "j9", 5, "done", "shipped", true),
        ];
        let mut lines = Lines::default();
        rows.iter().for_each(|r| lines.add(r));
        (lines, rows)
    }

    #[test]
    fn a_reset_is_refused_while_other_branches_were_in_flight() {
        let (lines, rows) = forked();
        // Before the fork, and the fork itself: nothing else in flight.
        for id in [1, 2, 3] {
            assert!(lines.alongside(&rows[id - 1], &[]).is_empty(), "step {id}");
        }
        // The main line after the fork runs alongside its forked items.
        assert_eq!(lines.alongside(&rows[5], &[]), ["f3-1", "f3-2"]);
        // After the join, the join's line is alone again.
        assert!(lines.alongside(&rows[10], &[]).is_empty());
        // A fork still counting down (no history yet) counts too, but not one the step made.
        let mut early = Lines::default();
        rows[..3].iter().for_each(|r| early.add(r));
        let after_split = row(6, "", 3, "pack", "item", false);
        assert_eq!(early.alongside(&after_split, &["f3-1"]), ["f3-1"]);
        assert!(
            early.alongside(&rows[2], &["f3-1"]).is_empty(),
            "forked by step 3 itself"
        );
    }

    /// After a reset to the fork (step 3), the rerun forks the same branch names again: its
    /// own steps are judged by its own rows, and the first run's steps by theirs.
    #[test]
    fn a_rerun_is_judged_by_its_own_rows() {
        let (mut lines, mut rows) = forked();
        let mut again = vec![
            row(12, "", 2, "split", "paid", false),
            row(13, "f3-1", 3, "pack", "item", false),
            row(14, "", 3, "pack", "item", false),
            row(15, "f3-1", 3, "ship", "item", false),
            row(16, "", 3, "ship", "item", false),
            row(17, "f3-2", 3, "pack", "item", false),
            row(18, "f3-2", 3, "ship", "item", false),
            row(19, "j19", 4, "ship", "fan-in", false),
            row(20, "j19", 5, "done", "shipped", true),
        ];
        again[0].entry.task = "o--payment--paid--split--step-2--reset-1800000000000000".into();
        again.iter().for_each(|r| lines.add(r));
        rows.extend(again);
        let at = |id: i64| &rows[usize::try_from(id - 1).unwrap()];
        // The rerun's fork, and the step after its join, can be reset again.
        assert!(lines.alongside(at(12), &[]).is_empty());
        assert!(lines.alongside(at(20), &[]).is_empty());
        // The rerun's main line after its fork ran alongside the rerun's items.
        assert_eq!(lines.alongside(at(14), &[]), ["f3-1", "f3-2"]);
        // The first run is judged as before.
        assert!(lines.alongside(at(3), &[]).is_empty());
        assert_eq!(lines.alongside(at(6), &[]), ["f3-1", "f3-2"]);
        assert!(lines.alongside(at(11), &[]).is_empty());
        assert!(is_reset_task("a--x--go--y--step-2--reset-17"));
        assert!(!is_reset_task("a--x--go--reset--step-2"));
    }

    #[test]
    fn lines_and_forks_are_read_from_branch_names() {
        assert!(is_whole_line("") && is_whole_line("j48"));
        assert!(!is_whole_line("f3-1") && !is_whole_line("j7.f2-1"));
        assert_eq!(forked_from("f3-1"), Some(("", 3)));
        assert_eq!(forked_from("j7.f2-10"), Some(("j7", 2)));
        assert_eq!(forked_from("j7"), None);
    }
}

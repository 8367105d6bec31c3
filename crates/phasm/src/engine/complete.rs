//! Turning a successful run of a task's actions into its commit: one function per case —
//! a halt, a final state's exit, a branch arriving at a fan-in, and a state whose actions
//! ran, which then ends its branch, queues its final exit, or takes the transition of the
//! event its action returned (with any forks).

use super::{
    child_branch, countdown, fail_for_good, is_valid_event, next_page, park, spawned, task_name,
    wait_task_name, Accept, Commit, Context, HistoryEntry, InstanceChange, Limits, NewTask,
    NewWait, Outcome, Plan, StepTimes, Task, TaskKind, FAN_IN_EVENT, NEVER, PSEUDO_FINAL,
    PSEUDO_INIT,
};
use crate::clock::micros;
use crate::machine::{Config, Machine, State};

/// Turn a successful run of a task's actions on `machine` into its commit; the machines it
/// spawns are looked up in `spawnable`.
#[allow(clippy::too_many_arguments)]
pub fn complete(
    machine: &Machine,
    spawnable: &Config,
    task: &Task,
    plan: &Plan,
    mut outcome: Outcome,
    times: StepTimes,
    rng: &mut fastrand::Rng,
    limits: &Limits,
) -> Commit {
    let step = Completing { task, times };
    let mut commit = Commit {
        logs: std::mem::take(&mut outcome.logs),
        ..Commit::finishing(task)
    };
    if let Some(reason) = outcome.halted {
        commit.instance_change = InstanceChange::Halt(reason);
        return commit;
    }
    if let Err(error) = check_context_sizes(task, plan, &outcome, limits) {
        return step.fail(commit, error);
    }
    let Some(to_name) = &plan.to_state else {
        return final_exit_ran(commit, &step, outcome.context);
    };
    let Some(to) = machine.state(to_name) else {
        return step.fail(commit, format!("unknown state `{to_name}`"));
    };
    let commit = if task.kind.dispatches() && to.fan_in.is_some() {
        arrive_at_fan_in(commit, &step, machine, to, outcome.context)
    } else {
        state_ran(commit, &step, spawnable, machine, to, outcome, rng)
    };
    debug_assert_invariants(&commit, task);
    commit
}

/// The step being completed: its task and when it ran.
struct Completing<'a> {
    task: &'a Task,
    times: StepTimes,
}

impl Completing<'_> {
    /// A history entry of this step.
    fn entry(&self, from: Option<String>, event: &str, to: &str, branch: &str) -> HistoryEntry {
        HistoryEntry {
            from,
            event: event.to_string(),
            to: to.to_string(),
            attempt: self.task.attempt,
            started_at: self.times.started_at,
            finished_at: self.times.now,
            task: self.task.name.clone(),
            branch: branch.to_string(),
            ends_branch: false,
        }
    }

    /// The step failed for good: a mistake in the machine, or a limit.
    fn fail(&self, commit: Commit, error: String) -> Commit {
        fail_for_good(commit, error, self.times.now, self.task)
    }
}

/// Every context the step produced fits the size limit.
fn check_context_sizes(
    task: &Task,
    plan: &Plan,
    outcome: &Outcome,
    limits: &Limits,
) -> Result<(), String> {
    let place = plan
        .to_state
        .as_deref()
        .or(task.from_state.as_deref())
        .unwrap_or(PSEUDO_INIT);
    for context in std::iter::once(&outcome.context).chain(&outcome.forks) {
        let bytes = serde_json::to_vec(context).map_or(0, |v| v.len());
        if bytes > limits.max_context_bytes {
            return Err(format!(
                "the context of instance `{}` grew to {bytes} bytes in state `{place}`, over the limit of {} bytes; \
                 keep large data outside the context (store a reference), or raise the limit",
                task.instance, limits.max_context_bytes
            ));
        }
    }
    Ok(())
}

/// A final state's exit action ran: the branch is over.
fn final_exit_ran(mut commit: Commit, step: &Completing<'_>, context: Context) -> Commit {
    let task = step.task;
    let mut h = step.entry(
        task.from_state.clone(),
        PSEUDO_FINAL,
        PSEUDO_FINAL,
        &task.branch,
    );
    h.ends_branch = true;
    commit.history.push(h);
    commit.instance_change = InstanceChange::BranchEnded(context);
    commit
}

/// A branch arrived at a fan-in state: it parks until the join (no action runs for it).
fn arrive_at_fan_in(
    mut commit: Commit,
    step: &Completing<'_>,
    machine: &Machine,
    to: &State,
    context: Context,
) -> Commit {
    let task = step.task;
    commit
        .history
        .push(step.entry(task.from_state.clone(), &task.event, &to.name, &task.branch));
    let policy = task
        .from_state
        .as_deref()
        .and_then(|f| machine.state(f))
        .and_then(|f| f.transition(&task.event))
        .map_or(&machine.start_policy, |t| &t.effective);
    commit
        .parked
        .push(park(to, &task.branch, task.step + 1, context, policy));
    commit
}

/// The actions of state `to` ran (a dispatch into it, or a join at it): queue a
/// continuation's next page and the spawned instances, then follow the returned event.
fn state_ran(
    mut commit: Commit,
    step: &Completing<'_>,
    config: &Config,
    machine: &Machine,
    to: &State,
    mut outcome: Outcome,
    rng: &mut fastrand::Rng,
) -> Commit {
    let task = step.task;
    let (branch, history_from, history_event) = match task.kind {
        TaskKind::Join => (format!("j{}", task.id), Some(to.name.clone()), FAN_IN_EVENT),
        _ => (
            task.branch.clone(),
            task.from_state.clone(),
            task.event.as_str(),
        ),
    };
    let ran = step.entry(history_from, history_event, &to.name, &branch);
    // A continuation page whose action reported the next token itself (`exec`).
    if let (Some(token), true, true) =
        (&outcome.next_token, task.kind.dispatches(), to.continuation)
    {
        commit
            .new_tasks
            .push(next_page(machine, task, token.clone(), step.times.now));
    }
    match spawned(
        config,
        task,
        std::mem::take(&mut outcome.spawns),
        step.times.now,
    ) {
        Ok(spawns) => commit.spawns = spawns,
        Err(error) => return step.fail(commit, error),
    }
    let here = Here {
        machine,
        to,
        branch,
        step: task.step + 1,
    };
    match outcome.event.take() {
        None if to.wait.is_some() => begin_wait(commit, step, &here, ran, outcome, rng),
        None => no_event(commit, step, &here, ran, outcome),
        Some(event) => take_transition(commit, step, &here, ran, &event, outcome, rng),
    }
}

/// Where a branch is once its state's actions ran.
struct Here<'a> {
    machine: &'a Machine,
    to: &'a State,
    branch: String,
    /// Steps of the branch including this one.
    step: u64,
}

impl Here<'_> {
    fn describe(&self) -> String {
        format!(
            "state `{}` of machine `{}`",
            self.to.name, self.machine.name
        )
    }
}

/// The action returned no event: the branch ends in a final state (after its exit action,
/// if it has one); anywhere else that is a mistake.
fn no_event(
    mut commit: Commit,
    step: &Completing<'_>,
    here: &Here<'_>,
    mut ran: HistoryEntry,
    outcome: Outcome,
) -> Commit {
    let (task, to, machine) = (step.task, here.to, here.machine);
    if !outcome.forks.is_empty() {
        return step.fail(
            commit,
            format!(
                "the action of {} forked the context but returned no event for the forks to take",
                here.describe()
            ),
        );
    }
    if to.is_final && to.exit.is_some() {
        let policy = &machine.start_policy;
        commit.history.push(ran);
        commit.new_tasks.push(NewTask {
            name: task_name(
                &task.instance,
                &here.branch,
                &to.name,
                PSEUDO_FINAL,
                PSEUDO_FINAL,
                here.step,
            ),
            from_state: Some(to.name.clone()),
            event: PSEUDO_FINAL.into(),
            kind: TaskKind::FinalExit,
            context: outcome.context,
            step: here.step,
            branch: here.branch.clone(),
            queue: policy.queue.clone(),
            target: policy.target.clone(),
            due_at: step.times.now,
            token: None,
        });
        return commit;
    }
    if to.is_final {
        ran.ends_branch = true;
        commit.history.push(ran);
        commit.instance_change = InstanceChange::BranchEnded(outcome.context);
        return commit;
    }
    let to_name = &to.name;
    let error = match &to.action {
        Some(action) => format!(
            "the action `{action}` of state `{to_name}` (machine `{}`) returned no event, but `{to_name}` is not a final state",
            machine.name
        ),
        None => format!(
            "state `{to_name}` of machine `{}` has no action and is not final",
            machine.name
        ),
    };
    step.fail(commit, error)
}

/// The branch entered a waiting state (and its entry action ran): queue its wait task, with
/// how each event the state accepts will be dispatched.
fn begin_wait(
    mut commit: Commit,
    step: &Completing<'_>,
    here: &Here<'_>,
    ran: HistoryEntry,
    outcome: Outcome,
    rng: &mut fastrand::Rng,
) -> Commit {
    let (task, to) = (step.task, here.to);
    let Some(wait) = &to.wait else {
        return commit;
    };
    if !outcome.forks.is_empty() {
        return step.fail(
            commit,
            format!(
                "the entry action of waiting {} forked the context; fork in the state before it",
                here.describe()
            ),
        );
    }
    commit.history.push(ran);
    let accepts = to
        .transitions
        .iter()
        .map(|t| Accept {
            event: t.event.clone(),
            name: task_name(
                &task.instance,
                &here.branch,
                &to.name,
                &t.event,
                &t.to,
                here.step,
            ),
            queue: t.effective.queue.clone(),
            target: t.effective.target.clone(),
            delay: countdown(&t.effective, rng),
        })
        .collect();
    let timeout = wait.timeout.and_then(|d| {
        to.transition(&wait.timeout_event)
            .map(|t| (micros(d), &t.effective))
    });
    let policy = timeout.map_or(&here.machine.start_policy, |(_, p)| p);
    commit.waits.push(NewWait {
        task: NewTask {
            name: wait_task_name(&task.instance, &here.branch, &to.name, here.step, task.id),
            from_state: Some(to.name.clone()),
            event: match timeout {
                Some(_) => wait.timeout_event.clone(),
                None => String::new(),
            },
            kind: TaskKind::Wait,
            context: outcome.context,
            step: here.step,
            branch: here.branch.clone(),
            queue: policy.queue.clone(),
            target: policy.target.clone(),
            due_at: timeout.map_or(NEVER, |(d, _)| step.times.now.saturating_add(d)),
            token: None,
        },
        accepts,
    });
    commit
}

/// The action returned `event`: take its transition, with the branch and every fork — each
/// queued as the next step, or parked at once when the transition leads into a fan-in.
fn take_transition(
    mut commit: Commit,
    step: &Completing<'_>,
    here: &Here<'_>,
    ran: HistoryEntry,
    event: &str,
    outcome: Outcome,
    rng: &mut fastrand::Rng,
) -> Commit {
    let (task, to, machine) = (step.task, here.to, here.machine);
    if !is_valid_event(event) {
        return step.fail(
            commit,
            format!(
                "the action of {} returned `{event}`, which is not a valid event name",
                here.describe()
            ),
        );
    }
    let Some(t) = to.transition(event) else {
        let known: Vec<&str> = to.transitions.iter().map(|t| t.event.as_str()).collect();
        let known = if known.is_empty() {
            "it has no transitions".to_string()
        } else {
            format!("its events: {}", known.join(", "))
        };
        return step.fail(
            commit,
            format!(
                "the action of {} returned event `{event}`, which has no transition there ({known})",
                here.describe()
            ),
        );
    };
    commit.history.push(ran);
    let Some(target) = machine.state(&t.to) else {
        return step.fail(commit, format!("unknown state `{}`", t.to));
    };
    let mut branches = vec![(here.branch.clone(), outcome.context)];
    for (i, fork) in outcome.forks.into_iter().enumerate() {
        branches.push((
            child_branch(&here.branch, &format!("f{}-{}", here.step, i + 1)),
            fork,
        ));
    }
    for (b, context) in branches {
        if target.fan_in.is_some() {
            // Straight into a fan-in: park now rather than queue a task that would only park.
            commit.history.push(HistoryEntry {
                from: Some(to.name.clone()),
                event: event.to_string(),
                to: target.name.clone(),
                branch: b.clone(),
                ..step.entry(None, "", "", "")
            });
            commit
                .parked
                .push(park(target, &b, here.step + 1, context, &t.effective));
        } else {
            commit.new_tasks.push(NewTask {
                name: task_name(&task.instance, &b, &to.name, event, &t.to, here.step),
                from_state: Some(to.name.clone()),
                event: event.to_string(),
                kind: TaskKind::Dispatch,
                context,
                step: here.step,
                branch: b,
                queue: t.effective.queue.clone(),
                target: t.effective.target.clone(),
                due_at: step.times.now + countdown(&t.effective, rng),
                token: None,
            });
        }
    }
    commit
}

/// What every commit of a completed step satisfies (checked in debug builds).
fn debug_assert_invariants(commit: &Commit, task: &Task) {
    if !cfg!(debug_assertions) {
        return;
    }
    let failed = matches!(commit.instance_change, InstanceChange::Fail(_));
    if failed {
        debug_assert!(
            commit.new_tasks.is_empty() && commit.parked.is_empty() && commit.spawns.is_empty(),
            "a failed step has no effects but its log: {commit:?}"
        );
        return;
    }
    debug_assert!(
        commit
            .history
            .iter()
            .all(|h| h.task == task.name && h.attempt == task.attempt),
        "history entries name the step that committed them: {commit:?}"
    );
    let mut names: Vec<&str> = commit.new_tasks.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    debug_assert_eq!(before, names.len(), "new task names are unique: {commit:?}");
    let ends = commit.history.iter().filter(|h| h.ends_branch).count();
    debug_assert!(
        ends == usize::from(matches!(
            commit.instance_change,
            InstanceChange::BranchEnded(_)
        )),
        "a branch ends exactly when the history says so: {commit:?}"
    );
}

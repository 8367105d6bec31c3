//! Running an instance again from a step of its history (Temporal's "reset"): the step is
//! queued again with the context it was given, and the instance's pending work is dropped.

use crate::clock::Clock;
use crate::engine::{self, task_name, NewTask, TaskKind, PSEUDO_FINAL, PSEUDO_INIT};
use crate::machine::{Config, Machine};
use crate::store::{Control, Store, StoreError};

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
    if !row.branch.is_empty() {
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
    let not_in_machine = |hint| ResetError::NotInMachine {
        instance: name.to_string(),
        step,
        machine: view.machine.clone(),
        from: row.from.clone().unwrap_or_else(|| PSEUDO_INIT.into()),
        event: row.event.clone(),
        hint,
    };
    let Some(machine) = config.machine(&view.machine) else {
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
            .states
            .iter()
            .flat_map(|s| &s.transitions)
            .find(|t| t.to == from)
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

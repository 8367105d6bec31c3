//! The deterministic step: what one task does to an instance, as data.
//!
//! A worker asks [`plan`] which actions a claimed task runs, runs them (outside any
//! transaction), and hands what they produced to [`complete`] — or the failure to
//! [`failed_attempt`]. Both return a [`Commit`]: every effect of the step (the task finished
//! or rescheduled, the next tasks, history, log lines, the instance's end), which the store
//! applies in one transaction fenced by the task's lease. Nothing here does IO, reads a clock
//! or draws a random number by itself, so every rule is unit-tested without a store.

mod complete;
mod naming;
mod step;
pub mod text;
mod upgrade;

pub use complete::complete;
pub use naming::{
    instance_name, is_valid_instance_name, reserved_shape, task_name, wait_task_name,
};
pub use step::{Begin, Step};
pub use upgrade::{plan_upgrade, Position, Rewrite, UpgradePlan};

use serde::{Deserialize, Serialize};

use crate::clock::{micros, Micros};
use crate::machine::{
    is_valid_event, ActionRole, Config, Countdown, FanIn, Machine, RetryPolicy, State,
    TransitionPolicy,
};

pub use crate::context::Context;

/// The pseudo-event and pseudo-state of the task that starts an instance.
pub const PSEUDO_INIT: &str = "pseudo-init";
/// The pseudo-event and pseudo-state of the task that runs a final state's exit action.
pub const PSEUDO_FINAL: &str = "pseudo-final";

/// The default limit on a context's size when serialized as JSON.
pub const DEFAULT_MAX_CONTEXT_BYTES: usize = 1024 * 1024;

/// What a task dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Dispatch `event` from `from_state` (or enter the initial state, for a start task).
    Dispatch,
    /// Run the exit action of `from_state`, a final state its branch ended in.
    FinalExit,
    /// Join the branches parked at fan-in state `from_state`: run its entry and action once
    /// with their contexts.
    Join,
    /// A branch waiting in state `from_state` for an event from outside. Due only at the
    /// wait's timeout (never without one), when it runs as the dispatch of `event`, the
    /// timeout event; an event delivered first replaces it with that event's dispatch.
    Wait,
}

impl TaskKind {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Dispatch => "dispatch",
            TaskKind::FinalExit => "final-exit",
            TaskKind::Join => "join",
            TaskKind::Wait => "wait",
        }
    }

    /// True for the kinds that run as the dispatch of `event` from `from_state`: a dispatch,
    /// and a wait reaching its timeout.
    pub fn dispatches(self) -> bool {
        matches!(self, TaskKind::Dispatch | TaskKind::Wait)
    }

    /// Parse the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "dispatch" => Some(TaskKind::Dispatch),
            "final-exit" => Some(TaskKind::FinalExit),
            "join" => Some(TaskKind::Join),
            "wait" => Some(TaskKind::Wait),
            _ => None,
        }
    }
}

/// A task claimed by a worker: one dispatch of one branch of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Store id of the task.
    pub id: i64,
    /// Fencing token of this claim: a commit carries it and is refused once another claim
    /// (or the lease's expiry) has superseded it.
    pub claim: i64,
    /// The instance's name.
    pub instance: String,
    /// The instance's machine.
    pub machine: String,
    /// Unique per instance; the idempotency key actions see.
    pub name: String,
    /// The state the dispatch leaves; `None` for the task that starts the instance.
    pub from_state: Option<String>,
    /// The event dispatched.
    pub event: String,
    /// Dispatch or final exit.
    pub kind: TaskKind,
    /// The branch's context.
    pub context: Context,
    /// Steps taken by the branch before this one.
    pub step: u64,
    /// The branch (empty for an instance's first branch).
    pub branch: String,
    /// Earlier claims of this task (0 on the first attempt).
    pub attempt: u32,
    /// When the first attempt was claimed.
    pub first_attempt_at: Micros,
    /// The queue the task ran on.
    pub queue: String,
    /// A continuation page's token (`None` on the first page and outside continuations).
    pub token: Option<serde_json::Value>,
    /// For a join: the parked contexts it joins, in order of arrival.
    pub contexts: Vec<Context>,
    /// For a continuation page: an earlier attempt already queued the next page.
    pub next_page_queued: bool,
    /// The stored version of the machine the instance is pinned to (a `machine_versions` id;
    /// `None` for an instance started before its machine was ever deployed): the step runs on
    /// that version's definition.
    pub version: Option<i64>,
}

/// A task to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Unique per instance.
    pub name: String,
    /// The state the dispatch leaves (`None`: the start task).
    pub from_state: Option<String>,
    /// The event dispatched.
    pub event: String,
    /// Dispatch or final exit.
    pub kind: TaskKind,
    /// The branch's context.
    pub context: Context,
    /// Steps of the branch before this one.
    pub step: u64,
    /// The branch.
    pub branch: String,
    /// Queue.
    pub queue: String,
    /// Worker pool.
    pub target: Option<String>,
    /// When it becomes due.
    pub due_at: Micros,
    /// A continuation page's token.
    pub token: Option<serde_json::Value>,
}

impl NewTask {
    /// This task as claimed at its creation (first claim, attempt 0) by the worker whose
    /// commit created it: the task a store hands back as a successor.
    pub fn claimed(&self, id: i64, commit: &Commit, now: Micros) -> Task {
        Task {
            id,
            claim: 1,
            instance: commit.instance.clone(),
            machine: commit.machine.clone(),
            name: self.name.clone(),
            from_state: self.from_state.clone(),
            event: self.event.clone(),
            kind: self.kind,
            context: self.context.clone(),
            step: self.step,
            branch: self.branch.clone(),
            attempt: 0,
            first_attempt_at: now,
            queue: self.queue.clone(),
            token: self.token.clone(),
            contexts: Vec::new(),
            next_page_queued: false,
            version: commit.version,
        }
    }
}

/// A branch parking its context at a fan-in state, to be joined.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    /// The fan-in state.
    pub state: String,
    /// The value of the state's `fan_in_group` key in the context (`""` without one).
    pub group: String,
    /// The branch's context.
    pub context: Context,
    /// The branch.
    pub branch: String,
    /// Steps of the branch so far.
    pub step: u64,
    /// A window join runs this long after a window's first arrival; `None` is a barrier
    /// (`fan_in: all`), which runs when no branch of the instance is live any more.
    pub window: Option<Micros>,
    /// Queue of the join task.
    pub queue: String,
    /// Worker pool of the join task.
    pub target: Option<String>,
}

/// The `due_at` of a wait without a timeout: never due, so no worker claims it and no
/// store's next-due time counts it.
pub const NEVER: Micros = Micros::MAX;

/// A branch starting to wait in a waiting state (`wait:`): its wait task, and how each event
/// the state accepts is dispatched when it arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWait {
    /// The wait task ([`TaskKind::Wait`]): `from_state` is the waiting state, `event` the
    /// timeout event (`""` without a timeout), `due_at` the deadline or [`NEVER`].
    pub task: NewTask,
    /// The events the state accepts, in the order of its transitions.
    pub accepts: Vec<Accept>,
}

impl NewWait {
    /// The dispatch that replaces this wait when `event` arrives with `data`, if the wait
    /// accepts the event (see [`Accept::dispatch`]).
    pub fn dispatch(&self, event: &str, data: &Context, now: Micros) -> Option<NewTask> {
        self.accepts
            .iter()
            .find(|a| a.event == event)
            .map(|a| a.dispatch(&self.task, data, now))
    }
}

/// How one event a waiting branch accepts is dispatched: everything of the dispatch task
/// that differs from the wait task, fixed when the wait begins, so that a store delivers an
/// event without knowing the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    /// The event.
    pub event: String,
    /// The dispatch task's name (as if the state's action had returned the event).
    pub name: String,
    /// Its queue.
    pub queue: String,
    /// Its worker pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Its countdown (drawn when the wait began).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delay: Micros,
}

fn is_zero(n: &Micros) -> bool {
    *n == 0
}

impl Accept {
    /// The dispatch of this event for the branch waiting in `wait` (its wait task, as queued),
    /// with `data` merged into its context (top-level keys replace), due `delay` after `now`.
    pub fn dispatch(&self, wait: &NewTask, data: &Context, now: Micros) -> NewTask {
        let mut context = wait.context.clone();
        context.extend(data.clone());
        NewTask {
            name: self.name.clone(),
            from_state: wait.from_state.clone(),
            event: self.event.clone(),
            kind: TaskKind::Dispatch,
            context,
            step: wait.step,
            branch: wait.branch.clone(),
            queue: self.queue.clone(),
            target: self.target.clone(),
            due_at: now.saturating_add(self.delay),
            token: None,
        }
    }
}

/// An instance an action asked to start (`spawn`).
#[derive(Debug, Clone, PartialEq)]
pub struct Spawned {
    /// Its name, derived from the spawning step so a retry cannot start it twice.
    pub name: String,
    /// Its machine.
    pub machine: String,
    /// Its context.
    pub context: Context,
    /// Its start task.
    pub start: NewTask,
}

/// A request to start instances of a machine, from an action.
#[derive(Debug, Clone, PartialEq)]
pub struct SpawnRequest {
    /// The machine.
    pub machine: String,
    /// One instance per context.
    pub contexts: Vec<Context>,
    /// How long after the spawning step commits the instances start (zero: at once).
    pub countdown: std::time::Duration,
}

/// One action call of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Which slot the action fills.
    pub role: ActionRole,
    /// The action name as written.
    pub action: String,
    /// The namespace it is looked up in first.
    pub namespace: Option<String>,
    /// The state the call belongs to (the target for entry/action, the source for exit and
    /// transition actions).
    pub state: String,
}

/// The actions a task runs, in order, and where it leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The state entered (`None` for a final-exit task).
    pub to_state: Option<String>,
    /// Calls in DESIGN.md's order: source exit, transition action, target entry, target action.
    pub calls: Vec<Call>,
}

/// What the actions of a step produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// The context after the step.
    pub context: Context,
    /// The event returned by the target's main action.
    pub event: Option<String>,
    /// An action asked to stop the machine.
    pub halted: Option<String>,
    /// Log lines the actions wrote.
    pub logs: Vec<LogLine>,
    /// Contexts the actions forked: each becomes a branch that gets the same next event.
    pub forks: Vec<Context>,
    /// Instances to start.
    pub spawns: Vec<SpawnRequest>,
    /// A continuation's next token, when the next page was not queued before the action ran.
    pub next_token: Option<serde_json::Value>,
}

/// A log line of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When it was written.
    pub at: Micros,
    /// `debug`, `info`, `warning` or `error`.
    pub level: String,
    /// The text.
    pub message: String,
    /// The task that wrote it.
    pub task: String,
}

/// One committed transition, as shown by `phasm status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The state left (`None` for the step into the initial state).
    pub from: Option<String>,
    /// The event dispatched.
    pub event: String,
    /// The state entered.
    pub to: String,
    /// The attempt that committed (0 on the first try).
    pub attempt: u32,
    /// When that attempt started.
    pub started_at: Micros,
    /// When it committed.
    pub finished_at: Micros,
    /// The task.
    pub task: String,
    /// The branch.
    pub branch: String,
    /// This step ended its branch.
    pub ends_branch: bool,
}

/// What happens to the task that ran.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Done: delete it.
    Finished,
    /// Failed, with retries left: run again at `due_at`.
    Retry {
        /// When to try again.
        due_at: Micros,
        /// Why the attempt failed.
        error: String,
    },
    /// Failed for good: keep it (for `phasm retry`) and fail the instance.
    Failed {
        /// Why.
        error: String,
    },
    /// Keep it leased: the step is not over (a continuation queues its next page first).
    Keep,
    /// Not run: the worker could not start it (out of file descriptors or processes, or it
    /// does not know the machine). Run again at `due_at`; the claim is not counted as an
    /// attempt.
    Postpone {
        /// When to try again.
        due_at: Micros,
        /// Why it could not run.
        reason: String,
    },
}

/// How a step changes its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceChange {
    /// Nothing beyond the tasks.
    None,
    /// A branch ended with this context: the instance is completed if nothing else of it is
    /// pending.
    BranchEnded(Context),
    /// An action halted the machine: end it, drop its pending tasks.
    Halt(String),
    /// A branch failed for good: the instance is failed, its other tasks held.
    Fail(String),
}

/// Every effect of one step, applied atomically by the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// The task that ran.
    pub task_id: i64,
    /// Its claim (the fence).
    pub claim: i64,
    /// The instance.
    pub instance: String,
    /// The instance's machine.
    pub machine: String,
    /// The instance's version (see [`Task::version`]), which the tasks it creates run on.
    pub version: Option<i64>,
    /// What becomes of the task.
    pub disposition: Disposition,
    /// Tasks to create.
    pub new_tasks: Vec<NewTask>,
    /// The transitions committed (none when the step failed).
    pub history: Vec<HistoryEntry>,
    /// Branches parked at fan-in states.
    pub parked: Vec<Parked>,
    /// Branches starting to wait for events from outside.
    pub waits: Vec<NewWait>,
    /// Instances started.
    pub spawns: Vec<Spawned>,
    /// Log lines to keep.
    pub logs: Vec<LogLine>,
    /// The instance's change.
    pub instance_change: InstanceChange,
}

impl Commit {
    /// This commit with every free text as a store keeps it: errors and reasons without NUL
    /// and at most [`text::MAX_TEXT_BYTES`] ([`text::storable`]); log lines (bounded per step
    /// by the action context) and fan-in group values (never cut: a cut could join two
    /// groups) without NUL. Each store applies this before it writes, so no text column
    /// receives a NUL.
    #[must_use]
    pub fn storable(mut self) -> Self {
        let fix = |s: &mut String| *s = text::storable(std::mem::take(s));
        match &mut self.disposition {
            Disposition::Retry { error, .. } | Disposition::Failed { error } => fix(error),
            Disposition::Postpone { reason, .. } => fix(reason),
            Disposition::Finished | Disposition::Keep => {}
        }
        match &mut self.instance_change {
            InstanceChange::Halt(reason) | InstanceChange::Fail(reason) => fix(reason),
            InstanceChange::None | InstanceChange::BranchEnded(_) => {}
        }
        let escape = |s: &mut String| {
            if let std::borrow::Cow::Owned(escaped) = text::without_nul(s) {
                *s = escaped;
            }
        };
        for line in &mut self.logs {
            escape(&mut line.message);
        }
        for parked in &mut self.parked {
            escape(&mut parked.group);
        }
        self
    }

    /// [`Commit::storable`] for a shared commit: the same commit when every text is
    /// storable already (the common case, so a fork of thousands of branches is not copied),
    /// else a fixed copy.
    #[must_use]
    pub fn storable_shared(commit: std::sync::Arc<Self>) -> std::sync::Arc<Self> {
        if commit.is_storable() {
            commit
        } else {
            std::sync::Arc::new(Self::clone(&commit).storable())
        }
    }

    /// Whether [`Commit::storable`] would change nothing.
    fn is_storable(&self) -> bool {
        let texts_fit = match &self.disposition {
            Disposition::Retry { error, .. } | Disposition::Failed { error } => {
                text::is_storable(error)
            }
            Disposition::Postpone { reason, .. } => text::is_storable(reason),
            Disposition::Finished | Disposition::Keep => true,
        } && match &self.instance_change {
            InstanceChange::Halt(reason) | InstanceChange::Fail(reason) => {
                text::is_storable(reason)
            }
            InstanceChange::None | InstanceChange::BranchEnded(_) => true,
        };
        texts_fit
            && !self.logs.iter().any(|l| text::has_nul(&l.message))
            && !self.parked.iter().any(|p| text::has_nul(&p.group))
    }

    /// A commit that finishes `task` and does nothing else; the step's effects are added to it.
    pub fn finishing(task: &Task) -> Self {
        Self {
            task_id: task.id,
            claim: task.claim,
            instance: task.instance.clone(),
            machine: task.machine.clone(),
            version: task.version,
            disposition: Disposition::Finished,
            new_tasks: Vec::new(),
            history: Vec::new(),
            parked: Vec::new(),
            waits: Vec::new(),
            spawns: Vec::new(),
            logs: Vec::new(),
            instance_change: InstanceChange::None,
        }
    }
}

/// Limits the engine enforces on what actions produce.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest context, in bytes of JSON.
    pub max_context_bytes: usize,
    /// Most events kept for one instance (sent before a wait accepts them).
    pub max_kept_events: usize,
}

/// [`Limits::max_kept_events`] unless configured.
pub const DEFAULT_MAX_KEPT_EVENTS: usize = 100;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_context_bytes: DEFAULT_MAX_CONTEXT_BYTES,
            max_kept_events: DEFAULT_MAX_KEPT_EVENTS,
        }
    }
}

/// Why a task cannot be planned: the machine no longer matches what was queued (it was
/// edited while instances were running). A mistake in the machine, not a passing fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

/// The calls a task makes and the state it leads to.
///
/// A dispatch into a fan-in state makes no calls: the arriving branch parks, and the fan-in
/// state's entry and action run once per join ([`TaskKind::Join`]).
///
/// # Errors
/// When the task names a state or event the machine does not have.
pub fn plan(machine: &Machine, task: &Task) -> Result<Plan, PlanError> {
    let ns = |state: &State| {
        state
            .namespace
            .clone()
            .or_else(|| machine.namespace.clone())
    };
    let call = |role, action: &Option<String>, state: &State, namespace: Option<String>| {
        action.as_ref().map(|a| Call {
            role,
            action: a.clone(),
            namespace,
            state: state.name.clone(),
        })
    };
    let state = |name: &str| {
        machine.state(name).ok_or_else(|| {
            PlanError(format!(
                "machine `{}` has no state `{name}` (was the machine changed while instance `{}` ran?)",
                machine.name, task.instance
            ))
        })
    };
    let from_name = task.from_state.as_deref().unwrap_or_default();
    match task.kind {
        TaskKind::FinalExit => {
            let from = state(from_name)?;
            return Ok(Plan {
                to_state: None,
                calls: call(ActionRole::Exit, &from.exit, from, ns(from))
                    .into_iter()
                    .collect(),
            });
        }
        TaskKind::Join => {
            let at = state(from_name)?;
            return Ok(Plan {
                to_state: Some(at.name.clone()),
                calls: [
                    call(ActionRole::Entry, &at.entry, at, ns(at)),
                    call(ActionRole::Action, &at.action, at, ns(at)),
                ]
                .into_iter()
                .flatten()
                .collect(),
            });
        }
        TaskKind::Dispatch | TaskKind::Wait => {}
    }
    let mut calls = Vec::new();
    let target = match &task.from_state {
        None => machine
            .initial_state()
            .ok_or_else(|| PlanError(format!("machine `{}` has no initial state", machine.name)))?,
        Some(from_name) => {
            let from = state(from_name)?;
            let t = from.transition(&task.event).ok_or_else(|| {
                PlanError(format!(
                    "state `{from_name}` of machine `{}` has no transition on event `{}`",
                    machine.name, task.event
                ))
            })?;
            calls.extend(call(ActionRole::Exit, &from.exit, from, ns(from)));
            let t_ns = t.namespace.clone().or_else(|| machine.namespace.clone());
            calls.extend(call(ActionRole::Transition, &t.action, from, t_ns));
            state(&t.to)?
        }
    };
    if target.fan_in.is_none() {
        calls.extend(call(ActionRole::Entry, &target.entry, target, ns(target)));
        calls.extend(call(ActionRole::Action, &target.action, target, ns(target)));
    }
    Ok(Plan {
        to_state: Some(target.name.clone()),
        calls,
    })
}

/// The name of the wait task the step of `task` begins, when that step enters a waiting
/// state (`wait:`): what its entry action's wait token addresses.
pub fn wait_begun(machine: &Machine, task: &Task) -> Option<String> {
    if !task.kind.dispatches() {
        return None;
    }
    let to = match &task.from_state {
        None => machine.initial_state()?,
        Some(from) => machine.state(&machine.state(from)?.transition(&task.event)?.to)?,
    };
    to.wait.as_ref()?;
    Some(wait_task_name(
        &task.instance,
        &task.branch,
        &to.name,
        task.step + 1,
        task.id,
    ))
}

/// The retry policy of a task: that of the transition that queued it (the machine's for
/// start, final-exit and join tasks).
pub fn retry_policy(machine: &Machine, task: &Task) -> RetryPolicy {
    match (task.kind.dispatches(), &task.from_state) {
        (true, Some(from)) => machine
            .state(from)
            .and_then(|s| s.transition(&task.event))
            .map_or(machine.start_policy.retry, |t| t.effective.retry),
        _ => machine.start_policy.retry,
    }
}

/// When a step's attempt started, and when it finished (the commit's time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepTimes {
    /// The attempt started.
    pub started_at: Micros,
    /// The actions finished.
    pub now: Micros,
}

/// The name of a child branch: `PARENT.PART`, or `PART` for the first branch's children.
pub fn child_branch(parent: &str, part: &str) -> String {
    if parent.is_empty() {
        part.to_string()
    } else {
        format!("{parent}.{part}")
    }
}

/// The `fan_in_group` value of a context: the key's string, or its JSON text; `""` without.
pub fn group_value(state: &State, context: &Context) -> String {
    match state.fan_in_group.as_ref().and_then(|k| context.get(k)) {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The pseudo-event of a join in the history.
pub const FAN_IN_EVENT: &str = "fan-in";

fn park(
    state: &State,
    branch: &str,
    step: u64,
    context: Context,
    policy: &TransitionPolicy,
) -> Parked {
    Parked {
        state: state.name.clone(),
        group: group_value(state, &context),
        context,
        branch: branch.to_string(),
        step,
        window: match state.fan_in {
            Some(FanIn::Window(d)) => Some(micros(d)),
            _ => None,
        },
        queue: policy.queue.clone(),
        target: policy.target.clone(),
    }
}

/// The task of a continuation's next page: the same dispatch as `task`, with the next token,
/// on its own branch, after the state's `continuation_countdown`. Page `n` of a dispatch is
/// named `BASE--page-n`, so a retried page queues the same next page.
pub fn next_page(machine: &Machine, task: &Task, token: serde_json::Value, now: Micros) -> NewTask {
    let transition = task
        .from_state
        .as_deref()
        .and_then(|f| machine.state(f))
        .and_then(|f| f.transition(&task.event));
    let to = transition
        .map(|t| t.to.clone())
        .or_else(|| machine.initial_state().map(|s| s.name.clone()))
        .unwrap_or_default();
    let countdown = machine
        .state(&to)
        .and_then(|s| s.continuation_countdown)
        .map_or(0, micros);
    let (base_name, page) = match task.name.rsplit_once("--page-") {
        Some((base, n)) => (base, n.parse::<u64>().unwrap_or(0)),
        None => (task.name.as_str(), 0),
    };
    let base_branch = if page == 0 {
        task.branch.clone()
    } else {
        task.branch
            .rsplit_once('.')
            .map_or(String::new(), |(parent, _)| parent.to_string())
    };
    let next = page + 1;
    let policy = transition.map_or(&machine.start_policy, |t| &t.effective);
    NewTask {
        name: format!("{base_name}--page-{next}"),
        from_state: task.from_state.clone(),
        event: task.event.clone(),
        kind: TaskKind::Dispatch,
        context: task.context.clone(),
        step: task.step,
        branch: child_branch(&base_branch, &format!("p{}-{next}", task.step)),
        queue: policy.queue.clone(),
        target: policy.target.clone(),
        due_at: now + countdown,
        token: Some(token),
    }
}

/// Turn spawn requests into instances to start, named after the spawning step so that a
/// retried step starts the same instances (which the store then ignores).
fn spawned(
    config: &Config,
    task: &Task,
    requests: Vec<SpawnRequest>,
    now: Micros,
) -> Result<Vec<Spawned>, String> {
    let mut out = Vec::new();
    for request in requests {
        let Some(machine) = config.machine(&request.machine) else {
            return Err(format!(
                "an action spawned machine `{}`, which is not in the configuration",
                request.machine
            ));
        };
        for context in request.contexts {
            let n = out.len() + 1;
            let name = child_instance_name(&task.instance, &task.branch, task.step, n);
            let mut start = start_task(machine, &name, context.clone(), now);
            start.due_at += micros(request.countdown);
            out.push(Spawned {
                name,
                machine: machine.name.clone(),
                context,
                start,
            });
        }
    }
    Ok(out)
}

/// `PARENT.s{step}[.b{branch}].{n}`, shortened with a hash when it would pass 200 characters.
fn child_instance_name(parent: &str, branch: &str, step: u64, n: usize) -> String {
    let name = if branch.is_empty() {
        format!("{parent}.s{step}.{n}")
    } else {
        format!("{parent}.s{step}.b{branch}.{n}")
    };
    if name.len() <= 200 {
        return name;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let keep: String = parent.chars().take(150).collect();
    format!("{keep}.{hash:016x}.{n}")
}

/// Turn a failed attempt into its commit: a retry after the policy's backoff, or — past the
/// retry limit or the age limit — the instance's failure.
pub fn failed_attempt(machine: &Machine, task: &Task, error: String, now: Micros) -> Commit {
    let error = text::storable(error);
    let policy = retry_policy(machine, task);
    let base = Commit::finishing(task);
    let retry = task.attempt + 1;
    let backoff = micros(policy.backoff(retry));
    let too_old = policy
        .age_limit
        .is_some_and(|limit| now + backoff - task.first_attempt_at > micros(limit));
    if task.attempt >= policy.retry_limit || too_old {
        let why = if too_old {
            "the task age limit was reached".to_string()
        } else {
            match task.attempt + 1 {
                1 => "after 1 attempt".to_string(),
                n => format!("after {n} attempts"),
            }
        };
        let error = format!("{error} ({why})");
        return fail_for_good(base, error, now, task);
    }
    let mut commit = base;
    commit.logs.push(LogLine {
        at: now,
        level: "error".into(),
        message: format!(
            "attempt {} failed: {error}; retrying in {:.1}s",
            task.attempt,
            backoff as f64 / 1e6
        ),
        task: task.name.clone(),
    });
    commit.disposition = Disposition::Retry {
        due_at: now + backoff,
        error,
    };
    commit
}

/// How long a step waits when its worker could not start it (see [`postponed`]).
pub const POSTPONE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// The commit of a step its worker could not start for lack of its own resources (not the
/// action's failure): run it again after `delay`, without counting this attempt. `logs` are
/// what the step logged before it stopped.
pub fn postponed(
    task: &Task,
    reason: String,
    now: Micros,
    delay: std::time::Duration,
    logs: Vec<LogLine>,
) -> Commit {
    let reason = text::storable(reason);
    let mut commit = Commit::finishing(task);
    commit.logs = logs;
    commit.logs.push(LogLine {
        at: now,
        level: "warn".into(),
        message: format!(
            "not started: {reason}; trying again in {:.1}s (not counted as an attempt)",
            delay.as_secs_f64()
        ),
        task: task.name.clone(),
    });
    commit.disposition = Disposition::Postpone {
        due_at: now + micros(delay),
        reason,
    };
    commit
}

/// When earlier attempts of a task were lost with their workers (crashed, or paused past
/// their lease) often enough to use up its retries, the commit that fails it without running
/// it again.
pub fn lost_attempts(machine: &Machine, task: &Task, now: Micros) -> Option<Commit> {
    let policy = retry_policy(machine, task);
    (task.attempt > policy.retry_limit).then(|| {
        mistake(
            task,
            format!(
                "gave up after {} attempts: the workers running the earlier ones were lost (crashed, or paused past their lease)",
                task.attempt
            ),
            now,
        )
    })
}

/// Turn a mistake in the machine (see [`PlanError`]) into its commit: no retries.
pub fn mistake(task: &Task, error: String, now: Micros) -> Commit {
    let error = text::storable(error);
    let base = Commit::finishing(task);
    fail_for_good(base, error, now, task)
}

fn fail_for_good(mut commit: Commit, error: String, now: Micros, task: &Task) -> Commit {
    commit.history.clear();
    commit.parked.clear();
    commit.waits.clear();
    commit.spawns.clear();
    commit.new_tasks.clear();
    commit.logs.push(LogLine {
        at: now,
        level: "error".into(),
        message: format!("attempt {} failed for good: {error}", task.attempt),
        task: task.name.clone(),
    });
    commit.disposition = Disposition::Failed {
        error: error.clone(),
    };
    commit.instance_change = InstanceChange::Fail(error);
    commit
}

/// A countdown's delay, drawn for a random range.
fn countdown(policy: &TransitionPolicy, rng: &mut fastrand::Rng) -> Micros {
    match policy.countdown {
        Countdown::Fixed(d) => micros(d),
        Countdown::Random { minimum, maximum } => rng.i64(micros(minimum)..=micros(maximum)),
    }
}

/// The task that starts an instance.
pub fn start_task(machine: &Machine, instance: &str, context: Context, now: Micros) -> NewTask {
    let initial = machine
        .initial_state()
        .map_or(String::new(), |s| s.name.clone());
    let policy = &machine.start_policy;
    NewTask {
        name: task_name(instance, "", PSEUDO_INIT, PSEUDO_INIT, &initial, 0),
        from_state: None,
        event: PSEUDO_INIT.into(),
        kind: TaskKind::Dispatch,
        context,
        step: 0,
        branch: String::new(),
        queue: policy.queue.clone(),
        target: policy.target.clone(),
        due_at: now,
        token: None,
    }
}

#[cfg(test)]
mod tests;

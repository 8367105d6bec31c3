//! The model of machines a user writes: plain data, no IO, no async.
//!
//! Everything here is produced by [`crate::config`] from `fsm.yaml` files, already validated:
//! a [`Machine`] always has exactly one initial state, at least one final state, transitions
//! only to states that exist, and every [`Transition`] carries its resolved
//! [`TransitionPolicy`], so the engine never walks the fallback chain
//! transition → machine → phasm defaults at run time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The queue every task runs on unless a machine or transition names another (Fantasm's).
pub const DEFAULT_QUEUE: &str = "default";

/// The longest machine, state or event name (Fantasm's `MAX_NAME_LENGTH`).
pub const MAX_NAME_LENGTH: usize = 50;

/// A whole configuration: the machines of one file and everything it imports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// Fantasm's HTTP mount point; accepted and kept, phasm's own HTTP paths are fixed.
    pub root_url: Option<String>,
    /// Fantasm's App Engine capability check; accepted and kept, it has no effect in phasm.
    pub enable_capabilities_check: Option<bool>,
    /// Every machine, in file order, imported files' machines where their `import:` stood.
    pub machines: Vec<Machine>,
    /// Action names bound to external programs (`actions:`), from all files.
    pub actions: BTreeMap<String, ActionBinding>,
    /// Per-queue limits (`queues:`), from all files.
    pub queues: BTreeMap<String, QueueLimits>,
    /// Python actions (`python:`): with it, every action name no other binding or Rust
    /// handler takes is a Python class or function run by phasm's action hosts.
    pub python: Option<PythonSettings>,
    /// Instances started on a clock (`schedules:`), from all files.
    pub schedules: Vec<crate::schedule::Schedule>,
}

impl Config {
    /// The machine with this name, if any.
    pub fn machine(&self, name: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.name == name)
    }
}

/// One state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Unique name, `[a-zA-Z0-9-]{1,50}`.
    pub name: String,
    /// Prefix tried first when looking up this machine's action names (`NAMESPACE.NAME`).
    pub namespace: Option<String>,
    /// Declared default queue of the machine's tasks (`None`: [`DEFAULT_QUEUE`]).
    pub queue: Option<String>,
    /// Declared default worker pool (`target`) of the machine's tasks.
    pub target: Option<String>,
    /// Declared default delay of every transition's task.
    pub countdown: Option<Countdown>,
    /// Declared default retry settings of every transition.
    pub retry: RetrySettings,
    /// How context values given as strings (`--set`, HTTP forms) are converted, by key.
    pub context_types: BTreeMap<String, ContextType>,
    /// Whether action log records are kept with the instance.
    pub logging: Logging,
    /// Fantasm's duplicate-delivery guard; kept for compatibility. phasm's lease-fenced commits
    /// make every step commit exactly once whatever this says.
    pub use_run_once_semaphore: bool,
    /// The states, in file order.
    pub states: Vec<State>,
    /// The resolved policy of the task that starts an instance (machine settings over defaults).
    pub start_policy: TransitionPolicy,
}

impl Machine {
    /// The state with this name, if any.
    pub fn state(&self, name: &str) -> Option<&State> {
        self.states.iter().find(|s| s.name == name)
    }

    /// The initial state (validation guarantees there is exactly one).
    pub fn initial_state(&self) -> Option<&State> {
        self.states.iter().find(|s| s.initial)
    }

    /// The first transition (in file order) into state `state`, if any: whose policy a task
    /// of that state with no transition of its own takes (a final state's exit, a join).
    pub fn transition_into(&self, state: &str) -> Option<&Transition> {
        self.states
            .iter()
            .flat_map(|s| &s.transitions)
            .find(|t| t.to == state)
    }

    /// Every place this machine names an action, with the namespace it is looked up in.
    pub fn action_refs(&self) -> Vec<ActionRef<'_>> {
        let mut refs = Vec::new();
        for state in &self.states {
            let ns = state.namespace.as_deref().or(self.namespace.as_deref());
            for (role, name) in [
                (ActionRole::Entry, &state.entry),
                (ActionRole::Action, &state.action),
                (ActionRole::Exit, &state.exit),
            ] {
                if let Some(name) = name {
                    refs.push(ActionRef {
                        name,
                        namespace: ns,
                        role,
                        state: &state.name,
                        event: None,
                    });
                }
            }
            for t in &state.transitions {
                if let Some(name) = &t.action {
                    // Fantasm resolves transition actions in the machine's namespace, not the
                    // state's; an explicit transition namespace wins.
                    refs.push(ActionRef {
                        name,
                        namespace: t.namespace.as_deref().or(self.namespace.as_deref()),
                        role: ActionRole::Transition,
                        state: &state.name,
                        event: Some(&t.event),
                    });
                }
            }
        }
        refs
    }
}

/// Which slot of a state or transition an action fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionRole {
    /// `entry:` runs when the state is entered.
    Entry,
    /// `action:` runs after entry and returns the next event.
    Action,
    /// `exit:` runs when the state is left.
    Exit,
    /// A transition's `action:` runs between the source's exit and the target's entry.
    Transition,
}

impl ActionRole {
    /// The lower-case name used in the `exec` request's `role` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionRole::Entry => "entry",
            ActionRole::Action => "action",
            ActionRole::Exit => "exit",
            ActionRole::Transition => "transition",
        }
    }
}

/// A use of an action name inside a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionRef<'a> {
    /// The name as written.
    pub name: &'a str,
    /// The namespace tried first (`NAMESPACE.NAME`), if any.
    pub namespace: Option<&'a str>,
    /// Which slot it fills.
    pub role: ActionRole,
    /// The state it belongs to (the source state for transition actions).
    pub state: &'a str,
    /// The event of the transition, for transition actions.
    pub event: Option<&'a str>,
}

impl ActionRef<'_> {
    /// The names to look up, in order: `NAMESPACE.NAME` (when there is a namespace), then `NAME`.
    pub fn lookup_names(&self) -> Vec<String> {
        match self.namespace {
            Some(ns) => vec![format!("{ns}.{}", self.name), self.name.to_string()],
            None => vec![self.name.to_string()],
        }
    }
}

/// One state of a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Unique within the machine, `[a-zA-Z0-9-]{1,50}`.
    pub name: String,
    /// Overrides the machine's namespace for this state's entry, action and exit.
    pub namespace: Option<String>,
    /// Runs when the state is entered.
    pub entry: Option<String>,
    /// The main action; returns the next event. Required unless the state is final.
    pub action: Option<String>,
    /// Runs when the state is left.
    pub exit: Option<String>,
    /// The state an instance starts in (exactly one per machine).
    pub initial: bool,
    /// An instance may end here (at least one per machine).
    pub is_final: bool,
    /// The action pages through a dataset, one task per page.
    pub continuation: bool,
    /// Delay before the next page's task.
    pub continuation_countdown: Option<Duration>,
    /// Set when branches join here.
    pub fan_in: Option<FanIn>,
    /// Context key whose value splits the joins of a fan-in state into groups.
    pub fan_in_group: Option<String>,
    /// Set when the state waits for an event from outside (`wait:`) instead of running a main
    /// action.
    pub wait: Option<Wait>,
    /// Outgoing transitions, in file order.
    pub transitions: Vec<Transition>,
}

impl State {
    /// The transition taken on this event, if any.
    pub fn transition(&self, event: &str) -> Option<&Transition> {
        self.transitions.iter().find(|t| t.event == event)
    }

    /// True for a fan-in state.
    pub fn is_fan_in(&self) -> bool {
        self.fan_in.is_some()
    }
}

/// How a waiting state (`wait:`) waits: for any event it has a transition for, sent from
/// outside (`phasm send`, `POST /api/instances/{name}/events`), or until its timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    /// How long it waits before `timeout_event` is dispatched instead (`None`: for ever).
    pub timeout: Option<Duration>,
    /// The event dispatched at the timeout (default [`DEFAULT_TIMEOUT_EVENT`]).
    pub timeout_event: String,
}

/// The event a waiting state's timeout dispatches unless `timeout_event` names another.
pub const DEFAULT_TIMEOUT_EVENT: &str = "timeout";

impl State {
    /// The events a waiting state accepts from outside: those of its transitions.
    pub fn accepted_events(&self) -> impl Iterator<Item = &str> {
        self.transitions.iter().map(|t| t.event.as_str())
    }
}

/// How a fan-in state joins the branches that reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanIn {
    /// Fantasm's batching window: a join runs this long after the first arrival of a window
    /// and takes every branch parked by then.
    Window(Duration),
    /// A barrier: the join runs once, when every live branch of the instance is parked here.
    All,
}

/// An edge: on `event`, go to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The event that selects this transition, unique among its state's transitions.
    pub event: String,
    /// The target state's name (always a state of the same machine).
    pub to: String,
    /// Runs between the source's exit and the target's entry.
    pub action: Option<String>,
    /// Overrides the machine's namespace for this transition's action.
    pub namespace: Option<String>,
    /// Declared delay of this event's task.
    pub countdown: Option<Countdown>,
    /// Declared queue of this event's task.
    pub queue: Option<String>,
    /// Declared worker pool of this event's task.
    pub target: Option<String>,
    /// Declared retry settings of this event's task.
    pub retry: RetrySettings,
    /// The settings the engine uses: declared here, else the machine's, else phasm's defaults.
    pub effective: TransitionPolicy,
}

/// The resolved settings of the task that carries one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionPolicy {
    /// Queue the task runs on.
    pub queue: String,
    /// Worker pool the task is routed to, if any.
    pub target: Option<String>,
    /// Delay before the task is due.
    pub countdown: Countdown,
    /// Retries of a failed attempt.
    pub retry: RetryPolicy,
}

impl TransitionPolicy {
    /// Resolve a transition's declared settings over its machine's, over phasm's defaults.
    pub fn resolve(
        machine: &MachineDefaults<'_>,
        queue: Option<&str>,
        target: Option<&str>,
        countdown: Option<Countdown>,
        retry: &RetrySettings,
    ) -> Self {
        Self {
            queue: queue.or(machine.queue).unwrap_or(DEFAULT_QUEUE).to_string(),
            target: target.or(machine.target).map(str::to_string),
            countdown: countdown
                .or(machine.countdown)
                .unwrap_or(Countdown::Fixed(Duration::ZERO)),
            retry: RetryPolicy::resolve(retry, machine.retry),
        }
    }
}

/// The machine-level settings a transition falls back to.
#[derive(Debug, Clone, Copy)]
pub struct MachineDefaults<'a> {
    /// Machine `queue`.
    pub queue: Option<&'a str>,
    /// Machine `target`.
    pub target: Option<&'a str>,
    /// Machine `countdown`.
    pub countdown: Option<Countdown>,
    /// Machine retry keys.
    pub retry: &'a RetrySettings,
}

/// A task's delay: fixed, or drawn uniformly from a range each time a task is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Countdown {
    /// Always this long.
    Fixed(Duration),
    /// Anywhere from `minimum` to `maximum` (inclusive); `minimum <= maximum` is guaranteed.
    Random {
        /// Shortest delay.
        minimum: Duration,
        /// Longest delay.
        maximum: Duration,
    },
}

impl Countdown {
    /// True when the task is due at once whatever is drawn.
    pub fn is_zero(&self) -> bool {
        match self {
            Countdown::Fixed(d) => d.is_zero(),
            Countdown::Random { maximum, .. } => maximum.is_zero(),
        }
    }
}

/// Retry keys as written on a machine or transition; `None` means "not set here".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetrySettings {
    /// Retries after the first attempt (`task_retry_limit`, or its alias `max_retries`).
    pub task_retry_limit: Option<u32>,
    /// First backoff (`min_backoff_seconds`).
    pub min_backoff: Option<Duration>,
    /// Longest backoff (`max_backoff_seconds`).
    pub max_backoff: Option<Duration>,
    /// No retry starts once the first attempt is this old (`task_age_limit`).
    pub task_age_limit: Option<Duration>,
    /// How many times the backoff doubles before it grows linearly (`max_doublings`).
    pub max_doublings: Option<u32>,
}

impl RetrySettings {
    /// True when no key is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The retry behaviour of one transition's tasks, with App Engine's semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; attempt numbers run from 0 to this.
    pub retry_limit: u32,
    /// Backoff before the first retry.
    pub min_backoff: Duration,
    /// No backoff is longer than this.
    pub max_backoff: Duration,
    /// No retry once the first attempt started this long ago; `None` is no age limit.
    pub age_limit: Option<Duration>,
    /// Doublings of the backoff before it grows linearly.
    pub max_doublings: u32,
}

impl RetryPolicy {
    /// phasm's policy for machines and transitions that set none: 5 retries, backing off
    /// 1 s, 2 s, 4 s, 8 s, 16 s (about half a minute in all), so a broken step fails the
    /// instance quickly instead of retrying forever as App Engine's default did.
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        retry_limit: 5,
        min_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(300),
        age_limit: None,
        max_doublings: 16,
    };

    /// Resolve declared settings over a fallback's, over [`RetryPolicy::DEFAULT`].
    pub fn resolve(own: &RetrySettings, fallback: &RetrySettings) -> Self {
        let d = Self::DEFAULT;
        let min_backoff = own
            .min_backoff
            .or(fallback.min_backoff)
            .unwrap_or(d.min_backoff);
        let max_backoff = own
            .max_backoff
            .or(fallback.max_backoff)
            .unwrap_or(d.max_backoff.max(min_backoff));
        Self {
            retry_limit: own
                .task_retry_limit
                .or(fallback.task_retry_limit)
                .unwrap_or(d.retry_limit),
            min_backoff,
            max_backoff,
            age_limit: own.task_age_limit.or(fallback.task_age_limit),
            max_doublings: own
                .max_doublings
                .or(fallback.max_doublings)
                .unwrap_or(d.max_doublings),
        }
    }

    /// The wait before retry number `retry` (1 for the first retry), App Engine's way: the
    /// minimum backoff doubles `max_doublings` times, then grows by that doubled amount each
    /// retry, and is capped by the maximum backoff.
    pub fn backoff(&self, retry: u32) -> Duration {
        let n = retry.max(1) - 1;
        let min = self.min_backoff.as_secs_f64();
        let doublings = n.min(self.max_doublings);
        let mut secs = min * 2f64.powi(doublings.min(1023) as i32);
        if n > self.max_doublings {
            // After the doublings the interval grows by 2^max_doublings × minimum per retry
            // (Cloud Tasks: 10 s, 20 s, 40 s, 80 s, then 160 s, 240 s, … for 3 doublings).
            secs += secs * f64::from(n - self.max_doublings);
        }
        let capped = secs.min(self.max_backoff.as_secs_f64());
        Duration::try_from_secs_f64(capped).unwrap_or(self.max_backoff)
    }
}

/// How an instance's action log records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Logging {
    /// Records go to phasm's own log output only.
    #[default]
    Default,
    /// Records are also stored with the instance (`phasm logs`).
    Persistent,
}

/// A `context_types` entry: the type name as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextType(pub String);

/// How a context value given as a string is converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Kept as a string (`str`, `unicode`).
    Str,
    /// A whole number (`int`, `long`, `types.IntType`).
    Int,
    /// A floating-point number (`float`).
    Float,
    /// `true`/`false` (`bool`).
    Bool,
    /// Parsed as JSON (`json`, `dict`).
    Json,
    /// An RFC 3339 date-time (`datetime`, `date`).
    Datetime,
    /// Any other type name (Python classes, `pickle`): kept as a string.
    Other,
}

impl ContextType {
    /// The conversion this type name stands for.
    pub fn kind(&self) -> ValueKind {
        match self.0.as_str() {
            "str" | "unicode" | "string" => ValueKind::Str,
            "int" | "long" | "types.IntType" | "types.LongType" => ValueKind::Int,
            "float" | "types.FloatType" => ValueKind::Float,
            "bool" | "types.BooleanType" => ValueKind::Bool,
            "json" | "dict" => ValueKind::Json,
            "datetime" | "date" | "datetime.datetime" | "datetime.date" => ValueKind::Datetime,
            _ => ValueKind::Other,
        }
    }
}

/// How an action name is carried out when no Rust handler is registered for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionBinding {
    /// Run a program per call: one JSON request on stdin, one JSON response on stdout.
    Exec(ExecBinding),
    /// Call a URL per call (a webhook): the same JSON request and response as `exec`.
    Http(HttpBinding),
    /// Built-in continuation: page through the lines of a file.
    Lines(LinesBinding),
    /// Built-in continuation: page through a list in the context.
    List(ListBinding),
}

/// The `http:` binding of an action name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBinding {
    /// The URL, `http://` or `https://`, called with `POST`.
    pub url: String,
    /// Longest a call may take before the attempt fails.
    pub timeout: Option<Duration>,
    /// Extra request headers (e.g. an `Authorization` for the service).
    pub headers: BTreeMap<String, String>,
}

/// The built-in `lines:` action: in a continuation state, each page puts the next `batch`
/// lines of a file into the context (JSON Lines as objects, CSV rows as objects keyed by the
/// header, other files as strings) and returns `event`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinesBinding {
    /// The file, relative to `working_dir` unless absolute.
    pub path: PathBuf,
    /// The folder of the YAML file that declared the binding.
    pub working_dir: PathBuf,
    /// Lines per page (at least 1).
    pub batch: u32,
    /// The context key that receives the page.
    pub into: String,
    /// The event each page returns (`None`: no event, for a final state).
    pub event: Option<String>,
}

/// The built-in `list:` action: in a continuation state, each page puts the next `batch`
/// items of the context's list `key` into `into` and returns `event`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListBinding {
    /// The context key holding a JSON array.
    pub key: String,
    /// Items per page (at least 1).
    pub batch: u32,
    /// The context key that receives the page.
    pub into: String,
    /// The event each page returns.
    pub event: Option<String>,
}

/// The `exec:` binding of an action name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecBinding {
    /// Program and arguments; never empty.
    pub argv: Vec<String>,
    /// The folder of the file that declared the binding: the program runs there, so relative
    /// paths in `argv` are relative to the YAML file.
    pub working_dir: PathBuf,
    /// Longest a call may run before it is killed and the attempt fails.
    pub timeout: Option<Duration>,
}

/// The `python:` section: how phasm runs Python actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonSettings {
    /// Import roots, absolute (default: the folder of the file that declared the section).
    pub path: Vec<PathBuf>,
    /// Host processes per worker (`None`: the number of cores).
    pub processes: Option<u32>,
    /// Longest a step's Python calls may run together before the host is killed and the
    /// attempt fails (`None`: 300 s).
    pub timeout: Option<Duration>,
    /// The Python interpreter (`None`: `python3` on the PATH).
    pub interpreter: Option<String>,
    /// The folder of the file that declared the section: hosts run there.
    pub working_dir: PathBuf,
    /// `path` as written, for writing the section back.
    pub path_as_written: Option<Vec<String>>,
}

/// Limits of one queue, shared by every worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueLimits {
    /// Most tasks of this queue running at once.
    pub max_concurrent: Option<u32>,
    /// Most tasks of this queue started per period.
    pub rate: Option<Rate>,
}

/// A rate such as `20/s`: `count` task starts per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Starts per period (at least 1).
    pub count: u32,
    /// The period.
    pub per: Duration,
}

/// True when `name` is a valid machine, state or event name: `[a-zA-Z0-9-]{1,50}`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LENGTH
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// True when `event` is written as a Fantasm constant reference, e.g. `OK_EVENT` or
/// `module.Class.OK_EVENT`. Fantasm resolved these in Python modules; phasm has none, so the
/// text itself is the event's name and actions return it as written.
pub fn is_constant_reference(event: &str) -> bool {
    let Some(last) = event.rsplit('.').next() else {
        return false;
    };
    let segments_ok = event.split('.').all(|seg| {
        let mut chars = seg.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    let screaming = last.chars().any(|c| c.is_ascii_uppercase())
        && last
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    segments_ok && screaming && event.len() <= 2 * MAX_NAME_LENGTH
}

/// True when `event` may name a transition's event: a valid name or a constant reference.
pub fn is_valid_event(event: &str) -> bool {
    is_valid_name(event) || is_constant_reference(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_fantasm_rule() {
        assert!(is_valid_name("state-1"));
        assert!(is_valid_name(&"a".repeat(50)));
        assert!(!is_valid_name(&"a".repeat(51)));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("bad_name"));
        assert!(!is_valid_name("has space"));
        assert!(!is_valid_name("dotted.name"));
    }

    #[test]
    fn constant_references_are_events_but_lowercase_underscores_are_not() {
        assert!(is_valid_event("OK_EVENT"));
        assert!(is_valid_event("module.Class.OK_EVENT"));
        assert!(is_valid_event("next-event"));
        assert!(!is_valid_event("bad_name"));
        assert!(!is_valid_event("Mixed_Case"));
        assert!(!is_valid_event("A B"));
    }

    #[test]
    fn backoff_doubles_then_grows_linearly_and_is_capped() {
        let p = RetryPolicy {
            retry_limit: 10,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(20),
            age_limit: None,
            max_doublings: 3,
        };
        let secs: Vec<u64> = (1..=8).map(|r| p.backoff(r).as_secs()).collect();
        // 1, 2, 4, 8 (three doublings), then +8 each retry, capped at 20.
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 20, 20, 20]);
    }

    #[test]
    fn zero_doublings_grow_by_the_minimum() {
        let p = RetryPolicy {
            max_doublings: 0,
            ..RetryPolicy::DEFAULT
        };
        let secs: Vec<u64> = (1..=4).map(|r| p.backoff(r).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 3, 4]);
    }

    #[test]
    fn retry_settings_fall_back_field_by_field() {
        let machine = RetrySettings {
            task_retry_limit: Some(10),
            min_backoff: Some(Duration::from_secs(3)),
            ..Default::default()
        };
        let own = RetrySettings {
            task_retry_limit: Some(99),
            ..Default::default()
        };
        let p = RetryPolicy::resolve(&own, &machine);
        assert_eq!(p.retry_limit, 99);
        assert_eq!(p.min_backoff, Duration::from_secs(3));
        assert_eq!(p.max_doublings, RetryPolicy::DEFAULT.max_doublings);
    }

    #[test]
    fn context_type_kinds() {
        assert_eq!(ContextType("types.IntType".into()).kind(), ValueKind::Int);
        assert_eq!(ContextType("json".into()).kind(), ValueKind::Json);
        assert_eq!(
            ContextType("google.appengine.ext.db.Key".into()).kind(),
            ValueKind::Other
        );
    }
}

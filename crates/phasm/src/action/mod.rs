//! What actions are: the [`Action`] trait, the [`ActionContext`] they work with, and the
//! [`Registry`] that binds action names to Rust handlers and to programs (`exec`).

mod builtin;
mod exec;
pub mod host;
#[cfg(feature = "http")]
mod http;
#[cfg(not(feature = "http"))]
#[path = "http_left_out.rs"]
mod http;
pub mod python;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use builtin::{LinesAction, ListAction};
pub use exec::{ExecAction, DEFAULT_EXEC_TIMEOUT, MAX_EXEC_OUTPUT_BYTES};
pub use http::HttpAction;

use crate::clock::{Clock, Micros};
use crate::engine::{Call, Context, LogLine, SpawnRequest};
use crate::machine::{ActionBinding, ActionRole, Config, Logging, Machine};

/// Why an action failed. The attempt fails and is retried by the transition's policy —
/// unless the error is [`ActionError::unavailable`]: then the action could not even start for
/// lack of something the worker provides, and the step is run again later without counting
/// the attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ActionError {
    message: String,
    unavailable: bool,
}

impl ActionError {
    /// An error with this message: the action failed.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            unavailable: false,
        }
    }

    /// The action could not start because the worker lacks a resource (file descriptors,
    /// processes, memory): not the action's failure. The step is postponed and the attempt
    /// is not counted against its retry limit.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            unavailable: true,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the action could not start for lack of the worker's resources (see
    /// [`ActionError::unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        self.unavailable
    }
}

/// Whether an error starting a program means this process is out of a resource (file
/// descriptors, processes, memory) rather than that the program is wrong.
pub fn out_of_resources(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    Errno::from_io_error(e).is_some_and(|n| {
        n == Errno::MFILE || n == Errno::NFILE || n == Errno::AGAIN || n == Errno::NOMEM
    })
}

/// phasm's own secrets in its environment, which no action's process inherits: the API
/// token (`PHASM_TOKEN`, `PHASM_TOKEN_FILE`) and the database URL, which may hold a password
/// (`PHASM_DB`). Everything else in phasm's environment is passed on as it is, so a
/// variable an operator sets for the actions on purpose reaches them.
pub const WITHHELD_ENV: &[&str] = &["PHASM_TOKEN", "PHASM_TOKEN_FILE", "PHASM_DB"];

/// Keep [`WITHHELD_ENV`] out of a program's environment.
pub fn withhold_secrets(command: &mut tokio::process::Command) -> &mut tokio::process::Command {
    for name in WITHHELD_ENV {
        command.env_remove(name);
    }
    command
}

impl From<String> for ActionError {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for ActionError {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<serde_json::Error> for ActionError {
    fn from(e: serde_json::Error) -> Self {
        Self::new(e.to_string())
    }
}

impl From<std::io::Error> for ActionError {
    fn from(e: std::io::Error) -> Self {
        Self::new(e.to_string())
    }
}

/// What an action returns: the next event (only the main action's counts), or an error.
pub type ActionResult = Result<Option<String>, ActionError>;

/// An action: code run in a state's `entry`, `action` or `exit` slot, or on a transition.
///
/// Actions run **at least once**: a step whose worker dies, or whose commit is refused, runs
/// again. Use [`ActionContext::idempotency_key`] to make side effects idempotent.
#[async_trait]
pub trait Action: Send + Sync {
    /// Run once. The main action (role [`ActionRole::Action`]) returns the next event.
    async fn run(&self, cx: &mut ActionContext) -> ActionResult;

    /// For a continuation state's action: given the current page's token (`cx.token()`,
    /// `None` on the first page), return the next page's token, or `None` on the last page.
    /// phasm queues the next page before [`Action::run`] processes this one, so pages run in
    /// parallel. The default, `None`, means the action reports the next token from `run`
    /// instead ([`ActionContext::set_next_token`]), and the next page is queued after it.
    async fn continuation(
        &self,
        _cx: &mut ActionContext,
    ) -> Option<Result<Option<serde_json::Value>, ActionError>> {
        None
    }

    /// How long one call may take. `None` (the default) leaves it to the worker's
    /// `action_timeout`; an action that enforces its own limit (like `exec`) says so here.
    fn timeout(&self) -> Option<std::time::Duration> {
        None
    }
}

/// A closure as an action.
struct FnAction<F>(F);

#[async_trait]
impl<F> Action for FnAction<F>
where
    F: Fn(&mut ActionContext) -> ActionResult + Send + Sync,
{
    async fn run(&self, cx: &mut ActionContext) -> ActionResult {
        (self.0)(cx)
    }
}

/// What an action sees and changes while it runs.
#[derive(Debug)]
pub struct ActionContext {
    pub(crate) machine: String,
    pub(crate) instance: String,
    pub(crate) state: String,
    pub(crate) role: ActionRole,
    pub(crate) event: String,
    pub(crate) task: String,
    pub(crate) attempt: u32,
    pub(crate) context: Context,
    pub(crate) obj: HashMap<String, serde_json::Value>,
    pub(crate) halted: Option<String>,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) persistent: bool,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) contexts: Vec<Context>,
    pub(crate) token: Option<serde_json::Value>,
    pub(crate) next_token: Option<serde_json::Value>,
    pub(crate) forks: Vec<Context>,
    pub(crate) spawns: Vec<SpawnRequest>,
    /// In a continuation page: where an action reports the next page's token before it
    /// finishes, so the worker queues the next page at once (exec's early `token` line).
    pub(crate) early_token: Option<tokio::sync::mpsc::UnboundedSender<serde_json::Value>>,
    /// In a step that enters a waiting state: the token addressing the wait it begins.
    pub(crate) wait_token: Option<String>,
    /// What the step's log lines have used of [`MAX_STEP_LOG_BYTES`], and what was cut.
    pub(crate) log_budget: LogBudget,
}

/// Most bytes of log lines one step keeps (and writes to phasm's own log); past it lines are
/// dropped, and one last line says how much.
pub const MAX_STEP_LOG_BYTES: usize = 64 * 1024;

/// A step's use of [`MAX_STEP_LOG_BYTES`].
#[derive(Debug, Clone, Default)]
pub(crate) struct LogBudget {
    used: usize,
    cut_lines: usize,
    cut_bytes: usize,
}

impl ActionContext {
    /// A context for running actions outside a worker (tests of a single action).
    pub fn new(machine: &str, instance: &str, context: Context, clock: Arc<dyn Clock>) -> Self {
        Self {
            machine: machine.into(),
            instance: instance.into(),
            state: String::new(),
            role: ActionRole::Action,
            event: String::new(),
            task: format!("{instance}--test"),
            attempt: 0,
            context,
            obj: HashMap::new(),
            halted: None,
            logs: Vec::new(),
            persistent: true,
            clock,
            contexts: Vec::new(),
            token: None,
            next_token: None,
            forks: Vec::new(),
            spawns: Vec::new(),
            early_token: None,
            wait_token: None,
            log_budget: LogBudget::default(),
        }
    }

    /// In a step that enters a waiting state (`wait:`): the token that addresses the wait it
    /// begins, for a system outside to end it with `POST /api/waits/{token}` (or `phasm send
    /// --token`). The same on every attempt of the step, so an entry action may send it
    /// before a retry. `None` in other steps.
    pub fn wait_token(&self) -> Option<&str> {
        self.wait_token.as_deref()
    }

    /// The machine's name.
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// The instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The state this call belongs to.
    pub fn state(&self) -> &str {
        &self.state
    }

    /// Which slot the running action fills.
    pub fn role(&self) -> ActionRole {
        self.role
    }

    /// The event being dispatched (`pseudo-init` when entering the initial state).
    pub fn event(&self) -> &str {
        &self.event
    }

    /// A key unique to this step of this instance and the same on every attempt of it: use
    /// it to make side effects idempotent (e.g. as a payment provider's idempotency key).
    pub fn idempotency_key(&self) -> &str {
        &self.task
    }

    /// Earlier attempts of this step (0 on the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// A context value, converted from JSON; `Ok(None)` when absent.
    ///
    /// # Errors
    /// When the stored value does not convert to `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ActionError> {
        match self.context.get(key) {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| ActionError::new(format!("context key `{key}`: {e}"))),
        }
    }

    /// Set a context value (carried to the next step).
    ///
    /// # Errors
    /// When the value cannot be represented as JSON.
    pub fn put<T: Serialize>(&mut self, key: &str, value: T) -> Result<(), ActionError> {
        let v = serde_json::to_value(value)?;
        self.context.insert(key.to_string(), v);
        Ok(())
    }

    /// Remove a context value, returning it.
    pub fn remove(&mut self, key: &str) -> Option<serde_json::Value> {
        self.context.remove(key)
    }

    /// The whole context.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The whole context, to change.
    pub fn context_mut(&mut self) -> &mut Context {
        &mut self.context
    }

    /// A scratch map shared by the actions of one step and then dropped (Fantasm's `obj`):
    /// for values that must not be stored, such as open handles' descriptions or caches.
    pub fn scratch(&mut self) -> &mut HashMap<String, serde_json::Value> {
        &mut self.obj
    }

    /// Stop the machine deliberately after this action: the instance ends `halted`, nothing
    /// is retried, pending work of the instance is dropped.
    pub fn halt(&mut self, reason: impl Into<String>) {
        self.halted = Some(reason.into());
    }

    /// Write a log line. It goes to phasm's own log output, and is kept with the instance
    /// (`phasm logs`) when the machine has `logging: persistent`.
    ///
    /// Once the step's lines reach [`MAX_STEP_LOG_BYTES`], later ones are only counted, and
    /// [`ActionContext::take_logs`] ends the step's lines with one saying how much was cut.
    pub fn log(&mut self, level: &str, message: impl Into<String>) {
        let message = message.into();
        let budget = &mut self.log_budget;
        if budget.used + message.len() > MAX_STEP_LOG_BYTES {
            budget.cut_lines += 1;
            budget.cut_bytes += message.len();
            return;
        }
        budget.used += message.len();
        // The action's own words: phasm's log output shows them at `info` (`RUST_LOG=info`),
        // whatever level the action chose, which is kept with the record.
        tracing::info!(instance = %self.instance, state = %self.state, level, "{message}");
        if self.persistent {
            self.logs.push(LogLine {
                at: self.clock.now(),
                level: level.to_string(),
                message,
                task: self.task.clone(),
            });
        }
    }

    /// The step's log lines, ending with one that says how many were cut past
    /// [`MAX_STEP_LOG_BYTES`] (when any were).
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        let budget = std::mem::take(&mut self.log_budget);
        let mut logs = std::mem::take(&mut self.logs);
        if budget.cut_lines > 0 {
            let message = format!(
                "… {} more log lines ({} bytes) cut: a step keeps at most {} KiB of log",
                budget.cut_lines,
                budget.cut_bytes,
                MAX_STEP_LOG_BYTES / 1024
            );
            tracing::info!(instance = %self.instance, state = %self.state, "{message}");
            if self.persistent {
                logs.push(LogLine {
                    at: self.clock.now(),
                    level: "warning".into(),
                    message,
                    task: self.task.clone(),
                });
            }
        }
        logs
    }

    /// Shorthand for `log("info", …)`.
    pub fn info(&mut self, message: impl Into<String>) {
        self.log("info", message);
    }

    /// Shorthand for `log("warning", …)`.
    pub fn warn(&mut self, message: impl Into<String>) {
        self.log("warning", message);
    }

    /// The current time.
    pub fn now(&self) -> Micros {
        self.clock.now()
    }

    /// At a fan-in state: the contexts of the branches being joined, in order of arrival.
    /// The joined branch goes on with [`ActionContext::context`], which starts as the first
    /// of them.
    pub fn contexts(&self) -> &[Context] {
        &self.contexts
    }

    /// In a continuation state: the current page's token (`None` on the first page).
    pub fn token(&self) -> Option<&serde_json::Value> {
        self.token.as_ref()
    }

    /// In a continuation state: the next page's token (none set: this is the last page).
    pub fn set_next_token(&mut self, token: serde_json::Value) {
        self.next_token = Some(token);
    }

    /// Fork the machine: a copy of the current context with `data` merged in becomes a new
    /// branch, which takes the same next event as this one. N forks make N+1 branches.
    pub fn fork(&mut self, data: Context) {
        let mut copy = self.context.clone();
        copy.extend(data);
        self.forks.push(copy);
    }

    /// Start one instance of `machine` per context when this step commits. Retries of the
    /// step start nothing twice: the instances are named after the step.
    pub fn spawn(&mut self, machine: &str, contexts: Vec<Context>) {
        self.spawn_after(machine, contexts, std::time::Duration::ZERO);
    }

    /// As [`ActionContext::spawn`], the instances starting `countdown` after the commit.
    pub fn spawn_after(
        &mut self,
        machine: &str,
        contexts: Vec<Context>,
        countdown: std::time::Duration,
    ) {
        self.spawns.push(SpawnRequest {
            machine: machine.to_string(),
            contexts,
            countdown,
        });
    }
}

/// Action names bound to implementations: Rust handlers registered by name, and the `exec`
/// bindings of a configuration. A name is looked up as `NAMESPACE.NAME`, then `NAME`; a Rust
/// handler wins over an `exec` binding of the same name.
#[derive(Clone, Default)]
pub struct Registry {
    rust: HashMap<String, Arc<dyn Action>>,
    exec: HashMap<String, Arc<dyn Action>>,
    /// The configuration has a `python:` section: other names are Python actions.
    python_declared: bool,
    /// The hosts running them, once started, and the references they resolved.
    hosts: Option<(Arc<host::HostPool>, std::collections::HashSet<String>)>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rust: Vec<_> = self.rust.keys().collect();
        rust.sort();
        let mut exec: Vec<_> = self.exec.keys().collect();
        exec.sort();
        f.debug_struct("Registry")
            .field("rust", &rust)
            .field("exec", &exec)
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bind a name to a Rust action.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        action: impl Action + 'static,
    ) -> &mut Self {
        self.rust.insert(name.into(), Arc::new(action));
        self
    }

    /// Bind a name to a closure.
    pub fn register_fn<F>(&mut self, name: impl Into<String>, f: F) -> &mut Self
    where
        F: Fn(&mut ActionContext) -> ActionResult + Send + Sync + 'static,
    {
        self.register(name, FnAction(f))
    }

    /// Bind the Python actions a host pool resolved (see [`python::start`]).
    pub fn bind_hosts(&mut self, pool: Arc<host::HostPool>, references: Vec<String>) {
        self.hosts = Some((pool, references.into_iter().collect()));
    }

    /// The host pool running this registry's Python actions, if started.
    pub fn hosts(&self) -> Option<&Arc<host::HostPool>> {
        self.hosts.as_ref().map(|(pool, _)| pool)
    }

    /// Whether a Rust handler or an `actions:` binding takes one of these names.
    pub fn binds_outside_python(&self, names: &[String]) -> bool {
        names.iter().any(|n| self.lookup(n).is_some())
    }

    /// The host pool and reference for a call that a Python action carries out.
    pub fn hosted(&self, call: &Call) -> Option<(&Arc<host::HostPool>, String)> {
        let (pool, references) = self.hosts.as_ref()?;
        if self.resolve(call).is_some() {
            return None;
        }
        let reference = python::reference(&call.action, call.namespace.as_deref());
        references.contains(&reference).then_some((pool, reference))
    }

    /// Add the `exec` bindings of a configuration.
    pub fn bind_config(&mut self, config: &Config) -> &mut Self {
        self.python_declared |= config.python.is_some();
        for (name, binding) in &config.actions {
            let action: Arc<dyn Action> = match binding {
                ActionBinding::Exec(exec) => Arc::new(ExecAction::new(exec.clone())),
                ActionBinding::Http(http) => Arc::new(HttpAction::new(http.clone())),
                ActionBinding::Lines(lines) => Arc::new(LinesAction::new(lines.clone())),
                ActionBinding::List(list) => Arc::new(ListAction::new(list.clone())),
            };
            self.exec.insert(name.clone(), action);
        }
        self
    }

    /// A registry with this one's Rust handlers only: where another version of a machine
    /// starts, its `actions:` bindings and Python hosts being its own.
    pub fn handlers_only(&self) -> Registry {
        Registry {
            rust: self.rust.clone(),
            ..Registry::default()
        }
    }

    /// Names registered in Rust.
    pub fn rust_names(&self) -> Vec<String> {
        self.rust.keys().cloned().collect()
    }

    fn lookup(&self, name: &str) -> Option<Arc<dyn Action>> {
        self.rust.get(name).or_else(|| self.exec.get(name)).cloned()
    }

    /// The action a call runs, if bound.
    pub fn resolve(&self, call: &Call) -> Option<Arc<dyn Action>> {
        call.namespace
            .as_ref()
            .and_then(|ns| self.lookup(&format!("{ns}.{}", call.action)))
            .or_else(|| self.lookup(&call.action))
    }

    /// Every action name of `machine` that is bound to nothing, described for an error
    /// message (`state `s` action `X` (tried `ns.X`, `X`)`).
    pub fn unbound(&self, machine: &Machine) -> Vec<String> {
        let mut missing = Vec::new();
        for r in machine.action_refs() {
            let names = r.lookup_names();
            let python = self.python_declared && {
                let reference = python::reference(r.name, r.namespace);
                self.hosts
                    .as_ref()
                    .is_none_or(|(_, refs)| refs.contains(&reference))
            };
            if !python && names.iter().all(|n| self.lookup(n).is_none()) {
                let place = match r.event {
                    Some(e) => format!("transition `{}--{e}`", r.state),
                    None => format!("state `{}` {}", r.state, r.role.as_str()),
                };
                let tried: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
                missing.push(format!(
                    "{place}: `{}` (looked up as {})",
                    r.name,
                    tried.join(" or ")
                ));
            }
        }
        missing
    }
}

/// Whether a machine's action logs are kept with its instances.
pub(crate) fn keeps_logs(machine: &Machine) -> bool {
    machine.logging == Logging::Persistent
}

#[cfg(test)]
mod log_budget_tests {
    use super::*;

    #[test]
    fn a_step_keeps_at_most_its_log_budget_and_says_what_was_cut() {
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let mut cx = ActionContext::new("M", "i", Context::new(), clock);
        let line = "x".repeat(1024);
        for _ in 0..200 {
            cx.info(line.clone());
        }
        let logs = cx.take_logs();
        let kept: usize = logs.iter().map(|l| l.message.len()).sum();
        assert!(kept <= MAX_STEP_LOG_BYTES + 200, "{kept} bytes kept");
        assert_eq!(logs.len(), 65);
        let last = &logs.last().unwrap().message;
        assert!(
            last.contains("136 more log lines (139264 bytes) cut"),
            "{last}"
        );
        // The next step starts with a full budget.
        cx.info("again");
        assert_eq!(cx.take_logs().len(), 1);
    }
}

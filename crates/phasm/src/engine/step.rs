//! One step as the engine runs it: which calls, in what order, when to stop, and when a
//! continuation's next page is committed — decided here, as data, and carried out by the
//! worker.
//!
//! The worker drives a [`Step`] and does only IO:
//!
//! 1. [`Step::begin`] either returns the step's commit at once ([`Begin::Commit`]: the machine
//!    is unknown or no longer matches the task, earlier attempts used up its retries, or a
//!    window join has nothing left to join) or a [`Step`] to run.
//! 2. While [`Step::pending_calls`] is not empty, the worker runs the first of them (or several
//!    at once, when one host carries them out) and reports with [`Step::ran`], which records the
//!    main action's event and stops the calls when an action halted the machine.
//! 3. When a continuation's action reports its next page's token (before the page is
//!    processed, so pages overlap), [`Step::next_page`] returns the commit that queues that page —
//!    fenced by this page's lease, the task kept — for the worker to apply before the action goes
//!    on; `None` when the page is queued already (by an earlier attempt, or an earlier report).
//! 4. [`Step::finish`] turns what the actions produced into the step's commit; [`Step::fail`]
//!    and [`Step::postpone`] turn a failure into it.

use crate::clock::Micros;
use crate::machine::{ActionRole, Config, Machine};

use super::{
    complete, failed_attempt, lost_attempts, mistake, next_page, plan, postponed, Call, Commit,
    Disposition, Limits, LogLine, Outcome, Plan, StepTimes, Task, TaskKind, POSTPONE_DELAY,
};

/// How a step begins.
#[derive(Debug)]
pub enum Begin<'a> {
    /// Run its actions.
    Run(Step<'a>),
    /// Nothing to run: apply this commit.
    Commit(Commit),
}

/// A step being run (see the module doc).
#[derive(Debug)]
pub struct Step<'a> {
    machine: &'a Machine,
    task: &'a Task,
    plan: Plan,
    /// Calls run so far.
    done: usize,
    /// The state entered is a continuation: its main action is asked for the next page first.
    continuation: bool,
    /// The next page is queued (before this attempt, or by it).
    page_queued: bool,
    /// The main action's event.
    event: Option<String>,
    /// An action halted the machine: no further call runs.
    halted: bool,
}

impl<'a> Step<'a> {
    /// Begin running `task` (claimed at `started`) of a machine of `config`.
    pub fn begin(config: &'a Config, task: &'a Task, started: Micros) -> Begin<'a> {
        let Some(machine) = config.machine(&task.machine) else {
            return Begin::Commit(mistake(
                task,
                format!("unknown machine `{}`", task.machine),
                started,
            ));
        };
        if let Some(commit) = lost_attempts(machine, task, started) {
            return Begin::Commit(commit);
        }
        let plan = match plan(machine, task) {
            Ok(plan) => plan,
            Err(e) => return Begin::Commit(mistake(task, e.0, started)),
        };
        if task.kind == TaskKind::Join && task.contexts.is_empty() {
            // Every branch of this window was taken by an earlier join: nothing to do.
            return Begin::Commit(Commit::finishing(task));
        }
        let continuation = task.kind.dispatches()
            && plan
                .to_state
                .as_deref()
                .and_then(|s| machine.state(s))
                .is_some_and(|s| s.continuation);
        Begin::Run(Step {
            machine,
            task,
            plan,
            done: 0,
            continuation,
            page_queued: task.next_page_queued,
            event: None,
            halted: false,
        })
    }

    /// The task.
    pub fn task(&self) -> &'a Task {
        self.task
    }

    /// Its machine.
    pub fn machine(&self) -> &'a Machine {
        self.machine
    }

    /// The calls still to run, in Fantasm's order (source exit, transition action, target
    /// entry, target action); empty once every call ran or an action halted the machine.
    pub fn pending_calls(&self) -> &[Call] {
        if self.halted {
            return &[];
        }
        self.plan.calls.get(self.done..).unwrap_or_default()
    }

    /// Whether `call` is a continuation's main action, asked for its next page before it runs.
    pub fn asks_for_next_page(&self, call: &Call) -> bool {
        self.continuation && call.role == ActionRole::Action
    }

    /// The first `n` pending calls ran: `event` is what the main action returned if it was
    /// among them, `halted` whether an action halted the machine (no further call runs).
    pub fn ran(&mut self, n: usize, event: Option<String>, halted: bool) {
        debug_assert!(
            n >= 1 && n <= self.pending_calls().len(),
            "ran calls that were pending"
        );
        let ran = self
            .plan
            .calls
            .get(self.done..self.done + n)
            .unwrap_or_default();
        if ran.iter().any(|c| c.role == ActionRole::Action) {
            self.event = event;
        }
        self.done += n;
        self.halted |= halted;
    }

    /// A continuation reported its next page's `token` at `now`: the commit queueing that page
    /// (the task kept, fenced by its lease), to apply before the action goes on — or `None`
    /// when the page is queued already or the token is null (no more pages).
    pub fn next_page(&mut self, token: serde_json::Value, now: Micros) -> Option<Commit> {
        if self.page_queued || token.is_null() || !self.continuation {
            return None;
        }
        self.page_queued = true;
        Some(Commit {
            disposition: Disposition::Keep,
            new_tasks: vec![next_page(self.machine, self.task, token, now)],
            ..Commit::finishing(self.task)
        })
    }

    /// The step's commit, once the calls are over (every call ran, or one halted the machine),
    /// from what the actions produced; the machines it spawns are looked up in `spawnable`
    /// (each child starts on the latest version of its machine).
    pub fn finish(
        self,
        spawnable: &Config,
        mut outcome: Outcome,
        times: StepTimes,
        rng: &mut fastrand::Rng,
        limits: &Limits,
    ) -> Commit {
        debug_assert!(
            self.pending_calls().is_empty(),
            "a step finishes after its calls"
        );
        debug_assert_eq!(
            outcome.halted.is_some(),
            self.halted,
            "halts are reported to ran"
        );
        outcome.event = self.event;
        if self.page_queued {
            // Queued before the page was processed; a token the action also returned at
            // the end is the same page.
            outcome.next_token = None;
        }
        complete(
            self.machine,
            spawnable,
            self.task,
            &self.plan,
            outcome,
            times,
            rng,
            limits,
        )
    }

    /// The commit of a failed attempt (`error` says which call failed and how): a retry after
    /// the backoff, or the instance's failure; `logs` are what the step logged before it.
    pub fn fail(self, error: String, now: Micros, mut logs: Vec<LogLine>) -> Commit {
        let mut commit = failed_attempt(self.machine, self.task, error, now);
        logs.append(&mut commit.logs);
        commit.logs = logs;
        commit
    }

    /// The commit of a step the worker could not start for lack of its own resources: run
    /// again after [`POSTPONE_DELAY`], the attempt not counted.
    pub fn postpone(self, reason: String, now: Micros, logs: Vec<LogLine>) -> Commit {
        postponed(self.task, reason, now, POSTPONE_DELAY, logs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, LoadOptions};
    use crate::engine::{Context, InstanceChange};

    const MACHINE: &str = "
state_machines:
  - name: pages
    states:
      - name: start
        initial: true
        action: a.Start
        exit: a.Leave
        transitions:
          - event: next
            to: middle
            action: a.Move
      - name: middle
        entry: a.Enter
        action: a.Middle
        transitions:
          - event: pages
            to: page
      - name: page
        continuation: true
        entry: a.PageEntry
        action: a.Page
        final: true
";

    fn config() -> Config {
        match load_str(MACHINE, "pages.yaml", &LoadOptions::default()) {
            Ok(loaded) => loaded.config,
            Err(e) => panic!("{e:?}"),
        }
    }

    fn task(from: Option<&str>, event: &str) -> Task {
        Task {
            id: 1,
            claim: 1,
            instance: "i".into(),
            machine: "pages".into(),
            name: "i--t".into(),
            from_state: from.map(str::to_string),
            event: event.into(),
            kind: TaskKind::Dispatch,
            context: Context::new(),
            step: 0,
            branch: String::new(),
            attempt: 0,
            first_attempt_at: 0,
            queue: "default".into(),
            token: None,
            contexts: Vec::new(),
            next_page_queued: false,
            version: None,
        }
    }

    fn run<'a>(config: &'a Config, task: &'a Task) -> Step<'a> {
        match Step::begin(config, task, 0) {
            Begin::Run(step) => step,
            Begin::Commit(c) => panic!("expected a step to run, got {c:?}"),
        }
    }

    #[test]
    fn calls_come_in_fantasms_order() {
        let config = config();
        let task = task(Some("start"), "next");
        let mut step = run(&config, &task);
        let names: Vec<_> = step
            .pending_calls()
            .iter()
            .map(|c| c.action.as_str())
            .collect();
        assert_eq!(names, ["a.Leave", "a.Move", "a.Enter", "a.Middle"]);
        assert!(step
            .pending_calls()
            .iter()
            .all(|c| !step.asks_for_next_page(c)));
        assert!(
            step.next_page(serde_json::json!(2), 5).is_none(),
            "only a continuation has pages"
        );
        step.ran(3, Some("ignored".into()), false);
        step.ran(1, Some("pages".into()), false);
        assert!(step.pending_calls().is_empty());
        assert_eq!(
            step.event.as_deref(),
            Some("pages"),
            "only the main action's event counts"
        );
    }

    #[test]
    fn a_continuation_queues_its_next_page_once() {
        let config = config();
        let task = task(Some("middle"), "pages");
        let mut step = run(&config, &task);
        let asks: Vec<_> = step
            .pending_calls()
            .iter()
            .map(|c| step.asks_for_next_page(c))
            .collect();
        assert_eq!(asks, [false, true]);
        step.ran(1, None, false);
        assert!(
            step.next_page(serde_json::Value::Null, 5).is_none(),
            "null: the last page"
        );
        let page = step.next_page(serde_json::json!(2), 5);
        let page = page.unwrap_or_else(|| panic!("the first token queues the next page"));
        assert_eq!(page.disposition, Disposition::Keep);
        assert_eq!(page.new_tasks.len(), 1);
        assert_eq!(page.new_tasks[0].token, Some(serde_json::json!(2)));
        assert!(
            step.next_page(serde_json::json!(2), 6).is_none(),
            "the page is queued once"
        );
    }

    #[test]
    fn a_halt_stops_the_remaining_calls() {
        let config = config();
        let task = task(Some("start"), "next");
        let mut step = run(&config, &task);
        step.ran(1, None, true);
        assert!(step.pending_calls().is_empty());
        let outcome = Outcome {
            halted: Some("enough".into()),
            ..Outcome::default()
        };
        let times = StepTimes {
            started_at: 0,
            now: 1,
        };
        let commit = step.finish(
            &config,
            outcome,
            times,
            &mut fastrand::Rng::with_seed(1),
            &Limits::default(),
        );
        assert_eq!(
            commit.instance_change,
            InstanceChange::Halt("enough".into())
        );
    }

    #[test]
    fn a_page_queued_by_an_earlier_attempt_is_not_queued_again() {
        let config = config();
        let mut task = task(Some("middle"), "pages");
        task.next_page_queued = true;
        let mut step = run(&config, &task);
        assert!(step.next_page(serde_json::json!(2), 1).is_none());
    }

    #[test]
    fn steps_with_nothing_to_run_commit_at_once() {
        let config = config();
        let mut unknown = task(Some("start"), "next");
        unknown.machine = "gone".into();
        let Begin::Commit(c) = Step::begin(&config, &unknown, 0) else {
            panic!("an unknown machine is a mistake");
        };
        assert!(matches!(c.disposition, Disposition::Failed { .. }));
        let mut join = task(Some("page"), "fan-in");
        join.kind = TaskKind::Join;
        let Begin::Commit(c) = Step::begin(&config, &join, 0) else {
            panic!("an empty join has nothing to run");
        };
        assert_eq!(c, Commit::finishing(&join));
    }
}

use super::*;
use crate::config::{load_str, LoadOptions};
use crate::machine::Config;

const YAML: &str = r"
state_machines:
- name: M
  task_retry_limit: 2
  min_backoff_seconds: 1
  states:
  - name: a
    initial: true
    entry: EnterA
    action: DoA
    exit: ExitA
    transitions:
    - event: next
      to: b
      action: Move
      countdown: 20
      queue: q1
    - event: wait
      to: b
      countdown: {minimum: 30, maximum: 60}
      task_retry_limit: 0
  - name: b
    entry: EnterB
    action: DoB
    transitions:
    - event: done
      to: c
    - event: done-quietly
      to: d
  - name: c
    final: true
    action: DoC
    exit: ExitC
  - name: d
    final: true
";

fn config() -> Config {
    load_str(YAML, "m.yaml", &LoadOptions::default())
        .expect("valid")
        .config
}

fn task(from: Option<&str>, event: &str) -> Task {
    Task {
        id: 7,
        claim: 3,
        instance: "M-1".into(),
        machine: "M".into(),
        name: "t".into(),
        from_state: from.map(str::to_string),
        event: event.into(),
        kind: TaskKind::Dispatch,
        context: Context::new(),
        step: 4,
        branch: String::new(),
        attempt: 0,
        first_attempt_at: 1_000,
        queue: "default".into(),
        token: None,
        contexts: Vec::new(),
        next_page_queued: false,
        version: None,
    }
}

fn roles(plan: &Plan) -> Vec<(ActionRole, &str)> {
    plan.calls
        .iter()
        .map(|c| (c.role, c.action.as_str()))
        .collect()
}

fn outcome(event: Option<&str>) -> Outcome {
    Outcome {
        event: event.map(str::to_string),
        ..Outcome::default()
    }
}

fn run(t: &Task, event: Option<&str>) -> Commit {
    let c = config();
    let m = c.machine("M").unwrap();
    let p = plan(m, t).unwrap();
    let mut rng = fastrand::Rng::with_seed(1);
    complete(
        machine_of(&c, t),
        &c,
        t,
        &p,
        outcome(event),
        StepTimes {
            started_at: 100,
            now: 1_000_000,
        },
        &mut rng,
        &Limits::default(),
    )
}

#[test]
fn start_task_enters_the_initial_state() {
    let c = config();
    let m = c.machine("M").unwrap();
    let p = plan(m, &task(None, PSEUDO_INIT)).unwrap();
    assert_eq!(p.to_state.as_deref(), Some("a"));
    assert_eq!(
        roles(&p),
        [(ActionRole::Entry, "EnterA"), (ActionRole::Action, "DoA")]
    );
    let s = start_task(m, "M-1", Context::new(), 5);
    assert_eq!(s.name, "M-1--pseudo-init--pseudo-init--a--step-0");
    assert_eq!(s.due_at, 5);
}

#[test]
fn dispatch_runs_exit_transition_entry_action_in_order() {
    let c = config();
    let p = plan(c.machine("M").unwrap(), &task(Some("a"), "next")).unwrap();
    assert_eq!(p.to_state.as_deref(), Some("b"));
    assert_eq!(
        roles(&p),
        [
            (ActionRole::Exit, "ExitA"),
            (ActionRole::Transition, "Move"),
            (ActionRole::Entry, "EnterB"),
            (ActionRole::Action, "DoB")
        ]
    );
}

#[test]
fn final_exit_runs_only_the_exit_action() {
    let c = config();
    let mut t = task(Some("c"), PSEUDO_FINAL);
    t.kind = TaskKind::FinalExit;
    let p = plan(c.machine("M").unwrap(), &t).unwrap();
    assert_eq!(p.to_state, None);
    assert_eq!(roles(&p), [(ActionRole::Exit, "ExitC")]);
    let commit = run(&t, None);
    assert!(matches!(
        commit.instance_change,
        InstanceChange::BranchEnded(_)
    ));
    assert_eq!(commit.history[0].event, PSEUDO_FINAL);
}

#[test]
fn an_event_queues_the_next_task_with_its_transition_settings() {
    let commit = run(&task(None, PSEUDO_INIT), Some("next"));
    assert_eq!(commit.disposition, Disposition::Finished);
    let h = commit.history[0].clone();
    assert_eq!(
        (h.from, h.event.as_str(), h.to.as_str()),
        (None, PSEUDO_INIT, "a")
    );
    let [next] = commit.new_tasks.as_slice() else {
        panic!("one task")
    };
    assert_eq!(next.name, "M-1--a--next--b--step-5");
    assert_eq!(next.queue, "q1");
    assert_eq!(next.due_at, 1_000_000 + 20_000_000);
    assert_eq!(next.from_state.as_deref(), Some("a"));
}

#[test]
fn random_countdowns_stay_in_range() {
    for seed in 0..50 {
        let c = config();
        let m = c.machine("M").unwrap();
        let t = task(None, PSEUDO_INIT);
        let p = plan(m, &t).unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        let commit = complete(
            machine_of(&c, &t),
            &c,
            &t,
            &p,
            outcome(Some("wait")),
            StepTimes {
                started_at: 0,
                now: 0,
            },
            &mut rng,
            &Limits::default(),
        );
        let due = commit.new_tasks[0].due_at;
        assert!((30_000_000..=60_000_000).contains(&due), "{due}");
    }
}

#[test]
fn no_event_in_a_final_state_ends_the_branch_or_queues_its_exit() {
    let quiet = run(&task(Some("b"), "done-quietly"), None);
    assert!(matches!(
        quiet.instance_change,
        InstanceChange::BranchEnded(_)
    ));
    assert!(quiet.new_tasks.is_empty());
    let with_exit = run(&task(Some("b"), "done"), None);
    assert_eq!(with_exit.instance_change, InstanceChange::None);
    let [exit] = with_exit.new_tasks.as_slice() else {
        panic!()
    };
    assert_eq!(exit.kind, TaskKind::FinalExit);
    assert_eq!(exit.name, "M-1--c--pseudo-final--pseudo-final--step-5");
}

#[test]
fn no_event_in_a_non_final_state_fails_the_branch_without_retry() {
    let commit = run(&task(Some("a"), "next"), None);
    let InstanceChange::Fail(error) = &commit.instance_change else {
        panic!("{commit:?}")
    };
    assert!(
        error.contains("`DoB` of state `b` (machine `M`) returned no event"),
        "{error}"
    );
    assert!(matches!(commit.disposition, Disposition::Failed { .. }));
    assert!(commit.history.is_empty() && commit.new_tasks.is_empty());
}

#[test]
fn unknown_and_invalid_events_fail_the_branch_naming_machine_state_and_event() {
    let unknown = run(&task(Some("a"), "next"), Some("nope"));
    let InstanceChange::Fail(error) = &unknown.instance_change else {
        panic!()
    };
    assert!(
        error.contains("state `b` of machine `M` returned event `nope`"),
        "{error}"
    );
    assert!(error.contains("its events: done, done-quietly"), "{error}");
    let invalid = run(&task(Some("a"), "next"), Some("bad event"));
    let InstanceChange::Fail(error) = &invalid.instance_change else {
        panic!()
    };
    assert!(error.contains("not a valid event name"), "{error}");
}

#[test]
fn halting_ends_the_instance_without_history() {
    let c = config();
    let m = c.machine("M").unwrap();
    let t = task(Some("a"), "next");
    let p = plan(m, &t).unwrap();
    let out = Outcome {
        halted: Some("stop".into()),
        event: Some("done".into()),
        ..Outcome::default()
    };
    let commit = complete(
        machine_of(&c, &t),
        &c,
        &t,
        &p,
        out,
        StepTimes {
            started_at: 0,
            now: 0,
        },
        &mut fastrand::Rng::with_seed(0),
        &Limits::default(),
    );
    assert_eq!(commit.instance_change, InstanceChange::Halt("stop".into()));
    assert!(commit.new_tasks.is_empty() && commit.history.is_empty());
}

#[test]
fn an_oversized_context_is_refused_and_fails_the_branch() {
    let c = config();
    let m = c.machine("M").unwrap();
    let t = task(Some("a"), "next");
    let p = plan(m, &t).unwrap();
    let mut context = Context::new();
    context.insert("blob".into(), serde_json::Value::String("x".repeat(2000)));
    let out = Outcome {
        context,
        event: Some("done".into()),
        ..Outcome::default()
    };
    let limits = Limits {
        max_context_bytes: 1000,
        ..Limits::default()
    };
    let commit = complete(
        machine_of(&c, &t),
        &c,
        &t,
        &p,
        out,
        StepTimes {
            started_at: 0,
            now: 0,
        },
        &mut fastrand::Rng::with_seed(0),
        &limits,
    );
    let InstanceChange::Fail(error) = &commit.instance_change else {
        panic!()
    };
    assert!(error.contains("over the limit of 1000 bytes"), "{error}");
    assert!(commit.new_tasks.is_empty());
}

#[test]
fn failed_attempts_back_off_then_fail_at_the_retry_limit() {
    let c = config();
    let m = c.machine("M").unwrap();
    let mut t = task(Some("a"), "next");
    // Machine: 2 retries, 1 s minimum backoff.
    let first = failed_attempt(m, &t, "boom".into(), 10_000_000);
    assert_eq!(
        first.disposition,
        Disposition::Retry {
            due_at: 11_000_000,
            error: "boom".into()
        }
    );
    t.attempt = 1;
    let second = failed_attempt(m, &t, "boom".into(), 10_000_000);
    assert_eq!(
        second.disposition,
        Disposition::Retry {
            due_at: 12_000_000,
            error: "boom".into()
        }
    );
    t.attempt = 2;
    let last = failed_attempt(m, &t, "boom".into(), 10_000_000);
    assert!(
        matches!(&last.disposition, Disposition::Failed { error } if error == "boom (after 3 attempts)")
    );
    assert!(matches!(last.instance_change, InstanceChange::Fail(_)));
}

#[test]
fn the_queuing_transitions_policy_applies() {
    let c = config();
    let m = c.machine("M").unwrap();
    // `wait` has task_retry_limit 0: the first failure is final.
    let t = task(Some("a"), "wait");
    assert!(matches!(
        failed_attempt(m, &t, "x".into(), 0).disposition,
        Disposition::Failed { .. }
    ));
    assert_eq!(retry_policy(m, &task(None, PSEUDO_INIT)).retry_limit, 2);
}

#[test]
fn the_age_limit_stops_retries() {
    let yaml = YAML.replace(
        "task_retry_limit: 2",
        "task_retry_limit: 100\n  task_age_limit: 10",
    );
    let c = load_str(&yaml, "m.yaml", &LoadOptions::default())
        .unwrap()
        .config;
    let m = c.machine("M").unwrap();
    let mut t = task(Some("a"), "next");
    t.attempt = 3;
    t.first_attempt_at = 0;
    let commit = failed_attempt(m, &t, "x".into(), 9_000_000);
    assert!(
        matches!(&commit.disposition, Disposition::Failed { error } if error.contains("age limit"))
    );
}

#[test]
fn a_task_from_an_edited_machine_is_a_plan_error() {
    let c = config();
    let err = plan(c.machine("M").unwrap(), &task(Some("gone"), "next")).unwrap_err();
    assert!(err.0.contains("has no state `gone`"), "{err}");
}

#[test]
fn instance_names_follow_fantasm() {
    let mut rng = fastrand::Rng::with_seed(9);
    let name = instance_name("Order", 1_764_324_000_000_000, &mut rng);
    assert!(name.starts_with("Order-20251128"), "{name}");
    assert_eq!(name.len(), "Order-".len() + 14 + 1 + 6);
    assert!(is_valid_instance_name(&name));
    assert!(!is_valid_instance_name("has space"));
    assert!(!is_valid_instance_name("."));
    assert!(!is_valid_instance_name(".."));
    assert!(is_valid_instance_name("..."));
    assert!(is_valid_instance_name("v1.2"));
}

const WAITING: &str = r"
state_machines:
- name: W
  states:
  - name: a
    initial: true
    action: DoA
    transitions:
    - event: ask
      to: approval
  - name: approval
    entry: Ask
    wait:
      timeout: 10s
      timeout_event: expired
    transitions:
    - event: approved
      to: done
      queue: q2
      countdown: 5
    - event: expired
      to: done
  - name: done
    final: true
";

fn waiting() -> (Config, Task) {
    let c = load_str(WAITING, "w.yaml", &LoadOptions::default())
        .expect("valid")
        .config;
    let mut t = task(Some("a"), "ask");
    t.machine = "W".into();
    (c, t)
}

#[test]
fn entering_a_waiting_state_runs_its_entry_and_queues_a_wait_not_an_action() {
    let (c, t) = waiting();
    let m = c.machine("W").unwrap();
    let p = plan(m, &t).unwrap();
    assert_eq!(roles(&p), [(ActionRole::Entry, "Ask")]);
    assert_eq!(
        wait_begun(m, &t).as_deref(),
        Some("M-1--approval--wait--step-5--by-7")
    );
    let mut rng = fastrand::Rng::with_seed(1);
    let times = StepTimes {
        started_at: 100,
        now: 1_000_000,
    };
    let commit = complete(
        machine_of(&c, &t),
        &c,
        &t,
        &p,
        outcome(None),
        times,
        &mut rng,
        &Limits::default(),
    );
    assert!(commit.new_tasks.is_empty(), "{commit:?}");
    assert_eq!(commit.disposition, Disposition::Finished);
    assert_eq!(commit.history.len(), 1);
    let [w] = commit.waits.as_slice() else {
        panic!("one wait: {commit:?}")
    };
    assert_eq!(w.task.kind, TaskKind::Wait);
    assert_eq!(w.task.name, "M-1--approval--wait--step-5--by-7");
    assert_eq!(w.task.event, "expired");
    assert_eq!(w.task.due_at, 1_000_000 + 10_000_000, "the timeout");
    let events: Vec<&str> = w.accepts.iter().map(|a| a.event.as_str()).collect();
    assert_eq!(events, ["approved", "expired"]);
    let approved = &w.accepts[0];
    assert_eq!(approved.name, "M-1--approval--approved--done--step-5");
    assert_eq!((approved.queue.as_str(), approved.delay), ("q2", 5_000_000));

    let mut data = Context::new();
    data.insert("by".into(), "ana".into());
    let d = approved.dispatch(&w.task, &data, 2_000_000);
    assert_eq!(
        (d.kind, d.from_state.as_deref(), d.event.as_str(), d.step),
        (TaskKind::Dispatch, Some("approval"), "approved", 5)
    );
    assert_eq!(d.due_at, 7_000_000, "the transition's countdown");
    assert_eq!(d.context.get("by"), Some(&"ana".into()));
}

#[test]
fn a_claimed_wait_runs_as_the_dispatch_of_its_timeout_event() {
    let (c, mut t) = waiting();
    let m = c.machine("W").unwrap();
    t.kind = TaskKind::Wait;
    t.from_state = Some("approval".into());
    t.event = "expired".into();
    let p = plan(m, &t).unwrap();
    assert_eq!(p.to_state.as_deref(), Some("done"));
    assert_eq!(wait_begun(m, &t), None);
    let mut rng = fastrand::Rng::with_seed(1);
    let times = StepTimes {
        started_at: 100,
        now: 1_000_000,
    };
    let commit = complete(
        machine_of(&c, &t),
        &c,
        &t,
        &p,
        outcome(None),
        times,
        &mut rng,
        &Limits::default(),
    );
    assert!(
        matches!(commit.instance_change, InstanceChange::BranchEnded(_)),
        "{commit:?}"
    );
    assert_eq!(commit.history[0].event, "expired");
}

#[test]
fn a_wait_without_timeout_is_never_due() {
    let yaml = WAITING.replace("      timeout: 10s\n      timeout_event: expired\n", "");
    let yaml = yaml.replace("    wait:\n", "    wait: true\n");
    let c = load_str(&yaml, "w.yaml", &LoadOptions::default())
        .expect("valid")
        .config;
    let mut t = task(Some("a"), "ask");
    t.machine = "W".into();
    let p = plan(c.machine("W").unwrap(), &t).unwrap();
    let mut rng = fastrand::Rng::with_seed(1);
    let times = StepTimes {
        started_at: 100,
        now: 1_000_000,
    };
    let commit = complete(
        machine_of(&c, &t),
        &c,
        &t,
        &p,
        outcome(None),
        times,
        &mut rng,
        &Limits::default(),
    );
    assert_eq!(commit.waits[0].task.due_at, NEVER);
    assert_eq!(commit.waits[0].task.event, "");
}

/// The machine of `c` that `t` runs on.
fn machine_of<'a>(c: &'a Config, t: &Task) -> &'a crate::machine::Machine {
    c.machine(&t.machine)
        .expect("the task's machine is in the test configuration")
}

#[test]
fn a_storable_shared_commit_is_not_copied_and_one_with_a_nul_is_fixed() {
    use std::sync::Arc;
    let plain = Arc::new(Commit::finishing(&task(Some("a"), "go")));
    let same = Commit::storable_shared(Arc::clone(&plain));
    assert!(Arc::ptr_eq(&plain, &same), "nothing to fix: no copy");
    let mut failing = Commit::finishing(&task(Some("a"), "go"));
    failing.disposition = Disposition::Failed {
        error: "bad\0byte".into(),
    };
    let failing = Arc::new(failing);
    let fixed = Commit::storable_shared(Arc::clone(&failing));
    assert!(!Arc::ptr_eq(&failing, &fixed));
    assert_eq!(
        fixed.disposition,
        Disposition::Failed {
            error: "bad\\0byte".into()
        }
    );
}

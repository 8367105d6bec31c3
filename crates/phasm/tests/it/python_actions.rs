//! Python actions in real action hosts (`python3` with phasm's embedded package): every
//! FSMContext feature of Fantasm's API, the native API, and hosts that misbehave.

use std::path::PathBuf;

use phasm::action::Registry;
use phasm::config::{load_str, LoadOptions};
use phasm::engine::Context;
use phasm::store::{InstanceStatus, InstanceView};
use phasm::testing::Immediate;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/python")
}

/// A runner for `machines` (YAML under `state_machines:`) with the fixtures' Python actions.
async fn runner(machines: &str) -> Immediate {
    let yaml = format!(
        "python:\n  path: [.]\n  processes: 1\n  timeout: 20s\nstate_machines:\n{machines}"
    );
    let loaded = load_str(&yaml, fixtures().join("test.yaml"), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    match Immediate::with_hosts(loaded, Registry::new()).await {
        Ok(run) => run,
        Err(e) => panic!("{e}"),
    }
}

async fn start_error(machines: &str) -> String {
    let yaml = format!("python:\n  processes: 1\nstate_machines:\n{machines}");
    let loaded = load_str(&yaml, fixtures().join("test.yaml"), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    match Immediate::with_hosts(loaded, Registry::new()).await {
        Ok(_) => panic!("expected the hosts to refuse this configuration"),
        Err(e) => e.to_string(),
    }
}

fn ctx(value: Value) -> Context {
    value.as_object().cloned().unwrap_or_default()
}

fn result(view: &InstanceView) -> Value {
    Value::Object(view.current_context.clone().unwrap_or_default())
}

async fn logs(run: &Immediate, name: &str) -> Vec<(String, String)> {
    run.store()
        .logs(name)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.level, l.message))
        .collect()
}

#[tokio::test]
async fn obj_is_shared_by_the_calls_of_a_step_and_the_context_answers_fantasm_questions() {
    let run = runner(
        "- name: M
  namespace: fsmtests
  states:
  - name: first
    initial: true
    entry: Entry
    action: UsesObj
    transitions:
    - event: OK_EVENT
      to: done
  - name: done
    final: true
",
    )
    .await;
    let view = run.run("M", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    let c = result(&view);
    assert_eq!(c["seen"], "set by entry");
    assert_eq!(c["attr"], true);
    assert_eq!(c["instance"], view.name.as_str());
    assert_eq!(c["machine"], "M");
    assert_eq!(c["state"], "first");
    assert!(c["task"].as_str().unwrap().starts_with(&view.name));
    // The generated name carries the start time, which getInstanceStartTime reads back.
    assert_eq!(c["start"], "2030-01-01T00:00:00");
    // The event constant OK_EVENT resolved to the module's value `ok`.
    assert_eq!(view.history[1].event, "ok");
}

#[tokio::test]
async fn a_failed_attempt_keeps_its_traceback_and_the_retry_sees_the_retry_count() {
    let run = runner(
        "- name: M
  namespace: fsmtests
  logging: persistent
  min_backoff_seconds: 1
  states:
  - name: a
    initial: true
    action: FailsFirst
    transitions:
    - event: ok
      to: b
  - name: b
    action: Transient
    transitions:
    - event: ok
      to: c
  - name: c
    final: true
",
    )
    .await;
    let view = run.run("M", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    assert_eq!(result(&view)["retry_count"], 1);
    assert_eq!(view.history[0].attempt, 1);
    let logs = logs(&run, &view.name).await;
    let traceback = logs
        .iter()
        .find(|(_, m)| m.contains("first attempt fails"))
        .expect("the traceback is in the log");
    assert_eq!(traceback.0, "error");
    assert!(
        traceback
            .1
            .starts_with("Traceback (most recent call last):\n"),
        "{}",
        traceback.1
    );
    assert!(
        traceback.1.contains("in helper_that_raises"),
        "{}",
        traceback.1
    );
    assert!(
        traceback.1.ends_with("ValueError: first attempt fails"),
        "{}",
        traceback.1
    );
    // A UserTransientError is logged as a warning.
    assert!(
        logs.iter()
            .any(|(l, m)| l == "warning" && m.contains("UserTransientError: try again")),
        "{logs:?}"
    );
}

#[tokio::test]
async fn forks_take_the_context_at_call_time_and_a_fan_in_gets_the_list() {
    let run = runner(
        "- name: M
  namespace: fsmtests
  logging: persistent
  states:
  - name: split
    initial: true
    action: ForkAtCallTime
    transitions:
    - event: ok
      to: join
  - name: join
    fan_in: all
    action: Collect
    final: true
",
    )
    .await;
    let view = run.run("M", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    let c = result(&view);
    assert_eq!(c["count"], 3);
    assert_eq!(c["pairs"], json!([[0, 3], [1, 1], [2, 2]]));
    assert!(logs(&run, &view.name)
        .await
        .contains(&("info".to_string(), "joined 3".to_string())));
}

#[tokio::test]
async fn nested_continuations_multiply_branches() {
    let run = runner(
        "- name: M
  namespace: fsmtests
  logging: persistent
  states:
  - name: start
    initial: true
    action: fsmtests.Go
    transitions:
    - event: ok
      to: outer
  - name: outer
    continuation: true
    action: Three
    transitions:
    - event: ok
      to: inner
  - name: inner
    continuation: true
    action: Three
    transitions:
    - event: ok
      to: leaf
  - name: leaf
    final: true
    action: Leaf
",
    )
    .await;
    let view = run.run("M", ctx(json!({}))).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    let mut leaves: Vec<String> = logs(&run, &view.name)
        .await
        .into_iter()
        .filter_map(|(_, m)| m.strip_prefix("leaf ").map(str::to_string))
        .collect();
    leaves.sort();
    assert_eq!(
        leaves,
        ["xx", "xy", "xz", "yx", "yy", "yz", "zx", "zy", "zz"],
        "3 pages × 3 pages = 9 branches, each once"
    );
    let into_leaf = view.history.iter().filter(|h| h.to == "leaf").count();
    assert_eq!(into_leaf, 9);
}

#[tokio::test]
async fn logger_levels_and_prints_reach_the_instance_log() {
    let run = runner(
        "- name: M
  namespace: fsmtests
  logging: persistent
  states:
  - name: a
    initial: true
    action: Levels
    transitions:
    - event: ok
      to: b
  - name: b
    final: true
",
    )
    .await;
    let view = run.run("M", Context::new()).await.unwrap();
    let logs = logs(&run, &view.name).await;
    let expected: Vec<(String, String)> = [
        ("debug", "a debug line"),
        ("info", "an info line with args"),
        ("warning", "a warning line"),
        ("error", "an error line"),
        ("critical", "a critical line"),
        ("info", "printed words"),
        ("info", "a second print"),
        ("info", "no newline at the end"),
    ]
    .iter()
    .map(|(l, m)| (l.to_string(), m.to_string()))
    .collect();
    assert_eq!(logs, expected);
}

#[tokio::test]
async fn halt_machine_error_halts_with_its_message_at_its_level() {
    let run = runner(
        "- name: M
  namespace: fsmtests
  logging: persistent
  states:
  - name: a
    initial: true
    action: Halts
    transitions:
    - event: ok
      to: b
  - name: b
    final: true
- name: Q
  namespace: fsmtests
  logging: persistent
  states:
  - name: a
    initial: true
    final: true
    action: HaltsQuietly
",
    )
    .await;
    let view = run.run("M", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Halted, "{view:?}");
    assert!(logs(&run, &view.name)
        .await
        .contains(&("error".to_string(), "stop right here".to_string())));
    let quiet = run.run("Q", Context::new()).await.unwrap();
    assert_eq!(quiet.status, InstanceStatus::Halted);
    assert!(logs(&run, &quiet.name).await.is_empty());
}

#[tokio::test]
async fn spawn_starts_children_after_their_countdown() {
    let run = runner(
        "- name: M
  namespace: fsmtests
  states:
  - name: a
    initial: true
    action: Spawns
    transitions:
    - event: ok
      to: b
  - name: b
    final: true
- name: Child
  namespace: fsmtests
  states:
  - name: c
    initial: true
    final: true
    action: ChildAction
",
    )
    .await;
    let view = run.run("M", Context::new()).await.unwrap();
    assert_eq!(view.children.len(), 2, "{view:?}");
    let mut doubled = Vec::new();
    for child in &view.children {
        let c = run.store().instance(child).await.unwrap().unwrap();
        assert_eq!(c.status, InstanceStatus::Completed);
        // Started 60 s (of fake time) after the parent's step.
        assert!(c.history[0].started_at >= phasm::testing::START_TIME + 60_000_000);
        doubled.push(result(&c)["doubled"].clone());
    }
    doubled.sort_by_key(serde_json::Value::as_i64);
    assert_eq!(doubled, [json!(2), json!(4)]);
}

#[tokio::test]
async fn context_types_give_actions_python_values_and_store_them_back_as_json() {
    let run = runner(
        "- name: M
  namespace: fsmtests
  context_types:
    n: int
    when: datetime
    flag: bool
    day: date
  states:
  - name: a
    initial: true
    action: Typed
    transitions:
    - event: ok
      to: b
  - name: b
    final: true
",
    )
    .await;
    let start =
        ctx(json!({"n": "41", "when": "2026-01-02T03:04:05", "flag": "true", "day": "2026-05-06"}));
    let view = run.run("M", start).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    let c = result(&view);
    assert_eq!(c["types"], json!(["int", "datetime", "bool", "date"]));
    assert_eq!(c["n"], 42);
    assert_eq!(c["when"], "2026-01-03T03:04:05");
}

#[tokio::test]
async fn a_context_value_that_is_not_json_fails_the_attempt_naming_the_key() {
    let run = runner(
        "- name: M
  namespace: fsmtests
  task_retry_limit: 0
  states:
  - name: a
    initial: true
    action: NotJson
    transitions:
    - event: ok
      to: b
  - name: b
    final: true
",
    )
    .await;
    let view = run.run("M", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    let error = view.error.unwrap_or_default();
    assert!(error.contains("context key `bad` holds object"), "{error}");
}

#[tokio::test]
async fn the_native_api_reads_typed_values_forks_and_halts() {
    let run = runner(
        "- name: M
  namespace: fsmtests
  logging: persistent
  states:
  - name: a
    initial: true
    action: native
    transitions:
    - event: ok
      to: b
  - name: b
    final: true
    action: NativeClass
- name: H
  states:
  - name: a
    initial: true
    final: true
    action: fsmtests.native_halt
",
    )
    .await;
    let view = run.run("M", ctx(json!({"n": "4"}))).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    // Two branches ended in `b`: the forked one read `forked` as a bool.
    let ends: Vec<_> = view.history.iter().filter(|h| h.to == "b").collect();
    assert_eq!(ends.len(), 2);
    assert!(logs(&run, &view.name)
        .await
        .contains(&("info".to_string(), "native says hi".to_string())));
    let halted = run.run("H", Context::new()).await.unwrap();
    assert_eq!(halted.status, InstanceStatus::Halted);
    assert_eq!(halted.error.as_deref(), Some("enough"));
}

#[tokio::test]
async fn unresolvable_actions_are_refused_at_start_each_at_its_place() {
    let error = start_error(
        "- name: M
  namespace: fsmtests
  states:
  - name: a
    initial: true
    entry: Missing
    action: nosuchmodule.Thing
    exit: Datastore
    transitions:
    - event: go
      to: b
      action: NeedsArgs
  - name: b
    final: true
",
    )
    .await;
    assert!(
        error.contains("test.yaml:9:12: state `a` entry `Missing`: `Missing` was not found in module `fsmtests`"),
        "{error}"
    );
    assert!(
        error.contains("test.yaml:10:13: state `a` action `nosuchmodule.Thing`: no module of `nosuchmodule.Thing` can be imported"),
        "{error}"
    );
    assert!(
        error.contains("test.yaml:11:11: state `a` exit `Datastore`: class `Datastore` is a DatastoreContinuationFSMAction needs App Engine's datastore"),
        "{error}"
    );
    assert!(
        error.contains("transition `a--go` `NeedsArgs`: class `NeedsArgs` cannot be instantiated without arguments"),
        "{error}"
    );
}

#[tokio::test]
async fn an_event_constant_that_is_not_a_string_is_refused() {
    let error = start_error(
        "- name: M
  namespace: fsmtests
  states:
  - name: a
    initial: true
    action: UsesObj
    transitions:
    - event: NOT_AN_EVENT
      to: b
  - name: b
    final: true
",
    )
    .await;
    assert!(
        error.contains("event `NOT_AN_EVENT`: `fsmtests.NOT_AN_EVENT` is a int, not a str"),
        "{error}"
    );
}

/// Fantasm's own machine file, unchanged but for the `python:` lines, with its test actions.
async fn fantasm_file_runner() -> Immediate {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fantasm-yaml/test/fantasm_tests/yaml/test-TaskQueueFSMTests.yaml");
    let original = std::fs::read_to_string(&file).unwrap();
    let yaml = format!(
        "python:\n  path: [{}]\n  processes: 1\n{original}",
        fixtures().display()
    );
    let loaded = load_str(&yaml, &file, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    Immediate::with_hosts(loaded, Registry::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn fantasms_own_linear_machine_runs_every_call_once_in_fantasms_order() {
    let run = fantasm_file_runner().await;
    let view = run.run("TaskQueueFSMTests", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    assert_eq!(view.history.len(), 3);
    // exit → transition action → entry → action, one step each (Fantasm's E1 counts).
    assert_eq!(
        result(&view)["calls"],
        json!([
            "state-initial:CountExecuteCalls",
            "state-initial:CountExecuteCalls",
            "state-initial:CountExecuteCalls",
            "state-initial:CountExecuteCalls",
            "state-normal:CountExecuteCalls",
            "state-normal:CountExecuteCalls",
            "state-normal:CountExecuteCalls",
            "state-normal:CountExecuteCalls",
            "state-final:CountExecuteCalls",
            "state-final:CountExecuteCallsFinal"
        ])
    );
}

#[tokio::test]
async fn fantasms_self_transition_machine_loops_five_times() {
    let run = fantasm_file_runner().await;
    let view = run
        .run("SelfTransitionTests", Context::new())
        .await
        .unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    // Fantasm's E3: init, five self transitions, then state2.
    let events: Vec<&str> = view.history.iter().map(|h| h.event.as_str()).collect();
    assert_eq!(
        events,
        [
            "pseudo-init",
            "next-event1",
            "next-event1",
            "next-event1",
            "next-event1",
            "next-event1",
            "next-event2"
        ]
    );
    let calls = result(&view)["calls"].as_array().unwrap().clone();
    let count = |what: &str| calls.iter().filter(|c| c.as_str() == Some(what)).count();
    // state1: entry 6, action 6, exit 6 and transition actions 6 (recorded in state1).
    assert_eq!(count("state1:SelfTransition"), 6);
    assert_eq!(count("state1:CountExecuteCalls"), 6 + 6 + 6);
    assert_eq!(count("state2:CountExecuteCalls"), 1);
    assert_eq!(count("state2:CountExecuteCallsFinal"), 1);
}

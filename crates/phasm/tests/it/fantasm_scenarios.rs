//! Fantasm's own scenarios (FANTASM.md §4.4), run on its own machine files with counting
//! actions in immediate mode: how many times each action ran and how many contexts each join
//! saw. Where phasm deliberately differs, the test says why (and so does the README).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use phasm::action::{Action, ActionContext, ActionError, ActionResult, Registry};
use phasm::config::{load_file, LoadOptions};
use phasm::engine::Context;
use phasm::machine::{ActionRole, Config};
use phasm::store::{InstanceStatus, Store};
use phasm::testing::Immediate;
use serde_json::{json, Value};

type Counts = Arc<Mutex<HashMap<String, u64>>>;

fn bump(counts: &Counts, key: &str, by: u64) {
    *counts.lock().unwrap().entry(key.to_string()).or_default() += by;
}

fn get(counts: &Counts, key: &str) -> u64 {
    counts.lock().unwrap().get(key).copied().unwrap_or(0)
}

fn role(cx: &ActionContext) -> &'static str {
    match cx.role() {
        ActionRole::Entry => "entry",
        ActionRole::Action => "action",
        ActionRole::Exit => "exit",
        ActionRole::Transition => "transition",
    }
}

fn count(counts: &Counts, cx: &ActionContext) {
    bump(counts, &format!("{}.{}", cx.state(), role(cx)), 1);
}

/// A datastore continuation over 10 entities (keys 0–9), two per page.
struct Entities {
    counts: Counts,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    Grouped,
    HappySad,
    Fork,
}

const ENTITIES: u64 = 10;
const BATCH: u64 = 2;

fn offset(cx: &ActionContext) -> u64 {
    cx.token().and_then(Value::as_u64).unwrap_or(0)
}

#[async_trait]
impl Action for Entities {
    async fn continuation(
        &self,
        cx: &mut ActionContext,
    ) -> Option<Result<Option<Value>, ActionError>> {
        bump(&self.counts, &format!("{}.continuation", cx.state()), 1);
        let next = offset(cx) + BATCH;
        Some(Ok((next < ENTITIES).then(|| json!(next))))
    }

    async fn run(&self, cx: &mut ActionContext) -> ActionResult {
        count(&self.counts, cx);
        let start = offset(cx);
        let keys: Vec<u64> = (start..(start + BATCH).min(ENTITIES)).collect();
        match self.kind {
            Kind::Fork => {
                // Fork one branch per entity but the first, which this branch keeps.
                for key in &keys[1..] {
                    let mut data = Context::new();
                    data.insert("key".into(), json!(key));
                    data.insert("fan-me-in".into(), json!([key]));
                    cx.fork(data);
                }
                cx.put("key", keys[0])?;
                cx.put("fan-me-in", [keys[0]])?;
            }
            _ => cx.put("fan-me-in", &keys)?,
        }
        if self.kind == Kind::Grouped {
            cx.put("fan-in-group", keys[0])?;
        }
        let event = if self.kind == Kind::HappySad {
            let batch = start / BATCH + 1;
            if batch % 2 == 1 {
                "happy"
            } else {
                "sad"
            }
        } else {
            "next-event"
        };
        Ok(Some(event.into()))
    }
}

fn registry(counts: &Counts) -> Registry {
    let mut r = Registry::new();
    let c = Arc::clone(counts);
    r.register_fn("CountExecuteCalls", move |cx| {
        count(&c, cx);
        // FSMContextTests' final `foo3` has no transitions: Fantasm's test only forked and
        // never dispatched its event, which phasm would rightly refuse as unknown.
        if cx.state() == "foo3" {
            return Ok(None);
        }
        Ok(Some("next-event".into()))
    });
    let c = Arc::clone(counts);
    r.register_fn("CountExecuteCallsFinal", move |cx| {
        count(&c, cx);
        Ok(None)
    });
    let c = Arc::clone(counts);
    r.register_fn("CountExecuteCallsFanInEntry", move |cx| {
        count(&c, cx);
        bump(&c, "fi-entry", cx.contexts().len() as u64);
        Ok(None)
    });
    for (name, event) in [
        ("CountExecuteCallsFanIn", Some("next-event")),
        ("CountExecuteCallsFanInFinal", None),
    ] {
        let c = Arc::clone(counts);
        r.register_fn(name, move |cx| {
            count(&c, cx);
            bump(&c, &format!("fi-{}", role(cx)), cx.contexts().len() as u64);
            if cx.role() == ActionRole::Action {
                let total: usize = cx
                    .contexts()
                    .iter()
                    .map(|ctx| {
                        ctx.get("fan-me-in")
                            .and_then(Value::as_array)
                            .map_or(0, Vec::len)
                    })
                    .sum();
                bump(&c, "total", total as u64);
                bump(&c, "joins", 1);
            }
            Ok(event.map(str::to_string))
        });
    }
    let c = Arc::clone(counts);
    r.register_fn("CountExecuteCallsWithFork", move |cx| {
        count(&c, cx);
        for i in 0..2 {
            let mut data = Context::new();
            data.insert("fork".into(), json!(i));
            cx.fork(data);
        }
        Ok(Some("next-event".into()))
    });
    let c = Arc::clone(counts);
    r.register_fn("CountExecuteCallsWithSpawn", move |cx| {
        count(&c, cx);
        let contexts = (0..2)
            .map(|i| {
                let mut ctx = Context::new();
                ctx.insert("child".into(), json!(i));
                ctx
            })
            .collect();
        cx.spawn("MachineToSpawn", contexts);
        Ok(None)
    });
    for (name, kind) in [
        ("TestDatastoreContinuationFSMAction", Kind::Plain),
        (
            "TestDatastoreContinuationFSMActionFanInGroupFSMAction",
            Kind::Grouped,
        ),
        ("HappySadContinuationFSMAction", Kind::HappySad),
        ("TestContinuationAndForkFSMAction", Kind::Fork),
    ] {
        r.register(
            name,
            Entities {
                counts: Arc::clone(counts),
                kind,
            },
        );
    }
    r
}

fn config(file: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fantasm-yaml/test/fantasm_tests/yaml")
        .join(file);
    load_file(path, &LoadOptions::default()).unwrap().config
}

async fn run(
    store: Arc<dyn Store>,
    file: &str,
    machine: &str,
) -> (Counts, phasm::store::InstanceView, Immediate) {
    let counts = Counts::default();
    let cfg = config(file);
    let only = Config {
        machines: cfg
            .machines
            .iter()
            .filter(|m| m.name == machine || m.name == "MachineToSpawn")
            .cloned()
            .collect(),
        ..cfg
    };
    let run = Immediate::with_store(only, registry(&counts), store).unwrap();
    let view = run.run(machine, Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    assert!(view.tasks.is_empty() && view.branches.parked == 0);
    (counts, view, run)
}

const FAN_IN: &str = "test-DatastoreFSMContinuationFanInTests.yaml";

async fn e4_continuation_pages_each_run_once(store: Arc<dyn Store>) {
    let (c, view, _) = run(
        Arc::clone(&store),
        "test-DatastoreFSMContinuationTests.yaml",
        "DatastoreFSMContinuationTests",
    )
    .await;
    assert_eq!(get(&c, "state-initial.action"), 1);
    // Fantasm ran a sixth, empty batch (entry 6, continuation 6, action 5): phasm's
    // continuation knows the last page, so 5 pages of 2 entities each.
    assert_eq!(get(&c, "state-continuation.entry"), 5);
    assert_eq!(get(&c, "state-continuation.continuation"), 5);
    assert_eq!(get(&c, "state-continuation.action"), 5);
    assert_eq!(get(&c, "state-final.entry"), 5);
    assert_eq!(get(&c, "state-final.action"), 5);
    assert_eq!(view.branches.ended, 5);
}

async fn e10_continuation_into_fan_in_joins_every_page_once(store: Arc<dyn Store>) {
    let (c, _, _) = run(
        Arc::clone(&store),
        FAN_IN,
        "DatastoreFSMContinuationFanInTests",
    )
    .await;
    assert_eq!(get(&c, "state-continuation.action"), 5);
    assert_eq!(
        get(&c, "joins"),
        1,
        "all five pages park within one 5 s window"
    );
    assert_eq!(get(&c, "fi-entry"), 5);
    assert_eq!(get(&c, "fi-action"), 5);
    assert_eq!(get(&c, "total"), 10);
    assert_eq!(get(&c, "state-final.entry"), 1);
    assert_eq!(get(&c, "state-final.action"), 1);
}

async fn e11_an_absent_group_key_joins_as_one_group(store: Arc<dyn Store>) {
    let (c, _, _) = run(
        Arc::clone(&store),
        FAN_IN,
        "DatastoreFSMContinuationFanInGroupDefaultTests",
    )
    .await;
    assert_eq!(get(&c, "joins"), 1);
    assert_eq!(get(&c, "fi-action"), 5);
    assert_eq!(get(&c, "total"), 10);
}

async fn e12_five_group_values_make_five_joins(store: Arc<dyn Store>) {
    let (c, view, _) = run(
        Arc::clone(&store),
        FAN_IN,
        "DatastoreFSMContinuationFanInGroupTests",
    )
    .await;
    assert_eq!(get(&c, "joins"), 5);
    assert_eq!(get(&c, "fi-action"), 5);
    assert_eq!(get(&c, "total"), 10);
    assert_eq!(get(&c, "state-final.action"), 5);
    assert_eq!(view.branches.ended, 5);
}

async fn e9_continuation_and_fork_into_fan_in(store: Arc<dyn Store>) {
    let (c, _, _) = run(
        Arc::clone(&store),
        FAN_IN,
        "DatastoreFSMContinuationFanInAndForkTests",
    )
    .await;
    assert_eq!(get(&c, "state-continuation-and-fork.action"), 5);
    assert_eq!(get(&c, "joins"), 1);
    assert_eq!(
        get(&c, "fi-entry"),
        10,
        "one context per entity: 5 pages × (1 kept + 1 fork)"
    );
    assert_eq!(get(&c, "fi-action"), 10);
    assert_eq!(get(&c, "total"), 10);
    assert_eq!(get(&c, "state-final.action"), 1);
}

async fn e15_the_diamond_joins_happy_and_sad_branches_together(store: Arc<dyn Store>) {
    let (c, _, _) = run(
        Arc::clone(&store),
        FAN_IN,
        "DatastoreFSMContinuationFanInDiamondTests",
    )
    .await;
    assert_eq!(get(&c, "state-happy.action"), 3);
    assert_eq!(get(&c, "state-sad.action"), 2);
    // Fantasm keyed its fan-in by the task name, so the happy and sad arrivals were joined
    // separately (2 joins). phasm joins every branch that reaches a fan-in state within
    // its window, whichever state it came from: one join of all 5.
    assert_eq!(get(&c, "joins"), 1);
    assert_eq!(get(&c, "fi-action"), 5);
    assert_eq!(get(&c, "total"), 10);
}

async fn e16_fan_in_into_a_final_state_with_only_an_exit(store: Arc<dyn Store>) {
    let (c, view, _) = run(
        Arc::clone(&store),
        FAN_IN,
        "DatastoreFSMContinuationNoFinalAction",
    )
    .await;
    assert_eq!(get(&c, "joins"), 1);
    assert_eq!(get(&c, "state-final.entry"), 1);
    assert_eq!(get(&c, "state-final.exit"), 1);
    assert_eq!(view.history.last().unwrap().event, "pseudo-final");
}

async fn forking_twice_makes_three_branches(store: Arc<dyn Store>) {
    let (c, view, _) = run(
        Arc::clone(&store),
        "test-FSMContextTests.yaml",
        "FSMContextTests",
    )
    .await;
    assert_eq!(get(&c, "foo.action"), 1);
    assert_eq!(get(&c, "foo2.action"), 1);
    assert_eq!(get(&c, "foo3.action"), 3);
    assert_eq!(view.branches.ended, 3);
}

async fn e21_spawn_starts_linked_children_once(store: Arc<dyn Store>) {
    let (c, view, run) = run(Arc::clone(&store), "test-SpawnTests.yaml", "SpawnTests").await;
    assert_eq!(get(&c, "SpawnTests-InitialState.entry"), 1);
    assert_eq!(get(&c, "SpawnTests-InitialState.action"), 1);
    assert_eq!(get(&c, "SpawnTests-InitialState.exit"), 1);
    assert_eq!(view.children.len(), 2);
    assert_eq!(get(&c, "MachineToSpawn-InitialState.action"), 2);
    for child in &view.children {
        let child = run.store().instance(child).await.unwrap().unwrap();
        assert_eq!(child.status, InstanceStatus::Completed);
        assert_eq!(child.parent.as_deref(), Some(view.name.as_str()));
        assert_eq!(child.machine, "MachineToSpawn");
    }
}

on_both_stores!(
    e4_continuation_pages_each_run_once,
    e10_continuation_into_fan_in_joins_every_page_once,
    e11_an_absent_group_key_joins_as_one_group,
    e12_five_group_values_make_five_joins,
    e9_continuation_and_fork_into_fan_in,
    e15_the_diamond_joins_happy_and_sad_branches_together,
    e16_fan_in_into_a_final_state_with_only_an_exit,
    forking_twice_makes_three_branches,
    e21_spawn_starts_linked_children_once,
);

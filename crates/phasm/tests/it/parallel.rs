//! Fork, fan-in (window and barrier), continuation and spawn: behaviour beyond Fantasm's own
//! scenarios, in immediate mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use phasm::action::Registry;
use phasm::config::{load_str, LoadOptions};
use phasm::engine::Context;
use phasm::store::{InstanceStatus, Store};
use phasm::testing::Immediate;
use serde_json::{json, Value};

fn load(yaml: &str) -> phasm::machine::Config {
    load_str(yaml, "p.yaml", &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .config
}

fn ids(contexts: &[Context], key: &str) -> Vec<u64> {
    contexts
        .iter()
        .flat_map(|c| {
            c.get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|v| v.as_u64())
        .collect()
}

/// Branches fork again at different depths and wait for different countdowns; the barrier
/// still joins once, with every leaf.
async fn a_barrier_joins_once_when_every_branch_has_arrived(store: Arc<dyn Store>) {
    let yaml = r"
state_machines:
- name: Tree
  states:
  - name: root
    initial: true
    action: Fork
    transitions:
    - event: grow
      to: grow
  - name: grow
    action: Grow
    transitions:
    - event: grow
      to: grow
      countdown: {minimum: 0, maximum: 30}
    - event: leaf
      to: join
  - name: join
    fan_in: all
    action: Join
    final: true
";
    let joins = Arc::new(AtomicU64::new(0));
    let mut r = Registry::new();
    r.register_fn("Fork", |cx| {
        for i in 1..4u64 {
            let mut d = Context::new();
            d.insert("id".into(), json!(i));
            d.insert("depth".into(), json!(i));
            cx.fork(d);
        }
        cx.put("id", 0)?;
        cx.put("depth", 0)?;
        Ok(Some("grow".into()))
    });
    r.register_fn("Grow", |cx| {
        let depth: u64 = cx.get("depth")?.unwrap_or(0);
        let id: u64 = cx.get("id")?.unwrap_or(0);
        if depth == 0 {
            cx.put("ids", [id])?;
            return Ok(Some("leaf".into()));
        }
        // Split in two: this branch and a fork, one level shallower.
        let mut d = Context::new();
        d.insert("id".into(), json!(id * 10 + depth));
        d.insert("depth".into(), json!(depth - 1));
        cx.fork(d);
        cx.put("depth", depth - 1)?;
        Ok(Some("grow".into()))
    });
    let j = Arc::clone(&joins);
    r.register_fn("Join", move |cx| {
        j.fetch_add(1, Ordering::SeqCst);
        let all = ids(cx.contexts(), "ids");
        cx.put("leaves", all)?;
        Ok(None)
    });
    let run = Immediate::with_store(load(yaml), r, Arc::clone(&store)).unwrap();
    let view = run.run("Tree", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed);
    assert_eq!(joins.load(Ordering::SeqCst), 1, "one barrier join");
    let leaves = view.current_context.unwrap()["leaves"]
        .as_array()
        .unwrap()
        .len();
    // Depth d makes 2^d leaves: 1 + 2 + 4 + 8.
    assert_eq!(leaves, 15);
}

/// Branches arriving at different times open new windows: each context is joined once.
async fn late_arrivals_open_the_next_window(store: Arc<dyn Store>) {
    let yaml = r"
state_machines:
- name: Windows
  states:
  - name: start
    initial: true
    action: Fork
    transitions:
    - event: wait
      to: wait
      countdown: {minimum: 0, maximum: 100}
  - name: wait
    action: Wait
    transitions:
    - event: arrive
      to: batch
  - name: batch
    fan_in: 10
    action: Batch
    transitions:
    - event: done
      to: end
  - name: end
    final: true
";
    let joined = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut r = Registry::new();
    r.register_fn("Fork", |cx| {
        for i in 1..40u64 {
            let mut d = Context::new();
            d.insert("ids".into(), json!([i]));
            cx.fork(d);
        }
        cx.put("ids", [0])?;
        Ok(Some("wait".into()))
    });
    r.register_fn("Wait", |_| Ok(Some("arrive".into())));
    let j = Arc::clone(&joined);
    r.register_fn("Batch", move |cx| {
        j.lock().unwrap().push(ids(cx.contexts(), "ids"));
        Ok(Some("done".into()))
    });
    let run = Immediate::with_store(load(yaml), r, Arc::clone(&store)).unwrap();
    let view = run.run("Windows", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed);
    let batches = joined.lock().unwrap().clone();
    assert!(
        batches.len() > 1,
        "arrivals spread over 100 s make several 10 s windows: {batches:?}"
    );
    let mut all: Vec<u64> = batches.concat();
    all.sort_unstable();
    assert_eq!(all, (0..40).collect::<Vec<_>>());
    assert_eq!(
        view.branches.ended,
        batches.len() as u64,
        "each join continues as one branch"
    );
}

async fn built_in_list_pages_run_in_parallel_branches(store: Arc<dyn Store>) {
    let yaml = r"
actions:
  Pages:
    list: items
    batch: 3
    into: page
    event: got
state_machines:
- name: Lists
  states:
  - name: read
    initial: true
    continuation: true
    action: Pages
    transitions:
    - event: got
      to: sum
  - name: sum
    fan_in: all
    action: Sum
    final: true
";
    let mut r = Registry::new();
    r.register_fn("Sum", |cx| {
        let pages: Vec<Vec<u64>> = cx
            .contexts()
            .iter()
            .map(|c| serde_json::from_value(c["page"].clone()).unwrap())
            .collect();
        cx.put("pages", pages)?;
        Ok(None)
    });
    let run = Immediate::with_store(load(yaml), r, Arc::clone(&store)).unwrap();
    let mut start = Context::new();
    start.insert("items".into(), json!((1..=10).collect::<Vec<u64>>()));
    let view = run.run("Lists", start).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed);
    let mut pages: Vec<Vec<u64>> =
        serde_json::from_value(view.current_context.unwrap()["pages"].clone()).unwrap();
    pages.sort();
    assert_eq!(
        pages,
        vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]
    );
    let read = view.history.iter().filter(|h| h.to == "read").count();
    assert_eq!(read, 4, "one committed step per page");
}

#[tokio::test]
async fn built_in_lines_read_json_lines_csv_and_text() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.jsonl"),
        "{\"n\": 1}\n\n{\"n\": 2}\n{\"n\": 3}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("r.csv"),
        "name,qty\n\"Smith, J\",2\nLee,5\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("r.txt"), "alpha\nbeta\n").unwrap();
    for (file, expected) in [
        ("r.jsonl", json!([[{"n": 1}, {"n": 2}], [{"n": 3}]])),
        (
            "r.csv",
            json!([[{"name": "Smith, J", "qty": "2"}, {"name": "Lee", "qty": "5"}]]),
        ),
        ("r.txt", json!([["alpha", "beta"]])),
    ] {
        let yaml = format!(
            "actions:\n  Read:\n    lines: {file}\n    batch: 2\n    into: rows\n    event: got\nstate_machines:\n- name: L\n  states:\n  - name: read\n    initial: true\n    continuation: true\n    action: Read\n    transitions:\n    - event: got\n      to: all\n  - name: all\n    fan_in: all\n    action: All\n    final: true\n"
        );
        let cfg = load_str(&yaml, dir.path().join("l.yaml"), &LoadOptions::default())
            .unwrap()
            .config;
        let mut r = Registry::new();
        r.register_fn("All", |cx| {
            let mut pages: Vec<Value> = cx.contexts().iter().map(|c| c["rows"].clone()).collect();
            pages.sort_by_key(std::string::ToString::to_string);
            cx.put("pages", pages)?;
            Ok(None)
        });
        let run = Immediate::new(cfg, r).unwrap();
        let view = run.run("L", Context::new()).await.unwrap();
        assert_eq!(
            view.status,
            InstanceStatus::Completed,
            "{file}: {:?}",
            view.error
        );
        let mut want: Vec<Value> = expected.as_array().unwrap().clone();
        want.sort_by_key(std::string::ToString::to_string);
        assert_eq!(
            view.current_context.unwrap()["pages"],
            Value::Array(want),
            "{file}"
        );
    }
}

#[tokio::test]
async fn a_missing_file_fails_the_page_with_a_clear_error() {
    let yaml = "actions:\n  Read:\n    lines: nowhere.jsonl\n    event: got\nstate_machines:\n- name: L\n  task_retry_limit: 0\n  states:\n  - name: read\n    initial: true\n    continuation: true\n    final: true\n    action: Read\n";
    let run = Immediate::new(load(yaml), Registry::new()).unwrap();
    let view = run.run("L", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    assert!(view.error.unwrap().contains("cannot read"), "clear error");
}

#[tokio::test]
async fn forking_without_an_event_is_a_mistake() {
    let yaml = "state_machines:\n- name: F\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: F\n";
    let mut r = Registry::new();
    r.register_fn("F", |cx| {
        cx.fork(Context::new());
        Ok(None)
    });
    let run = Immediate::new(load(yaml), r).unwrap();
    let view = run.run("F", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    assert!(view
        .error
        .unwrap()
        .contains("forked the context but returned no event"));
}

async fn spawning_an_unknown_machine_fails_the_step(store: Arc<dyn Store>) {
    let yaml = "state_machines:\n- name: S\n  task_retry_limit: 0\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: S\n";
    let mut r = Registry::new();
    r.register_fn("S", |cx| {
        cx.spawn("Nope", vec![Context::new()]);
        Ok(None)
    });
    let run = Immediate::with_store(load(yaml), r, Arc::clone(&store)).unwrap();
    let view = run.run("S", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    assert!(view
        .error
        .unwrap()
        .contains("spawned machine `Nope`, which is not in the configuration"));
    assert!(
        run.store().list(&Default::default()).await.unwrap().len() == 1,
        "nothing was spawned"
    );
}

/// The `exec` protocol's parallel fields: `token` in and out, `forks`, `contexts` at a
/// join, and `spawn`.
async fn exec_actions_page_fork_join_and_spawn(store: Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import json, sys
step = sys.argv[1]
req = json.load(sys.stdin)
ctx = req["context"]
if step == "page":
    page = req["token"] or 0
    out = {"event": "split", "context": {"page": page}}
    if page < 2:
        out["token"] = page + 1
elif step == "split":
    p = ctx["page"]
    out = {"event": "join", "context": {"n": p * 10}, "forks": [{"n": p * 10 + 1}, {"n": p * 10 + 2}]}
elif step == "join":
    ns = sorted(c["n"] for c in req["contexts"])
    out = {"context": {"ns": ns}, "spawn": [{"machine": "Child", "contexts": [{"of": len(ns)}]}]}
else:
    out = {}
json.dump(out, sys.stdout)
"#;
    std::fs::write(dir.path().join("act.py"), script).unwrap();
    let yaml = r"
actions:
  Page: {exec: [python3, act.py, page]}
  Split: {exec: [python3, act.py, split]}
  Join: {exec: [python3, act.py, join]}
  Noop: {exec: [python3, act.py, noop]}
state_machines:
- name: Exec
  task_retry_limit: 0
  states:
  - name: page
    initial: true
    continuation: true
    action: Page
    transitions:
    - event: split
      to: split
  - name: split
    action: Split
    transitions:
    - event: join
      to: join
  - name: join
    fan_in: all
    action: Join
    final: true
- name: Child
  states:
  - name: only
    initial: true
    final: true
    action: Noop
";
    let cfg = load_str(yaml, dir.path().join("e.yaml"), &LoadOptions::default())
        .unwrap()
        .config;
    let run = Immediate::with_store(cfg, Registry::new(), Arc::clone(&store)).unwrap();
    let view = run.run("Exec", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{:?}", view.error);
    assert_eq!(
        view.current_context.unwrap()["ns"],
        json!([0, 1, 2, 10, 11, 12, 20, 21, 22])
    );
    assert_eq!(view.children.len(), 1);
    let child = run
        .store()
        .instance(&view.children[0])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(child.status, InstanceStatus::Completed);
    assert_eq!(child.context["of"], 9);
}

/// A reset of a forked instance: from the step that forked (the branches are made again and
/// joined again), not from a step that ran alongside the branches (they would be lost), nor
/// from a branch's step or the join.
async fn a_forked_instance_runs_again_only_from_a_step_that_ran_alone(store: Arc<dyn Store>) {
    let yaml = r"
state_machines:
- name: Order
  states:
  - name: split
    initial: true
    action: Split
    transitions:
    - event: item
      to: pack
  - name: pack
    action: Pack
    transitions:
    - event: packed
      to: ship
  - name: ship
    fan_in: all
    action: Ship
    final: true
";
    let joins = Arc::new(AtomicU64::new(0));
    let mut r = Registry::new();
    r.register_fn("Split", |cx| {
        for item in ["lamp", "mug"] {
            let mut d = Context::new();
            d.insert("item".into(), json!(item));
            cx.fork(d);
        }
        cx.put("item", "book")?;
        Ok(Some("item".into()))
    });
    r.register_fn("Pack", |_| Ok(Some("packed".into())));
    let j = Arc::clone(&joins);
    r.register_fn("Ship", move |cx| {
        j.fetch_add(1, Ordering::SeqCst);
        cx.put("shipped", cx.contexts().len())?;
        Ok(None)
    });
    let run = Immediate::with_store(load(yaml), r, Arc::clone(&store)).unwrap();
    let view = run.run("Order", Context::new()).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed);
    assert_eq!(view.current_context.as_ref().unwrap()["shipped"], 3);
    let name = view.name.clone();
    let step = |pick: &dyn Fn(&phasm::store::HistoryRow) -> bool| {
        view.history
            .iter()
            .find(|h| pick(h))
            .unwrap_or_else(|| panic!("{:?}", view.history))
            .id
    };
    let forking = step(&|h| h.from.is_none());
    let alongside = step(&|h| h.branch.is_empty() && h.to == "pack");
    let on_branch = step(&|h| !h.branch.is_empty() && !h.branch.starts_with('j'));
    let join = step(&|h| h.event == "fan-in");
    // A branch's step that ran and arrived at the fan-in is one task with two rows: what it
    // passed on went to the join, not to "the next row".
    let branch_step = run.store().step(&name, on_branch).await.unwrap().unwrap();
    assert_eq!(branch_step.passed_on, phasm::store::PassedOn::Nothing);
    let config = load(yaml);
    let reset = |id| phasm::control::reset(run.store(), &config, run.clock(), &name, id);
    let refused = reset(alongside).await.unwrap_err();
    assert!(
        matches!(refused, phasm::control::ResetError::Alongside { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("f1-1"), "{refused}");
    assert!(matches!(
        reset(on_branch).await.unwrap_err(),
        phasm::control::ResetError::OnBranch { .. }
    ));
    assert!(matches!(
        reset(join).await.unwrap_err(),
        phasm::control::ResetError::NoInput { .. }
    ));
    // From the fork: the branches are made again and joined again, once.
    reset(forking).await.unwrap();
    run.run_pending().await.unwrap();
    let again = run.store().instance(&name).await.unwrap().unwrap();
    assert_eq!(again.status, InstanceStatus::Completed, "{again:?}");
    assert_eq!(again.current_context.as_ref().unwrap()["shipped"], 3);
    assert_eq!(joins.load(Ordering::SeqCst), 2, "joined once per run");
    assert_eq!(
        again.branches.ended, 1,
        "the new run's counts: {:?}",
        again.branches
    );
}

on_both_stores!(
    a_barrier_joins_once_when_every_branch_has_arrived,
    late_arrivals_open_the_next_window,
    built_in_list_pages_run_in_parallel_branches,
    exec_actions_page_fork_join_and_spawn,
    spawning_an_unknown_machine_fails_the_step,
    a_forked_instance_runs_again_only_from_a_step_that_ran_alone,
);

//! Instances run end to end on the SQLite store with Rust and exec actions.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use phasm::action::Registry;
use phasm::clock::{Clock, SystemClock};
use phasm::config::{load_str, LoadOptions};
use phasm::control::{start_instance, StartOutcome};
use phasm::engine::{Context, Limits};
use phasm::machine::Config;
use phasm::store::{InstanceStatus, SqliteOptions, SqliteStore, Store};
use phasm::worker::{StopWhen, Worker, WorkerOptions};

fn config(yaml: &str, dir: &std::path::Path) -> Arc<Config> {
    Arc::new(
        load_str(yaml, dir.join("fsm.yaml"), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .config,
    )
}

async fn run_one(
    store: Arc<dyn Store>,
    config: Arc<Config>,
    registry: Registry,
    machine: &str,
    context: Context,
) -> String {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let started = start_instance(
        &*store,
        &config,
        &*clock,
        machine,
        context,
        None,
        &Limits::default(),
    )
    .await
    .unwrap();
    let name = started.name().to_string();
    let options = WorkerOptions {
        stop: StopWhen::Ended(vec![name.clone()]),
        poll_interval: Duration::from_millis(50),
        ..WorkerOptions::default()
    };
    let worker = Worker::new(store, config, Arc::new(registry), clock, options).unwrap();
    tokio::time::timeout(Duration::from_secs(60), worker.run(std::future::pending()))
        .await
        .expect("finishes")
        .unwrap();
    name
}

const LINEAR: &str = r#"
state_machines:
- name: Linear
  states:
  - name: a
    initial: true
    entry: Count
    action: Next
    exit: Count
    transitions:
    - event: next
      to: b
      action: Count
  - name: b
    action: Next
    transitions:
    - event: next
      to: c
  - name: c
    final: true
    action: Count
    exit: Count
"#;

#[tokio::test]
async fn a_linear_machine_completes_with_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    let counter = Arc::new(AtomicU32::new(0));
    let mut registry = Registry::new();
    let c = Arc::clone(&counter);
    registry.register_fn("Count", move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        Ok(None)
    });
    registry.register_fn("Next", |cx| {
        let n: u32 = cx.get("n")?.unwrap_or(0);
        cx.put("n", n + 1)?;
        Ok(Some("next".into()))
    });
    let name = run_one(
        Arc::clone(&store),
        config(LINEAR, dir.path()),
        registry,
        "Linear",
        Context::new(),
    )
    .await;
    let view = store.instance(&name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    let path: Vec<(Option<&str>, &str, &str)> = view
        .history
        .iter()
        .map(|h| (h.from.as_deref(), h.event.as_str(), h.to.as_str()))
        .collect();
    assert_eq!(
        path,
        [
            (None, "pseudo-init", "a"),
            (Some("a"), "next", "b"),
            (Some("b"), "next", "c"),
            (Some("c"), "pseudo-final", "pseudo-final"),
        ]
    );
    // entry a, exit a, transition a->b, action c, exit c (in the pseudo-final step).
    assert_eq!(counter.load(Ordering::SeqCst), 5);
    assert_eq!(view.current_context.unwrap()["n"], 2);
    assert!(view.tasks.is_empty());
}

#[tokio::test]
async fn starting_the_same_name_twice_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap();
    let cfg = config(LINEAR, dir.path());
    let first = start_instance(
        &store,
        &cfg,
        &SystemClock,
        "Linear",
        Context::new(),
        Some("order-1"),
        &Limits::default(),
    )
    .await
    .unwrap();
    let again = start_instance(
        &store,
        &cfg,
        &SystemClock,
        "Linear",
        Context::new(),
        Some("order-1"),
        &Limits::default(),
    )
    .await
    .unwrap();
    assert_eq!(first, StartOutcome::Started("order-1".into()));
    assert!(matches!(
        again,
        StartOutcome::AlreadyExists {
            status: InstanceStatus::Running,
            ..
        }
    ));
    assert_eq!(
        store
            .instance("order-1")
            .await
            .unwrap()
            .unwrap()
            .tasks
            .len(),
        1
    );
}

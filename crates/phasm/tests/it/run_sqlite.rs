//! Instances run end to end on the SQLite store with Rust and exec actions.

use phasm::store::prelude::*;
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

const LINEAR: &str = r"
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
";

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

struct Tracked {
    running: Arc<AtomicU32>,
    peak: Arc<AtomicU32>,
}

#[async_trait::async_trait]
impl phasm::action::Action for Tracked {
    async fn run(&self, _cx: &mut phasm::action::ActionContext) -> phasm::action::ActionResult {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(None)
    }
}

const LIMITED: &str = r"
queues:
  narrow:
    max_concurrent: 2
  slow:
    rate: 10/s
state_machines:
- name: Narrow
  queue: narrow
  states:
  - name: a
    initial: true
    final: true
    action: Tracked
- name: Slow
  queue: slow
  states:
  - name: a
    initial: true
    final: true
    action: Quick
";

async fn run_all(
    store: Arc<dyn Store>,
    cfg: Arc<Config>,
    registry: Registry,
    machine: &str,
    n: usize,
) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    for _ in 0..n {
        start_instance(
            &*store,
            &cfg,
            &*clock,
            machine,
            Context::new(),
            None,
            &Limits::default(),
        )
        .await
        .unwrap();
    }
    let options = WorkerOptions {
        stop: StopWhen::Idle,
        concurrency: 32,
        ..WorkerOptions::default()
    };
    let worker = Worker::new(store, cfg, Arc::new(registry), clock, options).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), worker.run(std::future::pending()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.steps, n as u64);
}

#[tokio::test]
async fn a_queue_runs_at_most_max_concurrent_steps_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    let peak = Arc::new(AtomicU32::new(0));
    let mut registry = Registry::new();
    registry.register(
        "Tracked",
        Tracked {
            running: Arc::new(AtomicU32::new(0)),
            peak: Arc::clone(&peak),
        },
    );
    registry.register_fn("Quick", |_| Ok(None));
    run_all(store, config(LIMITED, dir.path()), registry, "Narrow", 10).await;
    assert_eq!(
        peak.load(Ordering::SeqCst),
        2,
        "max_concurrent: 2 with 32 worker slots"
    );
}

#[tokio::test]
async fn a_queue_starts_no_more_than_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    let mut registry = Registry::new();
    registry.register_fn("Tracked", |_| Ok(None));
    registry.register_fn("Quick", |_| Ok(None));
    let began = std::time::Instant::now();
    run_all(store, config(LIMITED, dir.path()), registry, "Slow", 20).await;
    // 10 start at once (a full bucket), the other 10 at 10 per second: at least ~0.9 s.
    assert!(
        began.elapsed() >= Duration::from_millis(850),
        "{:?}",
        began.elapsed()
    );
}

struct Hang;

#[async_trait::async_trait]
impl phasm::action::Action for Hang {
    async fn run(&self, _cx: &mut phasm::action::ActionContext) -> phasm::action::ActionResult {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(None)
    }
}

#[tokio::test]
async fn a_rust_action_past_the_worker_timeout_fails_its_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    let yaml = "state_machines:\n- name: H\n  task_retry_limit: 0\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Hang\n";
    let cfg = config(yaml, dir.path());
    let mut registry = Registry::new();
    registry.register("Hang", Hang);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let name = start_instance(
        &*store,
        &cfg,
        &*clock,
        "H",
        Context::new(),
        None,
        &Limits::default(),
    )
    .await
    .unwrap()
    .name()
    .to_string();
    let options = WorkerOptions {
        stop: StopWhen::Ended(vec![name.clone()]),
        action_timeout: Duration::from_millis(200),
        ..WorkerOptions::default()
    };
    let worker = Worker::new(Arc::clone(&store), cfg, Arc::new(registry), clock, options).unwrap();
    tokio::time::timeout(Duration::from_secs(30), worker.run(std::future::pending()))
        .await
        .unwrap()
        .unwrap();
    let view = store.instance(&name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    assert!(view
        .error
        .unwrap()
        .contains("action `Hang` of state `a` failed: timed out after 0.2s"));
}

/// A worker on a SQLite file takes an instance started through another connection to that
/// file (as `phasm start` in another process does) when it is committed, not at its next poll:
/// here the poll and the heartbeat are minutes away, and the instance completes in well under
/// a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_through_another_connection_wakes_an_idle_worker() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let yaml = "state_machines:\n- name: M\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Done\n";
    let config = config(yaml, dir.path());
    let worker_store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&path, &SqliteOptions::default()).unwrap());
    assert!(worker_store.notifies_other_processes());
    let mut registry = Registry::new();
    registry.register_fn("Done", |_| Ok(None));
    let worker = Worker::new(
        Arc::clone(&worker_store),
        Arc::clone(&config),
        Arc::new(registry),
        Arc::new(SystemClock),
        WorkerOptions {
            // Neither the poll nor the heartbeat (a third of the lease) comes during the test.
            poll_interval: Duration::from_secs(3600),
            lease: Duration::from_secs(600),
            ..WorkerOptions::default()
        },
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    // Let the worker find nothing to do and go to sleep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
    start_instance(
        &other,
        &config,
        &SystemClock,
        "M",
        Context::new(),
        Some("late"),
        &Limits::default(),
    )
    .await
    .unwrap();
    let mut status = InstanceStatus::Running;
    for _ in 0..600 {
        status = worker_store.instance("late").await.unwrap().unwrap().status;
        if status != InstanceStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status,
        InstanceStatus::Completed,
        "the idle worker was not woken by the other connection's commit"
    );
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

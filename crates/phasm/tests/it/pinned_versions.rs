//! Each instance runs on the version of its machine it started on: a worker started with a
//! newer file runs an older instance's steps on the older version's states and bindings, and
//! leaves the steps of a version it cannot run (an action bound to nothing in it) for a worker
//! that can, without using up their attempts. On SQLite and PostgreSQL.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use phasm::action::Registry;
use phasm::clock::{Clock, SystemClock};
use phasm::config::{load_str, LoadOptions};
use phasm::control::{deploy, DeployFile};
use phasm::engine::Context;
use phasm::machine::Config;
use phasm::store::{InstanceStatus, Store};
use phasm::worker::{StopWhen, Worker, WorkerOptions};

use crate::common::start;

/// Version 1: `a` then `b`, its `Tag` binding writing `one`.
const V1: &str = r#"actions:
  Tag:
    exec: [sh, -c, 'cat > /dev/null; echo "{\"context\": {\"tag\": \"one\"}}"']
state_machines:
- name: Order
  states:
  - name: a
    initial: true
    action: Next
    transitions:
    - event: go
      to: b
  - name: b
    final: true
    action: Tag
"#;

/// Version 2: `b` renamed `c`, `Tag` writing `two`.
fn v2() -> String {
    V1.replace("to: b", "to: c")
        .replace("name: b", "name: c")
        .replace("one", "two")
}

fn config(yaml: &str) -> Config {
    load_str(yaml, "fsm.yaml", &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .config
}

async fn deployed(store: &dyn Store, yaml: &str) -> Config {
    let config = config(yaml);
    let file = DeployFile {
        config: &config,
        path: Path::new("fsm.yaml"),
        source: yaml,
    };
    deploy(store, &SystemClock, &[file]).await.unwrap();
    config
}

/// `Next` (a Rust handler, the worker's own code) leaves `a` with `go`; `names` more handlers
/// that do nothing.
fn registry(config: &Config, names: &[&str]) -> Arc<Registry> {
    let mut registry = Registry::new();
    registry.bind_config(config);
    registry.register_fn("Next", |cx| {
        Ok((cx.state() == "a").then(|| "go".to_string()))
    });
    for name in names {
        registry.register_fn(*name, |_| Ok(None));
    }
    Arc::new(registry)
}

async fn work(store: &Arc<dyn Store>, config: Config, registry: Arc<Registry>, wait_for: &[&str]) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let worker = Worker::new(
        Arc::clone(store),
        Arc::new(config),
        registry,
        clock,
        WorkerOptions {
            stop: StopWhen::Ended(wait_for.iter().map(|s| (*s).to_string()).collect()),
            poll_interval: Duration::from_millis(50),
            ..WorkerOptions::default()
        },
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), worker.run(std::future::pending()))
        .await
        .expect("the worker finishes the instances")
        .unwrap();
}

async fn ended(store: &dyn Store, name: &str) -> (u32, Vec<String>, serde_json::Value) {
    let view = store.instance(name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    (
        view.version.unwrap(),
        view.end_states,
        view.current_context
            .and_then(|c| c.get("tag").cloned())
            .unwrap_or_default(),
    )
}

async fn an_instance_runs_on_the_version_it_started_on(store: Arc<dyn Store>) {
    let v1 = deployed(&*store, V1).await;
    let old = start(&*store, &v1, "Order", Context::new()).await;
    let v2 = deployed(&*store, &v2()).await;
    let new = start(&*store, &v2, "Order", Context::new()).await;
    // One worker, started with the newer file, runs both.
    let registry = registry(&v2, &[]);
    work(&store, v2, registry, &[&old, &new]).await;
    assert_eq!(
        ended(&*store, &old).await,
        (1, vec!["b".to_string()], "one".into()),
        "the old instance ends through v1's states, with v1's binding"
    );
    assert_eq!(
        ended(&*store, &new).await,
        (2, vec!["c".to_string()], "two".into())
    );
}

async fn a_worker_leaves_the_steps_of_a_version_it_cannot_run(store: Arc<dyn Store>) {
    // v1 calls `Audit`, a Rust handler the newer worker no longer registers.
    let v1_yaml = V1.replace("    action: Tag\n", "    action: Tag\n    entry: Audit\n");
    let v1 = deployed(&*store, &v1_yaml).await;
    let old = start(&*store, &v1, "Order", Context::new()).await;
    let v2 = deployed(&*store, &v2()).await;
    let new = start(&*store, &v2, "Order", Context::new()).await;
    let newer = registry(&v2, &[]);
    work(&store, v2.clone(), newer, &[&new]).await;
    // The old instance's first step waits, its attempts unused.
    let view = store.instance(&old).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Running, "{view:?}");
    assert!(view.history.is_empty(), "{view:?}");
    let task = view.tasks.first().expect("the first step waits");
    assert_eq!(task.attempts, 0, "{task:?}");
    let error = task.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("cannot run `Order` v1") && error.contains("Audit"),
        "{error}"
    );
    // A worker that registers `Audit` (the older deploy) finishes it on v1.
    let older = registry(&v1, &["Audit"]);
    work(&store, v1, older, &[&old]).await;
    assert_eq!(
        ended(&*store, &old).await,
        (1, vec!["b".to_string()], "one".into())
    );
}

on_both_stores!(
    an_instance_runs_on_the_version_it_started_on,
    a_worker_leaves_the_steps_of_a_version_it_cannot_run,
);

//! The store conformance suite against PostgreSQL, each check in a schema of its own (see
//! `common/postgres.rs` for the database it uses and when it skips).

mod common;

use common::postgres::Schema;
use phasm::store::conformance;

#[tokio::test]
async fn postgres_passes_the_conformance_suite() {
    let schemas = std::sync::Mutex::new(Vec::new());
    match Schema::fresh("reachable").await {
        None => return,
        Some(schema) => schema.drop_schema().await,
    }
    conformance::run_all(|check| {
        let schemas = &schemas;
        async move {
            let schema = Schema::fresh(check).await.expect("PostgreSQL went away");
            let store = schema.store().await;
            schemas.lock().unwrap().push(schema);
            store
        }
    })
    .await;
    let schemas = std::mem::take(&mut *schemas.lock().unwrap());
    for schema in schemas {
        schema.drop_schema().await;
    }
}

#[tokio::test]
async fn postgres_errors_say_whether_they_pass() {
    use phasm::store::{PostgresOptions, PostgresStore};
    // Nothing listens on port 1: connecting fails, and may work later.
    let unreachable = PostgresStore::open(
        "postgres://postgres@127.0.0.1:1/test?connect_timeout=2",
        &PostgresOptions::default(),
    )
    .await
    .expect_err("nothing listens there");
    assert!(unreachable.is_transient(), "{unreachable}");
    assert!(std::error::Error::source(&unreachable).is_some());
    // A URL that is not one fails the same way every time.
    let bad = PostgresStore::open("postgres://[", &PostgresOptions::default())
        .await
        .expect_err("not a URL");
    assert!(!bad.is_transient(), "{bad}");
}

/// A worker told to stop when an instance ends notices it even when someone else ended it
/// and its own heartbeat (a short lease) keeps waking it before its idle sleep runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_notices_that_another_ended_its_instance() {
    use std::sync::Arc;
    use std::time::Duration;

    use phasm::action::{Action, ActionContext, ActionResult, Registry};
    use phasm::clock::{Clock, SystemClock};
    use phasm::config::{load_str, LoadOptions};
    use phasm::control::start_instance;
    use phasm::engine::{Context, Limits};
    use phasm::store::{Control, Store};
    use phasm::worker::{StopWhen, Worker, WorkerOptions};

    struct Slow;
    #[async_trait::async_trait]
    impl Action for Slow {
        async fn run(&self, _cx: &mut ActionContext) -> ActionResult {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(None)
        }
    }

    let Some(schema) = Schema::fresh("notices_ended").await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(schema.store().await);
    let yaml = "state_machines:\n- name: S\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Slow\n";
    let config = Arc::new(
        load_str(yaml, "s.yaml", &LoadOptions::default())
            .unwrap()
            .config,
    );
    let mut registry = Registry::new();
    registry.register("Slow", Slow);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let name = start_instance(
        &*store,
        &config,
        &*clock,
        "S",
        Context::new(),
        None,
        &Limits::default(),
    )
    .await
    .unwrap()
    .name()
    .to_string();
    let worker = Worker::new(
        Arc::clone(&store),
        config,
        Arc::new(registry),
        Arc::clone(&clock),
        WorkerOptions {
            lease: Duration::from_millis(600),
            stop: StopWhen::Ended(vec![name.clone()]),
            ..WorkerOptions::default()
        },
    )
    .unwrap();
    let worker = tokio::spawn(worker.run(std::future::pending()));
    while store.instance(&name).await.unwrap().unwrap().tasks[0]
        .leased_by
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.cancel(clock.now(), &name).await.unwrap(),
        Control::Done
    );
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker did not notice that its instance ended")
        .unwrap()
        .unwrap();
    schema.drop_schema().await;
}

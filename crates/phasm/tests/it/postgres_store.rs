//! The store conformance suite against PostgreSQL, each check in a schema of its own (see
//! `common/postgres.rs` for the database it uses and when it skips).

use crate::common;

use common::postgres::Schema;
use phasm::store::conformance;

/// One test per conformance check (`conformance::NAME`), each in a fresh schema named after
/// it: a failure names its check, and the other checks still run.
macro_rules! on_postgres {
    ($($check:ident),*) => {
        mod conformance_checks {
            use super::*;
            $(
                #[tokio::test]
                async fn $check() {
                    let Some(schema) = Schema::fresh(stringify!($check)).await else {
                        return;
                    };
                    conformance::$check(&schema.store().await).await;
                    schema.drop_schema().await;
                }
            )*
        }
    };
}
phasm::for_each_conformance_check!(on_postgres);

/// PostgreSQL commits a chain step and a branch parking at a fan-in as one statement each;
/// every other commit takes the general transaction that carries out the plan step by step.
/// Both must leave the same rows: the same workload, with the same clock, is run once each
/// way and every table compared.
#[tokio::test]
async fn single_statement_commits_leave_the_rows_the_general_path_leaves() {
    use phasm::store::PostgresOptions;
    for seed in 1..=4 {
        let (Some(fused), Some(general)) = (
            Schema::fresh(&format!("fused_{seed}")).await,
            Schema::fresh(&format!("general_{seed}")).await,
        ) else {
            return;
        };
        let options = |fused_commits| PostgresOptions {
            fused_commits,
            ..PostgresOptions::default()
        };
        conformance::mixed_workload(&fused.store_with(&options(true)).await, seed).await;
        conformance::mixed_workload(&general.store_with(&options(false)).await, seed).await;
        for (table, order) in [
            ("instances", "id"),
            ("tasks", "id"),
            ("history", "id"),
            ("items", "id"),
            ("logs", "id"),
            ("events", "id"),
            ("settle_queue", "instance_id"),
        ] {
            let (a, b) = (
                fused.rows(table, order).await,
                general.rows(table, order).await,
            );
            assert!(!a.is_empty() || !["instances", "history"].contains(&table));
            let differs = a.iter().zip(&b).position(|(x, y)| x != y);
            assert!(
                differs.is_none() && a.len() == b.len(),
                "table {table}, seed {seed}: {} rows single-statement, {} general; first \
                 difference:\n  {:?}\n  {:?}",
                a.len(),
                b.len(),
                differs.map(|i| &a[i]),
                differs.map(|i| &b[i]),
            );
        }
        fused.drop_schema().await;
        general.drop_schema().await;
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
    use phasm::engine::Context;
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
    let name = common::start(&*store, &config, "S", Context::new()).await;
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

/// A store's connections — its pool and the one that listens for `NOTIFY` — close when it
/// is dropped, so a process that opens stores over and over does not run the server out of
/// connections.
#[tokio::test]
async fn dropping_a_store_closes_its_connections() {
    use phasm::store::{PostgresOptions, PostgresStore};
    let Some(schema) = Schema::fresh("drop_closes").await else {
        return;
    };
    let url = format!("{}&application_name=phasm_drop_probe", schema.url());
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let count = || async {
        let row = client
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE application_name = 'phasm_drop_probe' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    for _ in 0..5 {
        let store = PostgresStore::open(&url, &PostgresOptions::default())
            .await
            .unwrap();
        use phasm::store::prelude::*;
        store.list(&Default::default()).await.unwrap();
        drop(store);
    }
    let mut open = count().await;
    for _ in 0..50 {
        if open == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        open = count().await;
    }
    assert_eq!(open, 0, "connections left open by dropped stores");
    schema.drop_schema().await;
}

/// The checks that span an instance's branches run on PostgreSQL after a commit's transaction
/// (see `store::plan`); a worker that dies between the two leaves them undone, and the sweep
/// redoes them: here an instance left running with nothing pending, and a barrier join left
/// waiting with no branch live.
#[tokio::test]
async fn the_sweep_redoes_settling_a_dead_worker_left_undone() {
    use phasm::engine::{Commit, Context, InstanceChange, TaskKind};
    use phasm::store::prelude::*;
    use phasm::store::InstanceStatus;

    let Some(schema) = Schema::fresh("sweep").await else {
        return;
    };
    let store = schema.store().await;
    let now = 1_800_000_000_000_000;
    let start = |name: &str| one_step_instance(name, now);
    store.start(now, start("done")).await.unwrap();
    let request = claim_one();
    let task = store.claim(now, &request).await.unwrap().remove(0);
    let mut c = Commit::finishing(&task);
    c.instance_change = InstanceChange::BranchEnded(Context::new());
    store.apply(now, c.into(), None).await.unwrap();
    let status = |store: &phasm::store::PostgresStore, name: &'static str| {
        let store = store.clone();
        async move { store.instance(name).await.unwrap().unwrap().status }
    };
    assert_eq!(status(&store, "done").await, InstanceStatus::Completed);
    // The commit noted that the instance may be complete, and the check right after it
    // removed the note.
    schema
        .execute("DO $$ BEGIN IF EXISTS (SELECT 1 FROM settle_queue) THEN RAISE 'note left'; END IF; END $$")
        .await;
    // The worker died after its commit, before that check: the instance is left running,
    // noted.
    schema
        .execute(
            "UPDATE instances SET status = 'running', ended_at = NULL WHERE name = 'done';
             INSERT INTO settle_queue SELECT id, 1 FROM instances WHERE name = 'done'",
        )
        .await;
    store.sweep(now + 1).await.unwrap();
    assert_eq!(status(&store, "done").await, InstanceStatus::Completed);
    schema
        .execute("DO $$ BEGIN IF EXISTS (SELECT 1 FROM settle_queue) THEN RAISE 'note kept'; END IF; END $$")
        .await;
    // The sweep looks only at noted instances: it does not scan the running ones.
    schema
        .execute("UPDATE instances SET status = 'running', ended_at = NULL WHERE name = 'done'")
        .await;
    store.sweep(now + 2).await.unwrap();
    assert_eq!(status(&store, "done").await, InstanceStatus::Running);
    schema
        .execute("UPDATE instances SET status = 'completed' WHERE name = 'done'")
        .await;

    // A barrier join left waiting though no branch of its instance is live.
    store.start(now, start("barrier")).await.unwrap();
    schema
        .execute(
            "UPDATE tasks SET kind = 'join', status = 'waiting', from_state = 'j', grp = '',
                    event = 'fan-in'
             WHERE name = 'barrier--start'",
        )
        .await;
    assert!(store.claim(now + 2, &request).await.unwrap().is_empty());
    store.sweep(now + 3).await.unwrap();
    let released = store.claim(now + 3, &request).await.unwrap();
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(released[0].kind, TaskKind::Join);
    // A sweep of a settled store changes nothing.
    let before = store.instance("done").await.unwrap();
    store.sweep(now + 4).await.unwrap();
    assert_eq!(store.instance("done").await.unwrap(), before);
    schema.drop_schema().await;
}

/// A cancel that comes while a step of the instance commits waits for that commit and
/// drops what it queued. (Under READ COMMITTED, one `DELETE` that waited for the commit
/// would not see the successor the commit wrote, and the canceled instance would run on:
/// the simulation found this.) The same holds for a reset and for a failed instance's hold,
/// which lock the instance's tasks the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_waits_for_a_commit_running_meanwhile_and_drops_what_it_queued() {
    use phasm::store::prelude::*;
    use phasm::store::{Control, InstanceStatus};
    use std::time::Duration;

    let Some(schema) = Schema::fresh("cancel_race").await else {
        return;
    };
    let store = schema.store().await;
    let now = 1_800_000_000_000_000;
    store
        .start(now, one_step_instance("racing", now))
        .await
        .unwrap();
    let request = claim_one();
    let task = store.claim(now, &request).await.unwrap().remove(0);

    // A step's commit, begun: its fence deleted (and so locked) its task, and it is about to
    // write the task's successor.
    let (mut step, connection) = tokio_postgres::connect(schema.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let pid: i32 = step
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let tx = step.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE successor AS SELECT * FROM tasks WHERE id = {id};
         DELETE FROM tasks WHERE id = {id}",
        id = task.id
    ))
    .await
    .unwrap();

    // The cancel comes, and waits for the step's lock.
    let cancel = tokio::spawn({
        let store = store.clone();
        async move { store.cancel(now, "racing").await }
    });
    let (watch, connection) = tokio_postgres::connect(schema.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut waited = 0;
    loop {
        let blocked: i64 = watch
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if blocked > 0 {
            break;
        }
        waited += 1;
        assert!(
            waited < 500,
            "the cancel never waited for the step's commit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The step writes its successor and commits.
    tx.batch_execute(
        "UPDATE successor SET id = nextval(pg_get_serial_sequence('tasks', 'id')),
                              name = name || '-next';
         INSERT INTO tasks SELECT * FROM successor",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    assert_eq!(cancel.await.unwrap().unwrap(), Control::Done);
    let view = store.instance("racing").await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Cancelled);
    assert!(
        schema.rows("tasks", "id").await.is_empty(),
        "the step's successor outlived the cancel"
    );
    assert!(store.claim(now, &request).await.unwrap().is_empty());
    schema.drop_schema().await;
}

/// An instance of machine `M` whose start task (`NAME--start`) is due at `now`.
fn one_step_instance(name: &str, now: i64) -> phasm::store::NewInstance {
    use phasm::engine::{Context, NewTask, TaskKind};
    phasm::store::NewInstance {
        name: name.into(),
        machine: "M".into(),
        context: Context::new(),
        start: NewTask {
            name: format!("{name}--start"),
            from_state: None,
            event: "go".into(),
            kind: TaskKind::Dispatch,
            context: Context::new(),
            step: 0,
            branch: String::new(),
            queue: "default".into(),
            target: None,
            due_at: now,
            token: None,
        },
        version: None,
    }
}

/// A claim of one task of any queue by worker `w`, leased for 10 s.
fn claim_one() -> phasm::store::ClaimRequest {
    phasm::store::ClaimRequest {
        owner: "w".into(),
        lease: std::time::Duration::from_secs(10),
        limit: 1,
        queue_limits: Vec::new(),
        queues: None,
        targets: phasm::store::Targets::Any,
        shared_limits: Vec::new(),
    }
}

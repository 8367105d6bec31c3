//! Several real workers — claiming, leasing, renewing and committing concurrently — run
//! random machines (a continuation paging through a list, a fork per item, retried failures,
//! window and barrier fan-ins) over one store that fails on purpose: calls refused and
//! delayed, claims and commits applied but their answers lost, renewals failing until leases
//! expire under running steps. Whatever happens, every instance completes, every page is
//! committed once and every item is joined exactly once.
//!
//! Both stores: `PHASM_SIM_SEEDS=N` runs N seeds on each (by default 12 on SQLite and 4 on
//! PostgreSQL), `PHASM_SIM_SEED=K` replays seed K alone; a failure names its seed. The seed fixes
//! the machine's shape, the actions' failures and the store's faults; the interleaving of
//! the workers is the operating system's, so a seed replays its faults, not its timing.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use phasm::action::{Action, ActionContext, ActionResult, Registry};
use phasm::clock::{Clock, SystemClock};
use phasm::config::{load_str, LoadOptions};
use phasm::engine::Context;
use phasm::store::{InstanceStatus, SqliteOptions, SqliteStore, Store};
use phasm::testing::{Faults, FaultyStore};
use phasm::worker::{StopWhen, Worker, WorkerOptions};
use serde_json::json;

fn machine(window: u64) -> String {
    format!(
        r#"
state_machines:
- name: Sim
  task_retry_limit: 1000
  min_backoff_seconds: 10ms
  max_backoff_seconds: 50ms
  states:
  - name: read
    initial: true
    continuation: true
    action: Page
    transitions:
    - event: split
      to: split
  - name: split
    action: Split
    transitions:
    - event: work
      to: work
  - name: work
    action: Work
    transitions:
    - event: join
      to: gather
  - name: gather
    fan_in: {window}
    action: Gather
    transitions:
    - event: done
      to: total
  - name: total
    fan_in: all
    action: Total
    final: true
"#
    )
}

fn registry(page: u64, fail_rate: f64, slow_rate: f64, seed: u64) -> Registry {
    let mut r = common::paging::registry(page);
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
    r.register(
        "Work",
        Work {
            rng,
            fail_rate,
            slow_rate,
        },
    );
    r
}

/// Fails now and then, and now and then runs longer than a lease.
struct Work {
    rng: Arc<Mutex<fastrand::Rng>>,
    fail_rate: f64,
    slow_rate: f64,
}

#[async_trait]
impl Action for Work {
    async fn run(&self, _cx: &mut ActionContext) -> ActionResult {
        let (fail, slow) = {
            let mut rng = self.rng.lock().unwrap();
            (rng.f64() < self.fail_rate, rng.f64() < self.slow_rate)
        };
        if slow {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        if fail {
            return Err("a passing fault".into());
        }
        Ok(Some("join".into()))
    }
}

async fn simulate(seed: u64, inner: Arc<dyn Store>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = rng.u64(1..=40);
    let page = rng.u64(1..=8);
    let window = rng.u64(0..=1);
    let workers = rng.usize(1..=3);
    let faults = Faults {
        error: rng.f64() * 0.1,
        lost_reply: rng.f64() * 0.1,
        delay: rng.f64() * 0.2,
        max_delay: Duration::from_millis(rng.u64(1..=60)),
    };
    let about =
        format!("seed {seed}: n={n} page={page} fan_in={window} workers={workers} {faults:?}");
    let config = Arc::new(
        load_str(&machine(window), "sim.yaml", &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{about}: {e}"))
            .config,
    );
    let store = Arc::new(FaultyStore::new(Arc::clone(&inner), faults, seed));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut context = Context::new();
    context.insert("n".into(), json!(n));
    let name = common::start(&*inner, &config, "Sim", context).await;
    let mut running = Vec::new();
    for w in 0..workers {
        let registry = registry(page, 0.1, 0.05, seed * 10 + w as u64);
        let worker = Worker::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&config),
            Arc::new(registry),
            Arc::clone(&clock),
            WorkerOptions {
                owner: format!("w{w}"),
                concurrency: 4,
                // Renewed every 40 ms: a slow step or a few failed renewals lose it.
                lease: Duration::from_millis(120),
                poll_interval: Duration::from_millis(20),
                stop: StopWhen::Ended(vec![name.clone()]),
                seed: Some(seed + w as u64),
                ..WorkerOptions::default()
            },
        )
        .unwrap();
        running.push(tokio::spawn(worker.run(std::future::pending())));
    }
    for worker in running {
        match tokio::time::timeout(Duration::from_secs(60), worker).await {
            Ok(done) => {
                done.unwrap().unwrap_or_else(|e| panic!("{about}: {e}"));
            }
            Err(_) => {
                let view = inner.instance(&name).await.unwrap();
                panic!("{about}: did not finish: {view:#?}");
            }
        }
    }
    let view = inner.instance(&name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{about}: {view:?}");
    let result = view.current_context.clone().unwrap_or_default();
    let ids = common::paging::joined_ids(&result).unwrap_or_else(|| panic!("{about}: {result:?}"));
    assert_eq!(
        ids,
        (0..n).collect::<Vec<_>>(),
        "{about}: every item joined exactly once"
    );
    let mut pages = 0;
    phasm::store::for_each_transition(&*inner, &name, |h| {
        pages += u64::from(h.to == "read");
    })
    .await
    .unwrap();
    assert_eq!(
        pages,
        n.div_ceil(page),
        "{about}: every page committed once"
    );
    assert_eq!(view.branches.parked, 0, "{about}");
    assert_eq!(view.tasks_total, 0, "{about}");
    let counts = store.counts();
    eprintln!("{about}: ok, {counts:?}");
}

/// The seeds to run: `PHASM_SIM_SEED=K` replays one, `PHASM_SIM_SEEDS=N` runs the first N.
fn seeds(default: u64) -> std::ops::Range<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    match var("PHASM_SIM_SEED") {
        Some(k) => k..k + 1,
        None => 0..var("PHASM_SIM_SEEDS").unwrap_or(default),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_over_a_failing_sqlite_store_lose_nothing_and_join_each_item_once() {
    for seed in seeds(12) {
        let store = SqliteStore::open(":memory:", &SqliteOptions::default()).unwrap();
        simulate(seed, Arc::new(store)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_over_a_failing_postgres_store_lose_nothing_and_join_each_item_once() {
    for seed in seeds(4) {
        let Some(schema) = common::postgres::Schema::fresh("simulation").await else {
            return;
        };
        simulate(seed, Arc::new(schema.store().await)).await;
        schema.drop_schema().await;
    }
}

//! Several real workers — claiming, leasing, renewing and committing concurrently — run
//! random machines (a continuation paging through a list, a fork per item, retried failures,
//! countdowns, spawned child instances, window and barrier fan-ins) over one store that fails
//! on purpose: calls refused and delayed, claims and commits applied but their answers lost,
//! steps running past their lease. Whatever happens, every instance completes, every
//! transition is committed once, every page once, every child starts once, and every item is
//! joined exactly once.
//!
//! On SQLite the simulation is deterministic: the workers run on one thread on tokio's paused
//! clock ([`TokioClock`]: sleeps, timeouts and leases take no real time) over a store that
//! runs each call on the calling thread ([`Threads::Caller`]), so a seed fixes everything —
//! the machine's shape, the actions' failures, the store's faults and the interleaving — and
//! replays exactly (a test checks that). On PostgreSQL the workers run in real time on two
//! threads against the real server, so a seed replays its faults, not its timing.
//!
//! `PHASM_SIM_SEEDS=N` runs N seeds on each store (by default 200 on SQLite and 4 on
//! PostgreSQL), `PHASM_SIM_FIRST=F` starts at seed F, `PHASM_SIM_SEED=K` replays seed K
//! alone; a failure names its seed.

// Tests panic on purpose when what they check does not hold: unwrap and expect are the
// assertions of setup steps here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "it/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use phasm::action::{Action, ActionContext, ActionResult, Registry};
use phasm::clock::{Clock, SystemClock, TokioClock};
use phasm::config::{load_str, LoadOptions};
use phasm::control::start_instance;
use phasm::engine::{Context, HistoryEntry, Limits};
use phasm::store::{InstanceStatus, SqliteOptions, SqliteStore, Store, Threads};
use phasm::testing::{FaultCounts, Faults, FaultyStore};
use phasm::worker::{StopWhen, Worker, WorkerOptions};
use serde_json::json;

fn machine(window: u64) -> String {
    format!(
        r"
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
      countdown: {{minimum: 0ms, maximum: 40ms}}
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
- name: Child
  task_retry_limit: 1000
  min_backoff_seconds: 10ms
  max_backoff_seconds: 50ms
  states:
  - name: only
    initial: true
    final: true
    action: Chore
"
    )
}

fn registry(page: u64, fail_rate: f64, slow_rate: f64, seed: u64) -> Registry {
    let mut r = common::paging::registry(page);
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
    r.register(
        "Work",
        Work {
            rng: Arc::clone(&rng),
            fail_rate,
            slow_rate,
            spawns: true,
        },
    );
    r.register(
        "Chore",
        Work {
            rng,
            fail_rate,
            slow_rate,
            spawns: false,
        },
    );
    r
}

/// Fails now and then, now and then runs longer than a lease, and for every seventh item
/// starts a child instance (after a random countdown).
/// (As `Chore`, a child's only action, it spawns nothing and ends its instance.)
struct Work {
    rng: Arc<Mutex<fastrand::Rng>>,
    fail_rate: f64,
    slow_rate: f64,
    spawns: bool,
}

#[async_trait]
impl Action for Work {
    async fn run(&self, cx: &mut ActionContext) -> ActionResult {
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
        if !self.spawns {
            return Ok(None);
        }
        let ids: Vec<u64> = cx.get("ids")?.unwrap_or_default();
        if ids.first().is_some_and(|id| id % 7 == 0) {
            let delay = Duration::from_millis(self.rng.lock().unwrap().u64(0..=30));
            let mut child = Context::new();
            child.insert("ids".into(), json!(ids));
            cx.spawn_after("Child", vec![child], delay);
        }
        Ok(Some("join".into()))
    }
}

/// What a run did, to compare two runs of a seed: every transition (with its times) of the
/// instance and its children, and the faults injected.
#[derive(Debug, PartialEq)]
struct Trace {
    history: Vec<HistoryEntry>,
    children: Vec<(String, Vec<HistoryEntry>)>,
    faults: FaultCounts,
}

async fn simulate(seed: u64, inner: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Trace {
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
    let mut context = Context::new();
    context.insert("n".into(), json!(n));
    let name = format!("sim-{seed}");
    start_instance(
        &*inner,
        &config,
        &*clock,
        "Sim",
        context,
        Some(&name),
        &Limits::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{about}: {e}"));
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
        if let Ok(done) = tokio::time::timeout(Duration::from_secs(60), worker).await {
            done.unwrap().unwrap_or_else(|e| panic!("{about}: {e}"));
        } else {
            let view = inner.instance(&name).await.unwrap();
            panic!("{about}: did not finish: {view:#?}");
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
    let history = all_transitions(&*inner, &name).await;
    let pages = history.iter().filter(|h| h.to == "read").count() as u64;
    assert_eq!(
        pages,
        n.div_ceil(page),
        "{about}: every page committed once"
    );
    // A step records the transition into its state and, when it ends at a fan-in, the one
    // into that; a fork, those of each branch.
    let key = |h: &HistoryEntry| {
        (
            h.task.clone(),
            h.branch.clone(),
            h.from.clone(),
            h.to.clone(),
        )
    };
    let mut steps: Vec<_> = history.iter().map(key).collect();
    steps.sort_unstable();
    if std::env::var_os("PHASM_SIM_DEBUG").is_some() {
        for w in steps.windows(2).filter(|w| w[0] == w[1]) {
            for h in history.iter().filter(|h| key(h) == w[0]) {
                eprintln!("{h:?}");
            }
        }
    }
    let before = steps.len();
    steps.dedup();
    assert_eq!(
        before,
        steps.len(),
        "{about}: a step's transition committed twice"
    );
    assert_eq!(view.branches.parked, 0, "{about}");
    assert_eq!(view.tasks_total, 0, "{about}");
    // A child per seventh item, each started once and completed.
    let mut children = Vec::new();
    for child in &view.children {
        let v = inner.instance(child).await.unwrap().unwrap();
        assert_eq!(
            v.status,
            InstanceStatus::Completed,
            "{about}: child {child}"
        );
        children.push((child.clone(), all_transitions(&*inner, child).await));
    }
    assert_eq!(
        children.len() as u64,
        n.div_ceil(7),
        "{about}: one child per seventh item: {:?}",
        view.children
    );
    let faults = store.counts();
    if std::env::var_os("PHASM_SIM_QUIET").is_none() {
        eprintln!("{about}: ok, {faults:?}");
    }
    Trace {
        history,
        children,
        faults,
    }
}

async fn all_transitions(store: &dyn Store, name: &str) -> Vec<HistoryEntry> {
    let mut all = Vec::new();
    phasm::store::for_each_transition(store, name, |h| all.push(h.entry.clone()))
        .await
        .unwrap();
    all
}

/// The seeds to run: `PHASM_SIM_SEED=K` replays one, `PHASM_SIM_SEEDS=N` runs N from
/// `PHASM_SIM_FIRST` (0 unless set).
fn seeds(default: u64) -> std::ops::Range<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    match var("PHASM_SIM_SEED") {
        Some(k) => k..k + 1,
        None => {
            let first = var("PHASM_SIM_FIRST").unwrap_or(0);
            first..first + var("PHASM_SIM_SEEDS").unwrap_or(default)
        }
    }
}

/// Run seed `seed` on SQLite on one thread on tokio's paused clock: everything it does is
/// decided by the seed.
fn simulate_on_sqlite(seed: u64) -> Trace {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let options = SqliteOptions {
            threads: Threads::Caller,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(":memory:", &options).unwrap();
        let clock = Arc::new(TokioClock::new(phasm::testing::START_TIME));
        simulate(seed, Arc::new(store), clock).await
    })
}

#[test]
fn workers_over_a_failing_sqlite_store_lose_nothing_and_join_each_item_once() {
    for seed in seeds(200) {
        simulate_on_sqlite(seed);
    }
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [1, 2, 3] {
        let first = simulate_on_sqlite(seed);
        let again = simulate_on_sqlite(seed);
        assert!(
            first.faults != FaultCounts::default(),
            "seed {seed} injected faults"
        );
        assert_eq!(first, again, "seed {seed} ran differently the second time");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_over_a_failing_postgres_store_lose_nothing_and_join_each_item_once() {
    for seed in seeds(4) {
        let Some(schema) = common::postgres::Schema::fresh("simulation").await else {
            return;
        };
        simulate(seed, Arc::new(schema.store().await), Arc::new(SystemClock)).await;
        schema.drop_schema().await;
    }
}

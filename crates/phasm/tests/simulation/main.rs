//! The simulation: several real workers — claiming, leasing, renewing and committing
//! concurrently, killed mid-step and started again, each on a clock of its own that runs a
//! little ahead or behind — run random machines over one store that fails on purpose (calls
//! refused and delayed, claims and commits applied but their answers lost, steps running
//! past their lease), while people poke waiting instances (racing their timeouts), cancel
//! them, and run them again from their first step, and a schedule starts more.
//!
//! The machines ([`shapes`]): a continuation paging through a list, a fork per item,
//! retried failures, countdowns, spawned child instances, window and barrier fan-ins; a chain
//! with a wait whose event races its timeout; a schedule.
//!
//! Every committed transition of every instance is checked against the reference model
//! ([`model`]), and what the seed's plan implies against what happened: every instance ends
//! as it must, every page is committed once, every child starts once, every item is joined
//! exactly once, a poke taken is never followed by a timeout, a canceled instance commits
//! nothing more, and one run again starts from its beginning.
//!
//! On SQLite the simulation is deterministic: the workers run on one thread on tokio's
//! paused clock (sleeps, timeouts and leases take no real time) over a store that runs each
//! call on the calling thread ([`Threads::Caller`]), so a seed fixes everything and replays
//! exactly (a test checks that). The group-commit path (SQLite's writer thread) and
//! PostgreSQL run in real time on two threads, so a seed replays its plan, not its timing.
//!
//! `PHASM_SIM_SEEDS=N` runs N seeds on each store, `PHASM_SIM_FIRST=F` starts at seed F,
//! `PHASM_SIM_SEED=K` replays seed K alone; a failure names its seed and its plan.

// Tests panic on purpose when what they check does not hold: unwrap and expect are the
// assertions of setup steps here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../it/common/mod.rs"]
mod common;
mod model;
mod shapes;
mod world;

use std::collections::BTreeSet;
use std::sync::Arc;

use phasm::clock::{micros, SystemClock, TokioClock};
use phasm::config::{load_str, LoadOptions};
use phasm::store::{HistoryRow, InstanceStatus, SqliteOptions, SqliteStore, Threads};
use shapes::Shape;
use world::{line, pager, Plan, Run};

/// Check a run against the reference model and its plan.
fn check(plan: &Plan, run: &Run) {
    let about = &run.plan_about;
    if std::env::var_os("PHASM_SIM_DEBUG").is_some() {
        for (name, rows) in &run.histories {
            eprintln!("{name} {:?}", run.ends[name]);
            for r in rows {
                eprintln!("  {} {:?} -{}-> {} task={} branch={} ends={} attempt={} started={} finished={}", r.id, r.from, r.event, r.to, r.task, r.branch, r.ends_branch, r.attempt, (r.started_at - phasm::testing::START_TIME) / 1000, (r.finished_at - phasm::testing::START_TIME) / 1000);
            }
        }
    }
    let config = load_str(&plan.shape.yaml(), "sim.yaml", &LoadOptions::default())
        .unwrap()
        .config;
    for (name, rows) in &run.histories {
        let (machine, status) = &run.ends[name];
        let m = config.machine(machine).unwrap();
        model::check(m, *status, rows).unwrap_or_else(|e| panic!("{about}: {name}: {e}"));
        assert!(status.is_end(), "{about}: {name} is {status}");
    }
    let mut left: BTreeSet<&String> = run.histories.keys().collect();
    check_pager(plan, run, &mut left);
    for i in 0..plan.lines.len() {
        let name = line(plan.seed, i);
        left.remove(&name);
        check_line(plan, run, &name);
    }
    // What is left was started by the schedule: lines nobody touched.
    for name in left {
        assert!(
            plan.shape.schedule && name.starts_with("tick-"),
            "{about}: who started {name}?"
        );
        check_line(plan, run, name);
    }
    if std::env::var_os("PHASM_SIM_QUIET").is_none() {
        eprintln!(
            "{about}: ok, {} instances, {} transitions, {} kills, {:?}",
            run.histories.len(),
            run.histories.values().map(Vec::len).sum::<usize>(),
            run.kills,
            run.faults
        );
    }
}

/// The pager: every page committed once, every item joined exactly once, a child started
/// once for every seventh item, and every one completed.
fn check_pager<'a>(plan: &Plan, run: &'a Run, left: &mut BTreeSet<&'a String>) {
    let about = &run.plan_about;
    let (n, page) = (plan.shape.n, plan.shape.page);
    let name = pager(plan.seed);
    left.remove(&name);
    let rows = &run.histories[&name];
    assert_eq!(run.ends[&name].1, InstanceStatus::Completed, "{about}");
    let count = |f: &dyn Fn(&HistoryRow) -> bool| rows.iter().filter(|r| f(r)).count() as u64;
    assert_eq!(
        count(&|r| r.to == "read"),
        n.div_ceil(page),
        "{about}: every page once"
    );
    assert_eq!(
        count(&|r| r.to == "work"),
        n,
        "{about}: every item worked once"
    );
    assert_eq!(
        count(&|r| r.from.as_deref() == Some("work")),
        n,
        "{about}: every item joined once"
    );
    assert_eq!(
        count(&|r| r.to == "total" && r.event == "fan-in"),
        1,
        "{about}: one total"
    );
    let result = run.pager_result.clone().unwrap_or_default();
    let ids = common::paging::joined_ids(&result).unwrap_or_else(|| panic!("{about}: {result:?}"));
    assert_eq!(
        ids,
        (0..n).collect::<Vec<_>>(),
        "{about}: every item joined exactly once"
    );
    let children: Vec<&String> = run
        .histories
        .keys()
        .filter(|c| c.starts_with(&format!("{name}.")))
        .collect();
    assert_eq!(
        children.len() as u64,
        n.div_ceil(7),
        "{about}: one child per seventh item: {children:?}"
    );
    for child in children {
        left.remove(child);
        assert_eq!(
            run.ends[child].1,
            InstanceStatus::Completed,
            "{about}: {child}"
        );
        assert_eq!(run.histories[child].len(), 1, "{about}: {child}");
    }
}

/// A line: its transitions are the line's, in order — the wait's by `poke` if and only if a
/// poke was accepted, and never both — once, or twice if it ran again; a canceled line
/// committed nothing after its cancel.
fn check_line(plan: &Plan, run: &Run, name: &str) {
    let about = format!("{}: {name}", run.plan_about);
    let rows = &run.histories[name];
    let status = run.ends[name].1;
    let shape = &plan.shape;
    let runs = if run.seen.reset.iter().any(|r| r == name) {
        2
    } else {
        1
    };
    let expected = |i: usize| -> (Option<String>, Vec<&'static str>, String) {
        let i = i % shape.line;
        if i == 0 {
            return (None, vec!["pseudo-init"], Shape::line_state(0));
        }
        let events = if shape.wait.is_some_and(|w| w.at == i - 1) {
            vec!["poke", "late"]
        } else {
            vec!["next"]
        };
        (Some(Shape::line_state(i - 1)), events, Shape::line_state(i))
    };
    for (i, r) in rows.iter().enumerate() {
        let (from, events, to) = expected(i);
        assert!(
            r.from == from && events.contains(&r.event.as_str()) && r.to == to,
            "{about}: transition {i} is {:?} -{}-> {}, the model expects {from:?} -{events:?}-> {to}",
            r.from,
            r.event,
            r.to
        );
    }
    let answers = run.seen.pokes.get(name).cloned().unwrap_or_default();
    let said = |what: &str| answers.iter().filter(|(a, _)| a == what).count();
    let (delivered, buffered) = (said("delivered 1"), said("buffered"));
    assert!(
        delivered + buffered <= 1,
        "{about}: one poke id accepted twice: {answers:?}"
    );
    // Once accepted, the same id again changes nothing. (Refused first — the line had
    // ended, say, and was then run again — it may be accepted the second time.)
    let accepted = |a: &str| a == "delivered 1" || a == "buffered";
    if answers.len() == 2 && accepted(&answers[0].0) {
        assert!(
            matches!(answers[1].0.as_str(), "duplicate" | "not running"),
            "{about}: the same poke again: {answers:?}"
        );
    }
    let taken = rows.iter().filter(|r| r.event == "poke").count();
    if let Some(&at_cancel) = run.seen.canceled.get(name) {
        assert_eq!(status, InstanceStatus::Cancelled, "{about}");
        assert_eq!(
            rows.len(),
            at_cancel,
            "{about}: transitions after the cancel"
        );
        assert!(
            taken <= delivered + buffered,
            "{about}: {taken} pokes taken, {answers:?}"
        );
        return;
    }
    assert_eq!(status, InstanceStatus::Completed, "{about}");
    assert_eq!(
        rows.len(),
        runs * shape.line,
        "{about}: the line's transitions, {runs} times"
    );
    // A poke delivered to a wait is taken. One kept for later is taken by the next wait
    // that begins, unless it came when every wait's timeout was due (then the timeout may
    // have begun, and wins).
    assert!(
        taken <= delivered + buffered,
        "{about}: {taken} pokes taken, {answers:?}"
    );
    if delivered == 1 {
        assert_eq!(
            taken, 1,
            "{about}: a delivered poke was not taken: {answers:?}"
        );
    }
    if let (Some((_, at)), Some(wait)) = (answers.iter().find(|(a, _)| a == "buffered"), shape.wait)
    {
        let waiting = Shape::line_state(wait.at);
        let timeouts_due = rows
            .iter()
            .filter(|r| r.to == waiting)
            .all(|r| r.finished_at + micros(wait.timeout) <= at + micros(plan.skew));
        assert!(
            taken == 1 || timeouts_due,
            "{about}: a kept poke was never taken: {answers:?}"
        );
    }
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
fn simulate_on_sqlite(seed: u64) -> Run {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let plan = Plan::draw(seed);
    let run = runtime.block_on(async {
        let options = SqliteOptions {
            threads: Threads::Caller,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(":memory:", &options).unwrap();
        let clock = Arc::new(TokioClock::new(phasm::testing::START_TIME));
        world::run(&plan, Arc::new(store), clock).await
    });
    check(&plan, &run);
    run
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
            first.faults != phasm::testing::FaultCounts::default(),
            "seed {seed} injected faults"
        );
        assert_eq!(first, again, "seed {seed} ran differently the second time");
    }
}

/// Run `one` for every seed, `at_once` seeds at a time (real-time runs mostly wait).
async fn in_real_time<F, Fut>(seeds: std::ops::Range<u64>, at_once: usize, one: F)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    for seed in seeds {
        if running.len() >= at_once {
            if let Some(Err(e)) = running.join_next().await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        running.spawn(one(seed));
    }
    while let Some(done) = running.join_next().await {
        if let Err(e) = done {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// SQLite's group commit (its writer thread batching every caller's commits) in real time:
/// a seed replays its plan, not its timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_over_a_failing_sqlite_store_with_group_commits_lose_nothing() {
    in_real_time(seeds(20), 4, |seed| async move {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            dir.path().join("sim.db").to_str().unwrap(),
            &SqliteOptions::default(),
        )
        .unwrap();
        let plan = Plan::draw(seed);
        let run = world::run(&plan, Arc::new(store), Arc::new(SystemClock)).await;
        check(&plan, &run);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_over_a_failing_postgres_store_lose_nothing_and_join_each_item_once() {
    in_real_time(seeds(50), 5, |seed| async move {
        let Some(schema) = common::postgres::Schema::fresh(&format!("sim_{seed}")).await else {
            return;
        };
        let plan = Plan::draw(seed);
        let run = world::run(&plan, Arc::new(schema.store().await), Arc::new(SystemClock)).await;
        check(&plan, &run);
        schema.drop_schema().await;
    })
    .await;
}

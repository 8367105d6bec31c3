//! A deterministic mix of commit shapes, run through the whole store API on a fixed clock:
//! the same seed makes the same calls with the same times, so two stores — or one backend
//! with two ways of writing, such as PostgreSQL's single-statement commits and its general
//! transaction — can be compared row for row afterwards.

use std::time::Duration;

use crate::engine::{
    Commit, Disposition, HistoryEntry, InstanceChange, LogLine, NewTask, Spawned, Task, TaskKind,
};
use crate::store::{Applied, InstanceStatus, Store, SuccessorClaim, Targets};

use super::{ctx, new_task, parked, request, start, SEC, T0};

/// How many instances the workload starts.
pub const WORKLOAD_INSTANCES: usize = 8;

/// Run the workload of `seed` on `store` (fresh and empty): instances whose branches take
/// chain steps (their successors leased back to the committing worker or not), fork,
/// retry, log, spawn children, park at window and barrier fan-ins and are joined, until every
/// branch has ended. Panics if a commit is refused or an instance does not complete.
pub async fn mixed_workload(store: &dyn Store, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let offer = SuccessorClaim {
        owner: "w1".into(),
        lease: Duration::from_secs(10),
        queues: None,
        exclude: Vec::new(),
        machines: vec!["M".into()],
        targets: Targets::Any,
        max: 2,
    };
    for i in 0..WORKLOAD_INSTANCES {
        start(store, &format!("w{i}"), T0).await;
    }
    let mut names = 0_u64;
    let mut held: Vec<Task> = Vec::new();
    let mut idle = 0;
    for round in 0..400 {
        let now = T0 + round * SEC;
        let mut tasks = std::mem::take(&mut held);
        tasks.extend(
            store
                .claim(now, &request(1 + rng.usize(..4)))
                .await
                .unwrap(),
        );
        if tasks.is_empty() {
            // Window joins fall due a few seconds after their first arrival.
            idle += 1;
            if idle > 12 {
                break;
            }
            continue;
        }
        idle = 0;
        for task in tasks {
            let commit = shaped(&mut rng, &task, now, &mut names);
            let applied = store
                .apply(now, commit.into(), rng.bool().then_some(&offer))
                .await
                .unwrap();
            assert_eq!(applied.applied, Applied::Yes, "{} at {round}", task.name);
            held.extend(applied.claimed);
        }
    }
    for i in 0..WORKLOAD_INSTANCES {
        let view = store.instance(&format!("w{i}")).await.unwrap().unwrap();
        assert_eq!(
            view.status,
            InstanceStatus::Completed,
            "w{i} of seed {seed}: {:?}",
            view.tasks
        );
    }
}

/// The commit for `task` at `now`: a shape drawn from `rng`, the branch ended at step 5.
fn shaped(rng: &mut fastrand::Rng, task: &Task, now: i64, names: &mut u64) -> Commit {
    let mut next = |step: u64, due_at: i64, branch: &str| {
        *names += 1;
        NewTask {
            step,
            branch: branch.into(),
            ..new_task(&format!("t{names}"), Some("a"), due_at)
        }
    };
    let entry = |ends_branch: bool| HistoryEntry {
        from: task.from_state.clone(),
        event: task.event.clone(),
        to: "a".into(),
        attempt: task.attempt,
        started_at: now,
        finished_at: now,
        task: task.name.clone(),
        branch: task.branch.clone(),
        ends_branch,
    };
    let mut c = Commit::finishing(task);
    if task.kind == TaskKind::Join {
        c.history.push(entry(false));
        c.new_tasks.push(next(task.step + 1, now, &task.branch));
        return c;
    }
    if task.step >= 5 {
        c.history.push(entry(true));
        c.instance_change = InstanceChange::BranchEnded(ctx(i64::from(rng.u8(..))));
        return c;
    }
    let step = task.step + 1;
    match rng.u8(..10) {
        // A chain step, its successor due now (maybe leased back) or a little later.
        0..=3 => {
            c.history.push(entry(false));
            let due = if rng.bool() { now } else { now + 2 * SEC };
            c.new_tasks.push(next(step, due, &task.branch));
        }
        // A fork of three branches (while the instance is young).
        4 if task.step < 2 => {
            c.history.push(entry(false));
            for b in 0..3 {
                let branch = format!("{}{b}", task.branch);
                c.new_tasks.push(next(step, now, &branch));
            }
        }
        // Arriving at a window fan-in or at a barrier.
        5 | 6 => {
            c.history.push(entry(false));
            let window = (rng.u8(..2) == 0).then_some(3 * SEC);
            let state = if window.is_some() { "join-w" } else { "join-b" };
            let mut p = parked(state, "", i64::from(rng.u8(..)), window);
            p.branch = task.branch.clone();
            p.step = step;
            c.parked.push(p);
        }
        // A failed attempt, tried again a second later.
        7 if task.attempt < 2 => {
            c.disposition = Disposition::Retry {
                due_at: now + SEC,
                error: "flaky".into(),
            };
        }
        // A step that logs and spawns a short-lived child.
        8 => {
            c.history.push(entry(false));
            c.new_tasks.push(next(step, now, &task.branch));
            c.logs.push(LogLine {
                at: now,
                level: "info".into(),
                message: format!("step {step}"),
                task: task.name.clone(),
            });
            *names += 1;
            c.spawns.push(Spawned {
                name: format!("{}-child{names}", task.instance),
                machine: "M".into(),
                context: ctx(1),
                start: NewTask {
                    step: 5,
                    ..new_task("child--start", None, now)
                },
            });
        }
        _ => {
            c.history.push(entry(false));
            c.new_tasks.push(next(step, now, &task.branch));
        }
    }
    c
}

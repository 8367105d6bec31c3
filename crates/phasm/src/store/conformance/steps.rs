//! Checks of what history keeps of each step (its input, its step number), reading one step
//! in full, the step times of a machine, and running an instance again from a step.

use super::{apply_one, commit, ctx, new_task, request, start, SEC, T0};
use crate::engine::LogLine;
use crate::store::{Applied, Control, InstanceStatus, PageRequest, PassedOn, Store};

/// A millisecond, in microseconds.
const MS: i64 = 1000;

/// Check that each step keeps the context it was given and its step number; that a step
/// read in full says what it passed on (the next step, or the pending one) and its task's
/// log; that history pages filter by branch; and that a machine's step times are measured.
pub async fn each_step_keeps_its_input_and_says_what_it_passed_on(store: &dyn Store) {
    start(store, "s", T0).await;
    let first = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&first);
    c.history[0].started_at = T0;
    c.history[0].finished_at = T0 + 2 * MS;
    let mut next = new_task("s--next", Some("a"), T0);
    next.context = ctx(5);
    next.step = 1;
    c.new_tasks.push(next);
    c.logs.push(LogLine {
        at: T0,
        level: "warning".into(),
        message: "slow card service".into(),
        task: first.name.clone(),
    });
    assert_eq!(apply_one(store, T0 + SEC, c).await, Applied::Yes);

    let page = store
        .history_page(
            "s",
            PageRequest {
                after: 0,
                limit: 10,
            },
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(page.items.len(), 1);
    let one = page.items[0].id;
    assert_eq!(page.items[0].step, Some(0));
    let detail = store.step("s", one).await.unwrap().expect("the step");
    assert_eq!(detail.given, Some(ctx(1)), "the context of the start task");
    assert_eq!(detail.passed_on, PassedOn::Pending(ctx(5)));
    assert_eq!(detail.logs.len(), 1);
    assert_eq!(detail.logs[0].message, "slow card service");

    // The next step commits on its second attempt, and forks a branch.
    let second = store.claim(T0 + SEC, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&second);
    c.history[0].attempt = 1;
    c.history[0].started_at = T0 + SEC;
    c.history[0].finished_at = T0 + SEC + 5 * MS;
    let mut fork = new_task("s--fork", Some("a"), T0 + 100 * SEC);
    fork.branch = "f1-1".into();
    fork.context = ctx(9);
    c.new_tasks.push(fork);
    assert_eq!(apply_one(store, T0 + 2 * SEC, c).await, Applied::Yes);
    let detail = store.step("s", one).await.unwrap().unwrap();
    let two = match detail.passed_on {
        PassedOn::Step(id, context) => {
            assert_eq!(context, Some(ctx(5)), "what the next step was given");
            id
        }
        other => panic!("the first step passed on to the second: {other:?}"),
    };
    let second = store.step("s", two).await.unwrap().unwrap();
    assert_eq!(second.row.step, Some(1));
    assert_eq!(
        second.passed_on,
        PassedOn::Nothing,
        "nothing follows on the main line"
    );
    for (branch, steps) in [(Some(""), 2), (Some("f1-1"), 0), (None, 2)] {
        let page = store
            .history_page(
                "s",
                PageRequest {
                    after: 0,
                    limit: 10,
                },
                branch,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(page.items.len(), steps, "steps of branch {branch:?}");
    }
    assert!(store.step("s", two + 1000).await.unwrap().is_none());
    assert!(store.step("nobody", one).await.unwrap().is_none());

    let o = store
        .machine_overview("M", T0 - 3600 * SEC, T0 - 86_400 * SEC)
        .await
        .unwrap();
    let t = &o.steps_last_hour;
    assert_eq!((t.steps, t.retried, t.sampled), (2, 1, false), "{t:?}");
    assert_eq!((t.p50, t.p99), (2 * MS, 5 * MS), "{t:?}");
    assert_eq!(o.steps_last_day, o.steps_last_hour);
    let later = store
        .machine_overview("M", T0 + 10 * SEC, T0 + 10 * SEC)
        .await
        .unwrap();
    assert_eq!(later.steps_last_hour.steps, 0);
}

/// Check that a reset drops every pending task of the instance (a worker holding one can no
/// longer commit it), makes it running, queues the given task and logs why.
pub async fn a_reset_drops_pending_work_and_queues_the_step_again(store: &dyn Store) {
    start(store, "r", T0).await;
    let first = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&first);
    // (As if the step had also ended a branch: the run's branch counts say so until a reset.)
    c.history[0].ends_branch = true;
    c.new_tasks.push(new_task("r--a", Some("a"), T0));
    let mut other = new_task("r--b", Some("a"), T0);
    other.branch = "f1-1".into();
    c.new_tasks.push(other);
    assert_eq!(apply_one(store, T0 + SEC, c).await, Applied::Yes);
    let held = store.claim(T0 + SEC, &request(1)).await.unwrap().remove(0);
    let before = store.instance("r").await.unwrap().unwrap();
    assert_eq!(before.branches.ended, 1);

    let mut again = new_task("r--again", Some("a"), T0 + 2 * SEC);
    again.context = ctx(7);
    let done = store
        .reset(T0 + 2 * SEC, "r", &again, "reset by a test")
        .await
        .unwrap();
    assert_eq!(done, Control::Done);
    let view = store.instance("r").await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Running);
    let names: Vec<&str> = view.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["r--again"], "only the step run again is pending");
    assert_eq!(view.history_total, 1, "history keeps the earlier run");
    assert_eq!(
        view.branches.ended, 0,
        "branch counts are of the run since the reset"
    );
    assert!(view.end_states.is_empty(), "{:?}", view.end_states);
    assert_eq!(
        apply_one(store, T0 + 3 * SEC, commit(&held)).await,
        Applied::Fenced,
        "a dropped task cannot commit"
    );
    let logs = store.logs("r").await.unwrap();
    assert!(
        logs.iter().any(|l| l.message == "reset by a test"),
        "{logs:?}"
    );
    let taken = store.claim(T0 + 3 * SEC, &request(5)).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].context, ctx(7));

    // A failed instance runs again too; an unknown one is refused.
    let mut failed = commit(&taken[0]);
    failed.history.clear();
    failed.disposition = crate::engine::Disposition::Failed {
        error: "boom".into(),
    };
    failed.instance_change = crate::engine::InstanceChange::Fail("boom".into());
    apply_one(store, T0 + 4 * SEC, failed).await;
    assert_eq!(
        store.instance("r").await.unwrap().unwrap().status,
        InstanceStatus::Failed
    );
    let done = store
        .reset(T0 + 5 * SEC, "r", &again, "again")
        .await
        .unwrap();
    assert_eq!(done, Control::Done);
    let view = store.instance("r").await.unwrap().unwrap();
    assert_eq!((view.status, view.error), (InstanceStatus::Running, None));
    assert_eq!(
        store.reset(T0, "nobody", &again, "x").await.unwrap(),
        Control::NotFound
    );
}

/// Check that the steps committed lately are counted by machine and transition, since the
/// time asked.
pub async fn recent_steps_are_counted_by_transition_since_a_time(store: &dyn Store) {
    for name in ["q1", "q2"] {
        start(store, name, T0).await;
    }
    for t in store.claim(T0, &request(2)).await.unwrap() {
        assert_eq!(apply_one(store, T0 + SEC, commit(&t)).await, Applied::Yes);
    }
    // `commit` records each step as finished at T0.
    let recent = store.recent_steps(T0 - SEC).await.unwrap();
    assert_eq!(recent.window_start, T0 - SEC);
    assert_eq!(recent.groups.len(), 1, "{recent:?}");
    let g = &recent.groups[0];
    assert_eq!(
        (
            g.machine.as_str(),
            g.from.as_deref(),
            g.event.as_str(),
            g.to.as_str(),
            g.steps
        ),
        ("M", None, "go", "a", 2)
    );
    assert!(store
        .recent_steps(T0 + SEC)
        .await
        .unwrap()
        .groups
        .is_empty());
}

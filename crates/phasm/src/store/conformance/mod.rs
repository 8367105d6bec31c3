//! The conformance suite every [`Store`] implementation must pass, shipped with the library
//! (behind the `conformance` feature) so that a backend written outside phasm is held to the
//! same contract. Each check takes a fresh, empty store and panics, naming what broke, when
//! the store does not behave. [`for_each_conformance_check!`](crate::for_each_conformance_check)
//! makes one test per check (a failure names its check, and the others still run; phasm's own
//! backends are tested so); [`run_all`] runs every check in one go, each on a store of its own.
//!
//! ```ignore
//! phasm::store::conformance::run_all(|_check| async { MyStore::fresh().await }).await;
//! ```

// Checks panic to report what a store got wrong: unwrap and expect are their assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::future::Future;
use std::time::Duration;

use futures_util::future::LocalBoxFuture;

mod listing;
mod overview;
mod schedules;
mod steps;
mod versions;
mod waits;
mod workload;
pub use listing::*;
pub use overview::*;
pub use schedules::*;
pub use steps::*;
pub use versions::*;
pub use waits::*;
pub use workload::*;

use crate::engine::{
    Commit, Context, Disposition, HistoryEntry, InstanceChange, LogLine, NewTask, Task, TaskKind,
};
use crate::store::{
    Applied, ClaimRequest, Control, InstanceStatus, ListFilter, NewInstance, Started, Store,
    SuccessorClaim, Targets,
};

/// One check: run it on a fresh, empty store.
pub type Check = for<'a> fn(&'a dyn Store) -> LocalBoxFuture<'a, ()>;

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        checks!(@with ($) $($name),*);
    };
    (@with ($d:tt) $($name:ident),*) => {
        /// Every check, by name, in the order [`run_all`] runs them.
        pub const CHECKS: &[(&str, Check)] = &[$((stringify!($name), boxed::$name as Check)),*];

        /// Call macro `m` with the name of every conformance check, so that a backend's test
        /// suite makes one test per check (a failure names its check, and the others still
        /// run):
        ///
        /// ```ignore
        /// macro_rules! on_my_store {
        ///     ($($check:ident),*) => {$(
        ///         #[tokio::test]
        ///         async fn $check() {
        ///             phasm::store::conformance::$check(&my_fresh_store().await).await;
        ///         }
        ///     )*};
        /// }
        /// phasm::for_each_conformance_check!(on_my_store);
        /// ```
        #[macro_export]
        macro_rules! for_each_conformance_check {
            ($d m:ident) => {
                $d m!($($name),*);
            };
        }

        mod boxed {
            use futures_util::future::LocalBoxFuture;
            $(
                pub(super) fn $name(store: &dyn crate::store::Store) -> LocalBoxFuture<'_, ()> {
                    Box::pin(super::$name(store))
                }
            )*
        }
    };
}

checks!(
    starting_is_idempotent,
    claims_only_due_tasks_once_until_the_lease_expires,
    claim_respects_limits_and_queues,
    a_backlog_a_worker_may_not_take_hides_nothing,
    text_with_nul_or_megabytes_is_stored_escaped_and_cut,
    a_superseded_claim_cannot_commit,
    an_expired_lease_cannot_commit,
    renewing_extends_a_held_lease,
    a_commit_applies_everything_together,
    a_branch_ending_while_others_are_pending_does_not_complete,
    a_retry_reschedules_the_task,
    a_postponed_step_does_not_count_an_attempt,
    a_failure_holds_the_instance_until_retried,
    cancel_and_halt_drop_pending_work,
    a_cancelled_instances_running_step_cannot_commit,
    successors_due_now_come_back_leased,
    task_names_are_unique_per_instance,
    list_filters_newest_first,
    targets_route_tasks_to_their_pools,
    task_ids_are_never_reused,
    scrub_removes_only_old_ended_instances,
    commits_probe_reports_a_rate,
    history_and_logs_page_with_cursors,
    an_instance_view_is_bounded_however_long_the_instance_ran,
    workers_are_listed_until_they_stop_or_expire,
    a_barrier_is_released_when_the_last_live_task_finishes_without_successor,
    a_window_joins_what_parked_before_it_runs_and_later_arrivals_open_the_next,
    fan_in_groups_join_apart,
    a_spawned_instance_starts_once,
    a_continuation_page_queued_early_is_not_queued_again_by_a_retry,
    stats_count_due_scheduled_running_and_parked,
    two_claimers_never_take_the_same_task,
    queue_limits_hold_across_claimers,
    a_barrier_waits_for_branches_stopped_by_a_failure,
    an_instance_completes_when_its_last_task_finishes_without_successor,
    a_sweep_releases_nothing_early_and_changes_nothing_settled,
    starting_many_answers_each_and_skips_existing_names,
    a_delivered_event_replaces_the_wait_once,
    an_event_sent_before_the_wait_is_taken_in_order_when_it_begins,
    a_timeout_claimed_first_wins_and_an_event_delivered_first_stops_it,
    events_to_an_ended_or_unknown_instance_are_refused,
    a_wait_without_timeout_is_never_due_even_after_a_retry,
    a_token_addressed_delivery_reaches_only_its_wait,
    a_token_never_sends_its_waits_timeout_event,
    a_delivery_is_refused_whole_when_its_checks_fail,
    each_schedule_tick_starts_one_instance_and_never_goes_back,
    a_skipping_schedule_starts_nothing_while_its_last_instance_runs,
    a_machine_overview_counts_where_its_instances_are,
    the_instance_list_filters_orders_and_describes,
    the_instance_list_sorts_by_duration_and_by_age,
    each_step_keeps_its_input_and_says_what_it_passed_on,
    a_reset_drops_pending_work_and_queues_the_step_again,
    recent_steps_are_counted_by_transition_since_a_time,
    deploying_stores_each_changed_machine_as_its_next_version,
    instances_record_the_version_they_started_on,
    an_upgrade_moves_an_instance_only_when_its_places_exist,
    scrubbing_versions_keeps_the_latest_and_those_in_use,
);

/// Run every check in [`CHECKS`], each on a fresh store from `fresh` (given the check's name,
/// for backends that name a schema after it). Panics at the first check that fails, after
/// saying which one it is.
pub async fn run_all<S, F, Fut>(mut fresh: F)
where
    S: Store,
    F: FnMut(&'static str) -> Fut,
    Fut: Future<Output = S>,
{
    for (name, check) in CHECKS {
        let store = fresh(name).await;
        eprintln!("conformance check: {name}");
        check(&store).await;
    }
}

const SEC: i64 = 1_000_000;
const T0: i64 = 1_800_000_000 * SEC;

fn ctx(n: i64) -> Context {
    let mut c = Context::new();
    c.insert("n".into(), n.into());
    c
}

fn new_task(name: &str, from: Option<&str>, due_at: i64) -> NewTask {
    NewTask {
        name: name.into(),
        from_state: from.map(str::to_string),
        event: "go".into(),
        kind: TaskKind::Dispatch,
        context: ctx(1),
        step: 0,
        branch: String::new(),
        queue: "default".into(),
        target: None,
        due_at,
        token: None,
    }
}

async fn start(store: &dyn Store, name: &str, due_at: i64) {
    let started = store
        .start(
            T0,
            NewInstance {
                name: name.into(),
                machine: "M".into(),
                context: ctx(0),
                start: new_task(&format!("{name}--start"), None, due_at),
                version: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(started, Started::Created);
}

fn request(limit: usize) -> ClaimRequest {
    ClaimRequest {
        owner: "w1".into(),
        lease: Duration::from_secs(10),
        limit,
        queue_limits: Vec::new(),
        queues: None,
        targets: Targets::Any,
        shared_limits: Vec::new(),
    }
}

fn commit(task: &Task) -> Commit {
    Commit {
        history: vec![HistoryEntry {
            from: task.from_state.clone(),
            event: task.event.clone(),
            to: "a".into(),
            attempt: task.attempt,
            started_at: T0,
            finished_at: T0,
            task: task.name.clone(),
            branch: String::new(),
            ends_branch: false,
        }],
        ..Commit::finishing(task)
    }
}

async fn apply_one(store: &dyn Store, now: i64, c: Commit) -> Applied {
    store.apply(now, c.into(), None).await.unwrap().applied
}

/// Check that starting is idempotent.
pub async fn starting_is_idempotent(store: &dyn Store) {
    start(store, "i1", T0).await;
    let again = store
        .start(
            T0,
            NewInstance {
                name: "i1".into(),
                machine: "M".into(),
                context: ctx(5),
                start: new_task("other", None, T0),
                version: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        again,
        Started::Existing {
            machine: "M".into(),
            status: InstanceStatus::Running
        }
    );
    let view = store.instance("i1").await.unwrap().unwrap();
    assert_eq!(view.tasks.len(), 1, "the second start queued nothing");
    assert_eq!(view.context, ctx(0));
}

/// Check that claims only due tasks once until the lease expires.
pub async fn claims_only_due_tasks_once_until_the_lease_expires(store: &dyn Store) {
    start(store, "now", T0).await;
    start(store, "later", T0 + 60 * SEC).await;
    let claimed = store.claim(T0, &request(10)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let t = &claimed[0];
    assert_eq!(
        (t.instance.as_str(), t.machine.as_str(), t.attempt),
        ("now", "M", 0)
    );
    assert_eq!(t.context, ctx(1));
    assert!(
        store
            .claim(T0 + SEC, &request(10))
            .await
            .unwrap()
            .is_empty(),
        "leased"
    );
    // After the lease (10 s) the task may be claimed again, as a new attempt.
    let again = store.claim(T0 + 11 * SEC, &request(10)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, t.id);
    assert_eq!(again[0].attempt, 1);
    assert_ne!(again[0].claim, t.claim);
    assert_eq!(again[0].first_attempt_at, T0, "first attempt time is kept");
}

/// Check that claim respects limits and queues.
pub async fn claim_respects_limits_and_queues(store: &dyn Store) {
    for i in 0..5 {
        start(store, &format!("i{i}"), T0).await;
    }
    assert_eq!(store.claim(T0, &request(2)).await.unwrap().len(), 2);
    let mut other_queue = request(10);
    other_queue.queues = Some(vec!["elsewhere".into()]);
    assert!(store.claim(T0, &other_queue).await.unwrap().is_empty());
    let mut limited = request(10);
    limited.queue_limits = vec![("default".into(), 1)];
    assert_eq!(store.claim(T0, &limited).await.unwrap().len(), 1);
    assert_eq!(store.claim(T0, &request(10)).await.unwrap().len(), 2);
}

/// Check that due tasks a claimer may not take (another target's, another queue's, or a
/// queue with no room left), however many and however much older, never hide one it may.
pub async fn a_backlog_a_worker_may_not_take_hides_nothing(store: &dyn Store) {
    let backlog = |name: String, target: Option<&str>, queue: &str| {
        let mut task = new_task(&format!("{name}--start"), None, T0 - SEC);
        task.target = target.map(str::to_string);
        task.queue = queue.into();
        NewInstance {
            name,
            machine: "M".into(),
            context: ctx(0),
            start: task,
            version: None,
        }
    };
    let mut old = Vec::new();
    for i in 0..40 {
        old.push(backlog(format!("heavy{i}"), Some("heavy"), "default"));
        old.push(backlog(format!("slow{i}"), None, "slow"));
    }
    store.start_many(T0, old).await.unwrap();
    let mut fresh = Vec::new();
    fresh.push(backlog("plain".into(), None, "default"));
    fresh.push(backlog("fast".into(), None, "fast"));
    for n in &mut fresh {
        n.start.due_at = T0;
    }
    store.start_many(T0, fresh).await.unwrap();
    let names = |tasks: Vec<Task>| tasks.into_iter().map(|t| t.instance).collect::<Vec<_>>();

    let mut fast_only = request(1);
    fast_only.targets = Targets::Untargeted;
    fast_only.queues = Some(vec!["fast".into()]);
    assert_eq!(
        names(store.claim(T0, &fast_only).await.unwrap()),
        ["fast"],
        "a worker of queue `fast` claims its task behind 80 older tasks of other queues"
    );
    let mut untargeted = request(1);
    untargeted.targets = Targets::Untargeted;
    untargeted.queue_limits = vec![("slow".into(), 0)];
    assert_eq!(
        names(store.claim(T0, &untargeted).await.unwrap()),
        ["plain"],
        "an untargeted worker whose `slow` queue is full claims the untargeted task behind 40 \
         targeted ones and 40 of the full queue"
    );
}

/// Check that free text (log lines, errors, a cancel's reason, an event's id) with NUL bytes
/// or megabytes in it commits — NUL written `\\0`, the text cut to 8 KiB and marked — where
/// PostgreSQL's text columns would refuse a NUL and fail every commit of the step.
pub async fn text_with_nul_or_megabytes_is_stored_escaped_and_cut(store: &dyn Store) {
    use crate::engine::text::MAX_TEXT_BYTES;
    start(store, "i", T0).await;
    let task = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = Commit::finishing(&task);
    c.logs.push(crate::engine::LogLine {
        at: T0,
        level: "info".into(),
        message: "a\0b".into(),
        task: task.name.clone(),
    });
    c.disposition = crate::engine::Disposition::Retry {
        due_at: T0 + SEC,
        error: format!("bad\0{}", "x".repeat(3 * 1024 * 1024)),
    };
    assert_eq!(apply_one(store, T0, c).await, Applied::Yes);
    let logs = store.logs("i").await.unwrap();
    assert_eq!(logs[0].message, "a\\0b");
    let view = store.instance("i").await.unwrap().unwrap();
    let error = view.tasks[0].last_error.clone().unwrap();
    assert!(error.starts_with("bad\\0xxx"), "{}", &error[..20]);
    assert!(
        error.len() < MAX_TEXT_BYTES + 64,
        "{} bytes stored",
        error.len()
    );
    assert!(
        error.ends_with("more bytes]"),
        "{}",
        &error[error.len() - 40..]
    );
    let delivery = crate::store::Delivery {
        instance: "i".into(),
        event: "go".into(),
        data: Context::new(),
        id: Some("id\0".into()),
        wait: None,
        checks: Default::default(),
    };
    store.deliver(T0, &delivery).await.unwrap();
    assert_eq!(
        store.deliver(T0, &delivery).await.unwrap(),
        crate::store::Delivered::Duplicate
    );
    assert_eq!(
        store
            .cancel_because(T0, "i", Some("stop\0now"))
            .await
            .unwrap(),
        Control::Done
    );
    let view = store.instance("i").await.unwrap().unwrap();
    assert_eq!(view.error.as_deref(), Some("stop\\0now"));
}

/// Check that a superseded claim cannot commit.
pub async fn a_superseded_claim_cannot_commit(store: &dyn Store) {
    start(store, "i", T0).await;
    let first = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let second = store
        .claim(T0 + 11 * SEC, &request(1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        apply_one(store, T0 + 12 * SEC, commit(&first)).await,
        Applied::Fenced
    );
    let view = store.instance("i").await.unwrap().unwrap();
    assert!(view.history.is_empty(), "a fenced commit applies nothing");
    assert_eq!(
        apply_one(store, T0 + 12 * SEC, commit(&second)).await,
        Applied::Yes
    );
    assert_eq!(store.instance("i").await.unwrap().unwrap().history.len(), 1);
}

/// Check that an expired lease cannot commit.
pub async fn an_expired_lease_cannot_commit(store: &dyn Store) {
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    // A worker paused past its lease, nobody else claimed: still refused.
    assert_eq!(
        apply_one(store, T0 + 11 * SEC, commit(&t)).await,
        Applied::Fenced
    );
    assert_eq!(store.instance("i").await.unwrap().unwrap().tasks.len(), 1);
}

/// Check that renewing extends a held lease.
pub async fn renewing_extends_a_held_lease(store: &dyn Store) {
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let held = store
        .renew(T0 + 5 * SEC, &[(t.id, t.claim), (999, 1)], T0 + 30 * SEC)
        .await
        .unwrap();
    assert_eq!(held, vec![true, false]);
    assert!(store
        .claim(T0 + 20 * SEC, &request(1))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        apply_one(store, T0 + 25 * SEC, commit(&t)).await,
        Applied::Yes
    );
    // Once expired, a lease cannot be renewed.
    start(store, "j", T0).await;
    let u = store.claim(T0, &request(1)).await.unwrap().remove(0);
    assert_eq!(
        store
            .renew(T0 + 11 * SEC, &[(u.id, u.claim)], T0 + 40 * SEC)
            .await
            .unwrap(),
        vec![false]
    );
}

/// Check that a commit applies everything together.
pub async fn a_commit_applies_everything_together(store: &dyn Store) {
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.new_tasks
        .push(new_task("i--next", Some("a"), T0 + 5 * SEC));
    c.logs.push(LogLine {
        at: T0,
        level: "info".into(),
        message: "hello".into(),
        task: t.name.clone(),
    });
    assert_eq!(apply_one(store, T0 + SEC, c).await, Applied::Yes);
    let view = store.instance("i").await.unwrap().unwrap();
    assert_eq!(view.history.len(), 1);
    assert_eq!(view.tasks.len(), 1);
    assert_eq!(view.tasks[0].name, "i--next");
    assert_eq!(view.tasks[0].due_at, T0 + 5 * SEC);
    assert_eq!(store.logs("i").await.unwrap()[0].message, "hello");
    assert_eq!(store.next_due().await.unwrap(), Some(T0 + 5 * SEC));
    assert!(store
        .claim(T0 + 2 * SEC, &request(5))
        .await
        .unwrap()
        .is_empty());
    let next = store
        .claim(T0 + 5 * SEC, &request(5))
        .await
        .unwrap()
        .remove(0);
    let mut end = commit(&next);
    end.instance_change = InstanceChange::BranchEnded(ctx(42));
    assert_eq!(apply_one(store, T0 + 6 * SEC, end).await, Applied::Yes);
    let view = store.instance("i").await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Completed);
    assert_eq!(view.ended_at, Some(T0 + 6 * SEC));
    assert_eq!(view.current_context, Some(ctx(42)));
    assert_eq!(store.next_due().await.unwrap(), None);
}

/// Check that a branch ending while others are pending does not complete.
pub async fn a_branch_ending_while_others_are_pending_does_not_complete(store: &dyn Store) {
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.new_tasks.push(new_task("i--other-branch", Some("a"), T0));
    c.instance_change = InstanceChange::BranchEnded(ctx(1));
    apply_one(store, T0 + SEC, c).await;
    let view = store.instance("i").await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Running);
    assert_eq!(
        view.updated_at,
        T0 + SEC,
        "a branch's end changes the instance"
    );
    // A branch ending with no successor while another branch is pending (a one-statement
    // commit on some backends) records the change too.
    start(store, "j", T0).await;
    let of_j = |tasks: Vec<Task>| tasks.into_iter().find(|t| t.instance == "j").unwrap();
    let t = of_j(store.claim(T0, &request(10)).await.unwrap());
    let mut c = commit(&t);
    for (name, due) in [("j--b1", T0), ("j--b2", T0 + 60 * SEC)] {
        let mut branch = new_task(name, Some("a"), due);
        branch.branch = name.trim_start_matches("j--").into();
        c.new_tasks.push(branch);
    }
    assert_eq!(apply_one(store, T0, c).await, Applied::Yes);
    let b1 = of_j(store.claim(T0, &request(10)).await.unwrap());
    let mut c = commit(&b1);
    c.instance_change = InstanceChange::BranchEnded(ctx(2));
    assert_eq!(apply_one(store, T0 + 2 * SEC, c).await, Applied::Yes);
    let view = store.instance("j").await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Running);
    assert_eq!(
        view.updated_at,
        T0 + 2 * SEC,
        "a branch's end changes the instance"
    );
}

/// Check that a retry reschedules the task.
pub async fn a_retry_reschedules_the_task(store: &dyn Store) {
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.history.clear();
    c.disposition = Disposition::Retry {
        due_at: T0 + 3 * SEC,
        error: "boom".into(),
    };
    assert_eq!(apply_one(store, T0 + SEC, c).await, Applied::Yes);
    let view = store.instance("i").await.unwrap().unwrap();
    assert_eq!(view.tasks[0].last_error.as_deref(), Some("boom"));
    assert!(store
        .claim(T0 + 2 * SEC, &request(1))
        .await
        .unwrap()
        .is_empty());
    let again = store
        .claim(T0 + 3 * SEC, &request(1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(again.attempt, 1);
}

/// Check that a postponed step does not count an attempt.
pub async fn a_postponed_step_does_not_count_an_attempt(store: &dyn Store) {
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.history.clear();
    c.new_tasks.clear();
    c.disposition = Disposition::Postpone {
        due_at: T0 + 3 * SEC,
        reason: "out of file descriptors".into(),
    };
    assert_eq!(apply_one(store, T0 + SEC, c).await, Applied::Yes);
    let view = store.instance("i").await.unwrap().unwrap();
    assert_eq!(view.tasks[0].attempts, 0);
    assert_eq!(view.tasks[0].leased_by, None);
    assert_eq!(
        view.tasks[0].last_error.as_deref(),
        Some("out of file descriptors")
    );
    assert!(store
        .claim(T0 + 2 * SEC, &request(1))
        .await
        .unwrap()
        .is_empty());
    let again = store
        .claim(T0 + 3 * SEC, &request(1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(again.attempt, 0);
    // The attempt's clock starts again with the first attempt that runs.
    assert_eq!(again.first_attempt_at, T0 + 3 * SEC);
}

/// Check that a failure holds the instance until retried.
pub async fn a_failure_holds_the_instance_until_retried(store: &dyn Store) {
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.history.clear();
    c.new_tasks.clear();
    c.disposition = Disposition::Failed {
        error: "bad".into(),
    };
    c.instance_change = InstanceChange::Fail("bad".into());
    apply_one(store, T0, c).await;
    let view = store.instance("i").await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Failed);
    assert_eq!(view.error.as_deref(), Some("bad"));
    assert_eq!(view.tasks[0].status, crate::store::TaskStatus::Failed);
    assert!(store
        .claim(T0 + 100 * SEC, &request(1))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.cancel(T0, "nope").await.unwrap(), Control::NotFound);
    assert_eq!(
        store.retry(T0 + 100 * SEC, "i").await.unwrap(),
        Control::Done
    );
    let view = store.instance("i").await.unwrap().unwrap();
    assert_eq!(
        (view.status, view.error.clone()),
        (InstanceStatus::Running, None)
    );
    let again = store
        .claim(T0 + 100 * SEC, &request(1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        again.attempt, 0,
        "a retried instance starts its attempts over"
    );
    assert_eq!(
        store.retry(T0, "i").await.unwrap(),
        Control::NotAllowed(InstanceStatus::Running)
    );
}

/// Check that cancel and halt drop pending work.
pub async fn cancel_and_halt_drop_pending_work(store: &dyn Store) {
    start(store, "c", T0).await;
    assert_eq!(store.cancel(T0, "c").await.unwrap(), Control::Done);
    let view = store.instance("c").await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Cancelled);
    assert!(view.tasks.is_empty());
    assert_eq!(
        store.cancel(T0, "c").await.unwrap(),
        Control::NotAllowed(InstanceStatus::Cancelled)
    );
    // A reason is kept as the instance's error.
    start(store, "r", T0).await;
    assert_eq!(
        store
            .cancel_because(T0, "r", Some("duplicate order"))
            .await
            .unwrap(),
        Control::Done
    );
    let view = store.instance("r").await.unwrap().unwrap();
    assert_eq!(
        (view.status, view.error.as_deref()),
        (InstanceStatus::Cancelled, Some("duplicate order"))
    );

    start(store, "h", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.history.clear();
    c.new_tasks.push(new_task("h--x", Some("a"), T0));
    c.parked.push(crate::engine::Parked {
        state: "j".into(),
        group: String::new(),
        context: ctx(1),
        branch: "f1".into(),
        step: 1,
        window: Some(5 * SEC),
        queue: "default".into(),
        target: None,
    });
    c.instance_change = InstanceChange::Halt("enough".into());
    apply_one(store, T0, c).await;
    let view = store.instance("h").await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Halted);
    assert!(view.tasks.is_empty());
    assert_eq!(view.branches.parked, 0, "parked branches go with the halt");
}

/// Check that a cancelled instances running step cannot commit.
pub async fn a_cancelled_instances_running_step_cannot_commit(store: &dyn Store) {
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    store.cancel(T0, "i").await.unwrap();
    assert_eq!(
        apply_one(store, T0 + SEC, commit(&t)).await,
        Applied::Fenced
    );
    assert_eq!(
        store.instance("i").await.unwrap().unwrap().status,
        InstanceStatus::Cancelled
    );
}

/// Check that successors due now come back leased.
pub async fn successors_due_now_come_back_leased(store: &dyn Store) {
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.new_tasks.push(new_task("i--now", Some("a"), T0));
    c.new_tasks
        .push(new_task("i--later", Some("a"), T0 + 60 * SEC));
    let successors = SuccessorClaim {
        owner: "w1".into(),
        lease: Duration::from_secs(10),
        queues: None,
        exclude: Vec::new(),
        machines: vec!["M".into()],
        targets: Targets::Any,
        max: 5,
    };
    let result = store.apply(T0, c.into(), Some(&successors)).await.unwrap();
    assert_eq!(result.applied, Applied::Yes);
    assert_eq!(result.claimed.len(), 1);
    let next = &result.claimed[0];
    assert_eq!(
        (next.name.as_str(), next.attempt, next.machine.as_str()),
        ("i--now", 0, "M")
    );
    assert!(
        store.claim(T0, &request(5)).await.unwrap().is_empty(),
        "already leased"
    );
    assert_eq!(apply_one(store, T0 + SEC, commit(next)).await, Applied::Yes);
}

/// Check that task names are unique per instance.
pub async fn task_names_are_unique_per_instance(store: &dyn Store) {
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.new_tasks.push(new_task("i--dup", Some("a"), T0));
    c.new_tasks.push(new_task("i--dup", Some("a"), T0));
    apply_one(store, T0, c).await;
    assert_eq!(store.instance("i").await.unwrap().unwrap().tasks.len(), 1);
}

/// Check that list filters newest first.
pub async fn list_filters_newest_first(store: &dyn Store) {
    start(store, "a", T0).await;
    start(store, "b", T0).await;
    store
        .start(
            T0,
            NewInstance {
                name: "c".into(),
                machine: "Other".into(),
                context: ctx(0),
                start: new_task("c--start", None, T0),
                version: None,
            },
        )
        .await
        .unwrap();
    store.cancel(T0, "b").await.unwrap();
    let all = store.list(&ListFilter::default()).await.unwrap();
    let names: Vec<&str> = all.iter().map(|s| s.instance.as_str()).collect();
    assert_eq!(names, ["c", "b", "a"]);
    let m = store
        .list(&ListFilter {
            machine: Some("M".into()),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(m.len(), 2);
    let cancelled = store
        .list(&ListFilter {
            status: Some(InstanceStatus::Cancelled),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].instance, "b");
    let limited = store
        .list(&ListFilter {
            limit: 1,
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(limited.len(), 1);
    assert!(store.instance("zzz").await.unwrap().is_none());
}

/// Check that targets route tasks to their pools.
pub async fn targets_route_tasks_to_their_pools(store: &dyn Store) {
    let mut heavy = new_task("heavy--start", None, T0);
    heavy.target = Some("heavy".into());
    store
        .start(
            T0,
            NewInstance {
                name: "heavy".into(),
                machine: "M".into(),
                context: ctx(0),
                start: heavy,
                version: None,
            },
        )
        .await
        .unwrap();
    start(store, "plain", T0).await;
    let mut untargeted = request(10);
    untargeted.targets = Targets::Untargeted;
    let plain = store.claim(T0, &untargeted).await.unwrap();
    assert_eq!(
        plain
            .iter()
            .map(|t| t.instance.as_str())
            .collect::<Vec<_>>(),
        ["plain"]
    );
    let mut other = request(10);
    other.targets = Targets::Only(vec!["gpu".into()]);
    assert!(store.claim(T0, &other).await.unwrap().is_empty());
    let mut pool = request(10);
    pool.targets = Targets::Only(vec!["heavy".into()]);
    let taken = store.claim(T0, &pool).await.unwrap();
    assert_eq!(
        taken
            .iter()
            .map(|t| t.instance.as_str())
            .collect::<Vec<_>>(),
        ["heavy"]
    );
}

/// Check that task ids are never reused.
pub async fn task_ids_are_never_reused(store: &dyn Store) {
    // A stale worker fences its commit with (task id, claim): if a finished task's id came
    // back for a new task, that fence could match the wrong task.
    start(store, "i", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    assert_eq!(apply_one(store, T0, commit(&t)).await, Applied::Yes);
    start(store, "j", T0).await;
    let u = store.claim(T0, &request(1)).await.unwrap().remove(0);
    assert_ne!(u.id, t.id);
    assert_eq!(apply_one(store, T0, commit(&t)).await, Applied::Fenced);
}

/// Check that scrub removes only old ended instances.
pub async fn scrub_removes_only_old_ended_instances(store: &dyn Store) {
    for name in ["old-1", "old-2", "live", "recent"] {
        start(store, name, T0).await;
    }
    store.cancel(T0, "old-1").await.unwrap();
    store.cancel(T0 + SEC, "old-2").await.unwrap();
    store.cancel(T0 + 100 * SEC, "recent").await.unwrap();
    let cutoff = T0 + 50 * SEC;
    assert_eq!(store.scrub(cutoff, 1).await.unwrap(), 1, "bounded batches");
    assert_eq!(store.scrub(cutoff, 10).await.unwrap(), 1);
    assert_eq!(store.scrub(cutoff, 10).await.unwrap(), 0);
    assert!(store.instance("old-1").await.unwrap().is_none());
    assert!(store.instance("old-2").await.unwrap().is_none());
    assert!(store.logs("old-1").await.unwrap().is_empty());
    assert_eq!(
        store.instance("live").await.unwrap().unwrap().status,
        InstanceStatus::Running
    );
    assert_eq!(
        store.instance("recent").await.unwrap().unwrap().status,
        InstanceStatus::Cancelled
    );
}

/// Check that commits probe reports a rate.
pub async fn commits_probe_reports_a_rate(store: &dyn Store) {
    let rate = store.probe_commit_rate(20).await.unwrap();
    assert!(rate > 0.0);
}

/// Check that history and logs page with cursors.
pub async fn history_and_logs_page_with_cursors(store: &dyn Store) {
    use crate::store::{PageRequest, MAX_PAGE_MESSAGE_CHARS};
    start(store, "p", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.history = (0..5)
        .map(|i| HistoryEntry {
            to: format!("s{i}"),
            ..c.history[0].clone()
        })
        .collect();
    c.logs = (0..5)
        .map(|i| LogLine {
            at: T0,
            level: "info".into(),
            message: if i == 4 {
                "x".repeat(MAX_PAGE_MESSAGE_CHARS + 10)
            } else {
                format!("line {i}")
            },
            task: t.name.clone(),
        })
        .collect();
    assert_eq!(apply_one(store, T0 + SEC, c).await, Applied::Yes);
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .history_page("p", PageRequest { after, limit: 2 }, None)
            .await
            .unwrap()
            .unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|h| h.to.clone()));
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, ["s0", "s1", "s2", "s3", "s4"]);
    let first = store
        .logs_page("p", PageRequest { after: 0, limit: 4 })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.items.len(), 4);
    assert_eq!(first.items[0].message, "line 0");
    let rest = store
        .logs_page(
            "p",
            PageRequest {
                after: first.next.expect("a next page"),
                limit: 4,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.next, None);
    assert!(rest.items[0]
        .message
        .ends_with("… [cut: 10 more characters; `phasm logs` shows all]"));
    assert!(store
        .history_page("nobody", PageRequest { after: 0, limit: 2 }, None)
        .await
        .unwrap()
        .is_none());
}

/// Check that an instance view is bounded however long the instance ran.
pub async fn an_instance_view_is_bounded_however_long_the_instance_ran(store: &dyn Store) {
    use crate::store::VIEW_ROWS;
    start(store, "big", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    let rows = VIEW_ROWS + 50;
    c.history = (0..rows)
        .map(|i| HistoryEntry {
            to: format!("s{i}"),
            // Branches end in `done`, then `late`, then `done` again: `done` ended last.
            ends_branch: i == 3 || i == 7 || i == 9,
            ..c.history[0].clone()
        })
        .map(|mut h| {
            h.to = match h.to.as_str() {
                "s3" | "s9" => "done".into(),
                "s7" => "late".into(),
                _ => h.to,
            };
            h
        })
        .collect();
    c.new_tasks = (0..rows)
        .map(|i| new_task(&format!("big--branch-{i}"), Some("a"), T0 + 100 * SEC))
        .collect();
    assert_eq!(apply_one(store, T0 + SEC, c).await, Applied::Yes);
    let view = store.instance("big").await.unwrap().unwrap();
    assert_eq!(view.history.len(), VIEW_ROWS);
    assert_eq!(view.history_total, rows as u64);
    // The latest transitions, oldest first.
    assert_eq!(
        view.history.first().unwrap().to,
        format!("s{}", rows - VIEW_ROWS)
    );
    assert_eq!(view.history.last().unwrap().to, format!("s{}", rows - 1));
    assert_eq!(view.tasks.len(), VIEW_ROWS);
    assert_eq!(view.tasks_total, rows as u64);
    assert_eq!(view.tasks[0].name, "big--branch-0");
    assert_eq!(view.end_states, ["late", "done"]);
    assert_eq!(view.branches.ended, 3);
    assert_eq!(view.branches.live, rows as u64);
}

/// Check that workers are listed until they stop or expire.
pub async fn workers_are_listed_until_they_stop_or_expire(store: &dyn Store) {
    use crate::store::WorkerView;
    let worker = |owner: &str, targets: Targets, expires_at: i64| WorkerView {
        owner: owner.into(),
        machines: vec!["M".into(), "N".into()],
        targets,
        queues: None,
        started_at: T0,
        seen_at: T0,
        expires_at,
        about: crate::store::WorkerAbout {
            host: "host-a".into(),
            pid: 4242,
            version: "0.1.0".into(),
            concurrency: 64,
            running: 3,
            cannot_run: vec!["this worker cannot run `M` v1".into()],
        },
    };
    assert!(store.workers(T0).await.unwrap().is_empty());
    let any = worker("any", Targets::Any, T0 + 10 * SEC);
    let plain = WorkerView {
        queues: Some(vec!["mail".into()]),
        ..worker("plain", Targets::Untargeted, T0 + 10 * SEC)
    };
    let gpu = worker("gpu", Targets::Only(vec!["gpu".into()]), T0 + 30 * SEC);
    for w in [&any, &plain, &gpu] {
        store.worker_alive(T0, w).await.unwrap();
    }
    let mut listed = store.workers(T0 + SEC).await.unwrap();
    listed.sort_by(|a, b| a.owner.cmp(&b.owner));
    assert_eq!(listed, [any.clone(), gpu.clone(), plain.clone()]);
    // Saying it again moves the expiry on.
    let again = WorkerView {
        seen_at: T0 + 9 * SEC,
        expires_at: T0 + 20 * SEC,
        ..plain.clone()
    };
    store.worker_alive(T0 + 9 * SEC, &again).await.unwrap();
    // `any` expired (killed workers say nothing); `plain` is still alive.
    let listed = store.workers(T0 + 15 * SEC).await.unwrap();
    let owners: Vec<&str> = listed.iter().map(|w| w.owner.as_str()).collect();
    assert_eq!(owners.len(), 2, "{owners:?}");
    assert!(owners.contains(&"plain") && owners.contains(&"gpu"));
    store.worker_stopped("gpu").await.unwrap();
    let listed = store.workers(T0 + 15 * SEC).await.unwrap();
    assert_eq!(listed, [again]);
    // `any` stopped saying it is alive without saying it stopped: it is listed as gone (with
    // what it said of itself); `gpu` stopped cleanly and is not.
    let gone = store.workers_gone(T0 + 15 * SEC).await.unwrap();
    assert_eq!(gone, [any]);
}

/// Check that a barrier is released when the last live task finishes without successor.
pub async fn a_barrier_is_released_when_the_last_live_task_finishes_without_successor(
    store: &dyn Store,
) {
    start(store, "b", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.new_tasks = vec![
        new_task("b--one", Some("a"), T0),
        new_task("b--two", Some("a"), T0),
    ];
    assert_eq!(apply_one(store, T0, c).await, Applied::Yes);
    // One branch parks at a barrier: the other is still live, so the join waits.
    let mut branches = store.claim(T0, &request(2)).await.unwrap();
    branches.sort_by(|x, y| x.name.cmp(&y.name));
    let (one, two) = (branches.remove(0), branches.remove(0));
    let mut c = commit(&one);
    c.parked.push(crate::engine::Parked {
        state: "all".into(),
        group: String::new(),
        context: ctx(1),
        branch: "one".into(),
        step: 1,
        window: None,
        queue: "default".into(),
        target: None,
    });
    assert_eq!(apply_one(store, T0 + SEC, c).await, Applied::Yes);
    assert!(store.claim(T0 + SEC, &request(5)).await.unwrap().is_empty());
    // The other finishes and leaves nothing behind (a window join with nothing left to
    // join does that): no branch is live any more, so the barrier join runs.
    let c = Commit::finishing(&two);
    assert_eq!(apply_one(store, T0 + 2 * SEC, c).await, Applied::Yes);
    let joins = store.claim(T0 + 2 * SEC, &request(5)).await.unwrap();
    assert_eq!(joins.len(), 1, "{joins:?}");
    assert_eq!(joins[0].kind, TaskKind::Join);
    assert_eq!(joins[0].contexts, vec![ctx(1)]);
}

fn parked(state: &str, group: &str, n: i64, window: Option<i64>) -> crate::engine::Parked {
    crate::engine::Parked {
        state: state.into(),
        group: group.into(),
        context: ctx(n),
        branch: format!("b{n}"),
        step: 1,
        window,
        queue: "default".into(),
        target: None,
    }
}

/// Start instance `name` with `n` branches due at `T0`, and claim them (sorted by name).
async fn branches(store: &dyn Store, name: &str, n: usize) -> Vec<Task> {
    start(store, name, T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.new_tasks = (0..n)
        .map(|i| new_task(&format!("{name}--branch-{i}"), Some("a"), T0))
        .collect();
    assert_eq!(apply_one(store, T0, c).await, Applied::Yes);
    let mut tasks = store.claim(T0, &request(n)).await.unwrap();
    assert_eq!(tasks.len(), n);
    tasks.sort_by(|x, y| x.name.cmp(&y.name));
    tasks
}

/// Commit `task` as parking `p` (and nothing else).
async fn park_one(store: &dyn Store, now: i64, task: &Task, p: crate::engine::Parked) {
    let mut c = Commit::finishing(task);
    c.parked.push(p);
    assert_eq!(apply_one(store, now, c).await, Applied::Yes);
}

/// Check that an instance completes when its last pending task finishes with nothing after it,
/// not only when a branch ends: here a window join left empty because a re-claimed earlier
/// join took its branch.
pub async fn an_instance_completes_when_its_last_task_finishes_without_successor(
    store: &dyn Store,
) {
    let tasks = branches(store, "e", 2).await;
    // The second branch runs long (its lease renewed) and parks late.
    let renewed = store
        .renew(
            T0 + 5 * SEC,
            &[(tasks[1].id, tasks[1].claim)],
            T0 + 25 * SEC,
        )
        .await
        .unwrap();
    assert_eq!(renewed, vec![true]);
    let window = Some(20 * SEC);
    park_one(store, T0 + SEC, &tasks[0], parked("j", "", 0, window)).await;
    let first = store.claim(T0 + 21 * SEC, &request(5)).await.unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].contexts, vec![ctx(0)]);
    // The join is started, so the next arrival opens a window of its own (due at T0 + 42 s).
    park_one(store, T0 + 22 * SEC, &tasks[1], parked("j", "", 1, window)).await;
    // The first join's lease runs out; claimed again, it takes both branches.
    let again = store.claim(T0 + 32 * SEC, &request(5)).await.unwrap();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].id, first[0].id);
    assert_eq!(again[0].contexts, vec![ctx(0), ctx(1)]);
    let mut c = Commit::finishing(&again[0]);
    c.instance_change = InstanceChange::BranchEnded(ctx(9));
    assert_eq!(apply_one(store, T0 + 33 * SEC, c).await, Applied::Yes);
    let view = store.instance("e").await.unwrap().unwrap();
    assert_eq!(
        view.status,
        InstanceStatus::Running,
        "the second join is pending"
    );
    let empty = store.claim(T0 + 42 * SEC, &request(5)).await.unwrap();
    assert_eq!(empty.len(), 1, "{empty:?}");
    assert!(empty[0].contexts.is_empty(), "{empty:?}");
    let c = Commit::finishing(&empty[0]);
    assert_eq!(apply_one(store, T0 + 43 * SEC, c).await, Applied::Yes);
    let view = store.instance("e").await.unwrap().unwrap();
    assert_eq!(
        view.status,
        InstanceStatus::Completed,
        "nothing of it is left"
    );
    assert_eq!(view.current_context, Some(ctx(9)));
}

/// Check that [`Store::sweep`](crate::store::WorkStore::sweep) (which repairs what a dead
/// worker left unsettled) never releases a barrier while a branch is live, and changes nothing
/// in a settled store.
pub async fn a_sweep_releases_nothing_early_and_changes_nothing_settled(store: &dyn Store) {
    let tasks = branches(store, "s", 2).await;
    park_one(store, T0 + SEC, &tasks[0], parked("j", "", 0, None)).await;
    store.sweep(T0 + 2 * SEC).await.unwrap();
    // The other branch's lease has run out: it comes back, the barrier does not.
    let due = store.claim(T0 + 11 * SEC, &request(5)).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(
        due[0].kind,
        TaskKind::Dispatch,
        "the barrier waits: {due:?}"
    );
    let c = Commit::finishing(&due[0]);
    assert_eq!(apply_one(store, T0 + 12 * SEC, c).await, Applied::Yes);
    let before = store.instance("s").await.unwrap();
    store.sweep(T0 + 13 * SEC).await.unwrap();
    assert_eq!(
        store.instance("s").await.unwrap(),
        before,
        "the sweep changed a settled instance"
    );
    let join = store.claim(T0 + 13 * SEC, &request(5)).await.unwrap();
    assert_eq!(join.len(), 1, "{join:?}");
    assert_eq!(join[0].kind, TaskKind::Join);
    assert_eq!(join[0].contexts, vec![ctx(0)]);
}

/// Check that [`start_many`](crate::store::WorkStore::start_many) creates each new instance
/// with its start task, answers in order, and leaves existing names — in the store, or earlier
/// in the same batch — as they are.
pub async fn starting_many_answers_each_and_skips_existing_names(store: &dyn Store) {
    start(store, "old", T0).await;
    let new = |name: &str, n: i64| NewInstance {
        name: name.into(),
        machine: "M".into(),
        context: ctx(n),
        start: new_task(&format!("{name}--start"), None, T0),
        version: None,
    };
    let started = store
        .start_many(
            T0,
            vec![new("a", 1), new("old", 2), new("b", 3), new("a", 4)],
        )
        .await
        .unwrap();
    let existing = Started::Existing {
        machine: "M".into(),
        status: InstanceStatus::Running,
    };
    assert_eq!(
        started,
        vec![
            Started::Created,
            existing.clone(),
            Started::Created,
            existing
        ]
    );
    assert_eq!(
        store.instance("a").await.unwrap().unwrap().context,
        ctx(1),
        "the first wins"
    );
    assert_eq!(
        store.instance("old").await.unwrap().unwrap().context,
        ctx(0)
    );
    let mut names: Vec<String> = store
        .claim(T0, &request(10))
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.sort();
    assert_eq!(names, ["a--start", "b--start", "old--start"]);
    assert!(store.start_many(T0, Vec::new()).await.unwrap().is_empty());
}

/// Check that a window joins what parked before it runs and later arrivals open the next.
pub async fn a_window_joins_what_parked_before_it_runs_and_later_arrivals_open_the_next(
    store: &dyn Store,
) {
    let tasks = branches(store, "w", 3).await;
    let window = Some(5 * SEC);
    park_one(store, T0 + SEC, &tasks[0], parked("j", "", 0, window)).await;
    park_one(store, T0 + 2 * SEC, &tasks[1], parked("j", "", 1, window)).await;
    // The window is counted from the first arrival.
    assert!(store
        .claim(T0 + 5 * SEC, &request(5))
        .await
        .unwrap()
        .is_empty());
    let join = store
        .claim(T0 + 6 * SEC, &request(5))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(join.kind, TaskKind::Join);
    assert_eq!(join.contexts, vec![ctx(0), ctx(1)]);
    // A branch arriving while that join runs waits for a window of its own.
    park_one(store, T0 + 7 * SEC, &tasks[2], parked("j", "", 2, window)).await;
    let mut c = Commit::finishing(&join);
    c.new_tasks
        .push(new_task("w--after-join-1", Some("j"), T0 + 100 * SEC));
    assert_eq!(apply_one(store, T0 + 7 * SEC, c).await, Applied::Yes);
    assert!(store
        .claim(T0 + 11 * SEC, &request(5))
        .await
        .unwrap()
        .is_empty());
    let next = store
        .claim(T0 + 12 * SEC, &request(5))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(next.kind, TaskKind::Join);
    assert_eq!(next.contexts, vec![ctx(2)], "each branch is joined once");
    assert_ne!(next.name, join.name);
}

/// Check that fan in groups join apart.
pub async fn fan_in_groups_join_apart(store: &dyn Store) {
    let tasks = branches(store, "g", 4).await;
    let window = Some(SEC);
    for (i, t) in tasks.iter().enumerate() {
        let group = if i % 2 == 0 { "even" } else { "odd" };
        park_one(
            store,
            T0,
            t,
            parked("j", group, i64::try_from(i).unwrap(), window),
        )
        .await;
    }
    let mut joins = store.claim(T0 + SEC, &request(5)).await.unwrap();
    assert_eq!(joins.len(), 2, "one join per group: {joins:?}");
    let mut got: Vec<Vec<Context>> = joins.drain(..).map(|j| j.contexts).collect();
    got.sort_by_key(|c| c[0]["n"].as_i64());
    assert_eq!(got, vec![vec![ctx(0), ctx(2)], vec![ctx(1), ctx(3)]]);
    assert_eq!(
        store.instance("g").await.unwrap().unwrap().branches.parked,
        4,
        "parked until the joins commit"
    );
}

/// Check that a spawned instance starts once.
pub async fn a_spawned_instance_starts_once(store: &dyn Store) {
    let spawn = |t: &Task| {
        let mut c = commit(t);
        c.spawns.push(crate::engine::Spawned {
            name: "child".into(),
            machine: "M".into(),
            context: ctx(7),
            start: new_task("child--start", None, T0),
        });
        c
    };
    start(store, "p1", T0).await;
    start(store, "p2", T0).await;
    let mut tasks = store.claim(T0, &request(2)).await.unwrap();
    tasks.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(apply_one(store, T0, spawn(&tasks[0])).await, Applied::Yes);
    // A second spawn of the same name (a retried step, another parent) starts nothing.
    assert_eq!(apply_one(store, T0, spawn(&tasks[1])).await, Applied::Yes);
    let child = store.instance("child").await.unwrap().unwrap();
    assert_eq!(child.parent.as_deref(), Some("p1"));
    assert_eq!(child.context, ctx(7));
    assert_eq!(child.tasks.len(), 1);
    let parent = store.instance("p1").await.unwrap().unwrap();
    assert_eq!(parent.children, ["child"]);
    assert!(store
        .instance("p2")
        .await
        .unwrap()
        .unwrap()
        .children
        .is_empty());
    // The short reads a worker watching instances uses agree with the view.
    assert_eq!(store.children("p1").await.unwrap(), ["child"]);
    assert!(store.children("p2").await.unwrap().is_empty());
    assert!(store.children("nobody").await.unwrap().is_empty());
    assert_eq!(
        store.status("child").await.unwrap(),
        Some(InstanceStatus::Running)
    );
    assert_eq!(store.status("nobody").await.unwrap(), None);
    store.cancel(T0, "child").await.unwrap();
    assert_eq!(
        store.status("child").await.unwrap(),
        Some(InstanceStatus::Cancelled)
    );
}

/// Check that a continuation page queued early is not queued again by a retry.
pub async fn a_continuation_page_queued_early_is_not_queued_again_by_a_retry(store: &dyn Store) {
    start(store, "c", T0).await;
    let page = store.claim(T0, &request(1)).await.unwrap().remove(0);
    assert!(!page.next_page_queued);
    // The page queues its next page first and keeps its lease.
    let mut keep = Commit::finishing(&page);
    keep.disposition = Disposition::Keep;
    keep.new_tasks.push(new_task("c--page-1", None, T0));
    assert_eq!(apply_one(store, T0 + SEC, keep).await, Applied::Yes);
    assert_eq!(
        store
            .renew(T0 + 2 * SEC, &[(page.id, page.claim)], T0 + 20 * SEC)
            .await
            .unwrap(),
        [true],
        "the page still holds its lease"
    );
    // Its worker dies: the page runs again, knowing its next page is queued.
    let mut again = store.claim(T0 + 30 * SEC, &request(5)).await.unwrap();
    again.sort_by(|x, y| x.name.cmp(&y.name));
    let retried = again
        .iter()
        .find(|t| t.id == page.id)
        .expect("the page again");
    assert!(retried.next_page_queued);
    assert!(again.iter().any(|t| t.name == "c--page-1"));
}

/// Check that stats count due scheduled running and parked.
pub async fn stats_count_due_scheduled_running_and_parked(store: &dyn Store) {
    start(store, "s", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut c = commit(&t);
    c.new_tasks = vec![
        new_task("s--due-1", Some("a"), T0),
        new_task("s--due-2", Some("a"), T0),
        new_task("s--later", Some("a"), T0 + 60 * SEC),
    ];
    c.parked.push(parked("j", "", 1, Some(600 * SEC)));
    assert_eq!(apply_one(store, T0, c).await, Applied::Yes);
    let running = store.claim(T0 + SEC, &request(1)).await.unwrap();
    assert_eq!(running.len(), 1);
    let stats = store.stats(T0 + 3 * SEC).await.unwrap();
    assert_eq!(stats.parked, 1);
    let q = stats
        .queues
        .iter()
        .find(|q| q.queue == "default")
        .expect("the default queue");
    assert_eq!((q.due, q.running), (1, 1), "{q:?}");
    // The later step and the window join wait.
    assert_eq!(q.scheduled, 2, "{q:?}");
    assert!(q.oldest_due_age_seconds >= 2.9, "{q:?}");
}

/// Check that two claimers never take the same task.
pub async fn two_claimers_never_take_the_same_task(store: &dyn Store) {
    for i in 0..40 {
        start(store, &format!("r{i:02}"), T0).await;
    }
    let mut other = request(15);
    other.owner = "w2".into();
    let mut seen = std::collections::HashSet::new();
    for round in 0..3 {
        let now = T0 + round * SEC;
        let (a, b) =
            futures_util::future::join(store.claim(now, &request(15)), store.claim(now, &other))
                .await;
        for t in a.unwrap().into_iter().chain(b.unwrap()) {
            assert!(seen.insert(t.id), "task {} claimed twice", t.name);
        }
    }
    assert_eq!(seen.len(), 40, "every task claimed once");
}

/// Check that queue limits hold across claimers.
pub async fn queue_limits_hold_across_claimers(store: &dyn Store) {
    use crate::machine::{QueueLimits, Rate};
    for i in 0..10 {
        let name = format!("q{i}");
        store
            .start(
                T0,
                NewInstance {
                    name: name.clone(),
                    machine: "M".into(),
                    context: ctx(0),
                    start: NewTask {
                        queue: if i < 5 { "few" } else { "slow" }.into(),
                        ..new_task(&format!("{name}--start"), None, T0)
                    },
                    version: None,
                },
            )
            .await
            .unwrap();
    }
    let shared = vec![
        (
            "few".to_string(),
            QueueLimits {
                max_concurrent: Some(2),
                rate: None,
            },
        ),
        (
            "slow".to_string(),
            QueueLimits {
                max_concurrent: None,
                rate: Some(Rate {
                    count: 3,
                    per: Duration::from_secs(60),
                }),
            },
        ),
    ];
    let claimer = |owner: &str| ClaimRequest {
        owner: owner.into(),
        lease: Duration::from_secs(60),
        shared_limits: shared.clone(),
        ..request(10)
    };
    let count = |tasks: &[Task], queue: &str| tasks.iter().filter(|t| t.queue == queue).count();
    let first = store.claim(T0, &claimer("w1")).await.unwrap();
    let second = store.claim(T0, &claimer("w2")).await.unwrap();
    // Two running at most in `few`, three starts a minute in `slow`, whoever claims.
    assert_eq!(count(&first, "few") + count(&second, "few"), 2);
    assert_eq!(count(&first, "slow") + count(&second, "slow"), 3);
    // One `few` task finishes: one more may start. Twenty seconds refill one `slow` token.
    let done = first
        .iter()
        .chain(&second)
        .find(|t| t.queue == "few")
        .unwrap();
    assert_eq!(
        apply_one(store, T0 + SEC, Commit::finishing(done)).await,
        Applied::Yes
    );
    let later = store.claim(T0 + 20 * SEC, &claimer("w2")).await.unwrap();
    assert_eq!((count(&later, "few"), count(&later, "slow")), (1, 1));
}

/// Check that a barrier waits for branches stopped by a failure.
pub async fn a_barrier_waits_for_branches_stopped_by_a_failure(store: &dyn Store) {
    let tasks = branches(store, "f", 2).await;
    park_one(store, T0 + SEC, &tasks[0], parked("all", "", 0, None)).await;
    // The other branch fails for good: the instance fails, and the barrier must not run
    // without it.
    let mut failed = Commit::finishing(&tasks[1]);
    failed.disposition = Disposition::Failed {
        error: "boom".into(),
    };
    failed.instance_change = InstanceChange::Fail("boom".into());
    assert_eq!(apply_one(store, T0 + 2 * SEC, failed).await, Applied::Yes);
    store.sweep(T0 + 3 * SEC).await.unwrap();
    let view = store.instance("f").await.unwrap().unwrap();
    let join = view
        .tasks
        .iter()
        .find(|t| t.event == "fan-in")
        .expect("the barrier join");
    assert_eq!(join.status, crate::store::TaskStatus::Waiting, "{view:?}");
    // Retried, the branch runs and parks: now the barrier joins both.
    assert_eq!(store.retry(T0 + 4 * SEC, "f").await.unwrap(), Control::Done);
    let again = store
        .claim(T0 + 4 * SEC, &request(5))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(again.name, tasks[1].name);
    park_one(store, T0 + 5 * SEC, &again, parked("all", "", 1, None)).await;
    store.sweep(T0 + 6 * SEC).await.unwrap();
    let join = store
        .claim(T0 + 6 * SEC, &request(5))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(join.kind, TaskKind::Join);
    assert_eq!(join.contexts, vec![ctx(0), ctx(1)]);
}

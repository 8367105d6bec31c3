//! Checks of the instance list's filters, orders and columns.

use super::{apply_one, commit, ctx, new_task, request, SEC, T0};
use crate::engine::InstanceChange;
use crate::store::{Applied, ListFilter, ListOrder, NewInstance, StepMatch, Store};

async fn start_at(store: &dyn Store, name: &str, now: i64, due_at: i64) {
    store
        .start(
            now,
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
}

async fn names(store: &dyn Store, filter: ListFilter) -> Vec<String> {
    store
        .list(&filter)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.instance)
        .collect()
}

/// Check every filter of the list (name prefix, pending steps, stuck since, created and
/// ended ranges), the order by end with its cursor, and the columns (steps, end, the oldest
/// pending step).
pub async fn the_instance_list_filters_orders_and_describes(store: &dyn Store) {
    start_at(store, "a-1", T0, T0).await;
    start_at(store, "a-2", T0 + 10 * SEC, T0 + 10 * SEC).await;
    start_at(store, "b-1", T0 + 20 * SEC, T0 + 1000 * SEC).await;
    let claimed = store.claim(T0 + 30 * SEC, &request(2)).await.unwrap();
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    for t in claimed {
        let mut c = commit(&t);
        if t.instance == "a-1" {
            c.new_tasks
                .push(new_task("a-1--next", Some("a"), T0 + 100 * SEC));
            assert_eq!(apply_one(store, T0 + 30 * SEC, c).await, Applied::Yes);
        } else {
            c.instance_change = InstanceChange::BranchEnded(ctx(1));
            assert_eq!(apply_one(store, T0 + 35 * SEC, c).await, Applied::Yes);
        }
    }
    let all = ListFilter::default();
    assert_eq!(names(store, all.clone()).await, ["b-1", "a-2", "a-1"]);
    let f = |g: fn(&mut ListFilter)| {
        let mut f = all.clone();
        g(&mut f);
        f
    };
    assert_eq!(
        names(store, f(|f| f.prefix = Some("a-".into()))).await,
        ["a-2", "a-1"]
    );
    assert!(
        names(store, f(|f| f.prefix = Some("A-".into())))
            .await
            .is_empty(),
        "case matters"
    );
    assert_eq!(
        names(
            store,
            f(|f| {
                f.prefix = Some("a-".into());
                f.before = Some("a-2".into());
            })
        )
        .await,
        ["a-1"],
        "a prefix lists in name order, paged by name"
    );
    assert_eq!(
        names(
            store,
            f(|f| {
                f.steps = Some(vec![StepMatch {
                    from: Some("a".into()),
                    event: Some("go".into()),
                }]);
            })
        )
        .await,
        ["a-1"]
    );
    assert_eq!(
        names(
            store,
            f(|f| {
                f.steps = Some(vec![StepMatch {
                    from: None,
                    event: Some("go".into()),
                }]);
            })
        )
        .await,
        ["b-1"]
    );
    assert!(names(store, f(|f| f.steps = Some(Vec::new())))
        .await
        .is_empty());
    assert!(
        names(
            store,
            f(|f| {
                f.steps = Some(vec![StepMatch {
                    from: Some("a".into()),
                    event: None,
                }]);
            })
        )
        .await
        .is_empty(),
        "no wait"
    );
    // Stuck: a pending step queued before T0 + 25 s (b-1's start step; a-1's next step was
    // queued at T0 + 30 s).
    assert_eq!(
        names(store, f(|f| f.queued_before = Some(T0 + 25 * SEC))).await,
        ["b-1"]
    );
    assert_eq!(
        names(
            store,
            f(|f| {
                f.created_after = Some(T0 + 5 * SEC);
                f.created_before = Some(T0 + 20 * SEC);
            })
        )
        .await,
        ["a-2"]
    );
    // A created range lists newest first by creation time, paged by its cursor.
    assert_eq!(
        names(store, f(|f| f.created_before = Some(T0 + 30 * SEC))).await,
        ["b-1", "a-2", "a-1"]
    );
    assert_eq!(
        names(
            store,
            f(|f| {
                f.created_before = Some(T0 + 30 * SEC);
                f.before = Some("a-2".into());
            })
        )
        .await,
        ["a-1"]
    );
    assert_eq!(
        names(store, f(|f| f.order = ListOrder::Ended)).await,
        ["a-2"]
    );
    assert!(names(
        store,
        f(|f| {
            f.order = ListOrder::Ended;
            f.before = Some("a-2".into());
        })
    )
    .await
    .is_empty());
    assert!(names(store, f(|f| f.ended_after = Some(T0 + 36 * SEC)))
        .await
        .is_empty());
    assert_eq!(
        names(store, f(|f| f.ended_before = Some(T0 + 36 * SEC))).await,
        ["a-2"]
    );
    // Paging newest first.
    assert_eq!(
        names(
            store,
            f(|f| {
                f.limit = 1;
                f.before = Some("b-1".into());
            })
        )
        .await,
        ["a-2"]
    );
    let rows = store.list(&all).await.unwrap();
    let a1 = rows.iter().find(|r| r.instance == "a-1").unwrap();
    assert_eq!(a1.steps, 1);
    assert_eq!(a1.ended_at, None);
    let p = a1.pending.as_ref().expect("a pending step");
    assert_eq!(
        (p.from.as_deref(), p.event.as_str(), p.waiting),
        (Some("a"), "go", false)
    );
    assert_eq!(p.queued_at, T0 + 30 * SEC);
    let a2 = rows.iter().find(|r| r.instance == "a-2").unwrap();
    assert_eq!((a2.ended_at, &a2.pending), (Some(T0 + 35 * SEC), &None));
    let b1 = rows.iter().find(|r| r.instance == "b-1").unwrap();
    assert_eq!(b1.pending.as_ref().map(|p| p.from.clone()), Some(None));
    assert_eq!(b1.parent, None);
}

/// Check the orders by duration (ended instances, longest first) and by age (oldest first),
/// with their cursors.
pub async fn the_instance_list_sorts_by_duration_and_by_age(store: &dyn Store) {
    start_at(store, "x", T0, T0).await;
    start_at(store, "y", T0 + SEC, T0 + SEC).await;
    start_at(store, "z", T0 + 2 * SEC, T0 + 1000 * SEC).await;
    for t in store.claim(T0 + 5 * SEC, &request(2)).await.unwrap() {
        let mut c = commit(&t);
        c.instance_change = InstanceChange::BranchEnded(ctx(1));
        // x runs 14 s, y 10 s (within the 10 s leases from 5 s); z is still running.
        let end = if t.instance == "x" {
            T0 + 14 * SEC
        } else {
            T0 + 11 * SEC
        };
        assert_eq!(apply_one(store, end, c).await, Applied::Yes);
    }
    let order = |o: ListOrder, before: Option<&str>, machine: Option<&str>| ListFilter {
        order: o,
        before: before.map(str::to_string),
        machine: machine.map(str::to_string),
        ..ListFilter::default()
    };
    assert_eq!(
        names(store, order(ListOrder::Duration, None, None)).await,
        ["x", "y"]
    );
    assert_eq!(
        names(store, order(ListOrder::Duration, Some("x"), None)).await,
        ["y"]
    );
    assert_eq!(
        names(store, order(ListOrder::Duration, None, Some("M"))).await,
        ["x", "y"]
    );
    assert!(
        names(store, order(ListOrder::Duration, None, Some("Other")))
            .await
            .is_empty()
    );
    assert_eq!(
        names(store, order(ListOrder::Oldest, None, None)).await,
        ["x", "y", "z"]
    );
    assert_eq!(
        names(store, order(ListOrder::Oldest, Some("x"), None)).await,
        ["y", "z"]
    );
}

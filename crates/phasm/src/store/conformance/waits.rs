//! Checks of waiting for events from outside: deliveries, buffering, duplicates, timeouts.

use super::{apply_one, commit, ctx, request, start, SEC, T0};
use crate::engine::{Accept, Commit, Context, NewTask, NewWait, Task, TaskKind, NEVER};
use crate::store::{Applied, Control, Delivered, Delivery, InstanceStatus, Store};

/// A wait of instance `i` in state `approval` for `events`, due at `due_at`, on `branch`.
fn wait(i: &str, branch: &str, due_at: i64, events: &[&str]) -> NewWait {
    let name = crate::engine::wait_task_name(i, branch, "approval", 1, 1);
    NewWait {
        task: NewTask {
            name,
            from_state: Some("approval".into()),
            event: if due_at == NEVER {
                String::new()
            } else {
                "expired".into()
            },
            kind: TaskKind::Wait,
            context: ctx(1),
            step: 1,
            branch: branch.into(),
            queue: "default".into(),
            target: None,
            due_at,
            token: None,
        },
        accepts: events
            .iter()
            .map(|e| Accept {
                event: (*e).to_string(),
                name: crate::engine::task_name(i, branch, "approval", e, "next", 1),
                queue: "default".into(),
                target: None,
                delay: 0,
            })
            .collect(),
    }
}

/// Start instance `i`, claim its start task and commit it beginning `waits`.
async fn begin_waiting(store: &dyn Store, i: &str, waits: Vec<NewWait>) -> Task {
    start(store, i, T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let c = Commit {
        waits,
        ..commit(&t)
    };
    assert_eq!(apply_one(store, T0, c).await, Applied::Yes);
    t
}

fn send(i: &str, event: &str, id: Option<&str>, data: Context) -> Delivery {
    Delivery {
        instance: i.into(),
        event: event.into(),
        data,
        id: id.map(str::to_string),
        wait: None,
        checks: Default::default(),
    }
}

fn data(key: &str, v: i64) -> Context {
    let mut c = Context::new();
    c.insert(key.into(), v.into());
    c
}

/// Check that a delivered event replaces the wait with its dispatch (data merged), once: the
/// same id again changes nothing, and with the wait gone a second event is buffered.
pub async fn a_delivered_event_replaces_the_wait_once(store: &dyn Store) {
    begin_waiting(
        store,
        "w",
        vec![wait(
            "w",
            "",
            T0 + 100 * SEC,
            &["approved", "rejected", "expired"],
        )],
    )
    .await;
    let view = store.instance("w").await.unwrap().unwrap();
    assert_eq!(view.waiting.len(), 1, "{view:?}");
    let w = &view.waiting[0];
    assert_eq!(w.state, "approval");
    assert_eq!(w.events, ["approved", "rejected", "expired"]);
    assert_eq!(w.deadline, Some(T0 + 100 * SEC));
    assert_eq!(w.timeout_event.as_deref(), Some("expired"));
    assert_eq!(view.branches.waiting, 1);
    assert_eq!(view.branches.live, 0, "a waiting branch is not live");
    assert!(
        store
            .claim(T0 + SEC, &request(10))
            .await
            .unwrap()
            .is_empty(),
        "a wait is not claimed before its timeout"
    );

    let sent = store
        .deliver(T0 + SEC, &send("w", "approved", Some("e1"), data("x", 7)))
        .await
        .unwrap();
    assert_eq!(sent, Delivered::Dispatched(1));
    let again = store
        .deliver(T0 + SEC, &send("w", "approved", Some("e1"), data("x", 8)))
        .await
        .unwrap();
    assert_eq!(again, Delivered::Duplicate, "the same id changes nothing");
    let claimed = store.claim(T0 + 2 * SEC, &request(10)).await.unwrap();
    assert_eq!(claimed.len(), 1, "one dispatch: {claimed:?}");
    let d = &claimed[0];
    assert_eq!(
        (d.kind, d.from_state.as_deref(), d.event.as_str(), d.step),
        (TaskKind::Dispatch, Some("approval"), "approved", 1)
    );
    assert_eq!(d.context.get("x"), Some(&7.into()), "data merged: {d:?}");
    assert_eq!(d.context.get("n"), Some(&1.into()), "the context kept");
    let view = store.instance("w").await.unwrap().unwrap();
    assert!(view.waiting.is_empty());
    let later = store
        .deliver(T0 + 3 * SEC, &send("w", "rejected", None, Context::new()))
        .await
        .unwrap();
    assert_eq!(later, Delivered::Buffered, "no wait now: kept for the next");
    assert_eq!(
        apply_one(store, T0 + 3 * SEC, commit(d)).await,
        Applied::Yes
    );
    assert!(
        store
            .claim(T0 + 200 * SEC, &request(10))
            .await
            .unwrap()
            .is_empty(),
        "the replaced wait's timeout never fires"
    );
}

/// Check that events sent while no branch waits are buffered in order, and the next wait
/// takes the oldest it accepts (instead of waiting), leaving the others buffered.
pub async fn an_event_sent_before_the_wait_is_taken_in_order_when_it_begins(store: &dyn Store) {
    start(store, "b", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    for (event, v) in [("other", 1), ("approved", 2), ("approved", 3)] {
        let sent = store
            .deliver(T0, &send("b", event, None, data("v", v)))
            .await
            .unwrap();
        assert_eq!(sent, Delivered::Buffered, "{event}");
    }
    let view = store.instance("b").await.unwrap().unwrap();
    let buffered: Vec<&str> = view.buffered.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(buffered, ["other", "approved", "approved"]);
    let c = Commit {
        waits: vec![wait("b", "", NEVER, &["approved", "rejected"])],
        ..commit(&t)
    };
    assert_eq!(apply_one(store, T0 + SEC, c).await, Applied::Yes);
    let view = store.instance("b").await.unwrap().unwrap();
    assert!(view.waiting.is_empty(), "the wait took a buffered event");
    let buffered: Vec<(&str, u64)> = view
        .buffered
        .iter()
        .map(|e| (e.event.as_str(), e.bytes))
        .collect();
    // `{"v":1}` and `{"v":3}` are left (the view says their sizes, not their data).
    assert_eq!(buffered, [("other", 7), ("approved", 7)]);
    let claimed = store.claim(T0 + SEC, &request(10)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event, "approved");
    assert_eq!(claimed[0].context.get("v"), Some(&2.into()), "the oldest");
}

/// Check that a timeout claimed before an event wins (the event is buffered, the timeout
/// commits), and that an event delivered before the claim removes the timeout.
pub async fn a_timeout_claimed_first_wins_and_an_event_delivered_first_stops_it(store: &dyn Store) {
    begin_waiting(
        store,
        "t",
        vec![wait("t", "", T0 + 10 * SEC, &["approved", "expired"])],
    )
    .await;
    let timeout = store.claim(T0 + 11 * SEC, &request(10)).await.unwrap();
    assert_eq!(timeout.len(), 1);
    assert_eq!(
        (timeout[0].kind, timeout[0].event.as_str()),
        (TaskKind::Wait, "expired")
    );
    let sent = store
        .deliver(T0 + 11 * SEC, &send("t", "approved", None, Context::new()))
        .await
        .unwrap();
    assert_eq!(
        sent,
        Delivered::Buffered,
        "the timeout runs: the event waits"
    );
    assert_eq!(
        apply_one(store, T0 + 12 * SEC, commit(&timeout[0])).await,
        Applied::Yes
    );

    begin_waiting(
        store,
        "u",
        vec![wait("u", "", T0 + 10 * SEC, &["approved", "expired"])],
    )
    .await;
    let sent = store
        .deliver(T0 + 11 * SEC, &send("u", "approved", None, Context::new()))
        .await
        .unwrap();
    assert_eq!(
        sent,
        Delivered::Dispatched(1),
        "due but not claimed: the event wins"
    );
    let claimed = store.claim(T0 + 12 * SEC, &request(10)).await.unwrap();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].event, "approved", "no timeout ran");
}

/// Check that events to an unknown or ended instance are refused (but a duplicate id is still
/// answered as such).
pub async fn events_to_an_ended_or_unknown_instance_are_refused(store: &dyn Store) {
    let missing = store
        .deliver(T0, &send("nobody", "approved", None, Context::new()))
        .await
        .unwrap();
    assert_eq!(missing, Delivered::NotFound);
    begin_waiting(store, "e", vec![wait("e", "", NEVER, &["approved"])]).await;
    let first = store
        .deliver(T0, &send("e", "approved", Some("id-1"), Context::new()))
        .await
        .unwrap();
    assert_eq!(first, Delivered::Dispatched(1));
    assert_eq!(store.cancel(T0, "e").await.unwrap(), Control::Done);
    let after = store
        .deliver(T0, &send("e", "approved", None, Context::new()))
        .await
        .unwrap();
    assert_eq!(after, Delivered::NotRunning(InstanceStatus::Cancelled));
    let repeated = store
        .deliver(T0, &send("e", "approved", Some("id-1"), Context::new()))
        .await
        .unwrap();
    assert_eq!(repeated, Delivered::Duplicate, "a resend of an accepted id");
}

/// Check that a wait without a timeout is never due (nor counted by `next_due`), keeps its
/// instance running, and stays not due when its instance is failed and retried.
pub async fn a_wait_without_timeout_is_never_due_even_after_a_retry(store: &dyn Store) {
    start(store, "n", T0).await;
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    let mut sibling = crate::engine::NewTask {
        name: "n--sibling".into(),
        ..wait("n", "", T0, &[]).task
    };
    sibling.kind = TaskKind::Dispatch;
    sibling.event = "go".into();
    let c = Commit {
        waits: vec![wait("n", "", NEVER, &["approved"])],
        new_tasks: vec![sibling],
        ..commit(&t)
    };
    assert_eq!(apply_one(store, T0, c).await, Applied::Yes);
    assert_eq!(store.next_due().await.unwrap(), Some(T0));
    let s = store.claim(T0, &request(10)).await.unwrap();
    assert_eq!(s.len(), 1, "only the sibling: {s:?}");
    let mut failed = commit(&s[0]);
    failed.history.clear();
    failed.disposition = crate::engine::Disposition::Failed {
        error: "boom".into(),
    };
    failed.instance_change = crate::engine::InstanceChange::Fail("boom".into());
    assert_eq!(apply_one(store, T0, failed).await, Applied::Yes);
    assert_eq!(store.retry(T0 + SEC, "n").await.unwrap(), Control::Done);
    let s = store.claim(T0 + SEC, &request(10)).await.unwrap();
    assert_eq!(s.len(), 1, "the retried sibling, not the wait: {s:?}");
    assert_eq!(s[0].name, "n--sibling");
    assert_eq!(
        apply_one(store, T0 + SEC, commit(&s[0])).await,
        Applied::Yes
    );
    assert_eq!(
        store.next_due().await.unwrap(),
        None,
        "a wait for ever is never due"
    );
    assert!(store
        .claim(T0 + 10 * 365 * 24 * 3600 * SEC, &request(10))
        .await
        .unwrap()
        .is_empty());
    store.sweep(T0 + 100 * SEC).await.unwrap();
    let view = store.instance("n").await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Running, "waiting is not ended");
    assert_eq!(view.waiting.len(), 1);
    assert_eq!(view.waiting[0].deadline, None);
}

/// Check that a delivery addressed to one wait (a token's) reaches only that branch, and is
/// refused, not buffered, once that wait is over; and that the token key is stable.
pub async fn a_token_addressed_delivery_reaches_only_its_wait(store: &dyn Store) {
    let a = wait("k", "a", NEVER, &["approved"]);
    let b = wait("k", "b", NEVER, &["approved"]);
    let a_name = a.task.name.clone();
    begin_waiting(store, "k", vec![a, b]).await;
    let to_a = Delivery {
        wait: Some(a_name),
        ..send("k", "approved", None, Context::new())
    };
    assert_eq!(
        store.deliver(T0, &to_a).await.unwrap(),
        Delivered::Dispatched(1)
    );
    assert_eq!(store.deliver(T0, &to_a).await.unwrap(), Delivered::WaitOver);
    let view = store.instance("k").await.unwrap().unwrap();
    assert!(
        view.buffered.is_empty(),
        "a token's event is never buffered"
    );
    assert_eq!(view.waiting.len(), 1);
    assert_eq!(view.waiting[0].branch, "b");
    let key = store.wait_key().await.unwrap();
    assert!(key.len() >= 32, "a key of {} bytes", key.len());
    assert_eq!(store.wait_key().await.unwrap(), key);
}

/// Check that a delivery addressed to one wait (a token's) never ends it with the wait's
/// timeout event — only with an event it accepts from outside — while the instance's own
/// name may send the timeout event (an operator's choice).
pub async fn a_token_never_sends_its_waits_timeout_event(store: &dyn Store) {
    let w = wait("t", "", T0 + 60 * SEC, &["approved", "expired"]);
    let name = w.task.name.clone();
    begin_waiting(store, "t", vec![w]).await;
    let by_token = |event: &str| Delivery {
        wait: Some(name.clone()),
        ..send("t", event, None, Context::new())
    };
    assert_eq!(
        store.deliver(T0, &by_token("expired")).await.unwrap(),
        Delivered::WaitOver
    );
    let view = store.instance("t").await.unwrap().unwrap();
    assert_eq!(view.waiting.len(), 1, "the wait goes on");
    assert!(view.buffered.is_empty());
    assert_eq!(
        store.deliver(T0, &by_token("approved")).await.unwrap(),
        Delivered::Dispatched(1)
    );
}

/// Check that the checks a delivery carries are made before anything changes: data that
/// would pass the context limit once merged is refused and the wait goes on; an instance
/// keeps at most so many events; and an event is kept only while a pending step can still
/// reach a wait for it (an instance about to end answers so instead of keeping it forever).
pub async fn a_delivery_is_refused_whole_when_its_checks_fail(store: &dyn Store) {
    use crate::store::{DeliveryChecks, Reachable};
    // A waiting branch: data that would make its context too large changes nothing.
    begin_waiting(store, "big", vec![wait("big", "", NEVER, &["approved"])]).await;
    let large = Delivery {
        checks: DeliveryChecks {
            max_context_bytes: Some(200),
            ..DeliveryChecks::default()
        },
        ..send("big", "approved", Some("m-1"), {
            let mut c = data("pad", 7);
            c.insert("text".into(), "x".repeat(300).into());
            c
        })
    };
    let Delivered::TooLarge(bytes) = store.deliver(T0, &large).await.unwrap() else {
        panic!("too large data is refused");
    };
    assert!(bytes > 300, "{bytes}");
    let view = store.instance("big").await.unwrap().unwrap();
    assert_eq!(view.waiting.len(), 1, "the wait goes on");
    assert!(view.buffered.is_empty());
    let small = Delivery {
        checks: large.checks.clone(),
        ..send("big", "approved", Some("m-1"), data("pad", 7))
    };
    assert_eq!(
        store.deliver(T0, &small).await.unwrap(),
        Delivered::Dispatched(1),
        "the refused id was not recorded"
    );

    // No wait yet: the start step is pending, and it leads to a wait for the event.
    start(store, "early", T0 + 60 * SEC).await;
    let reachable = Reachable {
        states: vec!["approval".into()],
        // The conformance suite's start tasks dispatch `go`.
        dispatches: vec!["\u{1f}go".into()],
    };
    let keep = |n: i64| Delivery {
        checks: DeliveryChecks {
            max_kept_events: Some(2),
            reachable: Some(reachable.clone()),
            ..DeliveryChecks::default()
        },
        ..send("early", "approved", None, data("n", n))
    };
    assert_eq!(
        store.deliver(T0, &keep(1)).await.unwrap(),
        Delivered::Buffered
    );
    assert_eq!(
        store.deliver(T0, &keep(2)).await.unwrap(),
        Delivered::Buffered
    );
    assert_eq!(
        store.deliver(T0, &keep(3)).await.unwrap(),
        Delivered::TooManyKept(2)
    );
    assert_eq!(
        store
            .instance("early")
            .await
            .unwrap()
            .unwrap()
            .buffered
            .len(),
        2
    );
    // Its pending steps cannot reach such a wait: nothing is kept.
    let hopeless = Delivery {
        checks: DeliveryChecks {
            reachable: Some(Reachable {
                states: vec!["approval".into()],
                dispatches: vec!["elsewhere\u{1f}go".into()],
            }),
            ..DeliveryChecks::default()
        },
        ..send("early", "approved", None, data("n", 4))
    };
    assert_eq!(
        store.deliver(T0, &hopeless).await.unwrap(),
        Delivered::CannotWait
    );
    assert_eq!(
        store
            .instance("early")
            .await
            .unwrap()
            .unwrap()
            .buffered
            .len(),
        2
    );
}

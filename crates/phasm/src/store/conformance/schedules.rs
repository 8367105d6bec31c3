//! Checks of schedules: each tick fires once, never after a later one, and `overlap: skip`.

use super::{commit, ctx, new_task, request, T0};
use crate::engine::InstanceChange;
use crate::store::{Applied, Fired, InstanceStatus, NewInstance, ScheduleTick, Started, Store};

const MINUTE: i64 = 60 * super::SEC;

/// The tick `n` minutes after `T0` of schedule `s`, starting instance `s-N`.
fn tick(s: &str, n: i64, skip_if_running: bool) -> ScheduleTick {
    let name = format!("{s}-{n}");
    ScheduleTick {
        schedule: s.into(),
        tick: T0 + n * MINUTE,
        skip_if_running,
        instance: NewInstance {
            name: name.clone(),
            machine: "M".into(),
            context: ctx(n),
            start: new_task(&format!("{name}--start"), None, T0 + n * MINUTE),
            version: None,
        },
    }
}

/// Check that the first tick a store sees registers the schedule without starting anything,
/// that each later tick starts its instance once however often it is fired, and that a tick
/// earlier than one already fired never starts.
pub async fn each_schedule_tick_starts_one_instance_and_never_goes_back(store: &dyn Store) {
    let now = T0;
    assert_eq!(
        store
            .fire_schedule(now, &tick("s", 0, false))
            .await
            .unwrap(),
        Fired::Registered
    );
    assert!(
        store.instance("s-0").await.unwrap().is_none(),
        "registering starts nothing"
    );
    assert_eq!(
        store
            .fire_schedule(now, &tick("s", 0, false))
            .await
            .unwrap(),
        Fired::AlreadyFired
    );
    assert_eq!(
        store
            .fire_schedule(now, &tick("s", 1, false))
            .await
            .unwrap(),
        Fired::Started(Started::Created)
    );
    // A second worker fires the same tick: nothing more.
    assert_eq!(
        store
            .fire_schedule(now, &tick("s", 1, false))
            .await
            .unwrap(),
        Fired::AlreadyFired
    );
    // After downtime, the latest tick fires; one skipped over never does afterwards.
    assert_eq!(
        store
            .fire_schedule(now, &tick("s", 5, false))
            .await
            .unwrap(),
        Fired::Started(Started::Created)
    );
    assert_eq!(
        store
            .fire_schedule(now, &tick("s", 3, false))
            .await
            .unwrap(),
        Fired::AlreadyFired
    );
    assert!(store.instance("s-3").await.unwrap().is_none());
    // Schedules are apart.
    assert_eq!(
        store
            .fire_schedule(now, &tick("other", 3, false))
            .await
            .unwrap(),
        Fired::Registered
    );
    let records = store.schedules().await.unwrap();
    let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["other", "s"]);
    let s = &records[1];
    assert_eq!(s.last_tick, T0 + 5 * MINUTE);
    assert_eq!(s.last_instance.as_deref(), Some("s-5"));
    assert_eq!(s.last_status, Some(InstanceStatus::Running));
    assert_eq!(records[0].last_instance, None);
    let view = store.instance("s-5").await.unwrap().unwrap();
    assert_eq!(view.context.get("n"), Some(&5.into()));
    assert_eq!(
        view.tasks.len(),
        1,
        "the instance starts with its start task"
    );
}

/// Check `overlap: skip`: a tick while the last instance runs starts nothing and counts as
/// fired; once it has ended the next tick starts again. Without skip, ticks overlap.
pub async fn a_skipping_schedule_starts_nothing_while_its_last_instance_runs(store: &dyn Store) {
    let now = T0;
    store.fire_schedule(now, &tick("s", 0, true)).await.unwrap();
    assert_eq!(
        store.fire_schedule(now, &tick("s", 1, true)).await.unwrap(),
        Fired::Started(Started::Created)
    );
    assert_eq!(
        store.fire_schedule(now, &tick("s", 2, true)).await.unwrap(),
        Fired::Skipped {
            running: "s-1".into()
        }
    );
    assert!(store.instance("s-2").await.unwrap().is_none());
    assert_eq!(
        store.fire_schedule(now, &tick("s", 2, true)).await.unwrap(),
        Fired::AlreadyFired,
        "a skipped tick counts as fired"
    );
    let records = store.schedules().await.unwrap();
    assert_eq!(records[0].last_tick, T0 + 2 * MINUTE);
    assert_eq!(records[0].last_instance.as_deref(), Some("s-1"));
    // End s-1: claim its start task at its due time and complete the instance.
    let at = T0 + MINUTE;
    let t = store.claim(at, &request(1)).await.unwrap().remove(0);
    assert_eq!(t.instance, "s-1");
    let c = crate::engine::Commit {
        instance_change: InstanceChange::BranchEnded(ctx(1)),
        ..commit(&t)
    };
    assert_eq!(super::apply_one(store, at, c).await, Applied::Yes);
    assert_eq!(
        store.fire_schedule(now, &tick("s", 3, true)).await.unwrap(),
        Fired::Started(Started::Created)
    );
    // `overlap: allow` starts while the last one runs.
    assert_eq!(
        store
            .fire_schedule(now, &tick("s", 4, false))
            .await
            .unwrap(),
        Fired::Started(Started::Created)
    );
    assert_eq!(
        store.instance("s-3").await.unwrap().unwrap().status,
        InstanceStatus::Running
    );
}
